"""BAGEL's understanding path for input images: the SigLIP NaViT vision tower, the connector and the
ViT position table, plus Bagel's image transform (written from the architecture; reference:
ByteDance-Seed/Bagel ``modeling/bagel/siglip_navit.py``, ``modeling/bagel/modeling_utils.py:
MLPconnector``, ``data/transforms.py``, ``data/data_utils.py``).

- **Tower** (``vit_model.vision_model.*``, HF SigLIP key names): a linear patch embedding of
  ``3 p p`` pixel values per patch (the release stores the Conv2d as this linear, within-patch order
  (row, column, channel)), plus a learned ``position_embedding`` indexed by ``row * S + col``
  (``S = image_size / patch_size``: 70 for the release, ``rope`` off as Bagel forces it); pre-norm
  encoder layers (LayerNorm, full multi-head attention with biases, LayerNorm, ``fc2(gelu_tanh(fc1))``),
  then ``post_layernorm``. Bagel drops the config's last layer (``num_hidden_layers - 1``: the
  release's vit_config.json says 27, the checkpoint holds 26). Attention is full within one image
  (Bagel packs images with ``cu_seqlens``; here the images of a batch share one size, so a batch
  dimension is the same thing).
- **Connector** (``connector.fc1`` ViT width -> LLM width, GELU-tanh, ``connector.fc2``), then
  ``+ vit_pos_embed.pos_embed[row * S + col]`` (a frozen 2-D sin-cos table, the same ids).
- **Transform** (``MaxLongEdgeMinShortEdgeResize`` then normalise to [-1, 1]): ``resize_size`` is
  its size rule; the resampling here is torch's antialiased bicubic on tensors (Bagel resamples
  PIL images with torchvision: values differ in the last bits of a pixel, sizes do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MAX_PIXELS", "Connector", "SiglipNaViT", "ViTConfig", "flattened_position_ids", "resize", "resize_size",
           "vit_patches"]

MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform's default max_pixels (data/transforms.py)


@dataclass(frozen=True)
class ViTConfig:
    """The SigLIP geometry of ``vit_config.json`` (layers: those the checkpoint holds, i.e. the
    config's count minus the one Bagel drops)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    patch_size: int
    image_size: int
    layer_norm_eps: float = 1e-6

    @property
    def max_side(self) -> int:
        """Patches per side of the position table (``vit_max_num_patch_per_side``: 70)."""
        return self.image_size // self.patch_size

    @staticmethod
    def from_json(path: Path) -> ViTConfig:
        raw = json.loads(path.read_text())
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size", "image_size")
        if absent := [k for k in keys if k not in raw]:
            raise ValueError(f"{path}: missing {absent}")
        return ViTConfig(**{k: raw[k] for k in keys}, layer_norm_eps=raw.get("layer_norm_eps", 1e-6))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class SiglipAttention(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, nn.Linear(c.hidden_size, c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t):  # [B, N, H] -> [B, heads, N, H / heads]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class SiglipMLP(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(3 * c.patch_size ** 2, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_side ** 2, c.hidden_size)


class _Encoder(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.num_hidden_layers))


class _VisionModel(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.embeddings, self.encoder = _Embeddings(c), _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class SiglipNaViT(nn.Module):
    """``vit_model``: patches [B, N, 3 p p] at position ids [N] -> features [B, N, ViT width]."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.config = c
        self.vision_model = _VisionModel(c)

    def forward(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(ids)
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x)


class Connector(nn.Module):
    """``connector``: ``fc2(gelu_tanh(fc1(x)))``, ViT width -> LLM width (Bagel's MLPconnector)."""

    def __init__(self, vit_hidden: int, llm_hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(vit_hidden, llm_hidden), nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


def flattened_position_ids(h: int, w: int, patch: int, max_side: int, device=None) -> torch.Tensor:
    """Ids [h/p * w/p] of an h x w image's patches, row-major: ``row * max_side + col`` (Bagel's
    ``get_flattened_position_ids_extrapolate``)."""
    rows, cols = torch.arange(h // patch, device=device), torch.arange(w // patch, device=device)
    return (rows[:, None] * max_side + cols[None]).reshape(-1)


def resize_size(h: int, w: int, max_size: int, min_size: int, stride: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) Bagel's ``MaxLongEdgeMinShortEdgeResize`` gives an h x w image: scale the long
    edge down to ``max_size`` (never up), then the short edge up to ``min_size``, round both sides to
    multiples of ``stride`` (at least one stride); rescale if over ``max_pixels``, then if the long
    edge is over ``max_size``."""
    def apply(w0, h0, scale):
        return tuple(max(stride, int(round(round(v * scale) / stride) * stride)) for v in (w0, h0))

    scale = max(min(max_size / max(w, h), 1.0), min_size / min(w, h))
    nw, nh = apply(w, h, scale)
    if nw * nh > max_pixels:
        nw, nh = apply(nw, nh, max_pixels / (nw * nh))
    if max(nw, nh) > max_size:
        nw, nh = apply(nw, nh, max_size / max(nw, nh))
    return nh, nw


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, *size], antialiased bicubic, clamped to [0, 1] (bicubic
    overshoots); unchanged if already that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def vit_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, (H/p)(W/p), p p 3], within-patch order (row, column, channel)
    (Bagel's ``patchify``: the layout of the linear patch embedding)."""
    b, c, hh, ww = images.shape
    h, w = hh // patch, ww // patch
    return images.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch * patch * c)
