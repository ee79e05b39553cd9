"""``task.kind: prompts``: prompts from JSONL files, evaluated by the configured rewards.

One object per line with at least ``"prompt"``; every other field is passed through to the
rewards (GenEval's ``evaluation_metadata.jsonl`` loads as it is). A line may carry input images,
``"images": ["a.png", ...]`` (paths relative to the JSONL file): each is read and checked when the
file is read (``unigrpo validate`` included: a missing, unreadable or wrong-mode image is one line
naming file and line), resized to the model's input size before the run writes anything
(``check``), and reaches the model (``Prompt.images``) and the rewards
(``metadata["input_images"]``, [n, 3, H, W] in [0, 1]). Only a model that sees or edits images
takes such prompts. The evaluation reports the
rewards on the evaluation prompts, overall and per ``"tag"`` / ``"category"`` field when the lines
have one. A run logs the generic image statistics only (``utils.images``): these prompts are not
the shapes world's.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from unigrpo.config import Config, ConfigError
from unigrpo.rollout import derive_seed
from unigrpo.tasks.base import (
    RESERVED,
    Prompt,
    check_prompts,
    generate_eval,
    reward_metadata,
    rollout_image_metrics,
    write_eval_grid,
)
from unigrpo.utils.errors import InputError
from unigrpo.utils.images import image_stats, read_image, stack_resized


def _lines(p: Path, key: str) -> list[str]:
    """The file's JSONL lines: split on ``\n`` only (``\r\n`` too) -- U+2028 / U+2029 / U+0085
    are valid inside a JSON string, where ``str.splitlines`` would cut the line -- and a UTF-8 BOM
    dropped."""
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ConfigError(f"{key}: cannot read prompt file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {p}: not UTF-8 text (byte {e.start})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def load_prompt_file(path: str | Path, key: str = "task.prompts") -> list[Prompt]:
    """JSONL -> prompts; blank lines are skipped. A bad file is one ConfigError naming file and line.

    Every field but ``"prompt"`` is kept as written; unigrpo adds ``"line"`` (the 1-based line
    number), and a line that sets a key unigrpo adds (``RESERVED``) is refused rather than overwritten."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: prompt file not found: {p}")
    prompts = []
    for n, line in enumerate(_lines(p, key), 1):
        if not line.strip():
            continue
        where = f"{key}: {p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        except RecursionError:  # a line of thousands of nested brackets
            raise ConfigError(f"{where}: not JSON (nested too deeply)") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ConfigError(f"{where}: expected a JSON object with a non-empty \"prompt\" string")
        taken = [k for k in RESERVED if k in obj]
        if taken:
            raise ConfigError(f"{where}: field {taken[0]!r} is set by unigrpo for the rewards (the line number, "
                              f"the sampled reasoning, the indices); rename it")
        meta = {k: v for k, v in obj.items() if k != "prompt"}
        files = _image_files(obj.get("images"), p, where) if "images" in obj else ()
        prompts.append(Prompt(obj["prompt"], {**meta, "line": n}, image_files=files))
    if not prompts:
        raise ConfigError(f"{key}: {p} holds no prompts")
    return prompts


def _image_files(field, jsonl: Path, where: str) -> tuple[str, ...]:
    """A line's ``"images"``: a non-empty list of paths (relative to the JSONL file), each read and
    checked now (``read_image``); ConfigError naming file, line and image otherwise."""
    if not isinstance(field, list) or not field or not all(isinstance(x, str) and x.strip() for x in field):
        raise ConfigError(f"{where}: \"images\" must be a non-empty list of image paths")
    files = []
    for name in field:
        path = Path(name) if Path(name).is_absolute() else jsonl.parent / name
        if not path.is_file():
            raise ConfigError(f"{where}: image not found: {path}")
        try:
            read_image(path)
        except ValueError as e:
            raise ConfigError(f"{where}: image {path}: {e}") from None
        files.append(str(path))
    return tuple(files)


def with_input_images(prompts: list[Prompt], size: tuple[int, int]) -> list[Prompt]:
    """``prompts`` with their image files read and resized to ``size`` (H, W); prompts without
    images unchanged."""
    return [p.with_images(stack_resized([read_image(f) for f in p.image_files], size))
            if p.image_files else p for p in prompts]


def reward_metrics(res, prompts: list[Prompt], images: torch.Tensor) -> dict[str, float]:
    """``eval/reward`` (and per term, per ``tag`` / ``category``) of a ``RewardResult`` of one image per
    prompt (none when a term's failure was skipped), and ``eval/<stat>`` of the images."""
    total, per_term = res.total, res.per_term
    m = {} if res.missing else {"eval/reward": float(total.mean()),
                                **{f"eval/reward/{k}": float(v.mean()) for k, v in per_term.items()}}
    cats = [str(p.metadata.get("tag", p.metadata.get("category", ""))) for p in prompts]
    for cat in [] if res.missing else sorted(set(cats) - {""}):
        sel = torch.tensor([c == cat for c in cats])
        m[f"eval/category/{cat}/reward"] = float(total[sel].mean())
    m.update({f"eval/{k}": v for k, v in image_stats(images).items()})
    return m


class PromptsTask:
    """Prompts from JSONL files: each data epoch is a new permutation of the training file (seeded
    by ``seed`` and the epoch); evaluation on the first ``eval.num_prompts`` evaluation prompts."""

    def __init__(self, cfg: Config):
        t = cfg.task
        self.seed, self.cfg, self.orders = cfg.seed, cfg, {}
        self.train = load_prompt_file(t.prompts)
        self.eval = self.train if t.eval_prompts is None else load_prompt_file(t.eval_prompts, "task.eval_prompts")
        for key, prompts in (("task.prompts", self.train), ("task.eval_prompts", self.eval)):
            first = next((p for p in prompts if p.image_files), None)
            if first is not None and not cfg.model.capabilities & {"sees_images", "edits"}:
                raise ConfigError(f"{key}: line {first.metadata['line']} has input images, and model.kind="
                                  f"{cfg.model.kind!r} as configured neither sees nor edits images (docs/models.md)")
            if first is not None and cfg.sampler.cfg_scale != 1.0:  # the null context carries no images
                raise ConfigError(f"sampler.cfg_scale={cfg.sampler.cfg_scale}: CFG training with input images "
                                  f"({key}: line {first.metadata['line']}) would drop them from the unconditional "
                                  "branch; UniGRPO trains CFG-free (sampler.cfg_scale=1)")

    def check(self, model, cfg: Config) -> None:
        """Every training and evaluation prompt is one ``model`` reads and fits with
        ``text.max_reasoning_tokens`` (the tiny model: its words, its ``max_seq_len``)."""
        t, n = cfg.task, cfg.text.max_reasoning_tokens
        check_prompts(model, self.train, n, lambda p: f"task.prompts: {t.prompts}:{p.metadata['line']}")
        if self.eval is not self.train:
            check_prompts(model, self.eval, n, lambda p: f"task.eval_prompts: {t.eval_prompts}:{p.metadata['line']}")
        if cfg.algo.rounds > 1:  # a reflection turn, and guidance that keeps the drawn image (one line)
            from unigrpo.sampling import check_episode

            check_episode(model, cfg.algo.rounds, cfg.sampler.eval_cfg_scale)
        limit, drawn = model.max_input_images, cfg.algo.rounds - 1  # later rounds append the drawn images
        for key, file, prompts in (("task.prompts", t.prompts, self.train), ("task.eval_prompts", t.eval_prompts, self.eval)):
            over = next((p for p in prompts if limit is not None and len(p.image_files) + drawn > limit), None)
            if over is not None:
                raise InputError(f"{key}: {file}:{over.metadata['line']}: {len(over.image_files)} input images + "
                                 f"{drawn} drawn ones (algo.rounds={cfg.algo.rounds}); the model holds at most {limit}")
        if any(p.image_files for p in self.train + self.eval):  # at the model's input size, once
            same = self.eval is self.train
            self.train = with_input_images(self.train, model.input_image_size)
            self.eval = self.train if same else with_input_images(self.eval, model.input_image_size)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch) % 2**63)
            self.orders = {epoch: torch.randperm(len(self.train), generator=g).tolist()}  # keep one epoch
        return self.orders[epoch]

    def train_prompts(self, step: int, count: int) -> list[Prompt]:
        n = len(self.train)
        return [self.train[self._order(i // n)[i % n]] for i in range(step * count, (step + 1) * count)]

    def eval_prompts(self) -> list[Prompt]:
        return self.eval[:self.cfg.eval.num_prompts]

    def evaluate(self, model, cfg: Config, rewards, step: int, out: Path | None) -> dict[str, float]:
        """``eval/*``: the rewards of the evaluation prompts' images (per term, per ``tag`` /
        ``category``), their image statistics, and the grid. With ``algo.rounds`` > 1 (and thinking
        on): ``algo.rounds``-round episodes (``sampling.generate_episode``), every round's image
        scored (``eval/round{r}/reward``, with the rewards' ``round`` / ``previous_image`` metadata),
        ``eval/reward`` the final images', and the rounds side by side in the grid."""
        start = time.perf_counter()
        prompts = self.eval_prompts()
        if cfg.algo.rounds > 1 and cfg.eval.thinking:
            m = self._evaluate_rounds(model, cfg, rewards, prompts, step, out)
        else:
            gen = generate_eval(model, prompts, cfg, thinking=cfg.eval.thinking)
            meta = [reward_metadata(p.metadata, gen.reasoning[i], i, 0) for i, p in enumerate(prompts)]
            m = reward_metrics(rewards(gen.images, [p.text for p in prompts], meta), prompts, gen.images)
            write_eval_grid(gen, prompts, cfg, step, out)
        m["perf/eval_s"] = time.perf_counter() - start
        return m

    @staticmethod
    def _evaluate_rounds(model, cfg: Config, rewards, prompts: list[Prompt], step: int, out: Path | None) -> dict:
        from unigrpo.recipes.batches import round_reward_metadata
        from unigrpo.rollout import Episode
        from unigrpo.tasks.shapes_refine import ShapesRefineTask, eval_episode, stopping_stats

        roll = eval_episode(model, prompts, cfg, cfg.algo.rounds)
        texts, m, stops = [p.text for p in prompts], {}, stopping_stats(roll)
        for r, rnd in enumerate(roll.rounds):
            reasoning = Episode(roll.rounds[:r + 1]).reasoning  # the rounds' texts so far, as in training
            meta = [{**reward_metadata(p.metadata, reasoning[i], i, 0), **round_reward_metadata(roll, r, i)}
                    for i, p in enumerate(prompts)]
            res = rewards(rnd.images, texts, meta)
            if not res.missing:
                m[f"eval/round{r}/reward"] = float(res.total.mean())
            m.update({f"eval/round{r}/{k}": stops[f"round{r}/{k}"] for k in ("done_frac", "reasoning_tokens")})
        m["eval/done_rate"] = stops["done_rate"]
        ShapesRefineTask.write_grid(roll, cfg, step, out)
        return {**reward_metrics(res, prompts, roll.rounds[-1].images), **m}  # res: the final images'

    def report(self, model, cfg: Config, mode: str, out: Path | None) -> str:
        """``evaluate``'s metrics, one per line, with thinking on (``think``) or off (``no_think``);
        the grid under ``out``. Without ground-truth reasoning there is no ``gt`` mode."""
        from unigrpo.rewards import RewardSet

        if mode not in ("think", "no_think"):
            raise InputError(f"--mode {mode} needs ground-truth reasoning, which only task.kind=shapes has")
        self.check(model, cfg)
        cfg = replace(cfg, eval=replace(cfg.eval, thinking=mode == "think"))
        metrics = self.evaluate(model, cfg, RewardSet(cfg.rewards), 0, out)
        head = (f"task {cfg.task.kind}, {cfg.eval.num_prompts} prompts at most, {cfg.sampler.eval_num_steps} ODE "
                f"steps, CFG {cfg.sampler.eval_cfg_scale}, thinking {'on' if cfg.eval.thinking else 'off'}:")
        return "\n".join([head, *(f"{k:<40} {v:.4f}" for k, v in metrics.items())])

    def rollout_metrics(self, images: torch.Tensor, group_size: int) -> dict[str, float]:
        return rollout_image_metrics(image_stats(images), images, group_size)
