"""Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) on the velocity field.

``v = v_uncond + s (v_cond - v_uncond)``; the unconditional branch reads the model's null context
(neither prompt nor reasoning). UniGRPO trains without it (``s = 1``: one model call per step);
the FlowGRPO baseline guides in rollout AND training, so both go through this one function and the
first update's ratio stays exactly 1 either way. A model (or reference) with a
``combine_guidance(v_cond, v_uncond, cfg_scale)`` method combines the two velocities its own way
(Qwen-Image's pipeline rescales the guided velocity to the conditional one's norm per token).
"""

from __future__ import annotations

import torch

__all__ = ["guided_velocity"]


def guided_velocity(model, x_t: torch.Tensor, t: torch.Tensor, ctx, null_ctx, cfg_scale: float) -> torch.Tensor:
    """``model.velocity`` at (x_t [B, *latent], t [B]) guided with scale ``cfg_scale``; a single
    call when ``cfg_scale == 1`` or there is no ``null_ctx``. ``model`` is a policy or a reference."""
    if cfg_scale == 1.0 or null_ctx is None:
        return model.velocity(x_t, t, ctx)
    v_cond = model.velocity(x_t, t, ctx)
    v_uncond = model.velocity(x_t, t, null_ctx)
    combine = getattr(model, "combine_guidance", None)
    if combine is not None:
        return combine(v_cond, v_uncond, cfg_scale)
    return v_uncond + cfg_scale * (v_cond - v_uncond)
