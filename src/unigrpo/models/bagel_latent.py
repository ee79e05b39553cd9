"""BAGEL's latent path: how VAE latents become generation-expert tokens and back (written from
the architecture; reference: ByteDance-Seed/Bagel ``modeling/bagel/bagel.py``: ``patchify`` in
``forward`` / ``prepare_vae_latent``, ``TimestepEmbedder`` and ``PositionEmbedding`` described in
``modeling/bagel/modeling_utils.py``, the DiT timestep embedding and MAE 2-D sin-cos table).

- **Patchify**: a latent [z, h p, w p] becomes h w tokens of p p z values, within-patch order
  (p, q, c) (row offset, column offset, channel); ``p = latent_patch_size = 2``.
- **Token embedding** of a noisy latent at flow time t: ``vae2llm(token) + time_embedder(t) +
  latent_pos_embed[row * max_latent_size + col]``.
- **Time**: t in [0, 1] is embedded as is (not x1000): 256 sinusoid features
  ``[cos(t w_k), sin(t w_k)]``, ``w_k = 10000^(-k / 128)``, then Linear, SiLU, Linear.
- **Position table**: 2-D sin-cos, first half of the channels from the column index, second half
  from the row index, each ``[sin(pos w_k), cos(pos w_k)]`` (MAE's ``get_2d_sincos_pos_embed``).
  The released checkpoint stores the table (``latent_pos_embed.pos_embed``, frozen); the loader
  uses the stored one, ``sincos_2d`` is what a test checkpoint is written with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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

__all__ = ["PositionEmbedding", "TimestepEmbedder", "patchify", "sincos_2d", "timestep_features", "unpatchify"]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, z, h p, w p] -> [B, h w, p p z] (token order row-major, within-patch order (p, q, c))."""
    b, z, hh, ww = x.shape
    h, w = hh // p, ww // p
    return x.reshape(b, z, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * z)


def unpatchify(tokens: torch.Tensor, z: int, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of ``patchify``: [B, h w, p p z] -> [B, z, h p, w p]."""
    b = tokens.shape[0]
    return tokens.reshape(b, h, w, p, p, z).permute(0, 5, 1, 3, 2, 4).reshape(b, z, h * p, w * p)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[B] flow times in [0, 1] -> [B, dim] float32 ``[cos(t w), sin(t w)]``, w_k = max_period^(-k/(dim/2))."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * w[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    w = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * w[None]
    return torch.cat([torch.sin(out), torch.cos(out)], 1)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """[side * side, dim] float32 table; entry ``row * side + col`` (module docstring)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], 1).float()


class TimestepEmbedder(nn.Module):
    """``mlp = Linear(freq, H), SiLU, Linear(H, H)`` on ``timestep_features`` (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq).to(self.mlp[0].weight.dtype))


class PositionEmbedding(nn.Module):
    """The frozen 2-D table ``pos_embed`` [max_side^2, H] (a parameter without gradient, as stored)."""

    def __init__(self, max_side: int, hidden: int):
        super().__init__()
        self.max_side = max_side
        self.pos_embed = nn.Parameter(sincos_2d(hidden, max_side), requires_grad=False)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """Rows of an h x w latent grid: [h w, H]."""
        dev = self.pos_embed.device
        ids = (torch.arange(h, device=dev)[:, None] * self.max_side + torch.arange(w, device=dev)[None]).reshape(-1)
        return self.pos_embed[ids]
