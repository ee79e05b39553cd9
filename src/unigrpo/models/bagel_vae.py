"""The FLUX autoencoder BAGEL uses (``ae.safetensors``), in plain torch, written from the
architecture (reference: black-forest-labs/flux ``modules/autoencoder.py``, vendored by
ByteDance-Seed/Bagel as ``modeling/autoencoder.py``).

Encoder: ``conv_in``, per level ``num_res_blocks`` ResNet blocks then a stride-2 downsample
(not after the last level), a middle block (ResNet, single-head self-attention, ResNet), GroupNorm
(32 groups), swish, ``conv_out`` to ``2 z`` channels = (mean, log-variance) of a diagonal
Gaussian. Decoder: the mirror, ``num_res_blocks + 1`` blocks per level, nearest-neighbour x2
upsampling. Latents are ``scale * (z - shift)`` with the released AE's constants.

Deviation from the reference: ``encode`` returns the posterior MEAN (the reference samples the
posterior by default), so that encoding an image is deterministic.

The architecture (``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``) is read from the tensor
shapes of the file (``AutoEncoder.from_state_shapes``): the released file gives ch 128,
ch_mult (1, 2, 4, 4), 2 blocks, z 16 (downsampling 8); a test file gives its own small sizes.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FLUX_SCALE", "FLUX_SHIFT", "AutoEncoder"]

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159  # latent scale / shift of the released FLUX AE


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1-conv projections)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the reference


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z: int, cin: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c, ch * m))
                c = ch * m
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = _mid(c)
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z: int, cout: int = 3):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, c, 3, padding=1)
        self.mid = _mid(c)
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)  # up[i] is level i (as the checkpoint names it), run from the last
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, cout, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX AE: images [B, 3, H, W] in [-1, 1] <-> latents [B, z, H / f, W / f], f = 2^(levels-1)."""

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 z_channels: int = 16, scale: float = FLUX_SCALE, shift: float = FLUX_SHIFT):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.z_channels, self.downsample = z_channels, 2 ** (len(ch_mult) - 1)
        self.scale, self.shift = scale, shift

    @staticmethod
    def arch_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
        """(ch, ch_mult, num_res_blocks, z_channels) of a state dict's tensor shapes."""
        ch = shapes["encoder.conv_in.weight"][0]
        levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
        return {"ch": ch, "ch_mult": mult, "num_res_blocks": len(blocks),
                "z_channels": shapes["decoder.conv_in.weight"][1]}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.encoder(x).chunk(2, dim=1)[0]  # the posterior mean (module docstring)
        return self.scale * (mean - self.shift)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scale + self.shift)
