"""Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) on the velocity field.

``v = v_uncond + s (v_cond - v_uncond)``; the unconditional branch reads the model's null context
(neither prompt nor reasoning). UniGRPO trains without it (``s = 1``: one model call per step);
the FlowGRPO baseline guides in rollout AND training, through one function
(``rollout.guided_velocity``), so the first update's ratio stays exactly 1 either way. A model may
combine the two velocities its own way (``combine_guidance``: Qwen-Image's pipeline rescales the
guided velocity to the conditional one's norm per token); this is the plain rule.
"""

from __future__ import annotations

import torch

__all__ = ["cfg_blend"]


def cfg_blend(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """``v_u + s (v_c - v_u)``, elementwise; ``s = 1`` returns ``v_cond``'s values."""
    return v_uncond + cfg_scale * (v_cond - v_uncond)
