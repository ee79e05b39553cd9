"""Run directories you can trust (docs/reliability.md).

- A new run refuses a directory that already holds a run (``checkpoint.pt``, ``metrics.jsonl``,
  ``final.safetensors``, ``reference.pt``) unless told: ``--resume`` continues it, ``--overwrite``
  removes the old run's files first. Silently mixing two runs' files is how results get lost.
- A lock file (``.unigrpo.lock``: pid + hostname) stops a second live run on the same directory;
  the lock of a process that is gone (same host, ``os.kill(pid, 0)`` fails) is stale and taken
  over. With torchrun only rank 0 takes it; every rank learns the outcome (one collective).
- ``open_run`` is the first write into the directory; the loop calls it only after the config,
  the task, the rewards, the model and a resumed checkpoint have all loaded, so a run that fails
  during start-up leaves the directory as it was.
- Temporary files of a crashed write (``.NAME.tmpPID``, ``atomic_save``) and policy files that no
  ``checkpoint.pt`` names are removed once the lock is held.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from unigrpo.utils.errors import InputError, Interrupted

__all__ = ["LOCK", "RUN_FILES", "RunDir", "check_output_dir", "holds_run", "open_run"]

LOCK = ".unigrpo.lock"
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "final.safetensors", "reference.pt")


def holds_run(out: Path) -> list[str]:
    """The files of a previous run in ``out`` (empty: the directory holds no run)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Read-only checks before anything is loaded: one line naming the directory."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {out}: exists and is not a directory")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output_dir {out}: {parent} is not writable")
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    found = holds_run(out) if out.is_dir() else []
    if found and not resume and not overwrite:
        raise InputError(f"output_dir {out} already holds a run ({', '.join(found)}); "
                         f"continue it with --resume or replace it with --overwrite")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _take_lock(out: Path) -> Path:
    """Create the lock file exclusively; take over a stale lock (its process is gone)."""
    path, me = out / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                path.unlink(missing_ok=True)  # stale: its run died without releasing it
                continue
            if not owner:  # being written this instant by another process, or torn: retry once
                import time

                time.sleep(0.2)
                continue
            raise InputError(f"output_dir {out} is in use by another run (pid {pid} on {host}; lock file "
                             f"{path}; remove it if that run is gone)") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise InputError(f"output_dir {out}: cannot take the lock {path} (remove it if no run is using the directory)")


def _clean(out: Path) -> list[str]:
    """Remove temporaries of crashed writes and policy files no checkpoint names."""
    removed = [p for p in out.glob(".*.tmp*") if p.is_file()]
    named = None
    if (out / "checkpoint.pt").is_file():
        from unigrpo.utils.checkpoint import pointed_policy

        named = pointed_policy(out)
    removed += [p for p in out.glob("policy_step*.safetensors") if named is not None and p.name != named]
    for p in removed:
        p.unlink(missing_ok=True)
    return [p.name for p in removed]


def _remove_run(out: Path) -> None:
    """--overwrite: the old run's files go, so nothing of it mixes with the new one."""
    for name in (*RUN_FILES, *[p.name for p in out.glob("policy_step*.safetensors")]):
        (out / name).unlink(missing_ok=True)
    for name in ("tb", "grids"):
        shutil.rmtree(out / name, ignore_errors=True)


class RunDir:
    """The open run directory: holds the lock, knows the last step done and the last one saved
    (for the one-line message of an interrupted run)."""

    def __init__(self, out: Path, lock: Path | None, start_step: int):
        self.out, self.lock = out, lock
        self.step = self.saved_step = start_step

    def close(self) -> None:
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.close()
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            raise Interrupted(f"interrupted at step {self.step}; the last checkpoint (step {self.saved_step}) "
                              f"is intact" if self.saved_step else
                              f"interrupted at step {self.step}; no checkpoint was written yet") from None


def open_run(out: Path, ranks, resume: bool, overwrite: bool, start_step: int) -> RunDir:
    """Take the directory for this run (rank 0 writes; every rank gets the same outcome)."""
    from unigrpo.utils import dist

    error, lock = None, None
    if ranks.is_main:
        try:
            check_output_dir(out, resume, overwrite)
            out.mkdir(parents=True, exist_ok=True)
            lock = _take_lock(out)
            if overwrite:
                _remove_run(out)
            removed = _clean(out)
            if removed:
                print(f"[unigrpo] removed leftovers of an interrupted write: {', '.join(removed)}", flush=True)
        except (InputError, OSError) as e:
            error = e
    if dist.any_flag(error is not None, ranks):
        if lock is not None:
            lock.unlink(missing_ok=True)
        if error is not None:
            raise error if isinstance(error, InputError) else InputError(f"output_dir {out}: {error}")
        raise InputError(f"rank {ranks.rank}: rank 0 could not open output_dir {out}")
    return RunDir(out, lock, start_step)
