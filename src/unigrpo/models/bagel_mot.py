"""The Qwen2 Mixture-of-Transformers decoder of BAGEL-7B-MoT, in plain torch (written from the
architecture; reference: ByteDance-Seed/Bagel ``modeling/bagel/qwen2_navit.py`` and the Qwen2
model of transformers).

Every decoder layer holds two full copies of its weights: the *understanding* expert (Qwen2.5's
names: ``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ...) and the *generation*
expert (the same names with ``_moe_gen``: ``self_attn.q_proj_moe_gen``, ``mlp_moe_gen.gate_proj``,
``input_layernorm_moe_gen``, ...). Routing is by token type, not learned: text tokens use the und
weights, VAE-latent tokens the gen weights; self-attention is ONE softmax over all tokens of the
sequence (each token projected by its own expert). The module names here are the checkpoint's key
names (``language_model.model.layers.{i}...``), so the released safetensors load by name.

Design (one code path, rollout == training):

- attention is ``F.scaled_dot_product_attention`` with an explicit boolean mask in every call:
  the teacher-forced pass, every KV-cache decode step and every velocity call; nothing switches
  on ``self.training``;
- a call routes one contiguous slice of tokens (``gen``) to the gen expert and the rest to the und
  expert; expert outputs are concatenated into fresh tensors (no in-place write into a view of an
  attention output, so autograd sees every path);
- norms compute in float32 and return the input dtype (Qwen2's RMSNorm); nothing casts to bf16.

Shapes: hidden ``h`` [B, L, H]; K/V per layer [B, n_kv, L, head_dim] after ``k_norm`` and RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["LLMConfig", "Qwen2MoTForCausalLM", "apply_rope", "attention_mask", "rope_cos_sin"]


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 geometry of ``llm_config.json`` (BAGEL-7B-MoT: Qwen2.5-7B's)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE tables for positions ``pos`` [B, L]: (cos, sin) [B, 1, L, head_dim], Qwen2's layout
    (frequencies ``theta^(-2i/d)`` repeated over both halves of the head)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    f = pos.float()[..., None] * inv  # [B, L, D/2], float32 angles
    emb = torch.cat([f, f], -1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``, ``rotate_half([a, b]) = [-b, a]`` (x: [B, heads, L, D])."""
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


def attention_mask(key_mask: torch.Tensor, n_new: int, causal: bool) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, n_new, K] for ``n_new`` query tokens that are the LAST ``n_new`` of
    ``K`` keys (``key_mask`` [B, K], True = real). Causal: query i sees keys ``j <= K - n_new + i``;
    full: every real key. A query always sees its own key, so a padded query row is never empty
    (an all-masked softmax row would be NaN; its output is masked everywhere downstream)."""
    k = key_mask.shape[1]
    j = torch.arange(k, device=key_mask.device)
    own = j[None, :] == (k - n_new + torch.arange(n_new, device=key_mask.device))[:, None]  # [n_new, K]
    allowed = key_mask[:, None, :].expand(-1, n_new, -1)
    if causal:
        allowed = allowed & (j[None, :] <= (k - n_new + torch.arange(n_new, device=key_mask.device))[:, None])
    return (allowed | own)[:, None]


def frozen(module: nn.Module, on: bool):
    """``module`` itself, or (``on``) a call of it with every parameter detached: the same values,
    no gradient into them. Called inside a decoder layer's forward, so under FSDP2 the parameters
    detached are the layer's gathered ones."""
    if not on:
        return module
    return lambda *args: torch.func.functional_call(module, {n: p.detach() for n, p in module.named_parameters()}, args)


def routed(h: torch.Tensor, und, gen_fn, gen: slice | None) -> torch.Tensor:
    """``und`` on the tokens outside the slice ``gen`` (dim 1), ``gen_fn`` inside; concatenated."""
    if gen is None:
        return und(h)
    parts = [und(h[:, :gen.start]) if gen.start else None, gen_fn(h[:, gen]),
             und(h[:, gen.stop:]) if gen.stop < h.shape[1] else None]
    return torch.cat([p for p in parts if p is not None], 1)


class MoTAttention(nn.Module):
    """Joint self-attention, per-expert q/k/v/o projections and per-head q/k RMSNorms (qk-norm)."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        h, d, nq, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.nq, self.nkv, self.d = nq, nkv, d
        for sfx in ("", "_moe_gen"):
            setattr(self, "q_proj" + sfx, nn.Linear(h, nq * d, bias=True))
            setattr(self, "k_proj" + sfx, nn.Linear(h, nkv * d, bias=True))
            setattr(self, "v_proj" + sfx, nn.Linear(h, nkv * d, bias=True))
            setattr(self, "o_proj" + sfx, nn.Linear(nq * d, h, bias=False))
            setattr(self, "q_norm" + sfx, RMSNorm(d, c.rms_norm_eps))
            setattr(self, "k_norm" + sfx, RMSNorm(d, c.rms_norm_eps))

    def _heads(self, proj: str, norm: str | None, n: int, sfx: str, detach: bool = False):
        def f(x):
            y = frozen(getattr(self, proj + sfx), detach)(x).unflatten(-1, (n, self.d))  # [B, l, n, D]
            return frozen(getattr(self, norm + sfx), detach)(y) if norm else y
        return f

    def forward(self, x, cos, sin, mask, past, gen, detach_und: bool = False, detach_gen: bool = False):
        """``detach_und`` / ``detach_gen``: that expert with its parameters detached (``MoTDecoderLayer``)."""
        d, dg = detach_und, detach_gen
        q = routed(x, self._heads("q_proj", "q_norm", self.nq, "", d),
                   self._heads("q_proj", "q_norm", self.nq, "_moe_gen", dg), gen).transpose(1, 2)
        k = routed(x, self._heads("k_proj", "k_norm", self.nkv, "", d),
                   self._heads("k_proj", "k_norm", self.nkv, "_moe_gen", dg), gen).transpose(1, 2)
        v = routed(x, self._heads("v_proj", None, self.nkv, "", d),
                   self._heads("v_proj", None, self.nkv, "_moe_gen", dg), gen).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all = k if past is None else torch.cat([past[0], k], 2)
        v_all = v if past is None else torch.cat([past[1], v], 2)
        rep = self.nq // self.nkv  # grouped-query attention: each K/V head serves `rep` query heads
        out = F.scaled_dot_product_attention(q, k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1),
                                             attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)  # [B, L, nq * D]
        return routed(out, frozen(self.o_proj, d), frozen(self.o_proj_moe_gen, dg), gen), (k, v)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTDecoderLayer(nn.Module):
    """Pre-norm residual block; every norm and MLP has an und and a gen copy."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(c)
        self.mlp, self.mlp_moe_gen = MLP(c), MLP(c)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(c.hidden_size, c.rms_norm_eps))
            setattr(self, name + "_moe_gen", RMSNorm(c.hidden_size, c.rms_norm_eps))

    def forward(self, h, cos, sin, mask, past_k, past_v, gen, detach_und: bool = False, detach_gen: bool = False):
        """``detach_und``: the und expert's parameters detached (same values, no gradient): the
        velocity of a detached context, whose image-marker tokens run through the und expert.
        ``detach_gen``: the gen expert's, for the input image's VAE block in the context pass (the
        text loss reaches the und expert only; ``bagel_edit``)."""
        past = None if past_k is None else (past_k, past_v)
        d, dg = detach_und, detach_gen
        a, kv = self.self_attn(routed(h, frozen(self.input_layernorm, d), frozen(self.input_layernorm_moe_gen, dg), gen),
                               cos, sin, mask, past, gen, d, dg)
        h = h + a
        x = routed(h, frozen(self.post_attention_layernorm, d), frozen(self.post_attention_layernorm_moe_gen, dg), gen)
        return h + routed(x, frozen(self.mlp, d), frozen(self.mlp_moe_gen, dg), gen), kv[0], kv[1]


class Qwen2MoTModel(nn.Module):
    """``language_model.model``: embeddings, decoder layers, the und and gen final norms."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    """``language_model``: the MoT decoder and an untied ``lm_head`` (Bagel unties it)."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.config = c
        self.model = Qwen2MoTModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.checkpointing = False  # activation checkpointing per decoder layer (when grads are on)

    def run(self, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, past=None, gen: slice | None = None,
            detach_und: bool = False, detach_gen: bool = False):
        """The decoder layers on input embeddings ``h`` [B, L, H] at RoPE positions ``pos`` [B, L]
        with SDPA mask ``mask`` [B, 1, L, P + L] over ``past`` (per-layer (K, V) of P earlier
        tokens, or None) and these tokens; ``detach_und``: no gradient into the und expert's
        parameters, ``detach_gen`` into the gen expert's (``MoTDecoderLayer.forward``). Returns (last hidden state [B, L, H] before the final
        norm, per-layer (K, V) of these L tokens)."""
        c = self.config
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, h.dtype)
        kv = []
        for i, layer in enumerate(self.model.layers):
            pk, pv = (None, None) if past is None else past[i]
            if self.checkpointing and torch.is_grad_enabled():  # recompute in backward: same forward code
                h, k, v = checkpoint(layer, h, cos, sin, mask, pk, pv, gen, detach_und, detach_gen, use_reentrant=False)
            else:
                h, k, v = layer(h, cos, sin, mask, pk, pv, gen, detach_und, detach_gen)
            kv.append((k, v))
        return h, kv
