"""Every weight file unigrpo writes carries the sha256 of its tensors and every load verifies it
(``final.safetensors``, exports, ``model.checkpoint``, ``eval`` / ``sample`` ``--checkpoint``): a
flipped bit or a zeroed block is one line naming the file, exit 2; a file written before hashes
were recorded still loads. Foreign weights (a pipeline folder, a Bagel release) are checked for
NaN / inf when they load, before a run directory exists."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, bagel_overrides, hf_overrides, tiny_bagel_dir, tiny_flux2_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.utils.errors import CheckpointError


def saved_tiny(tmp_path) -> Path:
    model = build_model(load_config(None, TINY), checkpoint=None)
    model.save(tmp_path / "final.safetensors", extra={"rl_step": 1})
    return tmp_path / "final.safetensors"


def meta_of(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("damage", ["flip_bit", "zero_block"])
def test_an_altered_weight_file_is_refused_naming_it(tmp_path, damage, capsys):
    path = saved_tiny(tmp_path)
    meta = meta_of(path)
    assert len(meta["sha256"]) == 64 and '"kind": "tiny"' in meta["model"]
    data = bytearray(path.read_bytes())
    if damage == "flip_bit":
        data[-3] ^= 0x10
    else:
        data[-4096:] = bytes(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{path}: content hash does not match"):
        build_model(load_config(None, TINY), checkpoint=str(path))
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 2  # the same check, through the CLI
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"unigrpo: {path}: content hash does not match")


def test_a_file_without_a_hash_still_loads(tmp_path):
    path = saved_tiny(tmp_path)
    meta = {k: v for k, v in meta_of(path).items() if k not in ("sha256", "format", "model")}
    save_file(load_file(str(path)), str(path), metadata=meta)  # as unigrpo wrote it before hashes
    model = build_model(load_config(None, TINY), checkpoint=str(path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in load_file(str(path)).items())


def test_an_hf_lora_checkpoint_is_verified(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")

    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, hf_overrides(tiny_flux2_dir()))
    build_model(cfg, checkpoint=None).save(tmp_path / "final.safetensors")
    path = tmp_path / "final.safetensors"
    state = load_file(str(path))
    key = min(state)
    state[key] = state[key] + 1.0
    save_file(state, str(path), metadata=meta_of(path))  # tensors changed, recorded hash kept
    with pytest.raises(CheckpointError, match="content hash does not match"):
        build_model(cfg, checkpoint=str(path))


def nan_into(path: Path, key_part: str) -> str:
    state = load_file(str(path))
    key = next(k for k in sorted(state) if key_part in k and state[k].is_floating_point())
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path), metadata=meta_of(path))
    return key


def test_nan_in_a_bagel_release_is_one_line_at_load(tmp_path):
    pytest.importorskip("tokenizers")

    folder = Path(shutil.copytree(tiny_bagel_dir(), tmp_path / "bagel"))
    key = nan_into(folder / "ema.safetensors", "moe_gen")
    with pytest.raises(CheckpointError, match=f"ema.safetensors: tensor {key} holds NaN/inf"):
        build_model(load_config(None, [*bagel_overrides(str(folder), 0, 0)]), checkpoint=None)


def test_nan_in_a_pipeline_folder_is_one_line_at_load(tmp_path):
    pytest.importorskip("diffusers")

    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = Path(shutil.copytree(tiny_flux2_dir(), tmp_path / "flux2"))
    nan_into(folder / "transformer" / "diffusion_pytorch_model.safetensors", "to_q")
    with pytest.raises(CheckpointError, match=r"model.pipeline .*: transformer\..*to_q.* holds NaN/inf"):
        build_model(load_config(None, hf_overrides(str(folder), 0, 0)), checkpoint=None)
