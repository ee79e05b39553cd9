"""How many trajectories does an update need before its gradient is more signal than noise?

    python benchmarks/gradient_snr.py [--batches 8] [--name NAME] [key=value ...]

From the starting policy (builtin:demo: the shipped SFT checkpoint) it rolls out ``--batches``
independent steps of ``prompts_per_step x group_size`` trajectories (the training loop's own
``rollout_step``: reasoning, SDE-window images, reward, group advantages) and computes the policy
gradient of the UniGRPO objective at the behaviour policy (ratio 1, no regulariser), separately
for the text expert (GRPO on tokens) and the image expert (FlowGRPO on window steps, or the
DiffusionNFT loss at its forward-noised states with ``algo.image_objective=nft``), per
independent unit: each prompt's group (``--unit group``, default: many pairs, a tight estimate)
or each step's whole batch (``--unit batch``).

If a unit's gradient is ``g = mu + noise`` (B trajectories; per-trajectory signal ``mu``, noise of
total variance ``sigma^2 / B``), independent units give ``E<g_i, g_j> = |mu|^2`` and
``E|g|^2 = |mu|^2 + sigma^2 / B``. The script reports the signal fraction
``f = mean_{i != j} <g_i, g_j> / mean |g_i|^2`` (its standard error by jackknife over units), the
per-trajectory ``rho^2 = |mu|^2 / sigma^2 = f / ((1 - f) B)`` and ``B_half = 1 / rho^2``: the
trajectories per update at which signal and noise have equal energy. Far below it, each update's
direction is mostly noise (Adam's momentum averages over ~10 updates, no more).

Writes benchmarks/results/gradient_snr[_NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.recipes.batches import nft_draws
from unigrpo.recipes.train import derived_sizes, micro_batch_loss, rollout_step
from unigrpo.rewards import RewardSet
from unigrpo.tasks import build_task
from unigrpo.utils import dist

OUT = Path(__file__).resolve().parent / "results"


def _take_grads(model) -> dict[str, torch.Tensor]:
    """The accumulated gradients as flat float64 vectors {text, image}; clears them for the next unit."""
    out = {}
    for name, named in model.parameter_groups().items():
        out[name] = torch.cat([p.grad.flatten().double() if p.grad is not None
                               else torch.zeros(p.numel(), dtype=torch.float64) for _, p in named])
    model.zero_grad(set_to_none=True)
    return out


def batch_gradients(model, cfg, step: int, rewards, d, z, unit: str = "batch") -> dict:
    """Policy gradients at the behaviour policy of one rollout step: {"text": [...], "image": [...]}
    flat vectors, one for the whole batch (``unit="batch"``) or one per group (``"group"``: the
    groups of a step are independent units too, which gives many more pairs per trajectory)."""
    b = rollout_step(model, build_task(cfg), cfg, step, rewards, d, z)
    n, g = len(b.roll), cfg.algo.group_size
    units = [torch.arange(n)] if unit == "batch" else list(torch.arange(n).split(g))
    out = {"text": [], "image": []}
    draws = None  # algo.image_objective=nft: the step's forward-noised states and old velocities
    if cfg.algo.image_objective == "nft":
        draws = nft_draws(model, b.roll, cfg, step, 0, [r for rows in units for r in rows.split(z.micro_local)])
    for rows in units:
        for idx in rows.split(z.micro_local):
            w = len(idx) / len(rows)
            nft = None if draws is None else [d.index(idx) for d in draws]
            loss, _ = micro_batch_loss(model, None, b.roll.index(idx), b.adv[idx], cfg, w, w, nft=nft)
            loss.backward()
        for name, grad in _take_grads(model).items():
            out[name].append(grad)
    return out | {"reward": float(b.reward.mean()), "zero_var": float((b.reward.std(1) == 0).float().mean())}


def _fraction(gram: torch.Tensor) -> float:
    """Unbiased ``|mu|^2 / E|g|^2`` from the Gram matrix [K, K] of K independent units' gradients:
    mean dot product of distinct units over their mean squared norm."""
    k = gram.shape[0]
    cross = (gram.sum() - gram.diagonal().sum()) / (k * (k - 1))  # E<g_i, g_j> = |mu|^2 (independent)
    return float(cross / gram.diagonal().mean())


def snr(grads: list[torch.Tensor], traj_per_unit: int) -> dict:
    """Signal fraction f of one unit's gradient (jackknife standard error over units) and the
    per-trajectory ``rho^2 = f / ((1 - f) B)``; ``B_half = 1 / rho^2`` (nan where f <= 0)."""
    g = torch.stack(grads)
    gram, k = g @ g.t(), len(grads)
    f = _fraction(gram)
    keep = [[j for j in range(k) if j != i] for i in range(k)]
    loo = torch.tensor([_fraction(gram[r][:, r]) for r in keep], dtype=torch.float64)
    se = float(((k - 1) / k * ((loo - loo.mean()) ** 2).sum()).sqrt())

    def b_half(x: float) -> float:
        return traj_per_unit * (1 - x) / x if 0 < x < 1 else float("nan")

    return {"trajectories": traj_per_unit, "units": k, "signal_frac": f, "signal_frac_se": se,
            "rho2": f / ((1 - f) * traj_per_unit) if 0 < f < 1 else float("nan"),
            "b_half": b_half(f), "b_half_range_2se": [b_half(f + 2 * se), b_half(f - 2 * se)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="independent rollout steps")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--unit", choices=["group", "batch"], default="group",
                    help="independent unit of the estimate: one prompt's group (default) or a whole step's batch")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    cfg = load_config("builtin:demo", ["algo.c_mse=0", "algo.beta_img=0", "algo.text_beta=0", *args.overrides])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = dist.init(cfg.device)[0]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    model.requires_grad_(True)
    z = derived_sizes(cfg, d.world)
    rewards = RewardSet(cfg.rewards, 0)
    start = time.perf_counter()
    per = [batch_gradients(model, cfg, k, rewards, d, z, args.unit) for k in range(args.batches)]
    per_unit = z.trajectories if args.unit == "batch" else cfg.algo.group_size
    rewards.close()
    result = {
        "config": {"checkpoint": cfg.model.checkpoint, "overrides": args.overrides, "batches": args.batches,
                   "trajectories_per_batch": z.trajectories, "unit": args.unit},
        "reward_mean": sum(p["reward"] for p in per) / len(per),
        "zero_variance_frac": sum(p["zero_var"] for p in per) / len(per),
        "seconds": time.perf_counter() - start,
    }
    for name in ("text", "image"):
        gs = [g for p in per for g in p[name]]
        result[name] = snr(gs, per_unit)
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"gradient_snr{'_' + args.name if args.name else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    title = (f"# Gradient signal-to-noise ({args.batches} batches of {z.trajectories} trajectories, unit: {args.unit} "
             f"of {per_unit} trajectories, "
             f"overrides: {' '.join(args.overrides) or '-'})")
    lines = [title, "",
             "| expert | signal fraction of one unit's gradient (+- se) | B_half = 1/rho^2 | B_half, f +- 2 se |",
             "|---|---|---|---|"]
    for name in ("text", "image"):
        r = result[name]
        lo, hi = r["b_half_range_2se"]
        lines.append(f"| {name} | {r['signal_frac']:.3f} +- {r['signal_frac_se']:.3f} | {r['b_half']:.0f} | "
                     f"{lo:.0f} .. {hi:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"reward {result['reward_mean']:.3f}, zero-variance groups {result['zero_variance_frac']:.2f}, "
          f"{result['seconds']:.0f} s -> {stem}.json")


if __name__ == "__main__":
    main()
