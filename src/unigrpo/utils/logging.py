"""Run logging (rank 0 only): metrics.jsonl, TensorBoard, a progress bar, and the trackers of the
config's ``logging`` section (wandb, trackio: ``unigrpo.utils.trackers``) when given.

Every key written here must be defined in docs/metrics.md (a test parses the doc).
TensorBoard is an optional extra: without it the run logs a warning and keeps metrics.jsonl.

metrics.jsonl is strict JSON, one object per line: a non-finite value is written as ``null`` and
its key listed under ``"nonfinite"``. On resume, lines of steps after the checkpoint are dropped
(they are redone), a torn last line (the crash hit mid-write) is dropped with a note, and
TensorBoard is opened with ``purge_step`` so the redone steps are not shown twice.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["RunLogger", "StatsMean", "jsonl_line", "kept_lines", "skipped_steps"]


def jsonl_line(step: int, metrics: dict[str, float]) -> str:
    """One strict-JSON line: non-finite values -> null, their keys under "nonfinite"."""
    clean = {k: float(v) for k, v in metrics.items()}
    bad = [k for k, v in clean.items() if not math.isfinite(v)]
    row = {"step": step, **{k: (None if k in bad else v) for k, v in clean.items()}}
    if bad:
        row["nonfinite"] = bad
    return json.dumps(row, allow_nan=False)


def kept_lines(text: str, start_step: int, path) -> list[str]:
    """The lines of an existing metrics.jsonl a resume at ``start_step`` keeps: steps <= start_step.
    A torn LAST line is dropped with a note; a bad line elsewhere is an error naming it."""
    lines, keep = text.splitlines(), []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            if i == len(lines) - 1:
                print(f"[unigrpo] {path}: dropped a torn last line (a crash during a write)", flush=True)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
        if row.get("step", 0) <= start_step:
            keep.append(ln)
    return keep


def skipped_steps(path: Path) -> tuple[int, list[int]]:
    """(steps skipped so far, the logged steps that skipped one) of a run's ``metrics.jsonl``:
    ``reward/skipped_steps`` counts them (kept across --resume), a step that raises it skipped."""
    count, steps = 0, []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn line (a kill mid-write): the resume rewrites it
            continue
        value = row.get("reward/skipped_steps") if isinstance(row, dict) else None
        if isinstance(value, (int, float)) and value > count:
            count, steps = int(value), [*steps, row.get("step")]
    return count, steps


class StatsMean:
    """Running combination of per-micro-batch stats: ``*_min`` by min, ``*_max`` by max, the rest
    by the plain mean over the calls to ``add`` (every micro-batch has the same size)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict, prefix: str = "") -> None:
        for k, v in stats.items():
            key, v = prefix + k, float(v)
            if key not in self.sums:
                self.sums[key], self.counts[key] = v, 1
            elif key.endswith("_min"):
                self.sums[key] = min(self.sums[key], v)
            elif key.endswith("_max"):
                self.sums[key] = max(self.sums[key], v)
            else:
                self.sums[key] += v
                self.counts[key] += 1

    def result(self) -> dict[str, float]:
        return {k: (v if k.endswith(("_min", "_max")) else v / self.counts[k]) for k, v in self.sums.items()}


class RunLogger:
    """metrics.jsonl + TensorBoard events + tqdm bar with reward and ETA. Inert when not ``enabled``.

    ``trackers``: the config's ``logging`` section (``LoggingConfig``) and ``config`` the whole
    config as a dict: the enabled trackers get the config, every ``log`` and the ``log_image``s;
    with ``append`` (a resume) they continue the run's tracker runs."""

    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 append: bool = False, trackers=None, config: dict | None = None):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.jsonl = self.tb = self.bar = None
        self.trackers, self.tracker_images = [], bool(trackers is not None and trackers.images)
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if trackers is not None:  # first: a tracker that cannot start leaves no file handle open
            from unigrpo.utils.trackers import open_trackers

            self.trackers = open_trackers(trackers, config or {}, self.out, append)
        path = self.out / "metrics.jsonl"
        if append and path.is_file():  # resume: drop lines of steps after the checkpoint (redone now)
            keep = kept_lines(path.read_text(), start_step, path)
            path.write_text("".join(ln + "\n" for ln in keep))
        # the curve continues in the same file on resume; open for the run, closed in close()
        self.jsonl = open(path, "a" if append else "w")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the checkpoint (redone now) are hidden, not doubled
            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if append else None)
        except ImportError as e:  # tensorboard is an optional extra (pip install unigrpo[viz])
            warnings.warn(f"TensorBoard logging disabled ({e}); metrics.jsonl is still written")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="unigrpo", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One line of ``{"step": step, key: value, ...}`` (``jsonl_line``: strict JSON)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(jsonl_line(step, clean) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self._tb_scalars(step, clean)
            self.tb.flush()
        for t in self.trackers:
            t.log(step, clean)

    def _tb_scalars(self, step: int, clean: dict[str, float]) -> None:
        """Every scalar of the step in ONE TensorBoard event: ``add_scalar`` writes an event per key
        (its checks and proto per call cost ~0.3 ms a key here, ~1-3 % of a tiny step with ~100
        metrics). The same ``simple_value`` summaries, read back identically by TensorBoard."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in clean.items()]
        self.tb._get_file_writer().add_summary(Summary(value=values), step)  # the writer add_scalar uses

    def log_image(self, step: int, key: str, path: str | Path, caption: str | None = None) -> None:
        """Send an image file (a grid written under ``out/grids``) to the trackers as ``key``; nothing
        when there are none, ``logging.images`` is off, or the file was not written (no grid)."""
        path = Path(path)
        if not (self.enabled and self.trackers and self.tracker_images and path.is_file()):
            return
        for t in self.trackers:
            t.log_images(step, {key: (str(path), caption)})

    def progress(self, reward: float, extra: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        post = {"reward": f"{reward:.3f}"}
        post.update({k: f"{v:.3f}" for k, v in (extra or {}).items() if math.isfinite(v)})
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()
        for t in self.trackers:
            t.finish()
        self.trackers = []

