"""How many trajectories does an update need before its gradient is more signal than noise?

    python benchmarks/gradient_snr.py [--batches 8] [--name NAME] [key=value ...]

From the starting policy (configs/demo.yaml: the shipped SFT checkpoint) it rolls out ``--batches``
independent steps of ``prompts_per_step x group_size`` trajectories (the training loop's own
``rollout_step``: reasoning, SDE-window images, reward, group advantages) and computes, for each,
the policy-gradient of the UniGRPO objective at the behaviour policy (ratio 1, no regulariser),
separately for the text expert (GRPO on tokens) and the image expert (FlowGRPO on window steps).

If a batch gradient is ``g_B = mu + noise / sqrt(B)`` (B trajectories, per-trajectory signal
``mu``, noise covariance trace ``sigma^2``), two independent batches have an expected cosine of
about ``B rho^2 / (1 + B rho^2)`` with ``rho^2 = |mu|^2 / sigma^2``. The script measures the mean
pairwise cosine of single batches and of disjoint sums of 2 and 4 batches (B, 2B, 4B), checks
that the three agree with one ``rho^2``, and reports ``B_half = 1 / rho^2``: the trajectories per
update at which signal and noise have equal energy. Far below it, Adam's update direction is
mostly noise.

Writes benchmarks/results/gradient_snr[_NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from unigrpo.config import load_config
from unigrpo.models import load_model
from unigrpo.recipes.train import derived_sizes, micro_batch_loss, rollout_step
from unigrpo.rewards import RewardSet
from unigrpo.utils import dist

OUT = Path(__file__).resolve().parent / "results"


def batch_gradients(model, cfg, step: int, rewards, d, z) -> dict[str, torch.Tensor]:
    """Flat policy gradients {text, image} of one rollout step at the behaviour policy."""
    b = rollout_step(model, cfg, step, rewards, d, z)
    n = len(b.roll)
    for idx in torch.arange(n).split(z.micro_local):
        loss, _ = micro_batch_loss(model, None, b.roll.index(idx), b.adv[idx], cfg, len(idx) / n, len(idx) / n)
        loss.backward()
    grads = {}
    for name, params in (("text", model.text_parameters()), ("image", model.image_parameters())):
        grads[name] = torch.cat([p.grad.flatten().double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                                 for p in params])
    model.zero_grad(set_to_none=True)
    return grads | {"reward": float(b.reward.mean()), "zero_var": float((b.reward.std(1) == 0).float().mean())}


def mean_cosine(gs: list[torch.Tensor]) -> float:
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(gs, 2)]
    return sum(cos) / len(cos)


def snr_table(grads: list[torch.Tensor], traj_per_batch: int) -> list[dict]:
    """Mean pairwise cosine of disjoint sums of m batches, and the rho^2 each implies."""
    rows = []
    for m in (1, 2, 4):
        if len(grads) // m < 2:
            continue
        sums = [sum(grads[i * m:(i + 1) * m]) for i in range(len(grads) // m)]
        c, bsz = mean_cosine(sums), m * traj_per_batch
        rho2 = c / ((1 - c) * bsz) if 0 < c < 1 else float("nan")
        rows.append({"trajectories": bsz, "pairs": len(sums) * (len(sums) - 1) // 2, "cosine": c, "rho2": rho2,
                     "b_half": 1 / rho2 if rho2 > 0 else float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="independent rollout steps (a multiple of 4)")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    cfg = load_config("configs/demo.yaml", ["algo.c_mse=0", "algo.beta_img=0", "algo.text_beta=0", *args.overrides])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = dist.init(cfg.device)[0]
    torch.manual_seed(cfg.seed)
    model = load_model(cfg)
    model.requires_grad_(True)
    z = derived_sizes(cfg, d.world)
    rewards = RewardSet([(r.name, r.weight) for r in cfg.rewards], 0)
    start = time.perf_counter()
    per = [batch_gradients(model, cfg, k, rewards, d, z) for k in range(args.batches)]
    rewards.close()
    result = {
        "config": {"checkpoint": cfg.model.checkpoint, "overrides": args.overrides, "batches": args.batches,
                   "trajectories_per_batch": z.trajectories},
        "reward_mean": sum(p["reward"] for p in per) / len(per),
        "zero_variance_frac": sum(p["zero_var"] for p in per) / len(per),
        "seconds": time.perf_counter() - start,
    }
    for name in ("text", "image"):
        gs = [p[name] for p in per]
        result[name] = {"rows": snr_table(gs, z.trajectories),
                        "grad_norm_per_batch": sum(float(g.norm()) for g in gs) / len(gs)}
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"gradient_snr{'_' + args.name if args.name else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    title = (f"# Gradient signal-to-noise ({z.trajectories} trajectories per batch, {args.batches} batches, "
             f"overrides: {' '.join(args.overrides) or '-'})")
    lines = [title, "",
             "| expert | trajectories per gradient | pairs | mean cosine | rho^2 | B_half = 1/rho^2 |",
             "|---|---|---|---|---|---|"]
    for name in ("text", "image"):
        for r in result[name]["rows"]:
            lines.append(f"| {name} | {r['trajectories']} | {r['pairs']} | {r['cosine']:.3f} | {r['rho2']:.2e} | "
                         f"{r['b_half']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"reward {result['reward_mean']:.3f}, zero-variance groups {result['zero_variance_frac']:.2f}, "
          f"{result['seconds']:.0f} s -> {stem}.json")


if __name__ == "__main__":
    main()
