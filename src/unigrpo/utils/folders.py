"""Model folders checked before anything loads (``unigrpo validate``, and every run's config check).

Standard library only (no torch, no diffusers): ``unigrpo.config`` runs these from each kind's
``check``. What is read is small -- JSON files and the header of each safetensors file, never a
tensor -- so a 16 GB folder is checked in milliseconds. Each problem is one ConfigError naming the
key and the file: a local folder that does not exist (rather than a hub download of its name), a
missing component folder or config, a JSON file that does not parse, a weight file that is not
safetensors or is shorter than its header says (a truncated copy). Content (NaN, hashes) is the
loaders' business.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from unigrpo.utils.typed_config import ConfigError

__all__ = ["check_files", "is_hub_id", "local_folder", "read_json", "safetensors_problem"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(ref: str) -> bool:
    """``name`` or ``owner/name`` that is not a path on this machine (``./x``, ``/x``, ``~/x``,
    ``a/b/c`` and anything that exists locally are paths)."""
    return (_HUB_ID.fullmatch(ref) is not None and not ref.startswith((".", "~"))
            and not Path(ref).expanduser().exists())


def local_folder(ref: str, key: str) -> Path | None:
    """The folder ``ref`` names, or None for a hub id; a path that is no folder is a ConfigError
    (it would otherwise be looked up on the hub under that name)."""
    if is_hub_id(ref):
        return None
    p = Path(ref).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: {ref} is not a folder" + ("" if p.exists() else " (it does not exist)"))
    return p


def read_json(path: Path, key: str) -> object:
    """The parsed JSON file; unreadable or not JSON is a ConfigError naming it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{key}: {path} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (None: its header parses and its size is
    what the header says): reads 8 bytes + the header, never the tensors."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8 or n > 100 * 2**20:
                return "not a safetensors file (bad header length)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated ({size} bytes, its header needs {need})"
    return None


def check_files(folder: Path, key: str, need_config: bool = False) -> None:
    """Every ``*.json`` of ``folder`` parses and every ``*.safetensors`` is whole; with
    ``need_config`` (a model's folder) or any weight file present, ``config.json`` must exist."""
    weights = sorted(folder.glob("*.safetensors"))
    if (need_config or weights or list(folder.glob("*.bin"))) and not any(
            (folder / name).is_file() for name in ("config.json", "scheduler_config.json")):
        raise ConfigError(f"{key}: {folder} has no config.json")
    for path in sorted(folder.glob("*.json")):
        read_json(path, key)
    for path in weights:
        if (problem := safetensors_problem(path)) is not None:
            raise ConfigError(f"{key}: {path}: {problem}")
