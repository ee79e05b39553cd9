"""Text expert of the tiny unified model: a causal pre-LN transformer with a KV cache.

Sequences are ``[left-padded prompt | right-padded response]``; positions come from the mask so a
row's first real token is at position 0 whatever its padding. Every query may attend to itself,
which keeps padded query rows finite (their outputs are never used).
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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full causal pass. ids, mask [B, L] -> final hidden states [B, L, D] (after ln_f)."""
        return self.prefill(ids, mask)[0]

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Like ``forward`` but also returns the KV cache (for incremental decoding)."""
        length = ids.shape[1]
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = (causal[None] & mask[:, None, :]) | eye[None]  # [B, L, L]
        x, cache = self._embed(ids, positions), []
        for blk in self.blocks:
            x, kv = blk(x, allowed)
            cache.append(kv)
        return self.ln_f(x), cache

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
