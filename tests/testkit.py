"""Helpers shared by several test directories (``tests/`` is on ``sys.path``: its conftest lives
here), so each directory's conftest does not keep its own copy."""

import atexit
import re
import shutil
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def scratch_dir(prefix: str) -> str:
    """A new folder under the system's temp dir, removed when this process exits (the tiny pipeline
    folders are built once per test session; without this, every run of the suite left ~1.5 MB of
    them behind)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


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


def lora_step_then_reference(model, base, tokens):
    """The LoRA contract of an ``hf`` family: one AdamW step on ``-logp + |v|^2`` changes only
    ``lora_*`` weights, on both sides; then the reference (adapters off) equals ``base`` (the same
    pipeline without LoRA) bitwise, while the policy moved. Returns ``(x, t, ctx_policy, ctx_base,
    ctx_reference)`` for the family's own checks."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn((len(tokens), *model.latent_shape), generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.3, 0.9, len(tokens))
    params = [p for g in model.parameter_groups().values() for _, p in g]
    assert all("lora_" in n for g in model.parameter_groups().values() for n, _ in g)
    opt = torch.optim.AdamW(params, lr=1e-2)
    logp, ctx = model.forward_context(tokens)
    (-logp.sum() + model.velocity(x, t, ctx).pow(2).mean()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(n.startswith("lm.") for n in changed) and any(n.startswith("dit.") for n in changed)
    ref = model.reference()
    with torch.no_grad():
        lp_ref, c_ref = ref.forward_context(tokens)
        lp_base, c_base = base.forward_context(tokens)
        lp_pol, c_pol = model.forward_context(tokens)
        v_ref, v_base, v_pol = ref.velocity(x, t, c_ref), base.velocity(x, t, c_base), model.velocity(x, t, c_pol)
    assert torch.equal(lp_ref, lp_base) and torch.equal(c_ref.hidden, c_base.hidden) and torch.equal(v_ref, v_base)
    assert not torch.equal(lp_pol, lp_base) and not torch.equal(v_pol, v_base)  # the policy did move
    return x, t, c_pol, c_base, c_ref


def check_one_lora_step_run(out: Path) -> dict:
    """A 1-step ``unigrpo train`` run directory of an ``hf`` family with LoRA on both sides: one
    training row, ratio exactly 1 on the first update (text and image), gradients on both sides,
    finite metrics, and a ``final.safetensors`` of LoRA weights only. Returns those weights."""
    import json
    import math

    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 1
    r = steps[0]
    assert r["loss/text/first_logp_diff_max"] == 0.0 and r["loss/image/first_logp_diff_max"] == 0.0
    assert r["loss/text/grad_norm"] > 0 and r["loss/image/grad_norm"] > 0
    assert all(math.isfinite(v) for v in r.values())
    saved = load_file(str(Path(out) / "final.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    return saved


def torchrun_env(test_dir: Path) -> dict:
    """The environment of a ``torchrun`` subprocess test: ``test_dir`` and ``tests/`` importable
    (its reward and conftest helpers), the source tree, one thread per rank, offline."""
    import os

    root = Path(test_dir).resolve().parents[1]
    path = [str(test_dir), str(Path(test_dir).parent), str(root / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def steps_of(out: Path) -> dict[int, dict]:
    """The training rows of a run's metrics.jsonl by step (evaluation rows have no reward/mean)."""
    import json

    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same names."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def lora_loss_grads(model, tokens, x, t) -> dict:
    """The trainable gradients of ``-logp.sum() + mean |v|^2`` (text and image) after every LoRA B
    is set to 0.1, so that the LoRA A gradients are not vacuous (B = 0 at init)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    logp, ctx = model.forward_context(tokens)
    (-logp.sum() + model.velocity(x, t, ctx).pow(2).mean()).backward()
    return {n: p.grad for g in model.parameter_groups().values() for n, p in g}
