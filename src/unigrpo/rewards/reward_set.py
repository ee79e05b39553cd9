"""``RewardSet``: the weighted sum of the config's reward terms, and ``StepRewards``: one training
step's rewards, chunk by chunk (docs/rewards.md, "Group-wise terms").

- ``RewardSet(images, prompts, metadata)`` scores one batch with every term; a group-wise term is
  called once per ``prompt_index`` with that prompt's rows of the batch.
- ``RewardSet.step()`` -> ``StepRewards``: ``submit`` each rollout chunk as it is sampled (point-wise
  terms run at once, in the reward thread when ``workers > 0``, overlapping the next chunk), then
  ``result()`` scores the group-wise terms ONCE over all the step's rows, so each of their calls
  sees a whole group whatever the chunk size (a rank holds whole groups), and returns one
  ``RewardResult`` over all rows in submission order.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from unigrpo.rewards import RewardFn, RewardUnavailable, resolve_reward

__all__ = ["RewardResult", "RewardSet", "StepRewards"]

POINT, GROUP = "point", "group"


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
    """One call's scores: ``total`` [B] (the weighted sum), ``per_term`` (name -> [B]) and the
    ``seconds`` the call took.

    ``missing`` names the terms that raised ``RewardUnavailable`` (their scores and the total are
    NaN: never train on them); ``metrics`` are the terms' own counters for this call (summed, except
    ``*_latency_s`` which is a maximum), e.g. ``reward/remote_retries``."""

    total: torch.Tensor
    per_term: dict[str, torch.Tensor]
    seconds: float
    missing: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

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
        self.has_groupwise = any(getattr(fn, "groupwise", False) for _, _, fn in self.terms)
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

    def _compute(self, images, prompts, metadata, kinds=(POINT, GROUP)) -> RewardResult:
        """The terms of ``kinds`` only; ``total`` sums those terms."""
        start = time.perf_counter()
        images = images.detach().float().cpu()
        per_term, missing, calls = {}, [], []
        for name, _, fn in self.terms:
            if (GROUP if getattr(fn, "groupwise", False) else POINT) not in kinds:
                continue
            try:
                per_term[name] = self._score(name, fn, images, prompts, metadata)
            except RewardUnavailable:
                per_term[name] = torch.full((len(prompts),), float("nan"))
                missing.append(name)
            finally:
                if hasattr(fn, "call_metrics"):  # counters of this thread's last call (remote terms)
                    calls.append(RewardResult(None, {}, 0.0, metrics=fn.call_metrics()))
        total = self.weighted(per_term, len(prompts))
        return RewardResult(total, per_term, time.perf_counter() - start, missing, RewardResult.merge_metrics(calls))

    def weighted(self, per_term: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return sum((w * per_term[name] for name, w, _ in self.terms if name in per_term), torch.zeros(n))

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardResult:
        """-> RewardResult (unpacks as total [B] float32, {name: scores [B]}, seconds spent)."""
        return self._compute(images, prompts, metadata)

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict],
               kinds=(POINT, GROUP)) -> Future:
        """A future of ``self(images, prompts, metadata)`` (only the terms of ``kinds``). With
        ``workers == 0`` it is computed now (errors raise here); in a thread, at ``.result()``."""
        images = images.detach().cpu()  # the caller may reuse device memory for the next chunk
        if self.pool is not None:
            return self.pool.submit(self._compute, images, prompts, metadata, kinds)
        fut: Future = Future()
        fut.set_result(self._compute(images, prompts, metadata, kinds))
        return fut

    def step(self) -> StepRewards:
        """A new step's chunk-by-chunk scoring (group-wise terms on whole groups)."""
        return StepRewards(self)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for _, _, fn in self.terms:
            if hasattr(fn, "close"):
                fn.close()


class StepRewards:
    """One step's rewards: ``submit`` each chunk, then ``result()`` once (see the module docstring).
    Without group-wise terms this is exactly ``RewardSet.submit`` per chunk, concatenated."""

    def __init__(self, rewards: RewardSet):
        self.rewards, self.futures, self.chunks = rewards, [], []

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> None:
        images = images.detach().cpu()
        self.futures.append(self.rewards.submit(images, prompts, metadata, kinds=(POINT,)))
        if self.rewards.has_groupwise:  # kept for the group-wise terms, scored when every chunk is in
            self.chunks.append((images, list(prompts), list(metadata)))

    def result(self) -> RewardResult:
        """One RewardResult over every submitted row, in submission order (errors raise here)."""
        parts = [f.result() for f in self.futures]
        if self.chunks:
            images = torch.cat([c[0] for c in self.chunks])
            prompts = [p for c in self.chunks for p in c[1]]
            metadata = [m for c in self.chunks for m in c[2]]
            # rows in (prompt, member) order, whatever the chunking: a term sees each group's rows in
            # one order, so its value cannot depend on the chunk size even through float rounding
            order = sorted(range(len(prompts)), key=lambda i: (metadata[i].get("prompt_index", i),
                                                               metadata[i].get("group_index", 0)))
            group = self.rewards._compute(images[order], [prompts[i] for i in order], [metadata[i] for i in order],
                                          kinds=(GROUP,))
            back = torch.argsort(torch.tensor(order))
            group = RewardResult(group.total[back], {k: v[back] for k, v in group.per_term.items()}, group.seconds,
                                 group.missing, group.metrics)
        else:
            group = RewardResult(torch.zeros(0), {}, 0.0)
        n = sum(len(r.total) for r in parts)
        per_term = {name: group.per_term[name] if name in group.per_term else
                    torch.cat([r.per_term[name] for r in parts]) for name in self.rewards.names}
        missing = [name for name in self.rewards.names if any(name in r.missing for r in (*parts, group))]
        total = self.rewards.weighted(per_term, n)
        return RewardResult(total, per_term, sum(r.seconds for r in (*parts, group)), missing,
                            RewardResult.merge_metrics([*parts, group]))
