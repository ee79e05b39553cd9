import numpy as np
import pytest
import torch

from unigrpo.world import ObjectGroup, Spec, parse_description, render, render_batch
from unigrpo.world.detect import classify_pixels, label_components
from unigrpo.world.render import PALETTE, layout


def test_render_is_deterministic_and_diverse(split_tasks):
    specs = [t.target for t in split_tasks["train"][:64]]
    a, b = render_batch(specs, seed=5), render_batch(specs, seed=5)
    assert torch.equal(a, b)
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    spec = parse_description("a red circle")
    imgs = {render(spec, np.random.default_rng(i)).tobytes() for i in range(20)}
    assert len(imgs) >= 15  # size and position jitter give different images


@pytest.mark.parametrize("size", [16, 24, 32, 48])
def test_objects_never_touch_and_stay_inside(all_tasks, size):
    rng = np.random.default_rng(0)
    for t in all_tasks[::5]:
        occupied = np.zeros((size + 2, size + 2), dtype=int)
        for _, _, x, y, s in layout(t.target, rng, size):
            assert 0 <= x and 0 <= y and x + s <= size and y + s <= size and s >= 5
            # each bounding box grown by 1 px on every side: grown boxes overlap iff a gap < 2 px
            occupied[y : y + s + 2, x : x + s + 2] += 1
        assert occupied.max() == 1


def test_relation_layout_places_group0_correctly():
    rng = np.random.default_rng(0)
    a, b = ObjectGroup("circle", "red"), ObjectGroup("square", "blue")
    for rel, axis, sign in [
        ("left of", 2, -1),
        ("right of", 2, 1),
        ("above", 3, -1),
        ("below", 3, 1),
    ]:
        for _ in range(20):
            objs = layout(Spec((a, b), rel), rng, 32)
            c0 = objs[0][axis] + objs[0][4] / 2
            c1 = objs[1][axis] + objs[1][4] / 2
            assert sign * (c0 - c1) > 6


def test_free_colors_are_drawn_from_the_palette():
    spec = parse_description("three circles")
    cols = {tuple(render(spec, np.random.default_rng(i)).reshape(-1, 3).max(0)) for i in range(40)}
    palette = {tuple(np.round(np.array(v) * 255).astype(int)) for v in PALETTE.values()}
    assert cols <= palette and len(cols) >= 4


def _reference_labels(cls: np.ndarray) -> int:
    """Number of 4-connected equal-class components by BFS (independent reference)."""
    h, w = cls.shape
    seen = np.zeros_like(cls, dtype=bool)
    n = 0
    for y0 in range(h):
        for x0 in range(w):
            if cls[y0, x0] == 0 or seen[y0, x0]:
                continue
            n += 1
            stack = [(y0, x0)]
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if (
                        0 <= yy < h
                        and 0 <= xx < w
                        and not seen[yy, xx]
                        and cls[yy, xx] == cls[y, x]
                    ):
                        seen[yy, xx] = True
                        stack.append((yy, xx))
    return n


def test_component_labelling_matches_bfs():
    rng = np.random.default_rng(0)
    cls = rng.integers(0, 4, size=(6, 20, 17)).astype(np.int8)  # dense random maps: long snakes
    cls[3] = (rng.random((20, 17)) < 0.6).astype(np.int8)  # one big percolating component
    fg_index, root = label_components(cls)
    img_of = fg_index // (20 * 17)
    for i in range(cls.shape[0]):
        sel = img_of == i
        assert len(np.unique(root[sel])) == _reference_labels(cls[i])
        # every pixel's root has the same class and lies in the same image
        assert (cls.reshape(-1)[fg_index[root[sel]]] == cls.reshape(-1)[fg_index[sel]]).all()


def test_classify_pixels_palette_and_background():
    px = np.array(
        [
            [
                [[0, 0, 0], [0.3, 0.3, 0.3], [1, 1, 1], [1, 0.5, 0]]
                + [list(v) for v in PALETTE.values()]
            ]
        ],
        dtype=np.float32,
    )
    cls = classify_pixels(px)[0, 0]
    assert cls[:2].tolist() == [0, 0]  # black and dark grey: background
    assert cls[2] == cls[3] == 6  # white and orange: off-palette
    assert cls[4:].tolist() == [1, 2, 3, 4, 5]
    assert (classify_pixels(px * 0.6)[0, 0, 4:] == cls[4:]).all()  # dimmer colours keep their class
