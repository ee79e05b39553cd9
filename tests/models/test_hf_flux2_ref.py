"""FLUX.2 [klein] with reference images (``Flux2KleinPipeline(image=...)``) on the tiny random
pipeline of ``conftest.build_tiny_flux2``: the crop, the reference latents, tokens and position ids
against the pipeline's own ``image_processor`` / ``prepare_image_latents``; the Euler ODE against
the pipeline's ``__call__(image=...)`` from the same latents, without CFG and with its guidance
(negative prompt "" with the same references); the reasoning blind to the images; each row with
its own references; a 1-step LoRA CLI run with references, ratio exactly 1.

The prompts file format has no ``"images"`` field on main yet (issue 19, item 1): the tests build
``tasks.Prompt`` objects with images directly, and the CLI run attaches images to the prompts its
JSONL file loads (a monkeypatched ``load_prompt_file``)."""

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
import PIL.Image
from conftest import HF_LAYERS, HF_PROMPTS, hf_overrides, tiny_flux2_dir
from diffusers import Flux2KleinPipeline
from testkit import check_one_lora_step_run

from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.models import build_model
from unigrpo.models.hf_flux2 import Flux2Klein, flux2_shift
from unigrpo.models.hf_flux2_ref import pack_references, reference_ids, reference_pixels
from unigrpo.sampling import ode_sample
from unigrpo.tasks import Prompt

MAX_TEXT = 48  # model.max_text_tokens of hf_overrides
MULTIPLE = 4  # 2 * the tiny VAE's scale factor (2): the pipeline crops reference sides to multiples of it


@pytest.fixture(scope="module")
def pipe():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return Flux2KleinPipeline.from_pretrained(tiny_flux2_dir())


def model_of(*extra, text_rank=4, image_rank=4):
    cfg = load_config(None, [*hf_overrides(tiny_flux2_dir(), text_rank, image_rank), *extra])
    torch.manual_seed(0)
    return build_model(cfg, checkpoint=None)


def image8(seed: int, height: int, width: int) -> torch.Tensor:
    """A random 8-bit RGB image [3, H, W] in [0, 1] (what a PNG file holds: k / 255 exactly)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g).float() / 255


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    return PIL.Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")


def test_the_crop_is_the_pipelines_preprocessing(pipe):
    """Sides floored to multiples of 4 and centre-cropped, [0, 1] -> [-1, 1]: the pipeline's
    ``image_processor.preprocess(..., resize_mode="crop")`` on the same 8-bit image."""
    for seed, (h, w) in enumerate([(64, 64), (70, 67), (83, 96)]):
        x = image8(seed, h, w)
        ref = pipe.image_processor.preprocess(to_pil(x), height=h // MULTIPLE * MULTIPLE,
                                              width=w // MULTIPLE * MULTIPLE, resize_mode="crop")
        ours = reference_pixels(x[None], MULTIPLE) * 2 - 1
        assert ours.shape == ref.shape == (1, 3, h // 4 * 4, w // 4 * 4)
        torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)


def test_references_the_pipeline_would_resize_or_cannot_use_are_one_line():
    model = model_of()
    for (h, w), match in [((1040, 1024), "above 1024x1024 the pipeline resizes it"),
                          ((2, 64), "each side must be at least 4")]:
        prompt = Prompt("a red circle", images=torch.zeros(1, 3, h, w))
        with pytest.raises(ValueError, match=f"^prompt 0 \\('a red circle'\\): reference image of {w}x{h} pixels: "
                                             f"{match}") as err:
            model.encode([prompt])
        assert "\n" not in str(err.value)


def test_reference_tokens_and_ids_equal_prepare_image_latents(pipe):
    """Two references: our latents (crop, VAE mode, patchify, BatchNorm), packed one after the
    other, with ids (10 + 10 i, row, col, 0) == the pipeline's ``prepare_image_latents``."""
    model = model_of()
    images = [image8(10, 64, 64), image8(11, 64, 64)]
    with torch.no_grad():
        ref_tokens, ref_ids = pipe.prepare_image_latents(
            [pipe.image_processor.preprocess(to_pil(x), height=64, width=64, resize_mode="crop") for x in images],
            batch_size=1, generator=None, device="cpu", dtype=torch.float32)
        refs, count = model.references(model.encode([Prompt("a red circle", images=torch.stack(images))]))
    assert count.tolist() == [2] and refs.shape == (1, 2, 16, 16, 16)
    ours = pack_references(refs)
    ids = reference_ids(2, 16, 16, "cpu")
    assert ours.shape == ref_tokens.shape == (1, 512, 16)
    torch.testing.assert_close(ours, ref_tokens, atol=1e-5, rtol=0)  # batched VAE convs vs one image at a time
    assert torch.equal(ids, ref_ids[0])
    assert ids[:256, 0].eq(10).all() and ids[256:, 0].eq(20).all() and ids[:, 3].eq(0).all()
    assert ids[17].tolist() == [10, 1, 1, 0]  # row-major inside a reference


@pytest.mark.parametrize("n_refs", [1, 2])
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg3"])
def test_ode_with_references_reproduces_the_pipeline(pipe, guidance, n_refs):
    """Our Euler ODE from the pipeline's initial latents, the context carrying the references ==
    ``pipe(image=[...], latents=...)`` (latents and images). With CFG (``guidance_scale`` 3):
    our ``eval_guidance``, whose negative branch keeps the references, == the pipeline's."""
    model = model_of("model.enable_thinking=false")
    n = 3
    images = [image8(20 + i, 64, 64) for i in range(n_refs)]
    prompts = [Prompt(p, images=torch.stack(images)) for p in HF_PROMPTS]  # the pipeline shares its references
    x_init = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.encode(prompts)
        _, ctx = model.forward_context(tokens)
        own = model.eval_guidance(tokens, ctx, guidance) if guidance != 1.0 else None
        x0 = ode_sample(model, ctx, n, model.pipeline_shift(n), x_init=x_init.clone(), cfg_scale=guidance,
                        velocity=own)
        kw = {"prompt": HF_PROMPTS, "image": [to_pil(x) for x in images], "height": 32, "width": 32,
              "num_inference_steps": n, "guidance_scale": guidance, "max_sequence_length": MAX_TEXT,
              "text_encoder_out_layers": HF_LAYERS}
        lat = pipe(latents=x_init.clone(), output_type="latent", **kw).images
        img = pipe(latents=x_init.clone(), output_type="pt", **kw).images
        blind = ode_sample(model, model.forward_context(model.encode(HF_PROMPTS))[1], n, model.pipeline_shift(n),
                           x_init=x_init.clone())
    mean, std = model._bn(x0)
    ours_lat = torch.nn.functional.pixel_shuffle(x0 * std + mean, 2)
    e_lat, e_img = (ours_lat - lat).abs().max().item(), (model.decode(x0) - img).abs().max().item()
    print(f"ODE with {n_refs} reference(s) vs pipeline (guidance {guidance}): latents max|diff| = {e_lat:.3g}, "
          f"images {e_img:.3g}")
    assert lat.shape == ours_lat.shape and img.shape == (3, 3, 32, 32)
    assert e_lat <= 1e-5 and e_img <= 1e-5
    assert (x0 - blind).abs().max() > 1e-2  # the references changed the image


def test_plain_cfg_without_references_is_unchanged():
    """No reference: ``eval_guidance`` is None, so text-to-image CFG keeps the plain rule (tested
    against the pipeline in test_hf_flux2.py)."""
    model = model_of()
    with torch.no_grad():
        tokens = model.encode(HF_PROMPTS)
        _, ctx = model.forward_context(tokens)
    assert ctx.refs is None and model.eval_guidance(tokens, ctx, 4.0) is None


def test_the_reasoning_is_blind_to_the_references_and_the_denoiser_reads_them():
    """``sees_images`` False, ``edits`` True: the next-token logits and the response log-probs are
    the same with other references, the velocity is not."""
    model = model_of()
    assert model.edits and not model.sees_images
    a = [Prompt(p, images=image8(30 + i, 16, 16)[None]) for i, p in enumerate(HF_PROMPTS)]
    b = [Prompt(p.text, images=1 - p.images) for p in a]
    ta, tb = model.encode(a), model.encode(b)
    x, t = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(1)), torch.full((3,), 0.6)
    with torch.no_grad():
        assert torch.equal(model.prefill(ta)[0], model.prefill(tb)[0])
        ra, rb = model.with_response(ta, ["a blue square"] * 3), model.with_response(tb, ["a blue square"] * 3)
        (la, ca), (lb, cb) = model.forward_context(ra), model.forward_context(rb)
        assert torch.equal(la, lb) and torch.equal(ca.hidden, cb.hidden)
        va, vb = model.velocity(x, t, ca), model.velocity(x, t, cb)
    assert all((va[i] - vb[i]).abs().max() > 1e-4 for i in range(3))


def test_each_row_reads_its_own_references():
    """Rows with 0, 1 and 2 references of their own in one batch (one transformer call per count)
    == each row alone; changing row 2's references changes row 2's velocity only."""
    model = model_of()
    refs = [None, image8(40, 16, 16)[None], torch.stack([image8(41, 16, 16), image8(42, 16, 16)])]
    prompts = [Prompt(p, images=r) for p, r in zip(HF_PROMPTS, refs)]
    x = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.6, 0.9])
    with torch.no_grad():
        _, ctx = model.forward_context(model.encode(prompts))
        v = model.velocity(x, t, ctx)
        assert ctx.ref_count.tolist() == [0, 1, 2]
        for i, p in enumerate(prompts):
            _, c_i = model.forward_context(model.encode([p]))
            torch.testing.assert_close(model.velocity(x[i:i + 1], t[i:i + 1], c_i)[0], v[i], atol=1e-5, rtol=1e-5)
        other = prompts[:2] + [Prompt(HF_PROMPTS[2], images=refs[2].flip(0))]  # the two references swapped
        v2 = model.velocity(x, t, model.forward_context(model.encode(other))[1])
    assert torch.equal(v2[:2], v[:2]) and (v2[2] - v[2]).abs().max() > 1e-4  # reference order matters (ids)
    model.sharded = True  # FSDP2: a call per count would differ from rank to rank
    with pytest.raises(ValueError, match=r"^model.fsdp: a batch's rows carry \[0, 1, 2\] reference images"):
        model.velocity(x, t, ctx)


def test_references_carry_no_gradient_and_the_image_side_trains_through_them():
    model = model_of()
    prompts = [Prompt(p, images=image8(50 + i, 16, 16)[None]) for i, p in enumerate(HF_PROMPTS)]
    tokens = model.with_response(model.encode(prompts), ["a red circle"] * 3)
    _, ctx = model.forward_context(tokens)
    assert not ctx.refs.requires_grad
    x = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(3))
    model.velocity(x, torch.full((3,), 0.5), model.detach_context(ctx)).pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for _, p in model.parameter_groups()["image"])
    assert all(p.grad is None for _, p in model.parameter_groups()["text"])


# ----------------------------------------------------------------------------- config
def test_capabilities_and_cfg_training_with_an_editing_task():
    """A FLUX.2 [klein] folder declares ``edits`` (what ``Flux2Klein`` declares); training with CFG
    on an editing task is refused in one line (the null branch would lose the references)."""
    from unigrpo.models.hf_config import CAPABILITIES

    cfg = load_config(None, hf_overrides(tiny_flux2_dir()))
    assert cfg.model.capabilities == CAPABILITIES["Flux2KleinPipeline"] == frozenset({"edits"})
    import importlib

    from unigrpo.models.hf import FAMILIES

    for name, where in FAMILIES.items():  # every family's config says what its adapter declares
        module, cls = where.split(":")
        family = getattr(importlib.import_module(module), cls)
        declared = {k for k in ("edits", "sees_images") if getattr(family, k)}
        assert declared == CAPABILITIES.get(name, frozenset()), name

    @dataclasses.dataclass
    class EditTask:  # the shape of an editing task's config (issue 19, item 2)
        kind: str = "edit"

        def needs(self):
            return frozenset({"edits"})

    edit = dataclasses.replace(cfg, task=EditTask(), sampler=dataclasses.replace(cfg.sampler, cfg_scale=2.0))
    with pytest.raises(ConfigError, match=r"^sampler.cfg_scale: .*reference images.*eval_cfg_scale") as err:
        edit.model.check(edit)
    assert "\n" not in str(err.value)
    edit.model.check(dataclasses.replace(edit, sampler=cfg.sampler))  # CFG-free: fine
    cfg.model.check(dataclasses.replace(cfg, sampler=edit.sampler))  # CFG on a text-to-image task: fine


# ----------------------------------------------------------------------------- the CLI
def brightness(images, prompts, metadata):  # a reward for the CLI run ("test_hf_flux2_ref:brightness")
    return images.mean(dim=(1, 2, 3))


def test_cli_train_one_lora_step_with_references_ratio_exactly_one(tmp_path, monkeypatch):
    """`unigrpo train` with prompts that carry 1 and 2 references: the rollout's transformer reads
    the reference tokens, and the first update's log-probs equal the rollout's (text and image)."""
    import unigrpo.tasks.prompts as P

    os.environ["HF_HUB_OFFLINE"] = "1"
    load = P.load_prompt_file

    def with_images(path, key="task.prompts"):  # until the JSONL "images" field lands (issue 19, item 1)
        return [dataclasses.replace(p, images=torch.stack([image8(60 + i + j, 16, 16) for j in range(i + 1)]))
                for i, p in enumerate(load(path, key))]

    seen = []
    inner = Flux2Klein._velocity

    def spy(self, x_t, t, hidden, refs):
        seen.append(0 if refs is None else refs.shape[1])
        return inner(self, x_t, t, hidden, refs)

    monkeypatch.setattr(P, "load_prompt_file", with_images)
    monkeypatch.setattr(Flux2Klein, "_velocity", spy)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    shift = flux2_shift(8 * 8, 4, {"use_dynamic_shifting": True})
    out = tmp_path / "run"
    args = ["train", *hf_overrides(tiny_flux2_dir()), "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: 'test_hf_flux2_ref:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=2", "algo.micro_batch_trajectories=2", "sampler.num_steps=4",
            "sampler.window_range=[0,3]", "sampler.window_size=2", f"sampler.shift={shift}", "eval_every=0",
            "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-3", "optim.lr_image=1e-3",
            f"output_dir={out}", "steps=1"]
    assert main(args) == 0
    check_one_lora_step_run(out)
    # the rollout's and the update's transformer read the references, each row its own count (the
    # final evaluation draws without them: PromptsTask.evaluate passes the texts only, today)
    assert {1, 2} <= set(seen)
