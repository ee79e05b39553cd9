"""benchmarks/gradient_snr.py: the signal-to-noise estimate on synthetic gradients of known SNR,
and one real (tiny) run through the training loop's rollout."""

import importlib.util
from pathlib import Path

import pytest
import torch

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("gradient_snr", _BENCH / "gradient_snr.py")
gradient_snr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gradient_snr)


def test_snr_recovers_a_known_rho2():
    # batch gradient of B trajectories = mu + noise / sqrt(B); per-trajectory rho^2 = |mu|^2 / sigma^2
    torch.manual_seed(0)
    dim, b, rho2 = 200_000, 64, 4e-3
    mu = torch.randn(dim, dtype=torch.float64)
    mu *= (rho2 * dim) ** 0.5 / mu.norm()  # |mu|^2 = rho2 * sigma^2 with sigma^2 = dim (unit noise)
    r = gradient_snr.snr([mu + torch.randn(dim, dtype=torch.float64) / b**0.5 for _ in range(16)], b)
    f = b * rho2 / (1 + b * rho2)  # 0.204
    assert abs(r["signal_frac"] - f) < 3 * r["signal_frac_se"] + 1e-3
    assert 0 < r["signal_frac_se"] < 0.05
    assert abs(r["b_half"] - 1 / rho2) < 0.1 / rho2
    lo, hi = r["b_half_range_2se"]
    assert lo < 1 / rho2 < hi


def test_pure_noise_has_no_signal():
    torch.manual_seed(1)
    r = gradient_snr.snr([torch.randn(50_000, dtype=torch.float64) for _ in range(8)], 16)
    assert abs(r["signal_frac"]) < 3 * r["signal_frac_se"] + 1e-3


@pytest.mark.parametrize("objective", ["flowgrpo", "nft"])
def test_batch_gradients_split_text_and_image(objective):
    from unigrpo.config import load_config
    from unigrpo.models import build_model
    from unigrpo.recipes.train import derived_sizes
    from unigrpo.rewards import RewardSet
    from unigrpo.utils import dist

    cfg = load_config("builtin:demo",
                      ["algo.c_mse=0", "algo.prompts_per_step=2", "algo.group_size=4",
                       "algo.trajectories_per_minibatch=8", "algo.micro_batch_trajectories=4",
                       "sampler.num_steps=4", "sampler.window_size=2", "sampler.window_range=[0,3]",
                       f"algo.image_objective={objective}"])
    model = build_model(cfg).requires_grad_(True)
    d = dist.init("cpu")[0]
    rewards = RewardSet([("shapes", 1.0)], 0)
    z = derived_sizes(cfg, 1)
    g = gradient_snr.batch_gradients(model, cfg, 0, rewards, d, z, "batch")
    per_group = gradient_snr.batch_gradients(model, cfg, 0, rewards, d, z, "group")
    rewards.close()
    assert len(g["text"]) == len(g["image"]) == 1 and len(per_group["image"]) == 2  # 2 prompts = 2 groups
    assert g["text"][0].numel() == sum(p.numel() for p in (p for _, p in model.parameter_groups()['text']))
    assert g["image"][0].numel() == sum(p.numel() for p in (p for _, p in model.parameter_groups()['image']))
    assert all(torch.isfinite(v[0]).all() for v in (g["text"], g["image"]))
    assert all(p.grad is None for p in model.parameters())  # left clean for the next unit
    assert g["zero_var"] < 1  # (seeded) some group has reward variance, so both experts get a gradient
    assert g["text"][0].norm() > 0 and g["image"][0].norm() > 0
    # the batch gradient is the mean of its groups' gradients (each a mean over its trajectories)
    for name in ("text", "image"):
        mean = sum(per_group[name]) / 2
        torch.testing.assert_close(g[name][0], mean, rtol=1e-3, atol=1e-6 * float(mean.abs().max()))
