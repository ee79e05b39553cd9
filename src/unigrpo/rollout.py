"""Rollout of the UniGRPO MDP: prompt -> reasoning tokens -> denoising steps, and its scoring twin.

Batch layout: ``[P, G]`` (prompts x group) flattened prompt-major, ``N = P * G`` trajectories.
An **episode** is a list of **rounds**; a round is one reasoning segment followed by one image
(with its SDE window). UniGRPO has one round per episode; with ``algo.rounds`` > 1 (think -> draw
-> look -> reflect -> redraw) ``sample_episode`` appends rounds: round r + 1 reads round r's
context, the image it drew and the model's reflection turn (``reflection_tokens``), then draws
again, or stops on the model's stop word (``Round.live`` / ``Round.drew`` mask what follows); the
losses sum over rounds (docs/training.md, "Multi-round episodes").

``sample_episode`` is the whole rollout of one step on one rank: the reasoning of every group, the
cross-rank width, then the chunks (each: its rounds), handing each finished chunk to a callback
(the training loop starts its rewards there while the next chunk samples).

1. ``sample_reasoning``: each prompt's group is sampled with a generator seeded by the prompt's
   *global* index, so the reasoning does not depend on how the batch is chunked or sharded over
   ranks: one decode loop per group, or (``text.batch_groups``) every group in one loop, each
   drawing from its own generator. The tokens are then right-padded to one width on every rank.
2. ``sample_images`` (one round of one chunk of rows): ONE no-grad ``forward_context`` pass gives
   the image context and the behaviour log-probs of the reasoning tokens. The sampling-time
   log-probs of the decode loop are not used: training calls the same function on the same rows
   (same chunk, same padded width), so the first PPO ratio is exactly 1. Then ``num_steps``
   denoising steps: the ``window_size`` consecutive steps starting at the row's window start are
   stochastic (``sde_step``, recorded), all others are deterministic Euler ODE steps (not stored).
   CFG when ``cfg_scale > 1`` (the unconditional branch reads ``null_context``).
3. ``score_window``: the training-time twin of step 2's window. It re-scores the recorded window
   steps with ``sde_step`` in scoring mode (the same call the rollout's log-probs came from), and
   the frozen reference's velocity at the same states. Sampling and scoring live side by side in
   this file so that the "ratio == 1 on the first update" guarantee has one home.

Randomness is keyed by global indices (``derive_seed``): the initial noise and the window noise of
trajectory ``i`` come from its own generator (or the initial noise from its group's, with
``share_initial_noise_in_group``: group members then differ only from the window on), the window
start from the group's (shared window) or the trajectory's own generator. Results are therefore
identical whatever the chunking or the number of ranks, and resuming a run needs no RNG state.
With ``share_window=False`` each trajectory draws its own window; rows of one chunk then sit at
different steps, which the loop handles row-wise (one model call per step either way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from unigrpo.algo.sde import gaussian_log_prob, sde_step, sde_window
from unigrpo.models.protocol import TokenBatch
from unigrpo.utils import dist

__all__ = ["Episode", "EpisodeSeeds", "Round", "RoundSeeds", "WindowScores", "derive_seed", "guided_velocity",
           "reflection_tokens", "sample_episode", "sample_images", "sample_reasoning", "score_window", "window_starts"]

# Streams of independent randomness (the last key of derive_seed).
REASONING, WINDOW, NOISE, SHUFFLE, TRAJ_WINDOW, GROUP_INIT = 0, 1, 2, 3, 4, 5


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (e.g. seed, step, index, stream)."""
    a, b = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(a) << 31) ^ int(b)


@dataclass
class Round:
    """One round of trajectories laid out [N, ...]: a reasoning segment and the image it led to
    (only what training needs; W = window size)."""

    tokens: TokenBatch  # [N, L] context + this round's reasoning, the padded width of every scoring pass
    logp_old: torch.Tensor  # [N, L] behaviour log-probs of the reasoning tokens (0 elsewhere)
    x_t: torch.Tensor  # [N, W, *latent] states before each window step
    x_next: torch.Tensor  # [N, W, *latent] sampled states after each window step
    t: torch.Tensor  # [N, W] flow time of each window step
    t_next: torch.Tensor  # [N, W]
    logp_img_old: torch.Tensor  # [N, W] behaviour log-probs of the window steps
    mean_old: torch.Tensor  # [N, W, *latent] behaviour step means (RatioNorm)
    x0: torch.Tensor  # [N, *latent] the clean final latent the image was decoded from (DiffusionNFT)
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], on the CPU (rewards, logging); a row that did not draw: its last image
    reasoning: list[str]  # [N] decoded response texts
    live: torch.Tensor  # [N] bool, CPU: the row acted this round (its tokens are actions; False: its episode had stopped)
    drew: torch.Tensor  # [N] bool, CPU: the row drew this round's image (False: stopped; its window is zeros, no loss)

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, idx: torch.Tensor) -> Round:
        """Rows ``idx`` (a 1-D long tensor), every field alike."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, TokenBatch):
                out[f.name] = v.index(idx)
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
            else:
                out[f.name] = v[idx.to(v.device)]
        return Round(**out)

    @staticmethod
    def cat(parts: list[Round], pad_id: int) -> Round:
        out = {}
        for f in fields(Round):
            vs = [getattr(p, f.name) for p in parts]
            if isinstance(vs[0], TokenBatch):
                out[f.name] = TokenBatch.cat(vs, pad_id)
            elif isinstance(vs[0], list):
                out[f.name] = [x for v in vs for x in v]
            else:
                out[f.name] = torch.cat(vs)
        return Round(**out)


@dataclass
class Episode:
    """Trajectories [N] as a list of rounds (every row has the same number of rounds; a row that
    stopped early is masked in its later rounds: ``Round.live`` / ``Round.drew``); the last round's
    images are the final ones (module docstring)."""

    rounds: list[Round]

    def __len__(self) -> int:
        return len(self.rounds[0])

    @property
    def images(self) -> torch.Tensor:
        """[N, 3, H, W] the final images (what the reward sees)."""
        return self.rounds[-1].images

    @property
    def reasoning(self) -> list[str]:
        """[N] the reasoning of every round, joined (what ``metadata["reasoning"]`` holds)."""
        return [" ".join(t for t in texts if t) for texts in zip(*(r.reasoning for r in self.rounds))]

    def reasoning_tokens(self) -> torch.Tensor:
        """[N] generated reasoning tokens per trajectory, all rounds."""
        return sum(r.tokens.response_mask.sum(1) for r in self.rounds)

    def index(self, idx: torch.Tensor) -> Episode:
        return Episode([r.index(idx) for r in self.rounds])

    @staticmethod
    def cat(parts: list[Episode], pad_id: int) -> Episode:
        return Episode([Round.cat(list(rs), pad_id) for rs in zip(*(p.rounds for p in parts))])


def guided_velocity(model, x_t: torch.Tensor, t: torch.Tensor, ctx, null_ctx, cfg_scale: float) -> torch.Tensor:
    """``model.velocity`` at (x_t [B, *latent], t [B]) guided with scale ``cfg_scale`` by the model's
    own rule (``combine_guidance``); a single call when ``cfg_scale == 1`` or there is no
    ``null_ctx``. ``model`` is a policy or its reference: rollout, training and evaluation alike."""
    if cfg_scale == 1.0 or null_ctx is None:
        return model.velocity(x_t, t, ctx)
    return model.combine_guidance(model.velocity(x_t, t, ctx), model.velocity(x_t, t, null_ctx), cfg_scale)


@torch.no_grad()
def sample_reasoning(model, prompts: list, group_size: int, seeds: list[int], *, thinking: bool,
                     max_new_tokens: int, temperature: float, top_p: float,
                     batch_groups: bool = True, ranks=None) -> TokenBatch:
    """Prompts [P] (``tasks.Prompt`` or str) -> inputs + sampled reasoning [P * G, L]; group p uses
    generator ``seeds[p]``. ``batch_groups`` (``text.batch_groups``, default): all groups in one
    decode loop, each drawing from its own generator (one generator per row), the prompts
    left-padded to the widest prompt of every rank (``ranks``), so a row's layout does not depend on
    how the prompts are sharded; equal to the per-group loops up to float rounding
    (docs/reliability.md, "Determinism")."""
    if batch_groups and thinking:
        batch = model.encode([p for p in prompts for _ in range(group_size)])
        if ranks is not None:  # the widest prompt of every rank: a row's layout does not depend on the sharding
            batch = batch.left_padded_to(dist.all_reduce_max(batch.ids.shape[1], ranks, model.device), model.pad_id)
        gens = [torch.Generator(device=batch.ids.device).manual_seed(s) for s in seeds]
        return model.sample_reasoning(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      generator=[g for g in gens for _ in range(group_size)])
    parts = []
    for prompt, seed in zip(prompts, seeds):
        batch = model.encode([prompt] * group_size)
        if thinking:
            gen = torch.Generator(device=batch.ids.device).manual_seed(seed)
            batch = model.sample_reasoning(batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_p=top_p, generator=gen)
        parts.append(batch)
    return TokenBatch.cat(parts, model.pad_id)


def window_starts(group_seeds: list[int], traj_seeds: list[int], group_size: int, num_steps: int,
                  window_size: int, window_range, share: bool) -> torch.Tensor:
    """First window step of every trajectory [P * G]: one draw per group when ``share``, else one
    draw per trajectory (``sde_window``: uniform over {lo, ..., hi - window_size})."""
    def draw(seed: int) -> int:
        return sde_window(num_steps, window_size, window_range, torch.Generator().manual_seed(seed))[0]

    if share:
        return torch.tensor([draw(s) for s in group_seeds]).repeat_interleave(group_size)
    return torch.tensor([draw(s) for s in traj_seeds])


@torch.no_grad()
def sample_images(model, tokens: TokenBatch, noise_seeds: list[int], window_start: torch.Tensor, *,
                  num_steps: int, shift: float, kind: str, noise_level: float, window_size: int,
                  cfg_scale: float, temperature: float, reduction: str, detach_context: bool = True,
                  init_seeds: list[int] | None = None, draw: torch.Tensor | None = None,
                  kept: Round | None = None) -> Round:
    """One round of one chunk of B rows: behaviour text log-probs + image with the SDE window (module docstring).

    ``init_seeds`` [B]: when given, the initial noise comes from these (e.g. one seed per group:
    the group shares its starting noise) and only the window noise from ``noise_seeds``.
    ``detach_context`` (``algo.detach_context``): the velocity reads ``model.detach_context(ctx)``,
    as training does -- no gradient here either way, but a model may compute a detached context's
    velocity by another path (Bagel: detached und weights), and the first ratio must be exactly 1.
    ``draw`` [B] bool (multi-round; None: every row): only these rows draw. The others keep the
    image of ``kept`` (their previous round) with an all-zero window and ``drew`` False: no fake
    sample. The drawing rows' image context then comes from a pass over those rows alone, which
    the training repeats (``train.round_loss``), so their first ratio is exactly 1 too."""
    b, dev = len(tokens), tokens.ids.device
    logp_old, ctx = model.forward_context(tokens, temperature)  # THE behaviour log-probs [B, L]
    drew = torch.ones(b, dtype=torch.bool) if draw is None else draw.cpu()
    rows = drew.nonzero()[:, 0]  # [D] the drawing rows
    if 0 < len(rows) < b:
        _, ctx = model.forward_context(tokens.index(rows.to(dev)), temperature)
    ctx = model.detach_context(ctx) if detach_context else ctx
    sub = [noise_seeds[i] for i in rows.tolist()]
    init = None if init_seeds is None else [init_seeds[i] for i in rows.tolist()]
    kw = {"num_steps": num_steps, "shift": shift, "kind": kind, "noise_level": noise_level, "cfg_scale": cfg_scale,
          "reduction": reduction}
    if len(rows) == b:
        rec, x = _denoise(model, ctx, sub, window_start, window_size, init, **kw)
        x0, images = x, model.decode(x).cpu()
    else:  # some rows had stopped: zeros in their window, their kept image as the round's
        rec = _empty_window(model, b, window_size, dev)
        x0, images = kept.x0.clone(), kept.images.clone()
        if len(rows):
            part, x = _denoise(model, ctx, sub, window_start[rows], window_size, init, **kw)
            for name, val in part.items():
                rec[name][rows.to(dev)] = val
            x0[rows.to(x0.device)], images[rows] = x.to(x0.dtype), model.decode(x).cpu()
    return Round(tokens=tokens, logp_old=logp_old, x0=x0, images=images, reasoning=model.decode_text(tokens),
                 live=torch.ones(b, dtype=torch.bool), drew=drew, **rec)


def _empty_window(model, b: int, w: int, dev) -> dict[str, torch.Tensor]:
    """The window record of ``b`` rows, all zeros (float32)."""
    rec = {k: torch.zeros(b, w, *model.latent_shape, device=dev) for k in ("x_t", "x_next", "mean_old")}
    rec.update({k: torch.zeros(b, w, device=dev) for k in ("t", "t_next", "logp_img_old")})
    return rec


def _denoise(model, ctx, noise_seeds: list[int], window_start: torch.Tensor, w: int, init_seeds: list[int] | None, *,
             num_steps: int, shift: float, kind: str, noise_level: float, cfg_scale: float, reduction: str):
    """The denoising loop of ``sample_images`` over the B rows of ``ctx``: (window record, final latent x0)."""
    b = len(noise_seeds)
    null = model.null_context(b) if cfg_scale != 1.0 else None
    gens = [torch.Generator().manual_seed(s) for s in noise_seeds]  # CPU: device-independent draws
    init = gens if init_seeds is None else [torch.Generator().manual_seed(s) for s in init_seeds]
    x = torch.stack([torch.randn(model.latent_shape, generator=g) for g in init]).to(model.device)
    dev = x.device
    grid = model.timesteps(num_steps, shift).to(dev)  # [num_steps + 1], float32
    start = window_start.to(dev)
    rec = {k: x.new_zeros(b, w, *model.latent_shape) for k in ("x_t", "x_next", "mean_old")}
    rec.update({k: grid.new_zeros(b, w) for k in ("t", "t_next")}, logp_img_old=x.new_zeros(b, w))
    bcast = (b,) + (1,) * len(model.latent_shape)
    for k in range(num_steps):
        t, t_next = grid[k].expand(b), grid[k + 1].expand(b)
        v = guided_velocity(model, x, t, ctx, null, cfg_scale).float()  # float32 latent chain
        x_ode = x + (grid[k + 1] - grid[k]) * v  # Euler step, exactly as sampling.ode_sample
        slot = k - start  # [B] position inside the row's window
        inside = (slot >= 0) & (slot < w)
        if not bool(inside.any()):
            x = x_ode
            continue
        # Scoring mode (prev_sample given) draws no noise: we only take mean and std from it and
        # draw each row's noise from its own generator, so rows are independent of the chunking.
        step = sde_step(x, v, t, t_next, noise_level, kind, prev_sample=x, reduction=reduction)
        rows = inside.nonzero()[:, 0]
        eps = torch.zeros_like(x)  # each window row's noise from its own generator, one copy to the device
        eps[rows] = torch.stack([torch.randn(model.latent_shape, generator=gens[i]) for i in rows.tolist()]).to(dev)
        std = step.std.reshape(bcast)
        x_sde = step.mean + std * eps  # [B, *latent], what sde_step itself would sample
        logp = gaussian_log_prob(x_sde, step.mean, std, reduction)  # [B]; same call as its scoring
        s = slot[rows]
        for name, val in (("x_t", x), ("x_next", x_sde), ("mean_old", step.mean), ("t", t),
                          ("t_next", t_next), ("logp_img_old", logp)):
            rec[name][rows, s] = val[rows].to(rec[name].dtype)
        x = torch.where(inside.reshape(bcast), x_sde, x_ode)
    return rec, x


@dataclass
class RoundSeeds:
    """The randomness of one later round (r >= 1) of a step's episodes on one rank, per trajectory."""

    reasoning: list[int]  # [N_local] one decode generator per trajectory (its reflection)
    noise: list[int]  # [N_local] initial + window noise of each trajectory's new image
    window_start: torch.Tensor  # [N_local] first window step of each trajectory


@dataclass
class EpisodeSeeds:
    """The randomness of one step's episodes on one rank, keyed by global indices (module docstring)."""

    reasoning: list[int]  # [P_local] one decode generator per group
    noise: list[int]  # [N_local] initial + window noise of each trajectory
    window_start: torch.Tensor  # [N_local] first window step of each trajectory
    init: list[int] | None = None  # [N_local] initial noise instead of ``noise`` (a group's shared start)
    later: list[RoundSeeds] = field(default_factory=list)  # rounds 2.. of multi-round episodes (keyed by the round)


def reflection_tokens(model, prev: Round, live: torch.Tensor, seeds: list[int], *, max_new_tokens: int,
                      temperature: float, top_p: float, given: list[str] | None = None) -> TokenBatch:
    """The next round's tokens of B rows: ``prev``'s tokens (its reasoning now context) + the image
    it drew (appended to the row's images: the model sees it; a model with a ``drawn_image_id`` gets
    a masked column of that id here, where its context takes the image) + the reflection turn
    (``model.reflection_ids``) + the sampled reflection of the ``live`` rows [B] (row ``i`` draws from
    generator ``seeds[i]``), right-padded to the fixed width ``prev width + turn + max_new_tokens``:
    the width depends on nothing but the round, so no chunk or rank has to agree on it.
    ``given`` [B] (evaluation): these reflections, teacher-forced, instead of sampled ones."""
    t = prev.tokens
    b, dev = len(t), t.ids.device
    # the drawn image's place among each row's images (a model that labels its images numbers it)
    picture = [1 + (0 if (own := t.row_images(i)) is None else own.shape[0]) for i in range(b)]
    turns = {k: model.reflection_ids(k) for k in sorted(set(picture))} or {1: model.reflection_ids()}
    if len({len(v) for v in turns.values()}) > 1:
        raise ValueError(f"the reflection turns after picture {', '.join(map(str, turns))} differ in length: rows "
                         "holding that many images cannot share a round (give every prompt the same number of images)")
    mark = [] if model.drawn_image_id is None else [model.drawn_image_id]  # a masked column: where the image enters
    turn = next(iter(turns.values()))
    turn_ids = torch.tensor([mark + turns[k] for k in picture], dtype=t.ids.dtype, device=dev).reshape(b, len(mark + turn))
    turn_mask = torch.tensor([False] * len(mark) + [True] * len(turn), device=dev).expand(b, -1)
    ctx = TokenBatch(torch.cat([t.ids, turn_ids], 1), torch.cat([t.mask, turn_mask], 1),
                     torch.zeros(b, t.ids.shape[1] + turn_ids.shape[1], dtype=torch.bool, device=dev))
    drawn = prev.images.to(dev)
    ctx = ctx.with_images([drawn[i:i + 1] if (own := t.row_images(i)) is None else torch.cat([own, drawn[i:i + 1]])
                           for i in range(b)])
    width = ctx.ids.shape[1] + max_new_tokens
    out = ctx.padded(width, model.pad_id)
    rows = live.nonzero()[:, 0]
    if not len(rows):
        return out
    if given is not None:
        sampled = model.with_response(ctx.index(rows.to(dev)), [given[i] for i in rows.tolist()])
        if sampled.ids.shape[1] > width:
            raise ValueError(f"a given reflection is longer than text.max_reasoning_tokens={max_new_tokens}")
        sampled = sampled.padded(width, model.pad_id)
    else:
        gens = [torch.Generator(device=dev).manual_seed(seeds[i]) for i in rows.tolist()]
        sampled = model.sample_reasoning(ctx.index(rows.to(dev)), max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, generator=gens).padded(width, model.pad_id)
    ids, mask, resp = out.ids.clone(), out.mask.clone(), out.response_mask.clone()
    at = rows.to(dev)
    ids[at], mask[at], resp[at] = sampled.ids, sampled.mask, sampled.response_mask
    return TokenBatch(ids, mask, resp, out.images, out.image_mask)


def sample_episode(model, prompts: list, group_size: int, seeds: EpisodeSeeds, chunks: list[torch.Tensor], ranks,
                   *, text: dict, sampler: dict, on_chunk: Callable[[Episode, list[int]], None] | None = None,
                   branches: int = 1, given: Callable[[Round, list[int]], list[str]] | None = None) -> Episode:
    """One step's episodes on this rank, ``[P_local * G]`` prompt-major (module docstring).

    ``text``: ``sample_reasoning``'s options; ``sampler``: ``sample_images``'; ``chunks``: the rows
    of each chunk (rollout chunks are the first PPO epoch's micro-batches: same rows, order, width);
    ``on_chunk(episodes, rows)`` is called as soon as a chunk is sampled.

    Multi-round (``seeds.later``: one entry per round after the first): round r + 1's context is
    round r's + its image + the reflection turn (``reflection_tokens``); a row whose reflection says
    ``model.stop_word`` draws no more (``Round.drew`` False) and acts no more in later rounds
    (``Round.live`` False). ``branches`` K > 1 (tree credit): each group holds G / K round-1
    samples, each repeated K times in a row (same reasoning; the caller gives the copies the same
    noise seeds), whose later rounds branch. ``given(prev, rows)`` (evaluation): the reflections of
    the chunk's rows on their previous round ``prev``, teacher-forced instead of sampled."""
    tokens = sample_reasoning(model, prompts, group_size // branches, seeds.reasoning, **text, ranks=ranks)
    if branches > 1:  # row (p, m, k) = round-1 sample m of prompt p, continuation k
        tokens = tokens.index(torch.arange(len(tokens), device=tokens.ids.device).repeat_interleave(branches))
    width = dist.all_reduce_max(tokens.ids.shape[1], ranks, model.device)  # one width on every rank
    tokens = tokens.padded(width, model.pad_id)
    reflect = {k: text[k] for k in ("max_new_tokens", "temperature", "top_p")}
    parts = []
    for idx in chunks:
        rows = idx.tolist()
        rounds = [sample_images(model, tokens.index(idx.to(tokens.ids.device)), [seeds.noise[k] for k in rows],
                                seeds.window_start[idx], **sampler,
                                init_seeds=None if seeds.init is None else [seeds.init[k] for k in rows])]
        for later in seeds.later:  # round r + 1: look at round r's image, reflect, draw again (or stop)
            prev = rounds[-1]
            live = prev.drew.clone()  # still going: it drew last round
            toks = reflection_tokens(model, prev, live, [later.reasoning[k] for k in rows], **reflect,
                                     given=None if given is None else given(prev, rows))
            done = torch.tensor([model.says_done(r) for r in model.decode_text(toks)], dtype=torch.bool) & live
            rnd = sample_images(model, toks, [later.noise[k] for k in rows], later.window_start[idx], **sampler,
                                draw=live & ~done, kept=prev)
            rnd.live = live
            rounds.append(rnd)
        parts.append(Episode(rounds))
        if on_chunk is not None:
            on_chunk(parts[-1], rows)
    return Episode.cat(parts, model.pad_id).index(torch.argsort(torch.cat(chunks)))


@dataclass
class WindowScores:
    """The window steps of a round re-scored under the current policy; lists hold one tensor per
    window step (stacked or concatenated by the losses exactly as they need)."""

    logp: list[torch.Tensor]  # W x [B] log p(x_next | x_t), same reduction as the rollout's
    mean: list[torch.Tensor]  # W x [B, *latent] step means
    std: list[torch.Tensor]  # W x [B] step standard deviations
    v: list[torch.Tensor]  # W x [B, *latent] (guided) velocities, float32
    v_ref: list[torch.Tensor]  # W x [B, *latent] the reference's velocities (empty: no reference)
    mean_ref: list[torch.Tensor]  # W x [B, *latent] the reference's step means (empty: no reference)


def score_window(model, rnd: Round, ctx, *, kind: str, noise_level: float, cfg_scale: float,
                 reduction: str, ref=None, ctx_ref=None) -> WindowScores:
    """Score the recorded window steps of ``rnd`` under ``model`` (with gradient) and, when
    ``ref`` is given, the frozen reference at the same states (no gradient).

    The policy's log-probs are ``sde_step(..., prev_sample=x_next)``: the very call whose values
    ``sample_images`` recorded (there via ``gaussian_log_prob`` on the same mean and std), on the
    same rows, so on the first update the ratio is exactly 1."""
    b, w = rnd.x_t.shape[:2]
    null = model.null_context(b) if cfg_scale != 1.0 else None  # CFG: rollout AND training guided
    null_ref = ref.null_context(b) if ref is not None and cfg_scale != 1.0 else None
    out = WindowScores([], [], [], [], [], [])
    for j in range(w):
        # contiguous: the same memory layout as in the rollout, hence the same kernels and numerics
        x_t, x_next = rnd.x_t[:, j].contiguous(), rnd.x_next[:, j].contiguous()
        t, t_next = rnd.t[:, j].contiguous(), rnd.t_next[:, j].contiguous()
        v = guided_velocity(model, x_t, t, ctx, null, cfg_scale).float()  # float32 SDE math
        step = sde_step(x_t, v, t, t_next, noise_level, kind, prev_sample=x_next, reduction=reduction)
        out.logp.append(step.log_prob)
        out.mean.append(step.mean)
        out.std.append(step.std)
        out.v.append(v)
        if ref is not None:
            with torch.no_grad():  # the frozen reference is a target, never differentiated
                v_ref = guided_velocity(ref, x_t, t, ctx_ref, null_ref, cfg_scale).float()
                out.mean_ref.append(sde_step(x_t, v_ref, t, t_next, noise_level, kind, prev_sample=x_next).mean)
                out.v_ref.append(v_ref)
    return out
