"""SDE step: closed-form mean/std, Gaussian log-prob, determinism, marginal preservation, window.

Float64 on CPU. Closed forms are transcribed from docs/algorithm.md ("Conventions and formulas")
with python floats, one sample at a time, independently of the vectorised implementation.
"""

import itertools
import math

import pytest
import torch
from torch.distributions import Normal

from unigrpo.algo.schedule import timesteps
from unigrpo.algo.sde import sde_step, sde_window

F64 = torch.float64


def ref_mean_std(x, v, t: float, t_next: float, a: float, kind: str, t_first_next=None):
    """docs/algorithm.md ("One denoising step") for ONE sample, python-float times."""
    if kind == "flow_sde":
        t_tilde = (t_next if t_first_next is None else t_first_next) if t == 1 else t
        sigma = a * math.sqrt(t / (1 - t_tilde))
        dt = t_next - t
        mean = x * (1 + sigma**2 * dt / (2 * t)) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
        return mean, sigma * math.sqrt(-dt)
    assert kind == "cps"
    std = t_next * math.sin(a * math.pi / 2)
    x0, x1 = x - t * v, x + (1 - t) * v
    return (1 - t_next) * x0 + math.sqrt(t_next**2 - std**2) * x1, std


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- closed forms and log-prob
@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mean_std_log_prob_vs_closed_form_and_normal(kind, reduction, per_sample):
    B, a = 4, 0.8
    x, v, x_next = rand(B, 3, 4, 4, seed=1), rand(B, 3, 4, 4, seed=2), rand(B, 3, 4, 4, seed=3)
    grid = timesteps(10, 3.0, F64)
    ks = [0, 2, 5, 8] if per_sample else [3] * B  # includes t = 1 (first step) per sample
    t = grid[ks] if per_sample else grid[3]
    t_next = grid[[k + 1 for k in ks]] if per_sample else grid[4]
    out = sde_step(x, v, t, t_next, a, kind=kind, prev_sample=x_next, reduction=reduction)
    assert out.log_prob.shape == (B,) and out.std.shape == (B,) and out.mean.shape == x.shape
    for b, k in enumerate(ks):
        mean, std = ref_mean_std(x[b], v[b], grid[k].item(), grid[k + 1].item(), a, kind)
        torch.testing.assert_close(out.mean[b], mean, rtol=1e-12, atol=1e-12)
        assert out.std[b].item() == pytest.approx(std, rel=1e-12)
        lp = Normal(mean, torch.tensor(std, dtype=F64)).log_prob(x_next[b])
        ref = lp.mean() if reduction == "mean" else lp.sum()
        assert out.log_prob[b].item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("t_type", ["float", "0d", "1d"])
def test_time_types_agree(t_type):
    x, v, x_next = rand(3, 5, seed=4), rand(3, 5, seed=5), rand(3, 5, seed=6)
    t, tn = 0.7, 0.6
    conv = {"float": lambda s: s, "0d": lambda s: torch.tensor(s, dtype=F64),
            "1d": lambda s: torch.full((3,), s, dtype=F64)}[t_type]
    ref = sde_step(x, v, t, tn, 0.5, prev_sample=x_next)
    out = sde_step(x, v, conv(t), conv(tn), 0.5, prev_sample=x_next)
    torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=0, atol=0)
    torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=0)


def test_t_tilde_at_t_one():
    """sigma_1 = a sqrt(1 / (1 - t_1)) with t_1 the next grid point (finite); override works."""
    x, v = rand(2, 8, seed=7), rand(2, 8, seed=8)
    out = sde_step(x, v, 1.0, 0.9, 0.8, prev_sample=x)
    sigma = 0.8 * math.sqrt(1 / (1 - 0.9))
    assert out.std[0].item() == pytest.approx(sigma * math.sqrt(0.1), rel=1e-12)
    assert torch.isfinite(out.log_prob).all()
    out2 = sde_step(x, v, 1.0, 0.9, 0.8, prev_sample=x, t_first_next=0.95)
    assert out2.std[0].item() == pytest.approx(0.8 * math.sqrt(1 / 0.05) * math.sqrt(0.1), rel=1e-12)
    # t < 1 is untouched by the rule
    out3 = sde_step(x, v, 0.95, 0.9, 0.8, prev_sample=x, t_first_next=0.5)
    assert out3.std[0].item() == pytest.approx(0.8 * math.sqrt(0.95 / 0.05) * math.sqrt(0.05))


# ---------------------------------------------------------------- deterministic steps
@pytest.mark.parametrize("kind,a", [("flow_sde", 0.0), ("cps", 0.0), ("ode", 0.0), ("ode", 0.8)])
def test_zero_noise_is_exact_euler(kind, a):
    x, v = rand(3, 2, 4, seed=9), rand(3, 2, 4, seed=10)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    for t, tn in [(1.0, 0.93), (0.5, 0.4), (0.2, 0.0)]:
        out = sde_step(x, v, t, tn, a, kind=kind, generator=gen)
        assert torch.equal(out.prev_sample, x + (tn - t) * v)
        assert torch.equal(out.log_prob, torch.zeros(3, dtype=F64))
        assert torch.equal(out.std, torch.zeros(3, dtype=F64))
    assert torch.equal(gen.get_state(), state)  # no noise drawn


def test_cps_last_step_deterministic_and_nan_free():
    """CPS at t_next = 0 has std 0: x_next = x0^, log_prob 0, finite gradients."""
    x, v = rand(2, 6, seed=11), rand(2, 6, seed=12).requires_grad_()
    out = sde_step(x, v, 0.3, 0.0, 0.7, kind="cps")
    torch.testing.assert_close(out.prev_sample, (x - 0.3 * v).detach(), rtol=1e-15, atol=1e-15)
    assert torch.equal(out.log_prob.detach(), torch.zeros(2, dtype=F64))
    out.log_prob.sum().backward()
    assert torch.isfinite(v.grad).all()


def test_mixed_std_zero_and_positive_per_sample():
    x, v = rand(2, 6, seed=13), rand(2, 6, seed=14).requires_grad_()
    out = sde_step(x, v, torch.tensor([0.5, 0.3], dtype=F64), torch.tensor([0.4, 0.0], dtype=F64),
                   0.7, kind="cps", prev_sample=x)
    assert out.std[1].item() == 0 and out.std[0].item() > 0 and out.log_prob[1].item() == 0
    out.log_prob.sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad[0].abs().sum() > 0 and v.grad[1].abs().sum() == 0


# ---------------------------------------------------------------- sampling / scoring
@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
def test_empirical_moments_match(kind):
    x, v = rand(2, 100_000, seed=15), rand(2, 100_000, seed=16)
    out = sde_step(x, v, 0.8, 0.7, 0.8, kind=kind, generator=torch.Generator().manual_seed(1))
    z = (out.prev_sample - out.mean) / out.std[:, None]  # [2, D]
    assert z.mean(dim=1).abs().max() < 5 / math.sqrt(1e5)
    assert (z.std(dim=1) - 1).abs().max() < 5 * math.sqrt(0.5 / 1e5)
    # and the reported log-prob is that of the returned sample
    lp = Normal(out.mean, out.std[:, None]).log_prob(out.prev_sample).mean(dim=1)
    torch.testing.assert_close(out.log_prob, lp, rtol=1e-12, atol=1e-12)


def test_scoring_mode_returns_sample_unchanged_and_draws_nothing():
    x, v, x_next = rand(2, 5, seed=17), rand(2, 5, seed=18), rand(2, 5, seed=19)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    out = sde_step(x, v, 0.6, 0.5, 0.8, prev_sample=x_next, generator=gen)
    assert out.prev_sample is x_next
    assert torch.equal(gen.get_state(), state)
    lp = Normal(out.mean, out.std[:, None]).log_prob(x_next).mean(dim=1)
    torch.testing.assert_close(out.log_prob, lp, rtol=1e-12, atol=1e-12)


def test_seeded_sampling_reproducible_and_rescoring_gives_same_log_prob():
    x, v = rand(3, 4, 4, seed=20), rand(3, 4, 4, seed=21)
    a = sde_step(x, v, 0.9, 0.8, 0.8, generator=torch.Generator().manual_seed(5))
    b = sde_step(x, v, 0.9, 0.8, 0.8, generator=torch.Generator().manual_seed(5))
    c = sde_step(x, v, 0.9, 0.8, 0.8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.prev_sample, c.prev_sample)
    again = sde_step(x, v, 0.9, 0.8, 0.8, prev_sample=a.prev_sample)
    assert torch.equal(again.log_prob, a.log_prob)  # ratio exactly 1 on re-scoring


def test_low_precision_inputs_upcast_and_rescore_exactly():
    """bf16 model outputs: math in float32, sample returned in float32, re-scoring is exact."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # float32 latent chain
    v = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = sde_step(x, v, 0.9, 0.8, 0.8, generator=torch.Generator().manual_seed(2))
    for k in ("prev_sample", "log_prob", "mean", "std"):
        assert getattr(out, k).dtype == torch.float32, k
    again = sde_step(x, v, torch.tensor(0.9), torch.tensor(0.8), 0.8, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)
    # the bf16 velocity is used as is (upcast, not re-rounded): same as passing v.float()
    ref = sde_step(x, v.float(), 0.9, 0.8, 0.8, prev_sample=out.prev_sample)
    assert torch.equal(ref.log_prob, out.log_prob)


def test_gradient_reaches_v_not_prev_sample():
    x, v = rand(2, 6, seed=22), rand(2, 6, seed=23).requires_grad_()
    x_next = rand(2, 6, seed=24).requires_grad_()
    out = sde_step(x, v, 0.7, 0.6, 0.8, prev_sample=x_next)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert x_next.grad is None  # the action is a fixed sample: score-function gradient only


def test_bad_arguments():
    x = rand(2, 3)
    with pytest.raises(ValueError, match="kind"):
        sde_step(x, x, 0.5, 0.4, 0.8, kind="ddim")
    with pytest.raises(ValueError, match="reduction"):
        sde_step(x, x, 0.5, 0.4, 0.8, reduction="max")
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, x, 0.5, 0.4, -0.1)


# ---------------------------------------------------------------- marginal preservation
# Data x0 ~ N(MU, S^2) in 1-D, x_t = (1 - t) x0 + t eps, so x_t ~ N((1 - t) MU, V_t) with
# V_t = (1 - t)^2 S^2 + t^2. (v, x_t) are jointly Gaussian with E v = -MU and
# Cov(v, x_t) = Cov(eps - x0, (1 - t) x0 + t eps) = t - (1 - t) S^2, so the exact velocity is
#     v*(x, t) = E[eps - x0 | x_t = x] = -MU + (t - (1 - t) S^2) / V_t * (x - (1 - t) MU).
# Every step is then affine in x plus Gaussian noise, so the law of the DISCRETISED chain is
# Gaussian and its moments follow exactly from (alpha, gamma, std) of each step; this separates
# discretisation error (deterministic) from Monte-Carlo error.
MU, S = 1.5, 0.5


def true_var(t, s=S):
    return (1 - t) ** 2 * s**2 + t**2


def v_star(x, t, s=S):
    return -MU + (t - (1 - t) * s**2) / true_var(t, s) * (x - (1 - t) * MU)


def chain_moments(kind, a, num_steps, s=S):
    """[(t_next, mean, var)] of the discretised chain from N(0, 1), propagated exactly."""
    grid = timesteps(num_steps, 3.0, F64).tolist()
    probe = torch.tensor([[0.0], [1.0]], dtype=F64)  # mean(x) = alpha x + gamma: read at 0 and 1
    m, var, out = 0.0, 1.0, []
    for t, tn in itertools.pairwise(grid):
        step = sde_step(probe, v_star(probe, t, s), t, tn, a, kind=kind)
        gamma = step.mean[0, 0].item()
        alpha = step.mean[1, 0].item() - gamma
        m, var = alpha * m + gamma, alpha**2 * var + step.std[0].item() ** 2
        out.append((tn, m, var))
    return out


def at(moments, t):
    return min(moments, key=lambda r: abs(r[0] - t))


@pytest.mark.parametrize("kind,a", [("flow_sde", 0.7), ("ode", 0.0)])
def test_discretised_chain_converges_to_true_marginals(kind, a):
    """flow_sde / ODE: mean exact, variance error shrinks with more steps at every t."""
    coarse, fine = chain_moments(kind, a, 100), chain_moments(kind, a, 1600)
    for mom in (coarse, fine):
        assert max(abs(m - (1 - t) * MU) for t, m, _ in mom) < 1e-12
    for t in (0.9, 0.5, 0.2, 0.0):
        err_c = abs(at(coarse, t)[2] / true_var(at(coarse, t)[0]) - 1)
        err_f = abs(at(fine, t)[2] / true_var(at(fine, t)[0]) - 1)
        assert err_f < 0.011 and err_f < err_c + 1e-12, (t, err_c, err_f)


def test_flow_sde_first_steps_carry_an_o1_error():
    """Near t = 1, |dt| / (1 - t) ~ 1/k whatever the number of steps (sigma ~ 1/sqrt(1 - t)), so
    Euler-Maruyama over-disperses the first steps by ~ a^4 pi^2 / 24 (+9.5% at a = 0.7); the error
    then decays like N^(-a^2) at any fixed t < 1 (checked above)."""
    for n in (100, 1600):
        worst = max(var / true_var(t) - 1 for t, _, var in chain_moments("flow_sde", 0.7, n)[:5])
        assert 0.05 < worst < 0.7**4 * math.pi**2 / 24 + 0.01


@pytest.mark.parametrize("kind,a", [("flow_sde", 0.7), ("cps", 0.7), ("ode", 0.0)])
def test_sampler_matches_chain_moments_monte_carlo(kind, a):
    """The actual sampler (100k particles, 200 steps) draws the law computed above."""
    n, num_steps = 100_000, 200
    gen = torch.Generator().manual_seed(0)
    grid = timesteps(num_steps, 3.0, F64).tolist()
    exact = {round(t, 12): (m, var) for t, m, var in chain_moments(kind, a, num_steps)}
    checks = {min(grid, key=lambda g: abs(g - c)) for c in (0.9, 0.5, 0.2, 0.0)}
    x = torch.randn(n, 1, generator=gen, dtype=F64)
    for t, tn in itertools.pairwise(grid):
        x = sde_step(x, v_star(x, t), t, tn, a, kind=kind, generator=gen).prev_sample
        if tn in checks:
            m, var = exact[round(tn, 12)]
            assert abs(x.mean().item() - m) < 5 * math.sqrt(var / n)
            assert abs(x.var().item() / var - 1) < 5 * math.sqrt(2 / n)
            if kind != "cps":  # and the true marginal, up to discretisation
                assert abs(x.mean().item() - (1 - tn) * MU) < 5 * math.sqrt(var / n)
                assert abs(x.var().item() / true_var(tn) - 1) < 0.03 + 5 * math.sqrt(2 / n)
    if kind != "cps":
        assert abs(x.std().item() / S - 1) < 0.02


def test_cps_exact_for_point_mass_data():
    """With a deterministic posterior (S = 0), x0^ and x1^ are exact: CPS keeps every marginal."""
    for a in (0.3, 0.7, 1.0):
        for t, m, var in chain_moments("cps", a, 10, s=0.0):
            assert abs(m - (1 - t) * MU) < 1e-12 and abs(var - t**2) < 1e-12


def test_cps_under_disperses_by_the_posterior_variance():
    """CPS plugs the posterior MEAN x0^ into a kernel whose mean is linear in x0, so one step from
    the exact marginal keeps the mean and loses variance c^2 Var(x0 | x_t), with
    c = (1 - t') - t' cos(a pi/2) (1 - t) / t and Var(x0 | x_t) = S^2 t^2 / V_t. As c does not
    vanish with dt, the chain stays under-dispersed however many steps are taken."""
    a, t, tn = 0.7, 0.6, 0.55
    probe = torch.tensor([[0.0], [1.0]], dtype=F64)
    step = sde_step(probe, v_star(probe, t), t, tn, a, kind="cps")
    gamma = step.mean[0, 0].item()
    alpha = step.mean[1, 0].item() - gamma
    m = alpha * (1 - t) * MU + gamma
    var = alpha**2 * true_var(t) + step.std[0].item() ** 2
    c = (1 - tn) - tn * math.cos(a * math.pi / 2) * (1 - t) / t
    assert m == pytest.approx((1 - tn) * MU, abs=1e-12)
    assert var == pytest.approx(true_var(tn) - c**2 * S**2 * t**2 / true_var(t), rel=1e-12)
    for n in (100, 1600):
        mom = chain_moments("cps", a, n)
        assert max(abs(mm - (1 - tt) * MU) for tt, mm, _ in mom) < 1e-12  # mean: exact
        assert mom[-1][2] / S**2 < 0.8  # final variance ~30% low, not shrinking with n


# ---------------------------------------------------------------- SDE window
def test_window_in_range_consecutive_and_uniform():
    gen = torch.Generator().manual_seed(0)
    draws, counts = 3000, {0: 0, 1: 0, 2: 0}
    for _ in range(draws):
        w = sde_window(25, 3, (0, 5), generator=gen)
        assert w == list(range(w[0], w[0] + 3)) and 0 <= w[0] and w[-1] < 5
        counts[w[0]] += 1
    sd = math.sqrt(draws * (1 / 3) * (2 / 3))
    assert all(abs(c - draws / 3) < 5 * sd for c in counts.values()), counts


def test_window_edge_cases():
    assert sde_window(10, 10, (0, 10)) == list(range(10))  # full SDE (original FlowGRPO)
    assert sde_window(10, 2, (7, 9)) == [7, 8]
    gen = torch.Generator().manual_seed(1)
    assert {sde_window(10, 1, (3, 6), generator=gen)[0] for _ in range(200)} == {3, 4, 5}


@pytest.mark.parametrize("args", [
    (25, 6, (0, 5)),   # window larger than its range
    (25, 0, (0, 5)),   # empty window
    (4, 3, (0, 5)),    # range beyond the steps
    (25, 3, (5, 5)),   # empty range
    (25, 3, (-1, 5)),  # negative start
    (0, 1, (0, 1)),    # no steps
])
def test_window_bad_arguments(args):
    with pytest.raises(ValueError):
        sde_window(*args)


# ---------------------------------------------------------------- gaussian_log_prob's allocation-free form
def elementwise_log_prob(x, mean, std, reduction):
    """The element-by-element definition: the Gaussian log-density of each element with a safe std of
    1 on deterministic rows, each such element then zeroed, and only then reduced over the row."""
    std = std.reshape(-1, *([1] * (mean.ndim - 1))) if std.ndim == 1 else std
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))
    lp = -(x.detach() - mean) ** 2 / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(stochastic, lp, torch.zeros_like(lp)).reshape(len(lp), -1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("std_shape", ["per_row", "flat", "scalar", "zero_scalar"])
def test_gaussian_log_prob_is_bitwise_the_elementwise_definition(dtype, reduction, std_shape):
    """Zeroing a deterministic row after the reduction (no [B, D] select, no ones/zeros tensors) gives
    the very values and gradients of zeroing each element first."""
    from unigrpo.algo.sde import gaussian_log_prob

    x, mean0 = rand(5, 3, 4, 4, seed=1).to(dtype), rand(5, 3, 4, 4, seed=2).to(dtype)
    std = {"per_row": torch.tensor([0.3, 0.0, 1.7, 0.0, 0.05], dtype=dtype).reshape(5, 1, 1, 1),
           "flat": torch.tensor([0.3, 0.0, 1.7, 0.0, 0.05], dtype=dtype),
           "scalar": torch.tensor(0.4, dtype=dtype), "zero_scalar": torch.tensor(0.0, dtype=dtype)}[std_shape]
    grads = []
    for fn in (gaussian_log_prob, elementwise_log_prob):
        mean = mean0.clone().requires_grad_(True)
        lp = fn(x, mean, std, reduction)
        (lp * torch.arange(1.0, 6.0, dtype=dtype)).sum().backward()
        grads.append((lp.detach(), mean.grad))
    (lp_new, g_new), (lp_ref, g_ref) = grads
    assert lp_new.shape == (5,) and lp_new.dtype == dtype
    assert torch.equal(lp_new, lp_ref) and torch.equal(g_new, g_ref)
    assert torch.isfinite(lp_new).all() and torch.isfinite(g_new).all()
    if std_shape in ("per_row", "flat"):
        assert lp_new[1] == 0 and lp_new[3] == 0 and lp_new[0] != 0


def test_gaussian_log_prob_refuses_a_per_element_std():
    from unigrpo.algo.sde import gaussian_log_prob

    with pytest.raises(ValueError, match=r"one std per sample"):
        gaussian_log_prob(rand(2, 3), rand(2, 3), rand(2, 3).abs())
