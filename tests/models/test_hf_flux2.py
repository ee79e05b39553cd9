"""``model.kind: hf`` on a tiny random FLUX.2 [klein] pipeline (built from components, saved with
``save_pretrained``, loaded offline): parity with the pipeline's own ``encode_prompt``, scheduler
and ``__call__``; ratio == 1 on the first update through the CLI; LoRA touches only LoRA weights
and its reference is the base model. The protocol itself: test_conformance.py (``ADAPTERS["hf"]``)."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import HF_LAYERS, HF_PROMPTS, hf_factory, hf_overrides, tiny_flux2_dir
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from testkit import check_one_lora_step_run, lora_loss_grads, lora_step_then_reference

from unigrpo.algo.schedule import timesteps
from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.models import build_model
from unigrpo.models.hf_flux2 import flux2_shift
from unigrpo.sampling import ode_sample

MAX_TEXT = 48  # model.max_text_tokens of hf_overrides


def brightness(images, prompts, metadata):  # a reward for the CLI run ("test_hf_flux2:brightness")
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return Flux2KleinPipeline.from_pretrained(tiny_flux2_dir())


def model_of(text_rank=4, image_rank=4, *extra):
    cfg = load_config(None, [*hf_overrides(tiny_flux2_dir(), text_rank, image_rank), *extra])
    torch.manual_seed(0)
    return build_model(cfg, checkpoint=None)


def test_config_checks():
    base = hf_overrides(tiny_flux2_dir())
    with pytest.raises(ValueError, match="^model.reasoner: Flux2KleinPipeline reasons with its own text encoder"):
        build_model(load_config(None, [*base, "model.reasoner=my_lm"]))  # separate mode: SD3 (test_hf_sd3.py)
    with pytest.raises(ConfigError, match="model.pipeline"):
        load_config(None, ["model.kind=hf"])
    with pytest.raises(ConfigError, match="model.image_size"):  # a tiny key is unknown for kind=hf
        load_config(None, [*base, "model.image_size=32"])


def test_prompt_only_conditioning_equals_the_pipelines_encode_prompt(pipe):
    """(a) enable_thinking=False is the pipeline's template: prompt-only conditioning == encode_prompt."""
    model = model_of(4, 4, "model.enable_thinking=false")
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        ref, _ = pipe.encode_prompt(HF_PROMPTS, max_sequence_length=MAX_TEXT, text_encoder_out_layers=HF_LAYERS)
    assert ctx.hidden.shape == ref.shape == (3, MAX_TEXT, 64)
    err = (ctx.hidden - ref).abs().max().item()
    print(f"conditioning vs encode_prompt: max|diff| = {err:.3g}")
    assert err <= 1e-6


def test_conditioning_of_prompt_and_reasoning_is_the_pipelines_encoder_on_those_tokens(pipe):
    """With thinking (the default template) and sampled reasoning: the conditioning is the text
    encoder run the pipeline's way (right-padded to max_sequence_length, pad mask, stacked layers)
    on each row's prompt + reasoning tokens."""
    model = model_of()
    tokens = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=8,
                                    generator=torch.Generator().manual_seed(0))
    assert model.tokenizer.decode(tokens.ids[0][tokens.mask[0]].tolist()).startswith(
        "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.full((3, MAX_TEXT), model.pad_id)
    mask = torch.zeros(3, MAX_TEXT, dtype=torch.long)
    for i in range(3):
        real = tokens.ids[i][tokens.mask[i]]
        ids[i, :len(real)], mask[i, :len(real)] = real, 1
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        out = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    ref = torch.cat([out.hidden_states[k] for k in HF_LAYERS], -1)
    assert (ctx.hidden - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("num_steps", [4, 28])
@pytest.mark.parametrize("seq_len", [64, 1024, 4096, 8192])
def test_schedule_equals_the_pipelines_sigmas(pipe, num_steps, seq_len):
    """Empirical mu + exponential dynamic shift on linspace(1, 1/n, n) == timesteps(n, exp(mu))."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    retrieve_timesteps(pipe.scheduler, num_steps, "cpu", sigmas=sigmas, mu=compute_empirical_mu(seq_len, num_steps))
    ours = timesteps(num_steps, flux2_shift(seq_len, num_steps, dict(pipe.scheduler.config)), dtype=torch.float64)
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), ours, atol=1e-6, rtol=0)


def test_shift_null_is_the_pipelines_schedule(pipe):
    """``sampler.shift: null`` samples on the pipeline's own grid at the model's resolution."""
    model = model_of()
    tokens = model.latent_shape[1] * model.latent_shape[2]  # image tokens at model.resolution
    for n in (4, 28):
        sigmas = np.linspace(1.0, 1 / n, n)
        retrieve_timesteps(pipe.scheduler, n, "cpu", sigmas=sigmas, mu=compute_empirical_mu(tokens, n))
        torch.testing.assert_close(model.timesteps(n, None).double(), pipe.scheduler.sigmas.double(),
                                   atol=1e-6, rtol=0)
    assert torch.equal(model.timesteps(4, 3.0), timesteps(4, 3.0))
    load_config(None, [*hf_overrides(tiny_flux2_dir()), "sampler.shift=null"])  # valid for kind=hf
    with pytest.raises(ConfigError, match="sampler.shift: null .*needs a model that has one"):
        load_config(None, ["sampler.shift=null"])


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg3"])
def test_ode_sampler_reproduces_the_pipeline(pipe, guidance):
    """(b) Our Euler ODE (no noise) from the pipeline's initial latents == the pipeline's
    ``__call__`` (latents and decoded images): time map, velocity sign, packing, BatchNorm; with
    CFG (``cfg_scale`` = the pipeline's ``guidance_scale``) also our null context == its negative
    prompt "" and our guidance == its ``neg + g (pos - neg)``."""
    model = model_of(4, 4, "model.enable_thinking=false")
    n = 4
    x_init = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        x0 = ode_sample(model, ctx, n, model.pipeline_shift(n), x_init=x_init.clone(), cfg_scale=guidance)
        images = model.decode(x0)
        kw = {"prompt": HF_PROMPTS, "height": 32, "width": 32, "num_inference_steps": n, "guidance_scale": guidance,
              "max_sequence_length": MAX_TEXT, "text_encoder_out_layers": HF_LAYERS}
        lat = pipe(latents=x_init.clone(), output_type="latent", **kw).images
        img = pipe(latents=x_init.clone(), output_type="pt", **kw).images
    mean, std = model._bn(x0)
    ours_lat = torch.nn.functional.pixel_shuffle(x0 * std + mean, 2)
    e_lat, e_img = (ours_lat - lat).abs().max().item(), (images - img).abs().max().item()
    print(f"ODE vs pipeline (guidance {guidance}): latents max|diff| = {e_lat:.3g}, images {e_img:.3g}")
    assert lat.shape == ours_lat.shape and img.shape == images.shape == (3, 3, 32, 32)
    assert e_lat <= 1e-5 and e_img <= 1e-5
    assert (x0 - x_init).abs().max() > 0.1  # the sampler moved


def test_encode_images_inverts_the_normalisation(pipe):
    """encode_images = the pipeline's _encode_vae_image (patchify + BatchNorm statistics)."""
    model = model_of()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe._encode_vae_image(images * 2 - 1, generator=None)
        z = model.encode_images(images)
    assert z.shape == (2, *model.latent_shape)
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=0)


def test_lora_step_moves_only_lora_and_reference_is_the_base():
    """(d) After an update only LoRA weights changed (base bit-identical); the reference (adapters
    off) equals a model without LoRA built from the same pipeline."""
    model, _, prompts = hf_factory(seed=0)
    base = model_of(0, 0)
    tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=6,
                                    generator=torch.Generator().manual_seed(1))
    # (the policy's log-probs, taken after the reference calls, differ from the base's: the
    # reference left the adapters on)
    x, t, _, _, c_ref = lora_step_then_reference(model, base, tokens)
    ref = model.reference()
    text = [p for _, p in model.parameter_groups()["text"]]
    for p in text:  # a frozen side (algo.train_text=false) stays frozen through reference calls
        p.requires_grad_(False)
    ref.forward_context(tokens)
    ref.velocity(x, t, c_ref)
    assert not any(p.requires_grad for p in text)
    assert all(p.requires_grad for _, p in model.parameter_groups()["image"])


def test_full_fine_tune_side_trains_everything_and_references_a_snapshot():
    """A fully trained side's reference is a snapshot of its tensors (by the names of the trainable
    state), the LoRA side's nothing (its adapters are switched off)."""
    model = model_of(0, 4)
    groups = model.parameter_groups()
    assert len(groups["text"]) == len(list(model.lm.parameters()))
    assert all("lora_" in n for n, _ in groups["image"])
    ref = model.reference()
    assert set(ref.state_dict()) == {n for n, _ in groups["text"]} == {f"lm.{k}" for k, _ in model.lm.named_parameters()}


def cli_args(tmp_path, text_rank=4, image_rank=4) -> list[str]:
    """A 2-prompt x 2-trajectory run on the tiny pipeline, prompts from a JSONL file."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    shift = flux2_shift(8 * 8, 4, {"use_dynamic_shifting": True})  # 32 px: 8 x 8 latent tokens, 4 steps
    return ["train", *hf_overrides(tiny_flux2_dir(), text_rank, image_rank), "task.kind=prompts",
            f"task.prompts={prompts}", "rewards=[{name: 'test_hf_flux2:brightness'}]",
            "algo.prompts_per_step=2", "algo.group_size=2", "algo.trajectories_per_minibatch=2",
            "algo.micro_batch_trajectories=2", "sampler.num_steps=4", "sampler.window_range=[0,3]",
            "sampler.window_size=2", f"sampler.shift={shift}", "sampler.eval_num_steps=2", "eval.num_prompts=2",
            "eval.grid_prompts=2", "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-3",
            "optim.lr_image=1e-3"]


def test_cli_train_one_lora_step_ratio_exactly_one(tmp_path):
    """(c) + done-when: `unigrpo train model.kind=hf ... task.kind=prompts` runs on the tiny
    pipeline folder offline; the first update's log-probs equal the rollout's (ratio exactly 1)."""
    out = tmp_path / "run"
    assert main([*cli_args(tmp_path), f"output_dir={out}", "steps=1"]) == 0
    saved = check_one_lora_step_run(out)
    loaded = build_model(load_config(None, hf_overrides(tiny_flux2_dir())), checkpoint=str(out / "final.safetensors"))
    assert all(torch.equal(loaded.trainable_state()[k], v) for k, v in saved.items())


def test_cli_resume_with_a_fully_trained_text_side_equals_an_uninterrupted_run(tmp_path):
    """2 steps == 1 step + --resume 1 step, bitwise, with text_rank=0 (whole LM trained, its
    reference a frozen copy saved with the run) and LoRA on the transformer."""
    from safetensors.torch import load_file

    args = [*cli_args(tmp_path, text_rank=0, image_rank=4), "save_every=1", "eval_every=0"]
    assert main([*args, f"output_dir={tmp_path / 'a'}", "steps=2"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'b'}", "steps=1"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'b'}", "steps=2", "--resume"]) == 0
    a, b = load_file(str(tmp_path / "a" / "final.safetensors")), load_file(str(tmp_path / "b" / "final.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("lm.") and "lora_" not in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_changes_no_gradient():
    plain, ckpt = model_of(), model_of(4, 4, "model.gradient_checkpointing=true")
    assert ckpt.lm.training and not plain.lm.training  # build_model's eval() kept the LM checkpointing
    tokens = plain.sample_reasoning(plain.encode(HF_PROMPTS), max_new_tokens=6,
                                    generator=torch.Generator().manual_seed(2))
    x, t = torch.randn((3, *plain.latent_shape), generator=torch.Generator().manual_seed(2)), torch.tensor(0.5)
    calls = []
    for module in (ckpt.lm.model.layers[0].self_attn, ckpt.dit.transformer_blocks[0].attn):  # recomputed in backward
        module.register_forward_hook(lambda mod, *_: calls.append(type(mod).__name__))
    grads = [lora_loss_grads(m, tokens, x, t) for m in (plain, ckpt)]
    assert len(calls) == 4, calls  # each hooked block ran twice: forward + recompute
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_rows_longer_than_max_text_tokens_are_scored_in_full_and_cut_for_the_conditioning():
    """As the pipeline truncates at max_sequence_length: the conditioning is the first
    ``max_text_tokens`` positions, while the log-probs still cover the whole reasoning."""
    wide, short = model_of(), model_of(4, 4, "model.max_text_tokens=8")
    tokens = wide.sample_reasoning(wide.encode(HF_PROMPTS), max_new_tokens=8,
                                   generator=torch.Generator().manual_seed(3))
    assert int(tokens.mask.sum(1).min()) > 8
    with torch.no_grad():
        lp_w, c_w = wide.forward_context(tokens)
        lp_s, c_s = short.forward_context(tokens)
    assert c_s.hidden.shape[1] == 8 and c_s.mask.all()
    torch.testing.assert_close(lp_s, lp_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_s.hidden, c_w.hidden[:, :8], atol=1e-6, rtol=0)


def test_hidden_layers_the_text_encoder_lacks_are_a_clear_error():
    """The pipeline's default layers (9, 18, 27) on the tiny 2-layer LM: one error naming the key
    (it was an IndexError deep inside the first rollout)."""
    from unigrpo.config import load_config
    from unigrpo.models import build_model

    args = [a for a in hf_overrides(tiny_flux2_dir()) if not a.startswith("model.hidden_layers")]
    with pytest.raises(ValueError, match=r"^model.hidden_layers: \[9, 18, 27\] do not exist in a text encoder with 3"):
        build_model(load_config(None, args))


def test_a_broken_checkpoint_is_refused_in_one_line(tmp_path):
    """``build_model(cfg, checkpoint=F)`` checks the file before copying: NaN, a shape that does
    not fit (another LoRA rank), garbage; each is one line naming the file and the tensor."""
    from safetensors.torch import save_file

    from unigrpo.utils.errors import CheckpointError

    model, cfg, _ = hf_factory(seed=0)
    good = tmp_path / "good.safetensors"
    model.save(good)
    torch.manual_seed(0)
    assert build_model(cfg, checkpoint=str(good)) is not None
    state = model.trainable_state()
    name = min(state)
    for label, change, match in [
        ("nan", lambda st: st[name].fill_(float("nan")), f"tensor {name} holds NaN/inf"),
        ("shape", lambda st: st.__setitem__(name, torch.zeros(1, 2)), f"tensor {name} has shape \\[1, 2\\]"),
        ("names", lambda st: st.pop(name), "does not fit the model: missing"),
    ]:
        broken = {k: v.clone() for k, v in state.items()}
        change(broken)
        path = tmp_path / f"{label}.safetensors"
        save_file(broken, str(path))
        with pytest.raises(CheckpointError, match=match) as err:
            build_model(cfg, checkpoint=str(path))
        assert "\n" not in str(err.value)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        build_model(cfg, checkpoint=str(tmp_path / "garbage.safetensors"))


def test_bfloat16_weights_keep_lora_and_every_output_in_float32():
    """``model.dtype=bfloat16`` (the GPU setting, run here once on CPU at tiny size): the base
    weights are bf16, the LoRA weights the optimizer steps are float32 (peft's adapter dtype), and
    what the SDE / log-prob math reads is float32: token log-probs, velocities, decoded images."""
    model = model_of(4, 4, "model.dtype=bfloat16")
    assert model.lm.model.embed_tokens.weight.dtype == model.dit.dtype == torch.bfloat16
    trained = [p for g in model.parameter_groups().values() for _, p in g]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    with torch.no_grad():
        tokens = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=4,
                                        generator=torch.Generator().manual_seed(0))
        logp, ctx = model.forward_context(tokens)
        x = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
        v = model.velocity(x, torch.full((3,), 0.5), ctx)
        image = model.decode(x)
    assert logp.dtype == v.dtype == image.dtype == torch.float32
    assert torch.isfinite(logp).all() and torch.isfinite(v).all() and v.abs().max() > 0
    assert (logp[tokens.response_mask] < 0).all()
    full_text = model_of(0, 4, "model.dtype=bfloat16")  # a fully trained side keeps float32 master weights
    assert all(p.dtype == torch.float32 for _, p in full_text.parameter_groups()["text"])
    assert full_text.dit.dtype == torch.bfloat16


def test_batch_groups_samples_each_groups_own_tokens_in_one_loop():
    """``text.batch_groups`` (the default): the rollout's groups decode in one loop, group p drawing
    from its own generator ``seeds[p]``: the same reasoning as one loop per group (here token for
    token), in fewer model calls."""
    from unigrpo import rollout as R

    model, _, prompts = hf_factory(seed=0)
    calls = []
    model.lm.register_forward_hook(lambda *a: calls.append(1))
    kw = {"thinking": True, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
    with torch.no_grad():
        alone = R.sample_reasoning(model, prompts, 3, [11, 12, 13], batch_groups=False, **kw)
        n_alone = len(calls)
        together = R.sample_reasoning(model, prompts, 3, [11, 12, 13], batch_groups=True, **kw)
    assert model.decode_text(alone) == model.decode_text(together)
    assert len(set(model.decode_text(alone))) > 3  # groups (and rows within them) differ
    assert len(calls) - n_alone < n_alone / 2  # one loop instead of three


@pytest.fixture(scope="module")
def left_dir(tmp_path_factory):
    """The tiny pipeline saved with a tokenizer that pads on the LEFT (as after generation)."""
    import shutil

    folder = tmp_path_factory.mktemp("left") / "pipe"
    shutil.copytree(tiny_flux2_dir(), folder)
    conf = folder / "tokenizer" / "tokenizer_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "padding_side": "left"}))
    return str(folder)


@pytest.mark.parametrize("thinking", [False, True])
def test_a_left_padding_tokenizer_gives_what_the_pipeline_computes_with_it(left_dir, thinking):
    """The pipeline pads on the tokenizer's side as saved: with left padding its conditioning holds
    the pads first. Ours equals ``encode_prompt`` of that pipeline (prompts only), its text encoder
    on the left-padded prompt + reasoning rows, and the log-probs do not depend on the side."""
    left = Flux2KleinPipeline.from_pretrained(left_dir)
    assert left.tokenizer.padding_side == "left"
    cfg = load_config(None, [*hf_overrides(left_dir), f"model.enable_thinking={str(thinking).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg, checkpoint=None)
    if not thinking:
        with torch.no_grad():
            _, ctx = model.forward_context(model.encode(HF_PROMPTS))
            ref, _ = left.encode_prompt(HF_PROMPTS, max_sequence_length=MAX_TEXT, text_encoder_out_layers=HF_LAYERS)
        assert (ctx.hidden - ref).abs().max().item() <= 1e-6
        return
    tokens = model.sample_reasoning(model.encode(HF_PROMPTS), max_new_tokens=8,
                                    generator=torch.Generator().manual_seed(0))
    ids = torch.full((3, MAX_TEXT), model.pad_id)
    mask = torch.zeros(3, MAX_TEXT, dtype=torch.long)
    for i in range(3):
        real = tokens.ids[i][tokens.mask[i]]
        ids[i, MAX_TEXT - len(real):], mask[i, MAX_TEXT - len(real):] = real, 1
    right = model_of()  # the same weights (seed 0, LoRA B = 0) with the right-padding tokenizer
    with torch.no_grad():
        logp, ctx = model.forward_context(tokens)
        logp_right, _ = right.forward_context(tokens)
        out = left.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    ref = torch.cat([out.hidden_states[k] for k in HF_LAYERS], -1)
    assert (ctx.hidden - ref).abs().max().item() <= 1e-6
    assert (logp != 0).any() and (logp - logp_right).abs().max().item() <= 1e-5


def test_cli_one_step_with_the_opt_in_decode_has_ratio_exactly_one(tmp_path):
    """``text.token_sampler=inverse_cdf`` + ``text.static_cache``: the rollout decodes on a StaticKV with
    the inverse-CDF sampler, and the first update's log-probs still equal the rollout's."""
    out = tmp_path / "run"
    assert main([*cli_args(tmp_path), f"output_dir={out}", "steps=1", "text.token_sampler=inverse_cdf",
                 "text.static_cache=true"]) == 0
    check_one_lora_step_run(out)


def test_the_opt_in_decode_reaches_the_reasoner():
    cfg = load_config(None, [*hf_overrides(tiny_flux2_dir()), "text.token_sampler=inverse_cdf", "text.compile=true"])
    model = build_model(cfg, checkpoint=None)
    assert model.token_sampler == "inverse_cdf" and model.reasoner.static_cache and model.reasoner.compile
