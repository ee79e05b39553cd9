"""Qwen2.5-VL image preprocessing, written in the project: what ``Qwen2VLImageProcessor`` (its PIL
backend) and the Qwen-Image-Edit pipelines compute before the text encoder sees an image.

Why not the processor object: ``Qwen2VLProcessor`` cannot be built, saved or loaded without
torchvision in transformers 5.25 (its video processor), and no torchvision build works with the
pinned CPU torch here. The image half of it is small, and is this module (tested against
``Qwen2VLImageProcessorPil``, which imports without torchvision, and against the pipelines):

- **Resize** (``smart_resize``): both sides to multiples of ``patch_size * merge_size`` (28), the
  area clamped to ``[min_pixels, max_pixels]``, bicubic in PIL on the 8-bit image.
- **Normalise**: ``(x / 255 - mean) / std`` with the CLIP mean / std of the processor config.
- **Patches** (``pixel_values``): ``[grid_h * grid_w, 3 * temporal_patch_size * 14 * 14]`` per image,
  patches ordered by 2x2 merge window (``grid_h / 2, grid_w / 2, 2, 2``), each patch laid out
  ``[channel, frame, y, x]`` with the still image repeated on both frames; images concatenated.
  ``image_grid_thw`` = ``[1, grid_h, grid_w]`` per image.
- **Prompt tokens**: each image is ``<|vision_start|>`` + ``grid_h * grid_w / merge_size**2`` times
  ``<|image_pad|>`` + ``<|vision_end|>`` (``image_tokens``).
- **The pipelines' own resize** (``calculate_dimensions``): an input image is first resized (PIL
  Lanczos, as ``VaeImageProcessor.resize``) to about a target area with both sides multiples of 32
  (Edit: 1024^2 for the VAE and the text encoder; Edit-Plus: 1024^2 for the VAE, 384^2 for the
  text encoder).

Images enter as float tensors in [0, 1] and are quantised to 8 bits first: the pipelines receive
PIL images, and a PNG loaded into [0, 1] round-trips exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "VLImageConfig", "calculate_dimensions", "image_tokens", "pil_resize",
           "smart_resize", "vl_inputs"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN (the processor's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VLImageConfig:
    """The image processor's settings (``processor/preprocessor_config.json`` of a pipeline folder)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_json(cls, conf: dict) -> VLImageConfig:
        """From a saved preprocessor config: ``size.shortest_edge`` / ``longest_edge`` are the min /
        max pixels (transformers 5), ``min_pixels`` / ``max_pixels`` the older keys; options this
        module does not implement are refused."""
        if not conf.get("do_resize", True) or not conf.get("do_normalize", True) or not conf.get("do_rescale", True) \
                or conf.get("resample", 3) != 3 or abs(conf.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
            raise NotImplementedError(f"this Qwen2-VL image processor config is not implemented: {conf}")
        size = conf.get("size") or {}
        return cls(patch_size=int(conf.get("patch_size", 14)), temporal_patch_size=int(conf.get("temporal_patch_size", 2)),
                   merge_size=int(conf.get("merge_size", 2)),
                   min_pixels=int(size.get("shortest_edge", conf.get("min_pixels", 56 * 56))),
                   max_pixels=int(size.get("longest_edge", conf.get("max_pixels", 28 * 28 * 1280))),
                   image_mean=tuple(conf.get("image_mean", CLIP_MEAN)), image_std=tuple(conf.get("image_std", CLIP_STD)))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``image_grid_thw`` of an image of this size (after ``smart_resize``)."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w): multiples of ``factor`` nearest to the input, scaled (aspect kept) into
    ``[min_pixels, max_pixels]`` of area: rounding first, then floor when too large, ceil when too small."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"input image: aspect ratio must be below 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``target_area`` pixels at aspect ``ratio = width / height``, both
    multiples of 32 (the pipelines' ``calculate_dimensions``)."""
    width = math.sqrt(target_area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> an 8-bit RGB PIL image (rounded)."""
    return Image.fromarray((image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def pil_resize(image: torch.Tensor, height: int, width: int, resample=Image.Resampling.LANCZOS) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [3, height, width] in [0, 1] on the 8-bit grid: PIL's resize (Lanczos
    by default: ``VaeImageProcessor.resize``; PIL returns a copy when the size is unchanged)."""
    out = np.asarray(to_pil(image).resize((width, height), resample=resample), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


def _patches(image: np.ndarray, cfg: VLImageConfig) -> np.ndarray:
    """[3, H, W] normalised -> [grid_h * grid_w, 3 * T * p * p] (module docstring's layout)."""
    c, h, w = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, c, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # the still image on every frame
    return x.reshape(gh * gw, c * t * p * p)


def vl_inputs(images: torch.Tensor, cfg: VLImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 3, H, W] in [0, 1] -> (``pixel_values`` [sum of patches, 3 * T * p * p] float32,
    ``image_grid_thw`` [n, 3] long), what the processor returns for them."""
    mean = np.asarray(cfg.image_mean, dtype=np.float64)[:, None, None]  # float64, cast at the end (as the processor)
    std = np.asarray(cfg.image_std, dtype=np.float64)[:, None, None]
    values, grids = [], []
    for image in images:
        _, h, w = cfg.grid(image.shape[1], image.shape[2])
        pil = to_pil(image)
        hh, ww = h * cfg.patch_size, w * cfg.patch_size
        if pil.size != (ww, hh):
            pil = pil.resize((ww, hh), resample=Image.Resampling.BICUBIC)
        x = np.asarray(pil).transpose(2, 0, 1) * (1 / 255)
        values.append(_patches(((x - mean) / std).astype(np.float32), cfg))
        grids.append([1, h, w])
    return torch.from_numpy(np.concatenate(values)).float(), torch.tensor(grids, dtype=torch.long)


def image_tokens(grid: tuple[int, int, int] | torch.Tensor, merge_size: int) -> int:
    """The number of ``<|image_pad|>`` tokens of one image of grid ``(t, h, w)``."""
    t, h, w = (int(v) for v in grid)
    return t * h * w // merge_size**2
