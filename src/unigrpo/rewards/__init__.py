"""Rewards: callables ``(images, prompts, metadata) -> scores``, combined by a weighted sum.

- ``images`` [B, 3, H, W] float in [0, 1] on the CPU; ``prompts`` [B] str; ``metadata`` [B] dicts:
  the prompt's metadata from the task (a JSONL line's other fields; ``Task.to_metadata()`` for the
  built-in world) plus ``"reasoning"`` (the sampled reasoning text), ``"prompt_index"`` (the
  prompt's index in the step, shared by its group) and ``"group_index"`` (0 .. G-1). Scores:
  anything ``torch.as_tensor`` turns into [B] finite numbers (tensor, numpy array, list).
- A config term is ``{name, weight, kwargs}``. Built-ins live in the plain dict ``BUILTIN``; any
  other callable is named by a dotted path ``"pkg.module:obj"`` (``obj`` may be ``Class.attr``),
  imported with the current directory on ``sys.path`` (as ``uvicorn main:app`` does), so
  ``my_rewards.py`` beside the config just works. With ``kwargs`` the named object is a *factory*:
  ``obj(**kwargs)`` returns the reward (a class whose instances are callable works). A built-in
  marked ``@reward_factory`` (``remote``, ``judge``, ``ocr``, ``reasoning_format``, ``clip_score``,
  ``pickscore``, ``aesthetic``) is always
  called with the kwargs (possibly none). No registration, no import-time magic.
- A term with ``groupwise = True`` scores whole groups: the RewardSet calls it once per prompt
  (the rows sharing a ``prompt_index``) with those rows only. Rewards are computed per rollout
  chunk and a chunk holds an EQUAL SHARE of every group (``algo.micro_batch_trajectories / P``
  rows of each), so a group-wise term sees the group's rows of that chunk; it sees whole groups
  when a chunk is the rank's whole batch (``micro_batch_trajectories`` = trajectories per rank).
- ``RewardSet`` sums ``weight * score`` over the config's terms and also returns each term's scores
  (logged as ``reward/<name>``). A wrong shape or a non-finite score is an error naming the reward.
  A term may raise ``RewardUnavailable`` (a remote service that stays down with
  ``on_failure: skip``): the result is then ``missing`` (its scores are NaN) and the training loop
  skips that step's update on every rank; no step ever trains on a missing score.
- ``RewardSet.submit`` computes a chunk's rewards in a background thread (``workers > 0``) while the
  loop samples the next rollout chunk; with ``workers = 0`` it computes inline. Either way the
  results are identical (each call sees only its own chunk). Remote terms also send concurrent
  requests (``max_concurrency``).

docs/rewards.md: how to write, serve and call rewards, the HTTP API and the failure policies.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from unigrpo.rewards.text import reasoning_format
from unigrpo.world import shapes_reward

__all__ = ["BUILTIN", "RewardResult", "RewardSet", "RewardUnavailable", "resolve_reward", "reward_factory"]

RewardFn = Callable[[torch.Tensor, list, list], object]


class RewardUnavailable(RuntimeError):
    """Raised by a term whose scores cannot be had this step and whose policy is to skip the step."""


def reward_factory(fn):
    """Marks a built-in as a factory: the config's kwargs (possibly none) go to it, it returns the reward."""
    fn.reward_factory = True
    return fn


@reward_factory
def remote(**kwargs):
    """A reward served over HTTP (``unigrpo serve-reward``); ``unigrpo.rewards.remote.RemoteReward``."""
    from unigrpo.rewards.remote import RemoteReward

    return RemoteReward(**kwargs)


@reward_factory
def judge(**kwargs):
    """An OpenAI-compatible VLM judge (vLLM / SGLang); ``unigrpo.rewards.judge.JudgeReward``."""
    from unigrpo.rewards.judge import JudgeReward

    return JudgeReward(**kwargs)


@reward_factory
def ocr(**kwargs):
    """Text rendering scored by OCR (rapidocr-onnxruntime, extra ``ocr``); ``unigrpo.rewards.ocr.OcrReward``."""
    from unigrpo.rewards.ocr import OcrReward

    return OcrReward(**kwargs)


@reward_factory
def clip_score(**kwargs):
    """CLIP image-prompt cosine (transformers, extra ``hf``); ``unigrpo.rewards.clip.ClipScoreReward``."""
    from unigrpo.rewards.clip import ClipScoreReward

    return ClipScoreReward(**kwargs)


@reward_factory
def pickscore(**kwargs):
    """PickScore's per-pair score (a CLIP checkpoint); ``unigrpo.rewards.clip.PickScoreReward``."""
    from unigrpo.rewards.clip import PickScoreReward

    return PickScoreReward(**kwargs)


@reward_factory
def aesthetic(**kwargs):
    """The LAION aesthetic predictor (CLIP + MLP head); ``unigrpo.rewards.clip.AestheticReward``."""
    from unigrpo.rewards.clip import AestheticReward

    return AestheticReward(**kwargs)


def group_diversity(images, prompts, metadata):
    """Group-wise: each image's mean absolute pixel distance to the other images of its group."""
    del prompts, metadata
    x = images.flatten(1)
    d = (x[:, None] - x[None]).abs().mean(-1)  # [g, g]
    return d.sum(1) / max(len(x) - 1, 1)


group_diversity.groupwise = True

BUILTIN: dict[str, RewardFn] = {"shapes": shapes_reward, "remote": remote, "judge": judge, "ocr": ocr,
                                "reasoning_format": reward_factory(reasoning_format),
                                "group_diversity": group_diversity, "clip_score": clip_score,
                                "pickscore": pickscore, "aesthetic": aesthetic}


def _lookup(name: str):
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"reward {name!r}: not a built-in ({', '.join(sorted(BUILTIN))}) and not a "
                         f"dotted path 'pkg.module:callable'")
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a console script's path lacks the cwd
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_reward(name: str, kwargs: dict | None = None) -> RewardFn:
    """A built-in name or a dotted path ``pkg.module:obj`` (+ factory kwargs) -> the callable (clear errors)."""
    obj = _lookup(name)
    if not callable(obj):
        raise TypeError(f"reward {name!r}: {name.partition(':')[2] or name!r} is not callable")
    if kwargs or getattr(obj, "reward_factory", False):
        try:
            obj = obj(**dict(kwargs or {}))
        except TypeError as e:
            raise ValueError(f"reward {name!r}: bad kwargs {dict(kwargs or {})} ({e})") from e
        if not callable(obj):
            raise TypeError(f"reward {name!r}: the factory returned {type(obj).__name__}, not a callable")
    return obj


def _named_errors(name: str, fn: RewardFn) -> RewardFn:
    """``fn`` whose exceptions become one RewardError naming the reward (docs/reliability.md);
    errors of unigrpo's own terms (``RewardUnavailable``, ``RewardServiceError``) pass unchanged."""
    from unigrpo.utils.errors import RewardError

    def call(images, prompts, metadata):
        try:
            return fn(images, prompts, metadata)
        except Exception as e:
            if isinstance(e, RewardError) or type(e).__module__.startswith("unigrpo."):
                raise  # the skip policy (RewardUnavailable) and our terms' own errors name their source
            raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e

    call.groupwise = getattr(fn, "groupwise", False)
    return call


def _check_scores(name: str, scores, batch: int) -> torch.Tensor:
    try:
        s = torch.as_tensor(scores).detach().to("cpu", torch.float32)  # rewards are data, never differentiated
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"reward {name!r} returned {type(scores).__name__}, not numbers ({e})") from e
    if s.shape != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(s.shape)}, expected ({batch},): "
                         f"one score per image")
    if not torch.isfinite(s).all():
        raise ValueError(f"reward {name!r} returned non-finite scores: {s.tolist()}")
    return s


@dataclass
class RewardResult:
    """One call's scores. Unpacks as ``total, per_term, seconds`` (the tuple it used to be).

    ``missing`` names the terms that raised ``RewardUnavailable`` (their scores and the total are
    NaN: never train on them); ``metrics`` are the terms' own counters for this call (summed, except
    ``*_latency_s`` which is a maximum), e.g. ``reward/remote_retries``."""

    total: torch.Tensor
    per_term: dict[str, torch.Tensor]
    seconds: float
    missing: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.total, self.per_term, self.seconds))

    def __getitem__(self, i):
        return (self.total, self.per_term, self.seconds)[i]

    @staticmethod
    def merge_metrics(results) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in results:
            for k, v in r.metrics.items():
                out[k] = max(out.get(k, 0.0), v) if k.endswith("_latency_s") else out.get(k, 0.0) + v
        return out


def _term_spec(term: Any) -> tuple[str, float, dict]:
    if isinstance(term, (tuple, list)):
        name, weight, *rest = term
        return name, float(weight), dict(rest[0]) if rest else {}
    return term.name, float(term.weight), dict(getattr(term, "kwargs", None) or {})


class RewardSet:
    """The weighted sum of the config's reward terms, optionally computed in a background thread.

    ``terms``: ``RewardTerm``s (``cfg.rewards``) or ``(name, weight[, kwargs])`` tuples. A name used
    twice is logged as ``name``, ``name_2``, ..."""

    def __init__(self, terms: list, workers: int = 0):
        self.terms, seen = [], {}
        for term in terms:
            name, weight, kwargs = _term_spec(term)
            seen[name] = seen.get(name, 0) + 1
            label = name if seen[name] == 1 else f"{name}_{seen[name]}"
            self.terms.append((label, weight, resolve_reward(name, kwargs)))
        self.names = [name for name, _, _ in self.terms]
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reward") if workers > 0 else None

    def _score(self, name: str, fn, images, prompts, metadata) -> torch.Tensor:
        fn = _named_errors(name, fn)  # whatever the term raises names it (RewardUnavailable passes)
        if not getattr(fn, "groupwise", False):
            return _check_scores(name, fn(images, prompts, metadata), len(prompts))
        out = torch.empty(len(prompts))
        groups: dict[Any, list[int]] = {}
        for i, m in enumerate(metadata):
            groups.setdefault(m.get("prompt_index", i), []).append(i)
        for rows in groups.values():
            out[rows] = _check_scores(name, fn(images[rows], [prompts[i] for i in rows],
                                               [metadata[i] for i in rows]), len(rows))
        return out

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardResult:
        """-> RewardResult (unpacks as total [B] float32, {name: scores [B]}, seconds spent)."""
        start = time.perf_counter()
        images = images.detach().float().cpu()
        per_term, missing, calls = {}, [], []
        for name, _, fn in self.terms:
            try:
                per_term[name] = self._score(name, fn, images, prompts, metadata)
            except RewardUnavailable:
                per_term[name] = torch.full((len(prompts),), float("nan"))
                missing.append(name)
            finally:
                if hasattr(fn, "call_metrics"):  # counters of this thread's last call (remote terms)
                    calls.append(RewardResult(None, {}, 0.0, metrics=fn.call_metrics()))
        total = sum(w * per_term[name] for name, w, _ in self.terms)
        return RewardResult(total, per_term, time.perf_counter() - start, missing, RewardResult.merge_metrics(calls))

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Future:
        """A future of ``self(images, prompts, metadata)``. With ``workers == 0`` it is computed now
        (errors raise here); in a thread, errors raise at ``.result()``."""
        images = images.detach().cpu()  # the caller may reuse device memory for the next chunk
        if self.pool is not None:
            return self.pool.submit(self, images, prompts, metadata)
        fut: Future = Future()
        fut.set_result(self(images, prompts, metadata))
        return fut

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for _, _, fn in self.terms:
            if hasattr(fn, "close"):
                fn.close()
