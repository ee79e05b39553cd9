"""benchmarks/demo_seeds.py: per-seed collection and the gain arithmetic of its table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # demo_seeds imports its run helpers from compare_policies beside it
_spec = importlib.util.spec_from_file_location("demo_seeds", _BENCH / "demo_seeds.py")
demo_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_seeds)


def _write_run(root: Path, seed: int, accs: dict[int, float]) -> None:
    out = root / f"seed{seed}"
    out.mkdir(parents=True)
    rows = [{"step": 1, "reward/mean": 0.5}]  # a training row without evaluation is ignored
    rows += [{"step": s, "eval/accuracy": a, "eval/reasoning_ok": 0.9} for s, a in accs.items()]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_keeps_common_steps_and_table_gains(tmp_path):
    _write_run(tmp_path, 0, {0: 0.50, 10: 0.60, 20: 0.70})
    _write_run(tmp_path, 1, {0: 0.50, 10: 0.80})  # stopped before step 20
    evals = demo_seeds.collect([0, 1], tmp_path)
    assert list(evals) == [0, 10]
    assert evals[10]["eval/accuracy"] == [0.60, 0.80]
    assert evals[10]["eval/high_freq"] == [None, None]  # absent key: shown as "-"
    row = next(line for line in demo_seeds.table([0, 1], evals).splitlines() if line.startswith("| 10 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "0.700 +- 0.141"  # mean and sample sd of 0.6, 0.8
    assert cells[4] == "+20.0 (+10.0..+30.0)"  # gains over step 0, in points
    assert cells[5] == "0.900" and cells[7] == "-"


def test_collect_names_a_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="seed3"):
        demo_seeds.collect([3], tmp_path)
