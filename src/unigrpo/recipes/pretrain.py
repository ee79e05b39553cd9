"""`unigrpo pretrain`: supervised ("SFT") training of the tiny unified model from scratch.

Each step draws a batch of training tasks and trains, in ONE text pass per batch:
1. the text expert on prompt -> reasoning (cross-entropy on the response tokens);
2. the image expert on flow matching, conditioned on the text expert's hidden states.

Deliberate imperfections, so that RL has room to improve (the paper starts RL from an SFT model):
- a fraction ``wrong_reasoning_frac`` of reasoning-required samples carries plausible but wrong
  reasoning, and the image follows the (wrong) description — the image expert learns to draw what
  the description says; the text expert learns the facts only ~(1 - frac) of the time;
- ``no_think_frac`` of samples condition the image on the prompt alone (thinking off is a mode);
- ``uncond_frac`` use the null context (classifier-free guidance at evaluation).
Causal attention makes the prompt-only context a masked view of the same pass (exact).

A model that sees and edits (``model.sees_images`` / ``model.edits``) is trained on a mixture:
``edit_frac`` of the samples are edits of the shapes world (``world.edit``: the input scene is the
prompt's image, the response says what the model sees and what the result shows, the image is the
edited scene drawn over the input latent; reasoning-required edits carry wrong reasoning as often
as text-to-image prompts do), ``describe_frac`` describe the input image (the image is the input
scene again), ``reflect_frac`` are second rounds of a multi-round episode (``world.refine``: the
prompt, a first response, the image it led to, the reflection turn; the response is the reflection,
the image the prompt's target: ``done`` when the first image was right), the rest is the
text-to-image data above. ``pretrain.init`` starts from a trained
checkpoint (``TinyUnifiedModel.load_grown``): a new capability learns on top of what is known.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unigrpo.config import Config
from unigrpo.models import build_model
from unigrpo.models.tiny import TextContext, TinyUnifiedModel
from unigrpo.tasks.base import Prompt
from unigrpo.world.render import render_batch
from unigrpo.world.tasks import make_tasks, wrong_reasoning


def _edit_sample(problem, rng: np.random.Generator, cfg: Config, mode: str):
    """(prompt with its input image, response, target image [3, S, S]) of one edit or describe
    problem; input and target drawn with one placement per cell (``world.edit.render_pair``): only
    what the edit changes moves, as in a real edit."""
    from unigrpo.world.edit import render_pair, wrong_edit_reasoning

    response, target = problem.reasoning, problem.target
    if problem.requires_reasoning and rng.random() < cfg.pretrain.wrong_reasoning_frac:
        response, target = wrong_edit_reasoning(problem, rng)
    if mode == "prompt":  # without reasoning the image follows the instruction itself
        target = problem.target
    src, tgt = (torch.from_numpy(x.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
                for x in render_pair(problem.source, target, rng, cfg.model.image_size))
    return Prompt(problem.instruction, images=src[None]), response, tgt


def make_batch(tasks, rng: np.random.Generator, cfg: Config, edits=None, describes=None, reflects=None):
    """Sample SFT examples: (prompts, responses, image targets, context mode per row). A target is
    a ``Spec`` (text-to-image and reflection rows: rendered in ``sft_loss``) or the rendered result
    [3, S, S] of an edit or describe row; edit, describe and reflection rows' prompts are ``Prompt``
    objects carrying the input image. With ``edit_frac = describe_frac = reflect_frac = 0`` the draws
    are exactly those of a text-to-image-only recipe (the shipped checkpoint's)."""
    p = cfg.pretrain
    idx = rng.integers(0, len(tasks), size=p.batch_size)
    mixed = p.edit_frac + p.describe_frac + p.reflect_frac > 0
    prompts, responses, specs, modes = [], [], [], []
    for i in idx:
        if mixed:
            u = rng.random()
            if p.edit_frac + p.describe_frac <= u < p.edit_frac + p.describe_frac + p.reflect_frac:
                ex = reflects[int(rng.integers(len(reflects)))]  # a second round: always with its reflection
                prompts.append(Prompt(ex.context, images=ex.image[None]))
                responses.append(ex.response)
                specs.append(ex.next_spec)
                modes.append("full")
                continue
            pool = edits if u < p.edit_frac else describes if u < p.edit_frac + p.describe_frac else None
            if pool is not None:
                v = rng.random()
                mode = "uncond" if v < p.uncond_frac else "prompt" if v < p.uncond_frac + p.no_think_frac else "full"
                prompt, response, target = _edit_sample(pool[int(rng.integers(len(pool)))], rng, cfg, mode)
                prompts.append(prompt)
                responses.append(response)
                specs.append(target)
                modes.append(mode)
                continue
        task = tasks[i]
        # task.target is the spec with free colours filled in as the reasoning chose them
        reasoning, spec = task.reasoning, task.target
        if task.requires_reasoning and rng.random() < p.wrong_reasoning_frac:
            reasoning, spec = wrong_reasoning(task, rng)
        u = rng.random()
        mode = "uncond" if u < p.uncond_frac else "prompt" if u < p.uncond_frac + p.no_think_frac else "full"
        if mode == "prompt":
            spec = task.spec  # without reasoning the image follows the prompt itself (free colours random)
        prompts.append(task.prompt)
        responses.append(reasoning)
        specs.append(spec)
        modes.append(mode)
    return prompts, responses, specs, modes


REFLECT_POOL = 4000  # second-round examples drawn from the first training tasks (world.refine)


def reflection_pool(model: TinyUnifiedModel, tasks, cfg: Config) -> list:
    """SFT examples of second rounds (``world.refine.reflection_examples``) whose context and
    reflection fit ``model.max_seq_len`` (the longest need about 72 positions); refused when none does."""
    from unigrpo.world.refine import reflection_examples

    room = cfg.model.max_seq_len
    pool = [ex for ex in reflection_examples(tasks, cfg.seed, cfg.model.image_size)
            if len(model.prompt_ids(ex.context)) + len(model.response_ids(ex.response)) <= room]
    if not pool:
        raise ValueError(f"pretrain.reflect_frac: no reflection fits model.max_seq_len={room} (use 80)")
    return pool


def render_targets(targets, seed: int, size: int) -> torch.Tensor:
    """Images [B, 3, S, S]: text-to-image specs rendered in one batch, edit results as given."""
    drawn = [i for i, t in enumerate(targets) if isinstance(t, torch.Tensor)]
    if not drawn:
        return render_batch(targets, seed=seed, size=size)
    specs = [i for i in range(len(targets)) if i not in set(drawn)]
    out = torch.zeros(len(targets), 3, size, size)
    out[drawn] = torch.stack([targets[i] for i in drawn])
    if specs:
        out[specs] = render_batch([targets[i] for i in specs], seed=seed, size=size)
    return out


def sft_loss(model: TinyUnifiedModel, prompts, responses, specs, modes, seed: int, cfg: Config):
    """Text cross-entropy + flow-matching MSE for one batch. Returns (loss, stats)."""
    tokens = model.with_response(model.encode(prompts), responses)
    logp, ctx = model.forward_context(tokens)
    n_tok = tokens.response_mask.sum().clamp(min=1)
    text_loss = -(logp.sum() / n_tok)
    # Context per row: full (prompt + reasoning), prompt only, or the null context.
    mode = torch.tensor([{"full": 0, "prompt": 1, "uncond": 2}[m] for m in modes])
    ctx_mask = ctx.mask & ~(tokens.response_mask & (mode == 1)[:, None])
    null = model.null_context(len(modes))
    width = ctx.hidden.shape[1]
    null_hidden = F.pad(null.hidden, (0, 0, 0, width - 1))
    null_mask = F.pad(null.mask, (0, width - 1))
    is_null = (mode == 2)
    hidden = torch.where(is_null[:, None, None], null_hidden, ctx.hidden)
    ctx_mask = torch.where(is_null[:, None], null_mask, ctx_mask)
    images = render_targets(specs, seed, cfg.model.image_size)
    x0 = model.encode_images(images)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.rand(x0.shape[0], generator=gen)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps  # x_t = (1-t) x0 + t eps
    ref = None if ctx.ref is None else ctx.ref * ~is_null.reshape(-1, 1, 1, 1)  # the null context has no input
    v = model.velocity(x_t, t, TextContext(hidden, ctx_mask, ref))
    image_loss = F.mse_loss(v, eps - x0)  # target v = eps - x0
    loss = text_loss + cfg.pretrain.image_loss_weight * image_loss
    return loss, {"text_loss": text_loss.item(), "image_loss": image_loss.item()}


def pretrain(cfg: Config, out_path: str | Path, log_path: str | Path | None = None,
             progress: bool = True) -> TinyUnifiedModel:
    """Train from scratch; writes the checkpoint (safetensors) and a JSONL log."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    p = cfg.pretrain
    model = build_model(cfg, "cpu", checkpoint=None)  # a random init of the config's sizes
    if p.init is not None:
        model.grow_from(TinyUnifiedModel.load(p.init))
    model.train()
    tasks = make_tasks("train", 20000, seed=cfg.seed)
    edits = describes = reflects = None
    if p.edit_frac or p.describe_frac:
        from unigrpo.world.edit import make_edit_problems

        edits = make_edit_problems("train", 20000, seed=cfg.seed)
        describes = make_edit_problems("train", 2000, seed=cfg.seed, weights={"describe": 1.0})
    if p.reflect_frac:
        reflects = reflection_pool(model, tasks[:REFLECT_POOL], cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01)
    warmup = min(200, p.steps // 10 + 1)

    def lr_at(step: int) -> float:  # linear warm-up then cosine to 5% of the peak
        if step < warmup:
            return p.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, p.steps - warmup)
        return p.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed after the loop
    start = time.time()
    bar = tqdm(range(p.steps), desc="pretrain", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = make_batch(tasks, rng, cfg, edits, describes, reflects)
        loss, stats = sft_loss(model, *batch, seed=cfg.seed * 1_000_003 + step, cfg=cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(text=f"{stats['text_loss']:.3f}", image=f"{stats['image_loss']:.3f}")
        if log is not None and (step % 50 == 0 or step == p.steps - 1):
            log.write(json.dumps({"step": step, **stats, "grad_norm": float(gnorm),
                                  "lr": lr_at(step), "time_s": time.time() - start}) + "\n")
            log.flush()
    if log is not None:
        log.close()
    model.save(out_path, extra={"pretrain": {"steps": p.steps, "seed": cfg.seed, "batch_size": p.batch_size,
                                             "init": p.init, "edit_frac": p.edit_frac,
                                             "describe_frac": p.describe_frac, "reflect_frac": p.reflect_frac,
                                             "minutes": (time.time() - start) / 60}})
    return model
