"""The adapters the protocol conformance suite (``test_conformance.py``) runs against.

Each adapter is one entry of ``ADAPTERS``: ``model.kind`` -> a factory ``factory(seed=0)`` that
returns ``(model, cfg, prompts)``:

- ``model``: a SMALL model of that kind (seconds on CPU), on CPU, in eval mode, whose every output
  depends on its weights (no zero-initialised head left at zero: the velocity tests would pass
  vacuously on v == 0). Another ``seed`` gives the same architecture with other random weights
  (the suite uses it as "a fresh model" to load states into).
- ``cfg``: the ``unigrpo.config.Config`` the model was built from (``build_model(cfg, checkpoint=...)``
  must rebuild the same architecture from it).
- ``prompts``: 3+ prompts the model's tokenizer understands, of DIFFERENT token lengths (so left
  padding differs from row to row).

To register a new adapter, write its factory below and add one line to ``ADAPTERS``:

    ADAPTERS["hf"] = hf_factory

A kind with several variants (the pipeline families of ``model.kind: hf``) registers each as
``"KIND:VARIANT"`` (e.g. ``"hf:qwenimage"``). ``test_every_kind_is_tested`` fails while a kind of
``unigrpo.models.KINDS`` has no entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from testkit import scratch_dir

from unigrpo.config import load_config
from unigrpo.models import build_model

TINY = ["model.kind=tiny", "model.checkpoint=null", "model.d_text=32", "model.text_layers=1",
        "model.text_heads=2", "model.unet_channels=[8,16,16]", "model.image_size=16", "device=cpu"]
TINY_PROMPTS = ["a red circle", "two blue squares above a green triangle",
                "a yellow triangle left of a green circle"]


def tiny_factory(seed: int = 0, text_to_image_vocab: bool = False):
    """A random tiny model, every weight perturbed by 0.05 * randn (the UNet's output layer is
    zero-initialised). ``text_to_image_vocab``: the world's vocabulary before the edit words were
    appended (the model fixtures recorded before then were drawn with it)."""
    cfg = load_config(None, TINY)
    torch.manual_seed(seed)
    if text_to_image_vocab:
        from unigrpo.models.tiny import TinyConfig, TinyUnifiedModel
        from unigrpo.world.knowledge import all_words
        from unigrpo.world.tokenizer import SPECIALS, WordTokenizer

        tok, m = WordTokenizer([*SPECIALS, *all_words()]), cfg.model
        model = TinyUnifiedModel(TinyConfig(vocab_size=tok.vocab_size, d_text=m.d_text, text_layers=m.text_layers,
                                            text_heads=m.text_heads, unet_channels=tuple(m.unet_channels),
                                            image_size=m.image_size, max_seq_len=m.max_seq_len), tok)
    else:
        model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unknown = [w for p in TINY_PROMPTS for w in p.split() if w not in model.tokenizer.index]
    assert not unknown, f"words outside the tiny vocabulary: {unknown}"
    return model.eval(), cfg, list(TINY_PROMPTS)


# ----------------------------------------------------------------------------- hf (FLUX.2 [klein])
HF_PROMPTS = ["a red circle", "two green triangles above a yellow circle", "a blue square"]
# a Qwen3-style template: enable_thinking=False closes an empty think block (as the pipeline asks)
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
HF_LAYERS = (1, 2)  # hidden states of the 2-layer LM that condition the transformer
_FLUX2_DIR: list[str] = []


def build_tiny_flux2(folder: str) -> str:
    """A tiny random Flux2KleinPipeline built from components (tokenizer trained in code, nothing
    downloaded), written with ``save_pretrained`` to ``folder``."""
    import transformers
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from testkit import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(QWEN3_TEMPLATE, padding_side="right")
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True))
    dit = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32 * len(HF_LAYERS),
                                  timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics: the latent normalisation is exercised
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=lm, tokenizer=tok, transformer=dit).save_pretrained(folder)
    return folder


def tiny_flux2_dir() -> str:
    """The tiny pipeline folder, built once per test session."""
    if not _FLUX2_DIR:
        _FLUX2_DIR.append(build_tiny_flux2(scratch_dir("unigrpo_flux2_")))
    return _FLUX2_DIR[0]


def hf_overrides(folder: str, text_rank: int = 4, image_rank: int = 4) -> list[str]:
    return ["model.kind=hf", f"model.pipeline={folder}", "model.reasoner=text_encoder",
            f"model.lora.text_rank={text_rank}", f"model.lora.image_rank={image_rank}", "model.resolution=32",
            f"model.hidden_layers=[{','.join(map(str, HF_LAYERS))}]", "model.max_text_tokens=48", "device=cpu"]


def hf_factory(seed: int = 0, text_rank: int = 4, image_rank: int = 4):
    """The tiny FLUX.2 [klein] pipeline with LoRA on both sides (B = 0: the policy starts as the
    base, so a fresh seed differs only in its LoRA A matrices); loaded offline from its folder."""
    import os

    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, hf_overrides(tiny_flux2_dir(), text_rank, image_rank))
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    return model.eval(), cfg, list(HF_PROMPTS)


# ----------------------------------------------------------------------------- hf:qwenimage (Qwen-Image)
QWEN_SCHEDULER = {"use_dynamic_shifting": True, "time_shift_type": "exponential", "base_shift": 0.5, "max_shift": 0.9,
                  "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02}  # Qwen-Image's
_QWEN_DIR: list[str] = []


def build_tiny_qwenimage(folder: str, scheduler: dict | None = None) -> str:
    """A tiny random QwenImagePipeline built from components (a text-only-used Qwen2.5-VL, the
    BPE tokenizer trained in code, a 2-block transformer, a 2-level 5-D VAE with non-trivial
    per-channel latents_mean / latents_std, Qwen-Image's scheduler config), written with
    ``save_pretrained`` to ``folder``; nothing downloaded."""
    import transformers
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from testkit import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(QWEN3_TEMPLATE, padding_side="right")
    v = len(tok)
    torch.manual_seed(0)
    text = {"vocab_size": v, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32}
    lm = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=v, tie_word_embeddings=True, bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        image_token_id=v - 1, video_token_id=v - 2, vision_start_token_id=v - 3, vision_end_token_id=v - 4))
    dit = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
    g = torch.Generator().manual_seed(1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                                 latents_mean=(0.3 * torch.randn(4, generator=g)).tolist(),
                                 latents_std=(0.5 + 1.5 * torch.rand(4, generator=g)).tolist())
    sched = FlowMatchEulerDiscreteScheduler(**(QWEN_SCHEDULER if scheduler is None else scheduler))
    QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=lm, tokenizer=tok, transformer=dit).save_pretrained(folder)
    return folder


def tiny_qwenimage_dir() -> str:
    """The tiny Qwen-Image folder, built once per test session."""
    if not _QWEN_DIR:
        _QWEN_DIR.append(build_tiny_qwenimage(scratch_dir("unigrpo_qwenimage_")))
    return _QWEN_DIR[0]


def qwen_overrides(folder: str, text_rank: int = 4, image_rank: int = 4) -> list[str]:
    return ["model.kind=hf", f"model.pipeline={folder}", "model.reasoner=text_encoder",
            f"model.lora.text_rank={text_rank}", f"model.lora.image_rank={image_rank}", "model.resolution=32",
            "model.max_text_tokens=128", "device=cpu"]


def qwenimage_factory(seed: int = 0, text_rank: int = 4, image_rank: int = 4):
    """The tiny Qwen-Image pipeline with LoRA on both sides (B = 0 at the start), loaded offline."""
    import os

    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, qwen_overrides(tiny_qwenimage_dir(), text_rank, image_rank))
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    return model.eval(), cfg, list(HF_PROMPTS)


# ----------------------------------------------------------------------------- bagel (BAGEL-7B-MoT)
BAGEL_PROMPTS = ["a red circle", "two blue squares above a green triangle", "a yellow triangle"]
_BAGEL_DIR: list[str] = []


def tiny_bagel_dir() -> str:
    """A tiny random BAGEL folder (real file and key names, hidden 64, 2 layers, 4 / 2 heads, FLUX
    AE with ch 32), written once per test session by the library's own writer."""
    if not _BAGEL_DIR:
        from unigrpo.models.bagel_io import write_tiny_bagel

        _BAGEL_DIR.append(str(write_tiny_bagel(scratch_dir("unigrpo_bagel_"))))
    return _BAGEL_DIR[0]


def bagel_overrides(folder: str, text_rank: int = 0, image_rank: int = 4) -> list[str]:
    return ["model.kind=bagel", f"model.path={folder}", f"model.lora.text_rank={text_rank}",
            f"model.lora.image_rank={image_rank}", "model.resolution=32", "model.dtype=float32", "device=cpu"]


def bagel_factory(seed: int = 0, text_rank: int = 0, image_rank: int = 4):
    """The tiny BAGEL folder loaded by the production loader, the und expert trained in full (its
    reference a snapshot) and LoRA on the gen expert (its reference the adapters off). A seed
    perturbs the und weights and draws the LoRA A matrices (B = 0: the gen side starts as the base)."""
    pytest.importorskip("tokenizers")
    if image_rank or text_rank:
        pytest.importorskip("peft")
    cfg = load_config(None, bagel_overrides(tiny_bagel_dir(), text_rank, image_rank))
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        for _, p in model.parameter_groups()["text"]:
            p.add_(0.02 * torch.randn_like(p))
    return model.eval(), cfg, list(BAGEL_PROMPTS)


_BAGEL_EDIT_DIR: list[str] = []


def tiny_bagel_edit_dir() -> str:
    """The tiny BAGEL folder WITH the ViT path (``vit_config.json``, ``vit_model.*``, ``connector.*``,
    ``vit_pos_embed``: SigLIP width 32, 2 layers, patch 4, 8 patches per side), written once per session."""
    if not _BAGEL_EDIT_DIR:
        from unigrpo.models.bagel_io import write_tiny_bagel

        _BAGEL_EDIT_DIR.append(str(write_tiny_bagel(scratch_dir("unigrpo_bagel_edit_"), vit=True)))
    return _BAGEL_EDIT_DIR[0]


def bagel_edit_prompts(seed: int = 0, side: int = 16) -> list:
    """``BAGEL_PROMPTS`` carrying 1, 0 and 2 random input images (``side`` px: the model resizes them)."""
    from unigrpo.tasks import Prompt

    g = torch.Generator().manual_seed(100 + seed)
    return [Prompt(text, images=torch.rand(n, 3, side, side, generator=g) if n else None)
            for n, text in zip((1, 0, 2), BAGEL_PROMPTS)]


def bagel_edit_factory(seed: int = 0, text_rank: int = 0, image_rank: int = 4):
    """``bagel_factory`` on the folder with the ViT: the model sees and edits; its prompts carry
    input images (``bagel_edit_prompts``)."""
    pytest.importorskip("tokenizers")
    if image_rank or text_rank:
        pytest.importorskip("peft")
    cfg = load_config(None, bagel_overrides(tiny_bagel_edit_dir(), text_rank, image_rank))
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        for _, p in model.parameter_groups()["text"]:
            p.add_(0.02 * torch.randn_like(p))
    return model.eval(), cfg, bagel_edit_prompts()


# model.kind -> factory(seed=0) -> (model, cfg, prompts). One line per adapter.
ADAPTERS: dict[str, Callable[..., tuple[Any, Any, list[str]]]] = {
    "tiny": tiny_factory,
    "hf": hf_factory,
    "hf:qwenimage": qwenimage_factory,
    "bagel": bagel_factory,
    "bagel:edit": bagel_edit_factory,  # with the ViT: sees and edits input images
    "hf:sd3": lambda seed=0: sd3_factory(seed),  # defined at the end of this file
    "tiny:sees": lambda seed=0: _seeing(seed),  # the tiny model that sees and edits (image_adapter.py)
    "hf:flux2_ref": lambda seed=0: flux2_ref_factory(seed),  # FLUX.2 [klein] prompts with reference images
    "hf:qwenimage_edit": lambda seed=0: qwenimage_edit_factory(seed),  # (sees and edits) ... also at the end
    "hf:qwenimage_edit_plus": lambda seed=0: qwenimage_edit_factory(seed, plus=True),
}


def flux2_ref_factory(seed: int = 0):
    """``hf_factory``'s model with prompts that carry 1, 0 and 2 reference images (16 px: the tiny
    VAE's crop multiple is 4), so every conformance test runs with the references in the context."""
    from unigrpo.tasks import Prompt

    model, cfg, prompts = hf_factory(seed)
    g = torch.Generator().manual_seed(200)
    return model, cfg, [Prompt(p, images=torch.rand(n, 3, 16, 16, generator=g) if n else None)
                        for n, p in zip((1, 0, 2), prompts)]


def _seeing(seed: int = 0):
    from image_adapter import seeing_factory

    return seeing_factory(seed)


@dataclass
class Adapter:
    """One adapter under test: a freshly built model, its config and prompts."""

    kind: str
    model: Any
    cfg: Any
    prompts: list[str]
    factory: Callable[..., tuple[Any, Any, list[str]]]

    def fresh(self, seed: int = 1):
        """Another model of the same architecture and config, with other random weights."""
        return self.factory(seed=seed)[0]


@pytest.fixture(params=sorted(ADAPTERS), ids=str)
def adapter(request) -> Adapter:
    """A new model per test (tests train and load states into it)."""
    factory = ADAPTERS[request.param]
    model, cfg, prompts = factory(seed=0)
    return Adapter(request.param, model, cfg, prompts, factory)


@pytest.fixture
def registered_kinds() -> set[str]:
    """The kinds with an adapter here (test modules cannot import this conftest by name)."""
    return {name.split(":")[0] for name in ADAPTERS}


# ----------------------------------------------------------------------------- hf:sd3 (separate mode)
_SD3_DIRS: list[tuple[str, str]] = []
SD3_T5_TOKENS = 64  # model.max_text_tokens of sd3_overrides (the pipeline's max_sequence_length)


def tiny_clip_tokenizer(pad_token: str):
    """A CLIP tokenizer built in code: the byte-level alphabet with and without CLIP's ``</w>``
    end-of-word suffix, no merges (every character is a token), 77 positions like the real one."""
    import transformers
    from tokenizers import pre_tokenizers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer built in code over lowercase letters, digits and some punctuation,
    with and without the word-start marker; anything else is ``<unk>``."""
    import transformers

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'-<>/|"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_sd3(folder: str) -> str:
    """A tiny random StableDiffusion3Pipeline (SD3.5-style transformer: RMS qk-norm, one dual
    attention layer; CLIP-L 16 wide, CLIP-G 32 wide, T5 64 wide, so the CLIP channels are zero-padded
    as in the real model; a 3-level VAE with SD3's shift / scaling factors; static shift 3),
    written with ``save_pretrained``."""
    import transformers
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tok, tok2, tok3 = tiny_clip_tokenizer("<|endoftext|>"), tiny_clip_tokenizer("!"), tiny_t5_tokenizer()
    torch.manual_seed(0)

    def clip(width: int, t):
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=len(t), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1))

    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tok3), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0))
    dit = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                pooled_projection_dim=48, out_channels=4, pos_embed_max_size=16,
                                qk_norm="rms_norm", dual_attention_layers=(0,))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    StableDiffusion3Pipeline(transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=clip(16, tok), tokenizer=tok, text_encoder_2=clip(32, tok2), tokenizer_2=tok2,
                             text_encoder_3=t5, tokenizer_3=tok3).save_pretrained(folder)
    return folder


def build_tiny_reasoner(folder: str) -> str:
    """A tiny random Qwen3 causal LM + its code-trained BPE tokenizer (Qwen3-style template),
    written with ``save_pretrained``: what ``model.reasoner`` loads."""
    import transformers
    from testkit import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(QWEN3_TEMPLATE)
    torch.manual_seed(1)
    lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_sd3_dirs() -> tuple[str, str]:
    """(pipeline folder, reasoner folder), built once per test session."""
    if not _SD3_DIRS:
        _SD3_DIRS.append((build_tiny_sd3(scratch_dir("unigrpo_sd3_")),
                          build_tiny_reasoner(scratch_dir("unigrpo_reasoner_"))))
    return _SD3_DIRS[0]


def sd3_overrides(text_rank: int = 4, image_rank: int = 4) -> list[str]:
    pipe, lm = tiny_sd3_dirs()
    return ["model.kind=hf", f"model.pipeline={pipe}", f"model.reasoner={lm}", f"model.lora.text_rank={text_rank}",
            f"model.lora.image_rank={image_rank}", "model.resolution=32", f"model.max_text_tokens={SD3_T5_TOKENS}",
            "device=cpu"]


def sd3_factory(seed: int = 0, text_rank: int = 4, image_rank: int = 4):
    """The tiny SD3 pipeline + tiny Qwen3 reasoner, LoRA on both sides; loaded offline."""
    import os

    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, sd3_overrides(text_rank, image_rank))
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    return model.eval(), cfg, list(HF_PROMPTS)


# ----------------------------------------------------------------------------- hf:qwenimage_edit(_plus)
EDIT_PIXELS = ["model.reference_pixels=4096"]  # 64^2 for the VAE (and Edit's text encoder)
PLUS_PIXELS = ["model.condition_pixels=1024"]  # 32^2 for Plus's text encoder
VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_EDIT_DIRS: dict[str, str] = {}


def build_tiny_qwenimage_edit(folder: str, plus: bool = False) -> str:
    """A tiny random QwenImageEditPipeline / QwenImageEditPlusPipeline folder laid out as the released
    ones (``model_index.json`` lists a ``transformers`` ``Qwen2VLProcessor`` whose folder holds the
    image processor's ``preprocessor_config.json``; the processor object itself needs torchvision and
    is never built): Qwen-Image's tiny parts with a Qwen2.5-VL whose vision tower is used (2 blocks,
    window + full attention, merge 2), the tokenizer with the vision specials, the image processor
    capped at 56 x 112 pixels."""
    import json
    from pathlib import Path

    import transformers
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    base = QwenImagePipeline.from_pretrained(tiny_qwenimage_dir())
    tok = base.tokenizer
    tok.add_special_tokens({"additional_special_tokens": VL_SPECIALS})
    v = len(tok)
    start, end, image, video = tok.convert_tokens_to_ids(VL_SPECIALS)
    text = {**base.text_encoder.config.get_text_config().to_dict(), "vocab_size": v, "max_position_embeddings": 2048}
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [1],
              "window_size": 56}
    torch.manual_seed(2 + plus)
    lm = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=v, tie_word_embeddings=True, bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, image_token_id=image, video_token_id=video, vision_start_token_id=start,
        vision_end_token_id=end))
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    cls(scheduler=base.scheduler, vae=base.vae, text_encoder=lm, tokenizer=tok, processor=None,
        transformer=base.transformer).save_pretrained(folder)
    tiny_image_processor().save_pretrained(Path(folder) / "processor")
    index = Path(folder) / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "processor": ["transformers", "Qwen2VLProcessor"]}))
    return folder


def tiny_image_processor():
    """The tiny pipelines' image processor (its PIL backend: no torchvision)."""
    import transformers

    return transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 112, patch_size=14,
                                                 temporal_patch_size=2, merge_size=2)


def tiny_qwenimage_edit_dir(plus: bool = False) -> str:
    """The tiny Qwen-Image-Edit(-Plus) folder, built once per test session."""
    key = "plus" if plus else "edit"
    if key not in _EDIT_DIRS:
        _EDIT_DIRS[key] = build_tiny_qwenimage_edit(scratch_dir(f"unigrpo_qwen_{key}_"), plus)
    return _EDIT_DIRS[key]


def edit_overrides(folder: str, text_rank: int = 4, image_rank: int = 4, plus: bool = False) -> list[str]:
    return [*qwen_overrides(folder, text_rank, image_rank), "model.max_text_tokens=320", *EDIT_PIXELS,
            *(PLUS_PIXELS if plus else [])]


def edit_prompts(counts=(1, 1, 1), side: int = 16, seed: int = 100) -> list:
    """``HF_PROMPTS`` with ``counts[i]`` random 8-bit images each (what a PNG loads as)."""
    from unigrpo.tasks import Prompt

    g = torch.Generator().manual_seed(seed)
    return [Prompt(text, images=(torch.randint(0, 256, (n, 3, side, side), generator=g) / 255.0) if n else None)
            for n, text in zip(counts, HF_PROMPTS)]


def qwenimage_edit_factory(seed: int = 0, text_rank: int = 4, image_rank: int = 4, plus: bool = False):
    """The tiny Qwen-Image-Edit(-Plus) pipeline with LoRA on both sides (B = 0 at the start), loaded
    offline; its prompts carry one input image each (Plus: 1, 2 and 1)."""
    import os

    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, edit_overrides(tiny_qwenimage_edit_dir(plus), text_rank, image_rank, plus))
    torch.manual_seed(seed)
    model = build_model(cfg, checkpoint=None)
    return model.eval(), cfg, edit_prompts((1, 2, 1) if plus else (1, 1, 1))



def bagel_incremental(model, segments):
    """Bagel's own order of cache updates (``inferencer.py``) for ONE row, written against our decoder
    layers: ``("text", ids)`` causal, one position per token; ``("image", img [3, H, W])`` its VAE
    block at one position (latents through the gen expert, ``forward_cache_update_vae``) then its ViT
    block at the next (und expert, ``forward_cache_update_vit``). Returns (log-probs of the last text
    segment's ``ids[1:]``, None without text; the context as a ``BagelContext``)."""
    from unigrpo.models.bagel import BagelContext
    from unigrpo.models.bagel_edit import vae_tokens, vit_tokens
    from unigrpo.models.bagel_mot import attention_mask

    lm, emb = model.language_model, model.language_model.model.embed_tokens
    kv, rope, n_keys, out, ids = None, 0, 0, None, None

    def update(h, causal, gen_slice=None):
        nonlocal kv, rope, n_keys
        n = h.shape[1]
        pos = rope + torch.arange(n)[None] if causal else torch.full((1, n), rope)
        o, new = lm.run(h, pos, attention_mask(torch.ones(1, n_keys + n, dtype=torch.bool), n, causal), kv, gen=gen_slice)
        kv = new if kv is None else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(kv, new)]
        rope, n_keys = rope + (n if causal else 1), n_keys + n
        return o

    marks = emb(torch.tensor([[model.ids["vision_start"], model.ids["vision_end"]]]))
    for kind, x in segments:
        if kind == "text":
            out, ids = update(emb(torch.tensor([x])), True), x
        else:
            lat = vae_tokens(model, x[None])
            update(torch.cat([marks[:, :1], lat, marks[:, 1:]], 1), False, slice(1, lat.shape[1] + 1))
            update(torch.cat([marks[:, :1], vit_tokens(model, x[None]), marks[:, 1:]], 1), False)
    logp = None
    if out is not None:
        logits = lm.lm_head(lm.model.norm(out)).float()
        logp = logits[:, :-1].log_softmax(-1).gather(2, torch.tensor([ids])[:, 1:, None])[..., 0]
    ctx = BagelContext([k for k, _ in kv], [v for _, v in kv], torch.ones(1, n_keys, dtype=torch.bool),
                       torch.tensor([rope]))
    return logp, ctx
