"""UniGRPO vs its single-modality baselines from the same SFT checkpoint, same budget and seed.

Runs `unigrpo train builtin:demo` once per variant (in parallel, one CPU thread each), then
reads each run's held-out evaluations from metrics.jsonl and writes a table (JSON + Markdown):

    python benchmarks/compare_policies.py                      # 150 steps, all variants
    python benchmarks/compare_policies.py steps=60 --only textgrpo imageonly
    python benchmarks/compare_policies.py --collect-only       # re-read finished runs
    python benchmarks/compare_policies.py --only textgrpo imageonly   # unigrpo row from another run:
    ln -s ../long runs/compare/unigrpo && python benchmarks/compare_policies.py --collect-only --max-step 150

Variants (150 steps unless overridden; all else = builtin:demo: no CFG, velocity MSE, same lr, window, seed):
  unigrpo    text + image policy (the method)
  textgrpo   text policy only (image expert frozen; builtin:textgrpo, docs/training.md "Baselines and ablations")
  imageonly  image policy only (text expert frozen; FlowGRPO objective under UniGRPO's settings)
The original FlowGRPO recipe (CFG 3 in rollout and training, latent KL) is builtin:flowgrpo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "unigrpo": [],
    "textgrpo": ["algo.train_image=false"],
    "imageonly": ["algo.train_text=false"],
}
KEYS = ("eval/accuracy", "eval/accuracy_direct", "eval/accuracy_reasoning", "eval/reasoning_ok",
        "eval/accuracy_given_reasoning_ok", "eval/saturation", "eval/background_fraction", "eval/high_freq")


def launch(out: Path, overrides: list[str]) -> subprocess.Popen:
    """Start `unigrpo train builtin:demo` into ``out`` (1 thread, evaluation at step 0, no
    checkpoints, then ``overrides``); its output goes to ``out/stdout.log``."""
    cmd = [sys.executable, "-m", "unigrpo.cli", "train", "builtin:demo", f"output_dir={out}",
           "threads=1", "eval.at_start=true", "save_every=0", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd[2:]), flush=True)
    with open(out / "stdout.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def finish(p: subprocess.Popen, out: Path) -> None:
    """Wait for a run started by :func:`launch`; stop the benchmark if it failed."""
    if p.wait() != 0:
        raise SystemExit(f"{out} failed: see {out / 'stdout.log'}")


def eval_rows(run_dir: Path, max_step: int | None = None) -> dict[int, dict]:
    """The evaluation rows of a run's metrics.jsonl, by step (up to ``max_step``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "eval/accuracy" in r and (max_step is None or r["step"] <= max_step)}


def run_all(names: list[str], overrides: list[str], root: Path) -> dict[str, float]:
    start = time.time()
    procs = {name: launch(root / name, ["steps=150", *VARIANTS[name], *overrides]) for name in names}
    minutes = {}
    for name, p in procs.items():
        finish(p, root / name)
        minutes[name] = (time.time() - start) / 60
    return minutes


def collect(names: list[str], root: Path, max_step: int | None = None) -> dict:
    result = {}
    for name in names:
        evals = {s: {k: r.get(k) for k in KEYS} for s, r in eval_rows(root / name, max_step).items()}
        result[name] = {"evals": evals, "last_step": max(evals)}
    return result


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(result: dict) -> str:
    steps = sorted({s for r in result.values() for s in r["evals"]})
    head = "| variant | " + " | ".join(f"step {s}" for s in steps) + " | description right (last) | image right given description (last) | high_freq (last) |\n"
    head += "|---|" + "---|" * (len(steps) + 3) + "\n"
    lines = []
    for name, r in result.items():
        cells = [f"{r['evals'][s]['eval/accuracy']:.3f}" if s in r["evals"] else "-" for s in steps]
        last = r["evals"][r["last_step"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(last.get('eval/reasoning_ok'))} | "
                     f"{_fmt(last.get('eval/accuracy_given_reasoning_ok'))} | {_fmt(last.get('eval/high_freq'), 4)} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every variant (e.g. steps=60)")
    ap.add_argument("--only", nargs="+", default=list(VARIANTS),
                    help=f"variants to run ({', '.join(VARIANTS)}); with --collect-only, any run folders under --root")
    ap.add_argument("--root", default="runs/compare")
    ap.add_argument("--collect-only", action="store_true", help="only read finished runs under --root")
    ap.add_argument("--max-step", type=int, help="ignore evaluations after this step (e.g. a longer run)")
    args = ap.parse_args()
    root = Path(args.root)
    if not args.collect_only and (unknown := set(args.only) - set(VARIANTS)):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    minutes = {} if args.collect_only else run_all(args.only, args.overrides, root)
    result = collect(args.only, root, args.max_step)
    for name, m in minutes.items():
        result[name]["minutes_wall_parallel"] = m
    md = table(result)
    print(md)
    out = Path("benchmarks/results/compare_policies.json")
    out.write_text(json.dumps({"overrides": args.overrides, "runs": result}, indent=2))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
