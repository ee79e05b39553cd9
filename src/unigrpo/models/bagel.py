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
- **FSDP2** (``model.fsdp`` on > 1 rank): ``wrap`` shards every MoT decoder layer (the unit: both
  experts of one layer), then the whole model as the root (embeddings, lm_head, the final norms,
  the latent heads; the VAE stays replicated: frozen, ``ignored_params``). Every phase runs through
  ``forward`` (``self(phase, ...)``: the decode loop's steps and logits too), so no other method
  needs ``register_fsdp_forward_method``. ``sharded`` tells the recipe that every forward is a
  collective: the decode loop runs ``max_new_tokens`` steps on every rank (the tokens of the
  early-stopping loop) and every rank evaluates. Gradients are reduce-scattered in backward
  (``reduce_gradients``: no-op); ``trainable_state`` gathers on every rank, ``save`` (rank 0)
  writes that gather, ``load_trainable_state`` keeps each rank's shard (``models/fsdp.py``).
- **Reference** (``reference()``): LoRA sides with adapters disabled, fully trained sides a snapshot
  of their trainable tensors, substituted with ``functional_call`` (never a second model copy).
- **Unclosed reasoning**: a row that hits ``max_new_tokens`` before ``<|im_end|>`` stays open (the
  official inferencer closes every segment; a closing token would be an unscored token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from unigrpo.models.bagel_latent import PositionEmbedding, TimestepEmbedder, patchify, unpatchify
from unigrpo.models.bagel_mot import LLMConfig, Qwen2MoTForCausalLM, attention_mask
from unigrpo.models.fsdp import GatheredState, load_full_state
from unigrpo.models.hf_text import positions
from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny import sample_top_p
from unigrpo.utils import dist

__all__ = ["THINK_SYSTEM_PROMPT", "BagelContext", "BagelModel", "build"]

# ByteDance-Seed/Bagel inferencer.py: GEN_THINK_SYSTEM_PROMPT (a data constant of the released model)
THINK_SYSTEM_PROMPT = ("You should first think about the planning process in the mind and then generate the image. \n"
                       "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process "
                       "here </think> image here")
SPECIALS = {"start": "<|im_start|>", "end": "<|im_end|>", "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>", "pad": "<|endoftext|>"}
PATCH = 2  # latent_patch_size of the released model


@dataclass
class BagelContext:
    """What the image block attends to: per-layer ``keys`` / ``values`` [B, n_kv, L, D], the key
    ``mask`` [B, L], the block's RoPE position ``next_pos`` [B]; ``detached``: the image loss must
    not reach the text parameters (markers included)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    next_pos: torch.Tensor
    detached: bool = False


class BagelModel(nn.Module):
    """BAGEL-7B-MoT for text-to-image with thinking (module docstring). Submodules carry the
    checkpoint's names: ``language_model``, ``time_embedder``, ``vae2llm``, ``llm2vae``,
    ``latent_pos_embed``; ``vae`` holds ``ae.safetensors``."""

    def __init__(self, llm: LLMConfig, tokenizer, vae, *, max_latent_size: int, timestep_dim: int = 256,
                 resolution: int = 512, think: bool = True, system_prompt: str | None = None,
                 train_heads: bool = False, logits_chunk: int = 1024):
        super().__init__()
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
        self.pad_id = self.ids["pad"]
        side = resolution // vae.downsample
        if resolution % (vae.downsample * PATCH) or side // PATCH > max_latent_size:
            raise ValueError(f"model.resolution: {resolution} must be a multiple of {vae.downsample * PATCH} with at most "
                             f"{max_latent_size} latent patches per side (max_latent_size of the checkpoint)")
        self.resolution, self.latent_shape = resolution, (z, side, side)
        self.think = think
        self.system_prompt = (THINK_SYSTEM_PROMPT if system_prompt is None else system_prompt) if think else None
        self.train_heads, self.logits_chunk = train_heads, logits_chunk
        self.text_rank = self.image_rank = 0
        self.fsdp = False  # model.fsdp (set by build): shard in wrap when on > 1 rank
        self.sharded, self.fixed_steps, self._is_main = False, False, True
        self._gathered = GatheredState()

    # ----------------------------------------------------------------- LoRA / parameters
    def add_lora(self, text_rank: int, image_rank: int, text_targets, image_targets) -> None:
        """peft LoRA (alpha = rank, no dropout, B = 0) on the und projections ``text_targets`` and
        the gen projections ``image_targets`` (module-name suffixes); rank 0 = that side trains in full."""
        self.text_rank, self.image_rank = text_rank, image_rank
        targets = (list(text_targets) if text_rank else []) + (list(image_targets) if image_rank else [])
        if targets:
            from peft import LoraConfig, inject_adapter_in_model

            ranks = {t: text_rank for t in text_targets if text_rank} | {t: image_rank for t in image_targets if image_rank}
            cfg = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), lora_dropout=0.0,
                             target_modules=targets, rank_pattern=ranks, alpha_pattern=ranks)
            inject_adapter_in_model(cfg, self.language_model)
            for n, p in self.language_model.named_parameters():
                if "lora_" in n:  # float32 masters under bf16 weights (peft casts the input, returns the layer's dtype)
                    p.data = p.data.float()
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

    def _params(self, side: str) -> dict[str, torch.Tensor]:
        return dict(self.parameter_groups()[side])

    # ----------------------------------------------------------------- forward phases
    def forward(self, phase: str, *args):
        """Every phase runs through here (the FSDP2 root's hooks; ``functional_call`` substitutes
        weights): ``phase`` in text / logits / scored / image."""
        return {"text": self._text, "logits": self._logits, "scored": self._scored, "image": self._image}[phase](*args)

    def _call(self, overrides: dict | None, phase: str, *args):
        """``phase`` with the tensors ``overrides`` (by parameter name) in place of the parameters.
        The decoder layers also get them bound into each layer call (``Qwen2MoTForCausalLM.run``):
        activation checkpointing recomputes a layer in backward, after this call has returned."""
        if not overrides:
            return self(phase, *args)
        lm, prefix = self.language_model, "language_model."
        lm.overrides = {k[len(prefix):]: v for k, v in overrides.items() if k.startswith(prefix)}
        try:
            return functional_call(self, overrides, (phase, *args))
        finally:
            lm.overrides = {}

    def _text(self, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, past):
        """Und-expert pass of ``ids`` [B, L] (the last L of ``key_mask``'s keys) over ``past``."""
        lm = self.language_model
        h = lm.model.embed_tokens(ids)
        return lm.run(h, pos, attention_mask(key_mask, ids.shape[1], causal=True), past)

    def _logits(self, h: torch.Tensor, temperature: float) -> torch.Tensor:
        lm = self.language_model
        return lm.lm_head(lm.model.norm(h)).float() / temperature  # float32 log-softmax downstream

    def _token_logp(self, h: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """log softmax(logits / T)[target] per position [B, L], lm_head over ``logits_chunk``
        positions at a time (recomputed in backward: [chunk, vocab] logits are never all kept)."""
        def chunk(hc, tc):
            return self._logits(hc, temperature).log_softmax(-1).gather(-1, tc[..., None])[..., 0]
        out = []
        for s in range(0, h.shape[1], self.logits_chunk):
            hc, tc = h[:, s:s + self.logits_chunk], targets[:, s:s + self.logits_chunk]
            out.append(checkpoint(chunk, hc, tc, use_reentrant=False) if torch.is_grad_enabled() else chunk(hc, tc))
        return torch.cat(out, 1)

    def _scored(self, tokens: TokenBatch, temperature: float):
        """The teacher-forced pass: (log-probs [B, L] of the response tokens, per-layer K/V)."""
        h, kv = self._text(tokens.ids, positions(tokens.mask), tokens.mask, None)
        logp = F.pad(self._token_logp(h[:, :-1], tokens.ids[:, 1:], temperature), (1, 0)) * tokens.response_mask
        return logp, kv

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

    def encode_prompts(self, prompts: list[str]) -> TokenBatch:
        sys = self._segment(self.system_prompt) if self.system_prompt is not None else []
        rows = [sys + self._segment(p) + [self.ids["start"]] for p in prompts]
        return TokenBatch.left_padded(rows, self.pad_id, self.device)

    @torch.no_grad()
    def sample_reasoning(self, prompts: TokenBatch, *, max_new_tokens: int, temperature: float = 1.0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         return_logprobs: bool = False, use_cache: bool = True):
        """KV-cache decode from the prompts, rows stop at ``<|im_end|>`` independently (kept: an
        action); ``use_cache=False`` recomputes the whole sequence per token (a test reference).
        ``fixed_steps`` (sharded): all ``max_new_tokens`` steps on every rank, cut back to the
        early-stopping loop's tokens."""
        ids, mask = prompts.ids, prompts.mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new_ids, new_mask, new_logp = [], [], []
        h, cache = self("text", ids, positions(mask), mask, None)
        h_last, key_mask, pos = h[:, -1:], mask, mask.long().sum(1, keepdim=True)  # next position per row
        n_steps = None  # the step after which every row has finished
        for i in range(max_new_tokens):
            logits = self("logits", h_last, temperature)[:, 0]
            tok = sample_top_p(logits, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            if return_logprobs:  # of the temperature-scaled distribution, as forward_context scores
                new_logp.append(logits.log_softmax(-1).gather(1, tok[:, None])[:, 0] * ~done)
            new_ids.append(tok)
            new_mask.append(~done)
            done = done | (tok == self.ids["end"])
            if n_steps is None and bool(done.all()):
                n_steps = i + 1
                if not self.fixed_steps:
                    break
            key_mask = torch.cat([key_mask, new_mask[-1][:, None]], 1)  # the token fed now is real iff live
            if use_cache:
                h_last, kv = self("text", tok[:, None], pos, key_mask, cache)
                cache = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(cache, kv)]
            else:
                seq = torch.cat([ids, torch.stack(new_ids, 1)], 1)
                h_last = self("text", seq, positions(key_mask), key_mask, None)[0][:, -1:]
            pos = pos + new_mask[-1][:, None].long()  # finished rows keep their position (masked)
        new_ids, new_mask, new_logp = new_ids[:n_steps], new_mask[:n_steps], new_logp[:n_steps]
        return prompts.with_sampled(new_ids, new_mask, new_logp if return_logprobs else None)

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        """Given texts closed by ``<|im_end|>`` after the decode-start token, as if sampled."""
        rows = [self.tokenizer.encode(r, add_special_tokens=False).ids + [self.ids["end"]] for r in responses]
        return prompts.with_responses(rows, self.pad_id)

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        return [self.tokenizer.decode([i for i, keep in zip(ids, m) if keep], skip_special_tokens=False)
                for ids, m in zip(tokens.ids.tolist(), tokens.response_mask.tolist())]

    def _context(self, overrides, tokens: TokenBatch, temperature: float):
        logp, kv = self._call(overrides, "scored", tokens, temperature)
        count = tokens.mask.long().cumsum(1)
        last_col = (count == count[:, -1:]).long().argmax(1)  # each row's last real token (right pads follow it)
        last = tokens.ids.gather(1, last_col[:, None])[:, 0]
        dangling = (last == self.ids["start"]) & ~tokens.response_mask.any(1)  # thinking off: no open segment
        col = torch.arange(tokens.ids.shape[1], device=tokens.ids.device)
        mask = tokens.mask & ~(dangling[:, None] & (col[None] == last_col[:, None]))
        return logp, BagelContext([k for k, _ in kv], [v for _, v in kv], mask, mask.long().sum(1))

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, BagelContext]:
        return self._context(None, tokens, temperature)

    def _null(self, overrides, batch_size: int) -> BagelContext:
        """BAGEL's text-CFG context: the system prompt alone (think mode), else an empty cache."""
        if self.system_prompt is None:
            c, dev = self.llm_config, self.device
            empty = torch.zeros(batch_size, c.num_key_value_heads, 0, c.head_dim, dtype=self.vae2llm.weight.dtype, device=dev)
            n = c.num_hidden_layers
            return BagelContext([empty] * n, [empty] * n, torch.zeros(batch_size, 0, dtype=torch.bool, device=dev),
                                torch.zeros(batch_size, dtype=torch.long, device=dev))
        ids = torch.tensor([self._segment(self.system_prompt)], device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, kv = self._call(overrides, "text", ids, positions(mask), mask, None)
        return BagelContext([k.expand(batch_size, -1, -1, -1) for k, _ in kv], [v.expand(batch_size, -1, -1, -1) for _, v in kv],
                            mask.expand(batch_size, -1), mask.long().sum(1).expand(batch_size))

    def null_context(self, batch_size: int) -> BagelContext:
        return self._null(None, batch_size)

    @staticmethod
    def detach_context(ctx: BagelContext) -> BagelContext:
        return BagelContext([k.detach() for k in ctx.keys], [v.detach() for v in ctx.values], ctx.mask, ctx.next_pos,
                            detached=True)

    def eval_guidance(self, tokens: TokenBatch, ctx: BagelContext, cfg_scale: float):
        """Evaluation CFG (``sampling.generate`` with ``sampler.eval_cfg_scale != 1``): Bagel's
        two-branch guidance with ``cfg_scale`` as its text scale and the official text-to-image
        rest (img scale 1.5, interval (0.4, 1], per-row global renorm; ``bagel_cfg``)."""
        ctx_text, ctx_img = self.cfg_contexts(tokens)
        return lambda x_t, t: self.cfg_velocity(x_t, t, ctx, ctx_text, ctx_img, text_scale=cfg_scale)

    # ----------------------------------------------------------------- image phase
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        return self._call(None, "image", x_t, t, ctx)  # a detached ctx detaches the text side in _image

    def pipeline_timesteps(self, num_steps: int) -> torch.Tensor:
        """Bagel's own grid (``sampler.shift: null``): ``timestep_shift = 3`` (``inferencer.py``, ``app.py``)
        on ``num_steps + 1`` points, i.e. its ``num_timesteps = num_steps + 1``."""
        from unigrpo.algo.schedule import timesteps

        return timesteps(num_steps, 3.0)

    def cfg_contexts(self, tokens: TokenBatch) -> tuple[BagelContext, BagelContext]:
        """Bagel's two unconditional contexts for evaluation CFG (``bagel_cfg.cfg_contexts``)."""
        from unigrpo.models.bagel_cfg import cfg_contexts

        return cfg_contexts(self, tokens)

    def cfg_velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext, ctx_text: BagelContext,
                     ctx_img: BagelContext, **options) -> torch.Tensor:
        """Bagel's two-branch evaluation guidance (``bagel_cfg.cfg_velocity``; training is CFG-free)."""
        from unigrpo.models.bagel_cfg import cfg_velocity

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

    def _named_trainable(self) -> dict[str, nn.Parameter]:
        if self.sharded:  # the root keeps its gathered params after a forward: back to the shards
            self.reshard()
        return {n: p for g in self.parameter_groups().values() for n, p in g}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors (sharded: every rank gathers, in the same order)."""
        return self._gathered.gather(self._named_trainable(), keep=self.sharded and self._is_main)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Sharded: every rank loads the same full tensors and keeps its own shard (no collective)."""
        load_full_state(self._named_trainable(), state)

    def reference(self):
        """The starting policy (``bagel_reference.BagelReference``: LoRA off / trainable snapshot)."""
        from unigrpo.models.bagel_reference import BagelReference

        if self.sharded and 0 in (self.text_rank, self.image_rank):
            raise NotImplementedError("model.fsdp: the reference of a fully trained expert (lora rank 0) is a snapshot "
                                      "of its tensors, not sharded yet; use LoRA on that expert or no regulariser "
                                      "(algo.c_mse = algo.beta_img = algo.text_beta = 0)")
        return BagelReference(self)

    def wrap(self, ranks) -> None:
        """Every rank starts from rank 0's weights; with ``model.fsdp`` on > 1 rank, then sharded:
        ``fully_shard`` per MoT decoder layer, the whole model as the root, the VAE ignored
        (module docstring)."""
        dist.broadcast_parameters(self, ranks)
        if not (self.fsdp and ranks.enabled):
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.check_fsdp_dtypes()
        mesh, layers = init_device_mesh(self.device.type, (ranks.world,)), self.language_model.model.layers
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh, ignored_params=set(self.vae.parameters()))
        self.sharded, self._is_main, self.fixed_steps = True, ranks.is_main, True
        if ranks.is_main:
            print(f"[unigrpo] model.fsdp: sharded over {ranks.world} ranks: {len(layers)} MoT decoder layers, "
                  "the model as root (VAE replicated)", flush=True)

    def check_fsdp_dtypes(self) -> None:
        """FSDP2 reduces one unit's gradients in one dtype: the trainable tensors of each unit (a
        decoder layer; the root) must share theirs. LoRA weights are float32, a fully trained
        expert keeps ``model.dtype``: LoRA on one expert and the other in full under bf16 weights
        is refused here, in one line, rather than by FSDP2's assertion at the first forward."""
        layers = self.language_model.model.layers
        inner = {id(p) for m in (*layers, self.vae) for p in m.parameters()}
        units = [(f"decoder layer {i}", list(layer.named_parameters())) for i, layer in enumerate(layers)]
        units.append(("the root", [(n, p) for n, p in self.named_parameters() if id(p) not in inner]))
        for unit, params in units:
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in params if p.requires_grad})
            if len(dtypes) > 1:
                raise ValueError(f"model.fsdp: {unit} trains tensors of dtypes {dtypes} (LoRA weights are float32, a fully "
                                 "trained expert model.dtype); FSDP2 needs one per unit: use model.dtype=float32, or "
                                 "LoRA on both experts or on neither")

    def reduce_gradients(self, params: list[nn.Parameter], ranks) -> None:
        if not self.sharded:  # sharded: FSDP2 reduce-scattered (averaged) them in backward
            dist.average_gradients(params, ranks)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """The trainable tensors as safetensors (the base weights are ``model.path``). Sharded:
        ``save`` runs on rank 0 alone, so it writes the state every rank gathered last
        (``save_checkpoint`` calls ``trainable_state`` on every rank first); refused if a
        parameter was written since."""
        from safetensors.torch import save

        from unigrpo.utils.checkpoint import atomic_save

        meta = {"text_rank": str(self.text_rank), "image_rank": str(self.image_rank),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        own = self.trainable_state() if not self.sharded else self._gathered.take(self._named_trainable().values())
        state = {k: v.contiguous() for k, v in own.items()}
        atomic_save(lambda f: f.write(save(state, metadata=meta)), path)


def build(cfg, checkpoint: str | None) -> BagelModel:
    """``model.kind: bagel``: the released folder ``model.path`` (``bagel_io.load_bagel``), LoRA per
    ``model.lora``; the trainable tensors of ``checkpoint`` (``model.save``) if given."""
    from unigrpo.models.bagel_io import load_bagel

    m = cfg.model
    model = load_bagel(m.path, device=cfg.device, dtype=m.dtype, resolution=m.resolution, think=m.think,
                       system_prompt=m.system_prompt, train_heads=m.train_heads, logits_chunk=m.logits_chunk)
    model.add_lora(m.lora.text_rank, m.lora.image_rank, m.lora.text_targets, m.lora.image_targets)
    model.fsdp = m.fsdp
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if checkpoint is not None:
        from safetensors.torch import load_file

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"model checkpoint not found: {checkpoint}")
        model.load_trainable_state(load_file(str(checkpoint)))
    return model
