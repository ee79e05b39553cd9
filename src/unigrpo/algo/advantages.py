"""Group-relative advantages (GRPO; docs/algorithm.md, "Advantages").

    A_{p,g} = (R_{p,g} - mean_g R_{p,:}) / (std + eps)

Every reasoning token and every trained denoising step of trajectory ``(p, g)`` gets ``A_{p,g}``.

Choices (deliberate, documented):

- **Population std** (ddof 0, as flow_grpo / ``np.std``), not Bessel's (TRL uses ddof 1).
- ``scale="batch"``: the mean is still per group, the std is that of ALL rewards of the batch
  (flow_grpo's ``global_std``); ``scale="none"``: centred rewards only (Dr. GRPO).
- A group whose rewards are all equal gets exactly 0 (not ``~1e-13 / eps``: float means of equal
  numbers need not equal them), never NaN; its fraction is :func:`zero_variance_fraction`.
  Such groups are kept (they contribute zero policy gradient), not dropped.
- Rewards spread over ranks must be gathered before calling this (groups must be complete).
"""

from __future__ import annotations

import torch

__all__ = ["SCALES", "group_advantages", "zero_variance_fraction"]

SCALES = ("group", "batch", "none")


def _as_rewards(rewards) -> torch.Tensor:
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.float32)  # integer / bool rewards: advantages are real numbers
    if r.ndim != 2:
        raise ValueError(f"rewards must be laid out [prompts, group], got shape {tuple(r.shape)}")
    return r


def group_advantages(rewards, scale: str = "group", eps: float = 1e-4,
                     clip: float | None = None) -> torch.Tensor:
    """Group-normalised advantages ``(R - mean_group R) / (std + eps)``, optionally clipped.

    rewards: [P, G] (P prompts, G trajectories each). scale: ``"group"`` (std of each group),
    ``"batch"`` (std of all P*G rewards), ``"none"`` (no division). eps: added to the std (why:
    keeps near-constant groups finite; paper code 1e-4). clip: clamp to ``[-clip, clip]`` if set.
    Returns  # [P, G], same dtype as the (float) rewards
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    r = _as_rewards(rewards).detach()  # [P, G]; rewards are data, never differentiated
    centred = r - r.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "group":
        adv = centred / (r.std(dim=1, correction=0, keepdim=True) + eps)  # [P, G] / [P, 1]
    elif scale == "batch":
        adv = centred / (r.std(correction=0) + eps)  # [P, G] / []
    else:
        adv = centred
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    # exact 0 for constant groups: their float mean may differ from the value, and with eps = 0
    # (or an all-constant batch) the division would be 0 / 0 = NaN
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def zero_variance_fraction(rewards) -> float:
    """Fraction of groups (rows of ``rewards`` [P, G]) whose rewards are all equal (no signal)."""
    r = _as_rewards(rewards)
    return float((r == r[:, :1]).all(dim=1).to(torch.float32).mean())
