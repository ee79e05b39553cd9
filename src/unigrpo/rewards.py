"""Rewards: callables ``(images, prompts, metadata) -> scores``, combined by a weighted sum.

- ``images`` [B, 3, H, W] float in [0, 1] on the CPU; ``prompts`` [B] str; ``metadata`` [B] dicts:
  the prompt's metadata from the task (a JSONL line's other fields; ``Task.to_metadata()`` for the
  built-in world) plus ``"reasoning"`` (the sampled reasoning text), ``"prompt_index"`` (the
  prompt's index in the step, shared by its group) and ``"group_index"`` (0 .. G-1). Scores:
  anything ``torch.as_tensor`` turns into [B] finite numbers (tensor, numpy array, list).
- Built-ins live in the plain dict ``BUILTIN``; any other callable is named by a dotted path
  ``"pkg.module:obj"`` (``obj`` may be ``Class.attr``), imported with the current directory on
  ``sys.path`` (as ``uvicorn main:app`` does), so ``my_rewards.py`` beside the config just works.
  No registration, no import-time magic.
- ``RewardSet`` sums ``weight * score`` over the config's terms and also returns each term's scores
  (logged as ``reward/<name>``). A wrong shape or a non-finite score is an error naming the reward.
- ``RewardSet.submit`` computes a chunk's rewards in a background thread (``workers > 0``) while the
  loop samples the next rollout chunk; with ``workers = 0`` it computes inline. Either way the
  results are identical (each call sees only its own chunk).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from unigrpo.world import shapes_reward

__all__ = ["BUILTIN", "RewardSet", "resolve_reward"]

RewardFn = Callable[[torch.Tensor, list, list], object]

BUILTIN: dict[str, RewardFn] = {"shapes": shapes_reward}


def resolve_reward(name: str) -> RewardFn:
    """A built-in name or a dotted path ``pkg.module:obj`` -> the callable (clear errors)."""
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
    if not callable(obj):
        raise TypeError(f"reward {name!r}: {attr!r} is not callable")
    return obj


def _call(name: str, fn: RewardFn, images, prompts, metadata):
    """``fn(...)``; whatever it raises becomes one error naming the reward (docs/reliability.md)."""
    from unigrpo.utils.errors import RewardError

    try:
        return fn(images, prompts, metadata)
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e


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


class RewardSet:
    """The weighted sum of the config's reward terms, optionally computed in a background thread."""

    def __init__(self, terms: list[tuple[str, float]], workers: int = 0):
        self.terms = [(name, float(w), resolve_reward(name)) for name, w in terms]
        self.names = [name for name, _, _ in self.terms]
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reward") if workers > 0 else None

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]):
        """-> (total [B] float32, {name: scores [B]}, seconds spent)."""
        start = time.perf_counter()
        images = images.detach().float().cpu()
        per_term = {name: _check_scores(name, _call(name, fn, images, prompts, metadata), len(prompts))
                    for name, _, fn in self.terms}
        total = sum(w * per_term[name] for name, w, _ in self.terms)
        return total, per_term, time.perf_counter() - start

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
