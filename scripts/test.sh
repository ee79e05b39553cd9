#!/usr/bin/env bash
# The README's test command: sets up ./.venv if needed, runs ruff (lint must pass), then the test
# suite; arguments go to pytest (e.g. `bash scripts/test.sh -q tests/test_cli.py`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
ruff check src tests benchmarks
exec python -m pytest "$@"
