"""`python crash_run.py ARGS...`: ``unigrpo.cli.main(ARGS)`` that SIGKILLs itself at the N-th
``os.replace`` (``UNIGRPO_TEST_KILL_AT_REPLACE=N``): inside a checkpoint save, after a temporary
file is complete and before it becomes visible -- the worst moment for a save (test-only)."""

import os
import signal
import sys

from unigrpo.cli import main

N = int(os.environ.get("UNIGRPO_TEST_KILL_AT_REPLACE", "0"))
_real, _calls = os.replace, [0]


def _replace(src, dst, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == N:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(src, dst, *args, **kwargs)


os.replace = _replace
sys.exit(main(sys.argv[1:]))
