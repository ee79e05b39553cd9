"""Memory of Qwen-Image-Edit(-Plus) UniGRPO, computed from the module shapes (nothing runs, nothing
is downloaded): the pipeline's modules are built on the meta device from their published configs
(diffusers' defaults for ``QwenImageTransformer2DModel`` / ``AutoencoderKLQwenImage`` are
Qwen-Image's; Qwen2.5-VL-7B-Instruct's config is written below) and their parameters counted.

    python benchmarks/qwen_edit_memory.py [--rank 32] [--resolution 512] [--reference 1048576]

Prints parameter counts, bf16 weight bytes, LoRA parameters and their float32 AdamW state (16
bytes per trained parameter: weight, gradient, two moments), and the token counts that set the
activations: the transformer reads the noisy tokens plus every reference image's tokens, the
text encoder reads each image's vision tokens.

    python benchmarks/qwen_edit_memory.py --rounds 2 [--prompt 100 --reasoning 256 --turn 32]

adds what each round of a multi-round episode (builtin:qwen_image_edit_rounds_unigrpo, text prompts)
holds per micro-batch: the text pass's tokens (round 2: + the drawn image's vision tokens, the turn,
the reflection), the transformer's (round 1 no reference, round 2 the drawn image's reference tokens),
the encoder's KV cache per row while sampling, and the checkpointed block inputs in bf16 (one
backward over the sum of the rounds' losses and of each round's window steps keeps them all).
"""

from __future__ import annotations

import argparse

import torch

QWEN25_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct config.json (the edit pipelines' text_encoder)
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31]},
    "vocab_size": 152064, "tie_word_embeddings": False}
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # hf_config.LoRAConfig defaults
DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def lora_params(module: torch.nn.Module, targets: tuple[str, ...], rank: int, skip: str = "") -> int:
    """rank * (in + out) per Linear whose name ends with a target (peft's suffix match)."""
    return sum(rank * (m.in_features + m.out_features) for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(targets) and not (skip and skip in n))


def main() -> None:
    import transformers
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--resolution", type=int, default=512, help="output side in pixels")
    p.add_argument("--reference", type=int, default=1024 * 1024, help="model.reference_pixels")
    p.add_argument("--rounds", type=int, default=1, help="rounds per episode (> 1: the multi-round rows)")
    p.add_argument("--prompt", type=int, default=100, help="template + prompt tokens after the dropped prefix")
    p.add_argument("--reasoning", type=int, default=256, help="reasoning (and reflection) tokens per round")
    p.add_argument("--turn", type=int, default=32, help="reflection turn tokens besides the vision block")
    p.add_argument("--micro", type=int, default=4, help="trajectories per forward/backward")
    p.add_argument("--window", type=int, default=3, help="SDE window steps per round (each a transformer call)")
    a = p.parse_args()
    with torch.device("meta"):
        lm = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**QWEN25_VL_7B))
        dit, vae = QwenImageTransformer2DModel(), AutoencoderKLQwenImage()
    count = {name: sum(x.numel() for x in m.parameters()) for name, m in
             (("text encoder (Qwen2.5-VL-7B)", lm), ("of which vision tower", lm.model.visual),
              ("transformer", dit), ("VAE", vae))}
    total = count["text encoder (Qwen2.5-VL-7B)"] + count["transformer"] + count["VAE"]
    for name, n in count.items():
        print(f"{name}: {n / 1e9:.2f} B")
    print(f"all: {total / 1e9:.2f} B, bf16 weights {2 * total / 1e9:.1f} GB")
    lora = lora_params(lm, LM_TARGETS, a.rank, skip="visual") + lora_params(dit, DIT_TARGETS, a.rank)
    print(f"LoRA rank {a.rank}: {lora / 1e6:.0f} M parameters, fp32 weight + grad + AdamW {16 * lora / 1e9:.2f} GB")
    noisy, ref = (a.resolution // 16) ** 2, a.reference // 256
    print(f"transformer tokens per call: {noisy} noisy + {ref} per reference image "
          f"(x{(noisy + ref) / noisy:.1f} the text-to-image sequence with one reference)")
    for label, side in (("Edit (the reference-size image)", int(a.reference ** 0.5)), ("Plus (384^2)", 384)):
        h = round(side / 28) * 28
        print(f"vision tokens per image, {label}: {(h // 14) ** 2 // 4}")
    if a.rounds > 1:
        rounds(a, lm.config.get_text_config(), dit.config, noisy, ref)


def rounds(a, text, dit, noisy: int, ref: int) -> None:
    """Per round of a text-prompt episode (module docstring): tokens and checkpointed activations."""
    side = round(int(a.reference ** 0.5) / 28) * 28
    vision = (side // 14) ** 2 // 4  # the drawn image as the Edit encoder sees it (reference size)
    kv_tok = text.num_hidden_layers * 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    inner = dit.num_attention_heads * dit.attention_head_dim
    print(f"\n| round | text-pass tokens | transformer tokens per call | encoder KV per row | checkpointed inputs, "
          f"text pass | checkpointed inputs, {a.window} window calls |\n|---|---|---|---|---|---|")
    txt, total = a.prompt + a.reasoning, 0.0
    for r in range(a.rounds):
        refs = 0 if r == 0 else ref  # round 1: no reference; later: the drawn image
        act_text = text.num_hidden_layers * text.hidden_size * 2 * a.micro * txt
        act_dit = a.window * dit.num_layers * inner * 2 * a.micro * (noisy + refs + txt)
        total += act_text + act_dit
        print(f"| {r + 1} | {txt} | {noisy} + {refs} + {txt} text | {txt * kv_tok / 2**20:.0f} MiB | "
              f"{act_text / 1e9:.1f} GB | {act_dit / 1e9:.1f} GB |")
        txt += vision + a.turn + a.reasoning
    print(f"all rounds held at once (micro-batch {a.micro}): {total / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
