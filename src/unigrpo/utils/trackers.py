"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and trackio
(config section ``logging``; docs/metrics.md, "Trackers"). Rank 0 only, through ``RunLogger``.

Each tracker gets the run's config once, every metrics line as scalars at the trainer's step, and
the grids as images. A run's tracker identity is one random id written to ``OUTPUT_DIR/trackers.json``
at its first start: the wandb run id, and the suffix of the trackio run name
(``<run_name>-<id>``). ``--resume`` reads it back and continues the same tracker runs
(``resume="allow"``: a tracker run that does not exist yet, e.g. on another machine, is created).

Deliberate choices:
- Trackers are optional extras, imported only when enabled: a missing package is a one-line error
  at start (before any step runs), not a silent no-op.
- wandb ignores a step lower than the last one it saw; a resumed run redoes the steps after its
  checkpoint, so those already sent before the crash keep their first values there (metrics.jsonl
  and TensorBoard drop and rewrite them).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

__all__ = ["STATE_FILE", "TrackioTracker", "WandbTracker", "open_trackers"]

STATE_FILE = "trackers.json"


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise RuntimeError(f"logging.{name}: needs the '{name}' extra: pip install 'unigrpo[{name}]' ({e})") from e


class WandbTracker:
    """A wandb run (online, or ``WANDB_MODE=offline``: files under ``OUTPUT_DIR/wandb``, ``wandb sync``)."""

    def __init__(self, cfg, config: dict, out: Path, run_id: str, name: str):
        self.wandb = _import("wandb")
        self.run = self.wandb.init(project=cfg.project, entity=cfg.entity, name=name, group=cfg.group,
                                   tags=list(cfg.tags) or None, id=run_id, resume="allow", config=config,
                                   dir=str(out))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_images(self, step: int, images: dict[str, tuple[str, str | None]]) -> None:
        self.run.log({k: self.wandb.Image(path, caption=cap) for k, (path, cap) in images.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A trackio run (local SQLite under ``$TRACKIO_DIR``, default ``$HF_HOME/trackio``; ``trackio show``)."""

    def __init__(self, cfg, config: dict, out: Path, run_id: str, name: str):
        self.trackio = _import("trackio")
        # the config again on resume: trackio replaces a run's stored config with the one given
        self.run = self.trackio.init(project=cfg.project, name=f"{name}-{run_id}", group=cfg.group, config=config,
                                     resume="allow", embed=False, auto_log_gpu=False, auto_log_cpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_images(self, step: int, images: dict[str, tuple[str, str | None]]) -> None:
        self.run.log({k: self.trackio.Image(path, caption=cap) for k, (path, cap) in images.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()


def open_trackers(cfg, config: dict, out: str | Path, resume: bool) -> list:
    """The enabled trackers of ``cfg`` (a ``LoggingConfig``), continuing the run of
    ``out/trackers.json`` when ``resume``; writes that file on a fresh start."""
    kinds = [k for k, on in (("wandb", cfg.wandb), ("trackio", cfg.trackio)) if on]
    if not kinds:
        return []
    out = Path(out)
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
    run_id = str(state.get("run_id") or uuid.uuid4().hex[:8])
    name = str(state.get("name") or cfg.run_name or out.resolve().name)  # a resume keeps the first name
    trackers = []
    try:
        for kind in kinds:
            cls = WandbTracker if kind == "wandb" else TrackioTracker
            trackers.append(cls(cfg, config, out, run_id, name))
    except BaseException:
        for t in trackers:
            t.finish()
        raise
    state_path.write_text(json.dumps({"run_id": run_id, "name": name, "trackers": kinds}) + "\n")
    return trackers
