"""``model.kind: hf``: a diffusers pipeline and a transformers causal LM trained as one unified
model. This module holds what every pipeline family shares; each family (one diffusers pipeline
class) is a subclass in its own module, listed in ``FAMILIES``:

| pipeline class | module | mode |
|---|---|---|
| ``Flux2KleinPipeline`` | ``hf_flux2`` | shared: the text encoder (Qwen3) reasons |
| ``QwenImagePipeline`` | ``hf_qwenimage`` | shared: the text encoder (Qwen2.5-VL, text only) reasons |
| ``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline`` | ``hf_qwenimage_edit`` | shared: Qwen2.5-VL sees the input images and reasons; the transformer reads their latents |
| ``StableDiffusion3Pipeline`` | ``hf_sd3`` | separate: ``model.reasoner`` (a causal LM) reasons, CLIP-L/G + T5 encode the text (``hf_separate``) |

Shared here: the text phase (``CausalLMReasoner`` over the LM that reasons supplies the text
engine's contract), LoRA via peft on either side, gradient checkpointing and the FSDP2 plan; the
trainable state, ``save``, ``wrap`` and the reference are ``UnifiedModel``'s. A family implements the
pipeline-specific part: ``forward_context(tokens, temperature)`` (the teacher-forced pass:
log-probs + the transformer's text input), ``null_context(batch)`` (the unconditional context),
``velocity(x_t, t, ctx)`` (time, sign and packing mapped onto our ``v = eps - x0`` at flow time t),
``decode`` / ``encode_images`` (VAE normalisation and packing), ``pipeline_shift`` and
``from_pipeline(pipe, model_config)``; optionally ``own_timesteps`` (a grid no single shift gives)
and ``combine_guidance`` (how CFG combines the two velocities, when the pipeline does not use the
plain ``v_u + s (v_c - v_u)``). docs/models.md has the mapping of each family.

- **LoRA** (``model.lora.text_rank`` / ``image_rank`` > 0): peft LoRA layers injected into the LM /
  the transformer, base weights frozen; the reference is the same modules with the adapters
  switched off. Rank 0 trains that whole side; its reference is then a snapshot of that side's
  weights substituted by name (memory: one more copy of that side's tensors).
- **FSDP2** (``model.fsdp`` on > 1 rank): ``wrap`` shards every block of ``fsdp_blocks()`` (a
  family lists its transformer's block lists in ``dit_blocks``), then the LM and the transformer as
  roots (the VAE stays replicated: frozen). Every forward is then a collective, so ``sharded`` tells
  the recipe that every rank must run the same calls (the decode loop runs a fixed number of steps,
  every rank evaluates). Gradients are reduce-scattered in backward (``reduce_gradients``: no-op);
  ``trainable_state`` gathers full tensors on every rank and ``save`` (rank 0) writes the last
  gather; ``load_trainable_state`` keeps each rank's shard of the full tensors.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from unigrpo.models.base import FSDPRoot, UnifiedModel, inject_lora
from unigrpo.models.hf_text import CausalLMReasoner
from unigrpo.models.protocol import TokenBatch
from unigrpo.utils.checkpoint import check_finite, verify_sums

__all__ = ["FAMILIES", "HFUnifiedModel", "build", "lora_kwargs"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# diffusers pipeline class name -> "module:Class" of its family (imported when used)
FAMILIES: dict[str, str] = {"Flux2KleinPipeline": "unigrpo.models.hf_flux2:Flux2Klein",
                            "QwenImagePipeline": "unigrpo.models.hf_qwenimage:QwenImage",
                            "QwenImageEditPipeline": "unigrpo.models.hf_qwenimage_edit:QwenImageEdit",
                            "QwenImageEditPlusPipeline": "unigrpo.models.hf_qwenimage_edit:QwenImageEditPlus",
                            "StableDiffusion3Pipeline": "unigrpo.models.hf_sd3:SD3"}


def lora_kwargs(m) -> dict:
    """The LoRA arguments of every family's constructor, from the ``model`` section ``m``."""
    return {"text_rank": m.lora.text_rank, "image_rank": m.lora.image_rank,
            "text_targets": m.lora.text_targets, "image_targets": m.lora.image_targets}


class HFUnifiedModel(UnifiedModel):
    """What every pipeline family shares (module docstring). Submodules: ``lm`` (the LM that
    reasons), ``dit`` (the image transformer), ``vae``."""

    pipeline_class = ""  # the diffusers pipeline class a family handles
    lm_blocks: tuple[str, ...] = ("model.layers",)  # FSDP2 units of the LM: its decoder layer list(s)
    dit_blocks: tuple[str, ...] = ("transformer_blocks",)  # ... of the image transformer: its block list(s)
    # root methods called outside ``forward`` (registered with register_fsdp_forward_method); the
    # text phase and every family so far call ``lm(...)`` / ``dit(...)`` only
    lm_forward_methods: tuple[str, ...] = ()
    dit_forward_methods: tuple[str, ...] = ()
    mode = "shared"  # who reasons: "shared" = the pipeline's text encoder, "separate" = model.reasoner

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, *, hidden_layers: tuple[int, ...] = (),
                 template_kwargs: dict | None = None, text_rank: int = 0, image_rank: int = 0,
                 text_targets=(), image_targets=()):
        super().__init__()
        self.checkpointing = False  # model.gradient_checkpointing (enable_gradient_checkpointing)
        # hidden_states: the embeddings, then every layer (a VLM keeps the LM's sizes in its text config)
        n_states = lm.config.get_text_config().num_hidden_layers + 1
        if any(not -n_states <= k < n_states for k in hidden_layers):
            raise ValueError(f"model.hidden_layers: {list(hidden_layers)} do not exist in a text encoder with "
                             f"{n_states} hidden states (0 = embeddings .. {n_states - 1}); set model.hidden_layers")
        self.lm, self.dit, self.vae = lm, dit, vae
        self.vae.requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.hidden_layers = tuple(hidden_layers)
        self.text_rank, self.image_rank = text_rank, image_rank
        # what the optimizer steps is float32 whatever model.dtype is (a bf16 weight cannot take a
        # 1e-6 step): LoRA weights (``inject_lora``), or the whole of a fully trained side (its master weights)
        for module, rank, targets in ((self.lm, text_rank, text_targets), (self.dit, image_rank, image_targets)):
            if rank > 0:
                inject_lora(module, dict.fromkeys(targets, rank))
                for name, p in module.named_parameters():
                    p.requires_grad_("lora_" in name)  # only the adapters train
            else:
                module.float()
        self.reasoner = CausalLMReasoner(lm, tokenizer, hidden_layers=self.hidden_layers,
                                         template_kwargs=template_kwargs or {})
        self.tokenizer, self.pad_id = tokenizer, int(self.reasoner.pad_id)

    # ----------------------------------------------------------------- text phase (the reasoner's)
    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.reasoner.stop_ids

    def prompt_ids(self, text: str) -> list[int]:
        return self.reasoner.prompt_ids(text)

    def response_ids(self, text: str) -> list[int]:
        return self.reasoner.response_ids(text)

    def token_text(self, ids: list[int]) -> str:
        return self.reasoner.token_text(ids)

    def prefill(self, tokens: TokenBatch):
        return self.reasoner.prefill(tokens)

    def configure_decode(self, **options) -> None:
        self.reasoner.configure_decode(**options)  # the reasoner's cache; the sampler is this model's engine call
        self.token_sampler = self.reasoner.token_sampler

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, cache):
        return self.reasoner.decode_step(tok, pos, key_mask, cache)

    # ----------------------------------------------------------------- image phase
    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dit_dtype(self) -> torch.dtype:
        """The transformer's compute dtype, as diffusers' ``dit.dtype`` gives it. That property walks
        every module on each read (a few percent of a tiny velocity call), so it is read once, and the
        parameter it comes from is kept: casting the model (``.to(dtype)``) changes that parameter's dtype too."""
        if getattr(self, "_dtype_of", None) is None:  # a tuple: a Parameter attribute would be registered
            want = self.dit.dtype
            self._dtype_of = (next(p for n, p in self.dit.named_parameters() if p.dtype == want and "lora_" not in n),)
        return self._dtype_of[0].dtype

    def pipeline_shift(self, num_steps: int) -> float:
        """The shift whose ``timesteps(num_steps, shift)`` is the pipeline's own schedule."""
        raise NotImplementedError

    def own_timesteps(self, num_steps: int) -> torch.Tensor:
        """The pipeline's own flow-time grid ``[1, ..., 0]`` at this resolution and step count
        (``sampler.shift: null``)."""
        return self.timesteps(num_steps, self.pipeline_shift(num_steps))

    # ----------------------------------------------------------------- lifecycle
    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (``model.gradient_checkpointing``). diffusers
        checkpoints whenever gradients are on; transformers only in train mode, so the LM is kept in
        train mode (``train`` below), which changes nothing else only when it has no dropout
        (checked)."""
        if any(float(getattr(self.lm.config.get_text_config(), k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout")):
            raise ValueError("model.gradient_checkpointing: the LM has dropout, its train mode would differ from eval mode")
        (getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable)()
        self.dit.enable_gradient_checkpointing()
        self.checkpointing = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.checkpointing:
            self.lm.train(True)  # transformers checkpoints only in train mode (no dropout: checked)
        return self

    def _sides(self) -> dict[str, tuple[str, nn.Module, int]]:
        return {"text": ("lm", self.lm, self.text_rank), "image": ("dit", self.dit, self.image_rank)}

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """LoRA weights of a side with rank > 0, every weight of a side with rank 0."""
        return {side: [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if rank == 0 or "lora_" in n]
                for side, (prefix, module, rank) in self._sides().items()}

    def fsdp_blocks(self) -> dict[str, list[nn.Module]]:
        """The FSDP2 units of each root: every block of the lists named in ``lm_blocks`` /
        ``dit_blocks`` (dotted paths; a list the module lacks is an error, not silently unsharded)."""
        def blocks(root: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
            return [b for path in paths for b in root.get_submodule(path)]

        return {"lm": blocks(self.lm, self.lm_blocks), "dit": blocks(self.dit, self.dit_blocks)}

    def fsdp_plan(self) -> tuple[list[FSDPRoot], str]:
        """Every block of ``fsdp_blocks()`` a unit, the LM and the transformer roots (module docstring)."""
        units = self.fsdp_blocks()
        roots = [FSDPRoot(self.lm, units["lm"], methods=self.lm_forward_methods),
                 FSDPRoot(self.dit, units["dit"], methods=self.dit_forward_methods)]
        return roots, (f"{len(units['lm'])} LM blocks, {len(units['dit'])} transformer blocks, the LM and the "
                       "transformer as roots")

    def export_formats(self) -> tuple[str, ...]:
        """``lora`` (default) when both sides are LoRA, else ``merged`` only (``hf_export``)."""
        return ("lora", "merged") if self.text_rank and self.image_rank else ("merged",)

    def write_export(self, folder, fmt: str, extra: dict) -> str:
        from unigrpo.models import hf_export

        return (hf_export.write_lora if fmt == "lora" else hf_export.write_merged)(self, folder)

    def save_metadata(self) -> dict[str, str]:
        return {**super().save_metadata(), "text_rank": str(self.text_rank), "image_rank": str(self.image_rank)}


def build(cfg, checkpoint: str | None) -> HFUnifiedModel:
    """``model.kind: hf``: the pipeline of ``model.pipeline`` (a ``save_pretrained`` folder or a hub
    id), its family from ``FAMILIES``, LoRA per ``model.lora``; the trainable weights of
    ``checkpoint`` (``model.save``) if given."""
    from diffusers import DiffusionPipeline

    m = cfg.model
    if Path(m.pipeline).is_dir():
        verify_sums(m.pipeline)  # a unigrpo export: its SHA256SUMS
    # a processor component (the Qwen-Image-Edit pipelines' Qwen2VLProcessor) is not loaded: it needs
    # torchvision; the adapter reads its image settings as JSON (hf_qwenimage_edit.processor_config)
    skip = {"processor": None} if "processor" in DiffusionPipeline.load_config(m.pipeline) else {}
    pipe = DiffusionPipeline.from_pretrained(m.pipeline, dtype=DTYPES[m.dtype], **skip)
    check_finite({k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}, f"model.pipeline {m.pipeline}")
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise ValueError(f"model.pipeline: {name} is not supported; supported pipelines: {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[name].split(":")
    family = getattr(importlib.import_module(module), cls)
    if family.mode == "shared" and m.reasoner != "text_encoder":
        raise ValueError(f"model.reasoner: {name} reasons with its own text encoder (model.reasoner=text_encoder); "
                         f"a separate reasoner is not implemented for it, got {m.reasoner!r}")
    if family.mode == "separate" and m.reasoner == "text_encoder":
        raise ValueError(f"model.reasoner: {name}'s text encoders cannot write text; set it to a transformers "
                         "causal-LM folder or hub id (separate mode)")
    return family.from_pipeline(pipe, m).configured(m, checkpoint)
