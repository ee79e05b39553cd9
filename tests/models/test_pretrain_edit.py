"""The SFT recipe of the model that sees and edits: it grows from the text-to-image checkpoint
(same outputs until it learns), mixes edit, describe and text-to-image samples as configured, and a
reduced run through the real CLI trains every new part."""

import numpy as np
import torch

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.tiny import TinyUnifiedModel
from unigrpo.recipes.pretrain import make_batch, render_targets
from unigrpo.tasks import Prompt
from unigrpo.world import make_tasks, parse_description, split_response
from unigrpo.world.edit import make_edit_problems
from unigrpo.world.reward import score_images

SMALL = ["model.d_text=32", "model.text_layers=1", "model.text_heads=2", "model.unet_channels=[8,16,16]",
         "model.image_size=16", "threads=1"]
EDITING = ["model.sees_images=true", "model.edits=true"]


def test_a_grown_model_computes_what_it_grew_from_on_text_to_image(tmp_path):
    """New words, an image encoder and input-latent channels: on a prompt without an image the
    grown model's reasoning logits and velocity are the old model's (new channels start at zero)."""
    old = build_model(load_config(None, [*SMALL, "model.checkpoint=null"]), checkpoint=None)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    new = build_model(load_config(None, [*SMALL, *EDITING, "model.checkpoint=null"]), checkpoint=None)
    new.grow_from(old)
    prompts = ["a red circle", "two blue squares"]
    a, b = old.encode(prompts), new.encode(prompts)
    assert torch.equal(a.ids, b.ids)  # the edit words are appended: old ids never move
    la, _ = old.prefill(a)
    lb, _ = new.prefill(b)
    assert torch.allclose(la, lb[:, :la.shape[1]], atol=1e-6)
    _, ca = old.forward_context(a)
    _, cb = new.forward_context(b)
    x, t = torch.randn(2, *old.latent_shape), torch.rand(2)
    assert torch.allclose(old.velocity(x, t, ca), new.velocity(x, t, cb), atol=1e-6)
    assert cb.ref.abs().sum() == 0  # no input image: zero input latent


def test_the_edit_batch_follows_the_mixture_and_the_image_follows_the_response():
    cfg = load_config(None, [*SMALL, *EDITING, "model.checkpoint=null", "pretrain.batch_size=2000",
                             "pretrain.edit_frac=0.4", "pretrain.describe_frac=0.1", "pretrain.no_think_frac=0.2",
                             "pretrain.uncond_frac=0.1", "pretrain.wrong_reasoning_frac=0.5"])
    tasks = make_tasks("train", 500, seed=0)
    edits = make_edit_problems("train", 500, seed=0)
    describes = make_edit_problems("train", 50, seed=0, weights={"describe": 1.0})
    prompts, responses, targets, modes = make_batch(tasks, np.random.default_rng(0), cfg, edits, describes)
    is_edit = np.array([isinstance(p, Prompt) for p in prompts])
    describe = np.array([isinstance(p, Prompt) and p.text == describes[0].instruction for p in prompts])
    assert abs(is_edit.mean() - 0.5) < 0.04 and abs(describe.mean() - 0.1) < 0.03
    assert all(isinstance(t, torch.Tensor) == e for t, e in zip(targets, is_edit))
    assert all(p.images.shape == (1, 3, 16, 16) for p in prompts if isinstance(p, Prompt))
    for p, r, t, m in zip(prompts, responses, targets, modes):
        if isinstance(p, Prompt) and m == "full":  # the image shows what the response's description says
            assert score_images(t[None], [parse_description(split_response(r)[1])]).correct.all()
    # only the edit moves pixels: a describe row's result is its input, exactly
    rows = [i for i, p in enumerate(prompts) if isinstance(p, Prompt) and p.text == describes[0].instruction]
    assert rows and all(torch.equal(targets[i], prompts[i].images[0]) for i in rows)
    # one reasoning-required edit as the whole pool: half its responses carry the wrong fact
    one = next(e for e in edits if e.requires_reasoning)
    cfg1 = load_config(None, [*SMALL, *EDITING, "model.checkpoint=null", "pretrain.batch_size=1000",
                              "pretrain.edit_frac=1.0", "pretrain.wrong_reasoning_frac=0.5"])
    _, responses, targets, modes = make_batch(tasks, np.random.default_rng(1), cfg1, [one], describes)
    wrong = np.array([r != one.reasoning for r in responses])
    assert abs(wrong.mean() - 0.5) < 0.05
    truth = [one.target.spec()]
    assert all(score_images(t[None], truth).correct.all() for t, m in zip(targets, modes) if m == "prompt")
    images = render_targets(targets[:8], seed=0, size=16)
    assert images.shape == (8, 3, 16, 16) and images.amax() > 0.5


def test_pretrain_edit_cli_grows_and_trains_every_new_part(tmp_path):
    base = tmp_path / "base.safetensors"
    assert main(["pretrain", *SMALL, "model.checkpoint=null", "pretrain.steps=2", "pretrain.batch_size=4",
                 "--out", str(base)]) == 0
    out = tmp_path / "edit.safetensors"
    assert main(["pretrain", *SMALL, *EDITING, "model.checkpoint=null", f"pretrain.init={base}",
                 "pretrain.steps=3", "pretrain.batch_size=8", "pretrain.edit_frac=0.5", "pretrain.describe_frac=0.25",
                 "--out", str(out)]) == 0
    grown = TinyUnifiedModel.load(out)
    assert grown.sees_images and grown.edits
    before = TinyUnifiedModel.load(base).state_dict()
    after = grown.state_dict()
    assert any(k.startswith("vision.") for k in after)
    assert not torch.equal(after["image.conv_in.weight"][:, 12:], torch.zeros_like(after["image.conv_in.weight"][:, 12:]))
    assert not torch.equal(after["text.blocks.0.attn.qkv.weight"], before["text.blocks.0.attn.qkv.weight"])
