"""``model.kind: hf`` on tiny random Qwen-Image-Edit and Qwen-Image-Edit-Plus pipelines (built from
components, saved as the released folders are, loaded offline without the processor object):

- the project's Qwen2.5-VL image preprocessing against ``Qwen2VLImageProcessorPil`` and the formulas;
- the prompt tokens and the conditioning against the pipelines' own ``encode_prompt`` run with a
  stand-in processor (the HF image processor + the tokenizer, expanding ``<|image_pad|>`` as
  ``Qwen2VLProcessor`` does), with and without sampled reasoning;
- the ODE against the pipelines' ``__call__`` from the same latents, without CFG and with their
  edit guidance (true CFG, negative prompt " " with the image);
- a 1-step LoRA CLI run with the first ratio exactly 1 (text and image).

The pipelines resize inputs to about 1 Mpx: the tests shrink their target areas (module constants,
monkeypatched) to the adapter's ``model.reference_pixels`` / ``condition_pixels``. And they restore
``mm_token_type_ids`` in the pipelines' text-encoder call (diffusers 0.42.1 does not pass it, so
transformers 5 gives image tokens 1-D positions; ``test_the_unpatched_pipeline_drops_mrope`` shows the
difference). The protocol itself: test_conformance.py (``ADAPTERS["hf:qwenimage_edit(_plus)"]``).
"""

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import (
    HF_PROMPTS,
    edit_overrides,
    edit_prompts,
    qwenimage_edit_factory,
    tiny_image_processor,
    tiny_qwenimage_edit_dir,
)
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from testkit import check_one_lora_step_run, lora_step_then_reference

from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config, validate
from unigrpo.models import build_model
from unigrpo.models.hf_config import CAPABILITIES
from unigrpo.models.hf_qwenimage_edit import QwenImageEdit, QwenImageEditPlus
from unigrpo.models.qwen_vl_image import (
    VLImageConfig,
    calculate_dimensions,
    image_tokens,
    smart_resize,
    to_pil,
    vl_inputs,
)
from unigrpo.sampling import ode_sample

REFERENCE, CONDITION = 4096, 1024  # conftest.EDIT_PIXELS
FAMILIES = {"edit": (False, QwenImageEditPipeline), "plus": (True, QwenImageEditPlusPipeline)}


def brightness(images, prompts, metadata):  # the CLI run's reward ("test_hf_qwenimage_edit:brightness")
    return images.mean(dim=(1, 2, 3))


class StandInProcessor:
    """What the pipelines call of ``Qwen2VLProcessor``: the image processor, each ``<|image_pad|>``
    of the text expanded to its image's ``prod(grid) / merge**2`` copies, the tokenizer (padding)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        import transformers

        out = {}
        if images is not None:
            out.update(self.image_processor(images=images, return_tensors=return_tensors))
            grids = iter(out["image_grid_thw"].tolist())
            merge = self.image_processor.merge_size ** 2

            def expand(t: str) -> str:
                while "<|image_pad|>" in t:
                    t = t.replace("<|image_pad|>", "<|placeholder|>" * (int(torch.tensor(next(grids)).prod()) // merge), 1)
                return t.replace("<|placeholder|>", "<|image_pad|>")

            text = [expand(t) for t in text]
        out.update(self.tokenizer(text, padding=padding, return_tensors=return_tensors))
        return transformers.BatchFeature(out)


def load_pipe(plus: bool, monkeypatch, mrope: bool = True):
    """The pipeline of the tiny folder (processor=None, then the stand-in), its target areas shrunk
    to the adapter's; ``mrope``: ``mm_token_type_ids`` restored in its text-encoder call."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    cls = FAMILIES["plus" if plus else "edit"][1]
    pipe = cls.from_pretrained(tiny_qwenimage_edit_dir(plus), processor=None)
    pipe.processor = StandInProcessor(tiny_image_processor(), pipe.tokenizer)
    if plus:
        monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", CONDITION)
        monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", REFERENCE)
    else:
        dims = pipeline_qwenimage_edit.calculate_dimensions
        monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: dims(REFERENCE, ratio))
    if mrope:
        enc, forward = pipe.text_encoder, pipe.text_encoder.forward

        def with_types(*args, input_ids=None, **kw):
            return forward(*args, input_ids=input_ids, mm_token_type_ids=(input_ids == enc.config.image_token_id).int(),
                           **kw)

        monkeypatch.setattr(enc, "forward", with_types)
    return pipe


def model_of(plus: bool, text_rank: int = 0, image_rank: int = 0, *extra):
    cfg = load_config(None, [*edit_overrides(tiny_qwenimage_edit_dir(plus), text_rank, image_rank, plus), *extra])
    torch.manual_seed(0)
    return build_model(cfg, checkpoint=None)


def pipeline_images(model, prompt):
    """A prompt's images as the pipeline's PIL inputs."""
    return [to_pil(x) for x in prompt.images]


def pipe_image_arg(plus: bool, images):
    return images if plus else images[0]


# ----------------------------------------------------------------------------- preprocessing
def test_smart_resize_and_calculate_dimensions_closed_forms():
    assert smart_resize(64, 96, 28, 784, 12544) == (56, 84)  # nearest multiples of 28, in range
    assert smart_resize(16, 16, 28, 784, 12544) == (28, 28)  # rounds to 0: ceil to the minimum area
    assert smart_resize(300, 200, 28, 784, 6272) == (84, 56)  # too large: floor at sqrt(area ratio)
    assert smart_resize(1024, 1024, 28, 3136, 12845056) == (1036, 1036)
    assert calculate_dimensions(1024 * 1024, 1.0) == (1024, 1024)
    assert calculate_dimensions(1024 * 1024, 1.5) == (1248, 832)  # width first, multiples of 32
    assert calculate_dimensions(384 * 384, 96 / 64) == (480, 320)
    assert image_tokens((1, 4, 6), 2) == 6 and image_tokens(torch.tensor([1, 74, 74]), 2) == 1369
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300, 28, 784, 12544)


@pytest.mark.parametrize("size", [(56, 84), (64, 96), (16, 16), (300, 200), (45, 70)])
def test_vl_inputs_equal_the_image_processor(size):
    """pixel_values (resize, rescale, CLIP normalisation, patch layout with the repeated frame) and
    image_grid_thw == Qwen2VLImageProcessorPil's, on 8-bit images, resized or not."""
    proc = tiny_image_processor()
    cfg = VLImageConfig.from_json(proc.to_dict())
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor) == (784, 56 * 112, 28)
    g = torch.Generator().manual_seed(sum(size))
    images = torch.randint(0, 256, (2, 3, *size), generator=g) / 255.0
    pixels, grid = vl_inputs(images, cfg)
    ref = proc(images=[to_pil(x) for x in images], return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"]) and grid[0].tolist() == [1, *(s // 14 for s in smart_resize(
        *size, 28, cfg.min_pixels, cfg.max_pixels))]
    assert pixels.shape == ref["pixel_values"].shape == (int(grid.prod(1).sum()), 3 * 2 * 14 * 14)
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
    # the layout: patch 0 holds the top-left 14 x 14 pixels of each channel, on both frames
    x = (images[0] - torch.tensor(cfg.image_mean)[:, None, None]) / torch.tensor(cfg.image_std)[:, None, None]
    if tuple(size) == (56, 84):  # no resize: exact positions
        first = pixels[0].view(3, 2, 14, 14)
        torch.testing.assert_close(first[:, 0], x[:, :14, :14], atol=1e-6, rtol=0)
        assert torch.equal(first[:, 0], first[:, 1])
        torch.testing.assert_close(pixels[1].view(3, 2, 14, 14)[:, 0], x[:, :14, 14:28], atol=1e-6, rtol=0)  # merge window
        torch.testing.assert_close(pixels[2].view(3, 2, 14, 14)[:, 0], x[:, 14:28, :14], atol=1e-6, rtol=0)


def test_processor_config_is_refused_where_not_implemented():
    with pytest.raises(NotImplementedError, match="not implemented"):
        VLImageConfig.from_json({**tiny_image_processor().to_dict(), "resample": 2})


# ----------------------------------------------------------------------------- tokens and conditioning
@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_prompt_tokens_and_pixels_equal_the_processors(plus, monkeypatch):
    """Our row ids (template, vision blocks, expanded pads) and pixel values == the stand-in
    processor's on the pipeline's own text and resized image(s)."""
    pipe, model = load_pipe(plus, monkeypatch), model_of(plus)
    prompt = edit_prompts((2 if plus else 1,), side=40)[0]
    tokens = model.encode([prompt])
    images = pipeline_images(model, prompt)
    (rh, rw), (ch, cw) = model.image_sizes(40, 40)
    assert (rh, rw) == (64, 64) and (ch, cw) == ((32, 32) if plus else (64, 64))
    cond = [pipe.image_processor.resize(im, ch, cw) for im in images]
    text = pipe.prompt_template_encode.format(
        ("".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
         if plus else "") + prompt.text)
    ref = pipe.processor(text=[text], images=cond)
    assert tokens.ids[0].tolist() == ref["input_ids"][0].tolist()
    pixels, grid = model._vision(tokens)
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
    assert int((tokens.ids == model.image_id).sum()) == sum(image_tokens(g, 2) for g in grid) >= len(images)


def row_conditioning(pipe, ids: torch.Tensor, pixels, grid):
    """The pipeline's ``_get_qwen_prompt_embeds`` on one row of given tokens (its encoder call with
    the restored mm types, prefix dropped)."""
    hidden = pipe.text_encoder(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], pixel_values=pixels,
                               image_grid_thw=grid, output_hidden_states=True).hidden_states[-1]
    return hidden[0, pipe.prompt_template_encode_start_idx:]


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_conditioning_equals_the_pipelines_encode_prompt(plus, monkeypatch):
    """A batch of prompts with images (different token lengths: left padding) -> each row's
    conditioning == the pipeline's ``encode_prompt(prompt, image)`` at batch 1; the reference
    latents == its ``prepare_latents`` image latents; with sampled reasoning the conditioning is the
    encoder on those tokens (decode positions continue after the image as the encoder's own do)."""
    pipe, model = load_pipe(plus, monkeypatch), model_of(plus)
    prompts = edit_prompts((1, 2, 1) if plus else (1, 1, 1), side=40)
    tokens = model.encode(prompts)
    assert len(set(tokens.mask.sum(1).tolist())) > 1
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        for i, p in enumerate(prompts):
            images = pipeline_images(model, p)
            (rh, rw), (ch, cw) = model.image_sizes(40, 40)
            cond = [pipe.image_processor.resize(im, ch, cw) for im in images]
            emb, mask = pipe.encode_prompt(p.text, image=pipe_image_arg(plus, cond))
            n = emb.shape[1]
            assert mask is None and bool(ctx.mask[i, :n].all()) and not ctx.mask[i, n:].any()
            err = (ctx.hidden[i, :n] - emb[0]).abs().max().item()
            assert err <= 1e-5, err
            vae = [pipe.image_processor.preprocess(im, rh, rw).unsqueeze(2) for im in images]
            _, refs = pipe.prepare_latents(vae if plus else vae[0], 1, 4, 32, 32, torch.float32, "cpu", None)
            r = refs.shape[1]
            torch.testing.assert_close(ctx.refs[i, :r], refs[0], atol=1e-5, rtol=0)
            assert ctx.n_refs[i] == len(images) and ctx.ref_shape == (1, rh // 8, rw // 8)
        sampled = model.sample_reasoning(tokens, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
        _, ctx = model.forward_context(sampled)
        pixels, grid = model._vision(sampled)
        start = 0
        for i in range(len(prompts)):
            k = int(sampled.image_mask[i].sum())
            rows = int(grid[start:start + k].prod(1).sum())
            offset = int(grid[:start].prod(1).sum())
            ref = row_conditioning(pipe, sampled.ids[i][sampled.mask[i]], pixels[offset:offset + rows], grid[start:start + k])
            start += k
            assert (ctx.hidden[i, :len(ref)] - ref).abs().max().item() <= 1e-5
    assert int(sampled.response_mask.sum()) > 0


def test_the_unpatched_pipeline_drops_mrope(monkeypatch):
    """diffusers 0.42.1 + transformers 5 without ``mm_token_type_ids``: image tokens get 1-D
    positions, and the conditioning moves (what we deviate from on purpose: module docstring)."""
    pipe = load_pipe(False, monkeypatch, mrope=False)
    model = model_of(False)
    p = edit_prompts((1,), side=40)[0]
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode([p]))
        (rh, rw), _ = model.image_sizes(40, 40)
        emb, _ = pipe.encode_prompt(p.text, image=pipe.image_processor.resize(to_pil(p.images[0]), rh, rw))
    assert (ctx.hidden[0, :emb.shape[1]] - emb[0]).abs().max().item() > 1e-3


def test_vision_placeholders_are_never_sampled():
    """Their logits are -inf in the decode loop and the teacher-forced pass: a hot sampler never
    writes one, and the scored log-probs stay finite."""
    model = model_of(True)
    tokens, logp = model.sample_reasoning(model.encode(edit_prompts((1, 2, 1))), max_new_tokens=40, temperature=5.0,
                                          generator=torch.Generator().manual_seed(3), return_logprobs=True)
    resp = tokens.ids[tokens.response_mask]
    assert len(resp) > 60 and not torch.isin(resp, model.placeholders).any()
    with torch.no_grad():
        scored, _ = model.forward_context(tokens, 5.0)
    assert scored.isfinite().all()
    torch.testing.assert_close(scored[tokens.response_mask], logp[tokens.response_mask], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- ODE vs __call__
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_ode_sampler_reproduces_the_pipeline(plus, cfg_scale, monkeypatch):
    """Our Euler ODE (``sampler.shift: null``) from the pipeline's initial latents == ``pipe(image=...,
    latents=...)`` (latents and images): [noisy | reference] tokens, img_shapes, the cut back to the
    noisy tokens, the schedule of the noisy tokens only; with CFG the pipeline's edit guidance
    (``eval_guidance``: the negative prompt WITH the image, norm-preserving true CFG)."""
    pipe, model = load_pipe(plus, monkeypatch), model_of(plus)
    p = edit_prompts((2 if plus else 1,), side=40, seed=7)[0]
    z_init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_init = torch.nn.functional.pixel_unshuffle(z_init, 2)
    n = 3
    with torch.no_grad():
        tokens = model.encode([p])
        _, ctx = model.forward_context(tokens)
        own = model.eval_guidance(tokens, ctx, cfg_scale) if cfg_scale > 1 else None
        x0 = ode_sample(model, ctx, n, None, x_init=x_init.clone(), velocity=own)
        images = model.decode(x0)
        kw = {"image": pipe_image_arg(plus, pipeline_images(model, p)), "prompt": p.text, "height": 32, "width": 32,
              "num_inference_steps": n, "true_cfg_scale": cfg_scale, "negative_prompt": " " if cfg_scale > 1 else None,
              "latents": pipe._pack_latents(z_init, 1, 4, 8, 8)}
        lat = pipe(output_type="latent", **kw).images
        img = pipe(output_type="pt", **kw).images
    ours = pipe._pack_latents(torch.nn.functional.pixel_shuffle(x0, 2), 1, 4, 8, 8)
    e_lat, e_img = (ours - lat).abs().max().item(), (images - img).abs().max().item()
    print(f"ODE vs {type(pipe).__name__} (cfg {cfg_scale}): latents max|diff| = {e_lat:.3g}, images {e_img:.3g}")
    assert e_lat <= 1e-5 and e_img <= 1e-5
    assert (x0 - x_init).abs().max() > 0.1
    if cfg_scale == 1:  # the reference latents matter: without them the ODE lands elsewhere
        blind = dataclasses.replace(ctx, refs=None, n_refs=torch.zeros_like(ctx.n_refs))
        with torch.no_grad():
            assert (ode_sample(model, blind, n, None, x_init=x_init.clone()) - x0).abs().max() > 1e-3


# ----------------------------------------------------------------------------- training
def test_lora_step_moves_only_lora_and_reference_is_the_base():
    model, _, prompts = qwenimage_edit_factory(seed=0, plus=True)
    base = model_of(True)
    tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    assert not any("visual" in n for n, _ in model.parameter_groups()["text"])  # LoRA on the LM, not the vision tower
    lora_step_then_reference(model, base, tokens)


def test_configuration(tmp_path):
    """The capabilities declared by the config equal the families'; CFG training is refused for an
    edit pipeline in one line; the pixel areas are checked."""
    for plus, cls in ((False, QwenImageEdit), (True, QwenImageEditPlus)):
        cfg = load_config(None, edit_overrides(tiny_qwenimage_edit_dir(plus), plus=plus))
        assert cfg.model.capabilities == CAPABILITIES[cls.pipeline_class] == {"sees_images", "edits"}
        assert cls.sees_images and cls.edits
        with pytest.raises(ConfigError, match=r"sampler.cfg_scale: .*(CFG|unconditional)"):
            validate(load_config(None, [*edit_overrides(tiny_qwenimage_edit_dir(plus), plus=plus), "sampler.cfg_scale=2",
                                        "task.kind=shapes_edit", "task.image_size=64",
                                        "rewards=[{name: shapes_edit}]"]))
    with pytest.raises(ConfigError, match="model.reference_pixels: must be >= 1024"):
        validate(load_config(None, [*edit_overrides(tiny_qwenimage_edit_dir()), "model.reference_pixels=100"]))
    with pytest.raises(ValueError, match="model.condition_pixels: QwenImageEditPipeline's text encoder sees"):
        model_of(False, 0, 0, "model.condition_pixels=1024")


def attach_images(monkeypatch, counts) -> list[int]:
    """``task.kind: prompts`` with input images: the loaded prompts get ``counts[i]`` images each
    (the JSONL ``"images"`` field is another branch's; this test builds the ``Prompt`` objects)."""
    from unigrpo.tasks import prompts as prompts_module

    load, images_given = prompts_module.load_prompt_file, []

    def with_images(path, key="task.prompts"):
        loaded = load(path, key)
        made = edit_prompts(tuple(counts[i % len(counts)] for i in range(len(loaded))), side=24)
        images_given.extend(len(m.images) for m in made)
        return [dataclasses.replace(p, images=m.images) for p, m in zip(loaded, made)]

    monkeypatch.setattr(prompts_module, "load_prompt_file", with_images)
    return images_given


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_cli_train_one_lora_step_ratio_exactly_one(tmp_path, monkeypatch, plus):
    """`unigrpo train` on the tiny edit folder offline with prompts that carry images, the pipeline's
    schedule, CFG-free: the first update's log-probs equal the rollout's (ratio exactly 1, text and
    image); the saved LoRA weights load back."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    images_given = attach_images(monkeypatch, (2, 1) if plus else (1,))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    out = tmp_path / "run"
    folder = tiny_qwenimage_edit_dir(plus)
    args = ["train", *edit_overrides(folder, plus=plus), "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: 'test_hf_qwenimage_edit:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=2", "algo.micro_batch_trajectories=2", "sampler.num_steps=4",
            "sampler.window_range=[0,3]", "sampler.window_size=2", "sampler.shift=null", "sampler.eval_num_steps=2",
            "sampler.eval_cfg_scale=4.0", "eval.num_prompts=2", "eval.grid_prompts=2", "text.max_reasoning_tokens=6",
            "threads=1", "optim.lr_text=1e-3", "optim.lr_image=1e-3", f"output_dir={out}", "steps=1"]
    assert main(args) == 0
    assert images_given and min(images_given) >= 1  # the task's prompts carried images
    saved = check_one_lora_step_run(out)
    loaded = build_model(load_config(None, edit_overrides(folder, plus=plus)), checkpoint=str(out / "final.safetensors"))
    assert all(torch.equal(loaded.trainable_state()[k], v) for k, v in saved.items())
