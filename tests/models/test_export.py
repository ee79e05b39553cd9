"""``unigrpo export`` (docs/after_training.md) on every tiny model: after a 2-step LoRA CLI run, the
exported LoRA loaded with the pipeline's own ``load_lora_weights`` (+ the text LoRA with peft) and
the merged export loaded with ``from_pretrained`` give the image our model gives with the run's
checkpoint, from the same latents, CFG-free and with CFG (max |diff| <= 1e-5); the Bagel export
loads with ``build_model`` and reproduces the policy's velocity and reasoning log-probs; the
tiny model exports its standalone file. Plus the refusals (non-empty --out, wrong base, altered
file), each one line with exit 2."""

import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import (
    HF_LAYERS,
    HF_PROMPTS,
    TINY,
    bagel_factory,
    bagel_overrides,
    hf_overrides,
    qwen_overrides,
    sd3_overrides,
    tiny_bagel_dir,
    tiny_flux2_dir,
    tiny_qwenimage_dir,
    tiny_sd3_dirs,
)
from diffusers import DiffusionPipeline
from peft import PeftModel

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.sampling import ode_sample
from unigrpo.utils.errors import CheckpointError

TOL = 1e-5


def trained_run(tmp_path, family) -> str:
    """A 2-step LoRA run of ``family``'s CLI arguments (its test module's ``cli_args``)."""
    import importlib

    if family == "qwenimage":  # its module has no cli_args: flux2's run on the Qwen-Image folder
        from test_hf_flux2 import cli_args

        args = [*(a for a in cli_args(tmp_path) if not a.startswith("model.")),
                *qwen_overrides(tiny_qwenimage_dir()), "sampler.shift=null",
                "rewards=[{name: 'test_hf_qwenimage:brightness'}]"]
    else:
        args = importlib.import_module(f"test_hf_{family}").cli_args(tmp_path)
    out = tmp_path / "run"
    assert main([*args, f"output_dir={out}", "steps=2", "eval_every=0"]) == 0
    return str(out)


def exported(run, tmp_path, fmt) -> str:
    out = tmp_path / fmt
    assert main(["export", run, "--out", str(out), "--format", fmt]) == 0
    return str(out)


def lora_pipeline(base, folder, text=None):
    """The base pipeline + the exported image LoRA (diffusers) + text LoRA (peft, in place)."""
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(folder)
    if text is not None:
        PeftModel.from_pretrained(text, os.path.join(folder, "text_encoder"))  # injects into `text` itself
    return pipe


def images_flux2(model, pipe, cfg_scale):
    n = 4
    x_init = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        ours = model.decode(ode_sample(model, ctx, n, model.pipeline_shift(n), x_init=x_init.clone(),
                                       cfg_scale=cfg_scale))
        theirs = pipe(prompt=HF_PROMPTS, height=32, width=32, num_inference_steps=n, guidance_scale=cfg_scale,
                      max_sequence_length=48, text_encoder_out_layers=HF_LAYERS, latents=x_init.clone(),
                      output_type="pt").images
    return ours, theirs


def images_qwenimage(model, pipe, cfg_scale):
    from test_hf_qwenimage import MAX_TEXT, NEGATIVE_PROMPT, pack

    n = 4
    z_init = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(HF_PROMPTS))
        ours = model.decode(ode_sample(model, ctx, n, None, cfg_scale=cfg_scale,
                                       x_init=torch.nn.functional.pixel_unshuffle(z_init, 2)))
        theirs = pipe(prompt=HF_PROMPTS, height=32, width=32, num_inference_steps=n, true_cfg_scale=cfg_scale,
                      max_sequence_length=MAX_TEXT, negative_prompt=NEGATIVE_PROMPT if cfg_scale > 1 else None,
                      latents=pack(pipe, z_init), output_type="pt").images
    return ours, theirs


def images_sd3(model, pipe, cfg_scale):
    from test_hf_sd3 import run_both

    texts = [f"{p} the sky is blue" for p in HF_PROMPTS]
    x_init = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    _, ours, _, theirs = run_both(model, pipe, texts, x_init, 4, cfg_scale)
    return ours, theirs


FAMILIES = {  # family -> (our model's overrides, base pipeline, image parity, guidance with CFG)
    "flux2": (lambda: [*hf_overrides(tiny_flux2_dir()), "model.enable_thinking=false"], tiny_flux2_dir,
              images_flux2, 3.0),
    "qwenimage": (lambda: qwen_overrides(tiny_qwenimage_dir()), tiny_qwenimage_dir, images_qwenimage, 4.0),
    "sd3": (lambda: sd3_overrides(), lambda: tiny_sd3_dirs()[0], images_sd3, 4.0),
}


def text_logits(lm, tokens):
    with torch.no_grad():
        return lm(input_ids=tokens.ids, attention_mask=tokens.mask.long()).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_lora_and_merged_pipelines_draw_what_the_policy_draws(tmp_path, family):
    os.environ["HF_HUB_OFFLINE"] = "1"
    overrides, base, images, cfg = FAMILIES[family]
    run = trained_run(tmp_path, family)
    ours = build_model(load_config(None, overrides()), checkpoint=os.path.join(run, "final.safetensors"))
    assert any(v.abs().max() > 0 for k, v in ours.trainable_state().items() if "lora_B" in k)  # it trained
    lora, merged = exported(run, tmp_path, "lora"), exported(run, tmp_path, "merged")
    shared = ours.mode == "shared"
    errors = {}
    # the LoRA export: pipeline's own loader (image) + peft (the text encoder, shared mode)
    pipe = DiffusionPipeline.from_pretrained(base())
    pipe.load_lora_weights(lora)
    if shared:
        PeftModel.from_pretrained(pipe.text_encoder, os.path.join(lora, "text_encoder"))
    for scale in (1.0, cfg):
        a, b = images(ours, pipe, scale)
        errors[f"lora cfg {scale}"] = (a - b).abs().max().item()
    merged_pipe = DiffusionPipeline.from_pretrained(merged)
    for scale in (1.0, cfg):
        a, b = images(ours, merged_pipe, scale)
        errors[f"merged cfg {scale}"] = (a - b).abs().max().item()
    # the text side: the reasoner's logits (separate mode: the peft folder / merged folder)
    tokens = ours.encode(HF_PROMPTS)
    if not shared:
        from transformers import AutoModelForCausalLM

        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_sd3_dirs()[1]),
                                       os.path.join(lora, "reasoner"))
        errors["lora reasoner logits"] = (text_logits(lm, tokens) - text_logits(ours.lm, tokens)).abs().max().item()
        lm = AutoModelForCausalLM.from_pretrained(os.path.join(merged, "reasoner"))
        errors["merged reasoner logits"] = (text_logits(lm, tokens) - text_logits(ours.lm, tokens)).abs().max().item()
    print(f"{family}: max|diff| " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    assert all(v <= TOL for v in errors.values()), errors


def test_bagel_export_loads_with_build_model_and_reproduces_the_policy(tmp_path):
    """The released layout with the trained weights merged: velocity and reasoning log-probs."""
    model, cfg, prompts = bagel_factory(seed=0, text_rank=0, image_rank=4)
    with torch.no_grad():  # a trained policy: LoRA B non-zero, und weights moved (bagel_factory)
        for n, p in model.parameter_groups()["image"]:
            p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "final.safetensors", extra={"rl_step": 2})
    out = tmp_path / "bagel"
    assert main(["export", str(tmp_path / "final.safetensors"), "--out", str(out)]) == 0
    assert {"ema.safetensors", "ae.safetensors", "llm_config.json", "tokenizer.json"} <= set(os.listdir(out))
    again = build_model(load_config(None, [*cfg_overrides(cfg), f"model.path={out}", "model.lora.image_rank=0"]),
                        checkpoint=None)
    tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    x = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        (lp1, c1), (lp2, c2) = model.forward_context(tokens), again.forward_context(tokens)
        v1, v2 = model.velocity(x, t, c1), again.velocity(x, t, c2)
    e_lp, e_v = (lp1 - lp2).abs().max().item(), (v1 - v2).abs().max().item()
    print(f"bagel export: log-probs max|diff| {e_lp:.3g}, velocity {e_v:.3g}")
    assert e_lp <= TOL and e_v <= TOL and v1.abs().max() > 0
    data = bytearray((out / "ema.safetensors").read_bytes())  # a flipped bit in the export: refused at load
    data[-5] ^= 0x01
    (out / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^{out / 'ema.safetensors'}: content hash does not match"):
        build_model(load_config(None, [*cfg_overrides(cfg), f"model.path={out}", "model.lora.image_rank=0"]))


def test_bagel_lora_export_is_a_peft_folder_for_the_mot(tmp_path):
    """Both experts LoRA: ``--format lora`` writes ``language_model/``, which peft loads onto the
    released model (built with LoRA ranks 0) to reproduce the policy."""

    model, _, prompts = bagel_factory(seed=0, text_rank=4, image_rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "final.safetensors")
    out = tmp_path / "lora"
    assert main(["export", str(tmp_path), "--out", str(out), "--format", "lora"]) == 0
    base = build_model(load_config(None, bagel_overrides(tiny_bagel_dir(), 0, 0)), checkpoint=None)
    PeftModel.from_pretrained(base.language_model, str(out / "language_model"))
    tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    x = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        (lp1, c1), (lp2, c2) = model.forward_context(tokens), base.forward_context(tokens)
        e_lp, e_v = (lp1 - lp2).abs().max().item(), (model.velocity(x, t, c1) - base.velocity(x, t, c2)).abs().max().item()
    print(f"bagel lora export: log-probs max|diff| {e_lp:.3g}, velocity {e_v:.3g}")
    assert e_lp <= TOL and e_v <= TOL and lp1.abs().max() > 0


def cfg_overrides(cfg) -> list[str]:
    m = cfg.model
    return ["model.kind=bagel", f"model.lora.text_rank={m.lora.text_rank}", f"model.resolution={m.resolution}",
            "device=cpu"]


def test_tiny_export_is_the_standalone_checkpoint_and_refusals_are_one_line(tmp_path, capsys):
    model = build_model(load_config(None, TINY), checkpoint=None)
    model.save(tmp_path / "final.safetensors", extra={"rl_step": 3})
    out = tmp_path / "exp"
    assert main(["export", str(tmp_path), "--out", str(out)]) == 0
    again = build_model(load_config(None, TINY), checkpoint=str(out / "model.safetensors"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert "after 3 RL steps" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["export", str(tmp_path), "--out", str(out)]) == 2  # not empty
    assert "is not empty (use --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(out), "--overwrite"]) == 0
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "lora"]) == 2
    assert "--format lora: not available" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not [p for p in os.listdir(tmp_path) if "export-tmp" in p]


def test_a_checkpoint_of_another_base_is_refused_in_one_line(tmp_path, capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build_model(load_config(None, hf_overrides(tiny_flux2_dir())), checkpoint=None)
    model.save(tmp_path / "final.safetensors")
    other = tiny_qwenimage_dir()  # built before: its progress bars are not the error
    capsys.readouterr()
    rc = main(["export", str(tmp_path), f"model.pipeline={other}", "--out", str(tmp_path / "o")])  # another pipeline
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unigrpo: ")]
    assert rc == 2 and len(err) == 1 and "does not match its base model" in err[0], err
    rc = main(["export", str(tmp_path), "model.lora.image_rank=8", "--out", str(tmp_path / "o")])  # other shapes
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unigrpo: ")]
    assert rc == 2 and len(err) == 1 and "has shape" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_fully_trained_side_exports_merged_only(tmp_path, capsys):
    """Text side trained in full (rank 0): the default is merged, whose text encoder holds exactly
    the trained weights; --format lora is refused in one line."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = build_model(load_config(None, hf_overrides(tiny_flux2_dir(), 0, 4)), checkpoint=None)
    with torch.no_grad():
        for _, p in model.parameter_groups()["text"]:
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "final.safetensors")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "lora"), "--format", "lora"]) == 2
    assert "--format lora: not available" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "merged")]) == 0
    enc = DiffusionPipeline.from_pretrained(str(tmp_path / "merged")).text_encoder.state_dict()
    assert all(torch.equal(enc[k], v) for k, v in model.lm.state_dict().items())
