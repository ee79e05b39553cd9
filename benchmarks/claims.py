"""The UniGRPO paper's claims in miniature: every variant from the shipped SFT checkpoint, at the same
number of trajectories and updates, several seeds, each evaluated with / without thinking and
with / without evaluation CFG. Writes JSON + Markdown to benchmarks/results/ and learning curves
to docs/assets/:

    python benchmarks/claims.py                          # all rows, seeds 0 1 2, 25 steps
    python benchmarks/claims.py --rows unigrpo textgrpo --seeds 0 steps=10
    python benchmarks/claims.py --collect-only           # re-read finished runs, rewrite the tables
    python benchmarks/claims.py --smoke                  # 2 steps, 1 seed, 16 eval prompts (the test)

Budget (every row the same): `builtin:demo` with `steps=25` (half the demo's 50: over 3 seeds the
held-out accuracy at step 25 is within noise of step 50, benchmarks/results/demo_seeds.md), i.e.
25 x 8 prompts x 8 = 1,600 trajectories and 25 x 8 = 200 updates per run. Rows (all else =
builtin:demo: CFG-free, velocity MSE 1.5e-5, no latent KL, the same learning rates and window):

  sft             the shipped SFT checkpoint, untrained (seed-independent)
  flowgrpo        image only, CFG 3 in rollout and training, latent KL 0.04 (the original method)
  textgrpo        text only (image expert frozen)
  unigrpo         the paper's defaults
  unigrpo_cfg     + CFG 3 in rollout and training
  unigrpo_kl      latent KL 0.04 instead of the velocity MSE
  unigrpo_noreg   no image regulariser
  unigrpo_nft     DiffusionNFT as the image objective (builtin:unigrpo_nft's keys)

Each trained run is one `unigrpo train` process (one CPU thread, `--parallel` at a time); its
final weights are then evaluated on the test split (256 prompts, 20 ODE steps, the same noise for
every run) in 4 settings: thinking on / off x evaluation CFG 1 / 3.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS: dict[str, list[str] | None] = {
    "sft": None,
    "flowgrpo": ["algo.train_text=false", "sampler.cfg_scale=3", "algo.c_mse=0", "algo.beta_img=0.04"],
    "textgrpo": ["algo.train_image=false"],
    "unigrpo": [],
    "unigrpo_cfg": ["sampler.cfg_scale=3"],
    "unigrpo_kl": ["algo.c_mse=0", "algo.beta_img=0.04"],
    "unigrpo_noreg": ["algo.c_mse=0"],
    "unigrpo_nft": ["algo.image_objective=nft"],
}
SETTINGS = {"think_cfg1": ("think", 1.0), "nothink_cfg1": ("no_think", 1.0),
            "think_cfg3": ("think", 3.0), "nothink_cfg3": ("no_think", 3.0)}
KEYS = ("accuracy", "accuracy_direct", "accuracy_reasoning", "reasoning_ok", "accuracy_given_reasoning_ok")
BUDGET = ["steps=25"]
SMOKE = ["steps=2", "algo.prompts_per_step=2", "algo.group_size=4", "algo.trajectories_per_minibatch=8",
         "algo.micro_batch_trajectories=8", "eval.num_prompts=16", "sampler.eval_num_steps=4"]


def train_cmd(out: Path, row: str, seed: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "unigrpo.cli", "train", "builtin:demo", f"output_dir={out}", f"seed={seed}",
            "threads=1", "eval_every=0", "save_every=0", *ROWS[row], *overrides]


def evaluate(run: Path, overrides: list[str]) -> dict:
    """The 4 evaluation settings of ``run``'s final weights (the SFT checkpoint for ``sft``):
    {setting: metrics}, also written to ``run/claims_eval.json``."""
    import torch

    from unigrpo.config import load_config
    from unigrpo.models import build_model
    from unigrpo.tasks.shapes import eval_tasks, evaluate_model

    torch.set_num_threads(1)
    cfg = load_config("builtin:demo", ["threads=1", *overrides])
    final = run / "final.safetensors"
    model = (build_model(cfg, checkpoint=str(final)) if final.exists() else build_model(cfg)).eval()
    tasks = eval_tasks(cfg)
    result = {}
    for name, (mode, scale) in SETTINGS.items():
        metrics, _ = evaluate_model(model, tasks, cfg, mode, cfg_scale=scale)
        result[name] = {k: metrics[k] for k in KEYS if k in metrics}
        result[name]["categories"] = {c: r["accuracy"] for c, r in metrics["categories"].items()}
    (run / "claims_eval.json").write_text(json.dumps(result, indent=2))
    return result


def job(root: Path, row: str, seed: int, overrides: list[str]) -> tuple[Path, list[list[str]]]:
    """The commands of one (row, seed): train (not for sft), then evaluate."""
    out = root / row / (f"seed{seed}" if ROWS[row] is not None else "all")
    ev = [sys.executable, str(Path(__file__).resolve()), "--evaluate", str(out), *overrides]
    return out, ([] if ROWS[row] is None else [train_cmd(out, row, seed, overrides)]) + [ev]


def run_jobs(jobs: list[tuple[Path, list[list[str]]]], parallel: int) -> None:
    """Each job's commands in order (a shell `&&` chain), at most ``parallel`` jobs at once; output
    to ``out/stdout.log``; stops at the first failure."""
    running: list[tuple[subprocess.Popen, Path]] = []

    def reap(block: bool) -> None:
        for p, out in list(running):
            if block or p.poll() is not None:
                if p.wait() != 0:
                    raise SystemExit(f"{out} failed: see {out / 'stdout.log'}")
                running.remove((p, out))
                print(f"done {out}", flush=True)

    for out, cmds in jobs:
        while len(running) >= parallel:
            time.sleep(2)
            reap(False)
        out.mkdir(parents=True, exist_ok=True)
        script = " && ".join(shlex.join(c) for c in cmds)  # POSIX quoting: bash runs it
        print("$", script, flush=True)
        with open(out / "stdout.log", "w") as log:
            running.append((subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT), out))
    while running:
        reap(True)


def _train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "reward/mean" in r] if path.exists() else []


def collect(root: Path, rows: list[str], seeds: list[int]) -> dict:
    """{row: {setting: {key: [per seed]}, "step_s": [...], "curve": [...]}} of the finished runs."""
    out = {}
    for row in rows:
        runs = [root / row / "all"] if ROWS[row] is None else [root / row / f"seed{s}" for s in seeds]
        runs = [r for r in runs if (r / "claims_eval.json").exists()]
        if not runs:
            continue
        evals = [json.loads((r / "claims_eval.json").read_text()) for r in runs]
        res = {"n": len(runs), "settings": {}}
        for name in SETTINGS:
            res["settings"][name] = {k: [e[name][k] for e in evals if k in e[name]] for k in KEYS}
            cats = sorted(evals[0][name]["categories"])
            res["settings"][name]["categories"] = {c: [e[name]["categories"][c] for e in evals] for c in cats}
        curves = [_train_rows(r) for r in runs]
        if any(curves):
            res["step_s"] = [statistics.fmean(x["perf/step_s"] for x in c) for c in curves if c]
            res["curves"] = [[(x["step"], x["reward/mean"], x["perf/step_s"]) for x in c] for c in curves]
        out[row] = res
    return out


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} +- {sd:.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def tables(res: dict) -> str:
    lines = [("| row | seeds | think, CFG 1 | no think, CFG 1 | think, CFG 3 | no think, CFG 3 | "
             "description right | image right given description | s / step |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for row, r in res.items():
        s = r["settings"]
        step = f"{statistics.fmean(r['step_s']):.2f}" if r.get("step_s") else "-"
        lines.append(f"| {row} | {r['n']} | " + " | ".join(_ms(s[k]["accuracy"]) for k in SETTINGS)
                     + f" | {_ms(s['think_cfg1']['reasoning_ok'])} | "
                     f"{_ms(s['think_cfg1']['accuracy_given_reasoning_ok'])} | {step} |")
    lines += ["", ("Thinking on vs off (CFG 1), on the prompts that state everything (direct) and on those that "
              "need world knowledge (reasoning-required):"), "",
              "| row | direct, think | direct, no think | reasoning-required, think | reasoning-required, no think |",
              "|---|---|---|---|---|"]
    for row, r in res.items():
        s = r["settings"]
        lines.append(f"| {row} | {_ms(s['think_cfg1']['accuracy_direct'])} | {_ms(s['nothink_cfg1']['accuracy_direct'])} | "
                     f"{_ms(s['think_cfg1']['accuracy_reasoning'])} | {_ms(s['nothink_cfg1']['accuracy_reasoning'])} |")
    cats = next(iter(res.values()))["settings"]["think_cfg1"]["categories"]
    lines += ["", "Per category (thinking on, CFG 1; mean over seeds):", "",
              "| row | direct | reasoning-required | " + " | ".join(cats) + " |",
              "|---|---|---|" + "---|" * len(cats)]
    for row, r in res.items():
        s = r["settings"]["think_cfg1"]
        mean = lambda xs: f"{statistics.fmean(xs):.3f}" if xs else "-"
        lines.append(f"| {row} | {mean(s['accuracy_direct'])} | {mean(s['accuracy_reasoning'])} | "
                     + " | ".join(mean(s["categories"][c]) for c in cats) + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Training reward (mean over seeds) vs step and vs wall-clock, one line per trained row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row, r in res.items():
        curves = [c for c in r.get("curves", []) if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = [c[0] for c in curves[0][:n]]
        reward = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        wall = [statistics.fmean(sum(x[2] for x in c[: i + 1]) for c in curves) / 60 for i in range(n)]
        a.plot(steps, reward, label=row)
        b.plot(wall, reward, label=row)
    a.set(xlabel="step", ylabel="training reward (rollout mean)", title="reward vs step")
    b.set(xlabel="wall-clock minutes (1 CPU thread)", title="reward vs wall-clock")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run (after the budget)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=Path("runs/claims"))
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--collect-only", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 tiny steps, 16 eval prompts: checks the pipeline")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "claims")
    ap.add_argument("--evaluate", type=Path, help=argparse.SUPPRESS)  # internal: one run's evaluation
    args = ap.parse_args()
    overrides = [*(SMOKE if args.smoke else BUDGET), *args.overrides]
    if args.evaluate:
        evaluate(args.evaluate, args.overrides)
        return
    start = time.time()
    if not args.collect_only:
        # seed-major: a stopped suite leaves whole seeds of every row
        jobs = [job(args.root, row, args.seeds[0], overrides) for row in args.rows if ROWS[row] is None]
        jobs += [job(args.root, row, seed, overrides) for seed in args.seeds for row in args.rows if ROWS[row] is not None]
        run_jobs(jobs, args.parallel)
    res = collect(args.root, args.rows, args.seeds)
    if not res:
        raise SystemExit(f"no finished runs under {args.root}")
    text = tables(res)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    meta = {"overrides": overrides, "seeds": args.seeds, "wall_min": (time.time() - start) / 60,
            "machine": _machine()}
    args.results.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": res}, indent=1))
    args.results.with_suffix(".md").write_text(f"`python benchmarks/claims.py {' '.join(sys.argv[1:])}` "
                                               f"({' '.join(overrides)}):\n\n{text}\n")
    if not args.smoke:
        plot(res, HERE.parent / "docs" / "assets" / "claims_curves.png")


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch CPU"


if __name__ == "__main__":
    main()
