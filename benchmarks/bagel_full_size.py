"""Time one rollout + one update of BAGEL-7B-MoT at FULL size with RANDOM weights (no checkpoint
needed), through the adapter's own code path: KV-cache reasoning decode, the teacher-forced
context pass, ``num_steps`` velocity calls, then one update (text log-probs + ``window`` velocity
calls on a detached context, backward, AdamW step on the LoRA weights). Prints one JSON line with
the times and the peak GPU memory.

    python benchmarks/bagel_full_size.py --device cuda                  # the real geometry, bf16
    python benchmarks/bagel_full_size.py --size tiny --device cpu --dtype float32 --resolution 32   # a smoke run

Random weights never emit ``<|im_end|>``, so every row decodes ``--think-tokens`` tokens (the
worst case). The tokenizer is the tiny test one (ids are far below the real vocabulary size).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build(size: str, device: str, dtype: torch.dtype, resolution: int, rank: int, checkpointing: bool):
    from tokenizers import Tokenizer

    from unigrpo.config import BAGEL_GEN_TARGETS, BAGEL_UND_TARGETS
    from unigrpo.models.bagel import BagelModel
    from unigrpo.models.bagel_io import _tiny_tokenizer
    from unigrpo.models.bagel_latent import sincos_2d
    from unigrpo.models.bagel_mot import LLMConfig
    from unigrpo.models.bagel_vae import AutoEncoder

    folder = tempfile.mkdtemp(prefix="bagel_tok_")
    vocab = _tiny_tokenizer(Path(folder))
    tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    if size == "full":
        llm, side, vae_args = LLMConfig(152064, 3584, 28, 28, 4, 18944), 64, {}
    else:
        llm, side = LLMConfig(vocab, 64, 2, 4, 2, 128, rope_theta=1e4), 8
        vae_args = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4}
    with torch.device("meta"):
        model = BagelModel(llm, tok, AutoEncoder(**vae_args), max_latent_size=side, resolution=resolution)
    model.to(dtype).to_empty(device=device)
    model.vae.float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1 and not n.startswith("vae."):
                p.fill_(1.0)
            elif n.startswith("vae.") and "norm" in n:
                p.fill_(1.0 if n.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)
        model.latent_pos_embed.pos_embed.copy_(sincos_2d(llm.hidden_size, side))
    model.add_lora(rank, rank, BAGEL_UND_TARGETS, BAGEL_GEN_TARGETS)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.eval()


def sync(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="trajectories of one rollout chunk / micro-batch")
    ap.add_argument("--think-tokens", type=int, default=256)
    ap.add_argument("--num-steps", type=int, default=24)
    ap.add_argument("--window", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--no-checkpointing", action="store_true")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    dev = a.device
    t0 = sync(dev)
    model = build(a.size, dev, dtype, a.resolution, a.rank, not a.no_checkpointing)
    t_build = sync(dev) - t0
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = ["a red circle left of a blue square"] * a.rows
    x = torch.randn((a.rows, *model.latent_shape), generator=g).to(dev)
    grid = torch.linspace(1, 0, a.num_steps + 1, device=dev)
    grid = 3 * grid / (1 + 2 * grid)
    with torch.no_grad():  # ---- rollout
        t0 = sync(dev)
        tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=a.think_tokens, generator=g)
        t1 = sync(dev)
        logp_old, ctx = model.forward_context(tokens)
        for k in range(a.num_steps):
            x = x + (grid[k + 1] - grid[k]) * model.velocity(x, grid[k].expand(a.rows), ctx).float()
        t2 = sync(dev)
        images = model.decode(x)
        t3 = sync(dev)
    params = [p for grp in model.parameter_groups().values() for _, p in grp]
    opt = torch.optim.AdamW(params, lr=1e-6)
    t4 = sync(dev)  # ---- update: the shape of recipes/train.py's micro-batch loss
    logp, ctx = model.forward_context(tokens)
    ctx = model.detach_context(ctx)
    loss = -(logp * tokens.response_mask).sum() / tokens.response_mask.sum()
    for k in range(a.window):
        loss = loss + model.velocity(x, grid[k].expand(a.rows), ctx).float().pow(2).mean()
    loss.backward()
    opt.step()
    t5 = sync(dev)
    out = {"size": a.size, "device": dev, "dtype": a.dtype, "rows": a.rows, "context_tokens": int(tokens.ids.shape[1]),
           "image_tokens": model.latent_shape[1] * model.latent_shape[2] // 4, "num_steps": a.num_steps, "window": a.window, "lora_rank": a.rank,
           "checkpointing": not a.no_checkpointing, "build_s": round(t_build, 2), "decode_s": round(t1 - t0, 2),
           "context_and_flow_s": round(t2 - t1, 2), "vae_decode_s": round(t3 - t2, 2), "update_s": round(t5 - t4, 2),
           "finite": bool(images.isfinite().all() and logp_old.isfinite().all())}
    if dev.startswith("cuda"):
        out["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
