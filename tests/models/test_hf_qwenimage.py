"""``model.kind: hf`` on a tiny random Qwen-Image pipeline (built from components, saved with
``save_pretrained``, loaded offline): parity with the pipeline's own ``encode_prompt``, scheduler,
VAE normalisation and ``__call__`` (with and without its norm-preserving true CFG); a row's
conditioning does not depend on its batch; ratio == 1 on the first update through the CLI; LoRA
touches only LoRA weights. The protocol itself: test_conformance.py (``ADAPTERS["hf:qwenimage"]``)."""

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import (
    HF_PROMPTS,
    QWEN_SCHEDULER,
    qwen_overrides,
    qwenimage_factory,
    tiny_qwenimage_dir,
)
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_img2img
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from testkit import check_one_lora_step_run, lora_step_then_reference

from unigrpo.algo.guidance import cfg_blend
from unigrpo.algo.schedule import timesteps
from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.hf_qwenimage import NEGATIVE_PROMPT, QwenImage, qwenimage_schedule
from unigrpo.rollout import guided_velocity
from unigrpo.sampling import ode_sample

MAX_TEXT = 128  # model.max_text_tokens of qwen_overrides


def brightness(images, prompts, metadata):  # a reward for the CLI run ("test_hf_qwenimage:brightness")
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return QwenImagePipeline.from_pretrained(tiny_qwenimage_dir())


@pytest.fixture(scope="module")
def model():
    """The adapter without LoRA (the parity tests only read it)."""
    return model_of(0, 0)


def model_of(text_rank=4, image_rank=4, *extra):
    cfg = load_config(None, [*qwen_overrides(tiny_qwenimage_dir(), text_rank, image_rank), *extra])
    torch.manual_seed(0)
    return build_model(cfg, checkpoint=None)


def pipeline_conditioning(pipe, rows: list[torch.Tensor]):
    """The pipeline's ``_get_qwen_prompt_embeds`` + ``encode_prompt`` on given token rows (the
    tokenizer's right padding, the encoder's own positions, compaction, prefix dropped, cut)."""
    ids = torch.full((len(rows), max(map(len, rows))), pipe.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    hidden = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    split = [e[pipe.prompt_template_encode_start_idx:] for e in pipe._extract_masked_hidden(hidden, mask)]
    width = max(len(e) for e in split)
    emb = torch.stack([torch.cat([e, e.new_zeros(width - len(e), e.shape[1])]) for e in split])
    m = torch.stack([(torch.arange(width) < len(e)).long() for e in split])
    return emb[:, :MAX_TEXT], m[:, :MAX_TEXT]


def test_prompt_only_conditioning_equals_the_pipelines_encode_prompt(pipe, model):
    """The pipeline's template (system prompt), prefix dropped, compacted, its mask; bitwise."""
    tokens = model.encode(HF_PROMPTS)
    text = model.tokenizer.decode(tokens.ids[0][tokens.mask[0]].tolist())
    assert text == pipe.prompt_template_encode.format(HF_PROMPTS[0])
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        ref, ref_mask = pipe.encode_prompt(HF_PROMPTS, max_sequence_length=MAX_TEXT)
    n = tokens.mask.sum(1) - pipe.prompt_template_encode_start_idx
    assert ctx.hidden.shape == ref.shape == (3, int(n.max()), 32) and len(set(n.tolist())) > 1  # padding exercised
    assert torch.equal(ctx.mask.long(), ref_mask)
    err = (ctx.hidden - ref).abs().max().item()
    print(f"conditioning vs encode_prompt: max|diff| = {err:.3g}")
    assert err <= 1e-6


def test_conditioning_of_prompt_and_reasoning_is_the_pipelines_encoder_on_those_tokens(pipe, model):
    """Sampled reasoning (left-padded prompts + right-padded responses: holes) -> the conditioning
    is the encoder run the pipeline's way on each row's real tokens; also after the cut."""
    tokens = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=12,
                                    generator=torch.Generator().manual_seed(0))
    rows = [tokens.ids[i][tokens.mask[i]] for i in range(3)]
    assert len({len(r) for r in rows}) > 1 and int(tokens.response_mask.sum()) > 0
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        ref, ref_mask = pipeline_conditioning(pipe, rows)
        _, short = model_of(0, 0, "model.max_text_tokens=20").forward_context(tokens)
    assert torch.equal(ctx.mask.long(), ref_mask)
    assert (ctx.hidden - ref).abs().max().item() <= 1e-6
    assert short.hidden.shape[1] == 20 and torch.equal(short.hidden, ctx.hidden[:, :20])


def test_teacher_forced_log_probs_equal_the_decode_loops(model):
    """Qwen2.5-VL through our KV-cache decode loop (2-D positions expanded to the mrope axes) and the
    compacted teacher-forced pass give the same log-probs of the sampled reasoning."""
    tokens, logp_decode = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=10,
                                                 generator=torch.Generator().manual_seed(1), return_logprobs=True)
    with torch.no_grad():
        logp, _ = model.forward_context(tokens)
    err = (logp - logp_decode).abs().max().item()
    print(f"teacher-forced vs decode-loop log-probs: max|diff| = {err:.3g}")
    assert err <= 1e-5
    assert logp[tokens.response_mask].lt(0).all() and logp[~tokens.response_mask].eq(0).all()


@pytest.mark.parametrize("terminal", [0.02, None])
@pytest.mark.parametrize("num_steps", [4, 28])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096, 8192])
def test_schedule_equals_the_pipelines_sigmas(num_steps, seq_len, terminal):
    """calculate_shift (linear in image tokens) + exponential shift + shift_terminal on
    linspace(1, 1/n, n) == timesteps(n, exp(mu), terminal=shift_terminal)."""
    config = {**QWEN_SCHEDULER, "shift_terminal": terminal}
    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, 256, 8192, 0.5, 0.9)
    retrieve_timesteps(sched, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    shift, term = qwenimage_schedule(seq_len, dict(sched.config))
    assert shift == pytest.approx(math.exp(mu)) and term == terminal
    ours = timesteps(num_steps, shift, dtype=torch.float64, terminal=term)
    torch.testing.assert_close(sched.sigmas.double(), ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_steps", [4, 28])
def test_shift_null_is_the_pipelines_schedule(pipe, model, num_steps):
    """``sampler.shift: null`` (``own_timesteps``) == the pipeline's sigmas at the model's
    resolution, shift_terminal included (the pipeline's own mu from its latents)."""
    seq_len = model.latent_shape[1] * model.latent_shape[2]
    sc = pipe.scheduler.config
    mu = calculate_shift(seq_len, sc["base_image_seq_len"], sc["max_image_seq_len"], sc["base_shift"], sc["max_shift"])
    retrieve_timesteps(pipe.scheduler, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    grid = model.own_timesteps(num_steps)
    assert grid.dtype == torch.float32 and grid[-2].item() == pytest.approx(0.02)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, atol=1e-6, rtol=0)


def test_schedule_refuses_what_it_cannot_express():
    with pytest.raises(NotImplementedError, match="not a shift of our time grid"):
        qwenimage_schedule(64, {**QWEN_SCHEDULER, "time_shift_type": "linear"})
    assert qwenimage_schedule(64, {"shift": 2.5}) == (2.5, None)  # static shift without dynamic shifting


def pack(pipe, z):
    """The pipeline's ``latents`` argument from an unpacked VAE latent [B, z, H, W]."""
    b, c, h, w = z.shape
    return pipe._pack_latents(z, b, c, h, w)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_ode_sampler_reproduces_the_pipeline(pipe, model, cfg_scale):
    """Our Euler ODE (no noise) from the pipeline's initial latents == ``pipe(latents=...)``
    (latents and images): time map, sign, packing, img_shapes, the text mask, the schedule with
    shift_terminal, per-channel VAE statistics; with CFG also the pipeline's true CFG with its norm
    rescale (the plain combination would be off)."""
    n = 4
    z_init = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # the VAE's latent layout
    x_init = torch.nn.functional.pixel_unshuffle(z_init, 2)
    assert x_init.shape == (3, *model.latent_shape)
    torch.testing.assert_close(x_init.flatten(2).transpose(1, 2), pack(pipe, z_init), atol=0, rtol=0)
    with torch.no_grad():  # shift None: the model's own grid (own_timesteps)
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        x0 = ode_sample(model, ctx, n, None, cfg_scale=cfg_scale, x_init=x_init.clone())
        images = model.decode(x0)
        kw = {"prompt": HF_PROMPTS, "height": 32, "width": 32, "num_inference_steps": n, "true_cfg_scale": cfg_scale,
              "max_sequence_length": MAX_TEXT, "negative_prompt": NEGATIVE_PROMPT if cfg_scale > 1 else None}
        lat = pipe(latents=pack(pipe, z_init), output_type="latent", **kw).images
        img = pipe(latents=pack(pipe, z_init), output_type="pt", **kw).images
    ours = pack(pipe, torch.nn.functional.pixel_shuffle(x0, 2))
    e_lat, e_img = (ours - lat).abs().max().item(), (images - img).abs().max().item()
    print(f"ODE vs pipeline (cfg {cfg_scale}): latents max|diff| = {e_lat:.3g}, images {e_img:.3g}")
    assert img.shape == images.shape == (3, 3, 32, 32)
    assert e_lat <= 1e-5 and e_img <= 1e-5
    assert (x0 - x_init).abs().max() > 0.1  # the sampler moved
    if cfg_scale > 1:  # the rescale matters: the plain combination lands elsewhere
        class Plain:
            latent_shape, velocity, null_context = model.latent_shape, model.velocity, model.null_context
            timesteps, combine_guidance = model.timesteps, staticmethod(cfg_blend)  # the plain rule
        with torch.no_grad():
            plain = ode_sample(Plain(), ctx, n, None, cfg_scale=cfg_scale, x_init=x_init.clone())
        assert (plain - x0).abs().max() > 1e-3  # 100x the parity tolerance


def test_guided_velocity_uses_the_family_rule_for_policy_and_reference():
    """combine_guidance reaches guided_velocity through the policy and its reference alike; the
    guided velocity keeps the conditional one's norm per image token."""
    model = model_of()
    x, t = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(4)), torch.tensor([0.4, 0.8])
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS[:2]))
        null = model.null_context(2)
        g = guided_velocity(model, x, t, ctx, null, 3.0)
        g_ref = guided_velocity(model.reference(), x, t, ctx, null, 3.0)
        v = model.velocity(x, t, ctx)
    assert torch.equal(g, g_ref)  # LoRA B = 0: the reference is the policy, and guides the same way
    torch.testing.assert_close(g.norm(dim=1), v.norm(dim=1), atol=1e-5, rtol=1e-5)


def test_encode_images_is_the_pipelines_vae_encode_normalisation(pipe, model, monkeypatch):
    """encode_images == img2img's _encode_vae_image (frame axis, per-channel mean / std) at the
    latent mode, patchified; decode inverts the normalisation (decode of encode stays close)."""
    from functools import partial

    monkeypatch.setattr(pipeline_qwenimage_img2img, "retrieve_latents",
                        partial(pipeline_qwenimage_img2img.retrieve_latents, sample_mode="argmax"))
    img2img = QwenImageImg2ImgPipeline(**pipe.components)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = img2img._encode_vae_image((images * 2 - 1).unsqueeze(2), generator=None)[:, :, 0]
        z = model.encode_images(images)
    assert z.shape == (2, *model.latent_shape)
    torch.testing.assert_close(z, torch.nn.functional.pixel_unshuffle(ref, 2), atol=1e-6, rtol=0)
    cfg = model.vae.config
    assert not torch.allclose(torch.tensor(cfg.latents_mean), torch.zeros(4))  # the statistics are exercised


def test_a_padded_batch_equals_its_rows_alone(model):
    """A row's log-probs, conditioning and velocity do not depend on the rows batched with it
    (the compaction + the text mask; masked text tokens do not reach the image tokens)."""
    tokens = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=10,
                                    generator=torch.Generator().manual_seed(5))
    x = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        logp, ctx = model.forward_context(tokens)
        v = model.velocity(x, t, ctx)
        worst = 0.0
        for i in range(3):
            keep = tokens.mask[i] | tokens.response_mask[i]
            cols = torch.nonzero(keep)[:, 0]
            alone = type(tokens)(tokens.ids[i:i + 1, cols], tokens.mask[i:i + 1, cols],
                                 tokens.response_mask[i:i + 1, cols])
            lp_i, ctx_i = model.forward_context(alone)
            v_i = model.velocity(x[i:i + 1], t[i:i + 1], ctx_i)
            n = ctx_i.hidden.shape[1]
            torch.testing.assert_close(lp_i[0], logp[i, cols], atol=1e-5, rtol=0)
            torch.testing.assert_close(ctx_i.hidden[0], ctx.hidden[i, :n], atol=1e-5, rtol=0)
            assert not ctx.mask[i, n:].any()
            worst = max(worst, (v_i[0] - v[i]).abs().max().item())
    print(f"velocity of a row alone vs in its padded batch: max|diff| = {worst:.3g}")
    assert worst <= 1e-5


def test_lora_step_moves_only_lora_and_reference_is_the_base():
    """After an update only LoRA weights changed (base bit-identical); the reference (adapters
    off) equals a model without LoRA built from the same pipeline."""
    model, _, prompts = qwenimage_factory(seed=0)
    base = model_of(0, 0)
    tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=6,
                                    generator=torch.Generator().manual_seed(1))
    assert not any("visual" in n for n, _ in model.parameter_groups()["text"])  # LoRA on the LM, not the vision tower
    lora_step_then_reference(model, base, tokens)


def test_configuration_errors_name_the_key(pipe):
    with pytest.raises(ValueError, match="model.hidden_layers: \\[1, 2\\] give 64 channels, the transformer reads 32"):
        model_of(0, 0, "model.hidden_layers=[1,2]")
    with pytest.raises(ValueError, match="model.resolution: must be a positive multiple of 16"):
        model_of(0, 0, "model.resolution=36")
    with pytest.raises(NotImplementedError, match="shift_terminal=0.02.*set sampler.shift=null"):
        model_of(0, 0).pipeline_shift(4)
    m = model_of(0, 0)
    assert isinstance(m, QwenImage)
    with pytest.raises(ValueError, match="model.pipeline: its template is \\d+ tokens .* than the 500 the pipeline drops"):
        QwenImage(m.lm, m.tokenizer, m.dit, m.vae, m.scheduler_config, resolution=32, template=m.template,
                  drop_idx=500, tokenizer_max_length=1024, hidden_layers=(-1,), max_text_tokens=128)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cli_train_one_lora_step_ratio_exactly_one(tmp_path, cfg_scale):
    """`unigrpo train model.kind=hf ... task.kind=prompts` on the tiny Qwen-Image folder offline,
    the pipeline's schedule (``sampler.shift: null``): the first update's log-probs equal the
    rollout's (ratio exactly 1, text and image), also when rollout and training are guided with the
    family's true CFG (policy and reference); the saved LoRA weights load back."""

    os.environ["HF_HUB_OFFLINE"] = "1"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    out = tmp_path / "run"
    args = ["train", *qwen_overrides(tiny_qwenimage_dir()), "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: 'test_hf_qwenimage:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=2", "algo.micro_batch_trajectories=2", "sampler.num_steps=4",
            "sampler.window_range=[0,3]", "sampler.window_size=2", "sampler.shift=null",
            "sampler.eval_num_steps=2", "eval.num_prompts=2",
            "eval.grid_prompts=2", "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-3",
            "optim.lr_image=1e-3", f"sampler.cfg_scale={cfg_scale}", f"output_dir={out}", "steps=1"]
    assert main(args) == 0
    saved = check_one_lora_step_run(out)
    loaded = build_model(load_config(None, qwen_overrides(tiny_qwenimage_dir())),
                         checkpoint=str(out / "final.safetensors"))
    assert all(torch.equal(loaded.trainable_state()[k], v) for k, v in saved.items())


def test_a_left_padding_tokenizer_gives_what_the_pipeline_computes_with_it(tmp_path):
    """A pipeline saved with a tokenizer that pads on the LEFT: its ``encode_prompt`` (Qwen2.5-VL
    positions from the mask, then compaction) is the right-padded one, and so is ours, built from
    that folder -- prompts only and with sampled reasoning rows padded on the left."""
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_qwenimage_dir(), folder)
    conf = folder / "tokenizer" / "tokenizer_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "padding_side": "left"}))
    left = QwenImagePipeline.from_pretrained(folder)
    assert left.tokenizer.padding_side == "left"
    cfg = load_config(None, [*qwen_overrides(str(folder), 0, 0)])
    torch.manual_seed(0)
    model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        ref, ref_mask = left.encode_prompt(HF_PROMPTS, max_sequence_length=MAX_TEXT)
    assert torch.equal(ctx.mask.long(), ref_mask) and (ctx.hidden - ref).abs().max().item() <= 1e-5
    tokens = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=12,
                                    generator=torch.Generator().manual_seed(0))
    rows = [tokens.ids[i][tokens.mask[i]] for i in range(3)]
    width = max(map(len, rows))
    ids = torch.full((3, width), left.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # the left-padding tokenizer's layout
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        hidden = left.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    split = [e[left.prompt_template_encode_start_idx:] for e in left._extract_masked_hidden(hidden, mask)]
    for i, e in enumerate(split):
        assert (ctx.hidden[i, :len(e)] - e[:MAX_TEXT]).abs().max().item() <= 1e-5
