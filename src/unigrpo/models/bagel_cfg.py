"""BAGEL's two-branch classifier-free guidance for EVALUATION (training stays CFG-free), written
from ByteDance-Seed/Bagel ``bagel.py: generate_image`` and ``inferencer.py: interleave_inference``:
a text branch (the context without prompt and reasoning) and an image branch (the context without
the reasoning), applied only inside a time interval and followed by CFG-renorm. Official
text-to-image settings: ``text_scale`` 4, ``img_scale`` 1.5 (``interleave_inference`` default),
``interval`` (0.4, 1], ``renorm`` global with ``renorm_min`` 0.

Image-to-image (``app.py: edit_image``, ``interleave_inference`` with ``[image, prompt]``): the
text branch is ``[sys][VAE][ViT]`` (the input image kept, prompt and reasoning dropped), the image
branch ``[sys][prompt]`` (both image blocks and the reasoning dropped); official edit settings:
``text_scale`` 4, ``img_scale`` 2, interval (0, 1], ``text_channel`` renorm (``EDIT``).

Deviation: the ``global`` renorm norm is taken per row (Bagel's is over the whole packed tensor,
which is one image only at batch size 1).
"""

from __future__ import annotations

import torch

from unigrpo.models.bagel_latent import PATCH, BagelContext, patchify, unpatchify
from unigrpo.models.protocol import TokenBatch

__all__ = ["EDIT", "cfg_contexts", "cfg_velocity"]

EDIT = {"img_scale": 2.0, "interval": (0.0, 1.0), "renorm": "text_channel"}  # app.py: edit_image


def cfg_contexts(model, tokens: TokenBatch) -> tuple[BagelContext, BagelContext]:
    """Bagel's two unconditional branches for ``tokens`` (``inferencer.py``): the text branch
    (system prompt alone in think mode, else empty; + the rows' input images when they have some)
    and the image branch (the rows without their reasoning and without input images:
    ``[sys][prompt]``, so for text-to-image ``img_scale`` weighs the reasoning's influence)."""
    keep = tokens.mask & ~tokens.response_mask
    _, ctx_img = model.forward_context(TokenBatch(tokens.ids.masked_fill(~keep, model.pad_id), keep,
                                                 torch.zeros_like(keep)))
    if tokens.images is None:
        return model.null_context(len(tokens)), ctx_img
    b, dev = len(tokens), tokens.ids.device
    sys = [model.pad_id] if model.system_prompt is None else model._segment(model.system_prompt)
    ids = torch.tensor([sys], device=dev).expand(b, -1)
    mask = torch.full_like(ids, model.system_prompt is not None, dtype=torch.bool)  # no sys: one masked column
    _, ctx_text = model.forward_context(TokenBatch(ids, mask, torch.zeros_like(mask), tokens.images, tokens.image_mask))
    return ctx_text, ctx_img


def cfg_velocity(model, x_t: torch.Tensor, t: torch.Tensor, ctx: BagelContext, ctx_text: BagelContext,
                 ctx_img: BagelContext, *, text_scale: float = 4.0, img_scale: float = 1.5,
                 interval: tuple[float, float] = (0.4, 1.0), renorm_min: float = 0.0,
                 renorm: str = "global") -> torch.Tensor:
    """Bagel's evaluation guidance (ByteDance-Seed/Bagel ``bagel.py: generate_image``), for
    evaluation only (training is CFG-free): ``v_text = v_t + s_text (v - v_t)``, then
    ``v_cfg = v_i + s_img (v_text - v_i)`` (when ``s_img > 1``), rescaled by
    ``clamp(|v| / |v_cfg|, renorm_min, 1)``: ``global`` = one norm per ROW (Bagel's whole-tensor
    norm is per image only at batch 1), ``channel`` = per latent token over its 64 values,
    ``text_channel`` = the channel renorm applied to ``v_text`` before the image branch.
    Rows whose t is outside ``(interval[0], interval[1]]`` get the conditional velocity, and so does
    every row when ``text_scale <= 1`` (Bagel applies the image branch inside the text branch)."""
    t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
    z, hh, ww = x_t.shape[1:]
    if text_scale <= 1.0:
        return model.velocity(x_t, t, ctx)
    v = patchify(model.velocity(x_t, t, ctx), PATCH)  # [B, N, 64]: Bagel's token space
    v_t = patchify(model.velocity(x_t, t, ctx_text), PATCH)

    def rescale(cond, guided, dims):
        norm_c, norm_g = cond.norm(dim=dims, keepdim=True), guided.norm(dim=dims, keepdim=True)
        return guided * (norm_c / (norm_g + 1e-8)).clamp(min=renorm_min, max=1.0)

    guided = v_t + text_scale * (v - v_t)
    if renorm == "text_channel":
        guided = rescale(v, guided, -1)
    if img_scale > 1.0:
        v_i = patchify(model.velocity(x_t, t, ctx_img), PATCH)
        guided = v_i + img_scale * (guided - v_i)
    if renorm in ("global", "channel"):
        guided = rescale(v, guided, (1, 2) if renorm == "global" else -1)
    elif renorm != "text_channel":
        raise ValueError(f"cfg renorm: {renorm!r} is not one of global, channel, text_channel")
    inside = ((t > interval[0]) & (t <= interval[1]))[:, None, None]
    return unpatchify(torch.where(inside, guided, v), z, hh // PATCH, ww // PATCH, PATCH)
