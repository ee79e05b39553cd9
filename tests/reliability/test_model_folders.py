"""Model folders are checked at ``unigrpo validate`` (and before every run), before anything loads:
a local folder that does not exist is not looked up on the hub, and a pipeline whose
model_index.json, component folder, config or weight file is missing, unparsable or truncated is
one line, exit 2, naming the file (issue 25, item 5). The folders are built by hand (JSON + tiny
safetensors files): the check reads headers only, so no diffusers is needed."""

import json
import shutil

import pytest
import torch
from reliability_helpers import run_cli
from safetensors.torch import save_file

from unigrpo.models.hf_config import PIPELINES
from unigrpo.utils.folders import is_hub_id


def pipeline(root, cls="Flux2KleinPipeline"):
    """A folder shaped like a save_pretrained FLUX.2 [klein] pipeline (tiny weights)."""
    p = root / "pipe"
    parts = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3"],
             "tokenizer": ["transformers", "Qwen2TokenizerFast"], "transformer": ["diffusers", "Flux2"],
             "vae": ["diffusers", "AutoencoderKLFlux2"], "image_encoder": [None, None]}
    p.mkdir()
    (p / "model_index.json").write_text(json.dumps({"_class_name": cls, **parts}))
    for name in ("text_encoder", "transformer", "vae"):
        (p / name).mkdir()
        (p / name / "config.json").write_text("{}")
        save_file({"w": torch.ones(64)}, str(p / name / "model.safetensors"))
    (p / "scheduler").mkdir()
    (p / "scheduler" / "scheduler_config.json").write_text("{}")
    (p / "tokenizer").mkdir()
    (p / "tokenizer" / "tokenizer_config.json").write_text("{}")
    return p


def truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


CASES = {  # name -> (what to break, what the line says)
    "missing_folder": (lambda p: shutil.rmtree(p), "model.pipeline: {p} is not a folder (it does not exist)"),
    "no_index": (lambda p: (p / "model_index.json").unlink(), "has no model_index.json"),
    "bad_index": (lambda p: (p / "model_index.json").write_text("{oops"), "model_index.json is not valid JSON"),
    "unsupported": (lambda p: (p / "model_index.json").write_text('{"_class_name": "FluxPipeline"}'),
                    "'FluxPipeline' is not supported"),
    "no_component": (lambda p: shutil.rmtree(p / "vae"), "{p}/vae is missing (model_index.json lists vae)"),
    "no_config": (lambda p: (p / "transformer" / "config.json").unlink(), "{p}/transformer has no config.json"),
    "bad_config": (lambda p: (p / "vae" / "config.json").write_text("[1,"), "{p}/vae/config.json is not valid JSON"),
    "truncated": (lambda p: truncate(p / "transformer" / "model.safetensors"),
                  "{p}/transformer/model.safetensors: truncated"),
    "not_safetensors": (lambda p: (p / "vae" / "model.safetensors").write_bytes(b"PK\x03\x04" * 8),
                        "{p}/vae/model.safetensors: not a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_pipeline_folder_is_one_line_at_validate(tmp_path, capsys, case):
    p = pipeline(tmp_path)
    code, lines = run_cli(["validate", "model.kind=hf", f"model.pipeline={p}"], capsys)
    assert code == 0, lines  # the intact folder passes
    breaks, says = CASES[case]
    breaks(p)
    code, lines = run_cli(["validate", "model.kind=hf", f"model.pipeline={p}"], capsys)
    assert code == 2 and len(lines) == 1 and says.format(p=p) in lines[0], lines


def test_a_separate_reasoner_folder_is_checked_and_a_hub_id_is_not(tmp_path, capsys):
    p, lm = pipeline(tmp_path, "StableDiffusion3Pipeline"), tmp_path / "lm"  # separate mode
    lm.mkdir()
    save_file({"w": torch.ones(8)}, str(lm / "model.safetensors"))
    args = ["validate", "model.kind=hf", f"model.pipeline={p}"]
    code, lines = run_cli(args, capsys)
    assert code == 2 and "model.reasoner: StableDiffusion3Pipeline's text encoders cannot write text" in lines[0]
    code, lines = run_cli([*args, f"model.reasoner={lm}"], capsys)
    assert code == 2 and f"model.reasoner: {lm} has no config.json" in lines[0]
    code, lines = run_cli([*args, f"model.reasoner={tmp_path / 'gone'}"], capsys)
    assert code == 2 and "is not a folder (it does not exist)" in lines[0]
    code, lines = run_cli([*args, "model.reasoner=Qwen/Qwen3-0.6B"], capsys)
    assert code == 0, lines  # a hub id: downloaded (or found in the cache) at build time
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("gpt2")
    assert not any(is_hub_id(r) for r in ("./m", "/m", "~/m", "a/b/c", "../m"))


def test_a_broken_bagel_folder_is_one_line_at_validate(tmp_path, capsys):
    b = tmp_path / "bagel"
    b.mkdir()
    for name in ("llm_config.json", "tokenizer.json"):
        (b / name).write_text("{}")
    for name in ("ema.safetensors", "ae.safetensors"):
        save_file({"w": torch.ones(16)}, str(b / name))
    args = ["validate", "model.kind=bagel", f"model.path={b}"]
    assert run_cli(args, capsys)[0] == 0
    truncate(b / "ema.safetensors")
    code, lines = run_cli(args, capsys)
    assert code == 2 and f"model.path: {b / 'ema.safetensors'}: truncated" in lines[0], lines
    (b / "tokenizer.json").write_text("{")
    code, lines = run_cli(args, capsys)
    assert code == 2 and f"{b / 'tokenizer.json'} is not valid JSON" in lines[0], lines
    code, lines = run_cli(["validate", "model.kind=bagel", f"model.path={tmp_path / 'none'}"], capsys)
    assert code == 2 and "is not a folder" in lines[0], lines


def test_the_config_check_knows_every_adapted_pipeline():
    import importlib

    from unigrpo.models.hf import FAMILIES
    from unigrpo.models.hf_config import CAPABILITIES, SEPARATE

    assert sorted(PIPELINES) == sorted(FAMILIES)
    classes = {name: getattr(importlib.import_module(m), c) for name, (m, c) in
               ((n, v.split(":")) for n, v in FAMILIES.items())}
    modes = {name: cls.mode for name, cls in classes.items()}
    assert sorted(SEPARATE) == sorted(n for n, mode in modes.items() if mode == "separate")
    for name, cls in classes.items():  # what validate knows of a folder == what the family declares
        declared = {c for c, has in (("sees_images", cls.sees_images), ("edits", cls.edits)) if has}
        assert CAPABILITIES.get(name, frozenset()) == declared, name


def test_a_reasoner_the_pipeline_cannot_use_is_refused_at_validate(tmp_path, capsys):
    p = pipeline(tmp_path)  # FLUX.2 [klein]: shared mode
    code, lines = run_cli(["validate", "model.kind=hf", f"model.pipeline={p}", "model.reasoner=Qwen/Qwen3-0.6B"], capsys)
    assert code == 2 and "model.reasoner: Flux2KleinPipeline reasons with its own text encoder" in lines[0], lines
