"""`unigrpo train`: UniGRPO (arXiv 2603.23500) -- GRPO on reasoning tokens + FlowGRPO on denoising steps.

One loop, read top to bottom: each optimisation step (1) rolls out ``prompts_per_step x group_size``
episodes (reasoning, then the image with the SDE window), (2) scores the final images, (3) computes
group-relative advantages shared by every token and window step of an episode, (4) runs PPO epochs
over minibatches (each an equal share of every group) with gradient accumulation, (5) logs,
(6) evaluates and (7) checkpoints. The loop knows no model and no prompt set: the model comes from
``build_model`` (``model.kind``), the prompts and the evaluation from the task (``task.kind``), the
scores from the rewards; docs/design.md shows where each plugs in.

Choices and deviations (docs/training.md has the reasons and measurements):
- Rollout chunks ARE the first epoch's micro-batches (same rows, order and padded width), so the
  behaviour log-probs come from exactly the computation the first update repeats: ratio == 1
  bit-for-bit, logged as ``loss/*/first_logp_diff_max`` (must be 0). Sampling and re-scoring live
  side by side in ``unigrpo.rollout``.
- Every random draw is keyed by (seed, step, global index): 2 steps + resume + 2 steps == 4 steps,
  and the sampled trajectories do not depend on the number of ranks or the chunking.
- The image loss does not reach the text expert when ``algo.detach_context`` (default).
- Text and image experts have their own AdamW learning rate and are clipped separately; an update
  whose loss or gradient is non-finite is skipped on every rank (``unigrpo.recipes.optim``).
- The reference policy (``model.reference()``: the model decides how) exists only when a
  regulariser needs it (``c_mse``, ``beta_img`` or ``text_beta`` > 0).
- Groups with equal rewards are kept (advantage 0, no gradient), not dropped; their fraction is
  logged (``reward/zero_variance_frac``).
- An episode is a list of rounds (``algo.rounds``, default one); the losses sum over its rounds. With
  more than one, every round's image is scored (``metadata["round"]``, ``["previous_image"]``) and
  ``algo.credit`` turns the rounds' rewards into one advantage per round (``algo.credit``).
- A reward term that stays unavailable with ``on_failure: skip`` (a remote service that is down)
  makes the step's rewards missing: that step's PPO update is skipped on every rank (the decision
  is shared with ``dist.any_flag``) and counted in ``reward/skipped_steps``; no step ever trains on
  a missing score (docs/rewards.md).
- Nothing is written before everything has loaded; the run directory is locked; a resume may change
  only some keys (docs/reliability.md: ``utils.rundir``, ``utils.resume``, verified checkpoints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unigrpo import rollout
from unigrpo.algo.advantages import group_advantages, zero_variance_fraction
from unigrpo.algo.credit import round_advantages
from unigrpo.algo.image_loss import flow_grpo_loss, latent_kl, velocity_mse
from unigrpo.algo.text_loss import text_grpo_loss
from unigrpo.config import Config, to_dict
from unigrpo.models import build_model
from unigrpo.recipes.batches import (
    Sizes,
    derived_sizes,
    describe,
    nft_draws,
    nft_image_loss,
    ppo_order,
    round_metrics,
    round_reward_metadata,
    round_seeds,
    seeds,
    tree_copies,
)
from unigrpo.recipes.optim import build_optimizer, optimizer_step
from unigrpo.rewards import RewardResult, RewardSet
from unigrpo.tasks import build_task, reward_metadata
from unigrpo.utils import checkpoint as ckpt
from unigrpo.utils import dist, rundir
from unigrpo.utils import resume as resume_policy
from unigrpo.utils.images import save_grid
from unigrpo.utils.logging import RunLogger, StatsMean


def needs_reference(cfg: Config) -> bool:
    algo = cfg.algo
    return (algo.train_image and (algo.c_mse > 0 or algo.beta_img > 0)) or (algo.train_text and algo.text_beta > 0)


def image_loss(model, ref, rnd: rollout.Round, ctx, ctx_ref, adv: torch.Tensor, cfg: Config):
    """FlowGRPO surrogate + c_mse * velocity MSE (+ beta_img * latent KL) over the window steps."""
    algo, sampler = cfg.algo, cfg.sampler
    sc = rollout.score_window(model, rnd, ctx, kind=sampler.kind, noise_level=sampler.noise_level,
                        cfg_scale=sampler.cfg_scale, reduction=algo.logprob_reduction, ref=ref, ctx_ref=ctx_ref)
    logp = torch.stack(sc.logp, 1)  # [B, W]
    loss, st = flow_grpo_loss(logp, rnd.logp_img_old, adv, algo.image_eps, algo.ratio_norm, torch.stack(sc.std, 1),
                              torch.stack(sc.mean, 1), rnd.mean_old)
    stats = {f"loss/image/{k}": x for k, x in st.items()}
    stats["loss/image/pg_loss"] = loss.detach()
    stats["loss/image/logp_diff_max"] = (logp - rnd.logp_img_old).abs().max().detach()
    if ref is not None:  # cat over steps: [W * B, *latent]; MSE/KL reductions are per step element
        mse = velocity_mse(torch.cat(sc.v), torch.cat(sc.v_ref), algo.mse_reduction)
        kl = latent_kl(torch.cat(sc.mean), torch.cat(sc.mean_ref), torch.cat(sc.std))
        loss = loss + algo.c_mse * mse + algo.beta_img * kl
        stats.update({"loss/image/mse": mse.detach(), "loss/image/kl": kl.detach()})
    stats["loss/image/loss"] = loss.detach()
    return loss, stats


def round_loss(model, ref, rnd: rollout.Round, adv: torch.Tensor, cfg: Config, w_text: float, w_image: float,
               nft=None):
    """L = w_text * L_text + lambda_image * w_image * (L_flow + c_mse * L_mse + beta_img * L_kl); with
    ``nft`` (the round's ``batches.NFTDraws``) the DiffusionNFT loss replaces L_flow."""
    algo = cfg.algo
    with torch.set_grad_enabled(algo.train_text):  # frozen text expert: its pass needs no graph
        logp, ctx = model.forward_context(rnd.tokens, cfg.text.temperature)
    logp_ref = ctx_ref = None
    if ref is not None:
        with torch.no_grad():
            logp_ref, ctx_ref = ref.forward_context(rnd.tokens, cfg.text.temperature)
    loss, stats = logp.new_zeros(()), {}
    if algo.train_text:
        mask = rnd.tokens.response_mask
        lt, st = text_grpo_loss(logp, rnd.logp_old, adv, mask, algo.text_eps_low, algo.text_eps_high,
                                algo.text_aggregation, cfg.text.max_reasoning_tokens, logp_ref, algo.text_beta)
        loss = loss + w_text * lt
        stats = {f"loss/text/{k}": x for k, x in st.items()}
        stats["loss/text/loss"] = lt.detach()
        stats["loss/text/logp_diff_max"] = ((logp - rnd.logp_old).abs() * mask).max().detach()
    if algo.train_image and not bool(rnd.drew.all()):  # multi-round: rows that had stopped drew nothing
        rows = rnd.drew.nonzero()[:, 0]
        if len(rows):  # their share of the mean over trajectories, on the context the rollout drew them from
            li, st = drawn_image_loss(model, ref, rnd.index(rows), adv[rows.to(adv.device)], cfg,
                                      None if nft is None else nft.index(rows))
            loss = loss + algo.lambda_image * w_image * len(rows) / len(rnd) * li
            stats.update(st)
    elif algo.train_image:
        ctx_img = model.detach_context(ctx) if algo.detach_context else ctx  # cut image -> text gradient
        li, st = (image_loss(model, ref, rnd, ctx_img, ctx_ref, adv, cfg) if nft is None
                  else nft_image_loss(model, ref, rnd, nft, ctx_img, ctx_ref, adv, cfg))
        loss = loss + algo.lambda_image * w_image * li
        stats.update(st)
    return loss, stats


def drawn_image_loss(model, ref, part: rollout.Round, adv: torch.Tensor, cfg: Config, nft=None):
    """The image loss of the rows of a round that drew: their image context from a pass over them
    alone, as ``rollout.sample_images`` computed it (same rows, same order: the first ratio is 1);
    with ``nft`` (those rows' ``NFTDraws``, whose old velocity ``batches.nft_draws`` computed on the
    same context) the DiffusionNFT loss."""
    with torch.set_grad_enabled(not cfg.algo.detach_context):  # detached: the image loss never reaches the text
        _, ctx = model.forward_context(part.tokens, cfg.text.temperature)
    ctx_ref = None
    if ref is not None:
        with torch.no_grad():
            _, ctx_ref = ref.forward_context(part.tokens, cfg.text.temperature)
    ctx = model.detach_context(ctx) if cfg.algo.detach_context else ctx
    if nft is not None:
        return nft_image_loss(model, ref, part, nft, ctx, ctx_ref, adv, cfg)
    return image_loss(model, ref, part, ctx, ctx_ref, adv, cfg)


def micro_batch_loss(model, ref, mb: rollout.Episode, adv: torch.Tensor, cfg: Config, w_text: float, w_image: float,
                     nft=None):
    """Loss of one micro-batch of episodes, pre-scaled for accumulation (``w_*``: its share of the
    minibatch): the sum of its rounds' losses (statistics: the rounds' mean / min / max). ``adv``: [B],
    or [B, R] one advantage per round (multi-round credit). ``nft``: one ``batches.NFTDraws`` per
    round (``algo.image_objective: nft``)."""
    draws = nft or [None] * len(mb.rounds)
    advs = [adv] * len(mb.rounds) if adv.dim() == 1 else adv.unbind(1)  # [B] shared, or [B, R]: one per round
    losses, stats = zip(*(round_loss(model, ref, rnd, a, cfg, w_text, w_image, d)
                          for rnd, a, d in zip(mb.rounds, advs, draws)))
    if len(losses) == 1:
        return losses[0], stats[0]
    merged = StatsMean()
    for st in stats:
        merged.add(st)
    return sum(losses), merged.result()


@dataclass
class StepBatch:
    """One step's episodes on this rank, scored, with their group-relative advantages."""

    roll: rollout.Episode  # [N_local] episodes, prompt-major
    adv: torch.Tensor  # [N_local] one advantage per episode (all its tokens and window steps); [N_local, R]: per round
    order0: torch.Tensor  # [N_local] PPO epoch 0's order; its micro-batch blocks were the rollout chunks
    reward: torch.Tensor  # [P, G] rewards of every rank (group statistics need whole groups)
    reward_terms: torch.Tensor  # [P * G, 1 + terms] reward and each reward term, every rank
    reward_local: torch.Tensor  # [N_local]
    p0: int  # index (within the step) of this rank's first prompt
    n_prompts: int  # prompts on this rank
    rollout_s: float  # sampling time (reasoning + images)
    reward_wait_s: float  # time waiting for rewards after sampling finished
    reward_s: float  # reward compute time (also when it ran in a thread)
    missing: bool  # some rank's rewards are missing (on_failure: skip): no update (same on every rank)
    reward_metrics: dict  # the reward terms' own counters (reward/remote_*), summed over chunks
    round_reward: torch.Tensor | None = None  # [N_local, R] each round's image's reward (multi-round only)


def rollout_step(model, task, cfg: Config, step: int, rewards: RewardSet, ranks: dist.Dist, sizes: Sizes) -> StepBatch:
    """Steps 1-3 of the loop: sample ``step``'s episodes, score them, compute advantages."""
    algo, sampler, device = cfg.algo, cfg.sampler, model.device
    n_prompts_all, group = algo.prompts_per_step, algo.group_size
    p0 = dist.shard(n_prompts_all, ranks).start
    n_local, first_traj = sizes.trajectories_local, p0 * group
    # -------------------------------------------------------------- 1. rollout
    t_start = time.perf_counter()
    prompts = task.train_prompts(step, n_prompts_all)[dist.shard(n_prompts_all, ranks)]
    group_seeds = seeds(cfg, step, p0, len(prompts), rollout.REASONING)
    starts = rollout.window_starts(seeds(cfg, step, p0, len(prompts), rollout.WINDOW),
                                   seeds(cfg, step, first_traj, n_local, rollout.TRAJ_WINDOW), group, sampler.num_steps,
                                   sampler.window_size, sampler.window_range, algo.share_window_in_group)  # [N_local]
    init = None  # initial noise from the trajectory's own seed unless the group shares it
    if algo.share_initial_noise_in_group:
        init = [x for x in seeds(cfg, step, p0, len(prompts), rollout.GROUP_INIT) for _ in range(group)]
    draws = rollout.EpisodeSeeds(group_seeds, seeds(cfg, step, first_traj, n_local, rollout.NOISE), starts, init,
                                 round_seeds(cfg, step, p0, len(prompts), first_traj, n_local))
    branches = algo.tree_branches if algo.credit == "tree" else 1
    draws = tree_copies(draws, branches) if branches > 1 else draws
    order0 = ppo_order(cfg, step, 0, p0, len(prompts), sizes.minibatch_local)  # chunks == epoch 0's micro-batches
    # point-wise terms per chunk, group-wise terms once on whole groups; multi-round: every round's image scored
    scorings = [rewards.step() for _ in range(algo.rounds)]

    def score(part: rollout.Episode, rows: list[int]) -> None:
        """This chunk's rewards run (in a thread if reward_workers > 0) while the next chunk samples."""
        for r, scoring in enumerate(scorings):
            upto = part if algo.rounds == 1 else rollout.Episode(part.rounds[:r + 1])
            meta = [{**reward_metadata(prompts[k // group].metadata, text, p0 + k // group, k % group),
                     **(round_reward_metadata(part, r, j) if algo.rounds > 1 else {})}
                    for j, (k, text) in enumerate(zip(rows, upto.reasoning))]
            scoring.submit(upto.images, [prompts[k // group].text for k in rows], meta)

    text = {"thinking": cfg.text.thinking, "max_new_tokens": cfg.text.max_reasoning_tokens,
            "temperature": cfg.text.temperature, "top_p": cfg.text.top_p, "batch_groups": cfg.text.batch_groups}
    draw = {"num_steps": sampler.num_steps, "shift": sampler.shift, "kind": sampler.kind,
            "noise_level": sampler.noise_level, "window_size": sampler.window_size, "cfg_scale": sampler.cfg_scale,
            "temperature": cfg.text.temperature, "reduction": algo.logprob_reduction,
            "detach_context": algo.detach_context}  # the context the update's image loss reads
    roll = rollout.sample_episode(model, prompts, group, draws, list(order0.split(sizes.micro_local)), ranks,
                                  text=text, sampler=draw, on_chunk=score, branches=branches)  # [P_local * G]
    t_rollout = time.perf_counter()

    # -------------------------------------------------------------- 2. reward
    results = [scoring.result() for scoring in scorings]  # every row, in chunk order
    result = results[-1]  # the final images'
    missing = dist.any_flag(any(bool(res.missing) for res in results), ranks, device)  # one decision on every rank
    unsort = torch.argsort(order0)  # chunk order -> prompt-major
    reward_local = result.total[unsort]  # [N_local]
    terms_local = torch.stack([result.per_term[name][unsort] for name in rewards.names], 1)
    t_reward = time.perf_counter()

    # -------------------------------------------------------------- 3. advantages
    reward_terms = dist.all_gather_cat(torch.cat([reward_local[:, None], terms_local], 1).to(device), ranks).cpu()
    reward = reward_terms[:, 0].reshape(n_prompts_all, group)  # [P, G] every group complete, on every rank
    round_reward = None
    if algo.rounds == 1:
        adv = group_advantages(reward, algo.adv_scale, algo.adv_eps, algo.adv_clip)  # [P, G]
        adv = adv.flatten()[first_traj:first_traj + n_local].to(device)  # same A for all tokens and steps
    else:  # algo.credit over every rank's per-round rewards and live masks: [N_local, R]
        round_reward = torch.stack([res.total[unsort] for res in results], 1)  # [N_local, R]
        live = torch.stack([rnd.live for rnd in roll.rounds], 1).float()
        both = dist.all_gather_cat(torch.cat([round_reward, live], 1).to(device), ranks).cpu()
        shape = (n_prompts_all, group, algo.rounds)
        adv = round_advantages(algo, both[:, :algo.rounds].reshape(shape), both[:, algo.rounds:].reshape(shape))
        adv = adv.reshape(-1, algo.rounds)[first_traj:first_traj + n_local].to(device)
    return StepBatch(roll, adv, order0, reward, reward_terms, reward_local, p0, len(prompts), t_rollout - t_start,
                     t_reward - t_rollout, sum(res.seconds for res in results), missing,
                     dict(result.metrics) if len(results) == 1 else RewardResult.merge_metrics(results), round_reward)


def ppo_epochs(model, ref, opt, batch: StepBatch, cfg: Config, step: int, ranks: dist.Dist, sizes: Sizes) -> dict:
    """Step 4: PPO epochs over minibatches of micro-batches; returns the averaged statistics."""
    algo, roll, device = cfg.algo, batch.roll, batch.adv.device
    stats, first, updates, skipped = StatsMean(), StatsMean(), 0, 0
    tokens = roll.reasoning_tokens()  # [N_local] reasoning tokens of each episode
    nft = (nft_draws(model, roll, cfg, step, batch.p0 * algo.group_size, list(batch.order0.split(sizes.micro_local)))
           if algo.train_image and algo.image_objective == "nft" else None)  # before the first update: old = behaviour
    for epoch in range(algo.ppo_epochs):
        order = batch.order0 if epoch == 0 else ppo_order(cfg, step, epoch, batch.p0, batch.n_prompts,
                                                          sizes.minibatch_local)
        for mb_i, mb_idx in enumerate(order.split(sizes.minibatch_local)):
            tok_total = dist.all_reduce_sum(float(tokens[mb_idx].sum()), ranks, device)
            finite = True
            for idx in mb_idx.split(sizes.micro_local):
                w_img = len(idx) / len(mb_idx)  # losses are means over trajectories
                # token_mean: share of the minibatch's tokens over ALL ranks (x world: gradients
                # are averaged over ranks); max(., 1): no tokens at all gives weight 0, not 0/0
                w_text = (float(tokens[idx].sum()) * ranks.world / max(tok_total, 1.0)
                          if algo.text_aggregation == "token_mean" else w_img)
                loss, st = micro_batch_loss(model, ref, roll.index(idx), batch.adv[idx.to(device)], cfg, w_text, w_img,
                                            None if nft is None else [d.index(idx) for d in nft])
                finite = finite and bool(torch.isfinite(loss))
                loss.backward()
                stats.add(st)
                if epoch == 0 and mb_i == 0:  # health: the first update recomputes the behaviour: 0
                    first.add({k.replace("/logp_diff", "/first_logp_diff").replace("/v_old_diff", "/first_v_old_diff"): v
                               for k, v in st.items() if k.endswith(("/logp_diff_max", "/v_old_diff_max"))})
            upd = optimizer_step(model, opt, cfg, ranks, finite)
            skipped += int(upd.pop("skipped"))
            updates += 1
            stats.add(upd)
    return {**stats.result(), **first.result(), "perf/updates": float(updates), "perf/skipped_updates": float(skipped)}


def step_metrics(batch: StepBatch, task, cfg: Config, rewards: RewardSet, sizes: Sizes) -> dict:
    """Step 5's rollout and reward statistics (docs/metrics.md)."""
    roll, reward, group = batch.roll, batch.reward, cfg.algo.group_size
    lengths = roll.reasoning_tokens().float()
    return {
        "rollout/reasoning_tokens": float(lengths.mean()), "rollout/reasoning_tokens_max": float(lengths.max()),
        "rollout/truncated_frac": float((lengths >= cfg.text.max_reasoning_tokens).float().mean()),
        **task.rollout_metrics(roll.images, group),
        **({} if batch.round_reward is None else round_metrics(roll, batch.round_reward)),
        "reward/mean": float(reward.mean()), "reward/std": float(reward.std(correction=0)),
        "reward/min": float(reward.min()), "reward/max": float(reward.max()),
        "reward/group_std": float(reward.std(dim=1, correction=0).mean()),
        "reward/zero_variance_frac": zero_variance_fraction(reward),
        **{f"reward/{name}": float(batch.reward_terms[:, 1 + i].mean()) for i, name in enumerate(rewards.names)},
        "perf/rollout_s": batch.rollout_s, "perf/reward_s": batch.reward_s, "perf/reward_wait_s": batch.reward_wait_s,
        "perf/rollout_traj_per_s": sizes.trajectories / batch.rollout_s,
    }


def _due(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Run UniGRPO for ``cfg.steps`` steps (continuing OUTPUT_DIR/checkpoint.pt when ``resume``;
    replacing a run already in OUTPUT_DIR when ``overwrite``; docs/reliability.md).

    Returns {"model": the policy, "metrics": last step's metrics, "eval": last evaluation, "step"}."""
    # ------------------------------------------------------------------ 0. set-up (nothing written yet)
    algo, out = cfg.algo, Path(cfg.output_dir)
    rundir.check_output_dir(out, resume, overwrite)  # read-only: refuse early, before loading anything
    ranks, device = dist.init(cfg.device, cfg.dist_timeout_s)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sizes = derived_sizes(cfg, ranks.world)
    task, rewards = build_task(cfg), RewardSet(cfg.rewards, cfg.reward_workers)
    torch.manual_seed(cfg.seed)  # makes a random init (model.checkpoint: null) reproducible
    model = build_model(cfg, device)  # eval mode: no dropout, ever
    task.check(model, cfg)  # every prompt readable and fitting the context, before the first write
    model.wrap(ranks)
    ref = model.reference() if needs_reference(cfg) else None  # the starting policy, frozen
    opt = build_optimizer(model, cfg)
    start_step, extra = 0, {"skipped_total": 0, "reward_skipped_steps": 0, "resumes": []}
    if resume:  # reads only; refuses keys a resume may not change, applies the optimizer's new ones
        start_step, extra = resume_policy.resume_run(out, model, ref, opt, cfg, device, ranks.is_main)
    # ------------------------------------------------------------------ the first write: lock the directory
    # (Ctrl-C inside: one line naming the step and the intact checkpoint; the lock is always released)
    with rundir.open_run(out, ranks, resume, overwrite, start_step) as run:
        if not resume and ref is not None and ranks.is_main:
            ckpt.save_reference(out, ref)
        log = RunLogger(out, ranks.is_main, cfg.steps, start_step, append=resume, trackers=cfg.logging,
                        config=to_dict(cfg))
        if ranks.is_main:
            print(describe(cfg, sizes), flush=True)
        metrics, last_eval = {}, {}
        # a sharded model's forwards are collectives: every rank evaluates (rank 0 writes and logs)
        evaluates, eval_out = ranks.is_main or model.sharded, out if ranks.is_main else None
        if cfg.eval.at_start and start_step == 0 and evaluates:
            last_eval = task.evaluate(model, cfg, rewards, 0, eval_out)
            log.log(0, last_eval)
            log.log_image(0, "grids/eval", out / "grids" / "eval_step000000.png")

        for step in range(start_step, cfg.steps):
            # ---------------------------------------------------------- 1-3. rollout, reward, advantages
            t_start = time.perf_counter()
            batch = rollout_step(model, task, cfg, step, rewards, ranks, sizes)
            t_reward = time.perf_counter()
            # ---------------------------------------------------------- 4. PPO epochs
            if batch.missing:  # rewards missing (on_failure: skip) on some rank: no update on any rank
                train_stats, extra["reward_skipped_steps"] = {}, extra["reward_skipped_steps"] + 1
            else:
                train_stats = ppo_epochs(model, ref, opt, batch, cfg, step, ranks, sizes)
                extra["skipped_total"] += int(train_stats["perf/skipped_updates"])
            t_train = time.perf_counter()
            # ---------------------------------------------------------- 5. log
            metrics = {**train_stats, **({} if batch.missing else step_metrics(batch, task, cfg, rewards, sizes)),
                       **batch.reward_metrics, "reward/skipped_steps": float(extra["reward_skipped_steps"]),
                       "perf/train_s": t_train - t_reward, "perf/step_s": t_train - t_start,
                       "perf/train_traj_per_s": sizes.trajectories * algo.ppo_epochs / (t_train - t_reward)}
            metrics = dist.reduce_metrics(metrics, ranks, device)
            metrics["perf/skipped_total"] = float(extra["skipped_total"])
            if _due(cfg.log_every, step + 1, cfg.steps):
                log.log(step + 1, metrics)
            if evaluates and _due(cfg.eval_every, step + 1, cfg.steps):
                # ------------------------------------------------------ 6. evaluate
                last_eval = task.evaluate(model, cfg, rewards, step + 1, eval_out)
                log.log(step + 1, last_eval)
                log.log_image(step + 1, "grids/eval", out / "grids" / f"eval_step{step + 1:06d}.png")
                if ranks.is_main:
                    shown = min(4, batch.n_prompts) * algo.group_size
                    labels = [f"p{batch.p0 + i // algo.group_size} {float(batch.reward_local[i]):.2f}"
                              for i in range(shown)]
                    save_grid(batch.roll.images[:shown], out / "grids" / f"rollout_step{step + 1:06d}.png",
                              nrow=algo.group_size, scale=4, labels=labels)
                    log.log_image(step + 1, "grids/rollout", out / "grids" / f"rollout_step{step + 1:06d}.png")
            log.progress(metrics.get("reward/mean", float("nan")), {"acc": last_eval.get("eval/accuracy", float("nan"))})
            run.step = step + 1
            if _due(cfg.save_every, step + 1, cfg.steps):
                # ------------------------------------------------------ 7. checkpoint (every rank) + final weights
                ckpt.save_checkpoint(out, model=model, optimizer=opt, step=step + 1, is_main=ranks.is_main,
                                     data_position=(step + 1) * algo.prompts_per_step, config=to_dict(cfg),
                                     extra=extra, write_final=lambda p, s=step + 1: model.save(p, extra={"rl_step": s}))
                run.saved_step = step + 1
        log.close()
    rewards.close()
    dist.shutdown(ranks)
    return {"model": model, "metrics": metrics, "eval": last_eval, "step": cfg.steps}
