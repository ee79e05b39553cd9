"""Regenerates docs/results.md's numbers: runs the claims suite and the reward-hacking experiment
(or re-reads finished runs), then rewrites the tables between the ``<!-- name -->`` /
``<!-- /name -->`` markers of docs/results.md and the figures under docs/assets/. The prose around
the tables (the reading of each claim) is written by hand against these numbers.

    python benchmarks/results.py                  # everything: ~3 h on one CPU core, ~1.7 h with --parallel 2
    python benchmarks/results.py --parallel 2
    python benchmarks/results.py --collect-only   # re-read runs/claims and runs/reward_hacking
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "results.md"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between ``<!-- name -->`` and ``<!-- /name -->`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n)(?:.*?\n)?(<!-- /{re.escape(name)} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: no <!-- {name} --> ... <!-- /{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body.strip("\n") + "\n" + m.group(2), text, count=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args()
    extra = ["--collect-only"] if args.collect_only else ["--parallel", str(args.parallel)]
    for script in ("claims.py", "reward_hacking.py"):
        subprocess.run([sys.executable, str(HERE / script), *extra], check=True)
    text = DOC.read_text()
    for name in ("claims", "reward_hacking"):
        md = (HERE / "results" / f"{name}.md").read_text()
        text = replace_section(text, name, md.split("\n", 2)[2])  # drop the command line and blank line
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
