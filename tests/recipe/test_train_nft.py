"""`algo.image_objective: nft` (DiffusionNFT) in the recipe: the recorded x0, the step's draws
(keyed, chunking-independent), the first-update check (the implicit policies are the old one),
and `unigrpo train` runs (tiny model; FLUX.2 [klein] tiny pipeline when diffusers is installed)."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODEL, SIZES, tiny_overrides
from safetensors.torch import load_file
from test_train_health import make_rollout
from testkit import documented_metric_patterns

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.recipes import train as T
from unigrpo.recipes.batches import nft_draws, nft_image_loss, nft_num_times

NFT = ["algo.image_objective=nft"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    cfg = load_config(None, tiny_overrides(tiny_checkpoint, tmp_path_factory.mktemp("nft"), *NFT))
    model = build_model(cfg)
    return cfg, model, make_rollout(cfg, model)


def test_x0_is_the_latent_the_image_was_decoded_from(setup):
    _, model, roll = setup
    rnd = roll.rounds[0]
    assert rnd.x0.shape == (len(rnd), *model.latent_shape) and rnd.x0.dtype == torch.float32
    assert torch.equal(model.decode(rnd.x0).cpu(), rnd.images)


def test_draws_take_the_sampler_grid_times_and_do_not_depend_on_the_chunking(setup):
    cfg, model, roll = setup
    n, k = len(roll), nft_num_times(cfg)
    assert k == int(0.99 * cfg.sampler.num_steps)  # upstream: 9 of 10; here 3 of 4
    one = nft_draws(model, roll, cfg, 5, 40, [torch.arange(n)])[0]
    two = nft_draws(model, roll, cfg, 5, 40, list(torch.arange(n).flip(0).split(3)))[0]
    assert torch.equal(one.t, two.t) and torch.equal(one.x_t, two.x_t) and torch.equal(one.t_next, two.t_next)
    # the tiny model's CPU numerics depend on the batch composition (test_train_health): close, not equal
    torch.testing.assert_close(one.v_old, two.v_old, rtol=1e-5, atol=1e-6)
    grid = model.timesteps(cfg.sampler.num_steps, cfg.sampler.shift)
    for i in range(n):
        pos = [int((grid == t).nonzero()) for t in one.t[i]]
        assert len(set(pos)) == k and max(pos) < cfg.sampler.num_steps  # distinct, never t_S = 0
        assert torch.equal(one.t_next[i], grid[torch.tensor(pos) + 1])
    # x_t is the forward process from the recorded x0 with unit-variance fresh noise
    t = one.t[..., None, None, None]
    eps = (one.x_t - (1 - t) * roll.rounds[0].x0[:, None]) / t
    assert abs(float(eps.std()) - 1) < 0.1
    # keyed by (seed, step, trajectory): another step or another first index draws anew
    other = nft_draws(model, roll, cfg, 6, 40, [torch.arange(n)])[0]
    shifted = nft_draws(model, roll, cfg, 5, 41, [torch.arange(n)])[0]
    assert not torch.equal(one.x_t, other.x_t)
    assert torch.equal(shifted.t[:-1], one.t[1:])  # row i of `shifted` is trajectory 41 + i: `one`'s row i + 1


def test_first_update_implicit_policies_equal_the_old_one_and_equal_advantages_give_no_gradient(setup):
    """Draws computed on the very micro-batches training runs: the current velocity equals the old
    one bit for bit (v_old_diff_max == 0), so v+ = v- = v_old, NFT's analogue of a first ratio of 1;
    with every advantage 0 (r = 1/2, groups of equal rewards) the image expert gets no gradient."""
    cfg, model, roll = setup
    chunks = list(torch.arange(len(roll)).split(cfg.algo.micro_batch_trajectories))
    draws = nft_draws(model, roll, cfg, 0, 0, chunks)
    for idx in chunks:
        model.zero_grad(set_to_none=True)
        loss, st = T.micro_batch_loss(model, None, roll.index(idx), torch.zeros(len(idx)), cfg, 1.0, 1.0,
                                      [d.index(idx) for d in draws])
        assert st["loss/image/v_old_diff_max"] == 0.0 and st["loss/image/r_mean"] == 0.5
        assert st["loss/text/logp_diff_max"] == 0.0  # the text side's first ratio is still exactly 1
        loss.backward()
        image = [p for _, p in model.parameter_groups()["image"]]
        assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in image)
    # a spread of advantages does move the image expert
    model.zero_grad(set_to_none=True)
    idx = chunks[0]
    rnd = roll.index(idx).rounds[0]
    ctx = model.detach_context(model.forward_context(rnd.tokens, cfg.text.temperature)[1])
    loss, _ = nft_image_loss(model, None, rnd, draws[0].index(idx), ctx, None,
                             torch.linspace(-1, 1, len(idx)), cfg)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for _, p in model.parameter_groups()["image"])


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("nft_run")
    assert main(["train", *tiny_overrides(tiny_checkpoint, out, *NFT, "steps=1", "eval_every=100")]) == 0
    return out


def test_cli_one_nft_step(run, tiny_checkpoint):
    """`unigrpo train algo.image_objective=nft`: both experts move, the first update's checks are
    exact (text ratio 1, image velocity = the old one), later updates did move, every key documented."""
    before, after = load_file(tiny_checkpoint), load_file(run / "final.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("text.") for k in changed) and any(k.startswith("image.") for k in changed)
    (row,) = [r for r in rows(run) if "reward/mean" in r]
    assert all(math.isfinite(v) for v in row.values())
    assert row["loss/text/first_logp_diff_max"] == 0.0 and row["loss/image/first_v_old_diff_max"] == 0.0
    assert row["loss/image/v_old_diff_max"] > 0.0  # later minibatches moved away from the old policy
    assert "loss/image/ratio_mean" not in row and row["loss/image/grad_norm"] > 0
    assert row["loss/image/mse"] > 0  # the velocity MSE vs the reference is still there (c_mse)
    pats = documented_metric_patterns()
    assert not [k for k in row if k != "step" and not any(p.match(k) for p in pats)]


def test_nft_with_a_deterministic_sampler_and_the_shipped_config(tiny_checkpoint, tmp_path):
    """NFT needs no log-probs: an ODE sampler trains (FlowGRPO refuses it); builtin:unigrpo_nft runs."""
    args = [*MODEL, *SIZES, "steps=1", "eval_every=100", f"model.checkpoint={tiny_checkpoint}"]
    assert main(["train", *args, *NFT, "sampler.kind=ode", f"output_dir={tmp_path / 'ode'}"]) == 0
    assert "loss/image/kl" not in rows(tmp_path / "ode")[0]  # no step variance: no latent KL
    assert main(["validate", "builtin:unigrpo_nft"]) == 0
    assert main(["train", "builtin:unigrpo_nft", *args, f"output_dir={tmp_path / 'shipped'}"]) == 0
    assert "loss/image/r_mean" in rows(tmp_path / "shipped")[0]


def test_resume_equals_uninterrupted(tiny_checkpoint, tmp_path):
    """The draws are keyed by (seed, step, trajectory): 1 step + --resume 1 step == 2 steps, bitwise."""
    args = [*tiny_overrides(tiny_checkpoint, tmp_path, *NFT, "eval_every=100", "save_every=1")]
    assert main(["train", *args, f"output_dir={tmp_path / 'a'}", "steps=2"]) == 0
    assert main(["train", *args, f"output_dir={tmp_path / 'b'}", "steps=1"]) == 0
    assert main(["train", *args, f"output_dir={tmp_path / 'b'}", "steps=2", "--resume"]) == 0
    a, b = load_file(tmp_path / "a" / "final.safetensors"), load_file(tmp_path / "b" / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _models_conftest():
    """tests/models/conftest.py under another module name (two modules named conftest clash)."""
    path = Path(__file__).resolve().parents[1] / "models" / "conftest.py"
    spec = importlib.util.spec_from_file_location("models_conftest_for_nft", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_cli_one_nft_step_on_tiny_flux2(tmp_path):
    """model.kind=hf (FLUX.2 [klein] tiny pipeline, LoRA on both sides): NFT needs only velocity and
    the context, and the first update's checks are exact there too."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    mc = _models_conftest()
    os.environ["HF_HUB_OFFLINE"] = "1"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in mc.HF_PROMPTS[:2]))
    out = tmp_path / "run"
    assert main(["train", *mc.hf_overrides(mc.tiny_flux2_dir()), *NFT, "task.kind=prompts", f"task.prompts={prompts}",
                 "rewards=[{name: 'smooth_reward:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
                 "algo.trajectories_per_minibatch=2", "algo.micro_batch_trajectories=2", "sampler.num_steps=3",
                 "sampler.window_range=[0,3]", "sampler.window_size=1", "sampler.eval_num_steps=2",
                 "eval.num_prompts=2", "eval.grid_prompts=0", "text.max_reasoning_tokens=4", "threads=1",
                 "optim.lr_text=1e-3", "optim.lr_image=1e-3", "steps=1", "eval_every=100", f"output_dir={out}"]) == 0
    (row,) = [r for r in rows(out) if "reward/mean" in r]
    assert row["loss/text/first_logp_diff_max"] == 0.0 and row["loss/image/first_v_old_diff_max"] == 0.0
    assert math.isfinite(row["loss/image/loss"]) and row["loss/image/grad_norm"] > 0


def test_latent_kl_at_every_grid_time_with_cps_is_finite(tiny_checkpoint, tmp_path):
    """Every grid time trained (fraction 1): cps's last step (t_next = 0) has no variance; its
    latent KL counts 0 instead of dividing by 0. Policy == reference here: MSE and KL are ~0."""
    cfg = load_config(None, tiny_overrides(tiny_checkpoint, tmp_path, *NFT, "sampler.kind=cps",
                                           "algo.nft_timestep_fraction=1.0", "algo.beta_img=0.1"))
    model = build_model(cfg)
    ref = model.reference()
    roll = make_rollout(cfg, model)
    idx = torch.arange(len(roll))[:2]
    draws = nft_draws(model, roll, cfg, 0, 0, [idx])
    assert (draws[0].t_next[0] == 0).any()  # the last step is among the trained times
    loss, st = T.micro_batch_loss(model, ref, roll.index(idx), torch.tensor([1.0, -1.0]), cfg, 1.0, 1.0,
                                  [d.index(idx) for d in draws])
    assert math.isfinite(float(loss.detach())) and 0.0 <= st["loss/image/kl"] < 1e-8 and 0.0 <= st["loss/image/mse"] < 1e-11
