"""A non-editable wheel ships the configs and the SFT checkpoint, and works from any directory.

The wheel is built from a copy of the sources (setuptools' ``build/`` cache in the checkout could
otherwise carry deleted files into it), installed with ``pip --target`` and run in subprocesses whose cwd is an empty directory and whose
``PYTHONPATH`` is that install.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "src" / "unigrpo" / "configs").glob("*.yaml"))


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                         cwd=cwd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_wheel_ships_configs_and_runs_outside_the_checkout(tmp_path):
    src = tmp_path / "src_copy"
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src), cwd=tmp_path)
    (wheel,) = dist.glob("unigrpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(CONFIGS) >= 8
    missing = [n for n in [f"unigrpo/configs/{c}" for c in CONFIGS] + ["unigrpo/assets/tiny_sft.safetensors"]
               if n not in names]
    assert not missing, missing

    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-compile", "--target", str(site), str(wheel), cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # first on sys.path: ahead of the editable install

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, *args], cwd=empty, env=env, capture_output=True, text=True,
                             check=False, timeout=120)
        assert out.returncode == 0, (args, out.stdout[-1000:], out.stderr[-2000:])
        return out.stdout

    # the package, its configs and the SFT checkpoint (what `unigrpo demo` loads) all come from the wheel
    where = run("-c", "import unigrpo, unigrpo.config as c, unigrpo.models.tiny as t; "
                      "print(unigrpo.__file__); print(c.resolve_config_path('builtin:demo')); "
                      "print(t.BUILTIN['builtin:sft'])").split()
    for path in map(Path, where):
        assert path.is_file() and path.resolve().is_relative_to(site.resolve()), path
    listed = [line.split()[0] for line in run("-m", "unigrpo.cli", "configs").splitlines()]
    assert "builtin:demo" in listed
    assert listed == [f"builtin:{c[: -len('.yaml')]}" for c in CONFIGS]
    assert run("-m", "unigrpo.cli", "validate", "builtin:demo").startswith("ok: builtin:demo")
    assert not list(empty.iterdir())  # nothing written to the working directory
