"""The optimizer of the UniGRPO recipe: one AdamW group per trained expert, each clipped alone.

- Text and image experts are clipped separately (``optim.grad_clip`` each): a spike in one
  expert's gradient does not shrink the other's update. Separate learning rates (paper: 1e-6 text,
  3e-5 image).
- An update whose loss or gradient is non-finite is skipped on every rank (all take the same
  decision), and the parameters with non-finite gradients are named.
"""

from __future__ import annotations

import re

import torch

from unigrpo.config import Config, ConfigError
from unigrpo.utils import dist

__all__ = ["build_optimizer", "optimizer_step", "trained_parameters"]


def trained_parameters(model, cfg: Config) -> dict[str, list[torch.nn.Parameter]]:
    """``{"text": [...], "image": [...]}``: the parameters each trained expert updates (an expert
    that is not trained is absent). ``optim.image_params`` (a regex on the names) narrows the image
    expert's, e.g. to attention only, as Flow-GRPO's LoRA on attention."""
    groups = model.parameter_groups()
    image = groups["image"]
    if cfg.optim.image_params is not None:
        image = [(n, p) for n, p in image if re.search(cfg.optim.image_params, n)]
        if cfg.algo.train_image and not image:
            raise ConfigError(f"optim.image_params: {cfg.optim.image_params!r} matches no image-expert parameter "
                              f"(names look like {groups['image'][0][0] if groups['image'] else '?'})")
    chosen = {"text": groups["text"] if cfg.algo.train_text else None,
              "image": image if cfg.algo.train_image else None}
    return {name: [p for _, p in named] for name, named in chosen.items() if named is not None}


def build_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """Freeze everything, unfreeze the trained experts; one AdamW group (own lr) per expert."""
    model.requires_grad_(False)
    lr = {"text": cfg.optim.lr_text, "image": cfg.optim.lr_image}
    groups = []
    for name, params in trained_parameters(model, cfg).items():
        for p in params:
            p.requires_grad_(True)
        groups.append({"params": params, "lr": lr[name], "name": name})
    return torch.optim.AdamW(groups, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)


def optimizer_step(model, opt: torch.optim.Optimizer, cfg: Config, ranks: dist.Dist, loss_finite: bool) -> dict:
    """Average gradients over ranks, clip each expert, skip the update if anything is non-finite."""
    experts = {g["name"]: g["params"] for g in opt.param_groups}
    model.reduce_gradients([p for ps in experts.values() for p in ps], ranks)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # inf: norm only
    stats = {f"loss/{name}/grad_norm": float(torch.nn.utils.clip_grad_norm_(ps, clip))
             for name, ps in experts.items() if ps}
    finite = loss_finite and all(torch.isfinite(torch.tensor(n)) for n in stats.values())
    if dist.any_flag(not finite, ranks):  # every rank takes the same decision
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if ranks.is_main:
            per_module = {m: sum(b.split(".")[0] == m for b in bad) for m in dict.fromkeys(b.split(".")[0] for b in bad)}
            print(f"[unigrpo] skipped an update: loss finite={loss_finite}, non-finite gradients in "
                  f"{len(bad)} parameters {per_module}: {bad[:3]}{' ...' if len(bad) > 3 else ''}", flush=True)
        opt.zero_grad(set_to_none=True)
        return {**stats, "skipped": 1.0}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**stats, "skipped": 0.0}
