"""How much the demo's gain varies with the training seed (the evaluation set is the same for all).

Runs `unigrpo train builtin:demo` once per seed (one CPU thread each, `--parallel` at a time),
evaluating every `eval_every` steps from step 0, then writes the held-out accuracy per step and
seed, its mean and standard deviation over seeds, and the gain over the SFT checkpoint
(JSON + Markdown in benchmarks/results/):

    python benchmarks/demo_seeds.py                             # seeds 0-3, 100 steps, eval every 25
    python benchmarks/demo_seeds.py --seeds 0 1 steps=60 eval_every=20
    python benchmarks/demo_seeds.py --collect-only              # re-read finished runs

The evaluation prompts and their noise depend on `eval.seed` only, so step 0 (the SFT checkpoint)
is the same for every seed; the training seed changes the prompts drawn, the reasoning sampled and
the SDE noise of the rollouts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from compare_policies import eval_rows, finish, launch  # same folder: the demo-config run helpers

KEYS = ("eval/accuracy", "eval/reasoning_ok", "eval/accuracy_given_reasoning_ok", "eval/high_freq")
DEFAULT_OVERRIDES = ["steps=100", "eval_every=25"]


def run(seeds: list[int], overrides: list[str], root: Path, parallel: int) -> float:
    """Launch the runs, at most ``parallel`` at once; returns wall minutes."""
    start, started = time.time(), []
    for seed in seeds:
        while sum(p.poll() is None for p, _ in started) >= parallel:
            time.sleep(5)
        out = root / f"seed{seed}"
        started.append((launch(out, [f"seed={seed}", *overrides]), out))
    for p, out in started:
        finish(p, out)
    return (time.time() - start) / 60


def collect(seeds: list[int], root: Path) -> dict:
    """{step: {key: [value per seed]}} over the evaluations every run has."""
    per_seed = {}
    for seed in seeds:
        run_dir = root / f"seed{seed}"
        if not (run_dir / "metrics.jsonl").exists():
            raise SystemExit(f"missing {run_dir / 'metrics.jsonl'}: run without --collect-only first")
        per_seed[seed] = eval_rows(run_dir)
    steps = sorted(set.intersection(*(set(e) for e in per_seed.values())))
    return {s: {k: [per_seed[seed][s].get(k) for seed in seeds] for k in KEYS} for s in steps}


def _mean_sd(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(seeds: list[int], evals: dict) -> str:
    base = evals[min(evals)]["eval/accuracy"]  # step 0: the SFT checkpoint, same for every seed
    lines = ["| step | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean +- sd | gain over SFT (mean, min..max) | description right | image right given description | high_freq |",
             "|---|" + "---|" * (len(seeds) + 5)]
    for step, e in evals.items():
        acc = e["eval/accuracy"]
        m, sd = _mean_sd(acc)
        gains = [a - b for a, b in zip(acc, base)]
        cells = [f"{a:.3f}" for a in acc]
        extra = []
        for k in KEYS[1:]:
            km, _ = _mean_sd(e[k])
            extra.append("-" if km is None else f"{km:.3f}" if k != "eval/high_freq" else f"{km:.4f}")
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {m:.3f} +- {sd:.3f} | "
                     f"{100 * statistics.fmean(gains):+.1f} ({100 * min(gains):+.1f}..{100 * max(gains):+.1f}) | "
                     + " | ".join(extra) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help=f"key=value overrides (default: {' '.join(DEFAULT_OVERRIDES)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--root", default="runs/seeds")
    ap.add_argument("--collect-only", action="store_true", help="only read finished runs under --root")
    args = ap.parse_args()
    if args.parallel < 1:
        ap.error("--parallel must be >= 1")
    overrides = args.overrides or DEFAULT_OVERRIDES
    root = Path(args.root)
    minutes = None if args.collect_only else run(args.seeds, overrides, root, args.parallel)
    evals = collect(args.seeds, root)
    md = table(args.seeds, evals)
    print(md)
    out = Path("benchmarks/results/demo_seeds.json")
    out.write_text(json.dumps({"seeds": args.seeds, "overrides": overrides, "minutes_wall": minutes,
                               "evals": {str(s): e for s, e in evals.items()}}, indent=2))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
