"""``model.kind: hf``: a diffusers pipeline and a transformers causal LM trained as one unified
model. This module holds what every pipeline family shares; each family (one diffusers pipeline
class) is a subclass in its own module, listed in ``FAMILIES``:

| pipeline class | module | mode |
|---|---|---|
| ``Flux2KleinPipeline`` | ``hf_flux2`` | shared: the text encoder (Qwen3) reasons |
| ``StableDiffusion3Pipeline`` | ``hf_sd3`` | separate: ``model.reasoner`` (a causal LM) reasons, CLIP-L/G + T5 encode the text (``hf_separate``) |

Shared here: the text phase (``CausalLMReasoner`` over the LM that reasons), LoRA via peft on
either side, the reference (adapters disabled, or a frozen copy of a fully trained side), the
trainable state, ``save``, gradient checkpointing, ``wrap`` / ``reduce_gradients``. A family
implements the pipeline-specific part: ``_encode(lm, tokens, temperature)`` (the teacher-forced
pass: log-probs + the transformer's text input), ``_null(lm, batch)`` (the unconditional context),
``_velocity(dit, x_t, t, ctx)`` (time, sign and packing mapped onto our ``v = eps - x0`` at flow
time t), ``decode`` / ``encode_images`` (VAE normalisation and packing), ``pipeline_shift`` and
``from_pipeline(pipe, model_config)``. docs/models.md has the mapping of each family.

- **LoRA** (``model.lora.text_rank`` / ``image_rank`` > 0): peft LoRA layers injected into the LM /
  the transformer, base weights frozen; the reference is the same modules with the adapters
  switched off (``adapters_disabled``). Rank 0 trains that whole side; its reference is then a
  frozen copy of that side (memory: one more copy of it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
from pathlib import Path

import torch
from torch import nn

from unigrpo.models.hf_text import CausalLMReasoner
from unigrpo.models.protocol import TokenBatch
from unigrpo.utils import dist

__all__ = ["FAMILIES", "HFUnifiedModel", "adapters_disabled", "build", "lora_kwargs"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# diffusers pipeline class name -> "module:Class" of its family (imported when used)
FAMILIES: dict[str, str] = {"Flux2KleinPipeline": "unigrpo.models.hf_flux2:Flux2Klein",
                             "StableDiffusion3Pipeline": "unigrpo.models.hf_sd3:SD3"}


@contextlib.contextmanager
def adapters_disabled(*modules: nn.Module | None):
    """Every peft LoRA layer in ``modules`` switched off inside the block, restored after (diffusers
    models have ``disable_adapters()`` but no context manager; this one works for any module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for mod in modules if mod is not None for m in mod.modules() if isinstance(m, BaseTunerLayer)]
    before = [m.disable_adapters for m in layers]
    # peft's enable_adapters also sets requires_grad of the adapter weights: restore what the
    # optimizer set (a frozen side must stay frozen after a reference call)
    grad = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled in zip(layers, before):
            m.enable_adapters(not was_disabled)
        for p, g in grad:
            p.requires_grad_(g)


def add_lora(module: nn.Module, rank: int, targets: list[str]) -> None:
    """Inject LoRA layers (alpha = rank, no dropout, B = 0: the policy starts as the base); only
    they stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets)), module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_kwargs(m) -> dict:
    """The LoRA arguments of every family's constructor, from the ``model`` section ``m``."""
    return {"text_rank": m.lora.text_rank, "image_rank": m.lora.image_rank,
            "text_targets": m.lora.text_targets, "image_targets": m.lora.image_targets}


class HFUnifiedModel(nn.Module):
    """What every pipeline family shares (module docstring). Submodules: ``lm`` (the LM that
    reasons), ``dit`` (the image transformer), ``vae``."""

    pipeline_class = ""  # the diffusers pipeline class a family handles
    mode = "shared"  # who reasons: "shared" = the pipeline's text encoder, "separate" = model.reasoner

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, *, hidden_layers: tuple[int, ...] = (),
                 template_kwargs: dict | None = None, text_rank: int = 0, image_rank: int = 0,
                 text_targets=(), image_targets=()):
        super().__init__()
        n_states = lm.config.num_hidden_layers + 1  # hidden_states: the embeddings, then every layer
        if any(not -n_states <= k < n_states for k in hidden_layers):
            raise ValueError(f"model.hidden_layers: {list(hidden_layers)} do not exist in a text encoder with "
                             f"{n_states} hidden states (0 = embeddings .. {n_states - 1}); set model.hidden_layers")
        self.lm, self.dit, self.vae = lm, dit, vae
        self.vae.requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.hidden_layers = tuple(hidden_layers)
        self.text_rank, self.image_rank = text_rank, image_rank
        if text_rank > 0:
            add_lora(self.lm, text_rank, text_targets)
        if image_rank > 0:
            add_lora(self.dit, image_rank, image_targets)
        self.reasoner = CausalLMReasoner(lm, tokenizer, hidden_layers=self.hidden_layers,
                                         template_kwargs=template_kwargs or {})
        self.tokenizer, self.pad_id = tokenizer, int(self.reasoner.pad_id)

    # ----------------------------------------------------------------- text phase
    def encode_prompts(self, prompts: list[str]) -> TokenBatch:
        return self.reasoner.encode_prompts(prompts)

    def sample_reasoning(self, prompts: TokenBatch, **kw):
        return self.reasoner.sample_reasoning(prompts, **kw)

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        return self.reasoner.with_response(prompts, responses)

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        return self.reasoner.decode_text(tokens)

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0):
        return self._encode(self.lm, tokens, temperature)

    def null_context(self, batch_size: int):
        return self._null(self.lm, batch_size)

    @staticmethod
    def detach_context(ctx):
        """The context with its hidden states cut from the text graph (a dataclass with ``hidden``)."""
        return dataclasses.replace(ctx, hidden=ctx.hidden.detach())

    # ----------------------------------------------------------------- image phase
    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        return self._velocity(self.dit, x_t, t, ctx)

    # the pipeline-specific part (module docstring)
    def _encode(self, lm, tokens: TokenBatch, temperature: float):
        raise NotImplementedError

    def _null(self, lm, batch_size: int):
        raise NotImplementedError

    def _velocity(self, dit, x_t: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------- lifecycle
    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (``model.gradient_checkpointing``). diffusers
        checkpoints whenever gradients are on; transformers only in train mode, so the LM is kept in
        train mode (``train`` below), which changes nothing else only when it has no dropout
        (checked)."""
        if any(float(getattr(self.lm.config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout")):
            raise ValueError("model.gradient_checkpointing: the LM has dropout, its train mode would differ from eval mode")
        (getattr(self.lm, "activation_checkpointing_enable", None) or self.lm.gradient_checkpointing_enable)()
        self.dit.enable_gradient_checkpointing()
        self.checkpointing = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "checkpointing", False):
            self.lm.train(True)  # transformers checkpoints only in train mode (no dropout: checked)
        return self

    def _sides(self) -> dict[str, tuple[str, nn.Module, int]]:
        return {"text": ("lm", self.lm, self.text_rank), "image": ("dit", self.dit, self.image_rank)}

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """LoRA weights of a side with rank > 0, every weight of a side with rank 0."""
        return {side: [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if rank == 0 or "lora_" in n]
                for side, (prefix, module, rank) in self._sides().items()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for g in self.parameter_groups().values() for n, p in g}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for g in self.parameter_groups().values() for n, p in g}
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:  # checked first: a rejected state leaves the model untouched
            raise ValueError(f"trainable state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])

    def reference(self) -> HFReference:
        return HFReference(self)

    def wrap(self, ranks) -> None:
        dist.broadcast_parameters(self, ranks)  # every rank starts from rank 0's weights

    def reduce_gradients(self, params: list[nn.Parameter], ranks) -> None:
        dist.average_gradients(params, ranks)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """The trainable weights (LoRA, or whole sides) as safetensors; the base pipeline is named by
        the config (``model.pipeline``), recorded in the metadata for the reader."""
        from safetensors.torch import save_file

        meta = {"text_rank": str(self.text_rank), "image_rank": str(self.image_rank),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, str(tmp), metadata=meta)
        tmp.replace(path)



class HFReference:
    """The frozen starting policy: LoRA sides with their adapters off, rank-0 sides a frozen copy."""

    def __init__(self, model: HFUnifiedModel):
        self.model = model
        self.copies = {prefix: copy.deepcopy(module).requires_grad_(False).eval()
                       for prefix, module, rank in model._sides().values() if rank == 0}
        self.lm, self.dit = self.copies.get("lm", model.lm), self.copies.get("dit", model.dit)

    def _off(self):
        return adapters_disabled(self.lm if self.model.text_rank else None, self.dit if self.model.image_rank else None)

    @torch.no_grad()
    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0):
        with self._off():
            return self.model._encode(self.lm, tokens, temperature)

    @torch.no_grad()
    def null_context(self, batch_size: int):
        with self._off():
            return self.model._null(self.lm, batch_size)

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        with self._off():
            return self.model._velocity(self.dit, x_t, t, ctx)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen copies (nothing for LoRA sides: their reference is the frozen base)."""
        return {f"{prefix}.{k}": v.detach().cpu().clone() for prefix, m in self.copies.items()
                for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, m in self.copies.items():
            m.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})


def build(cfg, checkpoint: str | None) -> HFUnifiedModel:
    """``model.kind: hf``: the pipeline of ``model.pipeline`` (a ``save_pretrained`` folder or a hub
    id), its family from ``FAMILIES``, LoRA per ``model.lora``; the trainable weights of
    ``checkpoint`` (``model.save``) if given."""
    from diffusers import DiffusionPipeline

    m = cfg.model
    pipe = DiffusionPipeline.from_pretrained(m.pipeline, dtype=DTYPES[m.dtype])
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
    model = family.from_pipeline(pipe, m)
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if checkpoint is not None:
        from safetensors.torch import load_file

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"model checkpoint not found: {checkpoint}")
        model.load_trainable_state(load_file(str(checkpoint)))
    return model
