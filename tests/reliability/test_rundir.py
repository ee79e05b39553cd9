"""Run directories and resume semantics, in-process (issue 13, findings 1, 2, 3, 8):
a new run refuses an existing run, a live lock refuses a second run, a failed start-up writes
nothing, a resume applies a new learning rate (and refuses what it may not change), leftovers of
a crashed write are cleaned, final.safetensors is at the checkpoint's step, metrics survive a torn
line."""

import json
import os
import socket

import pytest
import torch
from reliability_helpers import MODEL, SIZES, overrides, run_cli
from safetensors import safe_open

from unigrpo.cli import main
from unigrpo.utils.rundir import LOCK


@pytest.fixture(scope="module")
def done(tiny_ckpt, tmp_path_factory):
    """A finished 2-step run (checkpoint every step)."""
    out = tmp_path_factory.mktemp("done")
    assert main(["train", *overrides(tiny_ckpt, out, "save_every=1")]) == 0
    return out


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_new_run_refuses_a_directory_holding_a_run(done, tiny_ckpt, capsys):
    before = snapshot(done)
    code, lines = run_cli(["train", *overrides(tiny_ckpt, done)], capsys)
    assert code == 2 and len(lines) == 1 and "already holds a run" in lines[0] and "--overwrite" in lines[0]
    assert snapshot(done) == before  # nothing overwritten


def test_failed_start_up_leaves_the_directory_as_it_was(done, tmp_path, capsys):
    """--overwrite with a model that fails to load: reference.pt (and everything else) untouched,
    so a later --resume of the original run regularises against the right reference."""
    before = snapshot(done)
    code, _ = run_cli(["train", *overrides(str(tmp_path / "missing.safetensors"), done), "--overwrite"], capsys)
    assert code == 2 and snapshot(done) == before


def test_overwrite_replaces_the_run(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", *overrides(tiny_ckpt, out, "steps=2")]) == 0
    (out / "tb" / "old_marker").write_text("x")
    assert main(["train", *overrides(tiny_ckpt, out, "steps=1"), "--overwrite"]) == 0
    assert {json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()} == {1}
    assert not (out / "tb" / "old_marker").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1


def test_a_live_lock_refuses_and_a_stale_lock_is_taken_over(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "l"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive
    code, lines = run_cli(["train", *overrides(tiny_ckpt, out, "steps=1")], capsys)
    assert code == 2 and len(lines) == 1 and "in use by another run" in lines[0] and str(os.getppid()) in lines[0]
    dead = 2 ** 22 + 12345  # above pid_max's default range: no such process
    (out / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    assert main(["train", *overrides(tiny_ckpt, out, "steps=1")]) == 0
    assert not (out / LOCK).exists()  # released at the end


def test_resume_applies_a_changed_learning_rate(tiny_ckpt, tmp_path, capsys):
    """Before: AdamW's load_state_dict restored the saved lr, while the saved config claimed the new one."""
    out = tmp_path / "lr"
    assert main(["train", *overrides(tiny_ckpt, out, "steps=2")]) == 0
    assert main(["train", *overrides(tiny_ckpt, out, "steps=3", "optim.lr_text=1e-4"), "--resume"]) == 0
    assert "optim.lr_text 0.001 -> 0.0001" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs == {"text": 1e-4, "image": 1e-3} and state["config"]["optim"]["lr_text"] == 1e-4
    assert state["extra"]["resumes"][-1]["changes"] == {"optim.lr_text": [1e-3, 1e-4], "steps": [2, 3]}


def test_resume_refuses_keys_it_may_not_change_and_fewer_steps(done, tiny_ckpt, capsys):
    before = snapshot(done)
    code, lines = run_cli(["train", *overrides(tiny_ckpt, done, "steps=3", "algo.group_size=2",
                                              "algo.trajectories_per_minibatch=2", "algo.micro_batch_trajectories=2"),
                           "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "algo.group_size" in lines[0] and "cannot change on --resume" in lines[0]
    code, lines = run_cli(["train", *overrides(tiny_ckpt, done, "steps=1"), "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "2 steps done" in lines[0] and "cannot undo" in lines[0]
    assert snapshot(done) == before
    # steps == done: a finished run; resuming it is a no-op that says so (exit 0), so "--resume after
    # a crash" works even when the crash came after the last save (found by the kill -9 trials)
    assert main(["train", *overrides(tiny_ckpt, done, "steps=2"), "--resume"]) == 0
    assert "is complete (2 of 2 steps); nothing to do" in capsys.readouterr().out
    assert snapshot(done) == before


def test_orphans_removed_final_at_checkpoint_step_torn_metrics_line(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "f"
    assert main(["train", *overrides(tiny_ckpt, out, "steps=2", "save_every=1")]) == 0
    with safe_open(str(out / "final.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["rl_step"]) == 2
    (out / ".checkpoint.pt.tmp99999").write_bytes(b"half")  # a crash mid-write
    (out / "policy_step000003.safetensors").write_bytes(b"never pointed to")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # torn by a crash
    assert main(["train", *overrides(tiny_ckpt, out, "steps=3", "save_every=1"), "--resume"]) == 0
    assert "dropped a torn last line" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert ".checkpoint.pt.tmp99999" not in names and names.count("policy_step000003.safetensors") == 1
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]
    with safe_open(str(out / "final.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["rl_step"]) == 3


def test_a_tampered_policy_file_is_refused_on_resume(tiny_ckpt, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "h"
    assert main(["train", *overrides(tiny_ckpt, out, "steps=1")]) == 0
    policy = next(out.glob("policy_step*.safetensors"))
    with safe_open(str(policy), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(policy))
    k = min(state)
    state[k] = state[k] + 1e-3
    save_file(state, str(policy), metadata=meta)
    code, lines = run_cli(["train", *overrides(tiny_ckpt, out, "steps=2"), "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "content hash does not match" in lines[0] and policy.name in lines[0]


def test_a_tampered_reference_is_refused_on_resume(tiny_ckpt, tmp_path, capsys):
    """reference.pt carries the sha256 of its tensors too: an altered one is one line, exit 2."""
    import torch

    out = tmp_path / "r"
    assert main(["train", *overrides(tiny_ckpt, out, "steps=1")]) == 0
    saved = torch.load(out / "reference.pt", weights_only=True)
    assert len(saved["sha256"]) == 64
    k = min(saved["model"])
    saved["model"][k] = saved["model"][k] + 1e-3
    torch.save(saved, out / "reference.pt")
    code, lines = run_cli(["train", *overrides(tiny_ckpt, out, "steps=2"), "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "reference.pt: content hash does not match" in lines[0], lines


def test_demo_twice_in_a_row(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """`bash scripts/demo.sh` twice: the demo replaces its previous run itself, and says so."""
    monkeypatch.chdir(tmp_path)
    sizes = [s for s in SIZES if not s.startswith(("rewards=", "steps="))]
    args = ["demo", *MODEL, *sizes, "steps=1", f"model.checkpoint={tiny_ckpt}", f"output_dir={tmp_path / 'demo'}",
            "eval_every=0", "save_every=0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "holds a previous demo run: replacing it" in capsys.readouterr().out


def test_tensorboard_does_not_get_a_step_twice_after_a_resume(tmp_path):
    """Steps 2-3 logged after the checkpoint (step 1), then a crash: the resumed run logs them again."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unigrpo.utils.logging import RunLogger

    first = RunLogger(tmp_path, True, 3)
    for step in (1, 2, 3):
        first.log(step, {"reward/mean": float(step)})
    first.close()
    resumed = RunLogger(tmp_path, True, 3, start_step=1, append=True)
    for step in (2, 3):
        resumed.log(step, {"reward/mean": 10.0 * step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_tensorboard_gets_every_key_of_a_step_from_one_event(tmp_path):
    """RunLogger writes a step's scalars as one event (not one per key): TensorBoard reads back every
    key at its step with its value, as it did from add_scalar's per-key events."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unigrpo.utils.logging import RunLogger

    log = RunLogger(tmp_path, True, 2)
    rows = {1: {"reward/mean": 0.25, "loss/image/pg_loss": -1.5, "perf/step_s": 3.0},
            2: {"reward/mean": 0.5, "loss/image/pg_loss": 2.0, "perf/step_s": 0.125}}
    for step, metrics in rows.items():
        log.log(step, metrics)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(rows[1])
    for key in rows[1]:
        assert [(e.step, e.value) for e in acc.Scalars(key)] == [(s, rows[s][key]) for s in rows]


def test_resume_key_policy_for_reward_terms():
    """Where a remote reward is served may change on resume; which reward, its weight, a judge's
    model or an added term may not."""
    from unigrpo.config import ConfigError
    from unigrpo.utils.resume import plan

    def cfg(steps=3, **kwargs):
        return {"steps": steps, "rewards": [{"name": "judge", "weight": 1.0, "kwargs": {"url": "http://a", **kwargs}}]}

    assert plan(cfg(2), cfg(3, url="http://b", timeout_s=5.0), 2) == {
        "rewards[0].kwargs.url": ("http://a", "http://b"), "rewards[0].kwargs.timeout_s": (None, 5.0),
        "steps": (2, 3)}
    with pytest.raises(ConfigError, match=r"^rewards\[0\].kwargs.model: cannot change on --resume"):
        plan(cfg(2), cfg(3, model="other"), 2)
    more = cfg(3)
    more["rewards"].append({"name": "shapes", "weight": 0.5, "kwargs": {}})
    with pytest.raises(ConfigError, match=r"^rewards\[1\].name"):
        plan(cfg(2), more, 2)
