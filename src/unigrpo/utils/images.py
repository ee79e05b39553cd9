"""Image grids as PNG (Pillow only): what people look at to judge samples."""

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
