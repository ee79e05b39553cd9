"""DiffusionNFT image objective (unigrpo.algo.nft): the loss against a hand-computed case, its
gradient (closed form, direction), the optimality mapping r and its edge cases, the config keys."""

import pytest
import torch

from unigrpo.algo.advantages import group_advantages
from unigrpo.algo.nft import forward_noise, implicit_velocities, nft_loss, optimality
from unigrpo.config import ConfigError, load_config

F64 = torch.float64


def t64(*rows):
    return torch.tensor(rows, dtype=F64)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- the loss, by hand
def test_hand_computed_loss():
    """One sample of 2 latent elements, every intermediate written out in scalars."""
    x0, eps, t = t64([1.0, -1.0]), t64([0.5, 0.5]), t64(0.5)
    x_t = forward_noise(x0, eps, t)  # (1 - t) x0 + t eps = [0.75, -0.25]
    torch.testing.assert_close(x_t, t64([0.75, -0.25]))
    v_old, v = t64([0.2, 0.4]), t64([0.4, 0.0]).requires_grad_()
    beta, r, c = 0.5, t64(0.75), 5.0
    # v+ = 0.5 v + 0.5 v_old = [0.3, 0.2];  v- = 1.5 v_old - 0.5 v = [0.1, 0.6]
    v_pos, v_neg = implicit_velocities(v, v_old, beta)
    torch.testing.assert_close(v_pos, t64([0.3, 0.2]))
    torch.testing.assert_close(v_neg, t64([0.1, 0.6]))
    # x0+ = x_t - t v+ = [0.6, -0.35]: error [-0.4, 0.65], mean square 0.29125, weight mean |.| 0.525
    # x0- = x_t - t v- = [0.7, -0.55]: error [-0.3, 0.45], mean square 0.14625, weight 0.375
    pos, neg = 0.75 * 0.29125 / 0.525, 0.25 * 0.14625 / 0.375
    expected = c * (pos + neg) / beta  # = 5.135714...
    loss, stats = nft_loss(v[None], v_old[None], x0[None], x_t[None], t[None], r[None], beta, c)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(5.1357142857142857, rel=1e-12)
    assert stats["pos_loss"].item() == pytest.approx(pos) and stats["neg_loss"].item() == pytest.approx(neg)
    assert stats["old_deviation"].item() == pytest.approx((0.2**2 + 0.4**2) / 2)
    assert stats["v_old_diff_max"].item() == pytest.approx(0.4) and stats["r_mean"].item() == 0.75
    # gradient by hand: dl/dv = 2 t C / D [ -r (x0+ - x0) / w+ + (1 - r) (x0- - x0) / w- ]  (D = 2)
    loss.backward()
    grad = [2 * 0.5 * c / 2 * (-0.75 * ep / 0.525 + 0.25 * en / 0.375) for ep, en in ((-0.4, -0.3), (0.65, 0.45))]
    torch.testing.assert_close(v.grad, t64(grad), rtol=1e-12, atol=1e-14)


def test_batch_loss_is_the_mean_of_per_sample_losses():
    b, shape = 4, (3, 2, 2)
    x0, eps, v, v_old = (rand(b, *shape, seed=s) for s in range(4))
    t, r = t64(0.9, 0.5, 0.3, 1.0), t64(0.0, 0.25, 0.5, 1.0)
    x_t = forward_noise(x0, eps, t)
    whole, _ = nft_loss(v, v_old, x0, x_t, t, r, 0.3, 2.0)
    each = [nft_loss(v[i:i + 1], v_old[i:i + 1], x0[i:i + 1], x_t[i:i + 1], t[i:i + 1], r[i:i + 1], 0.3, 2.0)[0]
            for i in range(b)]
    assert whole.item() == pytest.approx(sum(x.item() for x in each) / b, rel=1e-12)


def test_weights_have_no_gradient_and_the_floor_keeps_a_perfect_prediction_finite():
    x0 = rand(1, 4)
    t = t64(0.5)
    x_t = forward_noise(x0, rand(1, 4, seed=1), t)
    v = ((x_t - x0) / 0.5).clone().requires_grad_()  # x0 predicted exactly: error 0, weight floored at 1e-5
    loss, _ = nft_loss(v, v.detach(), x0, x_t, t, t64(1.0), 1.0, 5.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(v.grad, torch.zeros_like(v))


# ---------------------------------------------------------------- the gradient at the old policy
@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_gradient_at_the_old_policy_is_the_closed_form_and_does_not_depend_on_beta(beta):
    """At v = v_old: dl/dv = 2 t C (1 - 2 r) (x0_old - x0) / (D w), w = mean |x0_old - x0|."""
    b, d = 3, 8
    x0, eps, v_old = rand(b, d), rand(b, d, seed=1), rand(b, d, seed=2)
    t, r, c = t64(0.8, 0.4, 0.6), t64(0.9, 0.2, 0.5), 5.0
    x_t = forward_noise(x0, eps, t)
    v = v_old.clone().requires_grad_()
    loss, stats = nft_loss(v, v_old, x0, x_t, t, r, beta, c)
    loss.backward()
    x0_old = x_t - t[:, None] * v_old
    w = (x0_old - x0).abs().mean(dim=1, keepdim=True)
    expected = 2 * t[:, None] * c * (1 - 2 * r[:, None]) * (x0_old - x0) / (d * w) / b  # / b: mean over samples
    torch.testing.assert_close(v.grad, expected, rtol=1e-10, atol=1e-13)
    assert stats["v_old_diff_max"].item() == 0.0  # the implicit policies ARE the old one
    # r = 1/2: no gradient (exactly 0 for beta = 1, where v+ and v- are v itself; else up to rounding)
    torch.testing.assert_close(v.grad[2], torch.zeros(d, dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("r, toward", [(1.0, True), (0.8, True), (0.2, False), (0.0, False)])
def test_a_higher_reward_pulls_the_prediction_toward_its_sample_a_lower_one_pushes_it_away(r, toward):
    """Gradient descent on v from the old policy moves the clean-latent prediction x_t - t v toward
    the trajectory's x0 when r > 1/2 and away from it when r < 1/2; repeated steps keep doing so."""
    x0, eps, v_old = rand(1, 16), rand(1, 16, seed=1), rand(1, 16, seed=2)
    t = t64(0.7)
    x_t = forward_noise(x0, eps, t)
    v = v_old.clone().requires_grad_()
    dist0 = (x_t - t * v_old - x0).norm().item()
    dists = []
    for _ in range(3):
        loss, _ = nft_loss(v, v_old, x0, x_t, t, t64(r), 1.0, 5.0)
        (g,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            v -= 1e-3 * g
        dists.append((x_t - t * v - x0).norm().item())
    assert all((d < dist0) == toward for d in dists)
    assert (dists[-1] < dists[0]) == toward
    # and the velocity moves toward (pulled) or away from (pushed) the sample's own velocity eps - x0
    target = (eps - x0)[0]
    assert ((v.detach() - v_old)[0] @ (target - v_old[0]) > 0) == toward


# ---------------------------------------------------------------- r: the optimality probability
def test_optimality_maps_the_clipped_advantage_linearly_onto_0_1():
    adv = t64(-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0)
    torch.testing.assert_close(optimality(adv, 5.0), t64(0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0))
    torch.testing.assert_close(optimality(t64(1.0, -1.0), 2.0), t64(0.75, 0.25))
    with pytest.raises(ValueError, match="clip"):
        optimality(adv, 0.0)


def test_a_group_of_equal_rewards_gets_r_one_half_and_no_gradient():
    """All-equal group rewards: advantage exactly 0, r exactly 1/2, and (model == old policy) no
    gradient at all; the other group, with a spread, gets r on both sides of 1/2."""
    adv = group_advantages(t64([0.3, 0.3, 0.3, 0.3], [0.0, 1.0, 0.0, 1.0]), "group", 1e-4, 5.0).flatten()
    r = optimality(adv, 5.0)
    assert torch.equal(r[:4], torch.full((4,), 0.5, dtype=F64))
    assert (r[4:] != 0.5).all() and r[4:].min() < 0.5 < r[4:].max()
    x0, eps, v_old = rand(8, 6), rand(8, 6, seed=1), rand(8, 6, seed=2)
    t = torch.full((8,), 0.6, dtype=F64)
    v = v_old.clone().requires_grad_()
    loss, _ = nft_loss(v, v_old, x0, forward_noise(x0, eps, t), t, r, 1.0, 5.0)
    loss.backward()
    assert torch.equal(v.grad[:4], torch.zeros(4, 6, dtype=F64)) and (v.grad[4:].abs().sum(1) > 0).all()


def test_beta_one_makes_the_positive_policy_the_model_and_the_negative_its_mirror():
    v, v_old = rand(2, 3), rand(2, 3, seed=1)
    v_pos, v_neg = implicit_velocities(v, v_old, 1.0)
    assert torch.equal(v_pos, v)
    torch.testing.assert_close(v_neg, 2 * v_old - v)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v_old, v, v, t64(0.5, 0.5), t64(0.5, 0.5), 0.0)


def test_forward_noise_ends():
    x0, eps = rand(2, 3), rand(2, 3, seed=1)
    x_t = forward_noise(x0, eps, t64(0.0, 1.0))  # row 0 at t = 0 (data), row 1 at t = 1 (noise)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], eps[1])


# ---------------------------------------------------------------- the config keys
def test_config_keys_and_their_one_line_errors():
    cfg = load_config(None, ["algo.image_objective=nft"])
    assert (cfg.algo.nft_beta, cfg.algo.nft_adv_clip, cfg.algo.nft_timestep_fraction) == (1.0, 5.0, 0.99)
    assert load_config(None).algo.image_objective == "flowgrpo"
    # NFT needs no log-probs: a deterministic sampler is valid for it (not for FlowGRPO)
    load_config(None, ["algo.image_objective=nft", "sampler.kind=ode"])
    load_config(None, ["algo.image_objective=nft", "sampler.noise_level=0"])
    with pytest.raises(ConfigError, match="sampler.kind"):
        load_config(None, ["sampler.kind=ode"])
    cases = [("algo.image_objective=ppo", "algo.image_objective"), ("algo.nft_beta=0", "algo.nft_beta"),
             ("algo.nft_adv_clip=-1", "algo.nft_adv_clip"), ("algo.nft_timestep_fraction=0", "algo.nft_timestep_fraction"),
             ("algo.nft_timestep_fraction=1.5", "algo.nft_timestep_fraction")]
    for override, key in cases:
        with pytest.raises(ConfigError, match=key) as e:
            load_config(None, ["algo.image_objective=nft", override])
        assert "\n" not in str(e.value)
    multi = load_config(None, ["algo.image_objective=nft", "algo.rounds=2", "task.kind=shapes_refine",
                               "model.sees_images=true", "text.max_reasoning_tokens=20"])  # multi-round episodes too
    assert (multi.algo.image_objective, multi.algo.rounds) == ("nft", 2)
    with pytest.raises(ConfigError, match="algo.beta_img"):  # the latent KL needs a step with a variance
        load_config(None, ["algo.image_objective=nft", "sampler.kind=ode", "algo.beta_img=0.1"])
