"""Image grids as PNG (Pillow only): what people look at to judge samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 3, pad: int = 2) -> Path:
    """Save images [N, 3, H, W] in [0, 1] as one PNG grid (``nrow`` per row, nearest upscaling)."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 96, dtype=np.uint8)  # grey gaps
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
