"""One stochastic denoising step with its Gaussian log-probability (docs/algorithm.md).

The image policy of Flow-GRPO / UniGRPO: a step ``t -> t_next`` (``dt = t_next - t < 0``) draws
``x_next ~ N(mean(x_t, v), std^2 I)``; its log-density is the per-step action log-probability.

``kind="flow_sde"`` (Flow-GRPO, arXiv 2505.05470; the marginal-preserving reverse SDE of the
rectified flow, discretised by Euler-Maruyama):

    sigma_t = a sqrt(t / (1 - t~))              t~ = t, except at t = 1 where t~ = t_next
    mean    = x_t (1 + sigma_t^2 dt / (2 t)) + v (1 + sigma_t^2 (1 - t) / (2 t)) dt
    std     = sigma_t sqrt(-dt)

``kind="cps"`` (coefficient-preserving sampling, arXiv 2509.05952):

    x0^ = x_t - t v,   x1^ = x_t + (1 - t) v,   std = t_next sin(a pi / 2)
    mean = (1 - t_next) x0^ + sqrt(t_next^2 - std^2) x1^

``kind="ode"``: the Euler step ``x_next = x_t + dt v`` (std 0).

Marginals (checked in tests/algo/test_sde.py with the exact velocity of Gaussian data):
``flow_sde`` and ``ode`` converge to the flow's marginals as the steps shrink (flow_sde's first
steps near t = 1 over-disperse by ~a^4 pi^2/24 whatever the step count, since |dt| / (1 - t) ~ 1/k
there; that error then decays). ``cps`` keeps the mean exactly and is exact when ``x0 | x_t`` is
deterministic, but otherwise under-disperses by ``c^2 Var(x0 | x_t)`` per step, which does not
vanish with more steps (it re-noises an O(1) fraction around the posterior mean each step).

Choices (deliberate, documented):

- **t~ at t = 1.** ``sigma_t`` diverges at ``t = 1``; as in the reference code (which uses the
  second grid point ``sigmas[1]``) we use ``t~ = t_next`` there, i.e. the next grid point of the
  first step. ``t_first_next`` overrides that point (only needed if the first step is taken with a
  ``t_next`` that is not the grid's ``t_1``).
- **noise_level == 0** (any kind) and ``kind="ode"`` take the Euler step ``x_t + (t_next - t) v``
  bit-exactly (with ``t``, ``t_next`` in the compute dtype, e.g. taken from the
  :func:`~unigrpo.algo.schedule.timesteps` grid), draw no noise, and report ``std = 0``.
- **std == 0 => log_prob = 0.** A deterministic step (ODE, ``a = 0``, or CPS at ``t_next = 0``)
  has no density; it is treated as a probability-1 action: ``log_prob = 0``, ratio 1, no gradient.
  The computation is guarded so that no NaN/inf appears in values or gradients.
- **dtypes.** All SDE math runs in float32, or float64 when ``x_t`` or ``v`` is float64 (bf16/fp16
  inputs are upcast). The sampled ``prev_sample`` is returned in that compute dtype, NOT cast back
  to the input dtype: the log-prob is that of exactly the returned tensor, and re-scoring the stored
  sample later gives the identical value (ratio == 1 on the first update). Keep the latent chain in
  float32; only ``v`` needs to come out of a low-precision model. In scoring mode the given
  ``prev_sample`` is returned unchanged (it is upcast only inside the log-prob).
- **log_prob reduction** over all non-batch elements: ``"mean"`` (default, reference code) or
  ``"sum"`` (the true joint log-density). Clip ranges only mean something with their reduction.
- **cps log-prob** is the exact Gaussian density (as for flow_sde); the flow_grpo reference code uses
  ``-(x_next - mean)^2`` (no ``1 / (2 std^2)``, no constants), so its cps clip ranges do not
  transfer to ours.
- ``prev_sample`` is detached inside the log-prob: the policy gradient differentiates the density
  of a fixed action, not the sample (score-function estimator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KINDS", "SDEStepResult", "gaussian_log_prob", "sde_step", "sde_window"]

KINDS = ("flow_sde", "cps", "ode")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class SDEStepResult:
    """Output of :func:`sde_step`."""

    prev_sample: torch.Tensor  # [B, *latent] x_next (sampled, or the given one when scoring)
    log_prob: torch.Tensor  # [B] log p(x_next | x_t), reduced over latent elements
    mean: torch.Tensor  # [B, *latent] mean of the step Gaussian (compute dtype)
    std: torch.Tensor  # [B] std of the step Gaussian (same for every element of a sample)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (upcast bf16/fp16: log-probs need precision)."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _as_time(t, like: torch.Tensor) -> torch.Tensor:
    """python float / 0-d / [B] time -> tensor broadcastable against ``like`` [B, *latent]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))  # [B, 1, ..., 1]: one time per sample
    return t


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2) per element, reduced over all non-batch dims; 0 where ``std == 0``.

    ``-(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``; ``x``, ``mean`` [B, *latent],
    ``std`` 0-d, [B] or [B, 1, ..., 1]. Returns  # [B]
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if std.ndim == 1:
        std = std.reshape(-1, *([1] * (mean.ndim - 1)))  # [B] -> [B, 1, ..., 1]
    if std.ndim and any(n != 1 for n in std.shape[1:]):
        raise ValueError(f"std must be 0-d, [B] or [B, 1, ..., 1] (one std per sample), got shape {tuple(std.shape)}")
    stochastic = std > 0
    # scalar fill values: no ones_like / zeros_like tensors (an allocation each, per call)
    safe_std = torch.where(stochastic, std, 1.0)  # why: no 1/0 in value or gradient
    action = x.detach().to(mean.dtype)  # detach: density of a fixed action (score-function grad)
    lp = -(action - mean) ** 2 / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI  # [B, *latent]
    lp = lp.reshape(lp.shape[0], -1)  # [B, D]
    lp = lp.mean(dim=1) if reduction == "mean" else lp.sum(dim=1)  # [B]
    # deterministic step: probability-1 action. Zeroing the reduced row equals zeroing every element
    # (lp is finite there: safe_std = 1), and costs a [B] select instead of a [B, D] one.
    return torch.where(stochastic.reshape(-1).expand(lp.shape[0]), lp, 0.0)


def _flow_sde_mean_std(x, v, t, t_next, a: float, t_tilde_first):
    dt = t_next - t
    t_tilde = torch.where(t == 1, t_tilde_first, t)  # why: sigma_t = a sqrt(t/(1-t)) is inf at t=1
    sigma2 = a**2 * t / (1 - t_tilde)  # sigma_t^2
    mean = x * (1 + sigma2 * dt / (2 * t)) + v * (1 + sigma2 * (1 - t) / (2 * t)) * dt
    std = torch.sqrt(sigma2 * -dt)
    return mean, std


def _cps_mean_std(x, v, t, t_next, a: float):
    x0_hat = x - t * v  # predicted data
    x1_hat = x + (1 - t) * v  # predicted noise
    std = t_next * math.sin(a * math.pi / 2)
    # clamp: t_next^2 - std^2 = t_next^2 cos^2(a pi/2) >= 0, but rounding can make it slightly < 0
    mean = (1 - t_next) * x0_hat + torch.sqrt((t_next**2 - std**2).clamp_min(0)) * x1_hat
    return mean, std


def sde_step(x_t: torch.Tensor, v: torch.Tensor, t, t_next, noise_level: float,
             kind: str = "flow_sde", prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean",
             t_first_next=None) -> SDEStepResult:
    """One denoising step ``t -> t_next`` and ``log p(x_next | x_t)`` (equations: module docstring).

    x_t, v: [B, *latent]; t, t_next: python float, 0-d tensor or [B] (one time per sample).
    noise_level: ``a`` (python float). prev_sample: [B, *latent] -- if given it is scored, not
    sampled (no noise is drawn). generator: for the noise. reduction: of the log-prob over latent
    elements, ``"mean"`` or ``"sum"``. t_first_next: ``t~`` used where ``t == 1`` (default
    ``t_next``). Returns :class:`SDEStepResult` (log_prob [B], mean [B, *latent], std [B]).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    dtype = compute_dtype(x_t, v)
    x, vel = x_t.to(dtype), v.to(dtype)  # upcast: SDE math and log-probs in float32+
    t_, t_next_ = _as_time(t, x), _as_time(t_next, x)
    batch = x.shape[0]
    deterministic = kind == "ode" or noise_level == 0
    if deterministic:
        mean = x + (t_next_ - t_) * vel  # Euler step, bit-exact x_t + (t_next - t) v
        std = torch.zeros((), dtype=dtype, device=x.device)
    elif kind == "flow_sde":
        t_first = t_next_ if t_first_next is None else _as_time(t_first_next, x)
        mean, std = _flow_sde_mean_std(x, vel, t_, t_next_, noise_level, t_first)
    else:
        mean, std = _cps_mean_std(x, vel, t_, t_next_, noise_level)
    std = torch.broadcast_to(std, (batch,) + (1,) * (x.ndim - 1))  # [B, 1, ..., 1]
    if prev_sample is None:
        if deterministic:
            prev_sample = mean
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
            prev_sample = mean + std * noise  # [B, *latent]
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)  # [B]
    return SDEStepResult(prev_sample, log_prob, mean, std.reshape(batch).contiguous())


def sde_window(num_steps: int, window_size: int, window_range,
               generator: torch.Generator | None = None) -> list[int]:
    """Indices of the ``window_size`` consecutive stochastic, trained steps (Flow-GRPO-Fast).

    The start is uniform over ``{lo, ..., hi - window_size}`` with ``window_range = (lo, hi)``, so
    every trained step index lies in ``[lo, hi)`` (half-open) and in ``[0, num_steps)``; step ``k``
    goes from ``t_k`` to ``t_{k+1}``. Returns a sorted python list of ints, e.g. ``[1, 2, 3]``.
    Paper: num_steps 25, window_range (0, 5), window_size 3.
    """
    lo, hi = (int(x) for x in window_range)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"window_range must satisfy 0 <= lo < hi <= num_steps ({num_steps}), "
                         f"got {tuple(window_range)}")
    if not 1 <= window_size <= hi - lo:
        raise ValueError(f"window_size must be in [1, hi - lo = {hi - lo}] for window_range "
                         f"{tuple(window_range)}, got {window_size}")
    start = int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator))
    return list(range(start, start + window_size))
