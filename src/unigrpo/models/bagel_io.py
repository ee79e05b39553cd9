"""Loading BAGEL-7B-MoT from its released folder by key name, and writing a tiny random folder of
the same layout (tests, demos; ``python -m unigrpo.models.bagel_io DIR``).

A folder (the HF repo ``ByteDance-Seed/BAGEL-7B-MoT``) holds:

- ``llm_config.json``: the Qwen2 geometry (hidden size, layers, heads, KV heads, MLP width, vocab,
  RMS eps, rope theta); BAGEL forces ``qk_norm`` on and untied embeddings, and so do we;
- ``ema.safetensors``: every BAGEL weight but the VAE: ``language_model.*`` (und + ``*_moe_gen``),
  ``time_embedder.mlp.{0,2}``, ``vae2llm``, ``llm2vae``, ``latent_pos_embed.pos_embed``, and the
  ViT understanding path (``vit_model.*``, ``connector.*``, ``vit_pos_embed.*``): loaded when the
  folder has ``vit_config.json`` (the model then sees and edits input images, ``bagel_edit``) and
  ``vit`` is on; ignored otherwise (text-to-image does not use them);
- ``vit_config.json``: the SigLIP geometry; Bagel drops its last layer (the release says 27, the
  checkpoint holds 26 ``encoder.layers``): the layer count must be the config's minus one;
- ``ae.safetensors``: the FLUX autoencoder (``encoder.*``, ``decoder.*``);
- ``tokenizer.json``: the Qwen2 tokenizer (read with the ``tokenizers`` package).

Sizes not in ``llm_config.json`` come from tensor shapes: ``max_latent_size`` from
``latent_pos_embed`` (64 for the release), the timestep features from ``time_embedder.mlp.0``, the
VAE's architecture from ``ae.safetensors``. The model is built on the meta device and every tensor
is read from the file straight to ``device`` (one tensor at a time: no full CPU copy per rank).
A missing or unexpected key is a one-line error listing them; a NaN / inf tensor is one line naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from unigrpo.models.bagel import SPECIALS, THINK_SYSTEM_PROMPT, BagelModel
from unigrpo.models.bagel_latent import sincos_2d
from unigrpo.models.bagel_mot import LLMConfig
from unigrpo.models.bagel_vae import AutoEncoder
from unigrpo.models.bagel_vit import ViTConfig
from unigrpo.utils.checkpoint import verify_sums
from unigrpo.utils.errors import CheckpointError

__all__ = ["IGNORED_PREFIXES", "build", "load_bagel", "write_export", "write_lora_export", "write_tiny_bagel"]

IGNORED_PREFIXES = ("vit_model.", "connector.", "vit_pos_embed.")  # the ViT path (not used for text-to-image)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLM_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "rms_norm_eps", "rope_theta")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _require(folder: Path, name: str) -> Path:
    if not (folder / name).is_file():
        raise FileNotFoundError(f"model.path: {folder} has no {name} (a BAGEL-7B-MoT folder holds llm_config.json, "
                                "ema.safetensors, ae.safetensors and tokenizer.json)")
    return folder / name


def load_into(module: torch.nn.Module, path: Path, device, dtype: torch.dtype | None, ignore=()) -> None:
    """Copy every tensor of ``path`` into ``module``'s parameter of that name, strictly by name and
    shape, reading one tensor at a time onto ``device`` (``dtype``: cast floats; None = as stored)."""
    from safetensors import safe_open

    own = dict(module.named_parameters())
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = {k for k in f.keys() if not k.startswith(tuple(ignore))}  # noqa: SIM118
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        if missing or unexpected:
            skipped = ", ".join(p + "*" for p in ignore)
            raise ValueError(f"{path}: does not fit the model: missing {len(missing)} keys {missing[:8]}, unexpected "
                             f"{len(unexpected)} keys {unexpected[:8]}" + (f" (ignored: {skipped})" if ignore else ""))
        with torch.no_grad():
            for k, p in own.items():
                t = f.get_tensor(k)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
                if t.is_floating_point() and not torch.isfinite(t).all():  # before any run directory exists
                    raise CheckpointError(f"{path}: tensor {k} holds NaN/inf; refusing to load broken weights")
                p.copy_(t.to(dtype or t.dtype))


def read_llm_config(folder: Path) -> LLMConfig:
    raw = json.loads(_require(folder, "llm_config.json").read_text())
    absent = [k for k in LLM_KEYS[:6] if k not in raw]
    if absent:
        raise ValueError(f"{folder / 'llm_config.json'}: missing {absent}")
    return LLMConfig(**{k: raw[k] for k in LLM_KEYS if k in raw})


def read_vit_config(folder: Path, shapes: dict[str, tuple[int, ...]]) -> ViTConfig:
    """``vit_config.json`` with the layers ``ema.safetensors`` holds (the config's count minus the
    one Bagel drops; anything else is refused in one line)."""
    c = ViTConfig.from_json(folder / "vit_config.json")
    prefix = "vit_model.vision_model.encoder.layers."
    held = len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})
    if held != c.num_hidden_layers - 1:
        raise ValueError(f"{folder / 'ema.safetensors'}: holds {held} ViT layers, vit_config.json says "
                         f"{c.num_hidden_layers} (Bagel uses all but the last: expected {c.num_hidden_layers - 1})")
    return ViTConfig(**{**c.__dict__, "num_hidden_layers": held})


def load_bagel(path: str | Path, *, device="cpu", dtype: str = "float32", vit: bool = True, **kwargs):
    """A ``BagelModel`` from the folder ``path`` (module docstring); ``kwargs`` go to the model.
    ``vit``: load the ViT path when the folder has one (False: text-to-image only, its memory
    saved). The VAE stays float32 (84 M parameters; decoding is not trained)."""
    from tokenizers import Tokenizer

    folder = Path(path)
    if not str(path) or not folder.is_dir():
        raise FileNotFoundError(f"model.path: {path!r} is not a folder (the BAGEL-7B-MoT checkpoint folder)")
    verify_sums(folder)  # a unigrpo export: its SHA256SUMS
    llm = read_llm_config(folder)
    ema, ae = _require(folder, "ema.safetensors"), _require(folder, "ae.safetensors")
    shapes = _shapes(ema)
    tok = Tokenizer.from_file(str(_require(folder, "tokenizer.json")))
    vae_arch = AutoEncoder.arch_from_shapes(_shapes(ae))
    vit_cfg = read_vit_config(folder, shapes) if vit and (folder / "vit_config.json").is_file() else None
    with torch.device("meta"):
        vae = AutoEncoder(**vae_arch)
        pos = shapes.get("latent_pos_embed.pos_embed", (1,))[0]
        model = BagelModel(llm, tok, vae, max_latent_size=math.isqrt(pos),
                           timestep_dim=shapes.get("time_embedder.mlp.0.weight", (0, 256))[1], vit=vit_cfg, **kwargs)
    model.vae = None  # loaded on its own (another file, float32)
    model.to(DTYPES[dtype]).to_empty(device=device)
    load_into(model, ema, device, DTYPES[dtype], () if vit_cfg is not None else IGNORED_PREFIXES)
    vae = vae.to_empty(device=device)
    load_into(vae, ae, device, torch.float32)
    model.vae = vae.requires_grad_(False)
    return model


def _tiny_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained in code on the shapes world's text-to-image words + BAGEL's special
    tokens (byte-level: any other word, e.g. an edit instruction's, is still encoded; the training
    words are fixed so the tiny folder, and every test recorded on it, stays the same)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from unigrpo.world.knowledge import all_words
    from unigrpo.world.tokenizer import SPECIALS as WORLD_SPECIALS

    words = [w for w in [*WORLD_SPECIALS, *all_words()] if w.isalpha()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = [SPECIALS[k] for k in ("pad", "start", "end", "vision_start", "vision_end")]
    bpe.train_from_iterator([" ".join(words), THINK_SYSTEM_PROMPT, *words],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(folder / "tokenizer.json"))
    return bpe.get_vocab_size()


def write_tiny_bagel(folder: str | Path, seed: int = 0, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, max_latent_size: int = 8, vae_ch: int = 32,
                     vae_mult: tuple[int, ...] = (1, 2), vae_blocks: int = 1, z: int = 4, vit: bool = False,
                     vit_hidden: int = 32, vit_layers: int = 2, vit_heads: int = 2, vit_patch: int = 4,
                     vit_side: int = 8) -> Path:
    """A random BAGEL-layout folder (module docstring) with the released file names and key names,
    every weight non-zero (the released init zeroes ``llm2vae``: v == 0 would make tests vacuous).
    ``vit``: with the ViT path (``vit_layers`` held, ``vit_config.json`` saying one more, as the
    release; ``vit_side`` patches per side of ``vit_patch`` pixels)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_tokenizer(folder)
    cfg = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "max_position_embeddings": 512, "model_type": "qwen2",
           "tie_word_embeddings": False}
    (folder / "llm_config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(seed)
    vae = AutoEncoder(vae_ch, tuple(vae_mult), vae_blocks, z)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vit_cfg = ViTConfig(vit_hidden, 2 * vit_hidden, vit_heads, vit_layers, vit_patch, vit_patch * vit_side) if vit else None
    if vit:
        (folder / "vit_config.json").write_text(json.dumps({**vit_cfg.__dict__, "num_hidden_layers": vit_layers + 1,
                                                             "num_channels": 3, "model_type": "siglip_vision_model",
                                                             "hidden_act": "gelu_pytorch_tanh"}, indent=1))
    model = BagelModel(LLMConfig(**{k: cfg[k] for k in LLM_KEYS}), tok, vae, max_latent_size=max_latent_size,
                       resolution=vae.downsample * 2 * max_latent_size, vit=vit_cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("vae.", "latent_pos_embed.", "vit_pos_embed.")):
                continue
            if ".layer_norm" in n or "post_layernorm" in n:  # the ViT's LayerNorms: gains near 1, small biases
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif n.endswith(("norm.weight", "_norm.weight")) or "layernorm" in n or "norm_moe_gen" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # RMSNorm gains near 1
            else:
                p.copy_(0.05 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("vae.")}
    if not vit:
        state["vit_pos_embed.pos_embed"] = torch.zeros(4, hidden)  # a ViT key, as in the release (ignored)
    else:
        assert torch.equal(state["vit_pos_embed.pos_embed"], sincos_2d(hidden, vit_side))
    save_file(state, str(folder / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "ae.safetensors"))
    return folder


def write_export(model, folder: Path) -> str:
    """``unigrpo export`` of a Bagel policy: the released layout of ``model.path`` in ``folder``,
    every file copied but ``ema.safetensors``, which holds the trained weights (LoRA merged) under
    the release's key names and dtypes, and the release's other tensors (the ViT path) as they were.
    Returns the loading snippet for the README."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from unigrpo.models.lora_io import merge_lora

    src = Path(model.config_section["path"])
    merge_lora(model.language_model)
    own = {k: v.detach().cpu() for k, v in model.named_parameters() if not k.startswith("vae.")}
    state = {}
    with safe_open(str(src / "ema.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
            t = f.get_tensor(k)
            state[k] = own.pop(k).to(t.dtype) if k in own else t  # the release's dtype
    if own:  # a trained tensor the release has no key for would be lost
        raise ValueError(f"{src / 'ema.safetensors'}: has no key for {sorted(own)[:3]}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "ema.safetensors"))
    for item in src.iterdir():
        if item.is_file() and item.name != "ema.safetensors":
            shutil.copy2(item, folder / item.name)
    return "# unigrpo: model.kind=bagel model.path=DIR\n# Bagel's own inference code: its model_path=DIR (same files, same key names)\n"


def write_lora_export(model, folder: Path) -> str:
    """``unigrpo export --format lora`` of a Bagel policy: ``folder/language_model/``, a peft adapter
    folder of the MoT's LoRA (both experts) under the release's module names, for
    ``PeftModel.from_pretrained(<Bagel>.language_model, folder)`` (it injects in place)."""
    from unigrpo.models.lora_io import write_peft_folder

    write_peft_folder(model.language_model, folder / "language_model", model.config_section["path"], task_type=None)
    return ("from peft import PeftModel\n\n# bagel: the released model (Bagel's own code, or unigrpo's build_model "
            "with model.lora ranks 0)\nPeftModel.from_pretrained(bagel.language_model, \"DIR/language_model\")"
            "  # injected in place\n")


def build(cfg, checkpoint: str | None) -> BagelModel:
    """``model.kind: bagel``: the released folder ``model.path`` (``bagel_io.load_bagel``), LoRA per
    ``model.lora``; the trainable tensors of ``checkpoint`` (``model.save``) if given."""
    m = cfg.model
    model = load_bagel(m.path, device=cfg.device, dtype=m.dtype, resolution=m.resolution, think=m.think,
                       system_prompt=m.system_prompt, train_heads=m.train_heads, logits_chunk=m.logits_chunk,
                       vit=m.vit, vit_max_size=m.vit_max_size, vit_min_size=m.vit_min_size)
    model.add_lora(m.lora.text_rank, m.lora.image_rank, m.lora.text_targets, m.lora.image_targets)
    return model.configured(m, checkpoint)


if __name__ == "__main__":
    import sys

    print(write_tiny_bagel(sys.argv[1] if len(sys.argv) > 1 else "tiny_bagel"))
