"""Helpers shared by several test directories (``tests/`` is on ``sys.path``: its conftest lives
here), so each directory's conftest does not keep its own copy."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def save_tiny_random_model(overrides: list[str], path: Path) -> str:
    """A random tiny model of the config ``overrides`` whose every weight is non-zero (the UNet's
    zero-init output layer would make v == 0 and the image tests vacuous), saved like a real
    checkpoint at ``path``."""
    from unigrpo.config import load_config
    from unigrpo.models import build_model

    cfg = load_config(None, overrides + ["model.checkpoint=null"])
    torch.manual_seed(0)
    model = build_model(cfg, checkpoint=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(path)
    return str(path)


def documented_metric_patterns() -> list[re.Pattern]:
    """Backticked keys in the first column of docs/metrics.md tables; ``<x>`` matches one segment."""
    pats = []
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`", line)
        if m:
            key = re.sub(r"<[^>]+>", "\0", m.group(1))
            pats.append(re.compile("^" + re.escape(key).replace("\0", r"[^/]+") + "$"))
    return pats


def tiny_bpe_tokenizer(chat_template: str, **kwargs):
    """A byte-level BPE trained in code on a few shape sentences (nothing downloaded), as a
    transformers fast tokenizer with the ChatML specials; ``kwargs`` go to the tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["a red circle left of a blue square", "two green triangles above a yellow circle",
         "the sky is blue so draw a blue circle", "user assistant system think"],
        trainers.BpeTrainer(vocab_size=300, special_tokens=BPE_SPECIAL, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                               **kwargs)
    tok.chat_template = chat_template
    return tok
