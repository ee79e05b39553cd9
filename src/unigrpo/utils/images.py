"""Images of any task: grids as PNG (what people look at to judge samples), and the statistics
outside every reward that a run logs to spot reward hacking (``rollout/*``, ``eval/*``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 3, pad: int = 2,
              labels: list[str] | None = None) -> Path:
    """Save images [N, 3, H, W] in [0, 1] as one PNG grid: ``nrow`` per row, nearest upscaling by
    ``scale``, ``pad`` grey pixels between images; ``labels[i]`` (e.g. the prompt index and its
    reward) is drawn in the corner of image i."""
    images = images.detach().float().clamp(0, 1).cpu()
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [N, H, W, 3]
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest upscaling
    n, h, w, _ = arr.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 96, dtype=np.uint8)  # grey gaps
    corners = [(pad + c * (w + pad), pad + r * (h + pad)) for r, c in (divmod(i, nrow) for i in range(n))]
    for (x, y), a in zip(corners, arr):
        canvas[y:y + h, x:x + w] = a
    img = Image.fromarray(canvas)
    if labels is not None:
        draw = ImageDraw.Draw(img)
        for (x, y), text in zip(corners, labels):
            draw.text((x + 2, y + 1), text, fill=(255, 0, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def pairs(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """[input_0, output_0, input_1, output_1, ...] from inputs [N, 3, h, w] and outputs [N, 3, H, W]:
    an edit grid's cells (``save_grid`` with an even ``nrow`` shows input | output side by side).
    Inputs of another size are resized to the outputs' (nearest: pixels stay as drawn)."""
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {outputs.shape[0]} outputs")
    inputs = inputs.detach().float().cpu()
    if inputs.shape[-2:] != outputs.shape[-2:]:
        inputs = torch.nn.functional.interpolate(inputs, size=tuple(outputs.shape[-2:]), mode="nearest")
    return torch.stack([inputs, outputs.detach().float().cpu()], 1).flatten(0, 1)  # [2N, 3, H, W]


# A pixel whose brightest channel is below this is background (dark); the shapes world's detector
# draws the same line (unigrpo.world.detect).
DARK = 0.5


def to_numpy_images(images) -> np.ndarray:
    """torch/numpy [B, 3, H, W] or [B, H, W, 3], float in [0, 1] or uint8 -> float32 [B, H, W, 3]
    clipped to [0, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"expected images [B, 3, H, W] or [B, H, W, 3], got {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return np.clip(arr, 0.0, 1.0)  # model outputs can overshoot [0, 1]


def image_stats(images) -> dict[str, float]:
    """Statistics outside the reward, to spot reward hacking (saturation drift, blank images).

    saturation: mean HSV saturation of non-background pixels; background_fraction: pixels darker
    than ``DARK``; brightness: mean pixel value; high_freq: mean |pixel - its 3x3 neighbourhood
    mean| in [0, 1] units, which rises with periodic texture that a detector of objects ignores
    (docs/metrics.md: what it read before and after a run that added such a texture).
    """
    img = to_numpy_images(images)
    x = torch.from_numpy(img).permute(0, 3, 1, 2)  # float [B, 3, H, W] in [0, 1]
    local = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    peak, low = img.max(-1), img.min(-1)
    fg = ~(peak < DARK)  # not "peak >= DARK": a NaN pixel counts as foreground, as the detector's does
    sat = np.where(fg, (peak - low) / np.maximum(peak, 1e-6), 0.0)
    return {"saturation": float(sat.sum() / max(fg.sum(), 1)),
            "background_fraction": float(1 - fg.mean()), "brightness": float(img.mean()),
            "high_freq": float((x - local).abs().mean())}


def group_rms_distance(images) -> float:
    """Mean pairwise RMS pixel distance between images of the same group (logged as
    ``rollout/group_diversity``; 0 means every group collapsed to one image).

    images: [P, G, 3, H, W] (torch or numpy, [0, 1]).
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    p, g = x.shape[:2]
    if g < 2:
        return 0.0
    flat = x.reshape(p, g, -1).double()
    d = torch.cdist(flat, flat) / flat.shape[-1] ** 0.5  # [P, G, G] RMS distances
    return float(d.sum() / (p * g * (g - 1)))  # diagonal is 0: average over the off-diagonal pairs


# Modes read as they are (L: grey, P: a palette) and RGBA with no transparent pixel; the others
# (CMYK, 16-bit, float, 1-bit, transparency) would need a choice the user should make themselves.
READABLE_MODES = ("RGB", "RGBA", "L", "P")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> [3, H, W] float in [0, 1] at its own size. ValueError (one line, without the
    path: the caller names file and line) for a file PIL cannot read or a mode it should not guess."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in READABLE_MODES:
                raise ValueError(f"image mode {mode} is not supported (RGB, RGBA without transparency, L or P)")
            if mode == "P" and "transparency" in im.info or mode == "RGBA" and im.getchannel("A").getextrema()[0] < 255:
                raise ValueError(f"image mode {mode} with transparent pixels: flatten it onto a background first")
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for an unreadable or truncated file
        raise ValueError(f"not a readable image ({type(e).__name__}: {str(e)[:80]})") from None
    if min(arr.shape[:2]) < 1:
        raise ValueError("an empty image")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, 3, h, w] -> [n, 3, H, W] (``size`` = (H, W)): unchanged when already that size, else
    bilinear with antialiasing (the aspect ratio is not kept: a model's input size is what it reads)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.nn.functional.interpolate(images, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)
