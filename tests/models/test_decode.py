"""The text engine's samplers (``models.decode``). The default (``"multinomial"``): bit for bit the
tokens ``torch.multinomial`` draws from the same generators. ``"inverse_cdf"``: one uniform per
row, checked for exact frequencies on a grid of uniforms and token for token against a slow
per-row reference written in plain Python (float64 sums, a linear scan over the vocabulary). Both:
against softmax's closed form by a chi-square test."""

import math

import pytest
import torch

from unigrpo.models.decode import (
    TOKEN_SAMPLERS,
    exponential_race,
    inverse_cdf,
    nucleus,
    sample_rows,
    uniforms,
)

LOGITS = [0.3, -1.2, 1.5, 0.0, -0.4, 0.9]  # not sorted by id: the nucleus must map back to ids


def closed_form(logits: list[float], top_p: float = 1.0) -> list[float]:
    """softmax(logits) restricted to the top-p nucleus and renormalised, in Python floats."""
    z = [math.exp(x) for x in logits]
    p = [x / sum(z) for x in z]
    kept, mass = set(), 0.0
    for j in sorted(range(len(p)), key=lambda j: -p[j]):
        if mass > top_p:  # the smallest prefix whose mass reaches top_p
            break
        kept.add(j)
        mass += p[j]
    return [p[j] / mass if j in kept else 0.0 for j in range(len(p))]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_grid_of_uniforms_draws_each_token_its_exact_share(top_p):
    """u = (k + 1/2) / N for k < N: token j is drawn by the N * p_j grid points inside its
    interval, give or take the one at each end."""
    n, want = 10_000, closed_form(LOGITS, top_p)
    probs = nucleus(torch.tensor([LOGITS]).softmax(-1), top_p).expand(n, -1)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    counts = torch.bincount(inverse_cdf(probs, u), minlength=len(LOGITS)).tolist()
    assert all(abs(c - n * p) <= 1 for c, p in zip(counts, want)), (counts, want)
    assert (top_p < 1) == (0 in counts)  # 0.8 leaves tokens out of the nucleus, and they are never drawn


@pytest.mark.parametrize("token_sampler", TOKEN_SAMPLERS)
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_frequencies_fit_softmax_by_chi_square(top_p, token_sampler):
    """20 000 rows of the same logits, one seeded draw each: Pearson's chi-square against the
    closed-form nucleus distribution, below the 0.999 quantile of its degrees of freedom."""
    n, want = 20_000, closed_form(LOGITS, top_p)
    tok = sample_rows(torch.tensor([LOGITS]).expand(n, -1), top_p, torch.Generator().manual_seed(0), token_sampler)
    counts = torch.bincount(tok, minlength=len(LOGITS)).tolist()
    support = [j for j, p in enumerate(want) if p > 0]
    assert all(counts[j] == 0 for j in range(len(want)) if j not in support)
    chi2 = sum((counts[j] - n * want[j]) ** 2 / (n * want[j]) for j in support)
    quantile_999 = {5: 20.52, 2: 13.82}[len(support) - 1]  # chi-square tables, df = support - 1
    assert chi2 < quantile_999, (chi2, counts)


def reference_rows(logits: torch.Tensor, top_p: float, gens: list[torch.Generator]) -> list[int]:
    """The same sampler, slowly: per row, the nucleus by a Python sort and the token by a linear
    scan of the running float64 sum; the uniforms are each run's one ``torch.rand`` call."""
    u, start = [], 0
    for end in range(1, len(gens) + 1):
        if end == len(gens) or gens[end] is not gens[start]:
            u += torch.rand(end - start, generator=gens[start], dtype=torch.float64).tolist()
            start = end
    out = []
    for row, ui in zip(logits, u):
        p = row.softmax(-1).tolist()  # float32 probabilities, as the engine has them
        kept, mass = set(), 0.0
        for j in sorted(range(len(p)), key=lambda j: -p[j]):
            if mass > top_p:
                break
            kept.add(j)
            mass += p[j]
        p = [x if j in kept else 0.0 for j, x in enumerate(p)]
        total = sum(p)
        v = min(ui * total, math.nextafter(total, 0.0))
        acc = 0.0
        for j, x in enumerate(p):
            acc += x
            if acc > v:
                out.append(j)
                break
    return out


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tokens_equal_the_slow_reference_for_one_generator_per_group(top_p):
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(1)) * 2
    seeds = [5, 6, 7]

    def gens():
        return [g for s in seeds for g in [torch.Generator().manual_seed(s)] * 4]

    fast, slow = gens(), gens()
    for _ in range(3):  # the generators advance: later draws must agree too
        assert sample_rows(logits, top_p, fast, "inverse_cdf").tolist() == reference_rows(logits, top_p, slow)


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
def test_the_default_sampler_draws_torch_multinomials_tokens(top_p):
    """``"multinomial"`` = ``torch.multinomial(nucleus, 1)`` per run of rows sharing a generator,
    bit for bit, over vocabularies from 5 to 50 000 entries, sharp and flat logits, and three
    consecutive draws (the generators advance alike)."""
    for case in range(24):
        rows, vocab = [1, 4, 8, 12][case % 4], [5, 17, 300, 2048, 50_000][case % 5]
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(case)) * (0.3 + case % 6)
        run = min(rows, 4)  # rows per generator
        ours = [g for k in range(rows // run) for g in [torch.Generator().manual_seed(case + 10 * k)] * run]
        theirs = [torch.Generator().manual_seed(case + 10 * k) for k in range(rows // run)]
        for _ in range(3):
            probs = nucleus(logits.softmax(-1), top_p)
            want = torch.cat([torch.multinomial(part, 1, generator=g)[:, 0]
                              for part, g in zip(probs.split(run), theirs)])
            assert torch.equal(sample_rows(logits, top_p, ours), want), case


def test_the_exponential_race_is_multinomial_with_its_default_generator():
    probs = torch.rand(8, 100, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    want = torch.multinomial(probs, 1)[:, 0]
    torch.manual_seed(4)
    assert torch.equal(exponential_race(probs, None), want)


@pytest.mark.parametrize("token_sampler", TOKEN_SAMPLERS)
def test_one_generator_equals_it_shared_by_every_row(token_sampler):
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    one = sample_rows(logits, 1.0, torch.Generator().manual_seed(3), token_sampler)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(one, sample_rows(logits, 1.0, [g] * 6, token_sampler))


def test_the_two_samplers_draw_other_tokens_from_the_same_seed():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    a, b = (sample_rows(logits, 1.0, torch.Generator().manual_seed(6), s) for s in TOKEN_SAMPLERS)
    assert not torch.equal(a, b)


def test_the_ends_of_the_unit_interval_draw_the_first_and_last_possible_tokens():
    """u = 0 and the largest double below 1 land on the first and the last token of non-zero
    probability; zero-probability tokens at either end are never drawn."""
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).expand(2, -1)
    u = torch.tensor([0.0, math.nextafter(1.0, 0.0)], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1, 4]


def test_a_generator_count_that_is_not_the_row_count_is_refused():
    with pytest.raises(ValueError, match="got 2 generators for 3 rows"):
        uniforms([torch.Generator()] * 2, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="got 2 generators for 3 rows"):
        sample_rows(torch.zeros(3, 4), 1.0, [torch.Generator()] * 2)


def test_an_unknown_token_sampler_is_refused():
    with pytest.raises(ValueError, match="token_sampler: 'gumbel' is none of multinomial, inverse_cdf"):
        sample_rows(torch.zeros(3, 4), 1.0, None, "gumbel")
