"""`unigrpo train`: UniGRPO (arXiv 2603.23500) -- GRPO on reasoning tokens + FlowGRPO on denoising steps.

One loop, read top to bottom (STYLE.md): each optimisation step
(1) rolls out ``prompts_per_step x group_size`` trajectories (reasoning, then the image with the
SDE window), (2) scores the images, (3) computes group-relative advantages shared by every token
and window step of a trajectory, (4) runs PPO epochs over minibatches (each an equal share of
every group) with gradient accumulation, (5) logs, (6) evaluates and (7) checkpoints.

Choices and deviations (docs/training.md has the reasons and measurements):
- Rollout chunks ARE the first epoch's micro-batches (same rows, order and padded width), so the
  behaviour log-probs come from exactly the computation the first update repeats: ratio == 1
  bit-for-bit, logged as ``loss/*/first_logp_diff_max`` (must be 0).
- Every random draw is keyed by (seed, step, global index): 2 steps + resume + 2 steps == 4 steps,
  and the sampled trajectories do not depend on the number of ranks or the chunking.
- The image loss does not reach the text expert when ``algo.detach_context`` (default).
- Text and image experts are clipped separately (``optim.grad_clip`` each): a spike in one
  expert's gradient does not shrink the other's update. Separate AdamW learning rates.
- An update whose loss or gradient is non-finite is skipped on every rank (``perf/skipped_updates``).
- The reference policy (a frozen copy of the starting policy) exists only when a regulariser
  needs it (``c_mse``, ``beta_img`` or ``text_beta`` > 0).
- Groups with equal rewards are kept (advantage 0, no gradient), not dropped; their fraction is
  logged (``reward/zero_variance_frac``).
"""

from __future__ import annotations

import copy
import functools
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unigrpo import rollout as R
from unigrpo.algo.advantages import group_advantages, zero_variance_fraction
from unigrpo.algo.image_loss import flow_grpo_loss, latent_kl, velocity_mse
from unigrpo.algo.sde import sde_step
from unigrpo.algo.text_loss import text_grpo_loss
from unigrpo.config import Config, ConfigError, to_dict
from unigrpo.models import load_model
from unigrpo.recipes.evaluate import eval_tasks, evaluate_model
from unigrpo.rewards import RewardSet
from unigrpo.sampling import guided_velocity
from unigrpo.utils import checkpoint as ckpt
from unigrpo.utils import dist
from unigrpo.utils.images import save_grid
from unigrpo.utils.logging import RunLogger, StatsMean
from unigrpo.world import group_diversity, image_stats, make_tasks


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
    a = cfg.algo
    if a.train_text and not cfg.text.thinking:
        raise ConfigError("text.thinking: thinking off leaves no reasoning tokens to train; "
                          "set algo.train_text=false")
    n = a.prompts_per_step * a.group_size
    for name, v in (("algo.prompts_per_step", a.prompts_per_step),
                    ("algo.trajectories_per_minibatch", a.trajectories_per_minibatch),
                    ("algo.micro_batch_trajectories", a.micro_batch_trajectories)):
        if v % world:
            raise ValueError(f"{name}={v} must be divisible by the number of ranks ({world})")
    return Sizes(world, a.prompts_per_step // world, n, n // world, n // a.trajectories_per_minibatch,
                 a.trajectories_per_minibatch // world,
                 a.trajectories_per_minibatch // a.micro_batch_trajectories, a.micro_batch_trajectories // world)


def describe(cfg: Config, z: Sizes) -> str:
    a, s = cfg.algo, cfg.sampler
    return (f"unigrpo train: {z.world} rank(s) | per step {a.prompts_per_step} prompts x {a.group_size} = "
            f"{z.trajectories} trajectories ({z.trajectories_local} per rank) | {a.ppo_epochs} PPO epochs x "
            f"{z.minibatches} minibatches of {a.trajectories_per_minibatch} ({z.minibatch_local} per rank) "
            f"= {a.ppo_epochs * z.minibatches} updates/step | {z.micro_per_minibatch} micro-batches of "
            f"{a.micro_batch_trajectories} per minibatch ({z.micro_local} per rank) | window {s.window_size} "
            f"of {s.num_steps} steps | train text={a.train_text} image={a.train_image}")


@functools.lru_cache(maxsize=2)
def _task_pool(seed: int, epoch: int, size: int):
    return make_tasks("train", size, seed=R.derive_seed(seed, epoch) % 2**31)


def step_tasks(cfg: Config, step: int) -> list:
    """The ``prompts_per_step`` training tasks of ``step``: a deterministic stream over pools of
    ``algo.prompt_pool`` tasks (data position = step * prompts_per_step)."""
    p, pool = cfg.algo.prompts_per_step, cfg.algo.prompt_pool
    return [_task_pool(cfg.seed, i // pool, pool)[i % pool] for i in range(step * p, (step + 1) * p)]


def seeds(cfg: Config, step: int, first: int, count: int, stream: int) -> list[int]:
    """Seeds of global indices ``first .. first + count - 1`` (prompts or trajectories) of ``step``."""
    return [R.derive_seed(cfg.seed, step, first + i, stream) for i in range(count)]


def sample_chunk(model, tokens, noise_seeds: list[int], starts: torch.Tensor, cfg: Config,
                 init_seeds: list[int] | None = None) -> R.Rollout:
    s = cfg.sampler
    return R.sample_images(model, tokens, noise_seeds, starts, num_steps=s.num_steps, shift=s.shift, kind=s.kind,
                           noise_level=s.noise_level, window_size=s.window_size, cfg_scale=s.cfg_scale,
                           temperature=cfg.text.temperature, reduction=cfg.algo.logprob_reduction,
                           init_seeds=init_seeds)


def ppo_order(cfg: Config, step: int, epoch: int, p0: int, n_prompts: int, minibatch: int) -> torch.Tensor:
    """Order of this rank's ``n_prompts * G`` trajectories in PPO epoch ``epoch``; consecutive
    blocks of ``minibatch`` are the minibatches.

    Each group's trajectories are permuted (generator keyed by the global prompt index ``p0 + i``)
    and every minibatch takes an equal share of EVERY group, prompt-major. When
    ``trajectories_per_minibatch`` is a multiple of ``prompts_per_step`` this makes each global
    minibatch the same set of trajectories whatever the number of ranks (rank r holds a contiguous
    block of it); otherwise minibatches take slots of successive groups in turn."""
    g = cfg.algo.group_size
    perms = torch.stack([torch.randperm(g, generator=torch.Generator().manual_seed(
        R.derive_seed(cfg.seed, step, epoch, p0 + i, R.SHUFFLE))) for i in range(n_prompts)])
    idx = perms + g * torch.arange(n_prompts)[:, None]  # [P_local, G] row = prompt
    m = n_prompts * g // minibatch  # minibatches per epoch
    if g % m == 0:  # [M, P_local, G / M]: minibatch-major, then prompt-major
        return idx.reshape(n_prompts, m, g // m).transpose(0, 1).flatten()
    return idx.t().flatten()  # slot-major


def needs_reference(cfg: Config) -> bool:
    a = cfg.algo
    return (a.train_image and (a.c_mse > 0 or a.beta_img > 0)) or (a.train_text and a.text_beta > 0)


def build_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """Freeze everything, unfreeze the trained experts; one AdamW group (own lr) per expert."""
    model.requires_grad_(False)
    image = model.image_parameters()
    if cfg.optim.image_params is not None:  # e.g. attention only, as Flow-GRPO's LoRA on attention
        names = {id(p): n for n, p in model.named_parameters()}
        image = [p for p in image if re.search(cfg.optim.image_params, names[id(p)])]
        if cfg.algo.train_image and not image:
            raise ConfigError(f"optim.image_params: {cfg.optim.image_params!r} matches no image-expert parameter "
                              f"(names look like {next(iter(n for n, _ in model.named_parameters() if 'image' in n), '?')})")
    groups = []
    for train, params, lr in ((cfg.algo.train_text, model.text_parameters(), cfg.optim.lr_text),
                              (cfg.algo.train_image, image, cfg.optim.lr_image)):
        if train:
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": params, "lr": lr})
    return torch.optim.AdamW(groups, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)


def image_loss(model, ref, mb: R.Rollout, ctx, ctx_ref, adv: torch.Tensor, cfg: Config):
    """FlowGRPO surrogate + c_mse * velocity MSE (+ beta_img * latent KL) over the window steps."""
    a, s = cfg.algo, cfg.sampler
    b, w = mb.x_t.shape[:2]
    null = model.null_context(b) if s.cfg_scale != 1.0 else None  # CFG: rollout AND training guided
    null_ref = ref.null_context(b) if ref is not None and s.cfg_scale != 1.0 else None
    logp, mean, std, v, v_ref, mean_ref = [], [], [], [], [], []  # one entry per window step
    for j in range(w):
        # contiguous: the same memory layout as in the rollout, hence the same kernels and numerics
        x_t, x_next = mb.x_t[:, j].contiguous(), mb.x_next[:, j].contiguous()
        t, t_next = mb.t[:, j].contiguous(), mb.t_next[:, j].contiguous()
        vj = guided_velocity(model, x_t, t, ctx, null, s.cfg_scale).float()  # float32 SDE math
        step = sde_step(x_t, vj, t, t_next, s.noise_level, s.kind, prev_sample=x_next,
                        reduction=a.logprob_reduction)
        logp.append(step.log_prob)
        mean.append(step.mean)
        std.append(step.std)
        v.append(vj)
        if ref is not None:
            with torch.no_grad():  # the frozen reference is a target, never differentiated
                vr = guided_velocity(ref, x_t, t, ctx_ref, null_ref, s.cfg_scale).float()
                mean_ref.append(sde_step(x_t, vr, t, t_next, s.noise_level, s.kind, prev_sample=x_next).mean)
                v_ref.append(vr)
    lp = torch.stack(logp, 1)  # [B, W]
    loss, st = flow_grpo_loss(lp, mb.logp_img_old, adv, a.image_eps, a.ratio_norm, torch.stack(std, 1),
                              torch.stack(mean, 1), mb.mean_old)
    stats = {f"loss/image/{k}": x for k, x in st.items()}
    stats["loss/image/pg_loss"] = loss.detach()
    stats["loss/image/logp_diff_max"] = (lp - mb.logp_img_old).abs().max().detach()
    if ref is not None:  # cat over steps: [W * B, *latent]; MSE/KL reductions are per step element
        mse = velocity_mse(torch.cat(v), torch.cat(v_ref), a.mse_reduction)
        kl = latent_kl(torch.cat(mean), torch.cat(mean_ref), torch.cat(std))
        loss = loss + a.c_mse * mse + a.beta_img * kl
        stats.update({"loss/image/mse": mse.detach(), "loss/image/kl": kl.detach()})
    stats["loss/image/loss"] = loss.detach()
    return loss, stats


def micro_batch_loss(model, ref, mb: R.Rollout, adv: torch.Tensor, cfg: Config, w_text: float, w_image: float):
    """Loss of one micro-batch, pre-scaled for accumulation (``w_*``: its share of the minibatch).

    L = w_text * L_text + lambda_image * w_image * (L_flow + c_mse * L_mse + beta_img * L_kl)."""
    a = cfg.algo
    with torch.set_grad_enabled(a.train_text):  # frozen text expert: its pass needs no graph
        logp, ctx = model.forward_context(mb.tokens, cfg.text.temperature)
    logp_ref = ctx_ref = None
    if ref is not None:
        with torch.no_grad():
            logp_ref, ctx_ref = ref.forward_context(mb.tokens, cfg.text.temperature)
    loss, stats = logp.new_zeros(()), {}
    if a.train_text:
        mask = mb.tokens.response_mask
        lt, st = text_grpo_loss(logp, mb.logp_old, adv, mask, a.text_eps_low, a.text_eps_high,
                                a.text_aggregation, cfg.text.max_reasoning_tokens, logp_ref, a.text_beta)
        loss = loss + w_text * lt
        stats = {f"loss/text/{k}": x for k, x in st.items()}
        stats["loss/text/loss"] = lt.detach()
        stats["loss/text/logp_diff_max"] = ((logp - mb.logp_old).abs() * mask).max().detach()
    if a.train_image:
        ctx_img = model.detach_context(ctx) if a.detach_context else ctx  # cut image -> text gradient
        li, st = image_loss(model, ref, mb, ctx_img, ctx_ref, adv, cfg)
        loss = loss + a.lambda_image * w_image * li
        stats.update(st)
    return loss, stats


def optimizer_step(model, opt, cfg: Config, d: dist.Dist, loss_finite: bool) -> dict:
    """Average gradients over ranks, clip each expert, skip the update if anything is non-finite."""
    experts = {"text": [p for p in model.text_parameters() if p.requires_grad],
               "image": [p for p in model.image_parameters() if p.requires_grad]}
    dist.average_gradients([p for ps in experts.values() for p in ps], d)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # inf: norm only
    stats = {f"loss/{name}/grad_norm": float(torch.nn.utils.clip_grad_norm_(ps, clip))
             for name, ps in experts.items() if ps}
    finite = loss_finite and all(torch.isfinite(torch.tensor(n)) for n in stats.values())
    if dist.any_flag(not finite, d):  # every rank takes the same decision
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if d.is_main:
            per_module = {m: sum(b.split(".")[0] == m for b in bad) for m in dict.fromkeys(b.split(".")[0] for b in bad)}
            print(f"[unigrpo] skipped an update: loss finite={loss_finite}, non-finite gradients in "
                  f"{len(bad)} parameters {per_module}: {bad[:3]}{' ...' if len(bad) > 3 else ''}", flush=True)
        opt.zero_grad(set_to_none=True)
        return {**stats, "skipped": 1.0}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**stats, "skipped": 0.0}


def evaluate(model, cfg: Config, step: int, out: Path) -> dict:
    """Held-out evaluation (deterministic ODE, own step count and CFG) + grid + sampled reasoning."""
    start = time.perf_counter()
    tasks = eval_tasks(cfg)
    res, gen = evaluate_model(model, tasks, cfg, "think" if cfg.eval.thinking else "no_think")
    n = min(cfg.eval.grid_prompts, len(tasks))
    save_grid(gen.images[:n], out / "grids" / f"eval_step{step:06d}.png", nrow=min(n, 8), scale=4,
              labels=[str(i) for i in range(n)])
    (out / "grids" / f"eval_step{step:06d}.md").write_text("".join(
        f"{i}. `{tasks[i].prompt}` -> `{gen.reasoning[i]}`\n" for i in range(n)))
    keys = ("accuracy", "score", "accuracy_direct", "accuracy_reasoning", "score_direct",
            "score_reasoning", "count_ok", "shape_ok", "color_ok", "relation_ok", "n_extra",
            "reasoning_ok", "reasoning_ok_direct", "reasoning_ok_reasoning", "accuracy_given_reasoning_ok")
    m = {f"eval/{k}": res[k] for k in keys if k in res}  # reasoning_ok*: only with thinking on
    for cat, r in res["categories"].items():
        m.update({f"eval/category/{cat}/{k}": r[k] for k in ("accuracy", "score", "reasoning_ok") if k in r})
    m.update({f"eval/{k}": v for k, v in image_stats(gen.images).items()})
    m["perf/eval_s"] = time.perf_counter() - start
    return m


def _due(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


@dataclass
class StepBatch:
    """One step's rollout on this rank, scored, with its group-relative advantages."""

    roll: R.Rollout  # [N_local] trajectories, prompt-major
    adv: torch.Tensor  # [N_local] one advantage per trajectory (all its tokens and window steps)
    order0: torch.Tensor  # [N_local] PPO epoch 0's order; its micro-batch blocks were the rollout chunks
    reward: torch.Tensor  # [P, G] rewards of every rank (group statistics need whole groups)
    gathered: torch.Tensor  # [P * G, 1 + terms] reward and each reward term, every rank
    reward_local: torch.Tensor  # [N_local]
    n_prompts: int  # prompts on this rank
    rollout_s: float  # sampling time (reasoning + images)
    reward_wait_s: float  # time waiting for rewards after sampling finished
    reward_s: float  # reward compute time (also when it ran in a thread)


def rollout_step(model, cfg: Config, step: int, rewards: RewardSet, d: dist.Dist, z: Sizes) -> StepBatch:
    """Steps 1-3 of the loop: sample ``step``'s trajectories, score them, compute advantages."""
    a, s, device = cfg.algo, cfg.sampler, next(model.parameters()).device
    P, G = a.prompts_per_step, a.group_size
    p0 = dist.shard(P, d).start  # index (within the step) of this rank's first prompt
    n, t0_traj = z.trajectories_local, p0 * G
    # -------------------------------------------------------------- 1. rollout
    t_start = time.perf_counter()
    tasks = step_tasks(cfg, step)[dist.shard(P, d)]
    prompts = [t.prompt for t in tasks for _ in range(G)]  # [N_local], prompt-major
    meta = [t.to_metadata() for t in tasks for _ in range(G)]
    tokens = R.sample_reasoning(model, [t.prompt for t in tasks], G, seeds(cfg, step, p0, len(tasks), R.REASONING),
                                thinking=cfg.text.thinking, max_new_tokens=cfg.text.max_reasoning_tokens,
                                temperature=cfg.text.temperature, top_p=cfg.text.top_p)
    width = dist.all_reduce_max(tokens.ids.shape[1], d, device)  # one width on every rank
    tokens = R.pad_tokens(tokens, width, model.pad_id)
    starts = R.window_starts(seeds(cfg, step, p0, len(tasks), R.WINDOW),
                             seeds(cfg, step, t0_traj, n, R.TRAJ_WINDOW), G, s.num_steps, s.window_size,
                             s.window_range, a.share_window_in_group)  # [N_local]
    noise = seeds(cfg, step, t0_traj, n, R.NOISE)
    init = None  # initial noise from `noise` (one per trajectory) unless the group shares it
    if a.share_initial_noise_in_group:
        init = [x for x in seeds(cfg, step, p0, len(tasks), R.GROUP_INIT) for _ in range(G)]
    order0 = ppo_order(cfg, step, 0, p0, len(tasks), z.minibatch_local)  # chunks == epoch 0's micro-batches
    parts, futures = [], []
    for idx in order0.split(z.micro_local):
        i = idx.tolist()
        parts.append(sample_chunk(model, tokens.index(idx.to(device)), [noise[k] for k in i], starts[idx], cfg,
                                  None if init is None else [init[k] for k in i]))
        # this chunk's rewards run (in a thread if reward_workers > 0) while the next chunk samples
        futures.append(rewards.submit(parts[-1].images, [prompts[k] for k in i], [meta[k] for k in i]))
    unsort = torch.argsort(order0)
    roll = R.Rollout.cat(parts, model.pad_id).index(unsort)  # back to [P_local * G] prompt-major
    t_rollout = time.perf_counter()

    # -------------------------------------------------------------- 2. reward
    results = [f.result() for f in futures]
    reward_local = torch.cat([r[0] for r in results])[unsort]  # [N_local]
    terms_local = torch.stack([torch.cat([r[1][name] for r in results])[unsort] for name in rewards.names], 1)
    t_reward = time.perf_counter()

    # -------------------------------------------------------------- 3. advantages
    gathered = dist.all_gather_cat(torch.cat([reward_local[:, None], terms_local], 1).to(device), d).cpu()
    reward = gathered[:, 0].reshape(P, G)  # [P, G] every group complete, on every rank
    adv = group_advantages(reward, a.adv_scale, a.adv_eps, a.adv_clip)  # [P, G]
    adv = adv.flatten()[t0_traj:t0_traj + n].to(device)  # same A for all tokens and steps of a trajectory
    return StepBatch(roll, adv, order0, reward, gathered, reward_local, len(tasks), t_rollout - t_start,
                     t_reward - t_rollout, sum(r[2] for r in results))


def train(cfg: Config, resume: bool = False) -> dict:
    """Run UniGRPO for ``cfg.steps`` steps (continuing OUTPUT_DIR/checkpoint.pt when ``resume``).

    Returns {"model": the policy, "metrics": last step's metrics, "eval": last evaluation, "step"}."""
    # ------------------------------------------------------------------ 0. set-up
    d, device = dist.init(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    a, out = cfg.algo, Path(cfg.output_dir)
    z = derived_sizes(cfg, d.world)
    torch.manual_seed(cfg.seed)  # makes a random init (model.checkpoint: null) reproducible
    model = dist.wrap_model(load_model(cfg).to(device), d)  # eval mode: no dropout, ever
    ref = copy.deepcopy(model).requires_grad_(False) if needs_reference(cfg) else None
    state = ckpt.load_checkpoint(out, device) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        if ref is not None:  # the ORIGINAL starting policy, saved when the run began
            ref_state = ckpt.load_reference(out, device)
            if ref_state is None:
                raise FileNotFoundError(f"resume needs the reference policy {out / ckpt.REFERENCE}")
            ref.load_state_dict(ref_state)
    elif ref is not None and d.is_main:
        ckpt.save_reference(out, ref)
    opt = build_optimizer(model, cfg)
    start_step, skipped_total = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"])
        start_step, skipped_total = state["step"], state["extra"].get("skipped_total", 0)
        changed = sorted(k for k, v in to_dict(cfg).items() if k != "steps" and state["config"].get(k) != v)
        if changed and d.is_main:
            print(f"[unigrpo] resuming with changed config sections: {changed}", flush=True)
    rewards = RewardSet([(r.name, r.weight) for r in cfg.rewards], cfg.reward_workers)
    log = RunLogger(out, d.is_main, cfg.steps, start_step, append=resume)
    if d.is_main:
        print(describe(cfg, z), flush=True)
    G = a.group_size
    p0 = dist.shard(a.prompts_per_step, d).start  # index (within the step) of this rank's first prompt
    n = z.trajectories_local
    metrics, last_eval = {}, {}
    if cfg.eval.at_start and start_step == 0 and d.is_main:
        last_eval = evaluate(model, cfg, 0, out)
        log.log(0, last_eval)

    for step in range(start_step, cfg.steps):
        # -------------------------------------------------------------- 1-3. rollout, reward, advantages
        t_start = time.perf_counter()
        b = rollout_step(model, cfg, step, rewards, d, z)
        roll, adv, order0, reward, gathered = b.roll, b.adv, b.order0, b.reward, b.gathered
        t_reward = time.perf_counter()

        # -------------------------------------------------------------- 4. PPO epochs
        stats, first, updates, skipped = StatsMean(), StatsMean(), 0, 0
        for epoch in range(a.ppo_epochs):
            order = order0 if epoch == 0 else ppo_order(cfg, step, epoch, p0, b.n_prompts, z.minibatch_local)
            for mb_i, mb_idx in enumerate(order.split(z.minibatch_local)):
                micro = mb_idx.split(z.micro_local)
                tok_total = dist.all_reduce_sum(float(roll.tokens.response_mask[mb_idx].sum()), d, device)
                finite = True
                for idx in micro:
                    mb = roll.index(idx)
                    w_img = len(idx) / len(mb_idx)  # losses are means over trajectories
                    # token_mean: share of the minibatch's tokens over ALL ranks (x world: gradients
                    # are averaged over ranks); max(., 1): no tokens at all gives weight 0, not 0/0
                    w_text = (float(mb.tokens.response_mask.sum()) * d.world / max(tok_total, 1.0)
                              if a.text_aggregation == "token_mean" else w_img)
                    loss, st = micro_batch_loss(model, ref, mb, adv[idx.to(device)], cfg, w_text, w_img)
                    finite = finite and bool(torch.isfinite(loss))
                    loss.backward()
                    stats.add(st)
                    if epoch == 0 and mb_i == 0:  # health: the first update recomputes the behaviour: 0
                        first.add({k.replace("/logp_diff", "/first_logp_diff"): v for k, v in st.items()
                                   if k.endswith("/logp_diff_max")})
                upd = optimizer_step(model, opt, cfg, d, finite)
                skipped += int(upd.pop("skipped"))
                updates += 1
                stats.add(upd)
        skipped_total += skipped
        t_train = time.perf_counter()

        # -------------------------------------------------------------- 5. log
        lengths = roll.tokens.response_mask.sum(1).float()
        metrics = {
            **stats.result(), **first.result(),
            "rollout/reasoning_tokens": float(lengths.mean()), "rollout/reasoning_tokens_max": float(lengths.max()),
            "rollout/truncated_frac": float((lengths >= cfg.text.max_reasoning_tokens).float().mean()),
            **{f"rollout/{k}": x for k, x in image_stats(roll.images).items()},
            "rollout/group_diversity": group_diversity(roll.images.reshape(n // G, G, *roll.images.shape[1:])),
            "reward/mean": float(reward.mean()), "reward/std": float(reward.std(correction=0)),
            "reward/min": float(reward.min()), "reward/max": float(reward.max()),
            "reward/group_std": float(reward.std(dim=1, correction=0).mean()),
            "reward/zero_variance_frac": zero_variance_fraction(reward),
            **{f"reward/{name}": float(gathered[:, 1 + i].mean()) for i, name in enumerate(rewards.names)},
            "perf/rollout_s": b.rollout_s, "perf/reward_s": b.reward_s,
            "perf/reward_wait_s": b.reward_wait_s, "perf/train_s": t_train - t_reward,
            "perf/step_s": t_train - t_start,
            "perf/rollout_traj_per_s": z.trajectories / b.rollout_s,
            "perf/train_traj_per_s": z.trajectories * a.ppo_epochs / (t_train - t_reward),
            "perf/updates": float(updates), "perf/skipped_updates": float(skipped),
        }
        metrics = dist.reduce_metrics(metrics, d, device)
        metrics["perf/skipped_total"] = float(skipped_total)
        if _due(cfg.log_every, step + 1, cfg.steps):
            log.log(step + 1, metrics)
        if d.is_main and _due(cfg.eval_every, step + 1, cfg.steps):
            # -------------------------------------------------------------- 6. evaluate
            last_eval = evaluate(model, cfg, step + 1, out)
            log.log(step + 1, last_eval)
            g = min(4, n // G)
            save_grid(roll.images[:g * G], out / "grids" / f"rollout_step{step + 1:06d}.png", nrow=G, scale=4,
                      labels=[f"p{p0 + i // G} {float(b.reward_local[i]):.2f}" for i in range(g * G)])
        log.progress(metrics["reward/mean"], {"acc": last_eval.get("eval/accuracy", float("nan"))})
        if d.is_main and _due(cfg.save_every, step + 1, cfg.steps):
            # -------------------------------------------------------------- 7. checkpoint
            ckpt.save_checkpoint(out, model=model, optimizer=opt, step=step + 1, data_position=(step + 1) * a.prompts_per_step,
                                 config=to_dict(cfg), extra={"skipped_total": skipped_total})
            if hasattr(model, "save"):  # plain weights for `unigrpo eval/sample --checkpoint`
                model.save(out / "final.safetensors", extra={"rl_step": step + 1})

    rewards.close()
    log.close()
    dist.shutdown(d)
    return {"model": model, "metrics": metrics, "eval": last_eval, "step": cfg.steps}
