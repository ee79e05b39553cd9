"""Batch bookkeeping of the UniGRPO recipe: derived sizes, per-index seeds, PPO minibatch order.

Sizes count trajectories (one reasoning chain + one image) unless named otherwise, per
optimisation step over all ranks; ``*_local`` = per rank. Every random draw of a step is keyed by
(seed, step, global index, stream), so a run does not depend on the number of ranks or the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrpo.config import Config, ConfigError
from unigrpo.rollout import SHUFFLE, derive_seed

__all__ = ["Sizes", "derived_sizes", "describe", "ppo_order", "seeds"]


@dataclass(frozen=True)
class Sizes:
    """Derived batch sizes (trajectories unless named otherwise); ``*_local`` = per rank."""

    world: int
    prompts_local: int
    trajectories: int
    trajectories_local: int
    minibatches: int  # per PPO epoch
    minibatch_local: int
    micro_per_minibatch: int
    micro_local: int


def derived_sizes(cfg: Config, world: int) -> Sizes:
    algo = cfg.algo
    if algo.train_text and not cfg.text.thinking:
        raise ConfigError("text.thinking: thinking off leaves no reasoning tokens to train; "
                          "set algo.train_text=false")
    for name, value in (("algo.prompts_per_step", algo.prompts_per_step),
                        ("algo.trajectories_per_minibatch", algo.trajectories_per_minibatch),
                        ("algo.micro_batch_trajectories", algo.micro_batch_trajectories)):
        if value % world:
            raise ValueError(f"{name}={value} must be divisible by the number of ranks ({world})")
    total = algo.prompts_per_step * algo.group_size
    return Sizes(world, algo.prompts_per_step // world, total, total // world,
                 total // algo.trajectories_per_minibatch, algo.trajectories_per_minibatch // world,
                 algo.trajectories_per_minibatch // algo.micro_batch_trajectories,
                 algo.micro_batch_trajectories // world)


def describe(cfg: Config, sizes: Sizes) -> str:
    """The derived sizes in one line, printed at the start of a run."""
    algo, sampler = cfg.algo, cfg.sampler
    return (f"unigrpo train: {sizes.world} rank(s) | per step {algo.prompts_per_step} prompts x {algo.group_size} = "
            f"{sizes.trajectories} trajectories ({sizes.trajectories_local} per rank) | {algo.ppo_epochs} PPO "
            f"epochs x {sizes.minibatches} minibatches of {algo.trajectories_per_minibatch} ({sizes.minibatch_local} "
            f"per rank) = {algo.ppo_epochs * sizes.minibatches} updates/step | {sizes.micro_per_minibatch} "
            f"micro-batches of {algo.micro_batch_trajectories} per minibatch ({sizes.micro_local} per rank) | "
            f"window {sampler.window_size} of {sampler.num_steps} steps | train text={algo.train_text} "
            f"image={algo.train_image}")


def seeds(cfg: Config, step: int, first: int, count: int, stream: int) -> list[int]:
    """Seeds of global indices ``first .. first + count - 1`` (prompts or trajectories) of ``step``."""
    return [derive_seed(cfg.seed, step, first + i, stream) for i in range(count)]


def ppo_order(cfg: Config, step: int, epoch: int, p0: int, n_prompts: int, minibatch: int) -> torch.Tensor:
    """Order of this rank's ``n_prompts * G`` trajectories in PPO epoch ``epoch``; consecutive
    blocks of ``minibatch`` are the minibatches.

    Each group's trajectories are permuted (generator keyed by the global prompt index ``p0 + i``)
    and every minibatch takes an equal share of EVERY group, prompt-major. When
    ``trajectories_per_minibatch`` is a multiple of ``prompts_per_step`` this makes each global
    minibatch the same set of trajectories whatever the number of ranks (rank r holds a contiguous
    block of it); otherwise minibatches take slots of successive groups in turn."""
    group = cfg.algo.group_size
    perms = torch.stack([torch.randperm(group, generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, step, epoch, p0 + i, SHUFFLE))) for i in range(n_prompts)])
    idx = perms + group * torch.arange(n_prompts)[:, None]  # [P_local, G] row = prompt
    n_minibatches = n_prompts * group // minibatch  # M, per epoch
    if group % n_minibatches == 0:  # [M, P_local, G / M]: minibatch-major, then prompt-major
        return idx.reshape(n_prompts, n_minibatches, group // n_minibatches).transpose(0, 1).flatten()
    return idx.t().flatten()  # slot-major
