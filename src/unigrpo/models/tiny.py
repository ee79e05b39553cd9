"""The built-in tiny unified model: a text expert and an image expert in one object (Bagel-like MoT).

- Text expert (``tiny_text.TextExpert``): causal transformer + LM head over the world's words.
- Image expert (``tiny_image.ImageExpert``): its own weights, flow-time embedding, velocity head;
  reads the text expert's final hidden states of prompt + reasoning at every denoising step.

Implements ``unigrpo.models.base.UnifiedModel``. It is both the CPU demo model and the test
fixture every adapter's conformance tests are modelled on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unigrpo.models.base import UnifiedModel, read_weights
from unigrpo.models.decode import response_logprobs, target_logprobs
from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny_image import ImageExpert
from unigrpo.models.tiny_text import PatchEncoder, TextExpert
from unigrpo.world.knowledge import REFLECT_PROMPT

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"builtin:sft": ASSETS / "tiny_sft.safetensors", "builtin:edit_sft": ASSETS / "tiny_edit_sft.safetensors",
           "builtin:refine_sft": ASSETS / "tiny_refine_sft.safetensors"}


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int
    d_text: int = 128
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, int, int] = (48, 96, 96)
    image_size: int = 32
    max_seq_len: int = 64
    sees_images: bool = False  # input images enter the text expert's context (PatchEncoder prefix)
    edits: bool = False  # the image expert reads the first input image's latent (extra input channels)


@dataclass
class TextContext:
    """What the image expert reads: text hidden states [B, L, D] and their mask [B, L], and (a model
    that edits) the input image's latent ``ref`` [B, *latent] (zeros for a row without one)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    ref: torch.Tensor | None = None


class TinyUnifiedModel(UnifiedModel):
    """Tiny reason-then-draw model over the shapes world (see module docstring)."""

    reflection_prompt = REFLECT_PROMPT  # the tiny world's words (world/refine.py: the grammar of the answer)

    def __init__(self, cfg: TinyConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.pad_id, self.stop_ids = tokenizer.pad_id, (tokenizer.eos_id,)
        self.sees_images, self.edits = cfg.sees_images, cfg.edits
        self.input_image_size = (cfg.image_size, cfg.image_size)
        self.text = TextExpert(cfg.vocab_size, cfg.d_text, cfg.text_layers, cfg.text_heads, cfg.max_seq_len)
        self.vision = PatchEncoder(cfg.d_text, cfg.image_size) if cfg.sees_images else None
        self.max_input_images = self.vision.max_images if self.vision is not None else None
        self.image = ImageExpert(cfg.d_text, tuple(cfg.unet_channels), ref_channels=12 if cfg.edits else 0)
        half = cfg.image_size // 2
        self.latent_shape = (12, half, half)

    # ----------------------------------------------------------------- text phase
    def prompt_ids(self, text: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)]

    def response_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def token_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=False)

    def validate_prompts(self, texts: list[str], max_new_tokens: int = 0) -> None:
        """The tiny model knows only the shapes world's words, and its positional table is ``max_seq_len`` long."""
        unknown = [w for t in texts for w in t.split() if w not in self.tokenizer.index]
        if unknown:
            words = " ".join(w for w in self.tokenizer.index if not w.startswith("<"))
            raise ValueError(f"words the model does not know: {' '.join(unknown)} (the built-in world's vocabulary, "
                             f"split on spaces, is: {words})")
        room = self.cfg.max_seq_len - max_new_tokens  # past the positional table, sampling would crash
        if too_long := [n for n in map(len, map(self.prompt_ids, texts)) if n > room]:
            raise ValueError(f"a prompt of {too_long[0]} tokens does not fit model.max_seq_len={self.cfg.max_seq_len} "
                             f"with {max_new_tokens} reasoning tokens (text.max_reasoning_tokens): at most {room}")

    def _prefix(self, tokens: TokenBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The image tokens the text expert reads before the text (None: it sees none)."""
        if self.vision is None or tokens.images is None:
            return None, None
        return self.vision(tokens.images, tokens.image_mask)

    def _ref(self, tokens: TokenBatch) -> torch.Tensor | None:
        """The latent of each row's LAST input image (zeros without one): what an editing expert reads.
        With one input image that is the prompt's; in a multi-round episode, the image the row drew
        last (appended after the prompt's), so a later round edits its previous image."""
        if not self.edits:
            return None
        if tokens.images is None:
            return torch.zeros(len(tokens), *self.latent_shape, device=tokens.ids.device)
        mask = tokens.image_mask
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # [B] index of the last True (0 when none)
        has = mask.any(1).reshape(-1, 1, 1, 1)
        return self.encode_images(tokens.images[torch.arange(len(tokens), device=mask.device), last]) * has

    def reflection_ids(self, picture: int = 1) -> list[int]:
        """The reflection turn in the world's words (``knowledge.REFLECT_PROMPT``), no ``<bos>``."""
        return self.tokenizer.encode(self.reflection_prompt)

    def prefill(self, tokens: TokenBatch):
        prefix, prefix_mask = self._prefix(tokens)
        hidden, cache = self.text.prefill(tokens.ids, tokens.mask, prefix, prefix_mask)
        return self.text.head(hidden[:, -1]).float(), (cache, prefix_mask)

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, cache):
        kv, prefix_mask = cache  # the cache holds the image tokens' keys first
        full = key_mask if prefix_mask is None else torch.cat([prefix_mask, key_mask], 1)
        h, kv = self.text.step(tok, pos, full, kv)
        return self.text.head(h).float(), (kv, prefix_mask)

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, TextContext]:
        """One teacher-forced pass -> (logp [B, L] of response tokens, zero elsewhere; context)."""
        hidden = self.text(tokens.ids, tokens.mask, *self._prefix(tokens))  # [B, L, D] text positions
        # Token i is predicted from position i - 1; logits are divided by the sampling temperature
        # so the log-probs are those of the distribution that was actually sampled.
        logits = self.text.head(hidden[:, :-1]).float() / temperature
        logp = response_logprobs(target_logprobs(logits, tokens.ids[:, 1:]), tokens.response_mask)
        return logp, TextContext(hidden, tokens.mask, self._ref(tokens))

    def null_context(self, batch_size: int) -> TextContext:
        """The unconditional context of CFG: no text and (a model that edits) no input image."""
        hidden = self.image.null_ctx.expand(batch_size, 1, -1)
        return TextContext(hidden, torch.ones(batch_size, 1, dtype=torch.bool, device=hidden.device))

    # ----------------------------------------------------------------- image phase
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: TextContext) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        return self.image(x_t, t, ctx.hidden, ctx.mask, ctx.ref)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(x0.float(), 2) + 1.0) / 2.0).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2.0 - 1.0, 2)

    # ----------------------------------------------------------------- lifecycle
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Both experts train in full (their reference is a snapshot of every weight: 9 MB)."""
        text = [(f"text.{n}", p) for n, p in self.text.named_parameters()]
        if self.vision is not None:  # the text expert trains with what it sees through
            text += [(f"vision.{n}", p) for n, p in self.vision.named_parameters()]
        return {"text": text, "image": [(f"image.{n}", p) for n, p in self.image.named_parameters()]}

    def save_metadata(self) -> dict[str, str]:
        """Config and tokenizer vocabulary beside the weights: ``save`` writes a standalone file (the
        trainable state is the whole model: both experts train, no buffers)."""
        return {"config": json.dumps(asdict(self.cfg)), "tokenizer": json.dumps(self.tokenizer.to_dict()),
                **super().save_metadata()}

    def export_formats(self) -> tuple[str, ...]:
        return ("merged",)  # the standalone checkpoint (weights + config + vocabulary)

    def write_export(self, folder, fmt: str, extra: dict) -> str:
        self.save(Path(folder) / "model.safetensors", extra)
        return ("unigrpo sample \"a red circle\" --checkpoint DIR/model.safetensors\n"
                "unigrpo eval --checkpoint DIR/model.safetensors\n")

    @torch.no_grad()
    def grow_from(self, old: TinyUnifiedModel) -> None:
        """Start from ``old``'s weights (``pretrain.init``): every tensor of the same name and shape;
        the token embedding and LM head row by row for the words both vocabularies have; the image
        expert's first conv for the channels both have, its input-latent channels at zero (so the
        grown model draws exactly as ``old`` until it learns to read them); the positional table row
        by row for the positions both have (a longer ``max_seq_len``, e.g. for the longer contexts of
        multi-round episodes, keeps every known position). Sizes must match."""
        if (old.cfg.d_text, old.cfg.text_layers, tuple(old.cfg.unet_channels), old.cfg.image_size) != (
                self.cfg.d_text, self.cfg.text_layers, tuple(self.cfg.unet_channels), self.cfg.image_size):
            raise ValueError("pretrain.init: the checkpoint's sizes differ from the model section's")
        mine, theirs = self.state_dict(), old.state_dict()
        rows = [(self.tokenizer.index[w], i) for i, w in enumerate(old.tokenizer.vocab) if w in self.tokenizer.index]
        new_ids, old_ids = (torch.tensor(x) for x in zip(*rows))
        for name, t in mine.items():
            src = theirs.get(name)
            if src is None:
                continue
            if name in ("text.tok.weight", "text.head.weight"):
                t[new_ids] = src[old_ids]
            elif name == "text.pos.weight":
                n = min(len(t), len(src))
                t[:n] = src[:n]
            elif name == "image.conv_in.weight":
                t.zero_()
                t[:, :src.shape[1]] = src
            elif src.shape == t.shape:
                t.copy_(src)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TinyUnifiedModel:
        from unigrpo.utils.checkpoint import check_fits
        from unigrpo.utils.errors import CheckpointError
        from unigrpo.world.tokenizer import WordTokenizer

        path = BUILTIN.get(str(path), Path(path))
        state, meta = read_weights(path, device)
        if "config" not in meta or "tokenizer" not in meta:
            raise CheckpointError(f"{path}: not a tiny-model checkpoint (no config/tokenizer metadata; "
                                  f"policy_step*.safetensors files are resumed with --resume)")
        cfg = json.loads(meta["config"])
        cfg["unet_channels"] = tuple(cfg["unet_channels"])  # (a file from before sees_images/edits: neither)
        model = cls(TinyConfig(**cfg), WordTokenizer.from_dict(json.loads(meta["tokenizer"])))
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
                      image_size=m.image_size, max_seq_len=m.max_seq_len, sees_images=m.sees_images, edits=m.edits)
    return TinyUnifiedModel(tiny, tok)


SIZE_KEYS = ("d_text", "text_layers", "text_heads", "unet_channels", "image_size", "max_seq_len", "sees_images",
             "edits")


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
