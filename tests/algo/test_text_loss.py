"""Text GRPO loss: hand-computed clip cases, aggregations vs a naive loop, gradients, stats."""

import math

import pytest
import torch

from unigrpo.algo.text_loss import text_grpo_loss

F64 = torch.float64


def hand_batch():
    """6 one-token sequences (+ one padding column holding -inf) covering every clip case."""
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 1.0]
    advs = [1.0, -1.0, 1.0, -1.0, 1.0, 2.0]
    logp = torch.tensor([[math.log(r), -math.inf] for r in ratios], dtype=F64, requires_grad=True)
    logp_old = torch.zeros(6, 2, dtype=F64)
    mask = torch.tensor([[True, False]] * 6)
    return logp, logp_old, torch.tensor(advs, dtype=F64), mask


def test_hand_computed_clip_cases_and_gradients():
    logp, logp_old, adv, mask = hand_batch()
    loss, stats = text_grpo_loss(logp, logp_old, adv, mask, aggregation="token_mean")
    # per token -min(r A, clip(r, 0.8, 1.2) A):
    #   r=1.5,A=+1 -> -1.2 (clipped, no grad)   r=1.5,A=-1 -> +1.5 (grad -A r = 1.5)
    #   r=0.5,A=+1 -> -0.5 (grad -0.5)          r=0.5,A=-1 -> +0.8 (clipped, no grad)
    #   r=1.1,A=+1 -> -1.1 (grad -1.1)          r=1.0,A=2  -> -2.0 (grad -2)
    per_token = [-1.2, 1.5, -0.5, 0.8, -1.1, -2.0]
    assert loss.item() == pytest.approx(sum(per_token) / 6, rel=1e-12)
    loss.backward()
    expected_grad = torch.tensor([0.0, 1.5, -0.5, 0.0, -1.1, -2.0], dtype=F64) / 6
    torch.testing.assert_close(logp.grad[:, 0], expected_grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(logp.grad[:, 1], torch.zeros(6, dtype=F64))  # padding: no grad, no NaN
    assert stats["clip_frac"].item() == pytest.approx(2 / 6)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["ratio_mean"].item() == pytest.approx(sum([1.5, 1.5, 0.5, 0.5, 1.1, 1.0]) / 6)
    k3 = [r - 1 - math.log(r) for r in [1.5, 1.5, 0.5, 0.5, 1.1, 1.0]]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 6)
    assert stats["num_tokens"].item() == 6


def test_asymmetric_clip_range():
    logp = torch.tensor([[math.log(1.25)], [math.log(1.25)]], dtype=F64)
    loss, stats = text_grpo_loss(logp, torch.zeros(2, 1, dtype=F64), torch.tensor([1.0, 1.0]),
                                 torch.ones(2, 1, dtype=torch.bool), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats["clip_frac"].item() == 0  # 1.25 < 1.28


def naive_loss(logp, logp_old, adv, mask, eps_low, eps_high, aggregation, max_len, ref, beta):
    B, L = len(logp), len(logp[0])
    seq_means, total, count = [], 0.0, 0
    for b in range(B):
        s, c = 0.0, 0
        for i in range(L):
            if not mask[b][i]:
                continue
            r, a = math.exp(logp[b][i] - logp_old[b][i]), adv[b]
            term = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if beta:
                d = ref[b][i] - logp[b][i]
                term += beta * (math.exp(d) - d - 1)
            s, c = s + term, c + 1
        seq_means.append(s / c if c else 0.0)
        total, count = total + s, count + c
    if aggregation == "seq_mean":
        return sum(seq_means) / B
    if aggregation == "token_mean":
        return total / max(count, 1)
    return total / (B * (max_len or L))


def random_batch(B=6, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp_old = -torch.rand(B, L, generator=g, dtype=F64) * 3
    logp = logp_old + 0.3 * torch.randn(B, L, generator=g, dtype=F64)  # ratios ~ e^{+-0.3}: clips
    ref = logp_old + 0.2 * torch.randn(B, L, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[2] = False  # a row with no active token (e.g. thinking off)
    mask[3] = True
    logp = torch.where(mask, logp, torch.full_like(logp, -math.inf))  # garbage at padding
    return logp, logp_old, adv, mask, ref


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("max_len", [None, 12])
def test_aggregations_match_naive_loop(aggregation, beta, max_len):
    logp, logp_old, adv, mask, ref = random_batch()
    logp.requires_grad_()
    loss, stats = text_grpo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.25,
                                 aggregation=aggregation, max_len=max_len,
                                 logp_ref=ref if beta else None, beta=beta)
    expected = naive_loss(logp.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.25,
                          aggregation, max_len, ref.tolist(), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.equal(logp.grad[2], torch.zeros(7, dtype=F64))
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert ("kl_ref" in stats) == bool(beta)


@pytest.mark.parametrize("aggregation", ["seq_mean", "dr_grpo"])
def test_micro_batches_accumulate_to_full_batch(aggregation):
    """seq_mean and dr_grpo (fixed max_len) are row-separable: chunk losses weighted by rows/B."""
    logp, logp_old, adv, mask, _ = random_batch(B=8, seed=1)
    full, _ = text_grpo_loss(logp, logp_old, adv, mask, aggregation=aggregation, max_len=7)
    parts = sum(text_grpo_loss(logp[i:i + 2], logp_old[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                               aggregation=aggregation, max_len=7)[0] * 2 / 8 for i in range(0, 8, 2))
    assert full.item() == pytest.approx(parts.item(), rel=1e-12)


def test_first_update_ratio_is_one():
    logp, _, adv, mask, _ = random_batch(seed=2)
    loss, stats = text_grpo_loss(logp, logp.clone(), adv, mask)
    assert stats["ratio_min"].item() == 1 and stats["ratio_max"].item() == 1
    assert stats["approx_kl"].item() == 0 and stats["clip_frac"].item() == 0
    has_tokens = mask.any(dim=1).to(F64)
    assert loss.item() == pytest.approx((-adv * has_tokens).mean().item(), rel=1e-12)


def test_gradient_only_to_logp():
    logp, logp_old, adv, mask, ref = random_batch(seed=3)
    logp.requires_grad_(), logp_old.requires_grad_(), adv.requires_grad_(), ref.requires_grad_()
    loss, stats = text_grpo_loss(logp, logp_old, adv, mask, logp_ref=ref, beta=0.1)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert logp_old.grad is None and adv.grad is None and ref.grad is None
    assert not any(v.requires_grad for v in stats.values())


def test_all_masked_batch_is_finite():
    logp = torch.full((3, 4), -math.inf, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for agg in ("seq_mean", "token_mean", "dr_grpo"):
        loss, stats = text_grpo_loss(logp, torch.zeros(3, 4), torch.ones(3), mask, aggregation=agg)
        assert loss.item() == 0
        loss.backward()
        assert torch.equal(logp.grad, torch.zeros(3, 4))
        assert stats["ratio_mean"].item() == 1 and stats["clip_frac"].item() == 0


def test_bf16_inputs_are_upcast():
    logp, logp_old, adv, mask, _ = random_batch(seed=4)
    loss, stats = text_grpo_loss(logp.bfloat16(), logp_old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32 and stats["approx_kl"].dtype == torch.float32


def test_bad_arguments():
    logp, logp_old, adv, mask, _ = random_batch()
    with pytest.raises(ValueError, match="aggregation"):
        text_grpo_loss(logp, logp_old, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="logp_ref"):
        text_grpo_loss(logp, logp_old, adv, mask, beta=0.1)
