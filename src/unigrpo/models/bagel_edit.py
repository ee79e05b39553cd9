"""How input images enter BAGEL's context (image-to-image and looking at an image), written from
ByteDance-Seed/Bagel ``inferencer.py: update_context_image`` and ``bagel.py: prepare_vae_images /
forward_cache_update_vae / prepare_vit_images / forward_cache_update_vit``.

Every input image adds two blocks to the context, the **VAE block first, then the ViT block**,
between the system segment and the prompt (Bagel's ``[sys][VAE][ViT][prompt]``, reasoning after):

- VAE block: ``<|vision_start|>``, the clean input latent's tokens (``vae2llm(patchify(z)) +
  time_embedder(0) + latent_pos_embed``), ``<|vision_end|>``; the latents run through the gen
  expert, the markers through the und expert (Bagel's ``mode="gen"``);
- ViT block: ``<|vision_start|>``, ``connector(vit_model(patches)) + vit_pos_embed``,
  ``<|vision_end|>``, all through the und expert (``mode="und"``).

Each block sits at ONE RoPE position (all its tokens), with full attention inside it; the text
after the blocks continues two positions later per image. Bagel builds this incrementally (one
cache update per block); here it is ONE pass: the image blocks are stored in columns before the
left-padded text (all the VAE latents first, so the gen expert gets one contiguous slice) and the
attention mask is read from the positions: a token sees every real key at a position <= its own
(text: causal; a block: itself and everything before it). Since no key depends on a later one,
this is the incremental computation in one call.

Transforms (``data/transforms.py``): the input is resized to the model's ``resolution`` for the
VAE (Bagel resizes to multiples of 16 within (512, 1024) and draws the output at that size; the
output here is ``resolution`` square, so the input is taken to that square) and from there to
Bagel's ViT size (``bagel_vit.resize_size`` with stride = the ViT patch), both mapped to [-1, 1].
The VAE latent is the posterior MEAN (``bagel_vae``; Bagel samples it).

Gradients: the VAE block's embeddings (``vae2llm``, ``time_embedder``) are computed without
gradient and its gen-expert weights are read detached in this pass, so the text loss trains the
und expert only (and no image-side tensor gets a gradient from the context pass, also without
``algo.detach_context``); the image loss trains the gen expert through the velocity block. The
ViT path is frozen and runs without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrpo.models.bagel_latent import PATCH, patchify
from unigrpo.models.bagel_vit import flattened_position_ids, resize, resize_size, vit_patches
from unigrpo.models.hf_text import positions
from unigrpo.models.protocol import TokenBatch

__all__ = ["EditCache", "ImagePart", "image_part", "position_mask", "text_positions"]


@dataclass
class ImagePart:
    """The image blocks of a batch, column-stored: ``emb`` [B, M, H], RoPE ``pos`` [B, M], ``mask``
    [B, M] (False on a row's padded image slots); the first ``n_gen`` columns are VAE latents (gen
    expert); ``shift`` [B]: 2 x the row's images (how far its prompt moves)."""

    emb: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    n_gen: int
    shift: torch.Tensor


@dataclass
class EditCache:
    """The decode engine's cache of a batch with images: per-layer K/V over [image columns | text],
    the image columns' mask and each row's position shift (the engine counts text tokens only)."""

    kv: list
    image_mask: torch.Tensor
    shift: torch.Tensor


def sys_length(model) -> int:
    """Tokens of the system segment before the image blocks (0 without thinking)."""
    return 0 if model.system_prompt is None else len(model._segment(model.system_prompt))


@torch.no_grad()  # an input to the context, like the text's ids (module docstring: Gradients)
def vae_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [0, 1] -> [n, h w, H]: the clean latents' embeddings at t = 0."""
    side = model.resolution
    z = model.encode_images(resize(images, (side, side)))  # [n, z, side / 8, side / 8]
    h, w = z.shape[2] // PATCH, z.shape[3] // PATCH
    dtype = model.vae2llm.weight.dtype
    t0 = torch.zeros(z.shape[0], device=z.device)
    return model.vae2llm(patchify(z, PATCH).to(dtype)) + model.time_embedder(t0)[:, None] \
        + model.latent_pos_embed(h, w)[None]


def vit_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [0, 1] -> [n, N, H]: ViT + connector + ViT position table (frozen: no grad)."""
    c = model.vit_model.config
    side = model.resolution
    size = resize_size(side, side, model.vit_max_size, model.vit_min_size, c.patch_size)
    x = resize(resize(images, (side, side)), size) * 2 - 1
    with torch.no_grad():
        dtype = model.connector.fc1.weight.dtype
        ids = flattened_position_ids(*size, c.patch_size, c.max_side, x.device)
        feats = model.connector(model.vit_model(vit_patches(x, c.patch_size).to(dtype), ids))
        return feats + model.vit_pos_embed(size[0] // c.patch_size, size[1] // c.patch_size)[None]


def image_part(model, tokens: TokenBatch) -> ImagePart:
    """The image blocks of ``tokens``' rows (module docstring), slot j of a row at positions
    ``s + 2 j`` (VAE) and ``s + 2 j + 1`` (ViT), ``s`` the system segment's length."""
    b, n = tokens.image_mask.shape
    flat = tokens.images.flatten(0, 1)  # [B N, 3, H, W]
    lat = vae_tokens(model, flat).unflatten(0, (b, n))  # [B, N, n_vae, H]
    vit = vit_tokens(model, flat).unflatten(0, (b, n)).to(lat.dtype)
    marks = model.language_model.model.embed_tokens(
        torch.tensor([model.ids["vision_start"], model.ids["vision_end"]], device=lat.device))
    vs, ve = marks[0].expand(b, 1, -1), marks[1].expand(b, 1, -1)
    n_vae, n_vit = lat.shape[2], vit.shape[2]
    s = sys_length(model)
    dev = lat.device
    parts, pos, mask = [lat.flatten(1, 2)], [], []
    for j in range(n):
        parts += [vs, ve, vs, vit[:, j], ve]
    for j in range(n):  # the latents' columns (first), then each slot's markers + ViT tokens
        pos.append(torch.full((n_vae,), s + 2 * j, device=dev))
        mask.append(tokens.image_mask[:, j:j + 1].expand(b, n_vae))
    for j in range(n):
        pos.append(torch.tensor([s + 2 * j] * 2 + [s + 2 * j + 1] * (n_vit + 2), device=dev))
        mask.append(tokens.image_mask[:, j:j + 1].expand(b, n_vit + 4))
    return ImagePart(torch.cat(parts, 1), torch.cat(pos)[None].expand(b, -1), torch.cat(mask, 1), n * n_vae,
                     2 * tokens.image_mask.long().sum(1))


def text_positions(model, mask: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, L] of left-padded text whose tokens after the system segment move by ``shift``."""
    pos = positions(mask)
    return pos + shift[:, None] * (pos >= sys_length(model))


def position_mask(pos: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, K, K] of a pass whose queries are its keys: query q sees real key k
    iff ``pos[k] <= pos[q]`` (module docstring), and itself (a padded query row is never empty)."""
    k = pos.shape[1]
    allowed = key_mask[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
    return (allowed | torch.eye(k, dtype=torch.bool, device=pos.device))[:, None]
