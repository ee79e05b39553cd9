"""The built-in tiny unified model: a text expert and an image expert in one object (Bagel-like MoT).

- Text expert (``tiny_text.TextExpert``): causal transformer + LM head over the world's words.
- Image expert (``tiny_image.ImageExpert``): its own weights, flow-time embedding, velocity head;
  reads the text expert's final hidden states of prompt + reasoning at every denoising step.

Implements ``unigrpo.models.protocol.UnifiedModel``. It is both the CPU demo model and the test
fixture every adapter's conformance tests are modelled on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny_image import ImageExpert
from unigrpo.models.tiny_text import TextExpert
from unigrpo.utils import dist

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"builtin:sft": ASSETS / "tiny_sft.safetensors"}


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int
    d_text: int = 128
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, int, int] = (48, 96, 96)
    image_size: int = 32
    max_seq_len: int = 64


@dataclass
class TextContext:
    """What the image expert reads: text hidden states [B, L, D] and their mask [B, L]."""

    hidden: torch.Tensor
    mask: torch.Tensor

    def index(self, idx) -> TextContext:
        return TextContext(self.hidden[idx], self.mask[idx])


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from softmax(logits) restricted to the top-p nucleus. [B, V] -> [B]."""
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class TinyUnifiedModel(nn.Module):
    """Tiny reason-then-draw model over the shapes world (see module docstring)."""

    def __init__(self, cfg: TinyConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.pad_id = tokenizer.pad_id
        self.text = TextExpert(cfg.vocab_size, cfg.d_text, cfg.text_layers, cfg.text_heads, cfg.max_seq_len)
        self.image = ImageExpert(cfg.d_text, tuple(cfg.unet_channels))
        half = cfg.image_size // 2
        self.latent_shape = (12, half, half)

    # ----------------------------------------------------------------- text phase
    def encode_prompts(self, prompts: list[str]) -> TokenBatch:
        rows = [[self.tokenizer.bos_id, *self.tokenizer.encode(p)] for p in prompts]
        return TokenBatch.left_padded(rows, self.pad_id, self.text.tok.weight.device)

    @torch.no_grad()
    def sample_reasoning(self, prompts: TokenBatch, *, max_new_tokens: int, temperature: float = 1.0,
                         top_p: float = 1.0, generator: torch.Generator | None = None,
                         use_cache: bool = True, return_logprobs: bool = False):
        """Autoregressive sampling until ``<eos>`` or ``max_new_tokens``; rows stop independently.
        With ``return_logprobs``: (tokens, decode-time log-probs [B, L] of the sampled tokens)."""
        ids, mask = prompts.ids, prompts.mask
        b = ids.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        new_ids, new_mask, new_logp = [], [], []
        hidden, cache = self.text.prefill(ids, mask)
        h_last = hidden[:, -1]
        position = mask.long().sum(1)  # next position per row (prompts are left-padded)
        for _ in range(max_new_tokens):
            logits = self.text.head(h_last) / temperature
            tok = sample_top_p(logits, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            if return_logprobs:  # of the temperature-scaled distribution, as forward_context scores (top_p: not renormalised)
                new_logp.append(logits.float().log_softmax(-1).gather(1, tok[:, None])[:, 0] * ~done)
            new_ids.append(tok)
            new_mask.append(~done)
            done = done | (tok == self.tokenizer.eos_id)
            if bool(done.all()):
                break
            key_mask = torch.cat([mask, torch.stack(new_mask, 1)], 1)
            if use_cache:
                h_last, cache = self.text.step(tok, position, key_mask, cache)
            else:  # reference path for tests: recompute the whole sequence every token
                full = torch.cat([ids, torch.stack(new_ids, 1)], 1)
                h_last = self.text(full, key_mask)[:, -1]
            position = position + (~done).long()
        return prompts.with_sampled(new_ids, new_mask, new_logp if return_logprobs else None)

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        """Append given response texts (+ ``<eos>``) to prompts, as if they had been sampled."""
        return prompts.with_responses([self.tokenizer.encode(r) + [self.tokenizer.eos_id] for r in responses],
                                      self.pad_id)

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        out = []
        for ids, m in zip(tokens.ids.tolist(), tokens.response_mask.tolist()):
            out.append(self.tokenizer.decode([i for i, keep in zip(ids, m) if keep], skip_special=False))
        return out

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, TextContext]:
        """One teacher-forced pass -> (logp [B, L] of response tokens, zero elsewhere; context)."""
        hidden = self.text(tokens.ids, tokens.mask)  # [B, L, D]
        # Token i is predicted from position i - 1; logits are divided by the sampling temperature
        # so the log-probs are those of the distribution that was actually sampled.
        logits = self.text.head(hidden[:, :-1]).float() / temperature
        logp_next = torch.gather(logits.log_softmax(-1), 2, tokens.ids[:, 1:, None])[..., 0]
        logp = F.pad(logp_next, (1, 0)) * tokens.response_mask
        return logp, TextContext(hidden, tokens.mask)

    def null_context(self, batch_size: int) -> TextContext:
        hidden = self.image.null_ctx.expand(batch_size, 1, -1)
        return TextContext(hidden, torch.ones(batch_size, 1, dtype=torch.bool, device=hidden.device))

    @staticmethod
    def detach_context(ctx: TextContext) -> TextContext:
        return TextContext(ctx.hidden.detach(), ctx.mask)

    # ----------------------------------------------------------------- image phase
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: TextContext) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        return self.image(x_t, t, ctx.hidden, ctx.mask)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(x0.float(), 2) + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2.0 - 1.0, 2)

    # ----------------------------------------------------------------- lifecycle
    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.text.parameters())

    def image_parameters(self) -> list[nn.Parameter]:
        return list(self.image.parameters())

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return {"text": [(f"text.{n}", p) for n, p in self.text.named_parameters()],
                "image": [(f"image.{n}", p) for n, p in self.image.named_parameters()]}

    def reference(self) -> TinyUnifiedModel:
        """A frozen copy (9 MB: the cheapest reference here; a large adapter disables LoRA or
        snapshots only its trainable weights instead)."""
        return copy.deepcopy(self).requires_grad_(False).eval()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The whole state: both experts are trainable (one process holds it all, no gathering)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:  # checked first: a rejected state leaves the model untouched
            raise ValueError(f"trainable state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(state)

    def wrap(self, ranks) -> None:
        dist.broadcast_parameters(self, ranks)  # every rank starts from rank 0's weights

    def reduce_gradients(self, params: list[nn.Parameter], ranks) -> None:
        dist.average_gradients(params, ranks)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Weights as safetensors; config and tokenizer vocabulary in its metadata (one file)."""
        from safetensors.torch import save

        from unigrpo.utils.checkpoint import atomic_save

        meta = {"config": json.dumps(asdict(self.cfg)), "tokenizer": json.dumps(self.tokenizer.to_dict()),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # atomic (tmp + fsync + rename): a crash mid-save never leaves a half-written file at `path`
        atomic_save(lambda f: f.write(save(state, metadata=meta)), path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TinyUnifiedModel:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from unigrpo.utils.checkpoint import check_fits, nonfinite_tensor
        from unigrpo.utils.errors import CheckpointError
        from unigrpo.world.tokenizer import WordTokenizer

        path = BUILTIN.get(str(path), Path(path))
        if not Path(path).is_file():
            raise FileNotFoundError(f"model checkpoint not found: {path}")
        try:  # truncated, empty, garbage, another format: one line naming the file
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=device)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from e
        if "config" not in meta or "tokenizer" not in meta:
            raise CheckpointError(f"{path}: not a tiny-model checkpoint (no config/tokenizer metadata; "
                                  f"policy_step*.safetensors files are resumed with --resume)")
        cfg = json.loads(meta["config"])
        cfg["unet_channels"] = tuple(cfg["unet_channels"])
        model = cls(TinyConfig(**cfg), WordTokenizer.from_dict(json.loads(meta["tokenizer"])))
        if (bad := nonfinite_tensor(state)) is not None:
            raise CheckpointError(f"{path}: tensor {bad} holds NaN/inf; refusing to load broken weights")
        check_fits(state, model.state_dict(), path)
        model.load_state_dict(state)
        return model.to(device)


def build(cfg, checkpoint: str | None) -> TinyUnifiedModel:
    """``model.kind: tiny``: the weights of ``checkpoint`` (their own sizes), or a random init of
    the config's sizes when ``checkpoint`` is None."""
    if checkpoint is not None:
        model = TinyUnifiedModel.load(checkpoint)
        if checkpoint == cfg.model.checkpoint:  # the config's own: its size keys must be true
            _check_sizes(cfg.model, model.cfg, checkpoint)  # (an explicit --checkpoint brings its sizes)
        return model
    from unigrpo.world.tokenizer import build_world_tokenizer

    tok, m = build_world_tokenizer(), cfg.model
    tiny = TinyConfig(vocab_size=tok.vocab_size, d_text=m.d_text, text_layers=m.text_layers,
                      text_heads=m.text_heads, unet_channels=tuple(m.unet_channels),
                      image_size=m.image_size, max_seq_len=m.max_seq_len)
    return TinyUnifiedModel(tiny, tok)


SIZE_KEYS = ("d_text", "text_layers", "text_heads", "unet_channels", "image_size", "max_seq_len")


def _check_sizes(m, own: TinyConfig, checkpoint) -> None:
    """The config's size keys must be the checkpoint's own: a silently ignored key is config drift
    (the saved config would claim sizes the model does not have)."""
    from unigrpo.config import ConfigError

    for k in SIZE_KEYS:
        want, have = getattr(m, k), getattr(own, k)
        if isinstance(want, (list, tuple)):
            want, have = list(want), list(have)
        if want != have:
            raise ConfigError(f"model.{k}: {want} but the checkpoint {checkpoint} has {have} (set model.{k} "
                              f"to match, or model.checkpoint=null for a random init)")
