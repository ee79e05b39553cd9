"""DiffusionNFT image objective (docs/algorithm.md, "DiffusionNFT image objective"; arXiv 2509.16117).

A forward-process objective: no SDE, no log-probs, no ratio. For a trajectory's clean final latent
``x0``, a time ``t`` and fresh noise ``eps``:

    x_t  = (1 - t) x0 + t eps                        (the forward process; v = eps - x0)
    v+   = beta v + (1 - beta) v_old                 (implicit positive policy)
    v-   = (1 + beta) v_old - beta v                 (implicit negative policy)
    x0+- = x_t - t v+-                               (their clean-latent predictions)
    w+-  = max(mean |x0+- - x0|, 1e-5)               (adaptive weights, no gradient)
    r    = clamp(clamp(A, -C, C) / (2 C) + 1/2, 0, 1)   (optimality probability of the advantage)
    l    = C [ r mean((x0+ - x0)^2) / w+ + (1 - r) mean((x0- - x0)^2) / w- ] / beta

``mean`` is over the latent elements of one sample; the loss is the mean of ``l`` over samples
(and over the sampled times, by the caller). ``v_old`` is the old policy's velocity at the same
``(x_t, t)``: a constant of the objective (detached inside).

Why it works: at ``v = v_old`` both predictions equal the old one, ``x0_old``, and

    dl/dv = 2 t C (1 - 2 r) (x0_old - x0) / (D w)

so a step of gradient descent moves the prediction ``x_t - t v`` TOWARDS ``x0`` when ``r > 1/2``
(an above-average trajectory) and AWAY from it when ``r < 1/2``; ``r = 1/2`` (``A = 0``, e.g. a group
of equal rewards) gives no gradient. ``beta`` drops out of that gradient: it shapes the loss only
once ``v`` has moved away from ``v_old`` (a trust region around the old policy).
"""

from __future__ import annotations

import torch

from unigrpo.algo.sde import compute_dtype

__all__ = ["forward_noise", "implicit_velocities", "nft_loss", "optimality"]

_W_MIN = 1e-5  # floor of the adaptive weights (upstream): a perfect prediction does not divide by 0


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """Advantages [B] -> optimality probabilities r [B] in [0, 1]: ``clamp(A, -C, C) / (2 C) + 1/2``.

    ``A = 0`` gives 1/2 (no preference), ``A >= C`` gives 1, ``A <= -C`` gives 0. ``clip`` = C > 0."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    a = advantages.detach().to(compute_dtype(advantages)).clamp(-clip, clip)
    return (a / clip / 2 + 0.5).clamp(0, 1)


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``; x0, eps [B, *latent], t [B] (one time per sample)."""
    tt = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # [B, 1, ..., 1]
    return (1 - tt) * x0 + tt * eps


def implicit_velocities(v: torch.Tensor, v_old: torch.Tensor, beta: float):
    """``(v+, v-)``: the implicit positive and negative policies' velocities around ``v_old`` (detached)."""
    old = v_old.detach().to(v.dtype)
    return beta * v + (1 - beta) * old, (1 + beta) * old - beta * v


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)  # [B, *latent] -> [B]


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float = 1.0, scale: float = 5.0):
    """The DiffusionNFT loss at one time per sample (equations: module docstring).

    v (with gradient), v_old, x0, x_t: [B, *latent]; t, r: [B]; beta > 0; scale: C, the upstream
    ``adv_clip_max`` multiplier. Returns ``(loss, stats)``: the mean of ``l`` over samples, and
    detached 0-d stats: pos_loss, neg_loss (the two weighted terms, means over samples),
    old_deviation (mean (v - v_old)^2), v_old_diff_max (max |v - v_old|: exactly 0 when the model is
    the old policy), r_mean.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dtype = compute_dtype(v, x0, x_t)  # upcast: squared differences of bf16 velocities are too coarse
    v, x0, x_t = v.to(dtype), x0.detach().to(dtype), x_t.detach().to(dtype)
    tt = t.detach().to(dtype).reshape(-1, *([1] * (v.ndim - 1)))  # [B, 1, ..., 1]
    v_pos, v_neg = implicit_velocities(v, v_old.to(dtype), beta)
    terms = []
    for v_imp in (v_pos, v_neg):
        err = x_t - tt * v_imp - x0  # [B, *latent] clean-latent prediction error
        w = _per_sample_mean(err.detach().abs()).clamp_min(_W_MIN)  # [B], no gradient
        terms.append(_per_sample_mean(err**2) / w)  # [B]
    r = r.detach().to(dtype)
    pos, neg = r * terms[0], (1 - r) * terms[1]  # [B]
    loss = (scale * (pos + neg) / beta).mean()
    with torch.no_grad():
        diff = v - v_old.to(dtype)
        stats = {"pos_loss": pos.mean(), "neg_loss": neg.mean(), "old_deviation": (diff**2).mean(),
                 "v_old_diff_max": diff.abs().max(), "r_mean": r.mean()}
    return loss, {k: s.detach() for k, s in stats.items()}
