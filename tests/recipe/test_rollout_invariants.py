"""Rollout invariants: zero noise == the ODE sampler, window bookkeeping, chunking/sharding-free
randomness."""

import torch
from conftest import tiny_overrides

from unigrpo import rollout as R
from unigrpo.algo.schedule import timesteps
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.sampling import ode_sample

PROMPTS = ["a red circle", "two blue squares above a green triangle"]


def setup(ckpt, tmp_path, *extra):
    cfg = load_config(None, tiny_overrides(ckpt, tmp_path, *extra))
    model = build_model(cfg)
    tokens = R.sample_reasoning(model, PROMPTS, cfg.algo.group_size, [5, 6], thinking=True,
                                max_new_tokens=cfg.text.max_reasoning_tokens, temperature=1.0, top_p=1.0)
    return cfg, model, tokens


def images(cfg, model, tokens, seeds, starts, **kw):
    s = cfg.sampler
    args = {"num_steps": s.num_steps, "shift": s.shift, "kind": s.kind, "noise_level": s.noise_level,
            "window_size": s.window_size, "cfg_scale": s.cfg_scale, "temperature": 1.0, "reduction": "mean"}
    return R.sample_images(model, tokens, seeds, starts, **{**args, **kw})


def test_zero_noise_rollout_equals_ode_sample(tiny_checkpoint, tmp_path):
    for cfg_scale in (1.0, 2.5):
        cfg, model, tokens = setup(tiny_checkpoint, tmp_path, f"sampler.cfg_scale={cfg_scale}")
        n = len(tokens)
        seeds, starts = list(range(n)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        roll = images(cfg, model, tokens, seeds, starts, noise_level=0.0)
        with torch.no_grad():
            _, ctx = model.forward_context(tokens)
            x_init = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(s))
                                  for s in seeds])
            x0 = ode_sample(model, ctx, cfg.sampler.num_steps, cfg.sampler.shift, cfg_scale=cfg_scale, x_init=x_init)
        assert torch.equal(roll.images, model.decode(x0))  # bitwise


def test_window_records_consecutive_steps(tiny_checkpoint, tmp_path):
    cfg, model, tokens = setup(tiny_checkpoint, tmp_path)
    n, w = len(tokens), cfg.sampler.window_size
    starts = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    roll = images(cfg, model, tokens, list(range(n)), starts)
    grid = timesteps(cfg.sampler.num_steps, cfg.sampler.shift)
    for i in range(n):
        ks = starts[i] + torch.arange(w)
        assert torch.equal(roll.t[i], grid[ks]) and torch.equal(roll.t_next[i], grid[ks + 1])
    assert torch.equal(roll.x_next[:, :-1], roll.x_t[:, 1:])  # the window is one unbroken chain
    assert torch.isfinite(roll.logp_img_old).all() and (roll.logp_img_old != 0).all()
    assert roll.images.shape == (n, 3, 16, 16) and len(roll.reasoning) == n


def test_shared_and_per_trajectory_windows():
    shared = R.window_starts([1, 2, 3], list(range(12)), 4, 10, 3, (0, 8), share=True)
    assert all(len(set(g.tolist())) == 1 for g in shared.view(3, 4))
    own = R.window_starts([1, 2, 3], list(range(12)), 4, 10, 3, (0, 8), share=False)
    assert any(len(set(g.tolist())) > 1 for g in own.view(3, 4))
    assert ((own >= 0) & (own <= 5)).all()


def test_trajectories_do_not_depend_on_chunking(tiny_checkpoint, tmp_path):
    """Per-trajectory generators: the same seeds give the same noise and windows in any chunk, so
    only batch-size-dependent float rounding can differ (rollout is exact for a fixed chunking)."""
    cfg, model, tokens = setup(tiny_checkpoint, tmp_path)
    n = len(tokens)
    seeds, starts = [7 * i for i in range(n)], torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    whole = images(cfg, model, tokens, seeds, starts)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    parts = [images(cfg, model, tokens.index(idx), [seeds[i] for i in idx.tolist()], starts[idx])
             for idx in perm.split(3)]
    chunked = R.Round.cat(parts, model.pad_id).index(torch.argsort(perm))
    assert torch.equal(chunked.tokens.ids, whole.tokens.ids)
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=1e-4)
    torch.testing.assert_close(chunked.x_next, whole.x_next, rtol=1e-4, atol=1e-4)
    again = images(cfg, model, tokens, seeds, starts)
    assert torch.equal(again.x_next, whole.x_next)  # deterministic for a fixed chunking


def test_reasoning_depends_only_on_the_group_seed(tiny_checkpoint, tmp_path):
    """The per-group promise (``text.batch_groups: false``; the default's promise is tested in
    test_conformance.py: a group's tokens do not depend on the groups decoded beside it)."""
    _, model, _ = setup(tiny_checkpoint, tmp_path)
    kw = {"thinking": True, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "batch_groups": False}
    both = R.sample_reasoning(model, PROMPTS, 4, [5, 6], **kw)
    second = R.sample_reasoning(model, PROMPTS[1:], 4, [6], **kw)
    width = second.ids.shape[1]
    assert torch.equal(both.ids[4:, :width], second.ids) and not both.response_mask[4:, width:].any()
    assert not torch.equal(both.ids[:4], R.sample_reasoning(model, PROMPTS[:1], 4, [9], **kw).ids)


def test_shared_initial_noise_branches_only_at_the_window(tiny_checkpoint, tmp_path):
    cfg, model, tokens = setup(tiny_checkpoint, tmp_path)
    one = tokens.index(torch.zeros(4, dtype=torch.long))  # the same reasoning in 4 rows
    starts = torch.full((4,), 1)
    noise = [11, 12, 13, 14]
    shared = images(cfg, model, one, noise, starts, init_seeds=[7] * 4)
    # same start noise and context: the state entering the window is identical, the window noise is not
    assert all(torch.equal(shared.x_t[0, 0], shared.x_t[i, 0]) for i in range(4))
    assert not torch.equal(shared.x_next[0, 0], shared.x_next[1, 0])
    # the start noise is seed 7's draw (a 1-row chunk whose own seed is 7 starts from the same draw;
    # close, not bitwise: CPU kernels differ with the batch size), and without init_seeds every row
    # starts from its own noise, as before the option existed
    by_itself = images(cfg, model, one.index(torch.zeros(1, dtype=torch.long)), [7], starts[:1])
    torch.testing.assert_close(by_itself.x_t[0, 0], shared.x_t[0, 0], rtol=1e-4, atol=1e-5)
    own = images(cfg, model, one, noise, starts)
    assert not torch.equal(own.x_t[0, 0], own.x_t[1, 0])
