"""Credit assignment over the rounds of multi-round episodes (``algo.credit``; docs/training.md).

An episode of R rounds (think -> draw -> look -> reflect -> redraw) has one image per round; each
round's image is scored: ``R_{p,g,r}`` (a row that stopped keeps its image, so its later rounds
score that image again). ``live_{p,g,r}`` marks the rounds in which the row acted (round 0 always;
round r >= 1 while it had not stopped before). Advantages ``A_{p,g,r}`` go to every reasoning token
and window step of round r; a round that is not live carries no loss (``A = 0`` there, and the
rollout masks its tokens and window anyway).

- ``terminal`` (the UniGRPO paper's one-round advantage, extended): one group advantage of the
  FINAL image's reward, shared by every round:  ``A_{p,g,r} = GA(R_{p,:,R-1})_g``.
- ``per_round``: round r is judged by its own image plus how much it improved on the previous one,
  ``u_{p,g,r} = R_{p,g,r} + w (R_{p,g,r} - R_{p,g,r-1})`` (``u_0 = R_0``; ``w`` =
  ``algo.improvement_weight``), normalised within the group over the rows live at round r:
  ``A_{p,g,r} = GA_live(u_{p,:,r})_g``. A stop that keeps a wrong image scores its low ``R_r``
  with no improvement: it is not free against a sibling that fixed its image.
- ``tree``: each group holds M = G / K round-1 samples, each continued K times (``algo.tree_branches``;
  layout ``g = m K + k``, the K copies of a round-1 sample adjacent). Two levels of group
  advantages: the continuations of one round-1 sample are a group of K siblings judged by their final
  reward, ``A_{p,mK+k,r>=1} = GA(R_{p,mK:(m+1)K,R-1})_k``; the round-1 samples are ranked by the mean
  final reward of their continuations, ``A_{p,mK+k,0} = GA(mean_k R_{p,mK+k,R-1})_m``.

``GA`` is ``algo.advantages.group_advantages`` (scale, eps, clip alike); ``GA_live`` the same over a
group's live members only (:func:`masked_group_advantages`).
"""

from __future__ import annotations

import torch

from unigrpo.algo.advantages import SCALES, group_advantages

__all__ = ["CREDITS", "masked_group_advantages", "per_round_credit", "round_advantages", "terminal_credit",
           "tree_credit"]

CREDITS = ("terminal", "per_round", "tree")


def masked_group_advantages(rewards: torch.Tensor, mask: torch.Tensor, scale: str = "group", eps: float = 1e-4,
                            clip: float | None = None) -> torch.Tensor:
    """``group_advantages`` of rewards [P, G] over the members where ``mask`` [P, G] is True (mean and
    population std of those only; ``scale="batch"``: the std of every masked reward); 0 elsewhere,
    and 0 for a group whose masked rewards are all equal (or that has none)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r, m = rewards.detach(), mask.bool()
    r = r if r.is_floating_point() else r.float()  # integer / bool rewards: advantages are real numbers
    n = m.sum(1, keepdim=True).clamp_min(1)  # clamp: a group with no live member gets 0, not 0 / 0
    mean = torch.where(m, r, 0.0).sum(1, keepdim=True) / n
    centred = torch.where(m, r - mean, 0.0)  # [P, G]
    if scale == "group":
        adv = centred / ((centred ** 2).sum(1, keepdim=True) / n).sqrt().add(eps)
    elif scale == "batch":
        live = r[m]
        std = live.std(correction=0) if live.numel() else r.new_zeros(())
        adv = centred / (std + eps)
    else:
        adv = centred
    first = r.gather(1, m.float().argmax(1, keepdim=True))  # the first live reward of each group
    constant = (torch.where(m, r, first) == first).all(1, keepdim=True)
    adv = torch.where(constant | ~m, torch.zeros_like(adv), adv)
    return adv if clip is None else adv.clamp(-clip, clip)


def terminal_credit(rewards: torch.Tensor, live: torch.Tensor, **ga) -> torch.Tensor:
    """rewards, live [P, G, R] -> [P, G, R]: the final image's group advantage in every live round."""
    return group_advantages(rewards[..., -1], **ga)[..., None] * live


def per_round_credit(rewards: torch.Tensor, live: torch.Tensor, weight: float, **ga) -> torch.Tensor:
    """rewards, live [P, G, R] -> [P, G, R]: round r's own reward plus ``weight`` x its improvement,
    normalised over the group's rows live at round r (module docstring)."""
    gain = torch.zeros_like(rewards)
    gain[..., 1:] = rewards[..., 1:] - rewards[..., :-1]
    u = rewards + weight * gain  # [P, G, R]
    return torch.stack([masked_group_advantages(u[..., r], live[..., r], **ga) for r in range(u.shape[-1])], -1)


def tree_credit(rewards: torch.Tensor, live: torch.Tensor, branches: int, **ga) -> torch.Tensor:
    """rewards, live [P, G, R] with G = M x ``branches`` (copies of a round-1 sample adjacent) ->
    [P, G, R]: round 1 from the round-1 samples' mean final reward, later rounds from the siblings'
    final rewards (module docstring)."""
    p, g, r = rewards.shape
    if g % branches or g // branches < 2 or branches < 2:
        raise ValueError(f"tree credit needs a group of >= 2 round-1 samples x {branches} continuations, got {g}")
    final = rewards[..., -1].reshape(p, g // branches, branches)  # [P, M, K]
    siblings = group_advantages(final.reshape(-1, branches), **ga).reshape(p, g)  # level 2: [P, G]
    parents = group_advantages(final.mean(-1), **ga).repeat_interleave(branches, 1)  # level 1: [P, G]
    adv = siblings[..., None].expand(p, g, r).clone()
    adv[..., 0] = parents
    return adv * live


def round_advantages(algo, rewards: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``algo.credit``'s advantages [P, G, R] of every rank's rewards and live masks [P, G, R]."""
    ga = {"scale": algo.adv_scale, "eps": algo.adv_eps, "clip": algo.adv_clip}
    live = live.bool()
    if algo.credit == "terminal":
        return terminal_credit(rewards, live, **ga)
    if algo.credit == "per_round":
        return per_round_credit(rewards, live, algo.improvement_weight, **ga)
    if algo.credit == "tree":
        return tree_credit(rewards, live, algo.tree_branches, **ga)
    raise ValueError(f"algo.credit must be one of {CREDITS}, got {algo.credit!r}")
