"""Model-based terms (clip_score, pickscore, aesthetic) against the reference computation written
out with transformers, on tiny random CLIPs saved with save_pretrained; their one-line errors; and a
tiny training run through the real CLI with each term."""

import json
import sys

import pytest
import torch

pytest.importorskip("transformers")
import transformers
from clip_models import save_aesthetic_head, save_tiny_clip

from unigrpo.cli import main
from unigrpo.rewards import resolve_reward

RECIPE = sys.modules["_recipe_conftest"]
PROMPTS = ["a red circle", "two blue squares on the left", "a green triangle", "A  RED circle!", "x"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def images(n=5, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_inputs(folder, imgs, prompts):
    """What the upstream scorers do: 8-bit PIL images, the checkpoint's processor, CLIPModel."""
    from PIL import Image

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    proc = transformers.CLIPProcessor.from_pretrained(folder)
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in imgs]
    return model, proc(text=prompts, images=pil, return_tensors="pt", padding=True, truncation=True, max_length=77)


def test_clip_score_and_pickscore_equal_the_transformers_reference(clip_dir):
    imgs = images()
    model, inputs = reference_inputs(clip_dir, imgs, PROMPTS)
    with torch.no_grad():
        out = model(**inputs)  # image_embeds / text_embeds are projected and L2-normalised
    cosine = (out.image_embeds * out.text_embeds).sum(-1)
    pick = out.logits_per_image.diagonal()  # logit_scale.exp() * cos, the per-pair PickScore
    clip = resolve_reward("clip_score", {"model": clip_dir, "batch_size": 2})  # 3 forwards for 5 images
    torch.testing.assert_close(clip(imgs, PROMPTS, [{}] * 5), cosine, atol=1e-5, rtol=1e-5)
    scaled = resolve_reward("clip_score", {"model": clip_dir, "scale": 2.5})
    torch.testing.assert_close(scaled(imgs, PROMPTS, [{}] * 5), 2.5 * cosine, atol=1e-5, rtol=1e-5)
    ps = resolve_reward("pickscore", {"model": clip_dir, "processor": clip_dir})
    torch.testing.assert_close(ps(imgs, PROMPTS, [{}] * 5), pick / 26, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pick, cosine)  # logit_scale is not 1: the two terms differ
    assert all(not p.requires_grad for p in clip.model.parameters()) and not clip.model.training
    # no clamp: poor images keep their ranking (a random CLIP gives negative cosines too)
    assert (cosine < 0).any() and torch.equal(clip(imgs, PROMPTS, [{}] * 5) < 0, cosine < 0)


def test_dtype_and_batching(clip_dir):
    imgs = images(n=3)
    ref = resolve_reward("clip_score", {"model": clip_dir})(imgs, PROMPTS[:3], [{}] * 3)
    bf16 = resolve_reward("clip_score", {"model": clip_dir, "dtype": "bfloat16", "batch_size": 1})
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16(imgs, PROMPTS[:3], [{}] * 3)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=0.05)
    # `unigrpo train` builds each term twice (config check, then the run): one copy of the weights
    again = resolve_reward("clip_score", {"model": clip_dir, "dtype": "bfloat16", "batch_size": 4})
    assert again.model is bf16.model and again.batch_size == 4


def test_aesthetic_equals_the_reference_head_on_normalised_image_embeddings(clip_dir, tmp_path):
    head_path = save_aesthetic_head(tmp_path / "head.pth", dim=16)
    imgs = images()
    model, inputs = reference_inputs(clip_dir, imgs, PROMPTS)
    with torch.no_grad():
        emb = model(**inputs).image_embeds  # L2-normalised projected image embedding
    sd = torch.load(head_path, weights_only=True)
    x = emb
    for i in (0, 2, 4, 6, 7):  # upstream's MLP: Linear/Dropout stack without activations
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    fn = resolve_reward("aesthetic", {"model": clip_dir, "head": head_path, "batch_size": 2})
    torch.testing.assert_close(fn(imgs, PROMPTS, [{}] * 5), x[:, 0], atol=1e-5, rtol=1e-5)


def test_one_line_errors(clip_dir, tmp_path):
    def err(name, kwargs):
        with pytest.raises(ValueError) as e:
            resolve_reward(name, kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in err("clip_score", {"model": str(tmp_path / "nope")})
    lm = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)).save_pretrained(lm)
    msg = err("pickscore", {"model": str(lm)})
    assert "'gpt2' model" in msg and "CLIP" in msg
    assert "not a torch floating dtype" in err("clip_score", {"model": clip_dir, "dtype": "int8"})
    assert "does not exist" in err("aesthetic", {"model": clip_dir, "head": str(tmp_path / "none.pth")})
    wrong = save_aesthetic_head(tmp_path / "h768.pth", dim=768)
    assert "768-d embeddings" in err("aesthetic", {"model": clip_dir, "head": wrong})
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pth")
    assert "expected the LAION" in err("aesthetic", {"model": clip_dir, "head": str(tmp_path / "bad.pth")})


def reference_scores(name, folder, head, imgs, prompts):
    """Each term's upstream formula on transformers' own outputs."""
    model, inputs = reference_inputs(folder, imgs, prompts)
    with torch.no_grad():
        out = model(**inputs)
    if name == "clip_score":
        return (out.image_embeds * out.text_embeds).sum(-1)
    if name == "pickscore":
        return out.logits_per_image.diagonal() / 26
    sd, x = torch.load(head, weights_only=True), out.image_embeds
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x[:, 0]


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic"])
def test_tiny_cli_run_trains_on_the_model_reward(name, clip_dir, tiny_checkpoint, tmp_path):
    import slow_rewards

    kwargs = {"model": clip_dir}
    if name == "aesthetic":
        kwargs["head"] = save_aesthetic_head(tmp_path / "head.pth", dim=16)
    out = tmp_path / "run"
    slow_rewards.RECORDED.clear()
    terms = f"[{{name: {name}, kwargs: {json.dumps(kwargs)}}}, {{name: 'slow_rewards:record', weight: 0.0}}]"
    args = RECIPE.tiny_overrides(tiny_checkpoint, out, "steps=1", "eval_every=0", "eval.at_start=false",
                                 "reward_workers=0", f"rewards={terms}")
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert len(train_rows) == 1 and any(k.startswith("loss/") for k in train_rows[0])
    r = train_rows[0]
    assert r[f"reward/{name}"] == pytest.approx(r["reward/mean"]) and r["reward/std"] > 0
    # the logged reward is the reference computation on the run's own images (all its chunks)
    imgs = torch.cat([i for i, _ in slow_rewards.RECORDED])
    prompts = [p for _, ps in slow_rewards.RECORDED for p in ps]
    assert len(prompts) == 8  # 2 prompts x 4 trajectories
    ref = reference_scores(name, clip_dir, kwargs.get("head"), imgs, prompts)
    assert r[f"reward/{name}"] == pytest.approx(float(ref.mean()), abs=1e-5)
