#!/usr/bin/env bash
# The README's main command: sets up ./.venv if needed, then runs the built-in demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
exec unigrpo demo "$@"
