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
from unigrpo.world.render import render_batch
from unigrpo.world.tasks import make_tasks, wrong_reasoning


def make_batch(tasks, rng: np.random.Generator, cfg: Config):
    """Sample SFT examples: (prompts, responses, image specs, context mode per row)."""
    p = cfg.pretrain
    idx = rng.integers(0, len(tasks), size=p.batch_size)
    prompts, responses, specs, modes = [], [], [], []
    for i in idx:
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
    images = render_batch(specs, seed=seed, size=cfg.model.image_size)
    x0 = model.encode_images(images)
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.rand(x0.shape[0], generator=gen)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps  # x_t = (1-t) x0 + t eps
    v = model.velocity(x_t, t, TextContext(hidden, ctx_mask))
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
    model = build_model(cfg, "cpu", checkpoint=None).train()  # a random init of the config's sizes
    tasks = make_tasks("train", 20000, seed=cfg.seed)
    p = cfg.pretrain
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
        batch = make_batch(tasks, rng, cfg)
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
                                             "minutes": (time.time() - start) / 60}})
    return model
