"""``model.kind: hf``: a diffusers pipeline whose text encoder is a causal LM, in shared mode (the
same LM reasons, then its hidden states of prompt + reasoning condition the image transformer).

Supported pipeline: FLUX.2 [klein] (``diffusers.Flux2KleinPipeline``: ``Qwen3ForCausalLM`` text
encoder, ``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``). docs/models.md lists what was
verified against the pipeline and what was not. References: diffusers'
``pipelines/flux2/pipeline_flux2_klein.py`` (``_get_qwen3_prompt_embeds``, ``__call__``,
``prepare_latents``, ``_encode_vae_image``), ``models/transformers/transformer_flux2.py``,
``schedulers/scheduling_flow_match_euler_discrete.py``.

- **Text**: ``CausalLMReasoner`` over the pipeline's tokenizer and text encoder; the chat template
  with ``enable_thinking`` (``model.enable_thinking``, default True: the generation prompt stops
  where the model opens its ``<think>`` block, so the reasoning is its thinking + answer; False:
  the pipeline's own template, which closes an empty think block, and the reasoning follows it).
- **Context** (``forward_context``): ONE teacher-forced pass over each row's real tokens laid out
  as the pipeline lays out a prompt: ``[real tokens | pad]`` right-padded to
  ``model.max_text_tokens`` (the pipeline's ``max_sequence_length``), default positions, the pad
  mask; the response log-probs come from that pass, the conditioning is the hidden states of
  ``model.hidden_layers`` (the pipeline's ``text_encoder_out_layers``) of the first
  ``max_text_tokens`` positions, concatenated on channels, pad positions included (FLUX.2 takes no
  text mask: the pads are attended, as in the pipeline). The layout is per row, so a row's
  conditioning does not depend on the rows it is batched with. Longer rows are cut at
  ``max_text_tokens`` for the conditioning (the pipeline truncates) but scored in full.
- **Latents** are stored as the pipeline's ``latents`` argument: VAE latents patchified 2x2 and
  normalised by the VAE's BatchNorm running statistics, unpacked ``[4 z, H/2, W/2]``; ``velocity``
  packs them to ``[B, HW, 4 z]`` tokens with the pipeline's position ids and unpacks the output.
- **Time / velocity**: FLUX.2's transformer is called at ``timestep = sigma`` in [0, 1] (the
  pipeline divides the scheduler's ``sigma * 1000`` by 1000) and its output is the scheduler's
  ``model_output``, stepped as ``x + (sigma_next - sigma) * out``: sigma is our t and the output is
  our ``eps - x0`` as is (no sign flip).
- **Schedule**: the pipeline uses ``sigmas = linspace(1, 1/n, n)`` and an exponential dynamic shift
  ``mu = compute_empirical_mu(image tokens, n)``, which is our ``timesteps(n, shift=exp(mu))``
  exactly; ``pipeline_shift(n)`` gives that shift (set ``sampler.shift`` to it).
- **LoRA** (``model.lora.text_rank`` / ``image_rank`` > 0): peft LoRA layers injected into the LM /
  the transformer, base weights frozen; the reference is the same modules with the adapters
  switched off (``adapters_disabled``). Rank 0 trains that whole side; its reference is then a
  frozen copy of that side (memory: one more copy of it).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unigrpo.models.hf_text import CausalLMReasoner
from unigrpo.models.protocol import TokenBatch
from unigrpo.utils import dist

__all__ = ["FluxContext", "HFUnifiedModel", "adapters_disabled", "build", "flux2_shift"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FluxContext:
    """The transformer's text input: ``hidden`` [B, L, D] (``L = max_text_tokens``), ``mask``
    [B, L] (real tokens; FLUX.2 attends every position, pads included)."""

    hidden: torch.Tensor
    mask: torch.Tensor


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


def default_hidden_layers() -> tuple[int, ...]:
    """The pipeline's own default ``text_encoder_out_layers`` ((9, 18, 27) in diffusers 0.42)."""
    from diffusers import Flux2KleinPipeline

    return tuple(inspect.signature(Flux2KleinPipeline.encode_prompt).parameters["text_encoder_out_layers"].default)


def flux2_shift(image_seq_len: int, num_steps: int, scheduler_config: dict) -> float:
    """``exp(mu)``, ``mu = compute_empirical_mu(image_seq_len, num_steps)``: with the pipeline's
    ``sigmas = linspace(1, 1/n, n)``, the scheduler's exponential time shift
    ``e^mu / (e^mu + 1/sigma - 1)`` is our ``shift_time(sigma, e^mu)``, so our ``timesteps(n, exp(mu))``
    is the pipeline's grid (tested). Scheduler options without that identity are refused."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    sc = scheduler_config
    if not sc.get("use_dynamic_shifting") or sc.get("time_shift_type", "exponential") != "exponential" \
            or sc.get("shift_terminal") or sc.get("use_karras_sigmas") or sc.get("use_exponential_sigmas") \
            or sc.get("use_beta_sigmas") or sc.get("invert_sigmas") or sc.get("stochastic_sampling"):
        raise NotImplementedError(f"this scheduler config is not one shift of our time grid: {sc}")
    return math.exp(compute_empirical_mu(image_seq_len, num_steps))


class HFUnifiedModel(nn.Module):
    """FLUX.2 [klein] in shared mode (module docstring). Submodules: ``lm``, ``dit``, ``vae``."""

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, *, resolution: int,
                 hidden_layers: tuple[int, ...], max_text_tokens: int, enable_thinking: bool,
                 text_rank: int = 0, image_rank: int = 0, text_targets=(), image_targets=()):
        super().__init__()
        if tokenizer.padding_side != "right":
            raise ValueError(f"model.pipeline: the tokenizer pads on the {tokenizer.padding_side}; "
                             "only right padding (the FLUX.2 [klein] tokenizer's) is implemented")
        n_states = lm.config.num_hidden_layers + 1  # hidden_states: the embeddings, then every layer
        if any(not -n_states <= k < n_states for k in hidden_layers):
            raise ValueError(f"model.hidden_layers: {list(hidden_layers)} do not exist in a text encoder with "
                             f"{n_states} hidden states (0 = embeddings .. {n_states - 1}); set model.hidden_layers")
        self.lm, self.dit, self.vae = lm, dit, vae
        self.vae.requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.hidden_layers, self.max_text_tokens = tuple(hidden_layers), int(max_text_tokens)
        self.enable_thinking = enable_thinking
        self.text_rank, self.image_rank = text_rank, image_rank
        if text_rank > 0:
            add_lora(self.lm, text_rank, text_targets)
        if image_rank > 0:
            add_lora(self.dit, image_rank, image_targets)
        self.reasoner = CausalLMReasoner(lm, tokenizer, hidden_layers=self.hidden_layers,
                                         template_kwargs={"enable_thinking": enable_thinking})
        self.tokenizer, self.pad_id = tokenizer, int(self.reasoner.pad_id)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % (2 * self.vae_scale):
            raise ValueError(f"model.resolution: must be a multiple of {2 * self.vae_scale}, got {resolution}")
        side = resolution // (2 * self.vae_scale)
        self.resolution = resolution
        self.latent_shape = (4 * vae.config.latent_channels, side, side)
        if dit.config.in_channels != self.latent_shape[0]:
            raise ValueError(f"the transformer reads {dit.config.in_channels} channels, the VAE gives {self.latent_shape[0]}")

    # ----------------------------------------------------------------- text phase
    def encode_prompts(self, prompts: list[str]) -> TokenBatch:
        return self.reasoner.encode_prompts(prompts)

    def sample_reasoning(self, prompts: TokenBatch, **kw):
        return self.reasoner.sample_reasoning(prompts, **kw)

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        return self.reasoner.with_response(prompts, responses)

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        return self.reasoner.decode_text(tokens)

    def _encode(self, lm, tokens: TokenBatch, temperature: float) -> tuple[torch.Tensor, FluxContext]:
        """The teacher-forced pass of ``forward_context`` with the LM ``lm`` (policy or reference)."""
        b, width = tokens.ids.shape
        n = tokens.mask.sum(1)
        packed_w = max(self.max_text_tokens, int(n.max()))
        # each row's real tokens first, in order, then pads: the pipeline's right-padded layout
        order = torch.sort((~tokens.mask).long(), dim=1, stable=True).indices  # [B, width]
        col = torch.arange(packed_w, device=tokens.ids.device)
        real = col[None] < n[:, None]  # [B, packed_w]
        src = torch.zeros(b, packed_w, dtype=torch.long, device=tokens.ids.device)
        src[:, :min(width, packed_w)] = order[:, :packed_w]
        ids = torch.where(real, tokens.ids.gather(1, src), torch.full_like(src, self.pad_id))
        out = lm(input_ids=ids, attention_mask=real.long(), output_hidden_states=True, use_cache=False)
        logits = out.logits[:, :-1].float() / temperature
        logp_next = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
        logp_packed = torch.nn.functional.pad(logp_next, (1, 0)) * real
        # back to the caller's layout: packed column j of row i is its column src[i, j]
        logp = torch.zeros(b, width, dtype=logp_packed.dtype, device=ids.device)
        logp = logp.scatter_add(1, src[:, :width].clamp(max=width - 1), (logp_packed * real)[:, :width])
        logp = logp * tokens.response_mask
        hidden = torch.cat([out.hidden_states[k][:, :self.max_text_tokens] for k in self.hidden_layers], -1)
        return logp, FluxContext(hidden, real[:, :self.max_text_tokens])

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, FluxContext]:
        return self._encode(self.lm, tokens, temperature)

    def _null(self, lm, batch_size: int) -> FluxContext:
        """The pipeline's negative prompt: "" through the pipeline's template (no thinking)."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        _, ctx = self._encode(lm, TokenBatch(ids, mask, torch.zeros_like(mask)), 1.0)
        return FluxContext(ctx.hidden.expand(batch_size, -1, -1), ctx.mask.expand(batch_size, -1))

    def null_context(self, batch_size: int) -> FluxContext:
        return self._null(self.lm, batch_size)

    @staticmethod
    def detach_context(ctx: FluxContext) -> FluxContext:
        return FluxContext(ctx.hidden.detach(), ctx.mask)

    # ----------------------------------------------------------------- image phase
    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def _velocity(self, dit, x_t: torch.Tensor, t: torch.Tensor, ctx: FluxContext) -> torch.Tensor:
        b, c, h, w = x_t.shape
        t = t.expand(b) if t.dim() == 0 else t
        dev, dtype = x_t.device, dit.dtype
        hh, ww = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        zero = torch.zeros(h * w, dtype=torch.long, device=dev)
        img_ids = torch.stack([zero, hh.reshape(-1), ww.reshape(-1), zero], -1)  # (T, H, W, L) coordinates
        length = ctx.hidden.shape[1]
        lz = torch.zeros(length, dtype=torch.long, device=dev)
        txt_ids = torch.stack([lz, lz, lz, torch.arange(length, device=dev)], -1)
        tokens = x_t.reshape(b, c, h * w).transpose(1, 2)  # pack: [B, HW, C]
        out = dit(hidden_states=tokens.to(dtype), timestep=t.to(dtype), guidance=None,
                  encoder_hidden_states=ctx.hidden.to(dtype), txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w).to(x_t.dtype)  # unpack; eps - x0 as is (docstring)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: FluxContext) -> torch.Tensor:
        return self._velocity(self.dit, x_t, t, ctx)

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn(x0)
        z = torch.nn.functional.pixel_shuffle(x0 * std + mean, 2)  # un-patchify 2x2: [4z, h, w] -> [z, 2h, 2w]
        with torch.no_grad():
            image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()  # the pipeline's "argmax"
        z = torch.nn.functional.pixel_unshuffle(z.float(), 2)
        mean, std = self._bn(z)
        return (z - mean) / std

    def pipeline_shift(self, num_steps: int) -> float:
        """The ``sampler.shift`` whose ``timesteps(num_steps, shift)`` is the pipeline's schedule at
        this resolution (``flux2_shift``)."""
        return flux2_shift(self.latent_shape[1] * self.latent_shape[2], num_steps, self.scheduler_config)

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
    def null_context(self, batch_size: int) -> FluxContext:
        with self._off():
            return self.model._null(self.lm, batch_size)

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: FluxContext) -> torch.Tensor:
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
    id), LoRA per ``model.lora``; the trainable weights of ``checkpoint`` (``model.save``) if given."""
    from diffusers import Flux2KleinPipeline

    m = cfg.model
    pipe = Flux2KleinPipeline.from_pretrained(m.pipeline, dtype=DTYPES[m.dtype])
    model = HFUnifiedModel(
        pipe.text_encoder, pipe.tokenizer, pipe.transformer, pipe.vae, dict(pipe.scheduler.config),
        resolution=m.resolution, hidden_layers=tuple(m.hidden_layers) if m.hidden_layers else default_hidden_layers(),
        max_text_tokens=m.max_text_tokens, enable_thinking=m.enable_thinking, text_rank=m.lora.text_rank,
        image_rank=m.lora.image_rank, text_targets=m.lora.text_targets, image_targets=m.lora.image_targets)
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if checkpoint is not None:
        from safetensors.torch import load_file

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"model checkpoint not found: {checkpoint}")
        model.load_trainable_state(load_file(str(checkpoint)))
    return model
