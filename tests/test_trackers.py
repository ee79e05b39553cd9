"""Trackers (config ``logging``): a RunLogger sends scalars, the config and grids to wandb (offline)
and trackio (local), a resume (``append``) continues the same tracker run, and metrics.jsonl is the
same with or without trackers. Nothing leaves the machine (WANDB_MODE=offline, HF_HUB_OFFLINE=1)."""

import json
import math
import sqlite3
import struct
import time
from pathlib import Path

import pytest

from unigrpo.config import LoggingConfig, load_config, to_dict
from unigrpo.utils.images import save_grid
from unigrpo.utils.logging import RunLogger


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb_cfg",
                 "WANDB_CACHE_DIR": tmp_path / "wandb_cache", "WANDB_DATA_DIR": tmp_path / "wandb_data",
                 "TRACKIO_DIR": tmp_path / "trackio", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, str(v))
    return tmp_path


def trackio_home() -> Path:
    """Where trackio writes: its TRACKIO_DIR is read once, at its first import in this process (an
    earlier test may have set it), so each test also logs to a project of its own."""
    return Path(pytest.importorskip("trackio.utils").TRACKIO_DIR)


def grid(path: Path) -> Path:
    import torch

    save_grid(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), path, nrow=2, scale=1)
    return path


def run(out: Path, trackers, steps, start=0, append=False):
    """A training run's logging calls: metrics per step, an evaluation grid at the last step."""
    cfg = load_config(None, [])
    cfg.logging = trackers or cfg.logging
    log = RunLogger(out, True, steps[-1], start, append=append, trackers=trackers, config=to_dict(cfg))
    for s in steps:
        log.log(s, {"reward/mean": 0.1 * s, "loss/text/pg_loss": float("nan") if s == 2 else -0.01 * s})
    log.log_image(steps[-1], "grids/eval", grid(out / "grids" / f"eval_step{steps[-1]:06d}.png"), caption="eval")
    log.log_image(steps[-1], "grids/rollout", out / "grids" / "never_written.png")  # no such grid: nothing
    log.close()


def wandb_records(path: Path):
    """The records of a wandb offline file (a LevelDB-style log: 32 KiB blocks, 7-byte record
    headers, after wandb's 7-byte file header), parsed with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, parts = path.read_bytes(), 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def wandb_history(run_dir: Path) -> tuple[dict[int, dict], dict]:
    """{step: logged row}, config. Waits for the run's exit record: wandb's service process may
    still be writing the file when ``finish()`` returns."""
    path = next(run_dir.glob("run-*.wandb"))
    for _ in range(300):
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
            break
        time.sleep(0.1)
    steps, config = {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {("/".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json) for i in rec.history.item}
            steps[row["_step"]] = row
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({u.key: json.loads(u.value_json) for u in items})
    return steps, config


def test_wandb_offline_logs_scalars_config_images_and_resumes_the_same_run(offline):
    pytest.importorskip("wandb")
    out = offline / "run"
    run(out, LoggingConfig(wandb=True), [1, 2])
    state = json.loads((out / "trackers.json").read_text())
    first = sorted((out / "wandb").glob(f"offline-run-*-{state['run_id']}"))
    assert len(first) == 1
    steps, config = wandb_history(first[0])
    assert steps[1]["reward/mean"] == pytest.approx(0.1) and steps[2]["reward/mean"] == pytest.approx(0.2)
    assert math.isnan(steps[2]["loss/text/pg_loss"])  # a non-finite value arrives as NaN
    assert steps[2]["grids/eval/_type"] == "image-file" and steps[2]["grids/eval/caption"] == "eval"
    assert not any(k.startswith("grids/rollout") for k in steps[2])
    assert config["logging"]["wandb"] is True and config["algo"]["group_size"] > 0
    # --resume: the same run id (wandb joins the offline directories at `wandb sync`)
    run(out, LoggingConfig(wandb=True), [3], start=2, append=True)
    assert json.loads((out / "trackers.json").read_text())["run_id"] == state["run_id"]
    dirs = sorted((out / "wandb").glob(f"offline-run-*-{state['run_id']}*"))
    assert len(dirs) == 2 and len(list((out / "wandb").glob("offline-run-*"))) == 2
    steps, _ = wandb_history(next(d for d in dirs if d != first[0]))
    assert list(steps) == [3] and steps[3]["reward/mean"] == pytest.approx(0.3)


def test_trackio_logs_locally_and_resumes_the_same_run(offline):
    pytest.importorskip("trackio")
    out, home, project = offline / "run", trackio_home(), offline.name
    run(out, LoggingConfig(trackio=True, run_name="exp", project=project), [1, 2])
    run(out, LoggingConfig(trackio=True, run_name="renamed", project=project), [3], start=2, append=True)  # keeps its first name
    run_id = json.loads((out / "trackers.json").read_text())["run_id"]
    db = sqlite3.connect(home / f"{project}.db")
    rows = db.execute("select run_id, run_name, step, metrics from metrics order by id").fetchall()
    assert {r[1] for r in rows} == {f"exp-{run_id}"} and len({r[0] for r in rows}) == 1  # one run, resumed
    scalars = {r[2]: json.loads(r[3]) for r in rows if "reward/mean" in json.loads(r[3])}
    assert sorted(scalars) == [1, 2, 3] and scalars[3]["reward/mean"] == pytest.approx(0.3)
    images = [json.loads(r[3])["grids/eval"] for r in rows if "grids/eval" in json.loads(r[3])]
    assert len(images) == 2 and all((home / "media" / im["file_path"]).is_file() for im in images)
    config = json.loads(db.execute("select config from configs").fetchall()[-1][0])
    assert config["logging"]["trackio"] is True and "algo" in config


def test_metrics_jsonl_is_the_same_with_trackers_and_off_rank_nothing_opens(offline):
    pytest.importorskip("trackio")
    run(offline / "plain", None, [1, 2])
    run(offline / "tracked", LoggingConfig(trackio=True), [1, 2])
    assert (offline / "plain" / "metrics.jsonl").read_text() == (offline / "tracked" / "metrics.jsonl").read_text()
    off = RunLogger(offline / "rank1", False, 2, trackers=LoggingConfig(trackio=True, wandb=True))
    off.log(1, {"x": 1.0})
    off.close()
    assert not (offline / "rank1").exists()


def test_a_missing_extra_is_a_one_line_error(offline, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"logging.wandb: needs the 'wandb' extra: pip install 'unigrpo\[wandb\]'"):
        RunLogger(offline / "run", True, 2, trackers=LoggingConfig(wandb=True))
    assert not (offline / "run" / "trackers.json").exists() and not (offline / "run" / "metrics.jsonl").exists()
