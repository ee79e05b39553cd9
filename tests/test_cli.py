"""The real CLI entry point, called in-process (same code path as the console script)."""

import subprocess
import sys
from pathlib import Path

import pytest

from unigrpo.cli import main
from unigrpo.config import builtin_configs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "src" / "unigrpo" / "configs").glob("*.yaml"))


def test_validate_shipped_configs(capsys, tmp_path):
    """Every shipped config validates; the real-model ones (``task.kind: prompts``) with the
    user's prompt files given, as their header says."""
    import yaml

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n')
    assert len(SHIPPED) >= 8 and sorted(builtin_configs()) == SHIPPED
    for name in SHIPPED:
        raw = yaml.safe_load((ROOT / "src" / "unigrpo" / "configs" / f"{name}.yaml").read_text())
        user = ([f"task.prompts={prompts}", f"task.eval_prompts={prompts}"]
                if (raw.get("task") or {}).get("kind") == "prompts" else [])
        assert main(["validate", f"builtin:{name}", *user]) == 0, name
        assert "ok:" in capsys.readouterr().out


def test_configs_lists_every_shipped_config(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"builtin:{name}" for name in SHIPPED]
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # each with its description


def test_configs_takes_no_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["configs", "demo"])
    assert e.value.code == 2 and "demo" in capsys.readouterr().err


def test_unknown_builtin_is_one_line_error(capsys):
    assert main(["validate", "builtin:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "builtin:nope" in err and "`unigrpo configs` lists" in err
    assert main(["validate", "builtin:demo_edti"]) == 2  # a typo: the closest names
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean builtin:demo_edit" in err


def test_validate_error_is_one_line_naming_the_key(capsys):
    assert main(["validate", "builtin:unigrpo", "algo.group_size=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "algo.group_size" in err


def test_validate_without_file_uses_defaults(capsys):
    assert main(["validate", "algo.group_size=4", "--print"]) == 0
    assert "group_size: 4" in capsys.readouterr().out


def test_overrides_after_options_are_accepted(capsys):
    # argparse alone rejects `key=value` after an option (`sample "p" --n 8 threads=1` failed).
    assert main(["validate", "builtin:unigrpo", "--print", "algo.group_size=4",
                 "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "group_size: 4" in out and "seed: 3" in out


def test_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", "builtin:unigrpo", "--nope"])
    assert e.value.code == 2 and "--nope" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "unigrpo.cli", "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "validate" in out.stdout


def test_a_torchrun_worker_leaves_with_os_exit_after_main_returns(monkeypatch):
    """WORLD_SIZE > 1: ``entry`` flushes and calls ``os._exit(status)`` (no C++ teardown after a
    finished run); a single process exits through ``sys.exit`` as before."""
    from unigrpo import cli

    calls = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", lambda code: calls.append(("os._exit", code)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    cli.entry()
    assert calls == [("os._exit", 3)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 3 and calls == [("os._exit", 3)]
