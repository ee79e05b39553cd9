"""``model.kind: hf`` in separate mode on a tiny random StableDiffusion3Pipeline + a tiny Qwen3
reasoner (both built from components, saved with ``save_pretrained``, loaded offline): the
conditioning is the pipeline's own ``encode_prompt`` of "prompt reasoning", our ODE reproduces
``__call__`` with and without CFG, the schedule is the pipeline's, ratio == 1 on the first update
through the CLI, LoRA touches only LoRA weights. The protocol itself: test_conformance.py
(``ADAPTERS["hf:sd3"]``)."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import HF_PROMPTS, SD3_T5_TOKENS, sd3_factory, sd3_overrides, tiny_sd3_dirs
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    retrieve_latents,
)
from testkit import check_one_lora_step_run, lora_loss_grads, lora_step_then_reference

from unigrpo.algo.schedule import shift_time, timesteps
from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.models import build_model
from unigrpo.models.hf_sd3 import sd3_shift
from unigrpo.sampling import ode_sample


def brightness(images, prompts, metadata):  # a reward for the CLI run ("test_hf_sd3:brightness")
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dirs()[0])


@pytest.fixture(scope="module")
def model():
    return sd3_factory(seed=0)[0]


def encode(pipe, texts):
    """The pipeline's own (prompt_embeds, pooled, negative_embeds, negative_pooled) of ``texts``."""
    return pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=True, max_sequence_length=SD3_T5_TOKENS)


def sampled(model, seed=0, max_new_tokens=8):
    return model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=max_new_tokens,
                                  generator=torch.Generator().manual_seed(seed))


def test_config_checks(tmp_path, monkeypatch):
    import huggingface_hub

    base = sd3_overrides()
    with pytest.raises(ConfigError, match=r"^model.reasoner: /no/such/lm is not a folder \(it does not exist\)"):
        load_config(None, [*base, "model.reasoner=/no/such/lm"])
    # a hub-id-shaped name that is not cached: one line naming the key (offline: the hub reads its
    # HF_HUB_OFFLINE once, at import, so the environment variable alone would not stop a lookup)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^model.reasoner: cannot load a transformers causal LM from 'nobody/no-lm'"):
        build_model(load_config(None, [*base, "model.reasoner=nobody/no-lm"]))
    with pytest.raises(ConfigError, match=r"^model.reasoner: " + str(tmp_path) + " has no config.json"):
        load_config(None, [*base, f"model.reasoner={tmp_path}"])  # a folder without a model: refused at validate
    with pytest.raises(ValueError, match="model.reasoner: StableDiffusion3Pipeline's text encoders cannot write"):
        build_model(load_config(None, [*base, "model.reasoner=text_encoder"]))
    with pytest.raises(ValueError, match="model.hidden_layers: not used in separate mode"):
        build_model(load_config(None, [*base, "model.hidden_layers=[1]"]))
    with pytest.raises(ValueError, match="model.max_text_tokens: SD3's T5 takes at most 512"):
        build_model(load_config(None, [*base, "model.max_text_tokens=513"]))


def test_prompt_only_conditioning_equals_the_pipelines_encode_prompt(model, pipe):
    """No reasoning: the context is ``pipe.encode_prompt(prompt)`` (both CLIPs + T5, pooled)."""
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        ref, neg, pooled, neg_pooled = encode(pipe, HF_PROMPTS)
        null = model.null_context(3)
    assert ctx.hidden.shape == ref.shape == (3, 77 + SD3_T5_TOKENS, 64) and ctx.pooled.shape == pooled.shape == (3, 48)
    err = max((ctx.hidden - ref).abs().max().item(), (ctx.pooled - pooled).abs().max().item())
    print(f"conditioning vs encode_prompt: max|diff| = {err:.3g}")
    assert err == 0.0
    # the negative prompt "" (encoded as one row, the pipeline's as three: float32 batch numerics)
    torch.testing.assert_close(null.hidden, neg, atol=1e-6, rtol=0)
    torch.testing.assert_close(null.pooled, neg_pooled, atol=1e-6, rtol=0)
    assert ctx.mask.all() and ctx.mask.shape == ctx.hidden.shape[:2]


def test_prompt_and_reasoning_conditioning_is_encode_prompt_of_the_joined_text(model, pipe):
    """Sampled reasoning: the context is ``encode_prompt("prompt reasoning")``, the reasoning decoded
    without special tokens; the log-probs are the reasoner's own on each unpadded row."""
    tokens = sampled(model)
    texts = model.joined_texts(tokens)
    reasoning = [r.replace("<|im_end|>", "").strip() for r in model.decode_text(tokens)]
    assert texts == [f"{p} {r}" if r else p for p, r in zip(HF_PROMPTS, reasoning)]
    assert all(r for r in reasoning)  # every row did reason (the test is not prompt-only in disguise)
    with torch.no_grad():
        logp, ctx = model.forward_context(tokens)
        ref, _, pooled, _ = encode(pipe, texts)
        prompt_only, _, _, _ = encode(pipe, HF_PROMPTS)
        for i in range(3):  # the reasoner alone on row i, no padding
            ids = tokens.ids[i][tokens.mask[i]][None]
            lp = model.lm(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            resp = tokens.response_mask[i][tokens.mask[i]][1:]
            torch.testing.assert_close(logp[i][tokens.response_mask[i]], lp[resp], atol=1e-5, rtol=0)
    assert torch.equal(ctx.hidden, ref) and torch.equal(ctx.pooled, pooled)
    assert (ctx.hidden - prompt_only).abs().max() > 1e-3  # the reasoning reached the conditioning
    assert ctx.hidden.grad_fn is None and ctx.pooled.grad_fn is None  # frozen encoders, no_grad


@pytest.mark.parametrize("num_steps", [4, 28])
@pytest.mark.parametrize("dynamic", [False, True])
def test_schedule_equals_the_pipelines_sigmas_on_its_sigma_grid(num_steps, dynamic):
    """Static shift 3 (SD3.5) or dynamic mu (calculate_shift of the image tokens) on the pipeline's
    ``sigmas=linspace(1, 1/n, n)`` == ``timesteps(n, sd3_shift)``."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    seq = 1024  # SD3 at 1024 px: 128 x 128 latents, patch 2
    sc = dict(sched.config)
    mu = calculate_shift(seq, sc["base_image_seq_len"], sc["max_image_seq_len"], sc["base_shift"], sc["max_shift"])
    retrieve_timesteps(sched, None, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                       **({"mu": mu} if dynamic else {}))
    ours = timesteps(num_steps, sd3_shift(seq, sc), dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas.double(), ours, atol=1e-6, rtol=0)
    assert sched.timesteps.double() == pytest.approx((1000 * ours[:-1]).tolist(), abs=1e-3)


def test_the_pipelines_default_grid_is_not_one_of_ours(pipe):
    """Without ``sigmas`` the scheduler shifts ``linspace(1, shift(1/1000), n)`` (docs/models.md):
    checked here, and how far it is from our grid of n and of n - 1 steps."""
    for n in (4, 28):
        retrieve_timesteps(pipe.scheduler, n, "cpu")
        s = 3.0
        u = torch.linspace(1.0, shift_time(1e-3, s), n, dtype=torch.float64)
        expect = torch.cat([shift_time(u, s), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(pipe.scheduler.sigmas.double(), expect, atol=1e-6, rtol=0)
        d_n = (expect - timesteps(n, s, dtype=torch.float64)).abs().max().item()
        d_n1 = (expect[:-1] - timesteps(n - 1, s, dtype=torch.float64)).abs().max().item()
        print(f"default grid, n={n}: max|diff| vs timesteps(n) {d_n:.3g}, vs timesteps(n-1) + a last step {d_n1:.3g}")
        assert d_n > 0.05


def run_both(model, pipe, texts, x_init, n, cfg_scale, own_grid=False):
    """(our ODE latents, our images, the pipeline's latents, its images) from the same x_init;
    ``own_grid``: ``sampler.shift: null`` against a plain ``pipe(...)`` call (its default grid),
    else ``timesteps(n, pipeline_shift)`` against the pipeline given ``sigmas=linspace(1, 1/n, n)``."""
    with torch.no_grad():
        tokens = model.with_response(model.encode(HF_PROMPTS), [t[len(p) + 1:] for t, p in zip(texts, HF_PROMPTS)])
        assert model.joined_texts(tokens) == texts
        _, ctx = model.forward_context(tokens)
        shift = None if own_grid else model.pipeline_shift(n)
        x0 = ode_sample(model, ctx, n, shift, cfg_scale=cfg_scale, x_init=x_init.clone())
        kw = {"prompt": texts, "height": 32, "width": 32, "num_inference_steps": n, "guidance_scale": cfg_scale,
              "max_sequence_length": SD3_T5_TOKENS}
        if not own_grid:
            kw["sigmas"] = list(np.linspace(1.0, 1 / n, n))
        lat = pipe(latents=x_init.clone(), output_type="latent", **kw).images
        img = pipe(latents=x_init.clone(), output_type="pt", **kw).images
        return x0, model.decode(x0), lat, img


@pytest.mark.parametrize("cfg_scale,own_grid", [(1.0, False), (4.0, False), (1.0, True), (4.0, True)],
                         ids=["no_cfg", "cfg4", "no_cfg-shift_null", "cfg4-shift_null"])
def test_ode_sampler_reproduces_the_pipeline(model, pipe, cfg_scale, own_grid):
    """Our Euler ODE (no noise) from the pipeline's initial latents == ``pipe(..., latents=...)`` on
    "prompt reasoning" (latents and images): timestep = 1000 t, output as is, VAE shift / scale;
    with CFG the pipeline's guidance against its negative prompt ""; with ``sampler.shift: null``
    a plain ``pipe(...)`` call, on its own default grid."""
    texts = [f"{p} the sky is blue" for p in HF_PROMPTS]
    x_init = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    x0, images, lat, img = run_both(model, pipe, texts, x_init, 4, cfg_scale, own_grid)
    e_lat, e_img = (x0 - lat).abs().max().item(), (images - img).abs().max().item()
    print(f"ODE vs pipeline (cfg {cfg_scale}, own grid {own_grid}): latents max|diff| = {e_lat:.3g}, images {e_img:.3g}")
    assert lat.shape == x0.shape == (3, 4, 8, 8) and img.shape == images.shape == (3, 3, 32, 32)
    assert e_lat <= 1e-5 and e_img <= 1e-5
    assert (x0 - x_init).abs().max() > 0.1  # the sampler moved


def test_encode_images_is_the_img2img_latent(model, pipe):
    """``encode_images`` = SD3 img2img's latent (``(z - shift_factor) * scaling_factor``, the mode)."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = retrieve_latents(pipe.vae.encode(images * 2 - 1), sample_mode="argmax")
        ref = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        ours = model.encode_images(images)
    assert ours.shape == (2, *model.latent_shape)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_lora_step_moves_only_lora_and_reference_is_the_base():
    """After an update only LoRA weights changed (base and encoders bit-identical); the reference
    (adapters off) equals a model without LoRA built from the same folders."""
    model = sd3_factory(seed=0)[0]
    base = sd3_factory(seed=0, text_rank=0, image_rank=0)[0]
    tokens = sampled(model, seed=1, max_new_tokens=6)
    _, _, c_pol, c_base, _ = lora_step_then_reference(model, base, tokens)
    assert torch.equal(c_pol.hidden, c_base.hidden)  # same text -> same context: the encoders are frozen


def test_full_fine_tune_reasoner_references_a_snapshot():
    model = sd3_factory(seed=0, text_rank=0, image_rank=4)[0]
    assert len(model.parameter_groups()["text"]) == len(list(model.lm.parameters()))
    ref = model.reference()
    assert set(ref.state_dict()) == {f"lm.{k}" for k, _ in model.lm.named_parameters()}
    tokens = sampled(model, seed=2, max_new_tokens=4)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(0.01)
        lp_ref, lp_pol = ref.forward_context(tokens)[0], model.forward_context(tokens)[0]
    assert not torch.equal(lp_ref, lp_pol)  # the reference scores with its snapshot, not the moved reasoner


def cli_args(tmp_path) -> list[str]:
    """A 2-prompt x 2-trajectory run on the tiny pipeline + reasoner, prompts from a JSONL file."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    return ["train", *sd3_overrides(), "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: 'test_hf_sd3:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=2", "algo.micro_batch_trajectories=2", "sampler.num_steps=4",
            "sampler.window_range=[0,3]", "sampler.window_size=2", "sampler.shift=3.0", "sampler.eval_num_steps=2",
            "eval.num_prompts=2", "eval.grid_prompts=2", "text.max_reasoning_tokens=6", "threads=1",
            "optim.lr_text=1e-3", "optim.lr_image=1e-3"]


def test_cli_train_one_lora_step_ratio_exactly_one(tmp_path):
    """`unigrpo train model.kind=hf model.reasoner=LMDIR ...` runs offline on the tiny folders;
    the first update's log-probs equal the rollout's (ratio exactly 1) for text and image."""
    out = tmp_path / "run"
    assert main([*cli_args(tmp_path), f"output_dir={out}", "steps=1"]) == 0
    saved = check_one_lora_step_run(out)
    assert any(k.startswith("lm.") for k in saved) and any(k.startswith("dit.") for k in saved)
    loaded = build_model(load_config(None, sd3_overrides()), checkpoint=str(out / "final.safetensors"))
    assert all(torch.equal(loaded.trainable_state()[k], v) for k, v in saved.items())


def test_gradient_checkpointing_changes_no_gradient():
    plain = sd3_factory(seed=0)[0]
    cfg = load_config(None, [*sd3_overrides(), "model.gradient_checkpointing=true"])
    torch.manual_seed(0)  # the same LoRA A as sd3_factory(seed=0) (the folders exist already)
    ckpt = build_model(cfg, checkpoint=None)
    tokens = sampled(plain, seed=2, max_new_tokens=5)
    x, t = torch.randn((3, *plain.latent_shape), generator=torch.Generator().manual_seed(2)), torch.tensor(0.5)
    calls = []
    for module in (ckpt.lm.model.layers[0].self_attn, ckpt.dit.transformer_blocks[0].attn):  # recomputed in backward
        module.register_forward_hook(lambda mod, *_: calls.append(type(mod).__name__))
    grads = [lora_loss_grads(m, tokens, x, t) for m in (plain, ckpt)]
    assert len(calls) == 4, calls  # each hooked block ran twice: forward + recompute
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_left_padding_tokenizers_give_what_the_pipeline_computes_with_them(model, tmp_path):
    """Every tokenizer saved padding on the LEFT (the pipeline's CLIP-L/G + T5 and the reasoner's):
    the conditioning is still the pipeline's own ``encode_prompt`` with those tokenizers, and the
    reasoner's log-probs are those of the right-padding folders (the engine lays out its own batch)."""
    import json
    import shutil

    src_pipe, src_lm = tiny_sd3_dirs()
    folder, lm = tmp_path / "pipe", tmp_path / "lm"
    shutil.copytree(src_pipe, folder)
    shutil.copytree(src_lm, lm)
    for conf in [*folder.glob("tokenizer*/tokenizer_config.json"), lm / "tokenizer_config.json"]:
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "padding_side": "left"}))
    left_pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    assert {t.padding_side for t in (left_pipe.tokenizer, left_pipe.tokenizer_2, left_pipe.tokenizer_3)} == {"left"}
    overrides = [o for o in sd3_overrides() if not o.startswith(("model.pipeline", "model.reasoner"))]
    torch.manual_seed(0)
    left = build_model(load_config(None, [*overrides, f"model.pipeline={folder}", f"model.reasoner={lm}"]), None)
    tokens = sampled(model)
    with torch.no_grad():
        _, ctx = left.forward_context(left.encode(HF_PROMPTS))
        ref, _, pooled, _ = encode(left_pipe, HF_PROMPTS)
        logp, _ = left.forward_context(tokens)
        logp_right, _ = model.forward_context(tokens)
    assert (ctx.hidden - ref).abs().max().item() == 0.0 and (ctx.pooled - pooled).abs().max().item() == 0.0
    assert torch.equal(logp, logp_right)
