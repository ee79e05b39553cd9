"""`unigrpo demo` end to end on a tiny random checkpoint: before/after table, report, curve, grids."""

from pathlib import Path

from conftest import MODEL, SIZES

from unigrpo.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_demo_writes_report(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo config path is relative to the repository root
    out = tmp_path / "demo"
    sizes = [s for s in SIZES if not s.startswith("rewards=")]  # the demo's own (shapes) reward
    assert main(["demo", *MODEL, *sizes, f"model.checkpoint={tiny_checkpoint}", f"output_dir={out}",
                 "eval_every=0", "save_every=0", "eval.split=val"]) == 0
    text = capsys.readouterr().out
    assert "SFT (before)" in text and "(after)" in text
    report = (out / "report.md").read_text()
    assert "reward_curve.png" in report and "eval/after.png" in report
    for name in ("reward_curve.png", "eval/before.png", "eval/after.png", "eval/after.json"):
        assert (out / name).is_file(), name
