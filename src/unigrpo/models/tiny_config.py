"""The config sections of the tiny built-in model: ``model.kind: tiny`` and ``pretrain`` (its SFT).

Light on purpose (no torch): ``unigrpo.config`` imports it to load a config. ``check`` holds the
tiny model's own cross-field checks; ``config.validate`` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from unigrpo.utils.typed_config import require

MAX_INPUT_IMAGES = 4  # image slots of the tiny model's PatchEncoder (tiny_text: one slot embedding each)


@dataclass
class TinyModelConfig:
    """``model.kind: tiny``: the built-in tiny unified model (text transformer + UNet image expert)."""

    own_schedule: ClassVar[bool] = False  # no timestep grid of its own: sampler.shift must be a number

    kind: Literal["tiny"] = "tiny"  # model adapter (unigrpo.models.KINDS); each kind has its own keys
    checkpoint: str | None = "builtin:sft"  # safetensors path, "builtin:sft", or null = random init
    d_text: int = 128  # text expert width
    text_layers: int = 3  # text expert transformer blocks
    text_heads: int = 4  # attention heads of the text expert
    unet_channels: tuple[int, int, int] = (48, 96, 96)  # UNet widths per level
    image_size: int = 32  # RGB canvas side in pixels
    max_seq_len: int = 64  # prompt + reasoning tokens (positional table size)
    sees_images: bool = False  # input images enter the text expert's context (builtin:edit_sft: true)
    edits: bool = False  # the image expert reads the input image's latent (builtin:edit_sft: true)

    @property
    def capabilities(self) -> frozenset[str]:
        """What this model can do of sees_images / edits (docs/design.md): the keys above, which a
        checkpoint must match (a config claiming what its weights cannot do is refused at build)."""
        return frozenset(k for k in ("sees_images", "edits") if getattr(self, k))

    def check(self, cfg) -> None:
        """The checks typing cannot make (``cfg``: the whole Config); ConfigError naming the key."""
        require(self.image_size % 4 == 0 and 16 <= self.image_size <= 64, "model.image_size",
                "must be a multiple of 4 in [16, 64]")
        if cfg.task.kind in ("shapes", "shapes_refine"):  # the tiny model reads the shapes world's tokens
            # imported here, not on top: unigrpo.world imports torch (its renderer); unigrpo.config does not
            from unigrpo.world.knowledge import MAX_PROMPT_TOKENS, REFLECT_PROMPT

            t, rounds = cfg.text, cfg.algo.rounds
            # every later round adds the reflection turn and its reflection to the context (rollout.sample_episode)
            room = (self.max_seq_len - MAX_PROMPT_TOKENS - (rounds - 1) * len(REFLECT_PROMPT.split())) // rounds
            require(rounds - 1 <= MAX_INPUT_IMAGES, "algo.rounds",
                    f"{rounds} rounds show the model {rounds - 1} drawn images; it sees at most {MAX_INPUT_IMAGES}")
            # past the positional table, sampling would crash mid-rollout
            require(t.max_reasoning_tokens <= room, "text.max_reasoning_tokens",
                    f"{t.max_reasoning_tokens} does not fit model.max_seq_len={self.max_seq_len} after the "
                    f"longest prompt ({MAX_PROMPT_TOKENS} tokens)"
                    + (f" in {rounds} rounds" if rounds > 1 else "") + f": at most {room}")


@dataclass
class PretrainConfig:
    """Supervised (SFT) training of the tiny model from scratch on generated data."""

    steps: int = 6000  # optimizer steps
    batch_size: int = 64  # samples per step
    lr: float = 1e-3  # AdamW learning rate (cosine decay, short warm-up)
    wrong_reasoning_frac: float = 0.3  # fraction of reasoning-required samples with wrong reasoning
    no_think_frac: float = 0.15  # fraction of samples drawn without reasoning (prompt only)
    uncond_frac: float = 0.1  # fraction with an empty context for the image loss (enables CFG)
    image_loss_weight: float = 1.0  # flow-matching loss weight vs text loss
    # start from these weights (a checkpoint or builtin:NAME) instead of a random init: every tensor
    # of the same name and shape, the vocabulary's rows by word; what is new (the image encoder, the
    # input-latent channels, new words) starts at its init, the new channels at zero
    init: str | None = None
    edit_frac: float = 0.0  # fraction of samples that are edits (world.edit; the model must see and edit)
    describe_frac: float = 0.0  # fraction that describe an input image ("what is in the image")
    reflect_frac: float = 0.0  # fraction that are second rounds: reflect on the image drawn (world/refine.py), redraw

    def check(self, cfg) -> None:
        """Each fraction is a probability; edit data needs a model that sees and edits."""
        for k in ("wrong_reasoning_frac", "no_think_frac", "uncond_frac", "edit_frac", "describe_frac", "reflect_frac"):
            v = getattr(self, k)
            require(0.0 <= v <= 1.0, f"pretrain.{k}", f"must be in [0, 1], got {v}")
        require(self.edit_frac + self.describe_frac + self.reflect_frac <= 1.0, "pretrain.edit_frac",
                "edit_frac + describe_frac + reflect_frac must be at most 1")
        if self.reflect_frac:
            require(cfg.model.kind == "tiny" and cfg.model.sees_images, "pretrain.reflect_frac",
                    "reflections read the drawn image: they need model.sees_images=true")
        if self.edit_frac or self.describe_frac:
            m = cfg.model
            require(m.kind == "tiny" and m.sees_images and m.edits, "pretrain.edit_frac",
                    "edit and describe data need model.sees_images=true and model.edits=true")
