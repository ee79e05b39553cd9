"""Deterministic generation and evaluation shared by `eval`, `sample`, `pretrain` and the RL recipe.

Evaluation draws images with the Euler ODE (no noise) so a checkpoint's score depends only on the
prompts and the initial noise seed; reasoning is sampled (thinking on), skipped (thinking off), or
given (e.g. the ground-truth reasoning, to measure how well the image expert follows descriptions).
Multi-round episodes (``generate_episode``: think -> draw -> look -> reflect -> redraw) are the
rollout's own ``sample_episode`` with the noise level at 0 (every step the Euler ODE step) and seeds
keyed by (seed, row, round, stream): the evaluation of ``shapes_refine`` and ``unigrpo sample --rounds``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrpo import rollout as R
from unigrpo.models.protocol import TokenBatch
from unigrpo.rollout import guided_velocity


@torch.no_grad()
def ode_sample(model, ctx, num_steps: int, shift: float | None, *, x_init: torch.Tensor, cfg_scale: float = 1.0,
               velocity=None) -> torch.Tensor:
    """Euler ODE from the noise ``x_init`` [B, *latent] (t=1) to data (t=0). Returns latents
    [B, *latent]. ``velocity`` (x_t, t) -> v replaces the (guided) model velocity (an adapter's
    evaluation guidance)."""
    batch, x = x_init.shape[0], x_init
    null_ctx = model.null_context(batch) if cfg_scale != 1.0 and velocity is None else None
    grid = model.timesteps(num_steps, shift).to(x.device)
    for k in range(num_steps):
        t = grid[k].expand(batch)
        v = velocity(x, t) if velocity is not None else guided_velocity(model, x, t, ctx, null_ctx, cfg_scale)
        x = x + (grid[k + 1] - grid[k]) * v.float()  # Euler step, x_next = x_t + (t_next - t) v
    return x


def reasoning_tokens(model, prompts: list, reasoning: list[str] | None, thinking: bool,
                     max_new_tokens: int, temperature: float, generator: torch.Generator | None) -> TokenBatch:
    """Inputs (``tasks.Prompt`` or str) followed by sampled reasoning, given reasoning, or nothing
    (thinking off)."""
    batch = model.encode(prompts)
    if not thinking:
        return batch
    if reasoning is None:
        return model.sample_reasoning(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                      generator=generator)
    return model.with_response(batch, reasoning)


@dataclass
class Generation:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    reasoning: list[str]  # generated (or given) response text per image; "" when thinking is off


@torch.no_grad()
def generate(model, prompts: list, *, thinking: bool = True, reasoning: list[str] | None = None,
             num_steps: int = 20, shift: float = 3.0, cfg_scale: float = 1.0, seed: int = 0,
             max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 64) -> Generation:
    """Reason (optionally) then draw with the ODE, in batches; deterministic for a seed. With
    ``cfg_scale != 1`` a model's own ``eval_guidance`` (Bagel's two-branch guidance) guides when it
    has one, else ``guided_velocity``. Evaluation only: the rollout (``rollout.sample_images``)
    never calls this. ``prompts``: ``tasks.Prompt`` objects or strings."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images, texts = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        given = reasoning[start:start + batch_size] if reasoning is not None else None
        tokens = reasoning_tokens(model, chunk, given, thinking, max_new_tokens, temperature, gen)
        _, ctx = model.forward_context(tokens, temperature)
        noise = torch.randn((len(chunk), *model.latent_shape), generator=gen).to(tokens.ids.device)
        own = model.eval_guidance(tokens, ctx, cfg_scale) if cfg_scale != 1.0 else None
        x0 = ode_sample(model, ctx, num_steps, shift, cfg_scale=cfg_scale, x_init=noise, velocity=own)
        images.append(model.decode(x0).cpu())
        texts.extend(model.decode_text(tokens) if thinking else [""] * len(chunk))
    return Generation(torch.cat(images), texts)


def episode_seeds(seed: int, n: int, rounds: int) -> R.EpisodeSeeds:
    """The randomness of ``n`` deterministic episodes of ``rounds`` rounds, one per row (group of 1):
    reasoning and noise of row i in round r from ``derive_seed(seed, i, r, stream)``; window at 0."""
    keyed = [[R.derive_seed(seed, i, r, stream) for i in range(n)] for r in range(rounds)
             for stream in (R.REASONING, R.NOISE)]
    zero = torch.zeros(n, dtype=torch.long)
    later = [R.RoundSeeds(keyed[2 * r], keyed[2 * r + 1], zero) for r in range(1, rounds)]
    return R.EpisodeSeeds(keyed[0], keyed[1], zero, None, later)


def check_episode(model, rounds: int, cfg_scale: float) -> None:
    """InputError (one line) when ``model`` cannot run ``rounds``-round evaluation episodes: it has no
    reflection turn, or it edits and ``cfg_scale`` guides its later rounds by its null context, which
    holds no image (the one it drew would be dropped from the unconditional branch)."""
    from unigrpo.utils.errors import InputError

    if rounds == 1:
        return
    try:
        model.reflection_ids()
    except NotImplementedError as e:
        raise InputError(f"algo.rounds={rounds}: {e}") from None
    if model.edits and cfg_scale != 1:
        raise InputError(f"sampler.eval_cfg_scale={cfg_scale:g} with algo.rounds={rounds}: a later round edits the image "
                         "drawn before, and the guidance's null context holds no image; use sampler.eval_cfg_scale=1")


@torch.no_grad()
def generate_episode(model, prompts: list, rounds: int, *, seed: int, num_steps: int, shift: float | None,
                     cfg_scale: float, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                     given=None, batch_size: int = 64) -> R.Episode:
    """Deterministic ``rounds``-round episodes of ``prompts`` (one per prompt; module docstring):
    ``sample_episode`` over chunks of ``batch_size`` rows with every denoising step the ODE step.
    ``given``: ``sample_episode``'s (reflections teacher-forced, not sampled). A model without a
    reflection turn is refused in one line before anything is drawn."""
    from unigrpo.utils.dist import Dist

    check_episode(model, rounds, cfg_scale)
    n = len(prompts)
    text = {"thinking": True, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "batch_groups": True}
    sampler = {"num_steps": num_steps, "shift": shift, "kind": "flow_sde", "noise_level": 0.0, "window_size": 1,
               "cfg_scale": cfg_scale, "temperature": temperature, "reduction": "mean"}  # noise 0: the Euler ODE step
    return R.sample_episode(model, prompts, 1, episode_seeds(seed, n, rounds), list(torch.arange(n).split(batch_size)),
                            Dist(), text=text, sampler=sampler, given=given)
