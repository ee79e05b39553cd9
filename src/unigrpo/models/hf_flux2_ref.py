"""Reference images of FLUX.2 [klein] (``Flux2KleinPipeline(image=...)``): what the pipeline does to a
reference before its transformer reads it, written over tensors so that ``hf_flux2.Flux2Klein`` can
condition its denoiser on each row's own references (the pipeline shares one list over the batch).
References: diffusers' ``pipelines/flux2/pipeline_flux2_klein.py`` (``__call__`` step 4,
``prepare_image_latents``, ``_prepare_image_ids``) and ``pipelines/flux2/image_processor.py``.

- **Preprocessing** (``reference_pixels``): the pipeline floors each side to a multiple of
  ``2 * vae_scale_factor`` and center-crops to it (``Flux2ImageProcessor._resize_and_crop`` crops,
  it does not resize), then maps [0, 1] to [-1, 1]. Deviations: a reference above 1024 x 1024
  pixels, which the pipeline resizes to about one megapixel with PIL's Lanczos filter, is refused
  (resize it before; a Lanczos resize over tensors would not be the pipeline's); the pipeline's
  input checks (sides >= 64 px, aspect ratio <= 8) are not made, so tiny tests can use small images.
- **Latents**: each reference through the VAE's mode, patchified 2x2 and normalised by the VAE's
  BatchNorm statistics (``Flux2Klein.encode_images``, the pipeline's ``_encode_vae_image``).
- **Tokens** (``pack_references``): the references of a row packed ``[h * w, C]`` each and
  concatenated along the sequence; **position ids** (``reference_ids``) ``(T, H, W, L) =
  (10 + 10 i, row, col, 0)`` for reference ``i``: references are told apart in "time", not shifted
  in space. The transformer reads ``[noisy | references]`` with ``[latent ids | reference ids]``
  at every step, at the step's timestep, and its output is cut back to the noisy tokens.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_AREA", "REF_TIME_SCALE", "check_reference_size", "pack_references", "reference_ids",
           "reference_pixels"]

MAX_AREA = 1024 * 1024  # above this many pixels the pipeline resizes a reference (Lanczos): refused here
REF_TIME_SCALE = 10  # reference i sits at time coordinate 10 + 10 i (the pipeline's _prepare_image_ids scale)


def check_reference_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The (height, width) the pipeline crops a ``height x width`` reference to (each side floored to
    ``multiple``); ValueError (one line) for a reference it would resize or could not use."""
    if height * width > MAX_AREA:
        raise ValueError(f"reference image of {width}x{height} pixels: above 1024x1024 the pipeline resizes it "
                         "(Lanczos); resize it to at most 1024x1024 pixels first")
    h, w = height // multiple * multiple, width // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"reference image of {width}x{height} pixels: each side must be at least {multiple} "
                         "(the pipeline crops sides to multiples of 2 * the VAE's scale factor)")
    return h, w


def reference_pixels(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """References [n, 3, H, W] in [0, 1] -> the pipeline's crop [n, 3, h, w], still in [0, 1]
    (``h, w``: ``check_reference_size``; the crop is centred as ``_resize_and_crop`` centres it)."""
    big_h, big_w = images.shape[-2:]
    h, w = check_reference_size(big_h, big_w, multiple)
    top, left = (big_h - h) // 2, (big_w - w) // 2
    return images[..., top:top + h, left:left + w]


def reference_ids(count: int, height: int, width: int, device) -> torch.Tensor:
    """[count * height * width, 4] position ids of ``count`` references of ``height x width``
    latent tokens, reference-major then row-major: ``(10 + 10 i, row, col, 0)``."""
    t = REF_TIME_SCALE + REF_TIME_SCALE * torch.arange(count, device=device)
    hh, ww = torch.arange(height, device=device), torch.arange(width, device=device)
    return torch.cartesian_prod(t, hh, ww, torch.zeros(1, dtype=torch.long, device=device))


def pack_references(refs: torch.Tensor) -> torch.Tensor:
    """Reference latents [B, n, C, h, w] -> tokens [B, n * h * w, C] (each packed row-major, the
    references one after the other: the order of ``reference_ids``)."""
    b, n, c, h, w = refs.shape
    return refs.permute(0, 1, 3, 4, 2).reshape(b, n * h * w, c)
