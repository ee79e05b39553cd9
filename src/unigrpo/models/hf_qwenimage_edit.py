"""Qwen-Image-Edit (``diffusers.QwenImageEditPipeline``, one input image) and Qwen-Image-Edit-Plus
(``QwenImageEditPlusPipeline``, several) for ``model.kind: hf``, shared mode: the Qwen2.5-VL text
encoder SEES the input images, reasons about the instruction (the text engine), and its hidden
states of the edit template + reasoning condition the ``QwenImageTransformer2DModel``, which also
reads the input images' VAE latents. Everything else (VAE normalisation, packing, time map,
schedule, true CFG rule) is Qwen-Image's (``hf_qwenimage``). docs/models.md lists what was verified
against the pipelines. References: diffusers' ``pipelines/qwenimage/pipeline_qwenimage_edit.py`` and
``pipeline_qwenimage_edit_plus.py`` (``_get_qwen_prompt_embeds``, ``prepare_latents``, ``__call__``);
transformers' ``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (``get_rope_index``).

- **Prompt**: the pipeline's template (its edit system prompt); the user turn is the images' vision
  blocks then the instruction: Edit writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image
  (the pipeline has exactly one), Plus ``Picture i: <block>`` per image. Each ``<|image_pad|>`` is
  expanded to the image's token count (``qwen_vl_image``); no truncation (the pipelines have none).
  A row may carry 0..n images; all images of a batch share one size (``TokenBatch``).
- **Image sizes** (the adapter owns the resize, as the pipeline does): each input image is resized
  (PIL Lanczos) to ``calculate_dimensions(model.reference_pixels)`` for the VAE (default the
  pipelines' 1024^2); the text encoder sees that same image (Edit) or one resized to
  ``model.condition_pixels`` (Plus; default 384^2), then the processor's own ``smart_resize``.
- **Positions**: Qwen2.5-VL's 3-D mrope positions from ``get_rope_index`` (image tokens on their
  2-D grid, text after an image continuing from its largest position), passed explicitly in the
  prefill, every decode step (``pos + delta`` per row) and the teacher-forced pass. Deviation, on
  purpose: diffusers 0.42.1 under transformers 5.x does not pass ``mm_token_type_ids`` to the text
  encoder, which then gives every token a plain 1-D position (image tokens included): not how
  Qwen2.5-VL sees an image, nor what transformers 4.x computed for these pipelines. The parity tests
  restore that argument in the pipeline's call (docs/models.md).
- **Reasoning** never emits the vision placeholders (``<|image_pad|>``, ``<|video_pad|>``,
  ``<|vision_start|>``, ``<|vision_end|>``): their logits are -inf in the decode loop and in the
  teacher-forced pass alike (a sampled placeholder would need an image behind it).
- **Context**: Qwen-Image's (compacted rows, template prefix dropped, cut at
  ``model.max_text_tokens``) plus the reference latents: each image's VAE latent at its posterior
  mode, normalised and packed 2x2 (``_encode_vae_image`` + ``_pack_latents``), ``[B, n * R, 4 z]``.
- **Velocity**: the transformer reads ``[noisy tokens | reference tokens]`` with ``img_shapes =
  [(1, h, w) of the output, (1, h_r, w_r) per reference]`` and the output is cut back to the noisy
  tokens. Rows with different image counts run as separate calls (the rope reads one row's
  ``img_shapes`` for the whole batch).
- **Multi-round episodes** (``algo.rounds`` > 1; ``rollout.reflection_tokens``): the image a row drew
  is appended to its images and its reflection turn (``reflection_ids``) holds that image's vision
  block, so Qwen2.5-VL sees it where the conversation reached (after the reasoning, in a user turn
  with ``reflection_prompt``) and the transformer reads it as the row's last reference: the next
  round edits it. A text-only prompt's round 1 is drawn by the edit transformer with NO reference
  (its rope reads the output grid alone), not from a blank input image: a blank would add a fake
  image to the encoder's context and 4096 reference tokens to every call. Every image of a row
  shares one size (``TokenBatch``): a prompt's input images must then be at ``model.resolution``.
- **CFG**: ``eval_guidance`` is the pipelines' edit guidance: the negative prompt ``" "`` through
  the same template WITH the row's images, the norm-preserving true CFG of Qwen-Image.
  ``null_context`` (the rollout's unconditional branch) has no images, so ``sampler.cfg_scale > 1``
  is refused for these pipelines (``hf_config``): train CFG-free, as the paper does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from unigrpo.models.hf import lora_kwargs
from unigrpo.models.hf_qwenimage import NEGATIVE_PROMPT, QwenImage
from unigrpo.models.hf_text import packed_rows, unpacked_logprobs
from unigrpo.models.protocol import TokenBatch
from unigrpo.models.qwen_vl_image import (
    VLImageConfig,
    calculate_dimensions,
    image_tokens,
    pil_resize,
    vl_inputs,
)

__all__ = ["VISION_BLOCK", "QwenEditContext", "QwenImageEdit", "QwenImageEditPlus", "processor_config"]

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in a Qwen2.5-VL prompt


@dataclass
class QwenEditContext:
    """The transformer's inputs besides the noisy tokens: ``hidden`` [B, L, D] (zero at pads),
    ``mask`` [B, L] bool, ``refs`` [B, N * R, 4 z] the packed reference latents (a row's first
    ``n_refs[i] * R`` tokens are real; None: no row has an image), ``n_refs`` [B] long, ``ref_shape``
    the ``(1, h, w)`` packed grid of every reference."""

    hidden: torch.Tensor
    mask: torch.Tensor
    refs: torch.Tensor | None
    n_refs: torch.Tensor
    ref_shape: tuple[int, int, int] | None


@dataclass
class VisionCache:
    """The decode loop's cache: the LM's KV cache and each row's mrope offset [B, 1] (the next text
    position is the row's real-token count plus it)."""

    kv: object
    delta: torch.Tensor


def processor_config(pipeline: str) -> VLImageConfig:
    """The image processor settings of a pipeline folder or hub id (``processor/preprocessor_config.json``),
    read as JSON: the processor object itself is never built (module docstring of ``qwen_vl_image``)."""
    folder = Path(pipeline)
    if folder.is_dir():
        path = folder / "processor" / "preprocessor_config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(pipeline, "processor/preprocessor_config.json"))
    if not path.is_file():
        raise ValueError(f"model.pipeline: {path} is missing (the Qwen2-VL image processor's settings)")
    return VLImageConfig.from_json(json.loads(path.read_text()))


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit in shared mode (module docstring). Submodules: ``lm``, ``dit``, ``vae``."""

    pipeline_class = "QwenImageEditPipeline"
    sees_images = True
    edits = True
    picture_labels = False  # Plus: "Picture i: " before each image's vision block
    default_reference_pixels = 1024 * 1024  # the pipeline's calculate_dimensions(1024 * 1024, ...)
    default_condition_pixels: int | None = None  # Edit: the text encoder sees the reference-size image

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, *, vl: VLImageConfig,
                 reference_pixels: int | None = None, condition_pixels: int | None = None, **kwargs):
        super().__init__(lm, tokenizer, dit, vae, scheduler_config, **kwargs)
        c = lm.config
        self.image_id, self.vl = int(c.image_token_id), vl
        self.placeholders = torch.tensor([c.image_token_id, c.video_token_id, c.vision_start_token_id,
                                          c.vision_end_token_id])
        self.reference_pixels = int(reference_pixels or self.default_reference_pixels)
        if condition_pixels is not None and self.default_condition_pixels is None:
            raise ValueError(f"model.condition_pixels: {self.pipeline_class}'s text encoder sees the image the VAE "
                             "reads (model.reference_pixels); leave it null")
        self.condition_pixels = condition_pixels or self.default_condition_pixels
        flags = [k for k in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope") if dit.config.get(k)]
        if flags:  # another time / rope layout for the references, not what the parity tests cover
            raise ValueError(f"model.pipeline: a Qwen-Image transformer with {', '.join(flags)} is not supported")
        if self.tokenizer.convert_tokens_to_ids("<|image_pad|>") != self.image_id:
            raise ValueError("model.pipeline: the tokenizer's <|image_pad|> is not the text encoder's image_token_id")

    @classmethod
    def from_pipeline(cls, pipe, m) -> QwenImageEdit:
        template = pipe.prompt_template_encode
        if cls is QwenImageEdit:  # its template holds the one image's block: ours writes a block per image
            if template.count(VISION_BLOCK) != 1:
                raise ValueError(f"model.pipeline: {type(pipe).__name__}'s template has no single vision block")
            template = template.replace(VISION_BLOCK, "")
        return cls(pipe.text_encoder, pipe.tokenizer, pipe.transformer, pipe.vae, dict(pipe.scheduler.config),
                   vl=processor_config(m.pipeline), reference_pixels=m.reference_pixels,
                   condition_pixels=m.condition_pixels, resolution=m.resolution, template=template,
                   drop_idx=pipe.prompt_template_encode_start_idx, tokenizer_max_length=1024,
                   hidden_layers=tuple(m.hidden_layers) if m.hidden_layers else (-1,),
                   max_text_tokens=m.max_text_tokens, **lora_kwargs(m))

    # ----------------------------------------------------------------- prompts and images
    def image_sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h, w) the VAE reads, (h, w) the text encoder's input before ``smart_resize``) of an
        input image of this size (``calculate_dimensions`` returns width first)."""
        rw, rh = calculate_dimensions(self.reference_pixels, width / height)
        if self.condition_pixels is None:
            return (rh, rw), (rh, rw)
        cw, ch = calculate_dimensions(self.condition_pixels, width / height)
        return (rh, rw), (ch, cw)

    def images_text(self, n: int) -> str:
        if self.picture_labels:
            return "".join(f"Picture {i + 1}: {VISION_BLOCK}" for i in range(n))
        return VISION_BLOCK * n

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt without images (no truncation: the edit pipelines have none)."""
        return self.row_ids(text, 0, 0)

    def row_ids(self, text: str, n_images: int, per_image: int) -> list[int]:
        """The template with ``n_images`` vision blocks, each ``<|image_pad|>`` expanded to ``per_image``."""
        ids = self.tokenizer(self.template.format(self.images_text(n_images) + text))["input_ids"]
        return [j for i in ids for j in ([i] * per_image if i == self.image_id else [i])]

    def reflection_ids(self, picture: int = 1) -> list[int]:
        """The reflection turn after a drawn image (multi-round; module docstring): the assistant turn
        closed (unless the reasoning's stop token closed it), a user turn holding the drawn image's
        vision block (expanded for an image at ``resolution``, what the rollout appends; Plus labels it
        ``Picture {picture}:``, numbered on from the row's earlier images as its template numbers a
        conversation's images) and ``reflection_prompt``, the assistant turn opened, in the template's roles."""
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        side = self.resolution
        per_image = image_tokens(self.vl.grid(*self.image_sizes(side, side)[1]), self.vl.merge_size)
        block = f"Picture {picture}: {VISION_BLOCK}" if self.picture_labels else VISION_BLOCK
        text = f"\n<|im_start|>user\n{block}{self.reflection_prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        turn = [j for i in ids for j in ([i] * per_image if i == self.image_id else [i])]
        return turn if end in self.stop_ids else [end, *turn]

    def encode(self, prompts) -> TokenBatch:
        """Prompts (``tasks.Prompt`` or strings) -> the left-padded batch with each row's images."""
        return self.encode_rows([p if isinstance(p, str) else p.text for p in prompts],
                                [None if isinstance(p, str) else p.images for p in prompts])

    def encode_rows(self, texts: list[str], images: list[torch.Tensor | None]) -> TokenBatch:
        counts = [0 if x is None else int(x.shape[0]) for x in images]
        shape = next((tuple(x.shape[-2:]) for x in images if x is not None and len(x)), None)
        per_image = 0 if shape is None else image_tokens(self.vl.grid(*self.image_sizes(*shape)[1]), self.vl.merge_size)
        batch = TokenBatch.left_padded([self.row_ids(t, n, per_image) for t, n in zip(texts, counts)],
                                       self.pad_id, self.device)
        return batch.with_images(images) if any(counts) else batch

    def _images(self, tokens: TokenBatch) -> torch.Tensor | None:
        """Every real input image of the batch, rows in order [n, 3, H, W] (None: none)."""
        rows = [x for i in range(len(tokens)) if (x := tokens.row_images(i)) is not None]
        return torch.cat(rows) if rows else None

    def _vision(self, tokens: TokenBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(``pixel_values``, ``image_grid_thw``) of the batch's images, as the processor gives them."""
        images = self._images(tokens)
        if images is None:
            return None, None
        _, (h, w) = self.image_sizes(*images.shape[-2:])
        pixels, grid = vl_inputs(torch.stack([pil_resize(x, h, w) for x in images]), self.vl)
        return pixels.to(self.device, self.lm.dtype), grid.to(self.device)

    def _references(self, tokens: TokenBatch) -> tuple[torch.Tensor | None, torch.Tensor, tuple | None]:
        """(packed reference latents [B, N * R, 4 z] or None, n_refs [B], (1, h, w))."""
        n_refs = tokens.image_mask.sum(1) if tokens.image_mask is not None else torch.zeros(len(tokens), dtype=torch.long)
        images = self._images(tokens)
        if images is None:
            return None, n_refs.to(self.device), None
        (h, w), _ = self.image_sizes(*images.shape[-2:])
        z = self.encode_images(torch.stack([pil_resize(x, h, w) for x in images]).to(self.device))  # [n, 4z, h', w']
        packed = z.flatten(2).transpose(1, 2)  # [n, R, 4z]: _pack_latents' order (hf_qwenimage)
        refs = packed.new_zeros(len(tokens), tokens.images.shape[1] * packed.shape[1], packed.shape[2])
        start = 0
        for i, n in enumerate(n_refs.tolist()):
            refs[i, :n * packed.shape[1]] = packed[start:start + n].flatten(0, 1)
            start += n
        return refs, n_refs.to(self.device), (1, z.shape[2], z.shape[3])

    # ----------------------------------------------------------------- text phase with images
    def _positions(self, ids: torch.Tensor, mask: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-VL's 3-D positions [3, B, L] and each row's offset [B, 1] (module docstring)."""
        return self.lm.model.get_rope_index(ids, mm_token_type_ids=(ids == self.image_id).int(), image_grid_thw=grid,
                                            attention_mask=mask.long())

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits with the vision placeholders impossible (module docstring)."""
        return logits.float().index_fill(-1, self.placeholders.to(logits.device), float("-inf"))

    def prefill(self, tokens: TokenBatch):
        from transformers import DynamicCache

        pixels, grid = self._vision(tokens)
        pos, delta = self._positions(tokens.ids, tokens.mask, grid)
        arg = self.reasoner.cache_arg
        out = self.lm(input_ids=tokens.ids, attention_mask=tokens.mask.long(), position_ids=pos, pixel_values=pixels,
                      image_grid_thw=grid, use_cache=True, **{arg: DynamicCache()})
        return self._logits(out.logits[:, -1]), VisionCache(getattr(out, arg), delta)

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, cache: VisionCache):
        arg = self.reasoner.cache_arg
        out = self.lm(input_ids=tok[:, None], attention_mask=key_mask.long(), position_ids=pos[:, None] + cache.delta,
                      use_cache=True, **{arg: cache.kv})  # 2-D positions: the same on the 3 axes (text)
        return self._logits(out.logits[:, -1]), VisionCache(getattr(out, arg), cache.delta)

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, QwenEditContext]:
        """One teacher-forced pass over the compacted rows with their images: (log-probs [B, L], context)."""
        ids, real, src = packed_rows(tokens, 0, self.pad_id)
        pixels, grid = self._vision(tokens)  # images in row order: compaction keeps each row's tokens in order
        pos, _ = self._positions(ids, real, grid)
        out = self.lm(input_ids=ids, attention_mask=real.long(), position_ids=pos, pixel_values=pixels,
                      image_grid_thw=grid, output_hidden_states=True, use_cache=False)
        # the prompt's own placeholders are -inf targets under _logits: scored as pads (masked out after)
        targets = ids.masked_fill(torch.isin(ids, self.placeholders.to(ids.device)), self.pad_id)
        logp = unpacked_logprobs(self._logits(out.logits[:, :-1]) / temperature, targets, real, src, tokens)
        keep = slice(self.drop_idx, self.drop_idx + self.max_text_tokens)  # the template prefix dropped, cut
        mask = real[:, keep]
        hidden = torch.cat([out.hidden_states[k] for k in self.hidden_layers], -1)[:, keep] * mask[..., None]
        return logp, QwenEditContext(hidden, mask, *self._references(tokens))

    # ----------------------------------------------------------------- image phase
    def null_context(self, batch_size: int) -> QwenEditContext:
        """``NEGATIVE_PROMPT`` through the template, WITHOUT images (module docstring: CFG)."""
        _, c = self.forward_context(self.encode([NEGATIVE_PROMPT]), 1.0)
        return QwenEditContext(c.hidden.expand(batch_size, -1, -1), c.mask.expand(batch_size, -1), None,
                               c.n_refs.expand(batch_size), None)

    def eval_guidance(self, tokens: TokenBatch, ctx: QwenEditContext, cfg_scale: float):
        """The pipelines' edit guidance: the negative prompt with each row's own images, true CFG."""
        neg = self.encode_rows([NEGATIVE_PROMPT] * len(tokens), [tokens.row_images(i) for i in range(len(tokens))])
        _, neg_ctx = self.forward_context(neg)

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.combine_guidance(self.velocity(x_t, t, ctx), self.velocity(x_t, t, neg_ctx), cfg_scale)

        return velocity

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: QwenEditContext) -> torch.Tensor:
        b, c, h, w = x_t.shape
        t = t.expand(b) if t.dim() == 0 else t
        tokens = x_t.reshape(b, c, h * w).transpose(1, 2)  # pack: [B, HW, 4 z] (hf_qwenimage)
        counts = ctx.n_refs.unique().tolist()
        parts, order = [], []
        for n in counts:  # one call per image count (module docstring); usually one
            rows = torch.arange(b, device=x_t.device) if len(counts) == 1 else (ctx.n_refs == n).nonzero()[:, 0]
            parts.append(self._dit(tokens[rows], t[rows], ctx, rows, n, (h, w)))
            order.append(rows)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(torch.cat(order))]
        return out.transpose(1, 2).reshape(b, c, h, w).to(x_t.dtype)  # unpack; eps - x0 as is

    def _dit(self, noisy: torch.Tensor, t: torch.Tensor, ctx: QwenEditContext, rows: torch.Tensor, n: int,
             hw: tuple[int, int]) -> torch.Tensor:
        """The transformer on rows with ``n`` references each: [noisy | refs] in, the noisy tokens' output out."""
        dtype, shapes = self.dit_dtype, [(1, *hw)]
        x = noisy
        if n:
            x = torch.cat([noisy, ctx.refs[rows, :n * ctx.ref_shape[1] * ctx.ref_shape[2]].to(noisy.dtype)], 1)
            shapes += [ctx.ref_shape] * n
        out = self.dit(hidden_states=x.to(dtype), encoder_hidden_states=ctx.hidden[rows].to(dtype),
                       encoder_hidden_states_mask=ctx.mask[rows], timestep=t.to(dtype), img_shapes=[shapes] * len(rows),
                       guidance=None, return_dict=False)[0]
        return out[:, :noisy.shape[1]]  # the pipeline keeps the noisy tokens' velocity


class QwenImageEditPlus(QwenImageEdit):
    """Qwen-Image-Edit-Plus (2509): several input images, ``Picture i:`` labels, a smaller image for
    the text encoder than for the VAE (module docstring)."""

    pipeline_class = "QwenImageEditPlusPipeline"
    picture_labels = True
    default_condition_pixels = 384 * 384  # the pipeline's CONDITION_IMAGE_SIZE (VAE_IMAGE_SIZE: 1024^2)
