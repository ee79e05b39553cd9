"""``model.kind: bagel`` on a tiny random BAGEL folder (the released file and key names, hidden 64,
2 layers, 4 / 2 heads, FLUX AE with ch 32) loaded through the production loader: the und expert
against transformers' Qwen3 (a Qwen2 with qk-norm), the image block against the same decoder run
as one sequence, the latent path against closed forms, the flow loop against Bagel's schedule
written from its formula, the loader's errors, which expert each loss reaches, and the CLI (ratio
exactly 1 on the first update, LoRA changes only LoRA). The protocol itself: test_conformance.py."""

import json
import math

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("peft")
from conftest import BAGEL_PROMPTS, bagel_factory, bagel_overrides, tiny_bagel_dir
from safetensors.torch import load_file, save_file
from testkit import lora_loss_grads

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.bagel import PATCH, BagelContext
from unigrpo.models.bagel_io import load_bagel
from unigrpo.models.bagel_latent import patchify, sincos_2d, timestep_features, unpatchify
from unigrpo.models.bagel_mot import LLMConfig, Qwen2MoTForCausalLM
from unigrpo.models.bagel_vae import AutoEncoder
from unigrpo.sampling import ode_sample


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_of(text_rank=0, image_rank=0, *extra):
    cfg = load_config(None, [*bagel_overrides(tiny_bagel_dir(), text_rank, image_rank), *extra])
    torch.manual_seed(0)
    return build_model(cfg, checkpoint=None)


def sampled(model, prompts=BAGEL_PROMPTS, seed=0, n=8):
    return model.sample_reasoning(model.encode(prompts), max_new_tokens=n, generator=gen(seed))


# ----------------------------------------------------------------------------- checkpoint layout
LAYER_KEYS = [f"self_attn.{p}{s}.{w}" for s in ("", "_moe_gen") for p in ("q_proj", "k_proj", "v_proj")
              for w in ("weight", "bias")] + \
    [f"self_attn.{p}{s}.weight" for s in ("", "_moe_gen") for p in ("o_proj", "q_norm", "k_norm")] + \
    [f"{m}.{p}.weight" for m in ("mlp", "mlp_moe_gen") for p in ("gate_proj", "up_proj", "down_proj")] + \
    [f"{n}{s}.weight" for n in ("input_layernorm", "post_attention_layernorm") for s in ("", "_moe_gen")]


def test_tiny_folder_has_the_released_key_names():
    """The key list of BAGEL-7B-MoT's ema.safetensors (ByteDance-Seed/Bagel module tree), written
    out here by hand, is exactly the tiny file's (+ one ViT key the loader ignores)."""
    keys = set(load_file(f"{tiny_bagel_dir()}/ema.safetensors"))
    expected = {f"language_model.model.layers.{i}.{k}" for i in range(2) for k in LAYER_KEYS}
    expected |= {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
                 "language_model.model.norm_moe_gen.weight", "language_model.lm_head.weight",
                 "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias", "time_embedder.mlp.2.weight",
                 "time_embedder.mlp.2.bias", "vae2llm.weight", "vae2llm.bias", "llm2vae.weight", "llm2vae.bias",
                 "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"}
    assert keys == expected
    ae = set(load_file(f"{tiny_bagel_dir()}/ae.safetensors"))
    assert {"encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
            "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.conv2.bias", "encoder.norm_out.weight",
            "decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight",
            "decoder.up.1.upsample.conv.weight", "decoder.mid.attn_1.proj_out.weight", "decoder.conv_out.bias"} <= ae


def test_full_size_shapes_match_the_released_checkpoint_size():
    """Built on the meta device at BAGEL-7B-MoT's geometry: the parameter counts that make the
    29.2 GB bf16 ema.safetensors (und 7.62 B, gen 6.53 B) and the 84 M FLUX AE."""
    with torch.device("meta"):
        lm = Qwen2MoTForCausalLM(LLMConfig(152064, 3584, 28, 28, 4, 18944))
        ae = AutoEncoder()
    gen_n = sum(p.numel() for n, p in lm.named_parameters() if "moe_gen" in n)
    und_n = sum(p.numel() for p in lm.parameters()) - gen_n
    assert round(und_n / 1e9, 2) == 7.62 and round(gen_n / 1e9, 2) == 6.53
    assert round(sum(p.numel() for p in ae.parameters()) / 1e6) == 84
    assert AutoEncoder.arch_from_shapes({k: tuple(v.shape) for k, v in ae.state_dict().items()}) == \
        {"ch": 128, "ch_mult": (1, 2, 4, 4), "num_res_blocks": 2, "z_channels": 16}


def test_loader_errors_name_the_keys(tmp_path):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(tiny_bagel_dir(), folder)
    state = load_file(str(folder / "ema.safetensors"))
    state.pop("language_model.model.layers.1.self_attn.k_norm_moe_gen.weight")
    state["vit_model.vision_model.post_layernorm.weight"] = torch.ones(4)  # ViT keys: ignored
    state["connector.fc9.weight"] = torch.ones(4)
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(ValueError) as e:
        load_bagel(folder, resolution=32)
    msg = str(e.value)
    assert "\n" not in msg and "missing 1 keys ['language_model.model.layers.1.self_attn.k_norm_moe_gen.weight']" in msg
    assert "unexpected 0 keys" in msg and "ignored: vit_model.*, connector.*, vit_pos_embed.*" in msg
    state["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"] = torch.ones(16)
    state["language_model.extra.weight"] = torch.ones(2)
    save_file(state, str(folder / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"missing 0 keys \[\], unexpected 1 keys \['language_model.extra.weight'\]"):
        load_bagel(folder, resolution=32)
    (folder / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no ae.safetensors"):
        load_bagel(folder, resolution=32)
    with pytest.raises(ValueError, match="model.resolution: 40 must be a multiple of 4 with at most 8"):
        load_bagel(tiny_bagel_dir(), resolution=40)


# ----------------------------------------------------------------------------- independent references
def qwen3_of(model):
    """transformers' Qwen3 (Qwen2 + per-head q/k RMSNorm) holding our und expert's weights
    (attention_bias adds an o_proj bias Qwen2 lacks: set to 0). Eager attention (explicit softmax)."""
    import transformers

    c = model.llm_config
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, attention_bias=True, tie_word_embeddings=False, attn_implementation="eager"))
    ours = {k[len("language_model."):]: v for k, v in model.state_dict().items()
            if k.startswith("language_model.") and "moe_gen" not in k}
    state = {k: ours.get(k, torch.zeros_like(v)) for k, v in hf.state_dict().items()}
    assert {k for k in hf.state_dict() if k not in ours} == {f"model.layers.{i}.self_attn.o_proj.bias"
                                                             for i in range(c.num_hidden_layers)}
    hf.load_state_dict(state)
    return hf.eval()


def test_und_expert_equals_transformers_qwen3_with_qk_norm():
    """Teacher-forced log-probs of a LEFT-padded batch (positions from the mask) == transformers'
    Qwen3 on the same weights: RMSNorm, qk-norm before RoPE, RoPE, GQA, SwiGLU, untied head."""
    model = model_of()
    tokens = sampled(model)
    hf = qwen3_of(model)
    with torch.no_grad():
        logp, _ = model.forward_context(tokens, 0.7)
        pos = (tokens.mask.long().cumsum(1) - 1).clamp(min=0)
        logits = hf(input_ids=tokens.ids, attention_mask=tokens.mask.long(), position_ids=pos).logits.float() / 0.7
        ref = logits[:, :-1].log_softmax(-1).gather(2, tokens.ids[:, 1:, None])[..., 0]
    m = tokens.response_mask[:, 1:]
    err = (logp[:, 1:][m] - ref[m]).abs().max().item()
    print(f"und expert vs transformers Qwen3: max|dlogp| = {err:.3g}")
    assert err < 1e-5


def test_image_block_equals_the_decoder_run_as_one_sequence():
    """With the gen expert a copy of the und expert (Bagel's init_moe), ``velocity`` == the same
    decoder (transformers' Qwen3) over [context | vision_start latents vision_end] with the block
    at ONE position, causal context, full attention inside the block; v = llm2vae(norm(h))."""
    model = model_of()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "moe_gen" in name:
                p.copy_(dict(model.named_parameters())[name.replace("_moe_gen", "")])
    tokens = sampled(model, BAGEL_PROMPTS[:1])
    x, t = torch.randn((1, *model.latent_shape), generator=gen(3)), torch.tensor([0.37])
    hf = qwen3_of(model)
    with torch.no_grad():
        v = model.velocity(x, t, model.forward_context(tokens)[1])
        length = tokens.ids.shape[1]
        z, hh, ww = model.latent_shape
        h, w = hh // PATCH, ww // PATCH
        ids = torch.arange(h)[:, None] * model.latent_pos_embed.max_side + torch.arange(w)[None]
        lat = model.vae2llm(patchify(x, PATCH)) + model.time_embedder.mlp(timestep_features(t)) \
            + model.latent_pos_embed.pos_embed[ids.reshape(-1)]
        emb = hf.model.embed_tokens
        seq = torch.cat([emb(tokens.ids), emb(torch.tensor([[model.ids["vision_start"]]])), lat,
                         emb(torch.tensor([[model.ids["vision_end"]]]))], 1)
        n = h * w + 2
        pos = torch.cat([torch.arange(length), torch.full((n,), length)])[None]
        allowed = torch.ones(length + n, length + n, dtype=torch.bool).tril()
        allowed[length:, length:] = True
        mask = torch.zeros(1, 1, length + n, length + n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out = hf.model(inputs_embeds=seq, position_ids=pos, attention_mask=mask).last_hidden_state
        ref = unpatchify(model.llm2vae(out[:, length + 1:length + n - 1]), z, h, w, PATCH)
    err = (v - ref).abs().max().item()
    print(f"image block vs one-sequence Qwen3: max|dv| = {err:.3g} (|v| ~ {v.abs().mean():.3g})")
    assert err < 1e-5


def test_latent_path_closed_forms():
    x = torch.randn(2, 3, 4, 6)
    tok = patchify(x, 2)
    assert tok.shape == (2, 6, 12)
    for r in range(2):
        for c in range(3):
            for p in range(2):
                for q in range(2):  # within-patch order (p, q, channel)
                    assert torch.equal(tok[:, r * 3 + c, (p * 2 + q) * 3:(p * 2 + q + 1) * 3], x[:, :, 2 * r + p, 2 * c + q])
    assert torch.equal(unpatchify(tok, 3, 2, 3, 2), x)
    t = torch.tensor([0.0, 0.25, 1.0])
    f = timestep_features(t, 8)  # t in [0, 1] as is, [cos, sin], w_k = 1e4^(-k/4)
    w = torch.tensor([1e4 ** (-k / 4) for k in range(4)])
    torch.testing.assert_close(f, torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], 1))
    table = sincos_2d(8, 5)  # entry row * 5 + col: [sin, cos](col * w), [sin, cos](row * w), w_k = 1e4^(-k/2)
    wk = torch.tensor([1.0, 1e-2])
    row, col = 3, 1
    expect = torch.cat([torch.sin(col * wk), torch.cos(col * wk), torch.sin(row * wk), torch.cos(row * wk)])
    torch.testing.assert_close(table[row * 5 + col], expect)


def test_one_euler_ode_sample_is_bagels_flow_loop():
    """ode_sample(num_steps=N-1) == Bagel's generate_image loop written from its formula:
    t = shift(linspace(1, 0, N)), x <- x - v(x, t_i) (t_i - t_{i+1}); N = num_timesteps."""
    model = model_of()
    tokens = sampled(model, BAGEL_PROMPTS[:2])
    x0 = torch.randn((2, *model.latent_shape), generator=gen(5))
    n_timesteps, s = 6, 3.0
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        ours = ode_sample(model, ctx, n_timesteps - 1, s, x_init=x0.clone())
        ts = torch.linspace(1, 0, n_timesteps)
        ts = s * ts / (1 + (s - 1) * ts)
        x = x0.clone()
        for i in range(n_timesteps - 1):
            x = x - model.velocity(x, ts[i].expand(2), ctx) * (ts[i] - ts[i + 1])
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=1e-6)
    assert (ours - x0).abs().max() > 0.1
    # sampler.shift: null = Bagel's own schedule (timestep_shift 3)
    torch.testing.assert_close(model.timesteps(n_timesteps - 1, None), ts, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- protocol specifics
def test_prompt_layout_and_thinking_off_context():
    model = model_of()
    enc = model.encode(["a red circle"])
    text = model.tokenizer.decode(enc.ids[0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>You should first think about the planning process")
    assert text.endswith("<|im_end|><|im_start|>a red circle<|im_end|><|im_start|>")
    # thinking off: the dangling decode-start token is not attended; the block sits right after [sys][prompt]
    x, t = torch.randn((1, *model.latent_shape), generator=gen(1)), torch.tensor([0.5])
    with torch.no_grad():
        _, ctx = model.forward_context(enc)
        assert ctx.mask[0, :-1].all() and not ctx.mask[0, -1] and int(ctx.next_pos[0]) == enc.ids.shape[1] - 1
        closed = enc.index(slice(None))
        closed = type(enc)(closed.ids[:, :-1], closed.mask[:, :-1], closed.response_mask[:, :-1])
        _, ctx2 = model.forward_context(closed)
        torch.testing.assert_close(model.velocity(x, t, ctx), model.velocity(x, t, ctx2), atol=1e-6, rtol=1e-6)
    no_think = model_of(0, 0, "model.think=false")
    assert no_think.tokenizer.decode(no_think.encode(["a red circle"]).ids[0].tolist(),
                                     skip_special_tokens=False) == "<|im_start|>a red circle<|im_end|><|im_start|>"
    null = no_think.null_context(2)  # Bagel's text-CFG context without thinking: an empty cache
    assert null.mask.shape == (2, 0) and null.keys[0].shape[2] == 0
    assert no_think.velocity(x.expand(2, -1, -1, -1), torch.tensor(0.5), null).isfinite().all()


def test_kv_cache_decode_equals_no_cache_decode():
    model = model_of()
    enc = model.encode(BAGEL_PROMPTS)
    a, lp_a = model.sample_reasoning(enc, max_new_tokens=10, generator=gen(4), return_logprobs=True)
    b, lp_b = model.sample_reasoning(enc, max_new_tokens=10, generator=gen(4), return_logprobs=True, use_cache=False)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)


def grads_by_side(model):
    sides = {"text": {n for n, _ in model.parameter_groups()["text"]},
             "image": {n for n, _ in model.parameter_groups()["image"]}}
    got = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}
    model.zero_grad(set_to_none=True)
    return {s: got & names for s, names in sides.items()}, got


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_loss_reaches_its_expert_and_the_markers_are_part_of_the_context(checkpointing):
    """Text loss -> und weights only. Image loss on a detached context -> gen weights only. Detaching
    only the K/V is NOT enough: the two image markers run through the und weights and embeddings,
    so the image loss still reaches the text expert; ``detach_context`` cuts that path too (also
    when backward recomputes the layers outside the detached-weights call)."""
    model = model_of(0, 0, f"model.gradient_checkpointing={str(checkpointing).lower()}")  # both experts in full
    tokens = sampled(model, BAGEL_PROMPTS[:2])
    x, t = torch.randn((2, *model.latent_shape), generator=gen(2)), torch.tensor([0.4, 0.8])
    logp, ctx = model.forward_context(tokens)
    (-logp.sum()).backward()
    by, got = grads_by_side(model)
    assert by["text"] and not by["image"] and got <= by["text"]
    assert all("moe_gen" not in n for n in got)

    model.velocity(x, t, model.detach_context(ctx)).pow(2).mean().backward()
    by, got = grads_by_side(model)
    assert by["image"] and not by["text"] and got == by["image"]
    assert "language_model.model.norm_moe_gen.weight" in got and all("moe_gen" in n for n in got)

    kv_only = BagelContext([k.detach() for k in ctx.keys], [v.detach() for v in ctx.values], ctx.mask, ctx.next_pos)
    model.velocity(x, t, kv_only).pow(2).mean().backward()
    by, _ = grads_by_side(model)
    assert "language_model.model.embed_tokens.weight" in by["text"]  # the markers' embeddings
    assert any(".self_attn.q_proj." in n for n in by["text"])  # the markers' und projections


def test_bf16_weights_keep_float32_io():
    """bf16 weights (the GPU setting) with float32 log-probs and velocities (the SDE math) and
    float32 LoRA weights and gradients (a bf16 weight would round a 1e-6 update away)."""
    from unigrpo.config import BAGEL_GEN_TARGETS, BAGEL_UND_TARGETS

    model = load_bagel(tiny_bagel_dir(), dtype="bfloat16", resolution=32)
    model.add_lora(4, 4, BAGEL_UND_TARGETS, BAGEL_GEN_TARGETS)
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert model.vae.encoder.conv_in.weight.dtype == torch.float32
    tokens = sampled(model, BAGEL_PROMPTS[:2], n=4)
    logp, ctx = model.forward_context(tokens)
    v = model.velocity(torch.randn((2, *model.latent_shape)), torch.tensor(0.5), ctx)
    assert logp.dtype == v.dtype == torch.float32 and logp.isfinite().all() and v.isfinite().all()
    (v.pow(2).mean() - logp.sum()).backward()
    lora = [p for g in model.parameter_groups().values() for _, p in g]
    assert lora and all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora)


def test_gradient_checkpointing_and_chunked_logits_change_no_gradient():
    plain, ckpt = model_of(4, 4), model_of(4, 4, "model.gradient_checkpointing=true", "model.logits_chunk=3")
    tokens = sampled(plain, BAGEL_PROMPTS[:2])
    x, t = torch.randn((2, *plain.latent_shape), generator=gen(2)), torch.tensor(0.5)
    out = [lora_loss_grads(m, tokens, x, t) for m in (plain, ckpt)]
    assert out[0].keys() == out[1].keys() and all(g is not None for g in out[0].values())
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], atol=1e-6, rtol=1e-5)


def test_lora_ranks_per_expert():
    model = model_of(2, 4)
    ranks = {n: p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert len(ranks) == 2 * 2 * 7  # 7 projections per expert per layer
    assert all(r == (4 if "moe_gen" in n else 2) for n, r in ranks.items())


def test_lora_step_moves_only_lora_and_the_reference_is_the_base():
    model, base = model_of(4, 4), model_of(0, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all("lora_" in n for g in model.parameter_groups().values() for n, _ in g)
    assert model.reference().state_dict() == {}  # LoRA: the reference is the frozen base, nothing saved
    tokens = sampled(model, BAGEL_PROMPTS[:2])
    x, t = torch.randn((2, *model.latent_shape), generator=gen(1)), torch.tensor([0.3, 0.9])
    opt = torch.optim.AdamW([p for g in model.parameter_groups().values() for _, p in g], lr=1e-2)
    logp, ctx = model.forward_context(tokens)
    (-logp.sum() + model.velocity(x, t, ctx).pow(2).mean()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("moe_gen" in n for n in changed) and any("moe_gen" not in n for n in changed)
    ref = model.reference()
    with torch.no_grad():
        lp_r, c_r = ref.forward_context(tokens)
        lp_b, c_b = base.forward_context(tokens)
        assert torch.equal(lp_r, lp_b)  # (the velocity through peft's disabled layers: float-close, not bitwise)
        torch.testing.assert_close(ref.velocity(x, t, c_r), base.velocity(x, t, c_b), atol=1e-6, rtol=1e-6)
        assert not torch.equal(model.forward_context(tokens)[0], lp_b)


def test_bagel_evaluation_cfg_branches_interval_and_per_row_renorm():
    """Two-branch CFG (eval only): the image branch is the context without the reasoning, the text
    branch the system prompt alone; closed form of the guidance + global renorm per row; t outside
    (0.4, 1] gives the conditional velocity; a batch equals its rows alone (no whole-batch norm)."""
    model = model_of()
    tokens = sampled(model, BAGEL_PROMPTS[:2])
    x, t = torch.randn((2, *model.latent_shape), generator=gen(6)), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        ctx_text, ctx_img = model.cfg_contexts(tokens)
        _, ctx_prompt = model.forward_context(model.encode(BAGEL_PROMPTS[:2]))
        v, v_t, v_i = (model.velocity(x, t, c) for c in (ctx, ctx_text, ctx_img))
        torch.testing.assert_close(v_i, model.velocity(x, t, ctx_prompt), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v_t, model.velocity(x, t, model.null_context(2)), atol=0, rtol=0)
        out = model.cfg_velocity(x, t, ctx, ctx_text, ctx_img, text_scale=4.0, img_scale=1.5)
        g = v_i + 1.5 * (v_t + 4.0 * (v - v_t) - v_i)
        scale = (v[1].norm() / g[1].norm()).clamp(max=1.0)
        assert scale < 1  # the renorm is exercised
        torch.testing.assert_close(out[1], g[1] * scale, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[0], v[0])  # t = 0.3 is outside the interval
        for i in range(2):
            rows = tokens.index(torch.tensor([i]))
            alone = model.cfg_velocity(x[i:i + 1], t[i:i + 1], model.forward_context(rows)[1], *model.cfg_contexts(rows),
                                       text_scale=4.0, img_scale=1.5)
            torch.testing.assert_close(alone[0], out[i], atol=1e-5, rtol=1e-5)
        plain = model.cfg_velocity(x, t, ctx, ctx_text, ctx_img, text_scale=1.0, img_scale=1.0)
        torch.testing.assert_close(plain, v, atol=1e-6, rtol=1e-6)


def test_evaluation_with_cfg_uses_the_two_branch_guidance():
    """``sampling.generate`` (``unigrpo eval`` / ``sample``) with ``cfg_scale != 1`` guides with
    Bagel's two branches (``eval_guidance``: text scale = cfg_scale, img 1.5, interval, renorm):
    equal to an Euler loop over ``cfg_velocity`` written here from the same tokens and noise."""
    from unigrpo.algo.schedule import timesteps
    from unigrpo.sampling import generate, reasoning_tokens

    model = model_of()
    n, prompts = 4, BAGEL_PROMPTS[:2]
    with torch.no_grad():
        out = generate(model, prompts, num_steps=n, shift=3.0, cfg_scale=4.0, seed=5, max_new_tokens=4)
        g = torch.Generator().manual_seed(5)  # generate's draws: the reasoning, then the noise
        tokens = reasoning_tokens(model, prompts, None, True, 4, 1.0, g)
        _, ctx = model.forward_context(tokens)
        x = torch.randn((2, *model.latent_shape), generator=g)
        ctx_text, ctx_img = model.cfg_contexts(tokens)
        grid = timesteps(n, 3.0)
        for k in range(n):
            v = model.cfg_velocity(x, grid[k].expand(2), ctx, ctx_text, ctx_img, text_scale=4.0)
            x = x + (grid[k + 1] - grid[k]) * v
        plain = generate(model, prompts, num_steps=n, shift=3.0, cfg_scale=1.0, seed=5, max_new_tokens=4)
    torch.testing.assert_close(out.images, model.decode(x), atol=1e-6, rtol=0)
    assert (out.images - plain.images).abs().max() > 1e-4  # the guidance changed the images


# ----------------------------------------------------------------------------- the CLI
def test_cli_train_lora_ratio_exactly_one_then_eval_and_sample(tmp_path, capsys):
    """Done-when: `unigrpo train builtin:bagel_unigrpo model.path=DIR ...` on the tiny folder; the
    first update's log-probs equal the rollout's (text and image); only LoRA tensors are saved and
    trained; `eval` and `sample` run on the result."""
    tiny = [*bagel_overrides(tiny_bagel_dir(), 4, 4), "threads=1", "sampler.eval_num_steps=2",
            "text.max_reasoning_tokens=6", "model.gradient_checkpointing=true"]  # the shipped setting
    out = tmp_path / "run"
    assert main(["train", "builtin:bagel_unigrpo", *tiny, "algo.prompts_per_step=2", "algo.group_size=2",
                 "algo.trajectories_per_minibatch=4", "algo.micro_batch_trajectories=2", "sampler.num_steps=4",
                 "sampler.window_range=[0,3]", "sampler.window_size=2", "eval.num_prompts=2", "eval.grid_prompts=2",
                 "optim.lr_text=1e-2", "optim.lr_image=1e-2", "steps=3", "eval_every=0", f"output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["loss/text/first_logp_diff_max"] == 0.0 and r["loss/image/first_logp_diff_max"] == 0.0
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert any(r["loss/text/grad_norm"] > 0 for r in steps)
    saved = load_file(str(out / "final.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    start = model_of(4, 4)
    moved = [k for k, v in saved.items() if not torch.equal(v, start.trainable_state()[k])]
    assert any("moe_gen" in k for k in moved) and any("moe_gen" not in k for k in moved)
    capsys.readouterr()
    assert main(["eval", "builtin:bagel_unigrpo", *tiny, "eval.num_prompts=2", "eval.grid_prompts=2",
                 "--checkpoint", str(out / "final.safetensors"), "--out", str(tmp_path / "eval")]) == 0
    assert main(["sample", "a red circle", "--config", "builtin:bagel_unigrpo", *tiny, "--n", "2",
                 "--checkpoint", str(out / "final.safetensors"), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_cli_resume_with_the_und_expert_in_full_equals_an_uninterrupted_run(tmp_path):
    """2 steps == 1 step + --resume 1 step, bitwise, with the und expert trained in full (its
    reference a snapshot, saved with the run) and LoRA on the gen expert."""
    args = ["train", "builtin:bagel_unigrpo", *bagel_overrides(tiny_bagel_dir(), 0, 4), "threads=1",
            "model.gradient_checkpointing=false", "text.max_reasoning_tokens=4", "algo.prompts_per_step=2",
            "algo.group_size=2", "algo.trajectories_per_minibatch=4", "algo.micro_batch_trajectories=4",
            "algo.ppo_epochs=1", "sampler.num_steps=3", "sampler.window_range=[0,2]", "sampler.window_size=1",
            "optim.lr_text=1e-3", "optim.lr_image=1e-2", "save_every=1", "eval_every=0", "eval.num_prompts=1",
            "eval.grid_prompts=1", "sampler.eval_num_steps=1"]
    assert main([*args, f"output_dir={tmp_path / 'a'}", "steps=2"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'b'}", "steps=1"]) == 0
    assert main([*args, f"output_dir={tmp_path / 'b'}", "steps=2", "--resume"]) == 0
    a, b = load_file(str(tmp_path / "a" / "final.safetensors")), load_file(str(tmp_path / "b" / "final.safetensors"))
    assert a.keys() == b.keys() and any("lora_" not in k for k in a) and any("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_factory_fresh_seed_differs_in_the_und_expert_only():
    a, b = bagel_factory(0)[0], bagel_factory(1)[0]
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    differ = {n for n in sa if "lora_A" not in n and not torch.equal(sa[n], sb[n])}
    assert differ == {n for n, _ in a.parameter_groups()["text"]}


def test_a_fully_trained_expert_in_bf16_is_refused_in_one_line():
    """bf16 weights round a 1e-6 AdamW step away and the adapter keeps no float32 master copy: a
    fully trained expert needs model.dtype=float32 (LoRA weights are float32 anyway)."""
    from unigrpo.config import ConfigError, load_config

    base = [*bagel_overrides(tiny_bagel_dir(), 4, 4), "model.dtype=bfloat16"]
    load_config(None, base)  # LoRA on both experts: fine
    load_config(None, [*base, "model.lora.text_rank=0", "algo.train_text=false"])  # frozen: fine
    with pytest.raises(ConfigError, match=r"^model.dtype: bfloat16 weights cannot .*model.lora.text_rank=0"):
        load_config(None, [*base, "model.lora.text_rank=0"])


def test_the_rollout_reads_the_context_the_update_reads():
    """With a trained (non-zero) und LoRA, Bagel's velocity on a detached context (the path the
    image loss takes under ``algo.detach_context``) differs from the plain one in the last bits, so
    the rollout must sample on the same detached context: then the window log-probs it records are
    exactly the update's (first ratio 1). Found by ``text.batch_groups`` runs: 1.2e-7 at step 2."""
    from unigrpo import rollout

    torch.manual_seed(0)
    model = build_model(load_config(None, bagel_overrides(tiny_bagel_dir(), 4, 4)), checkpoint=None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # as after a few updates
                p.add_(0.05 * torch.randn_like(p))
    tokens = model.sample_reasoning(model.encode(BAGEL_PROMPTS), max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    x, t = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(2)), torch.tensor([1.0, 0.9, 0.75])
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        assert not torch.equal(model.velocity(x, t, ctx), model.velocity(x, t, model.detach_context(ctx)))
    kw = {"num_steps": 4, "shift": 3.0, "kind": "flow_sde", "noise_level": 0.8, "window_size": 2, "cfg_scale": 1.0,
          "temperature": 1.0, "reduction": "mean"}
    rnd = rollout.sample_images(model, tokens, [5, 6, 7], torch.tensor([0, 1, 2]), **kw)  # detach_context default
    _, ctx = model.forward_context(tokens)
    scores = rollout.score_window(model, rnd, model.detach_context(ctx), kind="flow_sde", noise_level=0.8,
                                  cfg_scale=1.0, reduction="mean")
    assert torch.equal(torch.stack(scores.logp, 1).detach(), rnd.logp_img_old)
