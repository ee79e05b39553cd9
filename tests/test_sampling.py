"""Deterministic generation/evaluation and the eval / sample CLI on a random tiny checkpoint."""

import json

import pytest
import torch

from unigrpo.algo.schedule import timesteps
from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.rollout import guided_velocity
from unigrpo.sampling import generate, ode_sample

SMALL = ["model.d_text=32", "model.text_layers=1", "model.unet_channels=[16,32,32]", "model.image_size=16"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(load_config(None, SMALL), checkpoint=None).eval()
    torch.nn.init.normal_(m.image.out[-1].weight, std=0.05)  # non-zero velocities for the tests
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    model.save(path)
    return path


def test_ode_sample_is_the_euler_loop(model):
    tokens = model.with_response(model.encode(["a red circle"] * 2), ["a red circle"] * 2)
    _, ctx = model.forward_context(tokens)
    x1 = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    out = ode_sample(model, ctx, 4, 3.0, x_init=x1.clone())
    grid, x = timesteps(4, 3.0), x1.clone()
    with torch.no_grad():
        for k in range(4):
            x = x + (grid[k + 1] - grid[k]) * model.velocity(x, grid[k].expand(2), ctx)
    torch.testing.assert_close(out, x)


def test_cfg_scale_one_is_one_call_and_scale_mixes(model):
    tokens = model.with_response(model.encode(["a red circle"]), ["a red circle"])
    _, ctx = model.forward_context(tokens)
    x, t = torch.randn(1, *model.latent_shape), torch.tensor([0.7])
    null = model.null_context(1)
    with torch.no_grad():
        v_c, v_u = model.velocity(x, t, ctx), model.velocity(x, t, null)
        torch.testing.assert_close(guided_velocity(model, x, t, ctx, null, 1.0), v_c)
        torch.testing.assert_close(guided_velocity(model, x, t, ctx, null, 3.0), v_u + 3.0 * (v_c - v_u))


def test_generate_is_deterministic_and_modes_differ(model):
    prompts = ["a red circle", "two blue squares", "a triangle"]
    a = generate(model, prompts, num_steps=3, seed=5)
    b = generate(model, prompts, num_steps=3, seed=5)
    assert torch.equal(a.images, b.images) and a.reasoning == b.reasoning
    off = generate(model, prompts, thinking=False, num_steps=3, seed=5)
    assert off.reasoning == ["", "", ""]
    given = ["<think> draw exactly what is asked . </think> a red circle"] * 3
    gt = generate(model, prompts, reasoning=given, num_steps=3, seed=5)
    assert all(r.startswith(given[0]) for r in gt.reasoning)
    assert gt.images.shape == (3, 3, 16, 16) and 0 <= gt.images.min() and gt.images.max() <= 1


def test_cli_eval_and_sample(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", *SMALL, "eval.num_prompts=6", "sampler.eval_num_steps=2", "text.max_reasoning_tokens=6"]
    assert main([*args, "--checkpoint", str(checkpoint), "--mode", "all", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| think |" in text and "| gt |" in text and "| no_think |" in text
    metrics = json.loads((out / "think.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] == 6
    assert (out / "gt.png").is_file()
    png = tmp_path / "s.png"
    assert main(["sample", "a square the color of a lemon", "sampler.eval_num_steps=2",
                 "text.max_reasoning_tokens=6", "--checkpoint", str(checkpoint), "--n", "2",
                 "--out", str(png)]) == 0
    assert png.is_file() and "[1]" in capsys.readouterr().out


def test_cli_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("prompt,n,message", [
    ("a square the colour of a lemon", 1, "does not know: colour"),  # British spelling: not in the world
    ("  ", 1, "prompt is empty"),
    ("a red circle", 0, "--n must be >= 1"),
])
def test_cli_sample_bad_input_is_a_clean_error(checkpoint, tmp_path, capsys, prompt, n, message):
    png = tmp_path / "s.png"
    assert main(["sample", prompt, "--checkpoint", str(checkpoint), "--n", str(n), "--out", str(png)]) == 2
    assert message in capsys.readouterr().err and not png.exists()
