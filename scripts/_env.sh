#!/usr/bin/env bash
# Creates ./.venv once and (re)installs unigrpo[dev] only when pyproject/constraints change.
# Sourced by scripts/demo.sh and scripts/test.sh; idempotent and quick on a second run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNIGRPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.unigrpo-installed"
# Hash with Python (sha256sum is not on every OS): re-install only when these files change.
WANT="$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(b"".join(open(f,"rb").read() for f in sys.argv[1:])).hexdigest())' "$ROOT/pyproject.toml" "$ROOT/constraints-dev.txt")"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing unigrpo[dev] (torch pinned by constraints-dev.txt)" >&2
  "$VENV/bin/python" -m pip install -q --no-warn-script-location --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q --no-warn-script-location -c "$ROOT/constraints-dev.txt" torch==2.13.0 >&2
  "$VENV/bin/python" -m pip install -q --no-warn-script-location -c "$ROOT/constraints-dev.txt" -e "$ROOT[dev]" >&2
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
