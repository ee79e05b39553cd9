"""The config section of the Bagel adapter, ``model.kind: bagel`` (docs/models.md, Bagel section).

Light on purpose (no torch): ``unigrpo.config`` imports it to load a config. ``check`` holds the
adapter's own cross-field checks; ``config.validate`` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from unigrpo.utils.folders import read_json, safetensors_problem
from unigrpo.utils.typed_config import ConfigError, require

# LoRA targets (module-name suffixes) of BAGEL-7B-MoT's two experts, the same 7 projections each.
BAGEL_UND_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BAGEL_GEN_TARGETS = ["q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen",
                     "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj"]


@dataclass
class BagelLoRAConfig:
    """LoRA of the Bagel adapter (peft; alpha = rank, no dropout). Rank 0 = that expert trains in full."""

    text_rank: int = 64  # LoRA rank on the understanding expert's projections; 0 = train every und weight
    image_rank: int = 64  # LoRA rank on the generation expert's 7 *_moe_gen projections; 0 = train every gen weight
    text_targets: list[str] = field(default_factory=lambda: list(BAGEL_UND_TARGETS))  # und module-name suffixes
    image_targets: list[str] = field(default_factory=lambda: list(BAGEL_GEN_TARGETS))  # gen module-name suffixes


@dataclass
class BagelModelConfig:
    """``model.kind: bagel``: BAGEL-7B-MoT from its released folder (docs/models.md, Bagel section)."""

    own_schedule: ClassVar[bool] = True  # Bagel's timestep shift is its own grid: sampler.shift may be null

    kind: Literal["bagel"] = "bagel"  # model adapter (unigrpo.models.KINDS); each kind has its own keys
    path: str = ""  # folder with llm_config.json, ema.safetensors, ae.safetensors, tokenizer.json
    checkpoint: str | None = None  # trainable tensors written by model.save (LoRA / whole experts); null = the release's
    lora: BagelLoRAConfig = field(default_factory=BagelLoRAConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype (VAE: float32); bf16 on GPUs
    resolution: int = 512  # image side in pixels (multiple of 16; at most 16 * max_latent_size = 1024)
    think: bool = True  # think mode: Bagel's planning system prompt before the prompt (its T2I thinking recipe)
    system_prompt: str | None = None  # think-mode system prompt; null = Bagel's GEN_THINK_SYSTEM_PROMPT
    train_heads: bool = False  # also train time_embedder, vae2llm, llm2vae with the image expert
    gradient_checkpointing: bool = False  # recompute every decoder layer in backward (text pass and velocity)
    logits_chunk: int = 1024  # lm_head + log-softmax over this many positions at a time (recomputed in backward)
    fsdp: bool = False  # under torchrun with > 1 rank: FSDP2, one unit per MoT decoder layer (False: a replica per rank)
    vit: bool = True  # load the ViT path when the folder has vit_config.json: the model then sees and edits input images
    vit_max_size: int | None = None  # ViT transform's long edge; null = the ViT's image_size (980: Bagel's inference)
    vit_min_size: int = 224  # ViT transform's short edge (Bagel's inference: 224)

    @property
    def capabilities(self) -> frozenset[str]:
        """Of sees_images / edits: both when the folder has the ViT path and ``vit`` is on
        (docs/models.md, Bagel section), else none."""
        has_vit = bool(self.path) and (Path(self.path).expanduser() / "vit_config.json").is_file()
        return frozenset({"sees_images", "edits"}) if self.vit and has_vit else frozenset()

    def check(self, cfg) -> None:
        """The checks typing cannot make (``cfg``: the whole Config); ConfigError naming the key."""
        if self.path:  # empty: refused when the model is built (a built-in config leaves it to the user)
            check_bagel_folder(self.path)
        lora = self.lora
        require(lora.text_rank >= 0 and lora.image_rank >= 0, "model.lora.text_rank", "ranks must be >= 0")
        require(self.resolution > 0 and self.resolution % 16 == 0, "model.resolution",
                "must be a positive multiple of 16")
        require(self.logits_chunk >= 1, "model.logits_chunk", "must be >= 1")
        require(self.vit_min_size > 0 and (self.vit_max_size is None or self.vit_max_size >= self.vit_min_size),
                "model.vit_min_size", "must be > 0 and at most model.vit_max_size")
        full = [side for side, rank in (("text", lora.text_rank), ("image", lora.image_rank)) if rank == 0]
        trained = [s for s in full if getattr(cfg.algo, f"train_{s}")]
        require(self.dtype == "float32" or not trained, "model.dtype",
                f"{self.dtype} weights cannot take the small AdamW steps of a fully trained expert "
                f"({', '.join(f'model.lora.{s}_rank=0' for s in trained)}: the update rounds away, and this "
                "adapter keeps no float32 master copy); use model.dtype=float32 or LoRA")


def check_bagel_folder(path: str) -> None:
    """The released folder, before anything loads: ``llm_config.json`` and ``tokenizer.json`` parse,
    ``ema.safetensors`` and ``ae.safetensors`` are whole; ConfigError naming the file."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.path: {path} is not a folder (the BAGEL-7B-MoT checkpoint folder)")
    for name in ("llm_config.json", "tokenizer.json", "ema.safetensors", "ae.safetensors"):
        if not (folder / name).is_file():
            raise ConfigError(f"model.path: {folder} has no {name} (a BAGEL-7B-MoT folder holds llm_config.json, "
                              "ema.safetensors, ae.safetensors and tokenizer.json)")
        if name.endswith(".json"):
            read_json(folder / name, "model.path")
        elif (problem := safetensors_problem(folder / name)) is not None:
            raise ConfigError(f"model.path: {folder / name}: {problem}")
    if (folder / "vit_config.json").is_file():  # optional: the ViT path (image input)
        read_json(folder / "vit_config.json", "model.path")
