"""Tiny random CLIP checkpoints for the model-based reward tests, built from config and saved with
``save_pretrained`` (a tmp folder stands in for a hub id; nothing is downloaded)."""

from pathlib import Path

import torch


def tiny_clip_tokenizer():
    """A CLIP tokenizer built in code: the byte-level alphabet with and without CLIP's ``</w>``
    end-of-word suffix, no merges (every character is a token); pad = eos as in OpenAI's CLIP."""
    import transformers
    from tokenizers import pre_tokenizers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def save_tiny_clip(folder: Path, seed: int = 0, projection_dim: int = 16) -> str:
    """A 2-layer CLIP (32 px images, 8 px patches) + its processor, written to ``folder``."""
    import transformers

    tok = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text = transformers.CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=2, num_attention_heads=4)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=projection_dim))
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # not the init value, so a missing exp() or scale shows
    proc = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def save_aesthetic_head(path: Path, dim: int, seed: int = 0) -> str:
    """A random LAION-aesthetic head state dict (the upstream key names), saved with torch.save."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(1024, dim), (128, 1024), (64, 128), (16, 64), (1, 16)]
    sd = {}
    for i, (o, n) in zip((0, 2, 4, 6, 7), sizes):
        sd[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    torch.save(sd, path)
    return str(path)
