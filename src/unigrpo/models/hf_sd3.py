"""Stable Diffusion 3 / 3.5 (``diffusers.StableDiffusion3Pipeline``) for ``model.kind: hf``,
separate mode (``hf_separate``): a transformers causal LM (``model.reasoner``) reasons, then the
pipeline's own CLIP-L, CLIP-G and T5 encode "prompt reasoning" as text and condition the
``SD3Transformer2DModel``; latents through ``AutoencoderKL``. docs/models.md lists what was verified
against the pipeline and what was not. References: diffusers'
``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`` (``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``, ``encode_prompt``, ``__call__``), ``models/transformers/transformer_sd3.py``,
``schedulers/scheduling_flow_match_euler_discrete.py``.

- **Context** (``encode_texts``, the pipeline's ``encode_prompt`` with ``clip_skip=None``): each
  CLIP tokenises to its ``model_max_length`` (padding ``max_length``, truncation; the pipeline uses
  the first tokenizer's length for both), no mask; its penultimate hidden state is the sequence
  part and its projected ``text_embeds`` the pooled part. T5 tokenises to ``model.max_text_tokens``
  (the pipeline's ``max_sequence_length``, at most 512) and its last hidden state is used, no mask
  (zeros of ``joint_attention_dim`` if the pipeline has no T5). The two CLIP sequences are
  concatenated on channels, zero-padded to T5's width and put before T5's on the sequence axis;
  the pooled vectors are concatenated. SD3 takes no text mask: every position is attended.
- **Latents** are the pipeline's ``latents``: ``(z - shift_factor) * scaling_factor``, ``[C, H/8,
  W/8]``; the transformer patchifies internally (no packing here).
- **Time / velocity**: the pipeline calls the transformer at the scheduler's ``timestep = sigma *
  1000`` and steps ``x + (sigma_next - sigma) * out``: sigma is our t, and the output is our
  ``eps - x0`` as is, so ``velocity`` calls it at ``1000 t`` (no sign flip).
- **Schedule**: the scheduler shifts sigmas statically (``shift``, 3.0 for SD3.5) or, with
  ``use_dynamic_shifting``, exponentially with ``mu = calculate_shift(image tokens)``; either is
  one ``shift_time`` of its sigma grid, so ``timesteps(n, pipeline_shift(n))`` is exactly the
  pipeline called with ``sigmas=linspace(1, 1/n, n)``. Its DEFAULT grid (no ``sigmas``) is
  ``linspace(1, shift(1/1000), n)`` before the shift, which no ``timesteps(n, s)`` reproduces
  (docs/models.md gives the size of the difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unigrpo.models.hf import lora_kwargs
from unigrpo.models.hf_separate import SeparateReasonerModel, load_reasoner

__all__ = ["SD3", "SD3Context", "sd3_shift"]

MAX_T5_TOKENS = 512  # the pipeline refuses a longer max_sequence_length (check_inputs)


@dataclass
class SD3Context:
    """The transformer's text input: ``hidden`` [B, L_clip + L_t5, D_t5] (``encoder_hidden_states``),
    ``pooled`` [B, D_pool] (``pooled_projections``), ``mask`` [B, L] (all True: SD3 has no mask)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor


def sd3_shift(image_seq_len: int, scheduler_config: dict) -> float:
    """The shift whose ``timesteps(n, shift)`` is the scheduler's shifted ``linspace(1, 1/n, n)``:
    its static ``shift``, or ``exp(mu)`` with the pipeline's ``mu = calculate_shift(image_seq_len,
    ...)`` under ``use_dynamic_shifting`` (the exponential time shift is ``shift_time(sigma,
    e^mu)``). Scheduler options without that identity are refused."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    sc = scheduler_config
    if sc.get("shift_terminal") or sc.get("use_karras_sigmas") or sc.get("use_exponential_sigmas") \
            or sc.get("use_beta_sigmas") or sc.get("invert_sigmas") or sc.get("stochastic_sampling") \
            or (sc.get("use_dynamic_shifting") and sc.get("time_shift_type", "exponential") != "exponential"):
        raise NotImplementedError(f"this scheduler config is not one shift of our time grid: {sc}")
    if not sc.get("use_dynamic_shifting"):
        return float(sc.get("shift", 1.0))
    mu = calculate_shift(image_seq_len, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                         sc.get("base_shift", 0.5), sc.get("max_shift", 1.16))  # the pipeline's fallbacks
    return math.exp(mu)


class SD3(SeparateReasonerModel):
    """SD3 / SD3.5 with a separate causal-LM reasoner (module docstring). Submodules: ``lm`` (the
    reasoner), ``dit``, ``vae``, ``encoders`` (``clip_l``, ``clip_g``, ``t5``; frozen)."""

    pipeline_class = "StableDiffusion3Pipeline"

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, encoders: dict, encoder_tokenizers: tuple,
                 *, resolution: int, max_text_tokens: int, enable_thinking: bool = True, **lora):
        super().__init__(lm, tokenizer, dit, vae, scheduler_config, encoders, enable_thinking=enable_thinking, **lora)
        if not 1 <= max_text_tokens <= MAX_T5_TOKENS:
            raise ValueError(f"model.max_text_tokens: SD3's T5 takes at most {MAX_T5_TOKENS} tokens, got {max_text_tokens}")
        self.encoder_tokenizers, self.max_text_tokens = tuple(encoder_tokenizers), int(max_text_tokens)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        unit = self.vae_scale * dit.config.patch_size
        if resolution % unit:
            raise ValueError(f"model.resolution: must be a multiple of {unit}, got {resolution}")
        self.resolution = resolution
        self.latent_shape = (vae.config.latent_channels, resolution // self.vae_scale, resolution // self.vae_scale)
        if dit.config.in_channels != self.latent_shape[0]:
            raise ValueError(f"the transformer reads {dit.config.in_channels} channels, the VAE gives {self.latent_shape[0]}")

    @classmethod
    def from_pipeline(cls, pipe, m) -> SD3:
        """The adapter over a loaded pipeline + the reasoner of ``m.reasoner``."""
        if m.hidden_layers is not None:
            raise ValueError("model.hidden_layers: not used in separate mode (SD3's encoders are the pipeline's)")
        if pipe.text_encoder is None or pipe.text_encoder_2 is None:
            raise ValueError("model.pipeline: SD3 without its two CLIP text encoders is not supported")
        lm, tokenizer = load_reasoner(m.reasoner, m.dtype)
        encoders = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2}
        if pipe.text_encoder_3 is not None:
            encoders["t5"] = pipe.text_encoder_3
        return cls(lm, tokenizer, pipe.transformer, pipe.vae, dict(pipe.scheduler.config), encoders,
                   (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), resolution=m.resolution,
                   max_text_tokens=m.max_text_tokens, enable_thinking=m.enable_thinking, **lora_kwargs(m))

    def _clip(self, i: int, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden state [B, 77, D_i], projected pooled [B, P_i]) of CLIP ``i``."""
        enc = self.encoders["clip_l" if i == 0 else "clip_g"]
        length = self.encoder_tokenizers[0].model_max_length  # the pipeline's tokenizer_max_length, for both
        ids = self.encoder_tokenizers[i](texts, padding="max_length", max_length=length, truncation=True,
                                         return_tensors="pt").input_ids.to(self.device)
        out = enc(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def encode_texts(self, texts: list[str]) -> SD3Context:
        (h_l, p_l), (h_g, p_g) = self._clip(0, texts), self._clip(1, texts)
        clip = torch.cat([h_l, h_g], -1).to(self.encoders["clip_l"].dtype)
        if "t5" in self.encoders:
            ids = self.encoder_tokenizers[2](texts, padding="max_length", max_length=self.max_text_tokens,
                                             truncation=True, add_special_tokens=True,
                                             return_tensors="pt").input_ids.to(self.device)
            t5 = self.encoders["t5"](ids)[0]
        else:  # the pipeline's stand-in for a missing T5
            t5 = clip.new_zeros(len(texts), self.max_text_tokens, self.dit.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero channels up to T5's width
        hidden = torch.cat([clip, t5.to(clip.dtype)], -2)
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return SD3Context(hidden, torch.cat([p_l, p_g], -1), mask)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: SD3Context) -> torch.Tensor:
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        dtype = self.dit_dtype
        out = self.dit(hidden_states=x_t.to(dtype), timestep=(1000 * t).to(dtype), encoder_hidden_states=ctx.hidden.to(dtype),
                  pooled_projections=ctx.pooled.to(dtype), return_dict=False)[0]
        return out.to(x_t.dtype)  # eps - x0 as is (module docstring)

    def _scale_shift(self) -> tuple[float, float]:
        return float(self.vae.config.scaling_factor), float(self.vae.config.shift_factor or 0.0)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift()
        with torch.no_grad():
            image = self.vae.decode((x0 / scale + shift).to(self.vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift()
        with torch.no_grad():
            z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()  # deterministic: the mode
        return (z.float() - shift) * scale

    def own_timesteps(self, num_steps: int) -> torch.Tensor:
        """``sampler.shift: null``: the grid a plain ``pipe(...)`` call samples on (no ``sigmas``):
        the scheduler's own ``set_timesteps(n)`` sigmas, which shift ``linspace(1, sigma_min, n)``
        and append 0, with the pipeline's ``mu`` under dynamic shifting. No ``timesteps(n, s)``
        equals it (docs/models.md), so it is taken from the scheduler itself."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        kw = {"mu": math.log(self.pipeline_shift(num_steps))} if self.scheduler_config.get("use_dynamic_shifting") else {}
        sched.set_timesteps(num_steps, device="cpu", **kw)
        return sched.sigmas.to(torch.float32)

    def pipeline_shift(self, num_steps: int) -> float:
        """The ``sampler.shift`` of the pipeline's schedule at this resolution (``sd3_shift``; the
        step count does not enter SD3's shift)."""
        patch = self.dit.config.patch_size
        return sd3_shift((self.latent_shape[1] // patch) * (self.latent_shape[2] // patch), self.scheduler_config)
