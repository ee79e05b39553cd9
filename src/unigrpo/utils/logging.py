"""Run logging (rank 0 only): metrics.jsonl, TensorBoard, a progress bar.

Every key written here must be defined in docs/metrics.md (a test parses the doc).
TensorBoard is an optional extra: without it the run logs a warning and keeps metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["RunLogger", "StatsMean"]


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
    """metrics.jsonl + TensorBoard events + tqdm bar with reward and ETA. Inert when not ``enabled``."""

    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 append: bool = False):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.jsonl = self.tb = self.bar = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        if append and path.is_file():  # resume: drop lines of steps after the checkpoint (redone now)
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        # the curve continues in the same file on resume; open for the run, closed in close()
        self.jsonl = open(path, "a" if append else "w")  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        except ImportError as e:  # tensorboard is an optional extra (pip install unigrpo[viz])
            warnings.warn(f"TensorBoard logging disabled ({e}); metrics.jsonl is still written")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="unigrpo", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One line of ``{"step": step, key: value, ...}``; non-finite values are kept as NaN/inf."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

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

