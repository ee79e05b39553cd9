"""Every user-facing failure is ONE line on stderr, ``unigrpo: ...`` naming the file / key / reward,
and a non-zero exit (2 bad input, 1 failed run, 130 Ctrl-C): a table of bad inputs through the
real CLI, in-process (issue 13, findings 4, 5, 6)."""

import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import overrides, run_cli
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def bad(tiny_ckpt, tmp_path_factory):
    """Broken model checkpoints, each named by what is wrong with it."""
    from safetensors import safe_open

    d = tmp_path_factory.mktemp("bad")
    raw = Path(tiny_ckpt).read_bytes()
    with safe_open(tiny_ckpt, framework="pt") as f:
        hashed = f.metadata()
    meta = {k: v for k, v in hashed.items() if k != "sha256"}  # no hash (an older file): the checks after it
    state = load_file(tiny_ckpt)
    files = {"truncated": raw[: len(raw) // 2], "garbage": bytes(range(256)) * 40, "empty": b""}
    for name, data in files.items():
        (d / f"{name}.safetensors").write_bytes(data)
    torch.save({"weights": torch.ones(2)}, d / "torch_pickle.safetensors")
    save_file(state, str(d / "no_metadata.safetensors"))  # e.g. a policy_step*.safetensors file
    first = min(state)
    save_file({**state, first: torch.zeros(3, 3)}, str(d / "wrong_shape.safetensors"), metadata=meta)
    nan = {k: v.clone() for k, v in state.items()}
    nan[first].view(-1)[0] = float("nan")
    save_file(nan, str(d / "nan.safetensors"), metadata=meta)
    save_file({**state, first: state[first] + 1}, str(d / "altered.safetensors"), metadata=hashed)
    return d


CHECKPOINT_CASES = [("truncated", "not a readable safetensors"), ("garbage", "not a readable safetensors"),
                    ("empty", "not a readable safetensors"), ("torch_pickle", "not a readable safetensors"),
                    ("no_metadata", "not a tiny-model checkpoint"), ("wrong_shape", "has shape"),
                    ("nan", "NaN/inf"), ("altered", "content hash does not match")]


def assert_one_line(code, lines, want_code, *needles):
    assert code == want_code, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("unigrpo: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("name, needle", CHECKPOINT_CASES)
def test_bad_checkpoint_is_one_line_for_eval_sample_and_train(name, needle, bad, tmp_path, capsys):
    path = str(bad / f"{name}.safetensors")
    assert_one_line(*run_cli(["eval", "--checkpoint", path, "eval.num_prompts=1"], capsys), 2, path, needle)
    assert_one_line(*run_cli(["sample", "a red circle", "--checkpoint", path, "--out", str(tmp_path / "s.png")],
                             capsys), 2, path, needle)
    assert not (tmp_path / "s.png").exists()  # no black PNG from NaN weights
    out = tmp_path / "run"
    assert_one_line(*run_cli(["train", *overrides(path, out)], capsys), 2, path, needle)
    assert not out.exists()  # nothing written by a run that failed during start-up


@pytest.mark.parametrize("override, key", [
    ("optim.lr_text=-1e-3", "optim.lr_text"), ("optim.lr_image=-1", "optim.lr_image"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("algo.adv_eps=-1e-4", "algo.adv_eps"), ("save_every=-1", "save_every"), ("eval_every=-2", "eval_every"),
    ("threads=-1", "threads"), ("text.max_reasoning_tokens=60", "text.max_reasoning_tokens"),
    ("rewards=[{name: shapes, weight: .nan}]", "rewards[0].weight"), ("optim.lr_text=.inf", "optim.lr_text"),
    ("rewards=[{name: 'no_such_module:fn'}]", "rewards[0].name"), ("rewards=[{name: nope}]", "rewards[0].name"),
    ("dist_timeout_s=0", "dist_timeout_s")])
def test_validate_rejects_impossible_values(override, key, capsys):
    assert_one_line(*run_cli(["validate", override], capsys), 2, key)


def test_reasoning_that_fits_the_context_is_valid(capsys):
    assert run_cli(["validate", "text.max_reasoning_tokens=45"], capsys)[0] == 0  # 19 + 45 = 64


def test_yaml_duplicate_key_and_syntax_error_name_the_line(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("steps: 3\nalgo:\n  group_size: 4\n  group_size: 8\n")
    assert_one_line(*run_cli(["validate", str(dup)], capsys), 2, "group_size", "duplicate", "line 4", str(dup))
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\nalgo: [1, 2\nseed: 1\n")
    assert_one_line(*run_cli(["validate", str(broken)], capsys), 2, str(broken), "line")


def test_run_failures_are_one_line(tiny_ckpt, tmp_path, capsys):
    # a reward plugin that raises: exit 1, the message names the reward (and stays one line)
    out = tmp_path / "r"
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, out, "rewards=[{name: 'faulty_reward:explodes'}]")],
                             capsys), 1, "faulty_reward:explodes", "RuntimeError")
    # an unknown reward name: before the model loads, nothing written
    out = tmp_path / "u"
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, out, "rewards=[{name: 'nope_mod:fn'}]")], capsys),
                    2, "rewards[0].name")
    assert not out.exists()
    # output_dir is a file
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, f)], capsys), 2, str(f), "not a directory")
    assert_one_line(*run_cli(["eval", "--out", str(f), "--checkpoint", tiny_ckpt], capsys), 2, str(f))
    # sample --out without .png
    assert_one_line(*run_cli(["sample", "a red circle", "--out", str(tmp_path / "x.jpg")], capsys), 2, "x.jpg")
    # a size key that the checkpoint does not have
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, tmp_path / "s", "model.d_text=64")], capsys), 2,
                    "model.d_text", "64", "32")
    # a truncated checkpoint.pt on resume
    out = tmp_path / "t"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, out), "--resume"], capsys), 2,
                    str(out / "checkpoint.pt"), "unreadable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only build")
def test_cuda_on_a_cpu_build_is_one_line(capsys):
    assert_one_line(*run_cli(["train", "device=cuda"], capsys), 2, "device", "CUDA")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_is_one_line(tiny_ckpt, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, ro / "run")], capsys), 2, "not writable")


def test_ctrl_c_is_one_line_naming_the_intact_checkpoint(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import unigrpo.recipes.train as T

    real, calls = T.ppo_epochs, []

    def interrupted_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "ppo_epochs", interrupted_in_step_3)
    out = tmp_path / "c"
    assert_one_line(*run_cli(["train", *overrides(tiny_ckpt, out, "steps=4", "save_every=1")], capsys), 130,
                    "interrupted at step 2; the last checkpoint (step 2) is intact")
    assert not list(out.glob(".*tmp*")) and not (out / ".unigrpo.lock").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def test_debug_shows_the_traceback(capsys):
    from unigrpo.cli import main
    from unigrpo.config import ConfigError

    with pytest.raises(ConfigError):
        main(["validate", "threads=-1", "--debug"])


def test_metrics_are_strict_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli(["train", *overrides(tiny_ckpt, out, "steps=1", "eval_every=1")], capsys)[0] == 0

    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    rows = [json.loads(ln, parse_constant=refuse) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    flagged = [r for r in rows if "nonfinite" in r]
    assert flagged and all(r[k] is None for r in flagged for k in r["nonfinite"])  # eval NaNs: 2 prompts
