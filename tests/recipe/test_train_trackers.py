"""A tiny CLI run logs to wandb (offline) and trackio (local); --resume continues the same tracker runs."""

import json
import sqlite3

import pytest
from conftest import tiny_overrides
from test_trackers import offline, trackio_home, wandb_history  # noqa: F401 -- the fixture and the reader (tests/ is on sys.path)

from unigrpo.cli import main


def test_cli_run_logs_to_wandb_and_trackio_and_resume_continues_them(tiny_checkpoint, offline):  # noqa: F811
    pytest.importorskip("wandb")
    pytest.importorskip("trackio")
    out, home, project = offline / "run", trackio_home(), offline.name
    args = [*tiny_overrides(tiny_checkpoint, out, "eval_every=2", "save_every=1", "logging.wandb=true",
                            "logging.trackio=true", f"logging.project={project}")]
    assert main(["train", *args, "steps=2"]) == 0
    assert main(["train", *args, "steps=3", "--resume"]) == 0
    run_id = json.loads((out / "trackers.json").read_text())["run_id"]
    dirs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(dirs) == 2
    first, _ = wandb_history(dirs[0])
    second, config = wandb_history(dirs[1])
    lines = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "reward/mean" in r}
    assert sorted(first) == [1, 2] and sorted(second) == [3]
    assert first[2]["reward/mean"] == pytest.approx(lines[2]["reward/mean"])
    assert second[3]["reward/mean"] == pytest.approx(lines[3]["reward/mean"])
    assert first[2]["grids/eval/_type"] == "image-file" and first[2]["grids/rollout/_type"] == "image-file"
    assert config["logging"]["wandb"] is True
    db = sqlite3.connect(home / f"{project}.db")
    rows = db.execute("select run_name, step, metrics from metrics").fetchall()
    assert {r[0] for r in rows} == {f"run-{run_id}"}
    assert sorted({r[1] for r in rows if "reward/mean" in json.loads(r[2])}) == [1, 2, 3]
