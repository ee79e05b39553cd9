"""The errors a user sees, and the exit code of each (docs/reliability.md, "Exit codes").

``cli.main`` prints every one of them as ONE line, ``unigrpo: MESSAGE``, and exits with its code:
2 for bad input (config, files, checkpoints, directories), 1 for a run that failed (a reward that
raised, a rank that stopped responding), 130 for Ctrl-C. ``--debug`` / ``UNIGRPO_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "InputError", "Interrupted", "RankTimeout", "RewardError", "RunError"]


class InputError(Exception):
    """Bad input the user can fix (exit 2): the message names the file / key / directory."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint that cannot be trusted: unreadable, wrong format, bad hash, non-finite, wrong shapes."""


class RunError(Exception):
    """A run that failed after it started (exit 1)."""

    exit_code = 1


class RewardError(RunError):
    """A reward callable raised; the message names the reward."""


class RankTimeout(RunError):
    """A collective timed out: some rank stopped responding; the message names it."""


class Interrupted(RunError):
    """Ctrl-C during a run; the message says which step and which checkpoint is intact (exit 130)."""

    exit_code = 130
