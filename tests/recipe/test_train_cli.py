"""A few real `unigrpo train` steps in-process on the tiny random model: outputs, finiteness, the
ratio == 1 health invariant, documented metrics, resume equivalence, and the shipped configs."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import MODEL, SIZES, tiny_overrides
from safetensors.torch import load_file
from testkit import documented_metric_patterns

from unigrpo.cli import main


def read_metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl (strict JSON: a non-finite value is null + listed under "nonfinite";
    read back as NaN here)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.update({k: math.nan for k in r.pop("nonfinite", [])})
    return rows


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # eval.at_start: the step-0 evaluation is part of the curve (and of the documented keys)
    assert main(["train", *tiny_overrides(tiny_checkpoint, out, "eval.at_start=true", "reward_workers=1")]) == 0
    return out


def test_cli_steps_change_parameters_and_write_outputs(run, tiny_checkpoint):
    before, after = load_file(tiny_checkpoint), load_file(run / "final.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("text.") for k in changed) and any(k.startswith("image.") for k in changed)
    rows = read_metrics(run)
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert any("eval/accuracy" in r and r["step"] == 0 for r in rows)
    for r in rows:
        bad = {k: v for k, v in r.items() if not math.isfinite(v)}
        # NaN by definition when no evaluation prompt has that check / of that kind (2 prompts here)
        assert set(bad) <= {"eval/color_ok", "eval/relation_ok", "eval/accuracy_reasoning",
                            "eval/score_reasoning", "eval/accuracy_direct", "eval/score_direct",
                            "eval/reasoning_ok_reasoning", "eval/reasoning_ok_direct",
                            "eval/accuracy_given_reasoning_ok"}, bad  # the last: no right description
    assert all(r["perf/skipped_updates"] == 0 for r in steps)
    assert all(r["loss/text/grad_norm"] > 0 and r["loss/image/grad_norm"] > 0 for r in steps)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "grids" / "eval_step000002.png").stat().st_size > 0
    assert (run / "grids" / "rollout_step000002.png").stat().st_size > 0
    assert (run / "checkpoint.pt").is_file() and (run / "reference.pt").is_file()


def test_first_minibatch_ratio_is_exactly_one(run):
    """Rollout scoring and the first update compute the same thing: log-probs bit-identical."""
    for r in (r for r in read_metrics(run) if "reward/mean" in r):
        assert r["loss/text/first_logp_diff_max"] == 0.0
        assert r["loss/image/first_logp_diff_max"] == 0.0
        assert r["loss/text/logp_diff_max"] > 0.0  # later minibatches did move (not a vacuous 0)


def test_every_logged_key_is_documented(run):
    pats = documented_metric_patterns()
    keys = {k for r in read_metrics(run) for k in r if k != "step"}
    undocumented = sorted(k for k in keys if not any(p.match(k) for p in pats))
    assert not undocumented, f"add these to docs/metrics.md: {undocumented}"
    namespaces = {k.split("/")[0] for k in keys}
    assert namespaces == {"rollout", "reward", "loss", "perf", "eval"}


def test_resume_equals_uninterrupted(tiny_checkpoint, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *tiny_overrides(tiny_checkpoint, full, "steps=4", "eval_every=100")]) == 0
    assert main(["train", *tiny_overrides(tiny_checkpoint, part, "steps=2", "eval_every=100")]) == 0
    with open(part / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "reward/mean": -1.0}) + "\n")
    assert main(["train", *tiny_overrides(tiny_checkpoint, part, "steps=4", "eval_every=100"), "--resume"]) == 0
    a, b = load_file(full / "final.safetensors"), load_file(part / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [r for r in read_metrics(full) if "reward/mean" in r]
    mb = [r for r in read_metrics(part) if "reward/mean" in r]
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):  # same rewards, losses and statistics; only timings differ
        assert {k: v for k, v in ra.items() if not k.startswith("perf/")} == \
               {k: v for k, v in rb.items() if not k.startswith("perf/")}


def test_resume_without_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


@pytest.mark.parametrize("name, text, image, reference", [
    ("unigrpo", True, True, True), ("flowgrpo", False, True, True), ("textgrpo", True, False, False),
    ("unigrpo_cfg", True, True, True), ("unigrpo_kl", True, True, True), ("unigrpo_noreg", True, True, False)])
def test_baseline_configs_run(name, text, image, reference, tiny_checkpoint, tmp_path):
    """Each shipped baseline / ablation (docs/training.md, "Baselines and ablations") validates and
    runs one tiny step with its own objective."""
    config = f"builtin:{name}"
    assert main(["validate", config]) == 0
    args = [*MODEL, *SIZES, "steps=1", "eval_every=100", f"model.checkpoint={tiny_checkpoint}", f"output_dir={tmp_path}"]
    assert main(["train", config, *args]) == 0
    row = read_metrics(tmp_path)[0]
    assert all(math.isfinite(v) for v in row.values())
    assert ("loss/text/loss" in row) == text and ("loss/image/loss" in row) == image
    assert (tmp_path / "reference.pt").is_file() == reference
    if name == "flowgrpo":
        assert row["loss/image/kl"] > 0  # CFG + latent KL active from the first update on


def test_thinking_off_needs_a_frozen_text_policy(tiny_checkpoint, tmp_path, capsys):
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, "text.thinking=false")]) == 2
    assert "text.thinking" in capsys.readouterr().err
    # the image-only baseline without reasoning (prompt -> image) is a valid run
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, "text.thinking=false", "algo.train_text=false",
                                          "steps=1", "eval_every=100")]) == 0


def test_evaluation_and_reward_threads_do_not_change_training(run, tiny_checkpoint, tmp_path):
    """Evaluation draws from its own generator and the reward thread only reorders work: a run with
    no evaluation at all and inline rewards trains bitwise the same parameters as `run`."""
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, "eval_every=0", "eval.at_start=false",
                                          "reward_workers=0")]) == 0
    a, b = load_file(run / "final.safetensors"), load_file(tmp_path / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("eval/accuracy" in r for r in read_metrics(tmp_path) if r["step"] < 2)
