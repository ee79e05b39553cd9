"""FlowGRPO loss on the trained denoising steps, and the two regularisers (docs/algorithm.md).

With ``l = logp - logp_old`` per (trajectory, window step), both from :func:`sde_step` with the
same reduction:

    RatioNorm (GRPO-Guard, arXiv 2510.22319; optional):
        l~ = std * l + mean((mean_theta - mean_old)^2) / (2 std)
    surrogate:   -min(r A, clip(r, 1 - eps, 1 + eps) A),  r = exp(l~ or l)
                 averaged over window steps, then over trajectories (paper eps = 1e-6)
    velocity MSE (UniGRPO):      mean((v_theta - v_ref)^2)
    latent KL (FlowGRPO):        mean((mean_theta - mean_ref)^2) / (2 std^2)

Why RatioNorm: with mean-reduced log-probs and ``x = mean_old + std z``,
``l = mean(z d) / std - mean(d^2) / (2 std^2)`` with ``d = mean_theta - mean_old``: the log-ratio is
biased negative and its scale grows as ``1/std`` (huge at low-noise steps). Then
``l~ = mean(z d)`` exactly: zero mean, variance ``mean(d^2) / D`` whatever the step's std.

Why velocity MSE instead of the latent KL: for ``flow_sde``, ``mean`` is linear in ``v`` with
coefficient ``c = (1 + sigma_t^2 (1 - t) / (2 t)) dt``, so ``KL = c^2 / (2 std^2) * MSE`` -- a
weight ``(1 + a^2/2)^2 (-dt) (1 - t) / (2 a^2 t)`` that vanishes as ``t -> 1`` (the high-noise steps
where the window sits), whereas the MSE weighs every step alike.

Choices: ``logp_old``, ``mean_old``, ``v_ref``, ``mean_ref``, ``std`` and advantages are detached
inside (behaviour / reference quantities are constants of the objective). Math in float32 at
least. Default MSE / KL reduction ``"mean"`` over all elements: ``c_mse = 1.5e-5`` then does not
scale with the latent resolution. ``std`` must be > 0 (window steps are stochastic).
"""

from __future__ import annotations

import torch

from unigrpo.algo.sde import compute_dtype
from unigrpo.algo.text_loss import clipped_surrogate

__all__ = ["REDUCTIONS", "flow_grpo_loss", "latent_kl", "ratio_norm_log_ratio", "velocity_mse"]

REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_elem: torch.Tensor, reduction: str) -> torch.Tensor:
    """[B, ...] -> mean: mean of all elements; sum: per-sample sum, mean over B; none: [B] means."""
    flat = per_elem.reshape(per_elem.shape[0], -1)  # [B, D]
    if reduction == "mean":
        return flat.mean()
    if reduction == "sum":
        return flat.sum(dim=1).mean()
    if reduction == "none":
        return flat.mean(dim=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def ratio_norm_log_ratio(log_ratio: torch.Tensor, std: torch.Tensor, mean: torch.Tensor,
                         mean_old: torch.Tensor) -> torch.Tensor:
    """RatioNorm ``l~ = std * l + mean((mean - mean_old)^2) / (2 std)`` (GRPO-Guard).

    log_ratio: [B, W] or [B] (mean-reduced); std: same shape (or 0-d); mean, mean_old:
    [*log_ratio.shape, *latent]. The squared difference is averaged over the latent elements.
    Gradient flows through ``log_ratio`` and ``mean``. Returns  # log_ratio.shape
    """
    dtype = log_ratio.dtype
    std = std.detach().to(dtype)  # std depends on the schedule only, never on theta
    sq = (mean.to(dtype) - mean_old.detach().to(dtype)) ** 2  # [B, W, *latent]
    sq = sq.reshape(*log_ratio.shape, -1).mean(dim=-1)  # [B, W]: mean over latent elements
    return std * log_ratio + sq / (2 * std)


def flow_grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                   eps: float = 1e-6, ratio_norm: bool = False, std: torch.Tensor | None = None,
                   mean: torch.Tensor | None = None, mean_old: torch.Tensor | None = None):
    """Clipped FlowGRPO surrogate over window steps (equations: module docstring).

    logp, logp_old: [B, W] (trajectories x window steps) or [B]; advantages: [B]; eps: clip range.
    ratio_norm: apply RatioNorm, which needs ``std`` [B, W], ``mean`` / ``mean_old``
    [B, W, *latent] (shapes follow ``logp``). Returns ``(loss, stats)``; stats are detached 0-d
    tensors: clip_frac, clip_frac_low, clip_frac_high, approx_kl (k3 of the raw log-ratio),
    ratio_mean / min / max (of the ratio used in the surrogate), logratio_mean (raw), and
    logratio_normed_mean with RatioNorm.
    """
    dtype = compute_dtype(logp)  # upcast: log-ratios of ~1e-6 need float32 at least
    log_ratio = logp.to(dtype) - logp_old.detach().to(dtype)  # [B, W]
    used = log_ratio
    if ratio_norm:
        if std is None or mean is None or mean_old is None:
            raise ValueError("ratio_norm=True needs std, mean and mean_old")
        used = ratio_norm_log_ratio(log_ratio, std, mean, mean_old)  # [B, W]
    ratio = torch.exp(used)  # [B, W]
    adv = advantages.detach().to(dtype).reshape(-1, *([1] * (log_ratio.ndim - 1)))  # [B, 1]
    per_step, low, high = clipped_surrogate(ratio, adv, eps, eps)  # [B, W]
    # equal W per trajectory: mean over steps then trajectories == mean over all entries
    loss = per_step.reshape(per_step.shape[0], -1).mean(dim=1).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": (low | high).to(dtype).mean(),
            "clip_frac_low": low.to(dtype).mean(),
            "clip_frac_high": high.to(dtype).mean(),
            "approx_kl": (torch.exp(log_ratio) - 1 - log_ratio).mean(),  # k3 of KL(old || theta)
            "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
            "logratio_mean": log_ratio.mean(),
        }
        if ratio_norm:
            stats["logratio_normed_mean"] = used.mean()
        stats = {k: v.detach() for k, v in stats.items()}
    return loss, stats


def velocity_mse(v: torch.Tensor, v_ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Velocity regulariser ``(v - v_ref)^2`` (UniGRPO) at the same states.

    v, v_ref: [B, *latent]. reduction: ``"mean"`` (default) mean over all elements -> scalar;
    ``"sum"``: sum over latent elements, mean over samples -> scalar; ``"none"``: per-sample mean
    over latent elements -> [B]. ``v_ref`` is detached inside: the reference is frozen and the
    gradient must pull the policy towards it, never the reverse.
    """
    dtype = compute_dtype(v, v_ref)  # upcast: tiny squared differences underflow in bf16
    return _reduce((v.to(dtype) - v_ref.detach().to(dtype)) ** 2, reduction)


def latent_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor,
              reduction: str = "mean") -> torch.Tensor:
    """Exact KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) per element: ``(mean - mean_ref)^2 / (2 std^2)``.

    mean, mean_ref: [B, *latent] (or [B, W, *latent]); std: 0-d, [B] (or [B, W]), broadcast over
    the trailing latent dims; must be > 0. reduction as in :func:`velocity_mse` (``"mean"``:
    average over elements = the per-element KL; ``"sum"``: the true KL of the joint Gaussian,
    averaged over samples; ``"none"``: [B]). ``mean_ref`` and ``std`` are detached inside.
    """
    dtype = compute_dtype(mean, mean_ref, std)  # upcast: as for velocity_mse
    std = std.detach().to(dtype)
    std = std.reshape(*std.shape, *([1] * (mean.ndim - std.ndim)))  # [B, 1, ..., 1]
    per_elem = (mean.to(dtype) - mean_ref.detach().to(dtype)) ** 2 / (2 * std**2)
    return _reduce(per_elem, reduction)
