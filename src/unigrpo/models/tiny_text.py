"""Text expert of the tiny unified model: a causal pre-LN transformer with a KV cache, and the
small encoder through which it sees input images.

Sequences are ``[left-padded prompt | right-padded response]``; positions come from the mask so a
row's first real token is at position 0 whatever its padding. Every query may attend to itself,
which keeps padded query rows finite (their outputs are never used).

Input images (a model that ``sees_images``) enter as a **prefix** of the sequence, like Bagel's ViT
tokens before the text: :class:`PatchEncoder` turns each image into a grid of tokens (a strided conv
stem: on 2 CPU cores convolution learns shapes far faster than linear patches, docs/tiny_model.md)
with a learned position per grid cell and per image slot. The prefix attends to itself in both
directions; every text token attends to the whole prefix. Text positions are unchanged (the prefix
has its own position table), so a prompt's text layout does not depend on its images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H, T, dh]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, T, D]; allowed [B, T, S] bool (S = past + T keys). Returns (y, (k, v))."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.out(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, allowed, past=None):
        a, kv = self.attn(self.ln1(x), allowed, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class TextExpert(nn.Module):
    """Causal LM over the world's words: embeddings, blocks, final LN, LM head."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"sequence longer than model.max_seq_len={self.max_len}")
        return self.tok(ids) + self.pos(positions)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full causal pass. ids, mask [B, L] -> final hidden states [B, L, D] (after ln_f) of the
        text positions; ``prefix`` [B, P, D] (image tokens, mask [B, P]) is read before the text."""
        return self.prefill(ids, mask, prefix, prefix_mask)[0]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None = None,
                prefix_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Like ``forward`` but also returns the KV cache (for incremental decoding; it holds the
        prefix's keys first: ``decode_step``'s key mask must start with ``prefix_mask``)."""
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        x = self._embed(ids, positions)
        p = 0 if prefix is None else prefix.shape[1]
        if p:
            x, mask = torch.cat([prefix.to(x.dtype), x], 1), torch.cat([prefix_mask, mask], 1)
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        causal[:p, :p] = True  # the image tokens see each other in both directions
        eye = torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = (causal[None] & mask[:, None, :]) | eye[None]  # [B, P + L, P + L]
        cache = []
        for blk in self.blocks:
            x, kv = blk(x, allowed)
            cache.append(kv)
        return self.ln_f(x[:, p:]), cache

    def step(self, ids: torch.Tensor, position: torch.Tensor, key_mask: torch.Tensor,
             cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One new token per row. ids, position [B]; key_mask [B, S+1] over cached keys + this one."""
        x = self._embed(ids[:, None], position[:, None])
        allowed = key_mask.clone()
        allowed[:, -1] = True  # a query always sees itself (finished rows stay finite)
        allowed = allowed[:, None, :]  # [B, 1, S+1]
        new_cache = []
        for blk, past in zip(self.blocks, cache):
            x, kv = blk(x, allowed, past)
            new_cache.append(kv)
        return self.ln_f(x)[:, 0], new_cache


class PatchEncoder(nn.Module):
    """Input images -> prefix tokens of the text expert: a conv stem of stride 8 (a 32 px image is a
    4 x 4 grid: 16 tokens per image), a learned position per grid cell and per image slot.

    images [B, N, 3, S, S] in [0, 1], mask [B, N] -> tokens [B, N * T, D], their mask [B, N * T]."""

    def __init__(self, dim: int, image_size: int, max_images: int = 4):
        super().__init__()
        self.grid, self.max_images = image_size // 8, max_images
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(64, dim, 2, stride=2))
        self.pos = nn.Parameter(torch.randn(self.grid * self.grid, dim) * 0.02)
        self.slot = nn.Parameter(torch.randn(max_images, dim) * 0.02)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = images.shape[:2]
        if n > self.max_images:
            raise ValueError(f"a row holds {n} input images; the tiny model reads at most {self.max_images}")
        feats = self.stem(images.flatten(0, 1) * 2.0 - 1.0).flatten(2).transpose(1, 2)  # [B*N, T, D]
        t = feats.shape[1]
        tokens = feats.view(b, n, t, -1) + self.pos[None, None] + self.slot[:n, None][None]
        return tokens.reshape(b, n * t, -1), mask[:, :, None].expand(b, n, t).reshape(b, n * t)
