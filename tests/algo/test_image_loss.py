"""FlowGRPO surrogate, RatioNorm, velocity MSE and latent KL (float64 closed forms)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from unigrpo.algo.image_loss import flow_grpo_loss, latent_kl, ratio_norm_log_ratio, velocity_mse
from unigrpo.algo.schedule import timesteps
from unigrpo.algo.sde import sde_step

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- clipped surrogate
def test_hand_computed_clip_cases_and_gradients():
    ratios = torch.tensor([[1.5, 1.05], [1.5, 0.5], [0.5, 1.0], [1.5, 0.5]], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=F64)
    logp = ratios.log().requires_grad_()
    logp_old = torch.zeros(4, 2, dtype=F64, requires_grad=True)
    loss, stats = flow_grpo_loss(logp, logp_old, adv, eps=0.1)
    # -min(r A, clip(r, 0.9, 1.1) A):  [-1.1 (clipped), -1.05], [1.5, 0.9 (clipped)],
    #                                  [-1.0, -2.0], [0, 0]; mean over steps then trajectories
    per = torch.tensor([[-1.1, -1.05], [1.5, 0.9], [-1.0, -2.0], [0.0, 0.0]], dtype=F64)
    assert loss.item() == pytest.approx(per.mean(dim=1).mean().item(), rel=1e-12)
    loss.backward()
    grad = torch.tensor([[0.0, -1.05], [1.5, 0.0], [-1.0, -2.0], [0.0, 0.0]], dtype=F64) / 8
    torch.testing.assert_close(logp.grad, grad, rtol=1e-12, atol=1e-15)
    assert logp_old.grad is None
    assert stats["clip_frac"].item() == pytest.approx(2 / 8)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 8)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 8)
    assert stats["ratio_max"].item() == pytest.approx(1.5) and stats["ratio_min"].item() == 0.5
    assert stats["logratio_mean"].item() == pytest.approx(ratios.log().mean().item())
    assert stats["approx_kl"].item() == pytest.approx((ratios - 1 - ratios.log()).mean().item())


def test_one_dim_logp_and_paper_eps():
    logp_old = rand(6, seed=1)
    logp = logp_old + torch.tensor([0, 1e-7, -1e-7, 1e-5, -1e-5, 0], dtype=F64)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, 0.0], dtype=F64)
    loss, stats = flow_grpo_loss(logp, logp_old, adv)  # eps = 1e-6: only the 1e-5 ones clip
    assert stats["clip_frac"].item() == pytest.approx(2 / 6)
    r = torch.exp(logp - logp_old).clamp(1 - 1e-6, 1 + 1e-6)
    expected = -torch.minimum(torch.exp(logp - logp_old) * adv, r * adv).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_first_update_ratio_exactly_one_with_ratio_norm():
    mean = rand(3, 2, 4, 4, seed=2)
    logp = rand(3, 2, seed=3)
    loss, stats = flow_grpo_loss(logp, logp.clone(), torch.ones(3, dtype=F64), ratio_norm=True,
                                 std=torch.full((3, 2), 0.3, dtype=F64), mean=mean, mean_old=mean.clone())
    assert stats["ratio_min"].item() == 1 and stats["ratio_max"].item() == 1
    assert loss.item() == -1.0


# ---------------------------------------------------------------- RatioNorm
# With x = mean_old + std z (z ~ N(0, I), D elements), d = mean_theta - mean_old and mean-reduced
# log-densities, per element -(x - m_theta)^2/(2 std^2) + (x - m_old)^2/(2 std^2) = z d/std - d^2/(2std^2):
#     l  = mean(z d) / std - mean(d^2) / (2 std^2)    E l = -mean(d^2)/(2 std^2), Var l = mean(d^2)/(D std^2)
#     l~ = std l + mean(d^2) / (2 std) = mean(z d)     E l~ = 0,                 Var l~ = mean(d^2)/D
def test_ratio_norm_removes_bias_and_equalises_scale():
    n, D = 20_000, 16
    mean_old = rand(D, seed=4)
    d = 0.05 * rand(D, seed=5)
    mean_theta = mean_old + d
    md2 = (d**2).mean().item()
    for std in (0.02, 0.2):
        z = rand(n, D, seed=6)
        x = mean_old + std * z  # [n, D] samples of the behaviour (old) policy
        s = torch.tensor(std, dtype=F64)
        l = Normal(mean_theta, s).log_prob(x).mean(-1) - Normal(mean_old, s).log_prob(x).mean(-1)
        sd_l = math.sqrt(md2 / D) / std
        assert abs(l.mean().item() + md2 / (2 * std**2)) < 5 * sd_l / math.sqrt(n)
        assert l.mean().item() < -md2 / (2 * std**2) / 2  # clearly negative
        assert l.var().item() == pytest.approx(md2 / (D * std**2), rel=0.05)
        ln = ratio_norm_log_ratio(l, torch.full((n,), std, dtype=F64), mean_theta.expand(n, D),
                                  mean_old.expand(n, D))
        torch.testing.assert_close(ln, (z * d).mean(-1), rtol=1e-9, atol=1e-12)  # exact identity
        assert abs(ln.mean().item()) < 5 * math.sqrt(md2 / D / n)
        assert ln.var().item() == pytest.approx(md2 / D, rel=0.05)  # independent of std


def test_ratio_norm_through_sde_step_and_loss():
    """Real pipeline: old / new velocities at one SDE step; loss uses r = exp(l~), grads reach v."""
    B, a, t, tn = 8, 0.8, 0.9, 0.85
    x_t, v_old = rand(B, 2, 4, 4, seed=7), rand(B, 2, 4, 4, seed=8)
    v = (v_old + 0.01 * rand(B, 2, 4, 4, seed=9)).requires_grad_()
    old = sde_step(x_t, v_old, t, tn, a, generator=torch.Generator().manual_seed(0))
    new = sde_step(x_t, v, t, tn, a, prev_sample=old.prev_sample)
    adv = torch.linspace(-1, 1, B, dtype=F64)
    loss, stats = flow_grpo_loss(new.log_prob[:, None], old.log_prob[:, None], adv, eps=10.0,
                                 ratio_norm=True, std=new.std[:, None], mean=new.mean[:, None],
                                 mean_old=old.mean[:, None])
    z = (old.prev_sample - old.mean) / old.std[:, None, None, None]
    ln = (z * (new.mean - old.mean)).reshape(B, -1).mean(-1)  # l~ = mean(z d)
    assert loss.item() == pytest.approx((-(ln.exp() * adv)).mean().item(), rel=1e-9)
    assert stats["logratio_normed_mean"].item() == pytest.approx(ln.mean().item(), rel=1e-9)
    loss.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_ratio_norm_requires_its_inputs():
    with pytest.raises(ValueError, match="ratio_norm"):
        flow_grpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), ratio_norm=True)


# ---------------------------------------------------------------- velocity MSE and latent KL
def test_velocity_mse_reductions_and_gradients():
    v, v_ref = rand(3, 2, 5, seed=10).requires_grad_(), rand(3, 2, 5, seed=11).requires_grad_()
    sq = (v - v_ref).detach() ** 2
    assert velocity_mse(v, v_ref).item() == pytest.approx(sq.mean().item(), rel=1e-12)
    assert velocity_mse(v, v_ref, "sum").item() == pytest.approx(sq.sum().item() / 3, rel=1e-12)
    torch.testing.assert_close(velocity_mse(v, v_ref, "none"), sq.reshape(3, -1).mean(1))
    velocity_mse(v, v_ref).backward()
    torch.testing.assert_close(v.grad, 2 * (v - v_ref).detach() / v.numel())
    assert v_ref.grad is None  # the reference is frozen: pulled towards, never pulled
    with pytest.raises(ValueError, match="reduction"):
        velocity_mse(v, v_ref, "max")
    assert velocity_mse(v.detach().bfloat16(), v_ref.detach().bfloat16()).dtype == torch.float32


def test_latent_kl_is_the_gaussian_kl():
    mean, mean_ref = rand(3, 4, 4, seed=12), rand(3, 4, 4, seed=13)
    std = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    kl = kl_divergence(Normal(mean, std[:, None, None]), Normal(mean_ref, std[:, None, None]))
    assert latent_kl(mean, mean_ref, std).item() == pytest.approx(kl.mean().item(), rel=1e-12)
    assert latent_kl(mean, mean_ref, std, "sum").item() == pytest.approx(kl.sum().item() / 3)
    torch.testing.assert_close(latent_kl(mean, mean_ref, std, "none"), kl.reshape(3, -1).mean(1))
    assert latent_kl(mean, mean_ref, torch.tensor(0.5, dtype=F64)).item() == pytest.approx(
        ((mean - mean_ref) ** 2).mean().item() / (2 * 0.25))


def kl_weight(t, tn, a):
    """KL / MSE for flow_sde, computed from docs/algorithm.md: mean is linear in v with slope c."""
    t_tilde = tn if t == 1 else t
    sigma2 = a**2 * t / (1 - t_tilde)
    c = (1 + sigma2 * (1 - t) / (2 * t)) * (tn - t)
    return c**2 / (2 * sigma2 * (t - tn))  # c^2 / (2 std^2)


def test_latent_kl_is_velocity_mse_times_a_vanishing_weight():
    a, N = 0.8, 25
    grid = timesteps(N, 3.0, F64)
    x_t = rand(N, 2, 4, 4, seed=14)
    v, v_ref = rand(N, 2, 4, 4, seed=15), rand(N, 2, 4, 4, seed=16)
    t, tn = grid[:-1], grid[1:]  # one sample per step of the schedule
    pol, ref = sde_step(x_t, v, t, tn, a), sde_step(x_t, v_ref, t, tn, a)
    w = torch.tensor([kl_weight(t[k].item(), tn[k].item(), a) for k in range(N)], dtype=F64)
    torch.testing.assert_close(latent_kl(pol.mean, ref.mean, pol.std, "none"),
                               w * velocity_mse(v, v_ref, "none"), rtol=1e-9, atol=0)
    # closed form for t < 1: w = (1 + a^2/2)^2 (-dt)(1 - t) / (2 a^2 t)
    closed = (1 + a**2 / 2) ** 2 * (t - tn) * (1 - t) / (2 * a**2 * t)
    torch.testing.assert_close(w[1:], closed[1:], rtol=1e-12, atol=0)
    # the trend: the weight grows monotonically from high to low noise, so the window steps
    # (paper: steps 0..4 of 25) get a KL ~1000x weaker than the last steps (1.5e-4 ... 1.2)
    assert (w[1:] > w[:-1]).all()
    assert w[:5].max() < 0.01 * w[-1] and w[0] < 1e-3
    # scalar-t "mean" reduction: one weight for the whole batch
    k = 3
    p, r = sde_step(x_t, v, t[k], tn[k], a), sde_step(x_t, v_ref, t[k], tn[k], a)
    assert latent_kl(p.mean, r.mean, p.std).item() == pytest.approx(
        w[k].item() * velocity_mse(v, v_ref).item(), rel=1e-9)


def test_latent_kl_gradients():
    mean, mean_ref = rand(2, 3, seed=17).requires_grad_(), rand(2, 3, seed=18).requires_grad_()
    latent_kl(mean, mean_ref, torch.tensor([0.5, 1.0], dtype=F64)).backward()
    assert mean.grad is not None and mean_ref.grad is None
