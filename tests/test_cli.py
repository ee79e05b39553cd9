"""The real CLI entry point, called in-process (same code path as the console script)."""

import subprocess
import sys
from pathlib import Path

import pytest

from unigrpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_validate_shipped_configs(capsys):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert main(["validate", str(path)]) == 0, path
        assert "ok:" in capsys.readouterr().out


def test_validate_error_is_one_line_naming_the_key(capsys):
    assert main(["validate", str(ROOT / "configs" / "unigrpo.yaml"), "algo.group_size=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "algo.group_size" in err


def test_validate_without_file_uses_defaults(capsys):
    assert main(["validate", "algo.group_size=4", "--print"]) == 0
    assert "group_size: 4" in capsys.readouterr().out


def test_overrides_after_options_are_accepted(capsys):
    # argparse alone rejects `key=value` after an option (`sample "p" --n 8 threads=1` failed).
    assert main(["validate", str(ROOT / "configs" / "unigrpo.yaml"), "--print", "algo.group_size=4",
                 "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "group_size: 4" in out and "seed: 3" in out


def test_unknown_option_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", str(ROOT / "configs" / "unigrpo.yaml"), "--nope"])
    assert e.value.code == 2 and "--nope" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "unigrpo.cli", "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "validate" in out.stdout
