"""Memory of BAGEL-7B-MoT per training setting, COMPUTED from the module shapes (built on the meta
device: nothing is allocated, nothing measured). Prints the markdown table of docs/models.md
("Bagel-7B-MoT"). Usage: python benchmarks/bagel_memory.py [--rank 64] [--micro 4] [--ctx 1100]
[--images 1 --vit-side 36]: image-to-image (builtin:bagel_edit_unigrpo): the frozen SigLIP ViT +
connector + ViT position table join the weights, and every input image adds its VAE block
((resolution / 16)^2 + 2 tokens) and ViT block (vit-side^2 + 2: 36 = Bagel's RL transform of a
512 px input) to each row's context (no logits over them; the ViT itself runs without gradient)."""

import argparse

import torch

from unigrpo.config import BAGEL_GEN_TARGETS, BAGEL_UND_TARGETS
from unigrpo.models.bagel_latent import PositionEmbedding, TimestepEmbedder
from unigrpo.models.bagel_mot import LLMConfig, Qwen2MoTForCausalLM
from unigrpo.models.bagel_vae import AutoEncoder
from unigrpo.models.bagel_vit import Connector, SiglipNaViT, ViTConfig

GB = 1e9


def lora_params(lm, targets, rank):
    return sum(rank * (m.in_features + m.out_features) for n, m in lm.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--micro", type=int, default=4, help="trajectories per forward/backward")
    ap.add_argument("--ctx", type=int, default=1100, help="system + prompt + reasoning tokens per row")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--images", type=int, default=0, help="input images per row (0 = text-to-image, no ViT)")
    ap.add_argument("--vit-side", type=int, default=36, help="ViT patches per side of an input image")
    a = ap.parse_args()
    c = LLMConfig(152064, 3584, 28, 28, 4, 18944)
    with torch.device("meta"):
        lm = Qwen2MoTForCausalLM(c)
        heads = [TimestepEmbedder(c.hidden_size), torch.nn.Linear(64, c.hidden_size), torch.nn.Linear(c.hidden_size, 64)]
        pos = PositionEmbedding(64, c.hidden_size)
        vae = AutoEncoder()
        vit = [SiglipNaViT(ViTConfig(1152, 4304, 16, 26, 14, 980)), Connector(1152, c.hidden_size),
               PositionEmbedding(70, c.hidden_size)] if a.images else []  # SigLIP-so400m/14, 26 of 27 layers
    gen = sum(p.numel() for n, p in lm.named_parameters() if "moe_gen" in n)
    und = sum(p.numel() for p in lm.parameters()) - gen
    head = sum(p.numel() for m in heads for p in m.parameters())
    frozen_extra = pos.pos_embed.numel() + sum(p.numel() for m in vit for p in m.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    lu, lg = lora_params(lm, BAGEL_UND_TARGETS, a.rank), lora_params(lm, BAGEL_GEN_TARGETS, a.rank)
    bf16 = 2 * (und + gen + head + frozen_extra) + 4 * n_vae  # weights in bf16, VAE in fp32
    kv_tok = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2  # bf16 K + V per token
    block = (a.resolution // 16) ** 2 + 2
    image_ctx = a.images * (block + a.vit_side ** 2 + 2)  # VAE block + ViT block per input image
    act = c.num_hidden_layers * c.hidden_size * 2 * a.micro * (a.ctx + image_ctx + block)  # checkpointed layer inputs, bf16
    logits = 2 * a.micro * min(a.ctx, 1024) * c.vocab_size * 4  # one fp32 lm_head chunk + its log-softmax
    print(f"und {und / 1e9:.2f} B, gen {gen / 1e9:.2f} B, heads {head / 1e6:.1f} M, frozen tables{' + ViT path' if a.images else ''} {frozen_extra / 1e6:.1f} M, "
          f"VAE {n_vae / 1e6:.1f} M; LoRA r={a.rank}: und {lu / 1e6:.1f} M, gen {lg / 1e6:.1f} M")
    print(f"KV cache {kv_tok / 1024:.0f} KiB/token; image block {block} tokens at {a.resolution} px")
    if a.images:
        print(f"edit: ViT + connector + ViT table {sum(p.numel() for m in vit for p in m.parameters()) / 1e6:.0f} M "
              f"frozen; {image_ctx} context tokens from {a.images} input image(s) per row "
              f"(KV {image_ctx * kv_tok / 2**20:.0f} MiB per row)")
    rows = [
        ("LoRA both experts (default)", bf16, 16 * (lu + lg), 0),
        ("LoRA gen only (algo.train_text=false)", bf16, 16 * lg, 0),
        ("full gen expert, bf16 weights (AdamW state bf16)", bf16, 6 * gen, 2 * gen),
        ("full gen expert, fp32 weights", 2 * bf16, 12 * gen, 4 * gen),
        ("full both experts (paper), fp32", 2 * bf16, 12 * (gen + und), 4 * (gen + und)),
    ]
    print("\n| setting | weights | grads + AdamW state (+ fp32 LoRA weights) | reference | activations + logits | total |")
    print("|---|---|---|---|---|---|")
    for name, w, opt, ref in rows:
        extra = act + logits
        print(f"| {name} | {w / GB:.1f} GB | {opt / GB:.1f} GB | {ref / GB:.1f} GB | {extra / GB:.1f} GB | "
              f"**{(w + opt + ref + extra) / GB:.0f} GB** |")


if __name__ == "__main__":
    main()
