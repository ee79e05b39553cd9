"""`unigrpo demo` end to end on a tiny random checkpoint: before/after table, report, curve, grids."""

import sys

from conftest import MODEL, SIZES

from unigrpo.cli import main


def test_demo_writes_report(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # builtin:demo is found from any directory
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


def test_demo_without_matplotlib_still_writes_the_report(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """matplotlib is the optional `viz` extra: a plain `pip install unigrpo` demo works, minus the curve."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "demo"
    sizes = [s for s in SIZES if not s.startswith("rewards=")]
    assert main(["demo", *MODEL, *sizes, "steps=1", f"model.checkpoint={tiny_checkpoint}", f"output_dir={out}",
                 "eval_every=0", "save_every=0", "eval.split=val"]) == 0
    assert "pip install 'unigrpo[viz]'" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "reward_curve.png" not in report and "eval/after.png" in report
    assert not (out / "reward_curve.png").exists()
