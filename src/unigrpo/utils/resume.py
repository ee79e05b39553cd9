"""What a ``--resume`` may change (docs/reliability.md, "Resume keys").

A resumed run must be the run it continues: keys that shape the trajectories, the objective or the
model (model, task, text, sampler, algo, rewards, seed, optim.image_params) are refused, one line
naming them. Keys that only say how long, how often or where it runs are free. The optimizer's
hyper-parameters (learning rates, weight decay, betas, grad_clip) may change and are APPLIED:
AdamW's ``load_state_dict`` restores the saved ones, so they are written into the param groups
afterwards, printed, and the checkpoint's saved config is always the effective one.
"""

from __future__ import annotations

import re

from unigrpo.utils.typed_config import ConfigError, to_dict

__all__ = ["FREE", "OPTIMIZER", "TRANSPORT", "apply_optimizer", "config_changes", "plan", "resume_run"]

# Changeable on resume with no effect on what is computed (dotted keys; "x." matches a section, "[]"
# any list index): how long, how often, where -- also where a remote reward is served and how it
# is reached (the scores are the same), not which reward, its weight, or a judge's model / prompt.
TRANSPORT = ("url", "timeout_s", "retries", "backoff_s", "backoff_max_s", "max_concurrency", "batch_size",
             "image_format", "breaker_failures", "breaker_reset_s", "headers.", "api_key_env", "on_failure",
             "transport", "trusted_hosts", "token")  # transport: the same bits either way; trusted_hosts: where it may connect
FREE = ("steps", "output_dir", "device", "threads", "log_every", "eval_every", "save_every", "reward_workers",
        "dist_timeout_s", "max_skipped_share", "eval.", "pretrain.", "logging.", "model.checkpoint", *(f"rewards[].kwargs.{k}" for k in TRANSPORT))
# Changeable, applied to the optimizer after load_state_dict.
OPTIMIZER = ("optim.lr_text", "optim.lr_image", "optim.weight_decay", "optim.betas", "optim.grad_clip")


def _flat(tree, prefix: str = "") -> dict:
    """Nested dicts (and lists of dicts, e.g. ``rewards``) -> {dotted key: leaf value}."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix.rstrip('.')}[{i}]."))
        return out
    return {prefix.rstrip("."): tree}


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (saved value, new value) for every key that differs (``rewards[0].kwargs.url``)."""
    a, b = _flat(saved), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _matches(key: str, names) -> bool:
    key = re.sub(r"\[\d+\]", "[]", key)
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def plan(saved: dict, new: dict, done: int, defaults: dict | None = None) -> dict[str, tuple]:
    """The changes a resume at step ``done`` makes; ConfigError for refused keys or fewer steps.

    A key the saved config does not have (added to unigrpo after the run was saved) is no change
    when its new value is its default (``defaults``, the flattened default config): a new key's
    default is the behaviour the code had before it existed."""
    changes = config_changes(saved, new)
    if defaults is not None:
        old, default = _flat(saved), _flat(defaults)
        changes = {k: v for k, v in changes.items() if k in old or k not in default or v[1] != default[k]}
    refused = [k for k in changes if not _matches(k, FREE) and not _matches(k, OPTIMIZER)]
    if refused:
        shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ConfigError(f"{refused[0]}: cannot change on --resume (the run would not be the run it continues): "
                          f"{shown}{more}; start a new run in another output_dir")
    if new["steps"] < done:  # == done is a finished run: resuming it is a no-op (exit 0), so that
        # "after a crash, --resume" always works, even when the crash came after the last save
        raise ConfigError(f"steps: {new['steps']} but the checkpoint has {done} steps done; a resume cannot undo "
                          f"steps (raise steps to {done} or more)")
    return changes


def apply_optimizer(opt, cfg) -> None:
    """The config's optimizer hyper-parameters into the param groups (after load_state_dict, which
    restored the saved ones). grad_clip is read from the config at every step."""
    lr = {"text": cfg.optim.lr_text, "image": cfg.optim.lr_image}
    for g in opt.param_groups:
        g["lr"] = lr[g["name"]]
        g["weight_decay"] = cfg.optim.weight_decay
        g["betas"] = tuple(cfg.optim.betas)


def resume_run(out, model, ref, opt, cfg, device, verbose: bool) -> tuple[int, dict]:
    """Restore the checkpoint in ``out`` (verified), check what the new config changes, apply the
    optimizer's new hyper-parameters; returns (steps done, the checkpoint's ``extra`` with this
    resume recorded under ``"resumes"``). Reads only: nothing in ``out`` is written here."""
    from unigrpo.utils import checkpoint as ckpt

    state = ckpt.resume(out, model, ref, opt, device)
    done, extra = state["step"], {"skipped_total": 0, "reward_skipped_steps": 0, "resumes": [], **state["extra"]}
    from unigrpo.config import Config

    changes = plan(state["config"], to_dict(cfg), done, defaults=to_dict(Config()))
    apply_optimizer(opt, cfg)  # load_state_dict restored the saved lr / betas / weight decay
    extra["resumes"] = [*extra["resumes"], {"step": done, "changes": {k: list(v) for k, v in changes.items()}}]
    if cfg.steps == done and verbose:
        print(f"[unigrpo] the run in {out} is complete ({done} of {cfg.steps} steps); nothing to do "
              f"(raise steps to continue)", flush=True)
    if changes and verbose:
        print(f"[unigrpo] resuming at step {done} with changes: "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
    return done, extra
