"""``model.kind: bagel`` image-to-image on a tiny random BAGEL folder WITH the ViT path (real file
and key names; SigLIP width 32, 2 layers, patch 4, 8 patches per side) loaded by the production
loader. References: transformers' ``SiglipVisionModel`` for the vision tower, transformers' Qwen3
for the whole edit context run as one sequence (gen expert = a copy of the und expert), and Bagel's
own incremental cache updates (``forward_cache_update_vae`` then ``_vit`` then the text, written
out from ``inferencer.py``) for the expert routing; Bagel's resize rule and three-branch edit CFG
against closed forms; the CLI with prompts that carry images (ratio exactly 1). The official Bagel
code itself is not run (it needs flash_attn and torchvision at import). The protocol: the
``bagel:edit`` adapter of test_conformance.py."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("peft")
from conftest import BAGEL_PROMPTS, bagel_overrides, tiny_bagel_dir, tiny_bagel_edit_dir
from safetensors.torch import load_file, save_file
from test_bagel import qwen3_of

from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.models import build_model
from unigrpo.models.bagel import PATCH, BagelContext
from unigrpo.models.bagel_cfg import EDIT
from unigrpo.models.bagel_io import load_bagel
from unigrpo.models.bagel_latent import patchify, sincos_2d, timestep_features, unpatchify
from unigrpo.models.bagel_mot import attention_mask
from unigrpo.models.bagel_vit import flattened_position_ids, resize_size, vit_patches
from unigrpo.tasks import Prompt

SIDE = 32  # model.resolution of the tiny folder = the ViT's full input (8 patches of 4): no resize anywhere


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_of(text_rank=0, image_rank=0, *extra):
    cfg = load_config(None, [*bagel_overrides(tiny_bagel_edit_dir(), text_rank, image_rank), *extra])
    torch.manual_seed(0)
    return build_model(cfg, checkpoint=None)


def edit_prompts(counts=(1, 1), seed=0, side=SIDE):
    g = gen(seed)
    return [Prompt(BAGEL_PROMPTS[i % 3], images=torch.rand(n, 3, side, side, generator=g) if n else None)
            for i, n in enumerate(counts)]


def sampled(model, prompts, seed=0, n=6):
    return model.sample_reasoning(model.encode(prompts), max_new_tokens=n, generator=gen(seed))


# ----------------------------------------------------------------------------- ViT
def hf_siglip(model):
    """transformers' SiglipVisionModel holding our vit_model's weights (the linear patch embedding
    back to the Conv2d it came from: Bagel's convert_conv2d_to_linear permutes (out, c, p, q) to
    (out, p, q, c))."""
    import transformers

    c = model.vit_model.config
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, patch_size=c.patch_size, image_size=c.image_size,
        layer_norm_eps=c.layer_norm_eps, vision_use_head=False, attn_implementation="eager"))
    ours = {k[len("vit_model.vision_model."):]: v for k, v in model.state_dict().items() if k.startswith("vit_model.")}
    w = ours["embeddings.patch_embedding.weight"]
    ours["embeddings.patch_embedding.weight"] = w.reshape(w.shape[0], c.patch_size, c.patch_size, 3).permute(0, 3, 1, 2)
    state = hf.state_dict()
    prefix = next(k for k in state if k.endswith("embeddings.patch_embedding.weight"))[:-len("embeddings.patch_embedding.weight")]
    assert {k[len(prefix):] for k in state} == set(ours)
    hf.load_state_dict({prefix + k: v for k, v in ours.items()})
    return hf.eval()


def hf_vit_tokens(model, hf, images):
    """The ViT block's tokens from the reference: connector(SigLIP(2 x - 1)) + the 2-D sin-cos table
    (closed form) at row * 8 + col."""
    feats = hf(pixel_values=images * 2 - 1).last_hidden_state
    side = model.vit_model.config.max_side
    return model.connector.fc2(torch.nn.functional.gelu(model.connector.fc1(feats), approximate="tanh")) \
        + sincos_2d(model.llm_config.hidden_size, side)[None]


def test_vit_tower_equals_transformers_siglip():
    model = model_of()
    hf = hf_siglip(model)
    c = model.vit_model.config
    x = torch.rand(2, 3, c.image_size, c.image_size, generator=gen(1)) * 2 - 1
    with torch.no_grad():
        ours = model.vit_model(vit_patches(x, c.patch_size), flattened_position_ids(c.image_size, c.image_size,
                                                                                    c.patch_size, c.max_side))
        ref = hf(pixel_values=x).last_hidden_state
    err = (ours - ref).abs().max().item()
    print(f"ViT vs transformers SiglipVisionModel: max|d| = {err:.3g}")
    assert err < 1e-5 and ref.abs().mean() > 0.1


def test_resize_rule_and_position_ids_closed_forms():
    """Bagel's MaxLongEdgeMinShortEdgeResize sizes (data/transforms.py), hand-computed."""
    assert resize_size(1024, 1024, 1024, 512, 16) == (1024, 1024)  # inference VAE transform
    assert resize_size(1024, 1024, 980, 224, 14) == (980, 980)  # inference ViT: 70 x 70 patches
    assert resize_size(512, 512, 504, 252, 14) == (504, 504)  # R3 RL ViT: 36 x 36
    assert resize_size(200, 300, 1024, 512, 16) == (512, 768)  # short edge up to 512, long edge follows
    assert resize_size(2000, 1000, 1024, 512, 16) == (1024, 512)  # long edge down to 1024
    # the pixel cap: 512 x 512 is over 256^2 pixels; Bagel scales the SIDES by the pixel ratio 1/4 (not its
    # square root), so 128 x 128
    assert resize_size(100, 100, 1024, 512, 16, max_pixels=256 * 256) == (128, 128)
    assert resize_size(SIDE, SIDE, 32, 224, 4) == (SIDE, SIDE)  # the tiny ViT: min 224 capped by max 32
    torch.testing.assert_close(flattened_position_ids(8, 12, 4, 70), torch.tensor([0, 1, 2, 70, 71, 72]))


# ----------------------------------------------------------------------------- the context
def copy_und_to_gen(model):
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in params.items():
            if "moe_gen" in name:
                p.copy_(params[name.replace("_moe_gen", "")])


def test_edit_context_and_velocity_equal_one_qwen3_sequence():
    """With the gen expert a copy of the und expert, log-probs of the reasoning and the velocity of an
    edit == transformers' Qwen3 over ``[sys][vs VAE ve][vs ViT ve][prompt + reasoning][vs x_t ve]``:
    each image block at ONE RoPE position (VAE s, ViT s + 1, the prompt from s + 2), full attention
    inside a block, causal between segments; VAE tokens = vae2llm(clean latent) + t_emb(0) + pos."""
    model = model_of()
    copy_und_to_gen(model)
    prompts = edit_prompts((1,))
    tokens = sampled(model, prompts)
    img = prompts[0].images
    hf, sig = qwen3_of(model), hf_siglip(model)
    x, t = torch.randn((1, *model.latent_shape), generator=gen(3)), torch.tensor([0.6])
    with torch.no_grad():
        logp, ctx = model.forward_context(tokens)
        v = model.velocity(x, t, ctx)
        emb, lat_pos = hf.model.embed_tokens, model.latent_pos_embed.pos_embed
        z, hh, ww = model.latent_shape
        h, w = hh // PATCH, ww // PATCH
        ids_lat = (torch.arange(h)[:, None] * model.latent_pos_embed.max_side + torch.arange(w)[None]).reshape(-1)

        def latent_block(lat, tt):
            return model.vae2llm(patchify(lat, PATCH)) + model.time_embedder.mlp(timestep_features(tt)) + lat_pos[ids_lat]

        def marked(block):
            return [emb(torch.tensor([[model.ids["vision_start"]]])), block, emb(torch.tensor([[model.ids["vision_end"]]]))]

        ids = tokens.ids[0]
        s = len(model._segment(model.system_prompt))
        segs = [emb(ids[None, :s]), *marked(latent_block(model.encode_images(img), torch.zeros(1))),
                *marked(hf_vit_tokens(model, sig, img)), emb(ids[None, s:]), *marked(latent_block(x, t))]
        seq = torch.cat(segs, 1)
        n_vae, n_vit, n_txt = segs[2].shape[1], segs[5].shape[1], len(ids) - s
        seg_id = torch.tensor([0] * s + [1] * (n_vae + 2) + [2] * (n_vit + 2) + [3] * n_txt + [4] * (n_vae + 2))
        full = torch.tensor([False] * s + [True] * (n_vae + n_vit + 4) + [False] * n_txt + [True] * (n_vae + 2))
        pos = torch.cat([torch.arange(s), torch.full((n_vae + 2,), s), torch.full((n_vit + 2,), s + 1),
                         s + 2 + torch.arange(n_txt), torch.full((n_vae + 2,), s + 2 + n_txt)])
        q, k = torch.arange(len(seg_id))[:, None], torch.arange(len(seg_id))[None]
        same = seg_id[:, None] == seg_id[None]
        allowed = (seg_id[None] < seg_id[:, None]) | (same & (full[:, None] | (k <= q)))
        mask = torch.zeros(1, 1, len(seg_id), len(seg_id)).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = hf.model(inputs_embeds=seq, position_ids=pos[None], attention_mask=mask).last_hidden_state
        text_start = s + n_vae + n_vit + 4
        logits = hf.lm_head(out[:, text_start:text_start + n_txt])  # last_hidden_state is after the final norm
        ref_logp = logits[:, :-1].log_softmax(-1).gather(2, ids[None, s + 1:, None])[..., 0]
        ref_v = unpatchify(model.llm2vae(out[:, -n_vae - 1:-1]), z, h, w, PATCH)
    m = tokens.response_mask[0, s + 1:]
    err_lp = (logp[0, s + 1:][m] - ref_logp[0][m]).abs().max().item()
    err_v = (v - ref_v).abs().max().item()
    print(f"edit context vs one Qwen3 sequence: max|dlogp| = {err_lp:.3g}, max|dv| = {err_v:.3g}")
    assert m.any() and err_lp < 1e-5 and err_v < 1e-5


def incremental_context(model, sys_ids, images, text_ids):
    """Bagel's own order of cache updates (``inferencer.py``): the system text (causal), then per
    image ``forward_cache_update_vae`` (block at one position, latents through the gen expert) and
    ``forward_cache_update_vit`` (und expert), then the prompt + reasoning (causal). One row, our
    decoder layers; returns (log-probs of ``text_ids[1:]``, the context)."""
    lm, emb = model.language_model, model.language_model.model.embed_tokens
    kv, rope, n_keys = None, 0, 0

    def update(h, causal, gen_slice=None):
        nonlocal kv, rope, n_keys
        n = h.shape[1]
        pos = rope + torch.arange(n)[None] if causal else torch.full((1, n), rope)
        out, new = lm.run(h, pos, attention_mask(torch.ones(1, n_keys + n, dtype=torch.bool), n, causal), kv, gen=gen_slice)
        kv = new if kv is None else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(kv, new)]
        rope, n_keys = rope + (n if causal else 1), n_keys + n
        return out

    marks = emb(torch.tensor([[model.ids["vision_start"], model.ids["vision_end"]]]))
    if sys_ids:
        update(emb(torch.tensor([sys_ids])), True)
    for img in images:
        from unigrpo.models.bagel_edit import vae_tokens, vit_tokens

        lat = vae_tokens(model, img[None])
        update(torch.cat([marks[:, :1], lat, marks[:, 1:]], 1), False, slice(1, lat.shape[1] + 1))
        update(torch.cat([marks[:, :1], vit_tokens(model, img[None]), marks[:, 1:]], 1), False)
    logp = None
    if text_ids:
        out = update(emb(torch.tensor([text_ids])), True)
        logits = lm.lm_head(lm.model.norm(out)).float()
        logp = logits[:, :-1].log_softmax(-1).gather(2, torch.tensor([text_ids])[:, 1:, None])[..., 0]
    ctx = BagelContext([k for k, _ in kv], [v for _, v in kv], torch.ones(1, n_keys, dtype=torch.bool),
                       torch.tensor([rope]))
    return logp, ctx


def test_edit_context_equals_bagels_incremental_cache_updates_with_two_images():
    """Distinct experts (the gen expert's own weights): a row with TWO input images, batched beside a
    row with one, == Bagel's incremental cache updates of that row alone: log-probs of the reasoning
    and the velocity of an edit step (the VAE latents through the gen expert, in Bagel's order)."""
    model = model_of()
    prompts = edit_prompts((2, 1), seed=4)
    tokens = sampled(model, prompts, seed=2)
    x, t = torch.randn((2, *model.latent_shape), generator=gen(5)), torch.tensor([0.8, 0.4])
    s = len(model._segment(model.system_prompt))
    with torch.no_grad():
        logp, ctx = model.forward_context(tokens)
        v = model.velocity(x, t, ctx)
        for i in range(2):
            ids = [int(a) for a, keep in zip(tokens.ids[i], tokens.mask[i]) if keep]
            ref_lp, ref_ctx = incremental_context(model, ids[:s], prompts[i].images, ids[s:])
            resp = tokens.response_mask[i][tokens.mask[i]][s + 1:]
            got = logp[i][tokens.mask[i]][s + 1:]
            torch.testing.assert_close(got[resp], ref_lp[0][resp], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[i:i + 1], model.velocity(x[i:i + 1], t[i:i + 1], ref_ctx), atol=1e-5, rtol=1e-5)
            assert int(ctx.next_pos[i]) == int(ref_ctx.next_pos[0])


def test_the_input_image_changes_the_edit_and_gradients_stay_on_their_expert():
    """The velocity depends on the input image; text loss -> und weights only (the input's VAE block
    reads the gen expert detached, its embeddings without gradient: the latent heads, trained here,
    get none from it); image loss on a detached context -> gen weights and heads only."""
    model = model_of(0, 0, "model.train_heads=true")
    prompts = edit_prompts((1, 1), seed=6)
    other = [dataclasses.replace(p, images=1 - p.images) for p in prompts]
    tokens = sampled(model, prompts)
    swapped = dataclasses.replace(tokens, images=model.encode(other).images)  # same tokens, other input images
    x, t = torch.randn((2, *model.latent_shape), generator=gen(2)), torch.tensor([0.4, 0.8])
    with torch.no_grad():
        va = model.velocity(x, t, model.forward_context(tokens)[1])
        vb = model.velocity(x, t, model.forward_context(swapped)[1])
    assert (va - vb).abs().max() > 1e-3
    sides = {s: {n for n, _ in g} for s, g in model.parameter_groups().items()}

    def grads():
        got = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}
        model.zero_grad(set_to_none=True)
        return got
    logp, ctx = model.forward_context(tokens)
    (-logp.sum()).backward()
    got = grads()
    assert got and got <= sides["text"] and not any("moe_gen" in n for n in got)
    model.velocity(x, t, model.detach_context(ctx)).pow(2).mean().backward()
    got = grads()
    assert got and got <= sides["image"] and "vae2llm.weight" in got
    assert not any(n.startswith(("vit_model.", "connector.", "vit_pos_embed.")) for n in sides["text"] | sides["image"])


# ----------------------------------------------------------------------------- edit CFG
def test_three_branch_edit_cfg_closed_form():
    """Bagel's edit guidance (app.py: edit_image): text branch ``[sys][VAE][ViT]`` (Bagel's incremental
    updates without the prompt), image branch ``[sys][prompt]`` (no image, no reasoning);
    ``text_channel``: v_text = (v_t + s_t (v - v_t)) * clamp(|v| / |.|, 0, 1) per token, then
    v_i + s_i (v_text - v_i), no renorm after; interval (0, 1]; text scale 1 = no guidance."""
    model = model_of()
    prompts = edit_prompts((1, 1), seed=7)
    tokens = sampled(model, prompts)
    x, t = torch.randn((2, *model.latent_shape), generator=gen(8)), torch.tensor([0.0, 0.7])
    s = model._segment(model.system_prompt)
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        ctx_text, ctx_img = model.cfg_contexts(tokens)
        v, v_t, v_i = (model.velocity(x, t, c) for c in (ctx, ctx_text, ctx_img))
        for i in range(2):
            _, ref_text = incremental_context(model, s, prompts[i].images, [])
            torch.testing.assert_close(v_t[i:i + 1], model.velocity(x[i:i + 1], t[i:i + 1], ref_text), atol=1e-5, rtol=1e-5)
        _, no_image = model.forward_context(model.encode([p.text for p in prompts]))
        torch.testing.assert_close(v_i, model.velocity(x, t, no_image), atol=1e-6, rtol=1e-6)
        out = model.cfg_velocity(x, t, ctx, ctx_text, ctx_img, text_scale=4.0, **EDIT)
        tv, tt, ti = (patchify(a, PATCH) for a in (v, v_t, v_i))
        g = tt + 4.0 * (tv - tt)
        scale = (tv.norm(dim=-1, keepdim=True) / (g.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
        assert (scale < 1).any()  # the renorm is exercised
        z, hh, ww = model.latent_shape
        ref = unpatchify(ti + 2.0 * (g * scale - ti), z, hh // PATCH, ww // PATCH, PATCH)
        torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[0], v[0])  # t = 0 is outside (0, 1]
        torch.testing.assert_close(model.cfg_velocity(x, t, ctx, ctx_text, ctx_img, text_scale=1.0, **EDIT), v,
                                   atol=0, rtol=0)


def test_evaluation_of_an_edit_uses_the_edit_guidance():
    """``sampling.generate`` with images and ``cfg_scale != 1`` (``unigrpo eval`` / ``sample``) ==
    an Euler loop over ``cfg_velocity`` with the edit settings, from the same tokens and noise."""
    from unigrpo.algo.schedule import timesteps
    from unigrpo.sampling import generate, reasoning_tokens

    model = model_of()
    n, prompts = 3, edit_prompts((1, 1), seed=9)
    with torch.no_grad():
        out = generate(model, prompts, num_steps=n, shift=3.0, cfg_scale=4.0, seed=5, max_new_tokens=4)
        g = torch.Generator().manual_seed(5)
        tokens = reasoning_tokens(model, prompts, None, True, 4, 1.0, g)
        _, ctx = model.forward_context(tokens)
        x = torch.randn((2, *model.latent_shape), generator=g)
        ctx_text, ctx_img = model.cfg_contexts(tokens)
        grid = timesteps(n, 3.0)
        for k in range(n):
            x = x + (grid[k + 1] - grid[k]) * model.cfg_velocity(x, grid[k].expand(2), ctx, ctx_text, ctx_img,
                                                                 text_scale=4.0, **EDIT)
    torch.testing.assert_close(out.images, model.decode(x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- loader and config
def test_vit_keys_load_by_name_and_a_mismatch_is_one_line(tmp_path):
    import shutil

    keys = set(load_file(f"{tiny_bagel_edit_dir()}/ema.safetensors"))
    vit_layer = {f"vit_model.vision_model.encoder.layers.{i}.{k}" for i in range(2) for k in
                 ("self_attn.q_proj.weight", "self_attn.out_proj.bias", "layer_norm1.weight", "layer_norm2.bias",
                  "mlp.fc1.weight", "mlp.fc2.bias")}
    assert vit_layer | {"vit_model.vision_model.embeddings.patch_embedding.weight",
                        "vit_model.vision_model.embeddings.position_embedding.weight",
                        "vit_model.vision_model.post_layernorm.weight", "connector.fc1.weight", "connector.fc2.bias",
                        "vit_pos_embed.pos_embed"} <= keys
    assert json.loads((Path(tiny_bagel_edit_dir()) / "vit_config.json").read_text())["num_hidden_layers"] == 3  # held + 1
    folder = tmp_path / "b"
    shutil.copytree(tiny_bagel_edit_dir(), folder)
    cfg = json.loads((folder / "vit_config.json").read_text())
    (folder / "vit_config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"holds 2 ViT layers, vit_config.json says 2 .*expected 1\)$") as e:
        load_bagel(folder, resolution=SIDE)
    assert "\n" not in str(e.value)
    (folder / "vit_config.json").write_text(json.dumps(cfg))
    state = load_file(str(folder / "ema.safetensors"))
    state.pop("connector.fc2.bias")
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 keys \['connector.fc2.bias'\]"):
        load_bagel(folder, resolution=SIDE)
    blind = load_bagel(folder, resolution=SIDE, vit=False)  # the ViT path skipped: text-to-image only
    assert not blind.sees_images and not blind.edits
    with pytest.raises(ValueError, match="does not see input images"):
        blind.encode(edit_prompts((1,)))


def test_capabilities_follow_the_folder():
    """An edit task needs sees_images / edits at validate: declared by the config when the folder has
    the ViT path (and model.vit is on)."""
    assert load_config(None, bagel_overrides(tiny_bagel_edit_dir())).model.capabilities == {"sees_images", "edits"}
    assert load_config(None, [*bagel_overrides(tiny_bagel_edit_dir()), "model.vit=false"]).model.capabilities == set()
    assert load_config(None, bagel_overrides(tiny_bagel_dir())).model.capabilities == set()
    with pytest.raises(ConfigError, match="model.vit_min_size"):
        load_config(None, [*bagel_overrides(tiny_bagel_edit_dir()), "model.vit_min_size=0"])
    with pytest.raises(ValueError, match=r"^model.vit_max_size: 504 is more than the ViT's image_size 32 \(8 patches"):
        load_bagel(tiny_bagel_edit_dir(), resolution=SIDE, vit_max_size=504)
    model = model_of()
    assert model.sees_images and model.edits and not any(p.requires_grad for n, p in model.named_parameters()
                                                        if n.startswith(("vit_model.", "connector.", "vit_pos_embed.")))


# ----------------------------------------------------------------------------- the CLI
def test_cli_one_lora_step_of_the_shapes_edit_task_ratio_exactly_one(tmp_path, monkeypatch):
    """Done-when: one LoRA step of ``builtin:bagel_edit_unigrpo`` with ``task.kind=shapes_edit`` (a
    rendered input scene + an instruction per prompt) on the tiny folder; the first update's
    log-probs equal the rollout's, text and image; the input images went through the context; the
    edit evaluation runs."""
    from unigrpo.models import bagel

    calls = []
    part = bagel.image_part
    monkeypatch.setattr(bagel, "image_part", lambda m, tokens: calls.append(len(tokens)) or part(m, tokens))
    out = tmp_path / "run"
    args = ["train", "builtin:bagel_edit_unigrpo", *bagel_overrides(tiny_bagel_edit_dir(), 4, 4), "threads=1",
            "model.vit_max_size=null",  # the tiny ViT's own 32 px (the shipped 504 is the real ViT's)
            "task.kind=shapes_edit", f"task.image_size={SIDE}", "rewards=[{name: shapes_edit}]",
            "text.max_reasoning_tokens=4", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=4", "algo.micro_batch_trajectories=2", "sampler.num_steps=3",
            "sampler.window_range=[0,2]", "sampler.window_size=2", "sampler.eval_num_steps=1", "eval.num_prompts=2",
            "eval.grid_prompts=2", "optim.lr_text=1e-2", "optim.lr_image=1e-2", "steps=1", "eval_every=1",
            f"output_dir={out}"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward/mean" in r)
    assert step["loss/text/first_logp_diff_max"] == 0.0 and step["loss/image/first_logp_diff_max"] == 0.0
    assert all(math.isfinite(v) for v in step.values() if isinstance(v, float))
    assert any(k.startswith("eval/") for r in rows for k in r)
    assert calls and max(calls) >= 2
    saved = load_file(str(out / "final.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_an_edit_task_on_bagel_without_its_vit_is_one_line_at_validate(capsys):
    edit = ["validate", "builtin:bagel_edit_unigrpo", "task.kind=shapes_edit", f"task.image_size={SIDE}",
            "rewards=[{name: shapes_edit}]"]
    assert main([*edit, *bagel_overrides(tiny_bagel_edit_dir(), 4, 4)]) == 0
    capsys.readouterr()
    assert main([*edit, *bagel_overrides(tiny_bagel_dir(), 4, 4)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a model with edits, sees_images" in err, err


def test_a_prompt_file_with_images_reaches_bagel_at_its_input_size(tmp_path, capsys):
    """A JSONL line's ``"images"`` (issue 19, item 1): accepted at validate for the folder with the
    ViT, refused in one line without it; loaded at the model's ``input_image_size`` and seen."""
    import numpy as np
    from PIL import Image

    from unigrpo.tasks import build_task

    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "make the square blue", "images": ["a.png"]}) + "\n"
                    + json.dumps({"prompt": "a red circle"}) + "\n")
    task_keys = ["task.kind=prompts", f"task.prompts={path}", "rewards=[{name: group_diversity}]"]
    assert main(["validate", "builtin:bagel_edit_unigrpo", *bagel_overrides(tiny_bagel_edit_dir(), 4, 4),
                 *task_keys]) == 0
    capsys.readouterr()
    assert main(["validate", "builtin:bagel_edit_unigrpo", *bagel_overrides(tiny_bagel_dir(), 4, 4), *task_keys]) == 2
    assert "line 1 has input images" in capsys.readouterr().err
    cfg = load_config(None, [*bagel_overrides(tiny_bagel_edit_dir(), 4, 4), *task_keys, "model.vit_max_size=null"])
    model, task = build_model(cfg, checkpoint=None), build_task(cfg)
    task.check(model, cfg)
    first = task.train[0]
    assert first.images.shape == (1, 3, SIDE, SIDE) and model.input_image_size == (SIDE, SIDE)
    assert model.encode(task.train).images.shape == (2, 1, 3, SIDE, SIDE)


def test_the_export_keeps_the_vit_path_and_reproduces_an_edit(tmp_path):
    """``unigrpo export`` of an edit policy: the released layout (vit_config.json and the ViT keys as
    they were) with the trained weights merged; rebuilt from it, the same log-probs and velocity for
    prompts with input images."""
    model = model_of(0, 4)
    with torch.no_grad():  # a trained policy: LoRA B non-zero, und weights moved
        for _, p in [*model.parameter_groups()["image"], *model.parameter_groups()["text"]]:
            p.add_(0.02 * torch.randn_like(p))
    model.save(tmp_path / "final.safetensors")
    out = tmp_path / "bagel"
    assert main(["export", str(tmp_path / "final.safetensors"), "--out", str(out)]) == 0
    again = build_model(load_config(None, bagel_overrides(str(out), 0, 0)), checkpoint=None)
    assert again.sees_images and again.edits
    prompts = edit_prompts((1, 2), seed=11)
    tokens = sampled(model, prompts)
    x, t = torch.randn((2, *model.latent_shape), generator=gen(12)), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        (lp1, c1), (lp2, c2) = model.forward_context(tokens), again.forward_context(tokens)
        v1, v2 = model.velocity(x, t, c1), again.velocity(x, t, c2)
    torch.testing.assert_close(lp2, lp1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the official code (opt-in)
def flash_attn_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **kw):
    """``flash_attn_varlen_func`` on the CPU: per packed sample SDPA, grouped K/V heads repeated,
    causal aligned bottom-right as flash-attn (q [Nq, H, D], k / v [Nk, Hkv, D])."""
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        qi, ki, vi = q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)
        rep = qi.shape[0] // ki.shape[0]
        mask = None
        if causal:
            nq, nk = qi.shape[1], ki.shape[1]
            mask = torch.arange(nk)[None] <= (nk - nq + torch.arange(nq))[:, None]
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qi, ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0), attn_mask=mask,
            scale=kw.get("softmax_scale")).transpose(0, 1))
    return torch.cat(out, 0)


@pytest.fixture
def official(monkeypatch):
    """ByteDance-Seed/Bagel's own ``modeling`` and ``inferencer`` from a checkout named by
    ``UNIGRPO_BAGEL_SRC`` (opt-in: nothing is fetched by the suite), importable on the CPU with
    ``flash_attn_varlen_func`` replaced by ``flash_attn_stand_in`` (and ``einops``, used only by its
    autoencoder, stubbed when absent); its hard-coded bf16 casts of Q / K / V read float32 here, so
    both sides compute in float32."""
    import os
    import sys
    import types

    src = os.environ.get("UNIGRPO_BAGEL_SRC")
    if not src:
        pytest.skip("UNIGRPO_BAGEL_SRC is not set (a ByteDance-Seed/Bagel checkout: the official-code parity)")
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_varlen_func = flash_attn_stand_in
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    try:
        import einops  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "einops", types.ModuleType("einops"))
        sys.modules["einops"].rearrange = None
    monkeypatch.syspath_prepend(src)
    import inferencer
    import modeling.bagel as bagel_pkg
    import modeling.bagel.qwen2_navit as qn
    import modeling.bagel.siglip_navit as sn

    class Float32Torch(types.ModuleType):
        bfloat16 = torch.float32

        def __getattr__(self, name):
            return getattr(torch, name)

    for mod in (qn, sn):
        monkeypatch.setattr(mod, "torch", Float32Torch("torch"))

    def default_rope(config, device=None, **_):  # transformers 5 dropped the "default" entry 4.49 had
        dim = config.hidden_size // config.num_attention_heads
        return 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim), 1.0
    import modeling.qwen2.modeling_qwen2 as mq
    monkeypatch.setitem(mq.ROPE_INIT_FUNCTIONS, "default", default_rope)
    yield bagel_pkg, inferencer
    for name in [n for n in sys.modules if n.split(".")[0] in ("modeling", "data", "inferencer")]:
        sys.modules.pop(name)


def official_model(bagel_pkg, model):
    """Bagel built as its app.py does, from the tiny folder's configs, holding ``model``'s weights."""
    import types

    folder = Path(tiny_bagel_edit_dir())
    llm = bagel_pkg.Qwen2Config(**json.loads((folder / "llm_config.json").read_text()))
    llm.qk_norm, llm.tie_word_embeddings, llm.layer_module = True, False, "Qwen2MoTDecoderLayer"
    llm.pad_token_id = None  # read by the vendored Qwen2 (a transformers 4.49 config default)
    vit = bagel_pkg.SiglipVisionConfig(**json.loads((folder / "vit_config.json").read_text()))
    vit.rope, vit.num_hidden_layers = False, vit.num_hidden_layers - 1
    cfg = bagel_pkg.BagelConfig(visual_gen=True, visual_und=True, llm_config=llm, vit_config=vit,
                                vae_config=types.SimpleNamespace(downsample=model.vae.downsample, z_channels=4),
                                vit_max_num_patch_per_side=model.vit_model.config.max_side,
                                connector_act="gelu_pytorch_tanh", latent_patch_size=2,
                                max_latent_size=model.latent_pos_embed.max_side)
    off = bagel_pkg.Bagel(bagel_pkg.Qwen2ForCausalLM(llm), bagel_pkg.SiglipVisionModel(vit), cfg)
    off.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
    missing, unexpected = off.load_state_dict(ours, strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing), (missing, unexpected)
    return off.float().eval()


def test_edit_matches_the_official_bagel_code(official):
    """Opt-in (``UNIGRPO_BAGEL_SRC``): the official ``InterleaveInferencer`` builds the edit contexts
    (``[sys]``, ``update_context_image``, prompt, the think text; ``cfg_text`` / ``cfg_img`` as
    ``interleave_inference``) and ``generate_image`` draws from our initial noise: one unguided
    Euler step (the velocity) and 3 steps with its edit guidance (text 4, image 2, (0, 1],
    text_channel) == ours from the same weights, image and noise."""
    from copy import deepcopy

    from unigrpo.models.bagel_vit import resize, resize_size

    bagel_pkg, inferencer = official
    model = model_of()
    off = official_model(bagel_pkg, model)
    img = edit_prompts((1,), seed=13)[0].images  # [1, 3, 32, 32]
    c = model.vit_model.config
    vit_img = resize(img, resize_size(SIDE, SIDE, model.vit_max_size, model.vit_min_size, c.patch_size))[0] * 2 - 1
    latent = model.encode_images(img)

    class VAE:
        def encode(self, x):
            torch.testing.assert_close(x, img * 2 - 1)  # Bagel's VAE input: ours
            return latent

        def decode(self, z):
            return torch.zeros(1, 3, SIDE, SIDE)

    class Tok:
        def encode(self, text):
            return model.tokenizer.encode(text, add_special_tokens=False).ids

    ids = {"bos_token_id": model.ids["start"], "eos_token_id": model.ids["end"],
           "start_of_image": model.ids["vision_start"], "end_of_image": model.ids["vision_end"]}
    inf = inferencer.InterleaveInferencer(off, VAE(), Tok(), lambda im, img_num=1: img[0] * 2 - 1,
                                          lambda im, img_num=1: vit_img, ids)
    prompt, think = "make the circle blue", "a red circle"
    with torch.no_grad():
        gen_ctx = inf.update_context_text(model.system_prompt, inf.init_gen_context())
        cfg_img = deepcopy(gen_ctx)
        gen_ctx = inf.update_context_image(None, gen_ctx)
        cfg_text = deepcopy(gen_ctx)
        gen_ctx = inf.update_context_text(prompt, gen_ctx)
        cfg_img = inf.update_context_text(prompt, cfg_img)
        gen_ctx = inf.update_context_text(think, gen_ctx)

        tokens = model.with_response(model.encode([Prompt(prompt, images=img)]), [think])
        _, ctx = model.forward_context(tokens)
        ctx_text, ctx_img = model.cfg_contexts(tokens)
        x0 = torch.randn((1, *model.latent_shape), generator=gen(14))
        for n, guided in ((1, False), (3, True)):
            drawn = official_draw(off, inf, x0, n, guided, gen_ctx, cfg_text, cfg_img, cfg_img_scale=2.0,
                                  cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
            grid, x = model.timesteps(n, 3.0), x0.clone()
            for k in range(n):
                t = grid[k].expand(1)
                v = model.cfg_velocity(x, t, ctx, ctx_text, ctx_img, text_scale=4.0, **EDIT) if guided else \
                    model.velocity(x, t, ctx)
                x = x + (grid[k + 1] - grid[k]) * v
            err = (patchify(x, PATCH)[0] - drawn).abs().max().item()
            print(f"official Bagel, {n} step(s), guided={guided}: max|dx| = {err:.3g} (|x - x0| ~ {(x - x0).abs().mean():.3g})")
            assert err < 1e-5


def official_draw(off, inf, x0, n, guided, gen_ctx, cfg_text, cfg_img, **guidance):
    """The official ``gen_image`` (``n`` Euler steps, text scale 4 with ``guidance``'s other settings,
    or none) from the initial noise ``x0`` (its ``prepare_vae_latent`` draws its own: replaced),
    returning ``generate_image``'s latent tokens [N, 64] (before ``decode_image``'s uint8 picture)."""
    drawn, prepare, generate = [], off.prepare_vae_latent, off.generate_image

    def with_noise(*a, **k):
        return {**prepare(*a, **k), "packed_init_noises": patchify(x0, PATCH)[0]}

    def capture(*a, **k):
        drawn.append(generate(*a, **k)[0])
        return drawn
    off.prepare_vae_latent, off.generate_image = with_noise, capture
    try:
        inf.gen_image((SIDE, SIDE), gen_ctx, cfg_text_scale=4.0 if guided else 1.0, cfg_text_precontext=cfg_text,
                      cfg_img_precontext=cfg_img, num_timesteps=n + 1, timestep_shift=3.0, **guidance)
    finally:
        off.prepare_vae_latent, off.generate_image = prepare, generate
    return drawn[0]


def test_text_to_image_matches_the_official_bagel_code(official):
    """Opt-in (``UNIGRPO_BAGEL_SRC``), the same for text-to-image with thinking (no image; the
    official ``cfg_text`` = ``[sys]``, ``cfg_img`` = ``[sys][prompt]``; text 4, image 1.5, interval
    (0.4, 1], global renorm): 6 guided steps reach t < 0.4, so both sides of the interval are drawn."""
    from copy import deepcopy

    bagel_pkg, inferencer = official
    model = model_of()
    off = official_model(bagel_pkg, model)

    class Tok:
        def encode(self, text):
            return model.tokenizer.encode(text, add_special_tokens=False).ids

    ids = {"bos_token_id": model.ids["start"], "eos_token_id": model.ids["end"],
           "start_of_image": model.ids["vision_start"], "end_of_image": model.ids["vision_end"]}
    inf = inferencer.InterleaveInferencer(off, None, Tok(), None, None, ids)
    prompt, think = "a red circle left of a blue square", "two shapes"
    with torch.no_grad():
        gen_ctx = inf.update_context_text(model.system_prompt, inf.init_gen_context())
        cfg_img = deepcopy(gen_ctx)
        cfg_text = deepcopy(gen_ctx)
        gen_ctx = inf.update_context_text(prompt, gen_ctx)
        cfg_img = inf.update_context_text(prompt, cfg_img)
        gen_ctx = inf.update_context_text(think, gen_ctx)
        tokens = model.with_response(model.encode([prompt]), [think])
        _, ctx = model.forward_context(tokens)
        ctx_text, ctx_img = model.cfg_contexts(tokens)
        x0 = torch.randn((1, *model.latent_shape), generator=gen(15))
        inf.vae_model = type("VAE", (), {"decode": lambda self, z: torch.zeros(1, 3, SIDE, SIDE)})()
        drawn = official_draw(off, inf, x0, 6, True, gen_ctx, cfg_text, cfg_img, cfg_img_scale=1.5,
                              cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
        grid, x = model.timesteps(6, 3.0), x0.clone()
        assert (grid[:-1] <= 0.4).any() and (grid[:-1] > 0.4).any()
        for k in range(6):
            v = model.cfg_velocity(x, grid[k].expand(1), ctx, ctx_text, ctx_img, text_scale=4.0, img_scale=1.5)
            x = x + (grid[k + 1] - grid[k]) * v
    err = (patchify(x, PATCH)[0] - drawn).abs().max().item()
    print(f"official Bagel text-to-image, 6 guided steps: max|dx| = {err:.3g} (|x - x0| ~ {(x - x0).abs().mean():.3g})")
    assert err < 1e-5
