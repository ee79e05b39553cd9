"""Batch bookkeeping of the UniGRPO recipe: derived sizes, per-index seeds, PPO minibatch order, and
the DiffusionNFT image objective's per-step draws and loss (``algo.image_objective: nft``).

Sizes count trajectories (one reasoning chain + one image) unless named otherwise, per
optimisation step over all ranks; ``*_local`` = per rank. Every random draw of a step is keyed by
(seed, step, global index, stream), so a run does not depend on the number of ranks or the chunking.

DiffusionNFT (docs/algorithm.md, "DiffusionNFT image objective") plugs in beside FlowGRPO in two
calls: ``nft_draws`` once per step, BEFORE the first update (the model is then the behaviour
policy, the "old" policy of NFT), fixes each trajectory's training times, fresh noise, noised
latents and the old velocity there; ``nft_image_loss`` is the image loss of a micro-batch. The
draws run on the first PPO epoch's micro-batches (the rollout chunks), so on the first update the
current velocity equals the old one bit for bit (``loss/image/first_v_old_diff_max`` = 0): the NFT
analogue of the first PPO ratio being exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from unigrpo.algo.image_loss import latent_kl, velocity_mse
from unigrpo.algo.nft import forward_noise, nft_loss, optimality
from unigrpo.algo.sde import sde_step
from unigrpo.config import Config, ConfigError
from unigrpo.rollout import (
    NOISE,
    REASONING,
    SHUFFLE,
    TRAJ_WINDOW,
    WINDOW,
    Episode,
    EpisodeSeeds,
    Round,
    RoundSeeds,
    derive_seed,
    window_starts,
)
from unigrpo.utils.logging import StatsMean

__all__ = ["NFTDraws", "Sizes", "derived_sizes", "describe", "nft_draws", "nft_image_loss", "nft_num_times",
           "ppo_order", "round_metrics", "round_reward_metadata", "round_seeds", "seeds", "tree_copies"]

NFT_DRAW = 6  # derive_seed stream of the DiffusionNFT draws (unigrpo.rollout's streams are 0-5)


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
            f"image={algo.train_image}" + (f" (DiffusionNFT, {nft_num_times(cfg)} times per trajectory)"
                                           if algo.image_objective == "nft" else ""))


def seeds(cfg: Config, step: int, first: int, count: int, stream: int) -> list[int]:
    """Seeds of global indices ``first .. first + count - 1`` (prompts or trajectories) of ``step``."""
    return [derive_seed(cfg.seed, step, first + i, stream) for i in range(count)]


def round_seeds(cfg: Config, step: int, p0: int, n_prompts: int, first_traj: int, n_local: int) -> list[RoundSeeds]:
    """The seeds of rounds 2 .. ``algo.rounds`` of this rank's trajectories (empty for one round): the
    same streams as round 1's, each also keyed by the round, so the rounds draw independently and
    neither the ranks, the chunking nor a resume change them."""
    algo, s = cfg.algo, cfg.sampler
    out = []
    for r in range(1, algo.rounds):
        def keyed(first: int, count: int, stream: int, r=r) -> list[int]:
            return [derive_seed(cfg.seed, step, first + i, stream, r) for i in range(count)]

        starts = window_starts(keyed(p0, n_prompts, WINDOW), keyed(first_traj, n_local, TRAJ_WINDOW), algo.group_size,
                               s.num_steps, s.window_size, s.window_range, algo.share_window_in_group)
        out.append(RoundSeeds(keyed(first_traj, n_local, REASONING), keyed(first_traj, n_local, NOISE), starts))
    return out


def tree_copies(draws: EpisodeSeeds, branches: int) -> EpisodeSeeds:
    """Tree credit: the K = ``branches`` continuations of a round-1 sample (adjacent rows) share its
    round-1 noise, window and initial noise (those of the first copy); their later rounds keep their own."""
    parent = [i - i % branches for i in range(len(draws.noise))]
    return EpisodeSeeds(draws.reasoning, [draws.noise[i] for i in parent], draws.window_start[parent],
                        None if draws.init is None else [draws.init[i] for i in parent], draws.later)


def round_reward_metadata(part: Episode, r: int, j: int) -> dict:
    """What a reward sees of row ``j``'s round ``r`` beyond the one-round metadata (multi-round only):
    ``round`` (0-based) and, from round 1 on, ``previous_image`` [3, H, W] (the image it had before)
    and ``reflection`` (that round's own text: what the model said of ``previous_image``; "" for a
    row that had stopped)."""
    if r == 0:
        return {"round": r}
    return {"round": r, "previous_image": part.rounds[r - 1].images[j], "reflection": part.rounds[r].reasoning[j]}


def round_metrics(roll: Episode, rewards: torch.Tensor) -> dict[str, float]:
    """``rollout/round<r>/*`` of this rank's episodes and their per-round rewards [N_local, R]: the
    reward, the share right (reward >= 1, the shapes rewards' strict success), of rows live / that
    said the stop word, the reasoning tokens; ``rollout/fix_frac`` / ``break_frac``: of the rows that
    drew again, the share whose image went from wrong to right / right to wrong (docs/metrics.md)."""
    right = rewards >= 1.0 - 1e-6
    out, fixed, broke, redrawn = {}, 0.0, 0.0, 0.0
    for r, rnd in enumerate(roll.rounds):
        said_done = rnd.live & ~rnd.drew
        out.update({f"rollout/round{r}/reward": float(rewards[:, r].mean()),
                    f"rollout/round{r}/right_frac": float(right[:, r].float().mean()),
                    f"rollout/round{r}/live_frac": float(rnd.live.float().mean()),
                    f"rollout/round{r}/done_frac": float(said_done.float().mean()),
                    f"rollout/round{r}/reasoning_tokens": float(rnd.tokens.response_mask.sum(1).float().mean())})
        if r:
            d = rnd.drew
            fixed += float((d & ~right[:, r - 1] & right[:, r]).sum())
            broke += float((d & right[:, r - 1] & ~right[:, r]).sum())
            redrawn += float(d.sum())
    out["rollout/fix_frac"] = fixed / max(redrawn, 1.0)  # max: no row drew again gives 0, not 0 / 0
    out["rollout/break_frac"] = broke / max(redrawn, 1.0)
    return out


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


# ---------------------------------------------------------------------------------------------- DiffusionNFT
@dataclass
class NFTDraws:
    """One round's DiffusionNFT training points, fixed for the step (K = ``nft_num_times``)."""

    t: torch.Tensor  # [N, K] flow times, drawn without replacement from the sampler's grid
    t_next: torch.Tensor  # [N, K] the grid's next time (the sampler step of the latent KL)
    x_t: torch.Tensor  # [N, K, *latent] (1 - t) x0 + t eps, fresh noise eps
    v_old: torch.Tensor  # [N, K, *latent] the behaviour (old) policy's velocity at (x_t, t)

    def index(self, idx: torch.Tensor) -> NFTDraws:
        """Rows ``idx`` (a 1-D long tensor), every field alike."""
        return NFTDraws(**{f.name: getattr(self, f.name)[idx.to(self.t.device)] for f in fields(self)})


def nft_num_times(cfg: Config) -> int:
    """Training times per trajectory: ``int(nft_timestep_fraction * num_steps)``, at least 1 (upstream: 9 of 10)."""
    return max(1, int(cfg.algo.nft_timestep_fraction * cfg.sampler.num_steps))


@torch.no_grad()
def nft_draws(model, roll: Episode, cfg: Config, step: int, first_traj: int,
              chunks: list[torch.Tensor]) -> list[NFTDraws]:
    """Every round's :class:`NFTDraws` for this rank's trajectories ``roll`` [N_local] (prompt-major,
    global index ``first_traj + i``); call before the step's first update. ``chunks``: the first PPO
    epoch's micro-batches, on which the old velocity is computed (module docstring).

    Each trajectory shuffles the sampler's grid times ``t_0 .. t_{S-1}`` (``t_S = 0`` is never
    trained: there ``x_t = x0``) and keeps the first K, with fresh noise per time (upstream); all of it
    from one generator keyed by (seed, step, trajectory, round), so neither the ranks nor the
    chunking change the draws."""
    s = cfg.sampler.num_steps
    k = nft_num_times(cfg)
    grid = model.timesteps(s, cfg.sampler.shift).cpu().float()  # [S + 1]
    out = []
    for rnd_i, rnd in enumerate(roll.rounds):
        n, dev = len(rnd), rnd.x0.device
        idx = torch.empty(n, k, dtype=torch.long)
        eps = torch.empty(n, k, *model.latent_shape)
        for i in range(n):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, step, first_traj + i, rnd_i, NFT_DRAW))
            idx[i] = torch.randperm(s, generator=g)[:k]
            eps[i] = torch.randn(k, *model.latent_shape, generator=g)
        t, t_next = grid[idx].to(dev), grid[idx + 1].to(dev)  # [N, K]
        x0 = rnd.x0.float()[:, None].expand(n, k, *model.latent_shape)  # [N, K, *latent]
        x_t = forward_noise(x0.flatten(0, 1), eps.to(dev).flatten(0, 1), t.flatten()).reshape(x0.shape)
        v_old = torch.zeros_like(x_t)
        for rows in chunks:
            part = rnd.index(rows)
            drew = part.drew.nonzero()[:, 0]
            if len(drew) < len(part):  # multi-round: the rows that drew, on a pass over them alone (train.drawn_image_loss)
                rows, part = rows[drew.to(rows.device)], part.index(drew)
            if not len(rows):
                continue
            ctx = _image_context(model, part, cfg)
            rows = rows.to(dev)
            for j in range(k):  # as nft_image_loss: one call per time, contiguous rows
                v_old[rows, j] = model.velocity(x_t[rows, j].contiguous(), t[rows, j].contiguous(), ctx).float()
        out.append(NFTDraws(t, t_next, x_t, v_old))
    return out


def _image_context(model, rnd: Round, cfg: Config):
    """The context the training's image loss reads (``round_loss``: detached with ``algo.detach_context``)."""
    _, ctx = model.forward_context(rnd.tokens, cfg.text.temperature)
    return model.detach_context(ctx) if cfg.algo.detach_context else ctx


def nft_image_loss(model, ref, rnd: Round, draws: NFTDraws, ctx, ctx_ref, adv: torch.Tensor, cfg: Config):
    """DiffusionNFT loss of a micro-batch (mean over its K times and rows) + ``c_mse`` x velocity MSE
    (+ ``beta_img`` x latent KL of the sampler's step from ``(x_t, t)``) vs the reference at the same
    states. ``adv`` [B]: the shared group advantage (the text GRPO loss reads the same), mapped to the
    optimality probability r. The velocity is unguided: NFT trains CFG-free whatever
    ``sampler.cfg_scale`` drew the rollout. Returns ``(loss, stats)`` as ``train.image_loss``."""
    algo, sampler = cfg.algo, cfg.sampler
    r = optimality(adv, algo.nft_adv_clip)  # [B]
    k = draws.t.shape[1]
    stochastic = sampler.kind != "ode" and sampler.noise_level > 0  # a step with a variance: a latent KL
    stats, loss, reg = StatsMean(), 0.0, {"mse": [], "kl": []}
    for j in range(k):
        x_t, t = draws.x_t[:, j].contiguous(), draws.t[:, j].contiguous()
        v = model.velocity(x_t, t, ctx).float()
        lj, st = nft_loss(v, draws.v_old[:, j], rnd.x0, x_t, t, r, algo.nft_beta, algo.nft_adv_clip)
        loss = loss + lj / k
        stats.add(st)
        if ref is not None:
            with torch.no_grad():  # the frozen reference is a target, never differentiated
                v_ref = ref.velocity(x_t, t, ctx_ref).float()
            reg["mse"].append(velocity_mse(v, v_ref, algo.mse_reduction))
            if stochastic:
                t_next = draws.t_next[:, j].contiguous()
                step = sde_step(x_t, v, t, t_next, sampler.noise_level, sampler.kind, prev_sample=x_t)
                mean_ref = sde_step(x_t, v_ref, t, t_next, sampler.noise_level, sampler.kind, prev_sample=x_t).mean
                noisy = step.std > 0  # [B]; cps's last step (t_next = 0) is deterministic: KL 0, not x / 0
                kl = latent_kl(step.mean, mean_ref, torch.where(noisy, step.std, torch.ones_like(step.std)), "none")
                reg["kl"].append(torch.where(noisy, kl, torch.zeros_like(kl)).mean())
    out = {f"loss/image/{name}": x for name, x in stats.result().items()}
    out["loss/image/pg_loss"] = loss.detach()
    if reg["mse"]:
        mse = sum(reg["mse"]) / k
        loss = loss + algo.c_mse * mse
        out["loss/image/mse"] = mse.detach()
    if reg["kl"]:
        kl = sum(reg["kl"]) / k
        loss = loss + algo.beta_img * kl
        out["loss/image/kl"] = kl.detach()
    out["loss/image/loss"] = loss.detach()
    return loss, {key: torch.as_tensor(x) for key, x in out.items()}
