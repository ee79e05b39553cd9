"""A reduced `unigrpo pretrain` through the real CLI: it trains, logs finite losses, saves a
checkpoint that loads, and the supervised batch follows the documented mixture."""

import json

import numpy as np
import torch

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.tiny import TinyUnifiedModel
from unigrpo.recipes.pretrain import make_batch
from unigrpo.world import make_tasks, parse_description, split_response

SMALL = ["model.d_text=32", "model.text_layers=1", "model.text_heads=2", "model.unet_channels=[8,16,16]",
         "model.image_size=16", "threads=1"]


def test_pretrain_cli_trains_and_saves(tmp_path):
    out = tmp_path / "sft.safetensors"
    args = ["pretrain", *SMALL, "model.checkpoint=null", "pretrain.steps=4", "pretrain.batch_size=8",
            "--out", str(out)]
    assert main(args) == 0
    log = [json.loads(x) for x in (tmp_path / "sft.safetensors.log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite([r["text_loss"], r["image_loss"], r["grad_norm"]]).all() for r in log)
    trained = TinyUnifiedModel.load(out)
    torch.manual_seed(0)  # pretrain seeds torch with cfg.seed (0) before building the model
    init = build_model(load_config(None, SMALL), checkpoint=None)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, init.state_dict()[k])]
    assert any(k.startswith("text.") for k in changed) and any(k.startswith("image.") for k in changed)


def test_sft_batch_mixture():
    cfg = load_config(None, ["pretrain.batch_size=4000", "pretrain.wrong_reasoning_frac=0.5",
                             "pretrain.no_think_frac=0.2", "pretrain.uncond_frac=0.1"])
    tasks = make_tasks("train", 2000, seed=0)
    prompts, responses, specs, modes = make_batch(tasks, np.random.default_rng(0), cfg)
    modes = np.array(modes)
    assert abs((modes == "uncond").mean() - 0.1) < 0.02 and abs((modes == "prompt").mean() - 0.2) < 0.02
    truths: dict[str, set] = {}  # a prompt with free colours has several correct reasonings
    for t in tasks:
        truths.setdefault(t.prompt, set()).add(t.reasoning)
    needs_reasoning = {t.prompt: t.requires_reasoning for t in tasks}
    wrong = needs = 0
    for p, r, spec, m in zip(prompts, responses, specs, modes):
        if m == "full":  # the image always follows the description written in the reasoning
            assert parse_description(split_response(r)[1]) == spec
        if needs_reasoning[p]:
            needs += 1
            wrong += r not in truths[p]
    assert abs(wrong / needs - 0.5) < 0.05
