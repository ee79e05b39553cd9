"""Qwen-Image (``diffusers.QwenImagePipeline``) for ``model.kind: hf``, shared mode: its
``Qwen2_5_VLForConditionalGeneration`` text encoder reasons (text only), then its hidden states of
prompt + reasoning condition the ``QwenImageTransformer2DModel``; latents through the 5-D causal
``AutoencoderKLQwenImage``. docs/models.md lists what was verified against the pipeline and what was
not. References: diffusers' ``pipelines/qwenimage/pipeline_qwenimage.py`` (``_get_qwen_prompt_embeds``,
``encode_prompt``, ``_pack_latents``, ``calculate_shift``, ``__call__``), ``pipeline_qwenimage_img2img.py``
(``_encode_vae_image``), ``models/transformers/transformer_qwenimage.py``
(``compute_text_seq_len_from_mask``, ``QwenEmbedRope``), ``schedulers/scheduling_flow_match_euler_discrete.py``;
transformers' ``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (2-D position ids are expanded to the 3
mrope axes, identical for text).

- **Text**: the pipeline's own template (``prompt_template_encode``: its fixed system prompt, the
  user turn, ``<|im_start|>assistant\\n``), not the tokenizer's chat template; the reasoning is what
  the assistant writes after it, up to the EOS.
- **Context** (``forward_context``): ONE teacher-forced pass over each row's real tokens COMPACTED
  to ``[real tokens | pad]`` (the text RoPE of the transformer counts absolute text positions, so
  holes or left padding would move every token: the pipeline's ``_extract_masked_hidden`` compacts
  too), positions ``0..n-1``, the pad mask. The response log-probs come from that pass; the
  conditioning is ``hidden_states[-1]`` (``model.hidden_layers``; in transformers 5 the post-norm
  output, as the pipeline reads it) without the first ``prompt_template_encode_start_idx`` tokens
  (the template prefix the pipeline drops), cut at ``model.max_text_tokens`` (the pipeline's
  ``max_sequence_length``), zero at pads, with the 0/1 mask the transformer reads. Masked tokens do
  not reach the image tokens, so a row's velocity does not depend on its batch (tested).
- **Latents** are stored unpacked ``[4 z, H/16, W/16]``: the VAE latent (its frame axis dropped),
  normalised per channel ``(z - latents_mean) / latents_std`` and patchified 2x2 in the channel
  order of ``_pack_latents``; ``velocity`` packs them to ``[B, HW, 4 z]`` tokens (``img_shapes =
  (1, H/16, W/16)``) and unpacks the output.
- **Time / velocity**: the transformer is called at ``timestep = sigma`` in [0, 1] (the pipeline
  divides the scheduler's ``sigma * 1000`` by 1000) and its output is the scheduler's
  ``model_output``, stepped ``x + (sigma_next - sigma) * out``: sigma is our t, the output our
  ``eps - x0`` as is.
- **CFG** (``combine_guidance``): the pipeline's "true CFG" rescales the guided velocity of each
  image token to the norm of the conditional one, ``g * |v_c| / |g|`` over the packed channels
  (here: over dim 1 of the unpacked latent); ``algo.guidance.guided_velocity`` calls this instead
  of the plain combination. The unconditional context is ``NEGATIVE_PROMPT`` through the template.
- **Schedule**: ``sigmas = linspace(1, 1/n, n)``, ``mu = calculate_shift(image tokens, ...)`` of the
  scheduler config (linear in the image tokens, independent of n), the exponential time shift
  ``e^mu / (e^mu + 1/sigma - 1)`` = our ``shift_time(sigma, e^mu)``: ``timesteps(n, exp(mu))``; a
  config's ``shift_terminal`` stretches that grid (``timesteps(..., terminal=)``).
  ``own_timesteps(n)`` is that grid (``sampler.shift: null``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unigrpo.models.hf import HFUnifiedModel, lora_kwargs
from unigrpo.models.hf_text import packed_rows, unpacked_logprobs
from unigrpo.models.protocol import TokenBatch

__all__ = ["NEGATIVE_PROMPT", "QwenContext", "QwenImage", "qwenimage_schedule"]

NEGATIVE_PROMPT = " "  # the unconditional text of CFG (the Qwen-Image model card's negative prompt)


@dataclass
class QwenContext:
    """The transformer's text input: ``hidden`` [B, L, D] (zero at pads), ``mask`` [B, L] bool
    (real tokens; passed as ``encoder_hidden_states_mask``)."""

    hidden: torch.Tensor
    mask: torch.Tensor


def qwenimage_schedule(image_seq_len: int, scheduler_config: dict) -> tuple[float, float | None]:
    """``(shift, terminal)`` with ``timesteps(n, shift, terminal=terminal)`` == the pipeline's
    sigmas at ``image_seq_len`` packed image tokens, any n (tested): ``shift = exp(mu)``,
    ``mu = calculate_shift(...)`` with the config's ``base/max_image_seq_len``, ``base/max_shift``
    (the pipeline's defaults when absent); a static ``shift`` without dynamic shifting; ``terminal``
    the config's ``shift_terminal``. Options outside that identity are refused."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sc = scheduler_config
    if sc.get("time_shift_type", "exponential") != "exponential" or sc.get("use_karras_sigmas") \
            or sc.get("use_exponential_sigmas") or sc.get("use_beta_sigmas") or sc.get("invert_sigmas") \
            or sc.get("stochastic_sampling"):
        raise NotImplementedError(f"this scheduler config is not a shift of our time grid: {sc}")
    if sc.get("use_dynamic_shifting"):
        mu = calculate_shift(image_seq_len, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        shift = math.exp(mu)
    else:
        shift = float(sc.get("shift", 1.0))
    return shift, (float(sc["shift_terminal"]) if sc.get("shift_terminal") else None)


class QwenImage(HFUnifiedModel):
    """Qwen-Image in shared mode (module docstring). Submodules: ``lm``, ``dit``, ``vae``."""

    pipeline_class = "QwenImagePipeline"
    lm_blocks = ("model.language_model.layers",)  # FSDP2 units: Qwen2.5-VL's text decoder layers

    def __init__(self, lm, tokenizer, dit, vae, scheduler_config: dict, *, resolution: int, template: str,
                 drop_idx: int, tokenizer_max_length: int, hidden_layers: tuple[int, ...], max_text_tokens: int,
                 **lora):
        super().__init__(lm, tokenizer, dit, vae, scheduler_config, hidden_layers=hidden_layers, **lora)
        if dit.config.guidance_embeds:
            raise ValueError("model.pipeline: a guidance-distilled Qwen-Image transformer is not supported")
        width = lm.config.get_text_config().hidden_size * len(self.hidden_layers)
        if width != dit.config.joint_attention_dim:
            raise ValueError(f"model.hidden_layers: {list(self.hidden_layers)} give {width} channels, the transformer "
                             f"reads {dit.config.joint_attention_dim}")
        self.template, self.drop_idx = template, int(drop_idx)
        self.tokenizer_max_length, self.max_text_tokens = int(tokenizer_max_length), int(max_text_tokens)
        n_template = len(tokenizer(template.format(""))["input_ids"])
        if n_template <= self.drop_idx:  # the pipeline would drop the prompt itself
            raise ValueError(f"model.pipeline: its template is {n_template} tokens with this tokenizer, not more "
                             f"than the {self.drop_idx} the pipeline drops (prompt_template_encode_start_idx)")
        self.vae_scale = 2 ** len(vae.config.temperal_downsample)
        if resolution % (2 * self.vae_scale):
            raise ValueError(f"model.resolution: must be a multiple of {2 * self.vae_scale}, got {resolution}")
        side = resolution // (2 * self.vae_scale)
        self.resolution = resolution
        self.latent_shape = (4 * vae.config.z_dim, side, side)
        if dit.config.in_channels != self.latent_shape[0]:
            raise ValueError(f"the transformer reads {dit.config.in_channels} channels, the VAE gives {self.latent_shape[0]}")

    @classmethod
    def from_pipeline(cls, pipe, m) -> QwenImage:
        """The adapter over a loaded pipeline, configured by the ``model`` section ``m``."""
        return cls(pipe.text_encoder, pipe.tokenizer, pipe.transformer, pipe.vae, dict(pipe.scheduler.config),
                   resolution=m.resolution, template=pipe.prompt_template_encode,
                   drop_idx=pipe.prompt_template_encode_start_idx, tokenizer_max_length=pipe.tokenizer_max_length,
                   hidden_layers=tuple(m.hidden_layers) if m.hidden_layers else (-1,),
                   max_text_tokens=m.max_text_tokens, **lora_kwargs(m))

    def prompt_ids(self, text: str) -> list[int]:
        """The pipeline's template and tokenizer call (its truncation included)."""
        return self.tokenizer(self.template.format(text), max_length=self.tokenizer_max_length + self.drop_idx,
                              truncation=True)["input_ids"]

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, QwenContext]:
        """One teacher-forced pass in the pipeline's layout (module docstring): (log-probs [B, L], context)."""
        ids, real, src = packed_rows(tokens, 0, self.pad_id)  # compacted (module docstring)
        col = torch.arange(ids.shape[1], device=ids.device)
        # positions 0..n-1 given explicitly: the mrope axes are all text positions (no image input)
        out = self.lm(input_ids=ids, attention_mask=real.long(), position_ids=col.expand(len(ids), -1),
                      output_hidden_states=True, use_cache=False)
        logp = unpacked_logprobs(out.logits[:, :-1].float() / temperature, ids, real, src, tokens)
        keep = slice(self.drop_idx, self.drop_idx + self.max_text_tokens)  # drop the template prefix, cut
        mask = real[:, keep]
        hidden = torch.cat([out.hidden_states[k] for k in self.hidden_layers], -1)[:, keep] * mask[..., None]
        return logp, QwenContext(hidden, mask)

    def null_context(self, batch_size: int) -> QwenContext:
        """``NEGATIVE_PROMPT`` through the pipeline's template (what ``negative_prompt=`` encodes)."""
        _, ctx = self.forward_context(self.encode([NEGATIVE_PROMPT]), 1.0)
        return QwenContext(ctx.hidden.expand(batch_size, -1, -1), ctx.mask.expand(batch_size, -1))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: QwenContext) -> torch.Tensor:
        b, c, h, w = x_t.shape
        t = t.expand(b) if t.dim() == 0 else t
        dtype = self.dit_dtype
        tokens = x_t.reshape(b, c, h * w).transpose(1, 2)  # pack: [B, HW, 4 z] (pixel_unshuffle order)
        out = self.dit(hidden_states=tokens.to(dtype), encoder_hidden_states=ctx.hidden.to(dtype),
                  encoder_hidden_states_mask=ctx.mask, timestep=t.to(dtype), img_shapes=[[(1, h, w)]] * b,
                  guidance=None, return_dict=False)[0]
        return out.transpose(1, 2).reshape(b, c, h, w).to(x_t.dtype)  # unpack; eps - x0 as is (docstring)

    @staticmethod
    def combine_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """The pipeline's norm-preserving true CFG: ``g = v_u + s (v_c - v_u)``, rescaled per image
        token (dim 1: the packed channels) to ``|v_c|``."""
        g = v_uncond + cfg_scale * (v_cond - v_uncond)
        return g * (torch.norm(v_cond, dim=1, keepdim=True) / torch.norm(g, dim=1, keepdim=True))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``latents_mean`` and ``1 / latents_std`` [1, z, 1, 1], as the pipeline forms them."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.pixel_shuffle(x0, 2).to(self.vae.dtype)  # un-patchify: [4z, h, w] -> [z, 2h, 2w]
        mean, inv_std = self._stats(z)
        with torch.no_grad():  # the frame axis of the 5-D VAE: [B, z, 1, H, W] in, [B, 3, 1, H, W] out
            image = self.vae.decode((z / inv_std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the latent mode ("argmax"); the pipeline's img2img samples the posterior
            z = self.vae.encode((images * 2 - 1).unsqueeze(2).to(self.vae.dtype)).latent_dist.mode()[:, :, 0]
        mean, inv_std = self._stats(z)
        return torch.nn.functional.pixel_unshuffle(((z - mean) * inv_std).float(), 2)

    def _schedule(self) -> tuple[float, float | None]:
        return qwenimage_schedule(self.latent_shape[1] * self.latent_shape[2], self.scheduler_config)

    def own_timesteps(self, num_steps: int) -> torch.Tensor:
        """The pipeline's own grid at this resolution (``sampler.shift: null``): the shift of
        ``qwenimage_schedule`` (the same for every step count), stretched to ``shift_terminal``."""
        from unigrpo.algo.schedule import timesteps

        shift, terminal = self._schedule()
        return timesteps(num_steps, shift, terminal=terminal)

    def pipeline_shift(self, num_steps: int) -> float:
        """The one ``sampler.shift`` of the pipeline's schedule; refused when the config also
        stretches it to a terminal sigma (a shift alone is then another grid: ``sampler.shift: null``)."""
        shift, terminal = self._schedule()
        if terminal is not None:
            raise NotImplementedError(f"the scheduler stretches its grid to shift_terminal={terminal}, which no "
                                      "sampler.shift expresses: set sampler.shift=null (own_timesteps)")
        return shift
