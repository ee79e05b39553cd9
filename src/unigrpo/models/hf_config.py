"""The config section of the HF adapter, ``model.kind: hf`` (docs/models.md).

Light on purpose (no torch, no transformers): ``unigrpo.config`` imports it to load a config.
``check`` holds the adapter's own cross-field checks; ``config.validate`` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from unigrpo.utils.folders import check_files, local_folder, read_json
from unigrpo.utils.typed_config import ConfigError, require

# The pipeline classes ``models.hf.FAMILIES`` adapts (its keys) and those in separate mode (its
# ``mode``; a test keeps them equal): named here so that a config check needs no torch.
PIPELINES = ("Flux2KleinPipeline", "QwenImagePipeline", "StableDiffusion3Pipeline")
SEPARATE = ("StableDiffusion3Pipeline",)  # families whose text encoders cannot write: model.reasoner reasons
# What each family's adapter declares beyond text-to-image (its ``sees_images`` / ``edits``; a test
# keeps them equal). FLUX.2 [klein]: reference images condition the transformer, while its Qwen3
# text encoder, which reasons, reads text only: the reasoning is blind to the images.
CAPABILITIES: dict[str, frozenset[str]] = {"Flux2KleinPipeline": frozenset({"edits"})}


@dataclass
class LoRAConfig:
    """LoRA of the HF adapter (peft; alpha = rank, no dropout). Rank 0 = full fine-tune of that side."""

    text_rank: int = 16  # LoRA rank on the LM (reasoner + text encoder); 0 = train every LM weight
    image_rank: int = 16  # LoRA rank on the image transformer; 0 = train every transformer weight
    text_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # LM module names
    image_targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "to_qkv_mlp_proj"])  # transformer module names (FLUX.2: double- and single-stream attention)


@dataclass
class HFModelConfig:
    """``model.kind: hf``: a diffusers pipeline + a transformers LM (FLUX.2 [klein], Qwen-Image, SD3; docs/models.md)."""

    own_schedule: ClassVar[bool] = True  # the pipeline's scheduler has a timestep grid: sampler.shift may be null

    kind: Literal["hf"] = "hf"  # model adapter (unigrpo.models.KINDS); each kind has its own keys
    pipeline: str = ""  # a save_pretrained folder of a supported pipeline (docs/models.md), or a hub id
    reasoner: str = "text_encoder"  # who reasons: the pipeline's text encoder (shared), or a causal-LM folder / hub id (separate)
    checkpoint: str | None = None  # trainable weights written by model.save (LoRA or whole sides); null = the pipeline's
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype (bf16 / fp16: GPUs only)
    resolution: int = 512  # image side in pixels (a multiple of 2 * the VAE's scale factor)
    gradient_checkpointing: bool = False  # recompute activations in backward (LM and transformer, in train mode)
    fsdp: bool = False  # under torchrun with > 1 rank: shard LM + transformer with FSDP2 (False: a replica per rank)
    hidden_layers: list[int] | None = None  # LM hidden states conditioning the image; null = the pipeline's (FLUX.2 (9, 18, 27), Qwen-Image (-1,))
    max_text_tokens: int = 512  # conditioning length (the pipeline's max_sequence_length); longer rows are cut
    enable_thinking: bool = True  # chat template: True = the reasoning opens a <think> block; False = the pipeline's template

    @property
    def capabilities(self) -> frozenset[str]:
        """Of sees_images / edits: ``CAPABILITIES`` of the pipeline class a local ``model.pipeline``
        folder names (a hub id, or a folder that cannot be read yet: none; ``check`` reports the folder)."""
        try:
            folder = local_folder(self.pipeline, "model.pipeline") if self.pipeline else None
            name = read_json(folder / "model_index.json", "model.pipeline").get("_class_name") if folder else None
        except (ConfigError, AttributeError):
            return frozenset()
        return CAPABILITIES.get(name, frozenset())

    def check_reasoner(self, name: str) -> None:
        """The reasoner the pipeline class ``name`` needs (``models.hf.build`` says the same, later)."""
        if name not in SEPARATE:
            require(self.reasoner == "text_encoder", "model.reasoner",
                    f"{name} reasons with its own text encoder (model.reasoner=text_encoder); a separate "
                    f"reasoner is not implemented for it, got {self.reasoner!r}")
        else:
            require(self.reasoner != "text_encoder", "model.reasoner",
                    f"{name}'s text encoders cannot write text; set it to a transformers causal-LM folder or "
                    "hub id (separate mode)")

    def check(self, cfg) -> None:
        """The checks typing cannot make (``cfg``: the whole Config); ConfigError naming the key."""
        require(bool(self.pipeline), "model.pipeline", "a pipeline folder (save_pretrained) or hub id is required")
        if (folder := local_folder(self.pipeline, "model.pipeline")) is not None:
            self.check_reasoner(check_pipeline_folder(folder))
        if self.reasoner != "text_encoder" and (lm := local_folder(self.reasoner, "model.reasoner")) is not None:
            check_files(lm, "model.reasoner", need_config=True)
        require(self.lora.text_rank >= 0 and self.lora.image_rank >= 0, "model.lora.text_rank", "ranks must be >= 0")
        require(self.resolution > 0 and self.resolution % 16 == 0, "model.resolution",
                "must be a positive multiple of 16")
        require(self.max_text_tokens >= 1, "model.max_text_tokens", "must be >= 1")
        # the protocol's null_context(batch) knows no input images: CFG's unconditional branch would
        # drop the references that the pipeline's own negative branch keeps
        require(cfg.sampler.cfg_scale == 1 or "edits" not in cfg.task.needs(), "sampler.cfg_scale",
                "training with CFG on an editing task is not supported (the unconditional branch would lose the "
                "reference images); train CFG-free (1) and guide at evaluation (sampler.eval_cfg_scale)")


def check_pipeline_folder(folder: Path) -> str:
    """A ``save_pretrained`` pipeline folder, before diffusers reads it: ``model_index.json`` names a
    supported pipeline class, and each component it lists is a folder whose configs parse and whose
    weight files are whole (``utils.folders``); ConfigError naming the file. -> the pipeline class."""
    index = read_json(folder / "model_index.json", "model.pipeline") if (folder / "model_index.json").is_file() \
        else None
    if not isinstance(index, dict):
        raise ConfigError(f"model.pipeline: {folder} has no model_index.json object (not a save_pretrained pipeline)")
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConfigError(f"model.pipeline: {folder / 'model_index.json'}: {name!r} is not supported; supported "
                          f"pipelines: {', '.join(PIPELINES)}")
    for part, spec in index.items():
        if part.startswith("_") or not isinstance(spec, list) or None in spec:
            continue  # metadata, or a component the pipeline leaves out ([null, null])
        if not (folder / part).is_dir():
            raise ConfigError(f"model.pipeline: {folder / part} is missing (model_index.json lists {part})")
        check_files(folder / part, "model.pipeline")
    return name
