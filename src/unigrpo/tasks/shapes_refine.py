"""``task.kind: shapes_refine``: the shapes world in multi-round episodes (think -> draw -> look ->
reflect -> redraw, ``algo.rounds``), and its evaluation round by round.

Round 1 is the ``shapes`` task's text-to-image prompt; later rounds look at the image drawn before
(the model must see images) and answer in ``world.refine``'s reflection grammar. Training prompts,
held-out splits and the reward are the ``shapes`` task's (the reward scores every round's image).

The evaluation runs the episodes of ``rollout.sample_episode`` deterministically (``eval.seed``; the
ODE: noise level 0, ``sampler.eval_num_steps``, ``sampler.eval_cfg_scale``) for ``algo.rounds``
rounds and reports, per round, the strict accuracy and score of the image each episode holds after
that round, the share that said the stop word and the reasoning tokens, and over the episode the
fix rate (first image wrong -> final right), the break rate (first right -> final wrong), the done
rate and ``reflection_ok`` (the share of reflections in the grammar); the grid shows each
episode's rounds side by side (one row per prompt). ``unigrpo eval --mode``: ``think`` the model's
own reflections, ``gt`` the world's reflection on each drawn image teacher-forced (what the image
expert makes of a right reflection), ``no_think`` an empty reflection (it redraws from its context
and the image alone), ``all`` the three in one table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from unigrpo import rollout as R
from unigrpo.config import Config
from unigrpo.sampling import check_episode, generate_episode
from unigrpo.tasks.shapes import ShapesTask
from unigrpo.utils.images import save_grid
from unigrpo.world import describe, description_correct, score_images
from unigrpo.world.refine import parse_reflection, reflection, seen_descriptions

__all__ = ["MODES", "ShapesRefineTask", "evaluate_rounds"]


MODES = {"think": "own reflections", "no_think": "no reflection", "gt": "ground-truth reflections"}


def world_reflections(tasks):
    """``sample_episode``'s ``given`` of the ``gt`` mode: the world's reflection on each drawn image
    (``world.refine``: what the detector sees, the strict check's verdict, the prompt's target)."""
    def given(prev: R.Round, rows: list[int]) -> list[str]:
        right = score_images(prev.images, [tasks[k].spec for k in rows]).correct
        return [reflection(seen, bool(ok), describe(tasks[k].target))
                for k, seen, ok in zip(rows, seen_descriptions(prev.images), right)]
    return given


def no_reflections(prev: R.Round, rows: list[int]) -> list[str]:
    """``given`` of the ``no_think`` mode: an empty reflection (the turn, then the end of the text)."""
    return [""] * len(rows)


def eval_episode(model, prompts: list, cfg: Config, rounds: int, given=None) -> R.Episode:
    """The deterministic episodes of ``prompts`` (one per prompt): seeds from ``eval.seed``, the ODE
    (``sampling.generate_episode``); ``given``: ``sample_episode``'s (reflections teacher-forced, not sampled)."""
    s = cfg.sampler
    return generate_episode(model, prompts, rounds, seed=cfg.eval.seed, num_steps=s.eval_num_steps, shift=s.shift,
                            cfg_scale=s.eval_cfg_scale, max_new_tokens=cfg.text.max_reasoning_tokens,
                            temperature=cfg.text.temperature, top_p=cfg.text.top_p, given=given)


def stopping_stats(roll: R.Episode) -> dict[str, float]:
    """Of evaluation episodes, whatever the task: per round the share that said the stop word and the
    tokens written (``round<r>/done_frac``, ``round<r>/reasoning_tokens``), and ``done_rate``: the
    share that said it in some round."""
    out = {}
    for r, rnd in enumerate(roll.rounds):
        out.update({f"round{r}/done_frac": float((rnd.live & ~rnd.drew).float().mean()),
                    f"round{r}/reasoning_tokens": float(rnd.tokens.response_mask.sum(1).float().mean())})
    out["done_rate"] = float(torch.stack([rnd.live & ~rnd.drew for rnd in roll.rounds]).any(0).float().mean())
    return out


def evaluate_rounds(roll: R.Episode, tasks) -> dict[str, float]:
    """Per-round and per-episode metrics of evaluation episodes (module docstring)."""
    specs = [t.spec for t in tasks]
    right = np.stack([score_images(rnd.images, specs).correct for rnd in roll.rounds], 1)  # [N, R]
    out, stops = {}, stopping_stats(roll)
    for r, rnd in enumerate(roll.rounds):
        res = score_images(rnd.images, specs)
        out.update({f"round{r}/accuracy": float(res.correct.mean()), f"round{r}/score": float(res.score.mean()),
                    **{f"round{r}/{k}": stops[f"round{r}/{k}"] for k in ("done_frac", "reasoning_tokens")}})
    first, final = right[:, 0], right[:, -1]
    out["fix_rate"] = float(final[~first].mean()) if (~first).any() else float("nan")
    out["break_rate"] = float((~final[first]).mean()) if first.any() else float("nan")
    out["done_rate"] = stops["done_rate"]
    texts = [t for rnd in roll.rounds[1:] for t, live in zip(rnd.reasoning, rnd.live.tolist()) if live]
    out["reflection_ok"] = float(np.mean([parse_reflection(t) is not None for t in texts])) if texts else float("nan")
    out["accuracy"] = float(final.mean())
    out["reasoning_ok"] = float(description_correct(roll.rounds[0].reasoning, specs).mean())
    return out


class ShapesRefineTask(ShapesTask):
    """The shapes world's prompts in multi-round episodes; evaluation round by round (module docstring)."""

    def check(self, model, cfg: Config) -> None:
        """The model must have a reflection turn (``UnifiedModel.reflection_ids``) and the evaluation's
        guidance must not drop the drawn image (``sampling.check_episode``): refused before a run writes
        anything, not at its first later round."""
        from unigrpo.utils.errors import InputError

        try:
            model.reflection_ids()
        except NotImplementedError as e:
            raise InputError(f"task.kind=shapes_refine: {e}") from None
        check_episode(model, cfg.algo.rounds, cfg.sampler.eval_cfg_scale)

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None, mode: str = "think"
                 ) -> dict[str, float]:
        """``eval/*`` of the episodes with the model's own reflections (``mode``: ``MODES``)."""
        start = time.perf_counter()
        tasks = self.eval_world_tasks()
        given = {"think": None, "no_think": no_reflections, "gt": world_reflections(tasks)}[mode]
        roll = eval_episode(model, self.eval_prompts(), cfg, cfg.algo.rounds, given)
        m = {f"eval/{k}": v for k, v in evaluate_rounds(roll, tasks).items()}
        self.write_grid(roll, cfg, step, out, "" if mode == "think" else f"_{mode}")
        m["perf/eval_s"] = time.perf_counter() - start
        return m

    @staticmethod
    def write_grid(roll: R.Episode, cfg: Config, step: int, out: Path | None, suffix: str = "") -> None:
        """``grids/eval_stepN.png``: one row per prompt, its rounds side by side (a row that stopped
        repeats its final image), and ``.md``: each round's reasoning."""
        n, rounds = min(cfg.eval.grid_prompts, len(roll)), len(roll.rounds)
        if out is None or n == 0:
            return
        images = torch.stack([rnd.images[:n] for rnd in roll.rounds], 1).flatten(0, 1)  # [n * R] episode-major
        labels = [f"{i} r{r}" for i in range(n) for r in range(rounds)]
        save_grid(images, out / "grids" / f"eval_step{step:06d}{suffix}.png", nrow=rounds, scale=4, labels=labels)
        (out / "grids" / f"eval_step{step:06d}{suffix}.md").write_text("".join(
            f"{i}. " + " | ".join(f"round {r}: `{rnd.reasoning[i]}`" for r, rnd in enumerate(roll.rounds)) + "\n"
            for i in range(n)))

    def demo_evaluate(self, model, cfg: Config, out: Path, name: str) -> dict:
        """The demo's held-out evaluation: ``algo.rounds``-round episodes with the model's own
        reflections; the rounds side by side in ``out/name.png`` (each round's text in ``name.md``)."""
        tasks = self.eval_world_tasks()
        roll = eval_episode(model, self.eval_prompts(), cfg, cfg.algo.rounds)
        res = evaluate_rounds(roll, tasks)
        n, rounds = min(cfg.eval.grid_prompts, len(roll)), len(roll.rounds)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(res, indent=2))
        if n:
            images = torch.stack([rnd.images[:n] for rnd in roll.rounds], 1).flatten(0, 1)
            save_grid(images, out / f"{name}.png", nrow=2 * rounds, scale=4,
                      labels=[f"{i} r{r + 1}" for i in range(n) for r in range(rounds)])
            (out / f"{name}.md").write_text("".join(
                f"{i}. `{tasks[i].prompt}` " + " | ".join(f"round {r + 1}: `{rnd.reasoning[i]}`"
                                                         for r, rnd in enumerate(roll.rounds)) + "\n"
                for i in range(n)))
        return res

    @staticmethod
    def demo_tables(results: dict[str, dict]) -> list[tuple[str, str]]:
        """The demo report's section: accuracy after each round, fix / break / done rates."""
        rounds = sum(k.startswith("round") and k.endswith("/accuracy") for k in next(iter(results.values())))
        head = ("| | " + " | ".join(f"after round {r + 1}" for r in range(rounds))
                + " | fix rate (wrong -> right) | break rate (right -> wrong) | done rate | reflections in the "
                  "grammar | description right (round 1) |\n|---|" + "---|" * (rounds + 5) + "\n")
        rows = "".join(f"| {name} | " + " | ".join(f"{v[f'round{r}/accuracy']:.3f}" for r in range(rounds))
                       + "".join(f" | {v[k]:.3f}" for k in ("fix_rate", "break_rate", "done_rate", "reflection_ok",
                                                             "reasoning_ok")) + " |\n"
                       for name, v in results.items())
        return [("Strict accuracy after each round (own reflections)", head + rows)]

    def report(self, model, cfg: Config, mode: str, out: Path | None) -> str:
        """Accuracy after each round with the model's own reflections (``think``), an empty one
        (``no_think``) or the world's (``gt``), or ``all`` three; fix / break / done rates."""
        rounds, results = cfg.algo.rounds, {}
        for m in MODES if mode == "all" else (mode,):
            results[m] = self.evaluate(model, cfg, None, 0, out, m)
        head = ("| reflections | " + " | ".join(f"round {r + 1}" for r in range(rounds))
                + " | fix rate | break rate | done rate | in the grammar |\n|---|" + "---|" * (rounds + 4) + "\n")
        rows = "".join(f"| {MODES[m]} | " + " | ".join(f"{v[f'eval/round{r}/accuracy']:.3f}" for r in range(rounds))
                       + "".join(f" | {v[f'eval/{k}']:.3f}" for k in ("fix_rate", "break_rate", "done_rate",
                                                                      "reflection_ok")) + " |\n"
                       for m, v in results.items())
        return (f"{cfg.eval.split} split, {len(self.eval_world_tasks())} prompts, {rounds} rounds, "
                f"{cfg.sampler.eval_num_steps} ODE steps; strict accuracy of the image after each round:\n" + head + rows)
