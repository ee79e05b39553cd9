"""``model.kind: bagel``: BAGEL-7B-MoT (ByteDance-Seed, Apache-2.0), the paper's model, as a
clean-room torch implementation that loads the released ``ema.safetensors`` / ``ae.safetensors`` by
key name (``bagel_io``). Decoder: ``bagel_mot``; latent path: ``bagel_latent``; VAE: ``bagel_vae``.
docs/models.md (section "Bagel-7B-MoT") lists what is verified and what is not.

Sequence layout (ByteDance-Seed/Bagel ``inferencer.py: interleave_inference``, ``bagel.py``):
every text segment is ``<|im_start|> text <|im_end|>`` (no role headers), one RoPE position per
token, causal. A prompt row is, LEFT-padded, ``[sys][prompt]<|im_start|>`` in think mode
(``sys`` = the think system prompt) and ``[prompt]<|im_start|>`` otherwise; the final
``<|im_start|>`` is the decode start token (``generate_text`` feeds it first). The reasoning is
sampled after it and ends at ``<|im_end|>`` (an action, scored). Positions are ``cumsum(mask) - 1``.

- **Context** (``forward_context``): ONE teacher-forced und-expert pass over prompt + the SAMPLED
  reasoning ids (never decoded and re-tokenised, unlike the official inferencer): the token
  log-probs (float32 log-softmax of ``logits / T``, lm_head in chunks) and, per layer, the K/V of
  every token (after ``k_norm`` and RoPE) with the key mask. A row without reasoning (thinking
  off) drops its dangling decode-start token from the keys, so the image sees ``[sys][prompt]``.
- **Image block** (``velocity``): ``<|vision_start|> latents <|vision_end|>``, all at ONE RoPE
  position (the row's next text position), full attention inside the block, attending to the
  context's real keys. The two markers run through the und expert and ``embed_tokens``, the
  latents through the gen expert; the velocity is ``llm2vae(norm_moe_gen(h))`` at the latents.
- **Convention**: BAGEL interpolates ``x_t = (1 - t) x0 + t eps`` with target ``eps - x0`` and
  steps ``x <- x - v (t_i - t_{i+1})`` on ``linspace(1, 0, N)`` shifted by ``s t / (1 + (s-1) t)``:
  our convention exactly (no sign or time flip); its ``num_timesteps = N`` is our ``num_steps =
  N - 1``.
- **Image loss into the text expert**: the markers' und computation is part of the context, so
  ``detach_context`` cuts it too: a detached context's velocity runs the markers with
  ``embed_tokens``' output and every und parameter of each layer detached (``bagel_mot.frozen``,
  inside the layer's forward: also under FSDP2 and activation checkpointing); detaching only the K/V would leave the image loss a
  path into the und weights through the markers (tested).
- **FSDP2** (``model.fsdp`` on > 1 rank): ``fsdp_plan`` makes every MoT decoder layer a unit (both
  experts of one layer), then the whole model the root (embeddings, lm_head, the final norms,
  the latent heads; the VAE stays replicated: frozen, ignored). Every phase runs through
  ``forward`` (``self(phase, ...)``: the decode engine's prefill and steps too), so no other method
  needs ``register_fsdp_forward_method``. The lifecycle (``UnifiedModel``): ``sharded`` tells the
  recipe that every forward is a collective (the decode engine runs ``max_new_tokens`` steps on
  every rank, every rank evaluates); gradients are reduce-scattered in backward;
  ``trainable_state`` gathers on every rank, ``save`` (rank 0) writes that gather.
- **Reference** (``UnifiedModel.reference``): LoRA sides with adapters disabled, fully trained sides
  (and ``train_heads``' heads) a snapshot of their tensors substituted by name (never a second copy).
- **Input images** (image-to-image, with the ViT path: ``sees_images`` and ``edits``): each enters
  the context as Bagel's VAE block then ViT block between the system segment and the prompt, in the
  same one pass (``bagel_edit``); the rest (decode, velocity, CFG branches) reads that context.
- **Multi-round episodes** (``algo.rounds`` > 1, with the ViT path): the image a row drew enters its
  context like an input image (VAE block, then ViT block) but after that round's reasoning, at the
  masked ``drawn_image_id`` column ``rollout.reflection_tokens`` writes before the reflection turn
  (``reflection_ids``: ``<|im_start|> reflection_prompt <|im_end|> <|im_start|>``); the next image is
  drawn on that context, i.e. as an image-to-image edit of the drawn one (``bagel_edit``).
- **Unclosed reasoning**: a row that hits ``max_new_tokens`` before ``<|im_end|>`` stays open (the
  official inferencer closes every segment; a closing token would be an unscored token).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unigrpo.models.bagel_cfg import EDIT, cfg_contexts, cfg_velocity
from unigrpo.models.bagel_edit import EditCache, image_part, position_mask, text_positions
from unigrpo.models.bagel_latent import (
    PATCH,
    BagelContext,
    PositionEmbedding,
    TimestepEmbedder,
    patchify,
    unpatchify,
)
from unigrpo.models.bagel_mot import LLMConfig, Qwen2MoTForCausalLM, attention_mask
from unigrpo.models.bagel_vit import Connector, SiglipNaViT, ViTConfig
from unigrpo.models.base import FSDPRoot, UnifiedModel, inject_lora
from unigrpo.models.decode import response_logprobs
from unigrpo.models.hf_text import positions
from unigrpo.models.protocol import TokenBatch

__all__ = ["SPECIALS", "THINK_SYSTEM_PROMPT", "BagelContext", "BagelModel"]

# ByteDance-Seed/Bagel inferencer.py: GEN_THINK_SYSTEM_PROMPT (a data constant of the released model)
THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate the image. \n"
                       "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process "
                       "here </think> image here")
SPECIALS = {"start": "<|im_start|>", "end": "<|im_end|>", "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>", "pad": "<|endoftext|>"}


class BagelModel(UnifiedModel):
    """BAGEL-7B-MoT for text-to-image with thinking, and image-to-image when built with its ViT
    (``vit``: then it sees and edits input images, ``bagel_edit``). Submodules carry the
    checkpoint's names: ``language_model``, ``time_embedder``, ``vae2llm``, ``llm2vae``,
    ``latent_pos_embed`` (+ ``vit_model``, ``connector``, ``vit_pos_embed``, frozen); ``vae`` holds
    ``ae.safetensors``. ``vit_max_size`` / ``vit_min_size``: the ViT transform's edges (Bagel's
    inference: 980 = the ViT's image_size, 224)."""

    def __init__(self, llm: LLMConfig, tokenizer, vae, *, max_latent_size: int, timestep_dim: int = 256,
                 resolution: int = 512, think: bool = True, system_prompt: str | None = None,
                 train_heads: bool = False, logits_chunk: int = 1024, vit: ViTConfig | None = None,
                 vit_max_size: int | None = None, vit_min_size: int = 224):
        super().__init__()
        self.sees_images = self.edits = vit is not None  # the input image enters as VAE and ViT blocks
        if vit is not None:
            self.vit_model = SiglipNaViT(vit).requires_grad_(False)
            self.connector = Connector(vit.hidden_size, llm.hidden_size).requires_grad_(False)
            self.vit_pos_embed = PositionEmbedding(vit.max_side, llm.hidden_size)
            self.vit_max_size, self.vit_min_size = vit_max_size or vit.image_size, vit_min_size
            if self.vit_max_size > vit.image_size:  # the ViT's position table ends there
                raise ValueError(f"model.vit_max_size: {self.vit_max_size} is more than the ViT's image_size "
                                 f"{vit.image_size} ({vit.max_side} patches per side of {vit.patch_size} px)")
        self.llm_config, self.tokenizer = llm, tokenizer
        self.language_model = Qwen2MoTForCausalLM(llm)
        z = vae.z_channels
        self.time_embedder = TimestepEmbedder(llm.hidden_size, timestep_dim)
        self.vae2llm = nn.Linear(PATCH * PATCH * z, llm.hidden_size)
        self.llm2vae = nn.Linear(llm.hidden_size, PATCH * PATCH * z)
        self.latent_pos_embed = PositionEmbedding(max_latent_size, llm.hidden_size)
        self.vae = vae.requires_grad_(False)
        self.ids = {}
        for k, s in SPECIALS.items():
            if (i := tokenizer.token_to_id(s)) is None:
                raise ValueError(f"bagel tokenizer: no {s} token (the model's special tokens are {list(SPECIALS.values())})")
            self.ids[k] = i
        self.pad_id, self.stop_ids = self.ids["pad"], (self.ids["end"],)
        # multi-round: the masked column marking where a drawn image's blocks enter (bagel_edit.image_anchors);
        # never a token of the context, so any id would do: this one names what goes there
        self.drawn_image_id = self.ids["vision_start"]
        side = resolution // vae.downsample
        if resolution % (vae.downsample * PATCH) or side // PATCH > max_latent_size:
            raise ValueError(f"model.resolution: {resolution} must be a multiple of {vae.downsample * PATCH} with at most "
                             f"{max_latent_size} latent patches per side (max_latent_size of the checkpoint)")
        self.resolution, self.latent_shape = resolution, (z, side, side)
        # what a task resizes input images to (the VAE block reads the input at the output's size)
        self.input_image_size = (resolution, resolution) if vit is not None else None
        self.think = think
        self.system_prompt = (THINK_SYSTEM_PROMPT if system_prompt is None else system_prompt) if think else None
        self.train_heads, self.logits_chunk = train_heads, logits_chunk
        self.text_rank = self.image_rank = 0

    # ----------------------------------------------------------------- LoRA / parameters
    def add_lora(self, text_rank: int, image_rank: int, text_targets, image_targets) -> None:
        """peft LoRA (alpha = rank, no dropout, B = 0) on the und projections ``text_targets`` and
        the gen projections ``image_targets`` (module-name suffixes); rank 0 = that side trains in full."""
        self.text_rank, self.image_rank = text_rank, image_rank
        ranks = {t: text_rank for t in text_targets if text_rank} | {t: image_rank for t in image_targets if image_rank}
        if ranks:
            inject_lora(self.language_model, ranks)
        groups = {id(p) for g in self.parameter_groups().values() for _, p in g}
        for p in self.parameters():
            p.requires_grad_(id(p) in groups)

    def _side(self, name: str) -> str | None:
        if name.startswith("language_model."):
            return "image" if "moe_gen" in name else "text"
        if name.startswith(("time_embedder.", "vae2llm.", "llm2vae.")) and self.train_heads:
            return "image"
        return None  # latent_pos_embed (a frozen table), vae, heads unless model.train_heads

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Text: und weights, embeddings, lm_head, ``norm``; image: ``*_moe_gen``, ``norm_moe_gen``
        (+ the latent heads with ``train_heads``). A LoRA side: its LoRA weights only."""
        rank = {"text": self.text_rank, "image": self.image_rank}
        out = {"text": [], "image": []}
        for n, p in self.named_parameters():
            side = self._side(n)
            if side and (rank[side] == 0 or "lora_" in n or not n.startswith("language_model.")):
                out[side].append((n, p))
        return out

    # ----------------------------------------------------------------- forward phases
    def forward(self, phase: str, *args):
        """Every phase runs through here (the FSDP2 root's hooks): ``phase`` in text / logits /
        scored / image / joint (image blocks + text)."""
        return {"text": self._text, "logits": self._logits, "scored": self._scored, "image": self._image,
                "joint": self._joint}[phase](*args)

    def _text(self, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, past):
        """Und-expert pass of ``ids`` [B, L] (the last L of ``key_mask``'s keys) over ``past``."""
        lm = self.language_model
        h = lm.model.embed_tokens(ids)
        return lm.run(h, pos, attention_mask(key_mask, ids.shape[1], causal=True), past)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        lm = self.language_model
        return lm.lm_head(lm.model.norm(h)).float()  # float32 log-softmax downstream

    def _token_logp(self, h: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """log softmax(logits / T)[target] per position [B, L], lm_head over ``logits_chunk``
        positions at a time (recomputed in backward: [chunk, vocab] logits are never all kept)."""
        def chunk(hc, tc):
            return (self._logits(hc) / temperature).log_softmax(-1).gather(-1, tc[..., None])[..., 0]
        out = []
        for s in range(0, h.shape[1], self.logits_chunk):
            hc, tc = h[:, s:s + self.logits_chunk], targets[:, s:s + self.logits_chunk]
            out.append(checkpoint(chunk, hc, tc, use_reentrant=False) if torch.is_grad_enabled() else chunk(hc, tc))
        return torch.cat(out, 1)

    def _joint(self, tokens: TokenBatch):
        """The pass over a batch with input images (``bagel_edit``): its image blocks, then the text.
        Returns (hidden states [B, L, H] of the text, per-layer K/V of [image columns | text], the
        ``ImagePart``)."""
        part, lm = image_part(self, tokens), self.language_model
        h = torch.cat([part.emb.to(self.vae2llm.weight.dtype), lm.model.embed_tokens(tokens.ids)], 1)
        pos = torch.cat([part.pos, text_positions(self, tokens.mask, part, tokens.image_mask)], 1)
        out, kv = lm.run(h, pos, position_mask(pos, torch.cat([part.mask, tokens.mask], 1)), None,
                         gen=slice(0, part.n_gen), detach_gen=True)  # the text loss: und expert only
        return out[:, part.emb.shape[1]:], kv, part

    def _scored(self, tokens: TokenBatch, temperature: float):
        """The teacher-forced pass: (log-probs [B, L] of the response tokens, per-layer K/V, the
        ``ImagePart`` of the input images or None)."""
        if tokens.images is None:
            (h, kv), part = self._text(tokens.ids, positions(tokens.mask), tokens.mask, None), None
        else:
            h, kv, part = self._joint(tokens)
        logp = response_logprobs(self._token_logp(h[:, :-1], tokens.ids[:, 1:], temperature), tokens.response_mask)
        return logp, kv, part

    def _image(self, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext) -> torch.Tensor:
        b, z, hh, ww = x_t.shape
        h, w, lm = hh // PATCH, ww // PATCH, self.language_model
        dtype = self.vae2llm.weight.dtype
        emb = self.vae2llm(patchify(x_t, PATCH).to(dtype)) + self.time_embedder(t)[:, None] \
            + self.latent_pos_embed(h, w)[None]
        marks = lm.model.embed_tokens(torch.tensor([self.ids["vision_start"], self.ids["vision_end"]], device=x_t.device))
        marks = marks.detach() if ctx.detached else marks  # a detached context: no image loss into the text side
        n = h * w
        block = torch.cat([marks[:1].expand(b, 1, -1), emb, marks[1:].expand(b, 1, -1)], 1)  # [B, n + 2, H]
        pos = ctx.next_pos[:, None].expand(b, n + 2)  # the whole block at ONE position
        keys = torch.cat([ctx.mask, torch.ones(b, n + 2, dtype=torch.bool, device=x_t.device)], 1)
        out, _ = lm.run(block, pos, attention_mask(keys, n + 2, causal=False), list(zip(ctx.keys, ctx.values)),
                        gen=slice(1, n + 1), detach_und=ctx.detached)
        v = self.llm2vae(lm.model.norm_moe_gen(out[:, 1:n + 1]))
        return unpatchify(v, z, h, w, PATCH).to(x_t.dtype)

    # ----------------------------------------------------------------- text phase
    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def _segment(self, text: str) -> list[int]:
        return [self.ids["start"], *self.tokenizer.encode(text, add_special_tokens=False).ids, self.ids["end"]]

    def prompt_ids(self, text: str) -> list[int]:
        sys = self._segment(self.system_prompt) if self.system_prompt is not None else []
        return sys + self._segment(text) + [self.ids["start"]]

    def reflection_ids(self, picture: int = 1) -> list[int]:
        """The reflection turn after a drawn image (multi-round): ``<|im_start|> reflection_prompt
        <|im_end|>`` and the decode-start ``<|im_start|>``, as a prompt row ends. The image itself
        enters before it at the masked ``drawn_image_id`` column (``bagel_edit``), so a model that
        cannot see it (no ViT path) has no reflection turn."""
        if not self.sees_images:
            raise NotImplementedError("BagelModel without its ViT path cannot see the image it drew: multi-round "
                                      "episodes (algo.rounds > 1) need a folder with vit_config.json and model.vit=true")
        return self._segment(self.reflection_prompt) + [self.ids["start"]]

    def response_ids(self, text: str) -> list[int]:
        """A given text closed by ``<|im_end|>`` after the decode-start token, as if sampled."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids + [self.ids["end"]]

    def token_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prefill(self, tokens: TokenBatch):
        """The decode engine's prefill: und-expert pass over the prompts (after their image blocks),
        logits of the next token."""
        if tokens.images is not None:
            h, kv, part = self("joint", tokens)
            return self("logits", h[:, -1:])[:, 0], EditCache(kv, part.mask, part.shift)
        h, cache = self("text", tokens.ids, positions(tokens.mask), tokens.mask, None)
        return self("logits", h[:, -1:])[:, 0], cache

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, cache):
        """One token per row; with images the engine's text positions and key mask are moved past
        the image blocks (``EditCache``)."""
        edit = isinstance(cache, EditCache)
        kv_past = cache.kv if edit else cache
        if edit:
            pos, key_mask = pos + cache.shift, torch.cat([cache.image_mask, key_mask], 1)
        h, kv = self("text", tok[:, None], pos[:, None], key_mask, kv_past)
        kv_past = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(kv_past, kv)]
        return self("logits", h)[:, 0], EditCache(kv_past, cache.image_mask, cache.shift) if edit else kv_past

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, BagelContext]:
        logp, kv, part = self("scored", tokens, temperature)
        count = tokens.mask.long().cumsum(1)
        last_col = (count == count[:, -1:]).long().argmax(1)  # each row's last real token (right pads follow it)
        last = tokens.ids.gather(1, last_col[:, None])[:, 0]
        dangling = (last == self.ids["start"]) & ~tokens.response_mask.any(1)  # thinking off: no open segment
        col = torch.arange(tokens.ids.shape[1], device=tokens.ids.device)
        mask = tokens.mask & ~(dangling[:, None] & (col[None] == last_col[:, None]))
        next_pos = mask.long().sum(1) if part is None else mask.long().sum(1) + part.shift
        mask = mask if part is None else torch.cat([part.mask, mask], 1)  # keys: [image columns | text]
        return logp, BagelContext([k for k, _ in kv], [v for _, v in kv], mask, next_pos)

    def null_context(self, batch_size: int) -> BagelContext:
        """BAGEL's text-CFG context: the system prompt alone (think mode), else an empty cache."""
        if self.system_prompt is None:
            c, dev = self.llm_config, self.device
            empty = torch.zeros(batch_size, c.num_key_value_heads, 0, c.head_dim, dtype=self.vae2llm.weight.dtype, device=dev)
            n = c.num_hidden_layers
            return BagelContext([empty] * n, [empty] * n, torch.zeros(batch_size, 0, dtype=torch.bool, device=dev),
                                torch.zeros(batch_size, dtype=torch.long, device=dev))
        ids = torch.tensor([self._segment(self.system_prompt)], device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, kv = self("text", ids, positions(mask), mask, None)
        return BagelContext([k.expand(batch_size, -1, -1, -1) for k, _ in kv], [v.expand(batch_size, -1, -1, -1) for _, v in kv],
                            mask.expand(batch_size, -1), mask.long().sum(1).expand(batch_size))

    @staticmethod
    def detach_context(ctx: BagelContext) -> BagelContext:
        return BagelContext([k.detach() for k in ctx.keys], [v.detach() for v in ctx.values], ctx.mask, ctx.next_pos,
                            detached=True)

    def eval_guidance(self, tokens: TokenBatch, ctx: BagelContext, cfg_scale: float):
        """Evaluation CFG (``sampling.generate`` with ``sampler.eval_cfg_scale != 1``): Bagel's
        two-branch guidance with ``cfg_scale`` as its text scale and the official rest: text-to-image
        img scale 1.5, interval (0.4, 1], per-row global renorm; with input images the edit settings
        (img scale 2, interval (0, 1], text_channel renorm; ``bagel_cfg``)."""
        ctx_text, ctx_img = self.cfg_contexts(tokens)
        rest = EDIT if tokens.images is not None else {}
        return lambda x_t, t: self.cfg_velocity(x_t, t, ctx, ctx_text, ctx_img, text_scale=cfg_scale, **rest)

    # ----------------------------------------------------------------- image phase
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        return self("image", x_t, t, ctx)  # a detached ctx detaches the text side in _image

    def own_timesteps(self, num_steps: int) -> torch.Tensor:
        """Bagel's own grid (``sampler.shift: null``): ``timestep_shift = 3`` (``inferencer.py``, ``app.py``)
        on ``num_steps + 1`` points, i.e. its ``num_timesteps = num_steps + 1``."""
        return self.timesteps(num_steps, 3.0)

    def cfg_contexts(self, tokens: TokenBatch) -> tuple[BagelContext, BagelContext]:
        """Bagel's two unconditional contexts for evaluation CFG (``bagel_cfg.cfg_contexts``)."""
        return cfg_contexts(self, tokens)

    def cfg_velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext, ctx_text: BagelContext,
                     ctx_img: BagelContext, **options) -> torch.Tensor:
        """Bagel's two-branch evaluation guidance (``bagel_cfg.cfg_velocity``; training is CFG-free)."""
        return cfg_velocity(self, x_t, t, ctx, ctx_text, ctx_img, **options)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.vae.decode(x0.to(self.vae.encoder.conv_in.weight.dtype))
        return (image.float() * 0.5 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode((images * 2 - 1).to(self.vae.encoder.conv_in.weight.dtype)).float()

    # ----------------------------------------------------------------- lifecycle
    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward (text pass and velocity alike)."""
        self.language_model.checkpointing = True

    def fsdp_plan(self) -> tuple[list[FSDPRoot], str]:
        """Every MoT decoder layer a unit, the whole model the root, the VAE (and the ViT path: frozen,
        read once per batch) replicated (module docstring)."""
        layers = list(self.language_model.model.layers)
        frozen = [self.vae] + ([self.vit_model, self.connector, self.vit_pos_embed] if self.sees_images else [])
        return [FSDPRoot(self, layers, ignored={p for m in frozen for p in m.parameters()}, unit_name="decoder layer")], \
            f"{len(layers)} MoT decoder layers, the model as root (VAE{' and ViT' if self.sees_images else ''} replicated)"

    def export_formats(self) -> tuple[str, ...]:
        """``merged`` (default): the released layout, trained weights merged; ``lora`` (both experts
        LoRA, heads frozen): a peft adapter folder for ``language_model`` (bagel_io.write_export)."""
        lora = self.text_rank and self.image_rank and not self.train_heads
        return ("merged", "lora") if lora else ("merged",)

    def write_export(self, folder, fmt: str, extra: dict) -> str:
        from unigrpo.models.bagel_io import write_export, write_lora_export

        return (write_lora_export if fmt == "lora" else write_export)(self, folder)

    def save_metadata(self) -> dict[str, str]:
        return {**super().save_metadata(), "text_rank": str(self.text_rank), "image_rank": str(self.image_rank)}
