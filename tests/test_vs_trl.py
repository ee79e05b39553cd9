"""benchmarks/vs_trl.py without TRL: our side's GRPO step is a real update (weights change, ratio
exactly 1, 32 tokens per completion) and its one-loop sampling draws the recipe's per-group tokens."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("vs_trl", Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py")
vs_trl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_trl)


def test_our_step_updates_the_model_on_policy():
    lm, tok = vs_trl.build_model_and_tokenizer()
    batched = vs_trl.OurGRPO(lm, tok, batched=True)
    per_group = vs_trl.OurGRPO(lm, tok, batched=False)
    prompts = vs_trl.PROMPTS[:2]
    a, b = batched.sample(prompts, 0), per_group.sample(prompts, 0)
    assert [r[m].tolist() for r, m in zip(a.ids, a.response_mask)] == \
        [r[m].tolist() for r, m in zip(b.ids, b.response_mask)]
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    info = batched.step(prompts, 0)
    assert info["ratio_max"] == 1.0 and info["completion_len_mean"] == vs_trl.NEW_TOKENS
    assert any(not torch.equal(before[n], p) for n, p in lm.named_parameters())


def test_the_variants_sample_what_they_promise(monkeypatch):
    """``ours_before`` (``torch.multinomial``) and ``ours`` (the default sampler, without the checks)
    draw the same tokens; ``ours_static`` decodes the ``ours_inverse_cdf`` batch on a StaticKV, and
    the inverse-CDF sampler draws other tokens from the same seeds; the decode-vs-teacher-forced
    check the benchmark prints is float rounding for every variant."""
    lm, tok = vs_trl.build_model_and_tokenizer()
    sides = vs_trl.our_sides(lm, tok, compile=False)
    assert list(sides) == ["ours_before", "ours", "ours_inverse_cdf", "ours_static", "ours_per_group"]
    monkeypatch.setattr(vs_trl, "PROMPTS", vs_trl.PROMPTS[:2])
    batch = {k: sides[k].sample(vs_trl.PROMPTS, 0).ids for k in ("ours_before", "ours", "ours_inverse_cdf", "ours_static")}
    assert torch.equal(batch["ours_before"], batch["ours"])
    assert torch.equal(batch["ours_inverse_cdf"], batch["ours_static"])
    assert batch["ours"].shape == batch["ours_static"].shape and not torch.equal(batch["ours"], batch["ours_static"])
    for side in ("ours", "ours_inverse_cdf", "ours_static"):
        assert vs_trl.decode_vs_teacher_forced(sides[side]) < 1e-5
    assert torch.equal(sides["ours"].sample(vs_trl.PROMPTS, 0).ids, batch["ours"])  # the engine's sampler is back
