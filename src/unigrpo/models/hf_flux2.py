"""FLUX.2 [klein] (``diffusers.Flux2KleinPipeline``) for ``model.kind: hf``, shared mode: its
``Qwen3ForCausalLM`` text encoder reasons, then its hidden states of prompt + reasoning condition the
``Flux2Transformer2DModel``; latents through ``AutoencoderKLFlux2``. docs/models.md lists what was
verified against the pipeline and what was not. References: diffusers'
``pipelines/flux2/pipeline_flux2_klein.py`` (``_get_qwen3_prompt_embeds``, ``__call__``,
``prepare_latents``, ``_encode_vae_image``), ``models/transformers/transformer_flux2.py``,
``schedulers/scheduling_flow_match_euler_discrete.py``.

- **Text**: the chat template with ``enable_thinking`` (``model.enable_thinking``, default True: the
  generation prompt stops where the model opens its ``<think>`` block, so the reasoning is its
  thinking + answer; False: the pipeline's own template, which closes an empty think block, and the
  reasoning follows it).
- **Context** (``forward_context``): ONE teacher-forced pass over each row's real tokens laid out
  as the pipeline lays out a prompt: ``[real tokens | pad]`` right-padded to
  ``model.max_text_tokens`` (the pipeline's ``max_sequence_length``), or ``[pad | real tokens]``
  when the tokenizer as saved pads on the left, default positions, the pad mask; the response log-probs come from that pass, the conditioning is the hidden states of
  ``model.hidden_layers`` (the pipeline's ``text_encoder_out_layers``) of the first
  ``max_text_tokens`` positions, concatenated on channels, pad positions included (FLUX.2 takes no
  text mask: the pads are attended, as in the pipeline). The layout is per row, so a row's
  conditioning does not depend on the rows it is batched with. Longer rows are cut at
  ``max_text_tokens`` for the conditioning (the pipeline truncates) but scored in full.
- **Latents** are stored as the pipeline's ``latents`` argument: VAE latents patchified 2x2 and
  normalised by the VAE's BatchNorm running statistics, unpacked ``[4 z, H/2, W/2]``; ``velocity``
  packs them to ``[B, HW, 4 z]`` tokens with the pipeline's position ids and unpacks the output.
- **Time / velocity**: FLUX.2's transformer is called at ``timestep = sigma`` in [0, 1] (the
  pipeline divides the scheduler's ``sigma * 1000`` by 1000) and its output is the scheduler's
  ``model_output``, stepped as ``x + (sigma_next - sigma) * out``: sigma is our t and the output is
  our ``eps - x0`` as is (no sign flip).
- **Reference images** (``Flux2KleinPipeline(image=...)``; ``edits = True``, ``sees_images = False``):
  a prompt's images (``tasks.Prompt.images``) reach the batch through ``encode`` for the denoiser
  only: the Qwen3 text encoder takes no image, so the reasoning is BLIND to them (it reasons from
  the instruction's text alone). ``forward_context`` crops and VAE-encodes each row's references
  (``hf_flux2_ref``); the context carries their latents, and ``velocity`` appends their packed
  tokens (time ids 10 + 10 i) after the noisy tokens at every step, as the pipeline does, each row
  with its own references (the pipeline shares one list over its batch). Rows with different
  reference counts go through the transformer in separate calls (it takes no mask for image tokens).
  **CFG with references** (the pipeline's ``guidance_scale > 1``, default 4) runs its negative
  prompt "" WITH the same references: ``eval_guidance`` does that for evaluation. Training with CFG
  cannot (the protocol's ``null_context(batch)`` knows no images): ``hf_config`` refuses
  ``sampler.cfg_scale > 1`` with an editing task; UniGRPO trains CFG-free anyway.
- **Schedule**: the pipeline uses ``sigmas = linspace(1, 1/n, n)`` and an exponential dynamic shift
  ``mu = compute_empirical_mu(image tokens, n)``, which is our ``timesteps(n, shift=exp(mu))``
  exactly; ``pipeline_shift(n)`` gives that shift (set ``sampler.shift`` to it).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unigrpo.models.hf import HFUnifiedModel, lora_kwargs
from unigrpo.models.hf_flux2_ref import (
    check_reference_size,
    pack_references,
    reference_ids,
    reference_pixels,
)
from unigrpo.models.hf_text import packed_rows, unpacked_logprobs
from unigrpo.models.protocol import TokenBatch

__all__ = ["Flux2Klein", "FluxContext", "flux2_shift"]


@dataclass
class FluxContext:
    """The transformer's text input: ``hidden`` [B, L, D] (``L = max_text_tokens``), ``mask``
    [B, L] (real tokens; FLUX.2 attends every position, pads included); with reference images also
    ``refs`` [B, N, C, h, w] (their normalised, patchified latents; a row's real references first,
    zeros after) and ``ref_count`` [B] (each row's number of references)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    refs: torch.Tensor | None = None  # no grad: the VAE is frozen
    ref_count: torch.Tensor | None = None


def default_hidden_layers() -> tuple[int, ...]:
    """The pipeline's own default ``text_encoder_out_layers`` ((9, 18, 27) in diffusers 0.42)."""
    from diffusers import Flux2KleinPipeline

    return tuple(inspect.signature(Flux2KleinPipeline.encode_prompt).parameters["text_encoder_out_layers"].default)


def flux2_shift(image_seq_len: int, num_steps: int, scheduler_config: dict) -> float:
    """``exp(mu)``, ``mu = compute_empirical_mu(image_seq_len, num_steps)``: with the pipeline's
    ``sigmas = linspace(1, 1/n, n)``, the scheduler's exponential time shift
    ``e^mu / (e^mu + 1/sigma - 1)`` is our ``shift_time(sigma, e^mu)``, so our ``timesteps(n, exp(mu))``
    is the pipeline's grid (tested). Scheduler options without that identity are refused."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sc = scheduler_config
    if not sc.get("use_dynamic_shifting") or sc.get("time_shift_type", "exponential") != "exponential" \
            or sc.get("shift_terminal") or sc.get("use_karras_sigmas") or sc.get("use_exponential_sigmas") \
            or sc.get("use_beta_sigmas") or sc.get("invert_sigmas") or sc.get("stochastic_sampling"):
        raise NotImplementedError(f"this scheduler config is not one shift of our time grid: {sc}")
    return math.exp(compute_empirical_mu(image_seq_len, num_steps))


class Flux2Klein(HFUnifiedModel):
    """FLUX.2 [klein] in shared mode (module docstring). Submodules: ``lm``, ``dit``, ``vae``."""

    pipeline_class = "Flux2KleinPipeline"
    edits = True  # reference images condition the transformer; sees_images stays False (Qwen3 reads text only)
    dit_blocks = ("transformer_blocks", "single_transformer_blocks")  # FSDP2 units: both block lists

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, *, resolution: int,
                 hidden_layers: tuple[int, ...], max_text_tokens: int, enable_thinking: bool, **lora):
        super().__init__(lm, tokenizer, dit, vae, scheduler_config, hidden_layers=hidden_layers,
                         template_kwargs={"enable_thinking": enable_thinking}, **lora)
        self.max_text_tokens, self.enable_thinking = int(max_text_tokens), enable_thinking
        # the pipeline pads to max_text_tokens on the tokenizer's side as saved (left: a common state
        # after generation); the conditioning then holds the pads first, so ours must too
        self.left_pad = tokenizer.padding_side == "left"
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % (2 * self.vae_scale):
            raise ValueError(f"model.resolution: must be a multiple of {2 * self.vae_scale}, got {resolution}")
        side = resolution // (2 * self.vae_scale)
        self.resolution = resolution
        # a prompt file's "images" are resized to the output size: references as large as the image
        # drawn (the pipeline's default output size is its last reference's)
        self.input_image_size = (resolution, resolution)
        self._ids = {}  # position_ids, per shape
        self.latent_shape = (4 * vae.config.latent_channels, side, side)
        if dit.config.in_channels != self.latent_shape[0]:
            raise ValueError(f"the transformer reads {dit.config.in_channels} channels, the VAE gives {self.latent_shape[0]}")

    @classmethod
    def from_pipeline(cls, pipe, m) -> Flux2Klein:
        """The adapter over a loaded pipeline, configured by the ``model`` section ``m``."""
        return cls(pipe.text_encoder, pipe.tokenizer, pipe.transformer, pipe.vae, dict(pipe.scheduler.config),
                   resolution=m.resolution,
                   hidden_layers=tuple(m.hidden_layers) if m.hidden_layers else default_hidden_layers(),
                   max_text_tokens=m.max_text_tokens, enable_thinking=m.enable_thinking, **lora_kwargs(m))

    def encode(self, prompts: Sequence[Any]) -> TokenBatch:
        """The text batch of ``prompts`` (the reasoning never reads an image) with each row's
        reference images attached for the denoiser (module docstring); a reference the pipeline
        could not take is one line naming its prompt."""
        texts = [p if isinstance(p, str) else p.text for p in prompts]
        images = [None if isinstance(p, str) else p.images for p in prompts]
        for i, x in enumerate(images):
            if x is not None and x.shape[0]:
                try:
                    check_reference_size(x.shape[-2], x.shape[-1], 2 * self.vae_scale)
                except ValueError as e:
                    raise ValueError(f"prompt {i} ({texts[i][:40]!r}): {e}") from None
        return super().encode(texts).with_images(images)

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, FluxContext]:
        """One teacher-forced pass in the pipeline's layout (module docstring): (log-probs [B, L], context
        with the rows' reference latents)."""
        ids, real, src = packed_rows(tokens, self.max_text_tokens, self.pad_id,  # the pipeline's padding
                                     left_to=self.max_text_tokens if self.left_pad else 0)
        out = self.lm(input_ids=ids, attention_mask=real.long(), output_hidden_states=True, use_cache=False)
        logp = unpacked_logprobs(out.logits[:, :-1].float() / temperature, ids, real, src, tokens)
        hidden = torch.cat([out.hidden_states[k][:, :self.max_text_tokens] for k in self.hidden_layers], -1)
        return logp, FluxContext(hidden, real[:, :self.max_text_tokens], *self.references(tokens))

    def references(self, tokens: TokenBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(refs [B, N, C, h, w], ref_count [B]) of the rows' images, or (None, None) without any:
        each real image cropped as the pipeline crops it and VAE-encoded (``encode_images``)."""
        if tokens.images is None or not bool(tokens.image_mask.any()):
            return None, None
        z = self.encode_images(reference_pixels(tokens.images[tokens.image_mask], 2 * self.vae_scale))
        refs = z.new_zeros(*tokens.image_mask.shape, *z.shape[1:])
        refs[tokens.image_mask] = z  # a row's real images come first (TokenBatch.with_images)
        return refs, tokens.image_mask.sum(1)

    def null_context(self, batch_size: int) -> FluxContext:
        """The pipeline's negative prompt: "" through the pipeline's template (no thinking)."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, ctx = self.forward_context(TokenBatch(ids, mask, torch.zeros_like(mask)), 1.0)
        return FluxContext(ctx.hidden.expand(batch_size, -1, -1), ctx.mask.expand(batch_size, -1))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: FluxContext) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        counts = [] if ctx.refs is None else ctx.ref_count.unique().tolist()
        if len(counts) <= 1:  # every row has the same number of references: one call on the whole batch
            n = counts[0] if counts else 0
            return self._velocity(x_t, t, ctx.hidden, ctx.refs[:, :n] if n else None)
        if self.sharded:  # every rank must make the same transformer calls (FSDP2 collectives)
            raise ValueError(f"model.fsdp: a batch's rows carry {counts} reference images; sharded, every row of a "
                             "step must carry the same number (one transformer call per count)")
        out = torch.zeros_like(x_t)
        for n in counts:  # the transformer takes no image-token mask: one call per reference count
            rows = (ctx.ref_count == n).nonzero()[:, 0]
            out = out.index_put((rows,), self._velocity(x_t[rows], t[rows], ctx.hidden[rows],
                                                         ctx.refs[rows, :n] if n else None))
        return out

    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
                  refs: torch.Tensor | None) -> torch.Tensor:
        """The transformer on ``[noisy | references]`` tokens (refs [B, n, C, h, w] or None),
        its output cut back to the noisy tokens and unpacked."""
        b, c, h, w = x_t.shape
        dtype = self.dit_dtype
        tokens = x_t.reshape(b, c, h * w).transpose(1, 2)  # pack: [B, HW, C]
        if refs is not None:
            tokens = torch.cat([tokens, pack_references(refs.to(tokens.dtype))], 1)
        txt_ids, img_ids = self.position_ids(h, w, hidden.shape[1], None if refs is None else refs.shape[1:],
                                             x_t.device)
        out = self.dit(hidden_states=tokens.to(dtype), timestep=t.to(dtype), guidance=None,
                       encoder_hidden_states=hidden.to(dtype), txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0][:, :h * w]  # the noisy tokens' velocity
        return out.transpose(1, 2).reshape(b, c, h, w).to(x_t.dtype)  # unpack; eps - x0 as is (docstring)

    def position_ids(self, h: int, w: int, length: int, refs: torch.Size | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt_ids [length, 4], img_ids [h * w (+ the references' tokens), 4]): the pipeline's
        (T, H, W, L) coordinates of the text, the noisy latent tokens (row-major) and the references
        (``refs``: their [n, C, h', w'] or None). Built once per shape and kept: every denoising step
        and every scoring pass asks for the same few."""
        key = (h, w, length, None if refs is None else (refs[0], refs[2], refs[3]), str(device))
        if key not in self._ids:
            hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            zero = torch.zeros(h * w, dtype=torch.long, device=device)
            img_ids = torch.stack([zero, hh.reshape(-1), ww.reshape(-1), zero], -1)
            if refs is not None:
                img_ids = torch.cat([img_ids, reference_ids(refs[0], refs[2], refs[3], device)])
            lz = torch.zeros(length, dtype=torch.long, device=device)
            self._ids[key] = (torch.stack([lz, lz, lz, torch.arange(length, device=device)], -1), img_ids)
        return self._ids[key]

    def eval_guidance(self, tokens: TokenBatch, ctx: FluxContext, cfg_scale: float):
        """With references: the pipeline's CFG, whose negative prompt "" keeps the same references
        (``neg + s (pos - neg)``); without: None (the plain rule over ``null_context``)."""
        if ctx.refs is None:
            return None
        null = dataclasses.replace(self.null_context(len(tokens)), refs=ctx.refs, ref_count=ctx.ref_count)
        return lambda x, t: self.combine_guidance(self.velocity(x, t, ctx), self.velocity(x, t, null), cfg_scale)

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn(x0)
        z = torch.nn.functional.pixel_shuffle(x0 * std + mean, 2)  # un-patchify 2x2: [4z, h, w] -> [z, 2h, 2w]
        with torch.no_grad():
            image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()  # the pipeline's "argmax"
        z = torch.nn.functional.pixel_unshuffle(z.float(), 2)
        mean, std = self._bn(z)
        return (z - mean) / std

    def pipeline_shift(self, num_steps: int) -> float:
        """The ``sampler.shift`` whose ``timesteps(num_steps, shift)`` is the pipeline's schedule at
        this resolution (``flux2_shift``)."""
        return flux2_shift(self.latent_shape[1] * self.latent_shape[2], num_steps, self.scheduler_config)
