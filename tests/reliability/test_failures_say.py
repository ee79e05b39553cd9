"""Failures say what happened (issue 25, item 6): a full disk names the file and says "no space
left" (torch.save's own message is "enforce fail at inline_container.cc"); a run that skipped steps
under ``on_failure: skip`` ends with a line saying how many and which, and exits 1 above
``max_skipped_share``."""

import errno

import pytest
import torch
from reliability_helpers import overrides, run_cli

from unigrpo.utils import checkpoint
from unigrpo.utils.errors import RunError


def test_a_full_disk_names_the_file_and_says_no_space_left(tmp_path, monkeypatch):
    """torch.save into a full device (/dev/full) for the temporary; then a write that fails with
    ENOSPC under save_reference. The previous file stays, no temporary is left."""
    target = tmp_path / "reference.pt"
    target.write_bytes(b"the previous file")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: real_open(
        "/dev/full" if ".tmp" in str(path) and "w" in mode else path, mode, *a, **k))
    with pytest.raises(RunError, match=r"reference.pt: no space left on device") as e:
        checkpoint.atomic_torch_save({"w": torch.ones(100_000)}, target)
    assert "\n" not in str(e.value) and e.value.exit_code == 1
    monkeypatch.undo()
    assert target.read_bytes() == b"the previous file" and [p.name for p in tmp_path.iterdir()] == ["reference.pt"]

    def no_space(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_torch_save", lambda obj, path: checkpoint.atomic_save(no_space, path))
    with pytest.raises(RunError, match=r"reference.pt: no space left on device.*--resume"):
        checkpoint.save_reference(tmp_path, torch.nn.Linear(2, 2))


def test_skipped_steps_end_with_a_summary_and_exit_1_above_the_share(tiny_ckpt, tmp_path, capsys):
    args = ["train", *overrides(tiny_ckpt, tmp_path / "a", "rewards=[{name: 'faulty_reward:UnavailableFirst', kwargs: {calls: 1}}]")]
    code, lines = run_cli(args, capsys)
    assert code == 1 and lines[-1] == ("unigrpo: 1 of 2 steps skipped (rewards missing, on_failure=skip): step(s) 1: "
                                       "more than max_skipped_share=0.25; the run is saved, but check the reward service")
    assert (tmp_path / "a" / "final.safetensors").is_file()
    code, lines = run_cli([*args, "max_skipped_share=0.5", "--overwrite"], capsys)
    assert code == 0 and lines[-1] == "[unigrpo] 1 of 2 steps skipped (rewards missing, on_failure=skip): step(s) 1"


def test_a_build_time_error_naming_a_config_key_is_bad_input():
    """An adapter refuses a key only when the model is built (e.g. ``model.hidden_layers`` the LM
    lacks): exit 2 like any config error, not 1; other errors stay 1."""
    from unigrpo.cli import _exit_code

    assert _exit_code(ValueError("model.hidden_layers: [40] out of range")) == (
        2, "config error: model.hidden_layers: [40] out of range")
    assert _exit_code(NotImplementedError("model.pipeline: this scheduler is not one shift"))[0] == 2
    assert _exit_code(ValueError("rewards[0].kwargs: bad"))[0] == 2
    assert _exit_code(ValueError("the judge model ran out of memory"))[0] == 1
