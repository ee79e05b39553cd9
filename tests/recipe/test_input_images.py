"""Prompts with input images: a JSONL line's ``"images"`` are read and checked when the file is read
(one line naming file and line for a missing, unreadable or wrong-mode image, at ``validate``,
before anything is written), resized to the model's input size, seen by a model that sees images,
and handed to the rewards as ``metadata["input_images"]`` in process and over the wire."""

import json

import numpy as np
import pytest
import smooth_reward
import torch
from conftest import MODEL, tiny_overrides
from PIL import Image

from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.rewards.wire import (
    decode_binary_request,
    decode_request,
    encode_binary_request,
    encode_request,
)
from unigrpo.tasks import build_task, load_prompt_file


def save_png(path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def cmyk(d) -> None:
    Image.new("CMYK", (8, 8)).save(d / "x.jpg")  # PNG has no CMYK: a JPEG under a .png name (PIL reads content)
    (d / "x.jpg").rename(d / "x.png")

SEEING = ["model.sees_images=true", "model.edits=true"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_images_are_read_relative_to_the_file_and_resized_to_the_model(tmp_path):
    (tmp_path / "img").mkdir()
    save_png(tmp_path / "img" / "a.png", np.full((20, 30, 3), 200, np.uint8))
    Image.new("L", (16, 16), 64).save(tmp_path / "img" / "grey.png")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle", "images": ["img/a.png", "img/grey.png"]},
                                             {"prompt": "a blue square"}])
    prompts = load_prompt_file(path)
    assert prompts[0].image_files == (str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "grey.png"))
    assert prompts[0].metadata["images"] == ["img/a.png", "img/grey.png"]  # the user's field, as written
    assert prompts[0].images is None and prompts[1].image_files == ()  # pixels are read at the model's size

    cfg = load_config(None, [*MODEL, "model.checkpoint=null", *SEEING, "task.kind=prompts", f"task.prompts={path}",
                             "text.max_reasoning_tokens=6"])
    from unigrpo.models import build_model

    model = build_model(cfg, checkpoint=None)
    task = build_task(cfg)
    task.check(model, cfg)
    first = task.train[0]
    assert first.images.shape == (2, 3, 16, 16) and first.metadata["input_images"] is first.images
    assert torch.allclose(first.images[0], torch.full((3, 16, 16), 200 / 255), atol=1e-6)  # flat: resize keeps it
    assert torch.allclose(first.images[1], torch.full((3, 16, 16), 64 / 255))  # grey -> RGB, same size: unchanged
    assert task.train[1].images is None and "input_images" not in task.train[1].metadata


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "image not found: "),
    (lambda d: (d / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "not a readable image"),
    (lambda d: (d / "x.png").write_bytes(b""), "not a readable image"),
    (cmyk, "image mode CMYK is not supported"),
    (lambda d: Image.new("RGBA", (8, 8), (1, 2, 3, 100)).save(d / "x.png"), "transparent pixels"),
    (lambda d: Image.new("I;16", (8, 8)).save(d / "x.png"), "is not supported"),
])
def test_a_bad_image_is_one_line_naming_file_line_and_image_and_nothing_is_written(tmp_path, capsys, make,
                                                                                   message):
    make(tmp_path)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": "a red circle",
                                                                            "images": ["x.png"]}])
    with pytest.raises(ConfigError) as e:
        load_prompt_file(path)
    assert str(e.value).startswith(f"task.prompts: {path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    out = tmp_path / "run"
    assert main(["train", *MODEL, "model.checkpoint=null", *SEEING, "task.kind=prompts", f"task.prompts={path}",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("field", ["x.png", [], [3], [""]])
def test_the_images_field_must_be_a_list_of_paths(tmp_path, field):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle", "images": field}])
    with pytest.raises(ConfigError, match=r"p.jsonl:1: \"images\" must be a non-empty list of image paths"):
        load_prompt_file(path)


def test_images_for_a_model_that_neither_sees_nor_edits_are_refused_at_validate(tmp_path, capsys):
    save_png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle"}, {"prompt": "a red square", "images": ["a.png"]}])
    assert main(["validate", "task.kind=prompts", f"task.prompts={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2 has input images" in err and "neither sees nor edits" in err and len(err.splitlines()) == 1
    assert main(["validate", "task.kind=prompts", f"task.prompts={path}", *MODEL, "model.checkpoint=null",
                 "model.sees_images=true"]) == 0


def test_input_images_cross_the_wire_as_the_same_tensor(tmp_path):
    """Both transports of the unigrpo protocol: npy is lossless, png quantises to 1/255 like the images."""
    images = torch.rand(2, 3, 8, 8)
    inputs = torch.rand(2, 3, 6, 6)
    meta = [{"input_images": inputs, "tag": "a"}, {"tag": "b"}]
    for fmt, tol in (("npy", 0.0), ("png", 0.5 / 255 + 1e-6)):
        for enc, dec in ((encode_request, decode_request), (encode_binary_request, decode_binary_request)):
            _, _, got = dec(enc(images, ["p", "q"], meta, fmt), 8)
            assert got[0]["tag"] == "a" and got[1] == {"tag": "b"}
            assert got[0]["input_images"].shape == (2, 3, 6, 6)
            assert (got[0]["input_images"] - inputs).abs().max() <= tol


def test_a_run_sees_the_images_and_the_reward_reads_them(tmp_path):
    """One real run of a tiny random model that sees and edits: the first PPO ratio is exactly 1 for
    text and image, and every rollout's reward metadata carries the prompt's input images."""
    from testkit import save_tiny_random_model

    ckpt = save_tiny_random_model(MODEL + SEEING, tmp_path / "seeing.safetensors")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        save_png(tmp_path / f"{name}.png", rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "a red circle", "images": ["a.png"], "target": 0.8},
        {"prompt": "two blue squares", "images": ["b.png"], "target": 0.2},
        {"prompt": "a green triangle", "target": 0.5}])
    smooth_reward.SEEN.clear()
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(ckpt, out, *SEEING, "task.kind=prompts", f"task.prompts={train}", "steps=1",
                                      "rewards=[{name: 'smooth_reward:uses_metadata'}]")
            if not a.startswith("task.prompt_pool")]
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    r = next(r for r in rows if "loss/text/first_logp_diff_max" in r)
    assert r["loss/text/first_logp_diff_max"] == 0.0 and r["loss/image/first_logp_diff_max"] == 0.0
    seen = [m for m in smooth_reward.SEEN if "group_index" in m]
    with_images = [m for m in seen if m["line"] in (1, 2)]
    assert with_images and all(m["input_images"].shape == (1, 3, 16, 16) for m in with_images)
    assert all("input_images" not in m for m in seen if m["line"] == 3)
