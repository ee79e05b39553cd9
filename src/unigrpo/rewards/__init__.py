"""Rewards: callables ``(images, prompts, metadata) -> scores``, combined by a weighted sum.

- ``images`` [B, 3, H, W] float in [0, 1] on the CPU; ``prompts`` [B] str; ``metadata`` [B] dicts:
  the prompt's metadata from the task (a JSONL line's other fields; ``ShapesProblem.to_metadata()`` for the
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
  (the rows sharing a ``prompt_index``) with those rows only. ``RewardSet.submit`` per rollout
  chunk gives it the group's rows of that chunk (a chunk holds an EQUAL SHARE of every group);
  ``RewardSet.step()`` (``StepRewards``, in ``reward_set.py``) scores point-wise terms per chunk and
  group-wise terms once over all the step's chunks, i.e. on whole groups whatever the chunk size.
- ``RewardSet`` sums ``weight * score`` over the config's terms and also returns each term's scores
  (logged as ``reward/<name>``). A wrong shape or a non-finite score is an error naming the reward.
  A term may raise ``RewardUnavailable`` (a remote service that stays down with
  ``on_failure: skip``): the result is then ``missing`` (its scores are NaN) and the training loop
  skips that step's update on every rank; no step ever trains on a missing score.
- ``RewardSet.submit`` computes a chunk's rewards in a background thread (``workers > 0``) while the
  loop samples the next rollout chunk; with ``workers = 0`` it computes inline. Either way the
  results are identical. Remote terms also send concurrent
  requests (``max_concurrency``).

docs/rewards.md: how to write, serve and call rewards, the HTTP API and the failure policies.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import torch

from unigrpo.rewards.text import reasoning_format
from unigrpo.world import shapes_dense_reward, shapes_reward
from unigrpo.world.edit_reward import shapes_edit_dense_reward, shapes_edit_reward
from unigrpo.world.refine import verdict_reward

__all__ = ["BUILTIN", "RewardResult", "RewardSet", "RewardUnavailable", "StepRewards", "resolve_reward",
           "reward_factory"]

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

BUILTIN: dict[str, RewardFn] = {"shapes": shapes_reward, "shapes_dense": shapes_dense_reward, "remote": remote, "judge": judge, "ocr": ocr,
                                "shapes_edit": shapes_edit_reward, "shapes_edit_dense": shapes_edit_dense_reward,
                                "shapes_verdict": verdict_reward,
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


# last: reward_set imports the names above from this package
from unigrpo.rewards.reward_set import RewardResult, RewardSet, StepRewards
