#!/usr/bin/env bash
# The README's test command: sets up ./.venv if needed, then runs the test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
exec python -m pytest "$@"
