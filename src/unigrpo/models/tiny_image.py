"""Image expert of the tiny unified model: a small conditional UNet predicting the flow velocity.

Why a UNet on pixel-unshuffled images (measured on this project's machine, docs/tiny_model.md): on 2
CPU cores convolution learns shape far faster than patch attention, and the cost is set by the
spatial grid. The "latent" is the RGB image in [-1, 1] rearranged by ``pixel_unshuffle(2)``
(32x32x3 -> 16x16x12): a fixed, lossless, invertible map, so flow matching in it is exactly
pixel-space flow matching at the cost of a 16x16 network.

Conditioning: the text expert's final hidden states (prompt + reasoning) are projected and read by
cross-attention at every level, and their masked mean is added to the flow-time embedding. An
expert that edits (``ref_channels`` > 0) also reads the input image's latent, concatenated to
``x_t`` as extra input channels (zeros for a row without an input image), so it can keep what the
instruction does not touch where it was.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1] (scaled by 1000 like diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a scale/shift from the (time + context) embedding."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.emb(e)[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class CrossAttention(nn.Module):
    """Image positions attend to the text context (plus themselves when ``self_attn``)."""

    def __init__(self, ch: int, ctx_dim: int, heads: int = 4, self_attn: bool = False):
        super().__init__()
        self.heads, self.self_attn = heads, self_attn
        self.norm = _norm(ch)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(ctx_dim, 2 * ch)
        self.kv_self = nn.Linear(ch, 2 * ch) if self_attn else None
        self.out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        k, v = self.kv(ctx).chunk(2, dim=-1)  # [B, Lc, C]
        mask = ctx_mask
        if self.kv_self is not None:
            ks, vs = self.kv_self(seq).chunk(2, dim=-1)
            k, v = torch.cat([k, ks], 1), torch.cat([v, vs], 1)
            mask = torch.cat([mask, mask.new_ones(b, h * w)], 1)

        def split(z):
            return z.view(b, z.shape[1], self.heads, c // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(seq)), split(k), split(v),
                                           attn_mask=mask[:, None, None, :])
        y = self.out(y.transpose(1, 2).reshape(b, h * w, c))
        return x + y.transpose(1, 2).view(b, c, h, w)


class ImageExpert(nn.Module):
    """Velocity network v(x_t, t, context) on latents [B, 12, S/2, S/2]."""

    def __init__(self, ctx_dim: int, channels: tuple[int, int, int] = (48, 96, 96), in_ch: int = 12,
                 ref_channels: int = 0):
        super().__init__()
        c0, c1, c2 = channels
        self.ref_channels = ref_channels
        emb = 4 * c0
        self.emb_dim = c0
        self.t_mlp = nn.Sequential(nn.Linear(c0, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.ctx_proj = nn.Sequential(nn.LayerNorm(ctx_dim), nn.Linear(ctx_dim, c2))
        self.pool_mlp = nn.Sequential(nn.Linear(c2, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.null_ctx = nn.Parameter(torch.zeros(1, 1, ctx_dim))  # the unconditional context (CFG)
        self.conv_in = nn.Conv2d(in_ch + ref_channels, c0, 3, padding=1)
        self.d0 = ResBlock(c0, c0, emb)
        self.a0 = CrossAttention(c0, c2)
        self.down0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.d1 = ResBlock(c1, c1, emb)
        self.a1 = CrossAttention(c1, c2)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.m1 = ResBlock(c2, c2, emb)
        self.ma = CrossAttention(c2, c2, self_attn=True)
        self.m2 = ResBlock(c2, c2, emb)
        self.up1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.u1 = ResBlock(2 * c1, c1, emb)
        self.ua1 = CrossAttention(c1, c2)
        self.up0 = nn.ConvTranspose2d(c1, c0, 4, stride=2, padding=1)
        self.u0 = ResBlock(2 * c0, c0, emb)
        self.ua0 = CrossAttention(c0, c2)
        self.out = nn.Sequential(_norm(c0), nn.SiLU(), nn.Conv2d(c0, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start at v = 0: a stable, standard init
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                ref: torch.Tensor | None = None):
        """x [B, C, h, w]; t [B]; ctx [B, Lc, ctx_dim] text hidden states; ctx_mask [B, Lc] bool;
        ref [B, C, h, w] the input image's latent (an expert with ``ref_channels``; None = zeros)."""
        if self.ref_channels:
            x = torch.cat([x, torch.zeros_like(x) if ref is None else ref.to(x.dtype)], 1)
        c = self.ctx_proj(ctx)  # [B, Lc, c2]
        m = ctx_mask.to(c.dtype)[..., None]
        pooled = (c * m).sum(1) / m.sum(1).clamp(min=1.0)  # masked mean; clamp: empty rows stay finite
        e = self.t_mlp(time_embedding(t, self.emb_dim)) + self.pool_mlp(pooled)
        h0 = self.a0(self.d0(self.conv_in(x), e), c, ctx_mask)
        h1 = self.a1(self.d1(self.down0(h0), e), c, ctx_mask)
        h = self.m2(self.ma(self.m1(self.down1(h1), e), c, ctx_mask), e)
        h = self.ua1(self.u1(torch.cat([self.up1(h), h1], 1), e), c, ctx_mask)
        h = self.ua0(self.u0(torch.cat([self.up0(h), h0], 1), e), c, ctx_mask)
        return self.out(h)
