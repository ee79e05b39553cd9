"""`unigrpo demo`: UniGRPO from the shipped SFT checkpoint on CPU, with a before/after report.

1. evaluate the SFT checkpoint on the held-out split (thinking on, deterministic ODE);
2. run `train(cfg)` (``builtin:demo``, the packaged ``unigrpo/configs/demo.yaml``);
3. evaluate the trained policy on the same prompts and noise;
4. print the before/after table and write ``report.md`` with the reward curve and image grids.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from unigrpo.config import Config
from unigrpo.models import build_model
from unigrpo.tasks.shapes import (
    eval_tasks,
    evaluate_model,
    format_decomposition,
    format_table,
    write_eval,
)

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

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = eval_tasks(cfg)
    start = time.time()
    print(f"[demo] evaluating the SFT checkpoint ({cfg.model.checkpoint}) on {len(tasks)} held-out prompts")
    before, gen = evaluate_model(build_model(cfg), tasks, cfg, "think")
    write_eval(out / "eval", "before", before, gen, tasks, cfg.eval.grid_prompts)
    print(f"[demo] UniGRPO: {cfg.steps} steps x {cfg.algo.prompts_per_step} prompts x "
          f"{cfg.algo.group_size} trajectories")
    from unigrpo.utils.rundir import holds_run

    if holds_run(out):  # `bash scripts/demo.sh` twice in a row: the demo always starts fresh
        print(f"[demo] {out} holds a previous demo run: replacing it (train --overwrite)")
    result = train(cfg, overwrite=True)
    policy = result["model"] if isinstance(result, dict) and "model" in result else None
    if policy is None:
        policy = build_model(cfg, checkpoint=str(out / "final.safetensors"))
    after, gen = evaluate_model(policy, tasks, cfg, "think")
    write_eval(out / "eval", "after", after, gen, tasks, cfg.eval.grid_prompts)
    minutes = (time.time() - start) / 60
    table = format_table({"SFT (before)": before, f"UniGRPO, {cfg.steps} steps (after)": after})
    score_table = format_table({"SFT (before)": before, "UniGRPO (after)": after}, metric="score")
    experts = format_decomposition({"SFT (before)": before, "UniGRPO (after)": after})
    print("\nheld-out strict accuracy, thinking on:\n" + table)
    print("text expert vs image expert:\n" + experts)
    try:
        curve = plot_curves(out / "metrics.jsonl", out / "reward_curve.png", before["accuracy"], len(tasks))
    except ImportError as e:  # matplotlib is the optional `viz` extra: the report works without the plot
        curve = None
        print(f"[demo] no reward curve ({e}); pip install 'unigrpo[viz]' to get one")
    report = out / "report.md"
    report.write_text(
        f"# unigrpo demo report\n\n{cfg.steps} UniGRPO steps from `{cfg.model.checkpoint}` in "
        f"{minutes:.1f} minutes (evaluation included), split `{cfg.eval.split}`, {len(tasks)} prompts, "
        f"{cfg.sampler.eval_num_steps} ODE steps, thinking on.\n\n"
        f"## Strict accuracy (GenEval-style: everything right)\n\n{table}\n"
        f"## Mean partial-credit score\n\n{score_table}\n"
        f"## Text expert vs image expert\n\nA sampled description is right when, drawn exactly by the "
        f"ground-truth renderer, it passes the strict check.\n\n{experts}\n"
        + (f"## Reward curve\n\n![reward curve]({curve.name})\n\n" if curve else "")
        + "## Samples (same prompts and noise)\n\nBefore (SFT):\n\n![before](eval/before.png)\n\n"
        "After (UniGRPO):\n\n![after](eval/after.png)\n\n"
        "Prompts and reasoning: `eval/before_samples.md`, `eval/after_samples.md`.\n")
    print(f"[demo] report: {report}  ({minutes:.1f} min)")
    return {"before": before, "after": after, "minutes": minutes}
