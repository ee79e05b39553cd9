"""GRPO loss on the reasoning tokens (docs/algorithm.md, "Text loss"; GRPO, arXiv 2402.03300).

Per active (generated) token, with ``r = exp(logp - logp_old)`` and the trajectory's advantage A:

    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)  [+ beta * k3(ref, theta)]
    k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1                (KL(theta || ref) estimator)

Aggregation over tokens is a named option (``AGGREGATIONS``):

- ``seq_mean``   (paper eq. 2, default): mean over each sequence's active tokens, then mean over
  the B sequences. A row with no active token contributes 0 but still counts in B (so that summing
  micro-batch losses weighted by their row counts equals the full-batch loss).
- ``token_mean`` (DAPO): sum over all active tokens / number of active tokens (at least 1).
- ``dr_grpo``    (Dr. GRPO): sum over all active tokens / (B * max_len), ``max_len`` default L.

Choices: ``logp_old``, ``logp_ref`` and ``advantages`` are detached inside (behaviour / reference
policies and advantages are constants of the objective). The math runs in float32 at least.
Masked positions may hold anything (even -inf): they are replaced before ``exp``.
``stats["approx_kl"]`` is Schulman's k3 estimate of KL(old || theta), ``(r - 1) - log r`` averaged
over active tokens (non-negative, unbiased under the behaviour policy).
"""

from __future__ import annotations

import torch

__all__ = ["AGGREGATIONS", "aggregate_tokens", "clipped_surrogate", "text_grpo_loss"]

AGGREGATIONS = ("seq_mean", "token_mean", "dr_grpo")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float):
    """PPO clipped surrogate ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` elementwise.

    ratio: [...]; advantages: broadcastable to ratio. Returns ``(loss, clipped_low,
    clipped_high)``, the boolean masks marking where the clipped term is the active one (zero
    gradient): ``r < 1 - eps_low`` with ``A < 0``, and ``r > 1 + eps_high`` with ``A > 0``.
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    clipped_low = (ratio < 1 - eps_low) & (advantages < 0)
    clipped_high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "seq_mean",
                     max_len: int | None = None) -> torch.Tensor:
    """Reduce per-token losses [B, L] over active tokens (``mask`` [B, L]) to a scalar.

    seq_mean: ``mean_b( sum_l m l / max(sum_l m, 1) )``; token_mean: ``sum m l / max(sum m, 1)``;
    dr_grpo: ``sum m l / (B * max_len)`` (``max_len`` defaults to L).
    """
    m = mask.to(per_token.dtype)  # [B, L]
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))  # why: no 0 * inf
    if aggregation == "seq_mean":
        # clamp: an empty row has sum 0 / 1 = 0 instead of 0 / 0 = NaN
        return (masked.sum(dim=1) / m.sum(dim=1).clamp_min(1)).mean()
    if aggregation == "token_mean":
        return masked.sum() / m.sum().clamp_min(1)  # clamp: all-empty batch gives 0, not NaN
    if aggregation == "dr_grpo":
        return masked.sum() / (per_token.shape[0] * (max_len or per_token.shape[1]))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _masked_stats(values: torch.Tensor, active: torch.Tensor, count: torch.Tensor, empty: float):
    """(mean, min, max) of ``values`` over ``active``; ``empty`` for all three if none is active."""
    n = count.clamp_min(1)  # why: no 0 / 0 when nothing is active
    mean = torch.where(active, values, torch.zeros_like(values)).sum() / n
    vmin = torch.where(active, values, torch.full_like(values, float("inf"))).min()
    vmax = torch.where(active, values, torch.full_like(values, float("-inf"))).max()
    none = count == 0
    fill = torch.full_like(mean, empty)
    return (torch.where(none, fill, mean), torch.where(none, fill, vmin), torch.where(none, fill, vmax))


def text_grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
                   aggregation: str = "seq_mean", max_len: int | None = None,
                   logp_ref: torch.Tensor | None = None, beta: float = 0.0):
    """GRPO token loss (equations: module docstring).

    logp, logp_old, mask, logp_ref: [B, L] (log-probs of the sampled tokens at temperature;
    mask True on generated reasoning tokens); advantages: [B]. Returns ``(loss, stats)``: a scalar
    with gradient w.r.t. ``logp`` only, and a dict of detached 0-d tensors: clip_frac,
    clip_frac_low, clip_frac_high, approx_kl, ratio_mean, ratio_min, ratio_max, logratio_mean,
    num_tokens, pg_loss, and kl_ref when ``logp_ref`` is given (ratio stats are 1 and the other
    stats 0 when no token is active).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref (the reference policy's token log-probs)")
    dtype = torch.promote_types(logp.dtype, torch.float32)  # upcast: bf16 log-ratios are too coarse
    active = mask.bool()  # [B, L]
    lp = logp.to(dtype)
    # where (not *mask): padding may hold -inf; a 0 log-ratio keeps exp and its gradient finite
    log_ratio = torch.where(active, lp - logp_old.detach().to(dtype), torch.zeros_like(lp))
    ratio = torch.exp(log_ratio)  # [B, L]
    adv = advantages.detach().to(dtype).reshape(-1, 1)  # [B, 1]
    per_token, low, high = clipped_surrogate(ratio, adv, eps_low, eps_high)  # [B, L]
    pg_loss = aggregate_tokens(per_token, active, aggregation, max_len)
    loss, kl_ref = pg_loss, None
    if logp_ref is not None:
        d = torch.where(active, logp_ref.detach().to(dtype) - lp, torch.zeros_like(lp))  # [B, L]
        kl_ref = torch.exp(d) - d - 1  # k3 estimator of KL(theta || ref), >= 0
        if beta > 0:
            loss = pg_loss + beta * aggregate_tokens(kl_ref, active, aggregation, max_len)
    with torch.no_grad():
        count = active.sum().to(dtype)

        def frac(b: torch.Tensor) -> torch.Tensor:  # fraction of active tokens where b holds
            return (b & active).sum().to(dtype) / count.clamp_min(1)

        r_mean, r_min, r_max = _masked_stats(ratio, active, count, 1.0)
        stats = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": frac(low | high), "clip_frac_low": frac(low), "clip_frac_high": frac(high),
            "approx_kl": _masked_stats(ratio - 1 - log_ratio, active, count, 0.0)[0],
            "ratio_mean": r_mean, "ratio_min": r_min, "ratio_max": r_max,
            "logratio_mean": _masked_stats(log_ratio, active, count, 0.0)[0],
            "num_tokens": count,
        }
        if kl_ref is not None:
            stats["kl_ref"] = _masked_stats(kl_ref, active, count, 0.0)[0]
    return loss, stats
