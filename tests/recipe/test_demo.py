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


def test_the_edit_and_multi_round_demos_write_their_reports(tmp_path, capsys, monkeypatch):
    """The demo asks the task what to evaluate and tabulate (``demo_evaluate`` / ``demo_tables``):
    the edit task's input | output tables, the multi-round task's accuracy after each round."""
    from testkit import save_tiny_random_model

    seeing = ["model.sees_images=true", "model.edits=true"]
    ckpt = save_tiny_random_model(MODEL + seeing, tmp_path / "seeing.safetensors")
    sizes = [s for s in SIZES if not s.startswith(("rewards=", "task.prompt_pool"))]
    common = [*MODEL, *seeing, *sizes, "steps=1", f"model.checkpoint={ckpt}", "eval_every=0", "save_every=0"]
    edit = tmp_path / "edit"
    assert main(["demo", *common, "task.kind=shapes_edit", "task.image_size=16", "text.max_reasoning_tokens=30",
                 "rewards=[{name: shapes_edit}]", f"output_dir={edit}"]) == 0
    text = capsys.readouterr().out
    assert "Strict edit accuracy" in text and "Untouched objects preserved" in text
    assert "input seen right" in (edit / "report.md").read_text() and (edit / "eval" / "after.png").is_file()
    rounds = tmp_path / "rounds"
    assert main(["demo", *common, "task.kind=shapes_refine", "algo.rounds=2", "model.max_seq_len=64",
                 f"output_dir={rounds}"]) == 0
    report = (rounds / "report.md").read_text()
    assert "after round 1 | after round 2 | fix rate" in report and (rounds / "eval" / "after.png").is_file()
    assert "round 2: `" in (rounds / "eval" / "after.md").read_text()
