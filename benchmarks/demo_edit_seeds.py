"""The editing demo over training seeds: before / after held-out edit accuracy, mean and spread.

Runs `unigrpo demo builtin:demo_edit` once per seed (one CPU thread each, `--parallel` at a time)
into ROOT/seedN, then reads each run's `eval/before.json` / `eval/after.json` and writes a table
(overall, direct, reasoning-required, per category, preserved, and where the gain comes from: the
input seen right, the result described right, the image right given a right description) as
JSON + Markdown in benchmarks/results/:

    python benchmarks/demo_edit_seeds.py                          # seeds 0 1 2 into runs/demo_edit_seeds
    python benchmarks/demo_edit_seeds.py --seeds 0 1 2 steps=80   # overrides go to every run
    python benchmarks/demo_edit_seeds.py --collect-only --root runs/demo_edit_seeds

The evaluation prompts and noise depend on `eval.seed` only: "before" is the same for every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("accuracy", "accuracy_direct", "accuracy_reasoning", "preserved", "score", "seen_ok", "description_ok",
        "description_ok_reasoning", "accuracy_given_description_ok")


def run(seeds: list[int], overrides: list[str], root: Path, parallel: int) -> float:
    start, procs = time.time(), []
    for seed in seeds:
        while sum(p.poll() is None for p in procs) >= parallel:
            time.sleep(5)
        out = root / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "unigrpo.cli", "demo", "builtin:demo_edit", f"seed={seed}", f"output_dir={out}",
               *overrides]
        procs.append(subprocess.Popen(cmd, stdout=open(out / "demo.txt", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a demo run failed: {p.args}")
    return (time.time() - start) / 60


def collect(root: Path, seeds: list[int]) -> dict:
    runs = {s: {k: json.loads((root / f"seed{s}" / "eval" / f"{k}.json").read_text()) for k in ("before", "after")}
            for s in seeds}
    before = runs[seeds[0]]["before"]
    cats = sorted(before["categories"])

    def summary(values: list[float]) -> dict:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    out = {"seeds": seeds, "n_prompts": before.get("n", None), "before": {k: before[k] for k in KEYS if k in before},
           "after": {k: summary([runs[s]["after"][k] for s in seeds]) for k in KEYS if k in before},
           "categories": {c: {"before": before["categories"][c]["accuracy"],
                              "after": summary([runs[s]["after"]["categories"][c]["accuracy"] for s in seeds])}
                          for c in cats}}
    return out


def markdown(res: dict, command: str) -> str:
    rows = ["| | SFT (before) | UniGRPO (after), mean +- std over seeds | per seed |", "|---|---|---|---|"]
    for k, v in res["after"].items():
        rows.append(f"| {k} | {res['before'][k]:.3f} | {v['mean']:.3f} +- {v['std']:.3f} | "
                    + ", ".join(f"{x:.3f}" for x in v["values"]) + " |")
    rows += ["", "| category (strict accuracy) | SFT (before) | after, mean +- std | per seed |", "|---|---|---|---|"]
    for c, v in res["categories"].items():
        a = v["after"]
        rows.append(f"| {c} | {v['before']:.3f} | {a['mean']:.3f} +- {a['std']:.3f} | "
                    + ", ".join(f"{x:.3f}" for x in a["values"]) + " |")
    return f"# builtin:demo_edit over seeds {res['seeds']}\n\n`{command}`\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="runs/demo_edit_seeds")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--name", default="demo_edit_seeds", help="results file stem in benchmarks/results/")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.root)
    if not args.collect_only:
        print(f"{run(args.seeds, args.overrides, root, args.parallel):.1f} min")
    res = collect(root, args.seeds)
    command = "python benchmarks/demo_edit_seeds.py " + " ".join(sys.argv[1:])
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(res, indent=2))
    text = markdown(res, command)
    (HERE / "results" / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
