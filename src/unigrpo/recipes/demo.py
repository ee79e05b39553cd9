"""`unigrpo demo`: UniGRPO from the shipped SFT checkpoint on CPU, with a before/after report.

1. evaluate the SFT checkpoint on the held-out split (thinking on, deterministic ODE);
2. run `train(cfg)` (``builtin:demo``, the packaged ``unigrpo/configs/demo.yaml``; or
   ``--config builtin:demo_edit``: the shapes world's edits);
3. evaluate the trained policy on the same prompts and noise;
4. print the before/after tables and write ``report.md`` with the reward curve and image grids.

The task owns what is evaluated and how it is tabulated (``demo_evaluate``, ``demo_tables``: the
shapes world's tasks have them); the demo owns the sequence and the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from unigrpo.config import Config
from unigrpo.models import build_model
from unigrpo.tasks import build_task
from unigrpo.utils.errors import InputError

DEMO_CONFIG = "builtin:demo"  # shipped in the package: works from any directory, after any install


def plot_curves(metrics_path: Path, out_png: Path, start_accuracy: float | None = None,
                eval_prompts: int | None = None) -> Path | None:
    """Reward per step (rollout mean + moving average) and held-out accuracy per evaluation -> PNG.

    With ``eval_prompts`` (prompts per evaluation) the accuracy gets +-1 binomial standard error
    bars, sqrt(p (1 - p) / n): the size of the differences that one evaluation cannot resolve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    if not train:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, reward = [r["step"] for r in train], [r["reward/mean"] for r in train]
    ax[0].plot(steps, reward, alpha=0.35, label="rollout reward (batch mean)")
    k = max(1, len(reward) // 15)  # moving average: the batch mean is noisy (8 prompts per step)
    smooth = [sum(reward[max(0, i - k + 1): i + 1]) / len(reward[max(0, i - k + 1): i + 1]) for i in range(len(reward))]
    ax[0].plot(steps, smooth, label=f"moving average ({k} steps)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("reward")
    ax[0].grid(alpha=0.3)
    ax[0].legend()
    points = sorted({r["step"]: r["eval/accuracy"] for r in evals}.items())
    if start_accuracy is not None and not any(step == 0 for step, _ in points):
        points.insert(0, (0, start_accuracy))  # the SFT checkpoint, evaluated on the same prompts
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        err = [(y * (1 - y) / eval_prompts) ** 0.5 for y in ys] if eval_prompts else None
        label = "held-out accuracy" + (f" (+-1 s.e., {eval_prompts} prompts)" if eval_prompts else "")
        ax[1].errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=label)
        ax[1].set_xlabel("step")
        ax[1].set_ylabel("strict accuracy")
        ax[1].grid(alpha=0.3)
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_demo(cfg: Config) -> dict:
    """The README's main job. Returns {"before": metrics, "after": metrics, "minutes": float}."""
    from unigrpo.recipes.train import train

    task = build_task(cfg)
    if not hasattr(task, "demo_evaluate"):
        raise InputError(f"task.kind={cfg.task.kind!r} has no demo report (the shapes world's tasks do); "
                         "use `unigrpo train` and `unigrpo eval`")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"[demo] evaluating the SFT checkpoint ({cfg.model.checkpoint}) on {cfg.eval.num_prompts} held-out "
          f"prompts of task {cfg.task.kind}")
    before = task.demo_evaluate(build_model(cfg), cfg, out / "eval", "before")
    print(f"[demo] UniGRPO: {cfg.steps} steps x {cfg.algo.prompts_per_step} prompts x "
          f"{cfg.algo.group_size} trajectories")
    from unigrpo.utils.rundir import holds_run

    if holds_run(out):  # `bash scripts/demo.sh` twice in a row: the demo always starts fresh
        print(f"[demo] {out} holds a previous demo run: replacing it (train --overwrite)")
    result = train(cfg, overwrite=True)
    policy = result["model"] if isinstance(result, dict) and "model" in result else None
    if policy is None:
        policy = build_model(cfg, checkpoint=str(out / "final.safetensors"))
    after = task.demo_evaluate(policy, cfg, out / "eval", "after")
    minutes = (time.time() - start) / 60
    sections = task.demo_tables({"SFT (before)": before, f"UniGRPO, {cfg.steps} steps (after)": after})
    for title, table in sections:
        print(f"\n{title}, held-out, thinking on:\n{table}")
    try:
        curve = plot_curves(out / "metrics.jsonl", out / "reward_curve.png", before["accuracy"],
                            cfg.eval.num_prompts)
    except ImportError as e:  # matplotlib is the optional `viz` extra: the report works without the plot
        curve = None
        print(f"[demo] no reward curve ({e}); pip install 'unigrpo[viz]' to get one")
    report = out / "report.md"
    report.write_text(
        f"# unigrpo demo report\n\n{cfg.steps} UniGRPO steps on task `{cfg.task.kind}` from "
        f"`{cfg.model.checkpoint}` in {minutes:.1f} minutes (evaluation included), split `{cfg.eval.split}`, "
        f"{cfg.eval.num_prompts} prompts, {cfg.sampler.eval_num_steps} ODE steps, thinking on.\n\n"
        + "".join(f"## {title}\n\n{table}\n" for title, table in sections)
        + (f"## Reward curve\n\n![reward curve]({curve.name})\n\n" if curve else "")
        + "## Samples (same prompts and noise)\n\nBefore (SFT):\n\n![before](eval/before.png)\n\n"
        "After (UniGRPO):\n\n![after](eval/after.png)\n\n"
        "Prompts and reasoning: the `.md` files beside them in `eval/`.\n")
    print(f"[demo] report: {report}  ({minutes:.1f} min)")
    return {"before": before, "after": after, "minutes": minutes}
