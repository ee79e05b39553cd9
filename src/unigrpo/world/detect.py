"""Rule-based object detector for the shapes world (numpy, vectorised across the batch).

Pipeline: pixel -> colour class -> 4-connected components per class -> shape from features.

- **Pixel colour.** A pixel whose brightest channel is below ``DARK`` (0.5) is background: black,
  dark noise and dark grey. Otherwise its colour is divided by that channel (brightness
  normalisation: a dim red is still red) and matched to the nearest normalised palette colour; if
  none is within ``MAX_CHROMA_DIST`` (0.45) the pixel is ``UNKNOWN_COLOR`` (white, grey, orange...).
- **Components.** Label propagation with pointer jumping over the foreground pixels of the whole
  batch at once (no per-image Python loop). Components under ``MIN_AREA`` px are dropped as noise.
- **Shape** from the bounding box (w, h), fill = area / (w h), vertical asymmetry
  (bottom-half minus top-half area, over area) and which bounding-box corner pixels are set:
  triangle |asym| >= 0.2 and fill < 0.8 (apex up or down); square fill >= 0.92, or fill >= 0.8 with
  >= 3 corners set; circle 0.6 <= fill < 0.92 with <= 1 corner set; anything else, or a blob that
  is too thin (aspect > 1.5), too small (side < 3 px) or too large (side > 0.6 canvas), is
  ``UNKNOWN_SHAPE``. Rendered circles have fill 0.75-0.89 and no corners, squares 1.0, triangles
  0.58-0.68 with asym 0.35-0.45, so the margins are wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unigrpo.utils.images import DARK, to_numpy_images
from unigrpo.world.knowledge import COLORS, SHAPES
from unigrpo.world.render import PALETTE

MAX_CHROMA_DIST = 0.45
MIN_AREA = 4
UNKNOWN_COLOR = len(COLORS)  # colour index of bright pixels far from every palette colour
UNKNOWN_SHAPE = len(SHAPES)
_NORM_PALETTE = np.array([np.array(PALETTE[c]) / max(PALETTE[c]) for c in COLORS], dtype=np.float32)


def classify_pixels(img: np.ndarray) -> np.ndarray:
    """float [B, H, W, 3] -> int8 [B, H, W]: 0 background, 1 + i palette colour i,
    1 + UNKNOWN_COLOR off-palette."""
    peak = img.max(-1)
    chroma = img / np.maximum(peak, 1e-6)[..., None]  # brightness-normalised colour
    d2 = ((chroma[..., None, :] - _NORM_PALETTE) ** 2).sum(-1)  # [B, H, W, C]
    nearest = d2.argmin(-1)
    near_ok = np.take_along_axis(d2, nearest[..., None], -1)[..., 0] <= MAX_CHROMA_DIST ** 2
    cls = np.where(near_ok, nearest + 1, UNKNOWN_COLOR + 1)
    return np.where(peak < DARK, 0, cls).astype(np.int8)


def label_components(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of equal non-zero class over a batch.

    cls: [B, H, W] int. Returns (fg_index [F] flat indices of foreground pixels in raster order,
    root [F] position in fg_index of each pixel's component root = its first pixel in raster order).
    """
    b, h, w = cls.shape
    flat = cls.reshape(-1)
    fg_index = np.flatnonzero(flat)
    compact = np.full(flat.size, -1, dtype=np.int64)
    compact[fg_index] = np.arange(fg_index.size)
    grid = compact.reshape(b, h, w)
    same_r = (cls[:, :, 1:] == cls[:, :, :-1]) & (cls[:, :, 1:] > 0)  # pixel ~ its right neighbour
    same_d = (cls[:, 1:, :] == cls[:, :-1, :]) & (cls[:, 1:, :] > 0)  # pixel ~ the one below
    edges = [(grid[:, :, :-1][same_r], grid[:, :, 1:][same_r]),
             (grid[:, :-1, :][same_d], grid[:, 1:, :][same_d])]
    lab = np.arange(fg_index.size)
    while True:  # labels only decrease and stay inside the component: converges to its minimum
        prev = lab
        lab = lab.copy()
        for a, c in edges:  # each pixel has at most one edge per direction: no duplicate targets
            lab[a] = np.minimum(lab[a], lab[c])
            lab[c] = np.minimum(lab[c], lab[a])
        lab = lab[lab[lab]]  # pointer jumping: log-depth instead of diameter-many sweeps
        if np.array_equal(lab, prev):
            return fg_index, lab


@dataclass
class Objects:
    """Detected objects of a batch, one entry per object (flat arrays of equal length)."""

    image: np.ndarray  # [N] int, image index in the batch
    color: np.ndarray  # [N] int, index into COLORS or UNKNOWN_COLOR
    shape: np.ndarray  # [N] int, index into SHAPES or UNKNOWN_SHAPE
    cx: np.ndarray  # [N] float, centroid column (pixels)
    cy: np.ndarray  # [N] float, centroid row (pixels)
    area: np.ndarray  # [N] int, pixels


def _shape_class(area, bw, bh, corners, asym, size: int) -> np.ndarray:
    """Vectorised shape rule of the module docstring; inputs are [N] arrays."""
    fill = area / (bw * bh)
    aspect = np.maximum(bw, bh) / np.minimum(bw, bh)
    bad = (aspect > 1.5) | (np.maximum(bw, bh) < 3) | (np.maximum(bw, bh) > 0.6 * size)
    tri = (np.abs(asym) >= 0.2) & (fill < 0.8)
    square = (fill >= 0.92) | ((fill >= 0.8) & (corners >= 3))
    circle = (fill >= 0.6) & (fill < 0.92) & (corners <= 1)
    out = np.select([bad, tri, square, circle], [UNKNOWN_SHAPE, 2, 1, 0], UNKNOWN_SHAPE)
    assert SHAPES == ("circle", "square", "triangle")  # indices used just above
    return out


def detect(images, min_area: int = MIN_AREA) -> Objects:
    """Objects in a batch of images (any format ``to_numpy_images`` accepts)."""
    img = to_numpy_images(images)
    _, h, w, _ = img.shape
    cls = classify_pixels(img)
    fg_index, lab = label_components(cls)
    is_root = lab == np.arange(lab.size)
    comp = (np.cumsum(is_root) - 1)[lab]  # [F] component id of each foreground pixel
    n = int(is_root.sum())
    root_flat = fg_index[is_root]  # [n] raster-first pixel of each component
    y, x = (fg_index // w) % h, fg_index % w
    area = np.bincount(comp, minlength=n)
    ymin = (root_flat // w) % h  # the raster-first pixel lies on the top row
    ymax = np.zeros(n, dtype=np.int64)
    np.maximum.at(ymax, comp, y)
    xmin = np.full(n, w, dtype=np.int64)
    np.minimum.at(xmin, comp, x)
    xmax = np.zeros(n, dtype=np.int64)
    np.maximum.at(xmax, comp, x)
    mid2 = (ymin + ymax)[comp]  # twice the bbox mid-row: compare 2y to it, no float rounding
    asym = (np.bincount(comp, 2 * y > mid2, n) - np.bincount(comp, 2 * y < mid2, n)) / area
    base = root_flat - root_flat % (h * w)  # flat index of pixel (0, 0) of each component's image
    root_of = np.full(cls.size, -1, dtype=np.int64)
    root_of[fg_index] = comp
    corners = sum((root_of[base + yy * w + xx] == np.arange(n)).astype(int)
                  for yy in (ymin, ymax) for xx in (xmin, xmax))
    shape = _shape_class(area, xmax - xmin + 1, ymax - ymin + 1, corners, asym, min(h, w))
    keep = area >= min_area
    color = cls.reshape(-1)[root_flat].astype(np.int64) - 1
    cx = np.bincount(comp, x, n) / area + 0.5  # + 0.5: pixel centres, so cx is in [0, w]
    cy = np.bincount(comp, y, n) / area + 0.5
    return Objects(image=(root_flat // (h * w))[keep], color=color[keep], shape=shape[keep],
                   cx=cx[keep], cy=cy[keep], area=area[keep])
