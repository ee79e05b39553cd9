"""Ground-truth renderer of the shapes world: flat-coloured shapes on a black canvas.

Layouts are templated so a small conv net can learn them, with jitter so images differ:

- 1 object: centred, side 8..12 px (at 32 px), centre jittered by up to +/-5 px;
- 2 objects (no relation): one in each half (left / right), random assignment;
- relation: "left of"/"right of" -> left/right halves, "above"/"below" -> top/bottom halves;
- 3 or 4 objects: 2x2 grid of quadrants (3 of them chosen at random for 3 objects);
- objects in cells have side 8..11 px and are jittered inside their cell with a 1 px margin, so
  two objects are always >= 2 px apart and connected components stay clean.

Sizes scale with the canvas (``size / 32``), never below 5 px. Triangles point up (apex at top).
No anti-aliasing: flat colours are easier to detect and to learn.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from unigrpo.world.knowledge import COLORS
from unigrpo.world.spec import Spec

# RGB of each colour in [0, 1]. Corners of the RGB cube (purple excepted) keep the colours far
# apart after brightness normalisation (min pairwise distance 0.7, blue vs purple).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "purple": (0.7, 0.0, 1.0),
}
assert tuple(PALETTE) == COLORS
MIN_SIZE, MAX_SIZE = 16, 64  # supported canvas sides (validated for 24 and 32; see docs/world.md)
QUADRANTS = ("tl", "tr", "bl", "br")  # cells of the 2x2 grid, in raster order


@cache
def shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean [s, s] mask of a shape filling an s x s box (pixel centres tested)."""
    c = (np.arange(s) + 0.5) - s / 2  # pixel-centre offsets from the box centre
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "circle":
        # +0.25: a slightly fuller rim, so small circles are not diamonds
        return c[:, None] ** 2 + c[None, :] ** 2 <= (s / 2) ** 2 + 0.25
    if shape == "triangle":  # apex up: half-width grows linearly from 0.5 (top row) to s/2 (bottom)
        half = (np.arange(s)[:, None] + 1) * 0.5
        return np.abs(c[None, :]) <= half
    raise ValueError(f"unknown shape {shape!r}")


def _sizes(size: int, single: bool) -> tuple[int, int]:
    """Object side range (inclusive) for a canvas of side ``size``."""
    lo, hi = (8, 12) if single else (8, 11)
    k = size / 32
    return max(5, round(lo * k)), max(5, round(hi * k))


def _cells(spec: Spec, rng: np.random.Generator, size: int) -> list[tuple[int, int, int, int]]:
    """One cell (x0, y0, x1, y1) per object, in the order of ``spec``'s expanded objects."""
    h = size // 2
    halves_lr = [(0, 0, h, size), (h, 0, size, size)]
    halves_tb = [(0, 0, size, h), (0, h, size, size)]
    n = spec.total
    if spec.relation is not None:
        lr = spec.relation in ("left of", "right of")
        cells = halves_lr if lr else halves_tb
        first_is_low = spec.relation in ("left of", "above")  # group 0 in the left / top cell
        return cells if first_is_low else cells[::-1]
    if n == 1:
        return [(0, 0, size, size)]
    if n == 2:
        return [halves_lr[i] for i in rng.permutation(2)]
    quads = [quadrant(c, size) for c in QUADRANTS]
    return [quads[i] for i in rng.permutation(4)[:n]]


def quadrant(cell: str, size: int) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) of quadrant ``cell`` ('tl' | 'tr' | 'bl' | 'br') of a size x size canvas."""
    h = size // 2
    x, y = h * (cell[1] == "r"), h * (cell[0] == "b")
    return x, y, x + h, y + h


def layout(spec: Spec, rng: np.random.Generator,
           size: int = 32) -> list[tuple[str, str, int, int, int]]:
    """Objects as (shape, colour, x0, y0, side); free colours are drawn at random, one per group."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    objects = []
    for g in spec.groups:
        color = g.color if g.color is not None else COLORS[int(rng.integers(len(COLORS)))]
        objects += [(g.shape, color)] * g.count
    cells = _cells(spec, rng, size)
    single = len(objects) == 1
    lo, hi = _sizes(size, single)
    margin = 2 if single else 1  # single: keep off the canvas edge; cells: >= 2 px between objects
    jitter = round(5 * size / 32)
    return [(shape, color, *place(cell, lo, hi, margin, jitter, rng))
            for (shape, color), cell in zip(objects, cells)]


def layout_cells(objects, rng: np.random.Generator, size: int = 32) -> list[tuple[str, str, int, int, int]]:
    """Objects given as (shape, colour, quadrant) -> (shape, colour, x0, y0, side), each placed in
    its own quadrant exactly as ``layout`` places 3 or 4 objects (side 8..11 px at 32, 1 px margin,
    jitter), whatever their number: the edit scenes' layout, where objects keep their cell."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    lo, hi = _sizes(size, single=False)
    jitter = round(5 * size / 32)
    return [(shape, color, *place(quadrant(cell, size), lo, hi, 1, jitter, rng))
            for shape, color, cell in objects]


def place(cell: tuple[int, int, int, int], lo: int, hi: int, margin: int, jitter: int,
          rng: np.random.Generator) -> tuple[int, int, int]:
    """(x0, y0, side) of one object in ``cell`` = (x0, y0, x1, y1): side in [lo, hi] (capped by
    the cell), top-left jittered by up to ``jitter`` px around the cell centre, ``margin`` px
    inside the cell. Draws side, x, y from ``rng`` in that order (renders depend on it)."""
    x0, y0, x1, y1 = cell
    s = int(rng.integers(lo, min(hi, x1 - x0 - 2 * margin, y1 - y0 - 2 * margin) + 1))
    xs = (x0 + margin, x1 - margin - s)  # allowed top-left range (inclusive)
    ys = (y0 + margin, y1 - margin - s)
    cx, cy = (xs[0] + xs[1]) // 2, (ys[0] + ys[1]) // 2
    xs = (max(xs[0], cx - jitter), min(xs[1], cx + jitter))
    ys = (max(ys[0], cy - jitter), min(ys[1], cy + jitter))
    x, y = int(rng.integers(xs[0], xs[1] + 1)), int(rng.integers(ys[0], ys[1] + 1))
    return x, y, s


def render(spec: Spec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Ground-truth image of ``spec``: uint8 [size, size, 3], deterministic given ``rng``."""
    return paint(layout(spec, rng, size), size)


def paint(objects, size: int) -> np.ndarray:
    """uint8 [size, size, 3] black canvas with ``objects`` = [(shape, colour, x0, y0, side)] drawn."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for shape, color, x, y, s in objects:
        rgb = np.round(np.array(PALETTE[color]) * 255).astype(np.uint8)
        img[y:y + s, x:x + s][shape_mask(shape, s)] = rgb
    return img


def render_batch(specs, seed: int, size: int = 32) -> torch.Tensor:
    """Render a list of Spec (or spec dicts) -> float32 [B, 3, size, size] in [0, 1]."""
    rng = np.random.default_rng(seed)
    imgs = [render(s if isinstance(s, Spec) else Spec.from_dict(s), rng, size) for s in specs]
    arr = np.stack(imgs).astype(np.float32) / 255.0  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
