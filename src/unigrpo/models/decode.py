"""The text engine: the seeded KV-cache decode loop and the log-probs of given tokens, written once
for every adapter (in the shape of nanochat's ``Engine``).

An adapter (or the object that holds its language model) supplies a small contract,
:class:`DecodeModel`: ``prefill`` a batch of prompts into a cache and the logits of each row's next
token, ``decode_step`` one token per row through that cache, the ``stop_ids``, the ``pad_id`` and
``fixed_steps``. Everything else lives here:

- **Sampling** (:func:`sample`): temperature, top-p nucleus, one ``torch.Generator`` for the batch
  or one per row (each contiguous run of rows sharing a generator is one draw, exactly what a loop
  over that run alone would draw, so several groups decode in ONE loop); rows stop independently
  at a stop id (kept: it is an action) and are padded after it. Two exact samplers of the same
  distribution (``text.token_sampler``, :data:`TOKEN_SAMPLERS`):

  - ``"multinomial"`` (default): the tokens ``torch.multinomial(probs, 1)`` draws, bit for bit,
    from the same generator stream (:func:`exponential_race`: one exponential per vocabulary entry,
    the argmax of ``p / E``), without ``multinomial``'s validity checks (three reductions and host
    syncs per call). Every seeded number of the docs was measured with this stream.
  - ``"inverse_cdf"``: ONE float64 uniform per row and step (:func:`uniforms`), the token by
    inverse CDF in token-id order (:func:`inverse_cdf`), every row in one vectorised pass. Faster
    (docs/performance.md); the same seed draws OTHER tokens than ``"multinomial"``
    (docs/reliability.md, "Determinism").
- **Positions**: a row's next token sits at the number of its real tokens so far (left padding
  takes no position); a finished row keeps its position (its later tokens are masked and unused).
- **FSDP lockstep**: with ``fixed_steps`` (a sharded model, whose every forward is a collective)
  every call runs all ``max_new_tokens`` decode steps whatever the rows do, and the result is cut
  back to the steps the early-stopping loop takes: the same tokens on every number of ranks.
- **Log-probs**: :func:`sample` can return the decode-time log-probs of the sampled tokens under
  the temperature-scaled distribution (not renormalised to the nucleus); the training side scores
  given tokens with one teacher-forced pass and :func:`response_logprobs`.

``use_cache=False`` recomputes the whole sequence with ``prefill`` at every step: the reference the
conformance suite compares the cached loop with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from unigrpo.models.protocol import TokenBatch

__all__ = ["TOKEN_SAMPLERS", "DecodeModel", "exponential_race", "inverse_cdf", "nucleus", "response_logprobs", "runs",
           "sample", "sample_rows", "target_logprobs", "uniforms"]

TOKEN_SAMPLERS = ("multinomial", "inverse_cdf")  # text.token_sampler (module docstring)

Generators = torch.Generator | Sequence[torch.Generator] | None


class DecodeModel(Protocol):
    """What the engine needs from a language model (the tiny text expert, an HF causal LM, Bagel)."""

    pad_id: int
    stop_ids: tuple[int, ...]
    fixed_steps: bool  # every decode runs max_new_tokens steps (sharded: forwards are collectives)

    def prefill(self, tokens: TokenBatch) -> tuple[torch.Tensor, Any]:
        """One pass over the prompts (and their images): (float32 logits [B, V] of each row's next
        token, before any temperature; the cache ``decode_step`` extends)."""

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor,
                    cache: Any) -> tuple[torch.Tensor, Any]:
        """Feed ``tok`` [B] at positions ``pos`` [B]; ``key_mask`` [B, S + 1] marks the real keys
        among the cached ones and this token. Returns (float32 logits [B, V], the cache)."""


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` [B, V] restricted to the top-p nucleus (the smallest set of most likely tokens whose
    mass reaches ``top_p``), zero elsewhere and NOT renormalised (``inverse_cdf`` scales by the mass)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from the (unnormalised) ``probs`` [B, V] and ONE uniform ``u`` [B] in [0, 1):
    the first token id whose cumulative mass, in id order, exceeds ``u`` times the row's mass. Exact
    inverse-CDF sampling: token j is drawn iff u lies in [cdf[j-1], cdf[j]) / cdf[-1], an interval of
    length p_j / sum(p); a zero-probability token has an empty interval and is never drawn. [B]."""
    cdf = probs.double().cumsum(-1)  # float64: the intervals of tokens with p ~ 1e-8 keep their width
    total = cdf[:, -1:]
    # u < 1, but u * total can round up to total: stay below it, inside the last token's interval
    v = torch.minimum(u.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True)[:, 0]  # first j with cdf[j] > v


def runs(generator: Sequence[torch.Generator], n: int) -> list[tuple[int, int, torch.Generator]]:
    """(start, end, generator) of each contiguous run of the ``n`` rows sharing a generator object."""
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} rows")
    out, start = [], 0
    for end in range(1, n + 1):
        if end == n or generator[end] is not generator[start]:
            out.append((start, end, generator[start]))
            start = end
    return out


def uniforms(generator: Generators, n: int, device: torch.device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row [n]: from one generator (or the global stream), or from
    a sequence of one generator per row, each contiguous run of rows sharing a generator object
    drawing its rows' uniforms in ONE call (what a loop over that run alone draws)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return torch.cat([torch.rand(end - start, generator=g, dtype=torch.float64, device=device)
                      for start, end, g in runs(generator, n)])


def exponential_race(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One token per row from the (unnormalised) ``probs`` [B, V]: the argmax of ``p / E`` with
    E ~ Exp(1) per entry, drawn by ONE ``exponential_`` call on ``generator`` (or, with one generator
    per row, one call per contiguous run of rows sharing it, into one buffer). This is how
    ``torch.multinomial(probs, 1)`` samples (its one-sample path), so it returns the same tokens from
    the same stream (tested), without ``multinomial``'s checks of the probabilities. [B]."""
    race = torch.empty_like(probs)
    if generator is None or isinstance(generator, torch.Generator):
        race.exponential_(1, generator=generator)
    else:
        for start, end, g in runs(generator, len(probs)):
            race[start:end].exponential_(1, generator=g)
    return (probs / race).argmax(-1)


def sample_rows(logits: torch.Tensor, top_p: float, generator: Generators,
                token_sampler: str = "multinomial") -> torch.Tensor:
    """One token per row from softmax(logits) restricted to the top-p nucleus, by the
    ``token_sampler`` of the module docstring, with one generator (or None) for all rows or a
    sequence of one generator per row. [B, V] -> [B]."""
    probs = nucleus(logits.softmax(-1), top_p)
    if token_sampler == "inverse_cdf":
        return inverse_cdf(probs, uniforms(generator, logits.shape[0], logits.device))
    if token_sampler != "multinomial":
        raise ValueError(f"token_sampler: {token_sampler!r} is none of {', '.join(TOKEN_SAMPLERS)}")
    return exponential_race(probs, generator)


@torch.no_grad()
def sample(model: DecodeModel, prompts: TokenBatch, *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, generator: Generators = None, return_logprobs: bool = False,
           use_cache: bool = True, token_sampler: str = "multinomial"):
    """Sample up to ``max_new_tokens`` tokens after each prompt (module docstring). Returns the
    prompts + responses (``TokenBatch``), with ``return_logprobs`` also their [B, L] log-probs."""
    b = len(prompts)
    done = torch.zeros(b, dtype=torch.bool, device=prompts.ids.device)
    stop = torch.tensor(model.stop_ids, device=prompts.ids.device)
    new_ids, new_mask, new_logp = [], [], []
    logits, cache = model.prefill(prompts)
    key_mask, pos = prompts.mask, prompts.mask.long().sum(1)  # the next token's position per row
    n_steps = None  # the step after which every row has finished
    for i in range(max_new_tokens):
        logits = logits / temperature if temperature != 1.0 else logits  # x / 1 is x: skip the copy
        tok = sample_rows(logits, top_p, generator, token_sampler)
        tok = torch.where(done, torch.full_like(tok, model.pad_id), tok)
        if return_logprobs:  # of the temperature-scaled distribution, as the teacher-forced pass scores
            new_logp.append(logits.log_softmax(-1).gather(1, tok[:, None])[:, 0] * ~done)
        new_ids.append(tok)
        new_mask.append(~done)
        done = done | torch.isin(tok, stop)
        if n_steps is None and bool(done.all()):
            n_steps = i + 1
            if not model.fixed_steps:
                break
        if i + 1 == max_new_tokens:  # no token follows: the next logits would be unused
            break
        key_mask = torch.cat([key_mask, new_mask[-1][:, None]], 1)  # the token fed now is real iff sampled live
        if use_cache:
            logits, cache = model.decode_step(tok, pos, key_mask, cache)
        else:  # the whole sequence again (its mask is key_mask)
            logits, _ = model.prefill(prompts.with_sampled(new_ids, new_mask))
        pos = pos + new_mask[-1].long()  # a finished row keeps its position (its tokens are masked)
    new_ids, new_mask, new_logp = new_ids[:n_steps], new_mask[:n_steps], new_logp[:n_steps]
    return prompts.with_sampled(new_ids, new_mask, new_logp if return_logprobs else None)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[target]`` per position: logits [B, T, V] (float32, temperature
    applied), targets [B, T] -> [B, T]."""
    return torch.gather(logits.log_softmax(-1), 2, targets[..., None])[..., 0]


def response_logprobs(logp_next: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: token ``i`` is predicted at position ``i - 1``, so the log-probs of tokens
    1..L-1 ``logp_next`` [B, L - 1] shift right by one; zero outside the response. -> [B, L]."""
    return F.pad(logp_next, (1, 0)) * response_mask
