"""``unigrpo export RUN_DIR_OR_CHECKPOINT --out DIR [--format lora|merged]``: a trained policy in
the formats its ecosystem loads (docs/after_training.md).

The source is a run directory (its ``final.safetensors``) or any weight file ``model.save`` wrote:
such a file records the model section it was trained with (``model`` in its metadata: base
pipeline / reasoner / Bagel path, LoRA ranks and targets, dtype, kind) and its sha256, so it
exports alone. The model is rebuilt from that section (``overrides`` may change it, e.g. a base
folder that moved: ``model.pipeline=/new/place``), the weights are loaded with every check of a
load (hash, finite, every name and shape the base's: a checkpoint of another base is one line,
exit 2), then the model writes its own formats (``UnifiedModel.export_formats`` /
``write_export``: hf ``hf_export``, bagel ``bagel_io.write_export``, tiny its standalone file).

Everything is written to a temporary folder beside ``--out``, then renamed: ``--out`` holds a
complete export or nothing. A non-empty ``--out`` is refused unless ``overwrite``. Each export ends
with ``README.md`` (how to load it, the base, the step, the model section) and ``SHA256SUMS`` (the
sha256 of every file: ``sha256sum -c SHA256SUMS``), which unigrpo verifies when it loads the
folder again (``model.pipeline``, ``model.path``: ``checkpoint.verify_sums``); the tiny model's
file carries its hash inside, as every weight file unigrpo writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from unigrpo.utils.errors import CheckpointError, InputError

__all__ = ["export", "policy_file", "write_sums"]


def policy_file(source: str | Path) -> Path:
    """The weight file of ``source``: a file as is, a run directory's ``final.safetensors``."""
    source = Path(source)
    if source.is_dir():
        if not (source / "final.safetensors").is_file():
            raise InputError(f"{source}: a run directory without final.safetensors (the run saved no policy yet)")
        return source / "final.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such run directory or weight file")
    return source


def _section(path: Path) -> tuple[dict, dict]:
    """(model section, extra: the step) recorded in the metadata of ``path`` (hash verified)."""
    from unigrpo.models.base import read_weights

    _, meta = read_weights(path)
    if "model" not in meta:
        raise CheckpointError(f"{path}: records no model section (written by an older unigrpo); export it with "
                              "the run's config: load it with that config and call model.save again")
    extra = {k: json.loads(meta[k]) for k in ("rl_step",) if k in meta}
    return json.loads(meta["model"]), extra


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out}: is not empty (use --overwrite to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {parent} is not a writable directory")


def write_sums(folder: Path) -> None:
    """``SHA256SUMS`` over every file of ``folder`` (the ``sha256sum`` format)."""
    from unigrpo.utils.checkpoint import file_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text("".join(f"{file_sha256(f)}  {f.relative_to(folder).as_posix()}\n"
                                               for f in files))


def _readme(section: dict, fmt: str, extra: dict, how: str, source: Path) -> str:
    base = {k: section[k] for k in ("pipeline", "reasoner", "path") if section.get(k)}
    steps = extra.get("rl_step", "unknown")
    hub = [v for v in base.values() if v != "text_encoder" and not Path(v).expanduser().exists()]  # hub ids
    card = {"tags": ["unigrpo", "grpo", "reinforcement-learning"], **({"base_model": hub} if hub else {})}
    return ("---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n\n"
            f"# unigrpo export ({section['kind']}, {fmt})\n\nA policy trained with unigrpo (UniGRPO), exported "
            f"from `{source.name}` after {steps} RL steps.\n\nBase: "
            + (", ".join(f"{k} `{v}`" for k, v in base.items()) or "none (a standalone model)")
            + f"\n\n## Load it\n\n```python\n{how.replace('DIR', '<this folder>')}```\n\n"
            "`sha256sum -c SHA256SUMS` checks every file.\n\n## Model section of the run\n\n```yaml\n"
            + yaml.safe_dump({"model": section}, sort_keys=False) + "```\n")


def export(source: str | Path, out: str | Path, fmt: str | None = None, *, overwrite: bool = False,
           overrides: list[str] | None = None, device: str = "cpu") -> Path:
    """Export the policy of ``source`` (run directory or weight file) to ``out`` (module docstring);
    ``fmt`` None = the model's default. Returns ``out``."""
    from unigrpo.config import load_config
    from unigrpo.models import build_model

    path, out = policy_file(source), Path(out)
    _check_out(out, overwrite)
    section, extra = _section(path)
    cfg = load_config(None, [f"model={json.dumps(section)}", f"device={device}", *(overrides or [])])
    try:
        model = build_model(cfg, device, checkpoint=str(path))
    except ValueError as e:  # the base refuses the recorded section: another pipeline, other sizes
        raise CheckpointError(f"{path}: does not match its base model: {str(e).splitlines()[0]}") from e
    formats = model.export_formats()
    if not formats:
        raise InputError(f"{path}: model.kind={section['kind']} has no export format")
    fmt = fmt or formats[0]
    if fmt not in formats:  # e.g. lora for a side trained in full (LoRA rank 0)
        lora = section.get("lora", {})
        ranks = f", LoRA ranks text {lora['text_rank']} / image {lora['image_rank']}" if lora else ""
        raise InputError(f"--format {fmt}: not available for this policy (model.kind={section['kind']}{ranks}); "
                         f"it exports as: {', '.join(formats)}")
    tmp = out.resolve().parent / f".{out.name}.export-tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        how = model.write_export(tmp, fmt, extra)
        (tmp / "README.md").write_text(_readme(cfg_section(cfg), fmt, extra, how, path))
        write_sums(tmp)
        old = tmp.with_name(tmp.name + ".old")
        if out.exists():  # --overwrite: the old export moves aside first, and goes once the new one is in place
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cfg_section(cfg) -> dict:
    from unigrpo.utils.typed_config import to_dict

    return {**to_dict(cfg.model), "checkpoint": None}
