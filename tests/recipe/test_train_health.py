"""Health invariants of the training loop: exact ratio 1 on the first update, micro-batch
accumulation == full batch, frozen experts stay frozen, non-finite updates are skipped."""

import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from unigrpo import rollout as R
from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.recipes import train as T
from unigrpo.recipes.batches import ppo_order
from unigrpo.recipes.optim import build_optimizer
from unigrpo.tasks import build_task


def make_rollout(cfg, model, n_prompts: int = 2, step: int = 0):
    """The recipe's rollout for one step, chunked like the first epoch's micro-batches."""
    a, s = cfg.algo, cfg.sampler
    tasks = build_task(cfg).train_prompts(step, cfg.algo.prompts_per_step)[:n_prompts]
    tokens = R.sample_reasoning(model, [t.text for t in tasks], a.group_size, [11 + i for i in range(n_prompts)],
                                thinking=True, max_new_tokens=cfg.text.max_reasoning_tokens,
                                temperature=cfg.text.temperature, top_p=cfg.text.top_p)
    n = len(tokens)
    starts = R.window_starts(list(range(n_prompts)), list(range(n)), a.group_size, s.num_steps, s.window_size,
                             s.window_range, a.share_window_in_group)
    parts = [R.sample_images(model, tokens.index(idx), [100 + i for i in idx.tolist()], starts[idx],
                             num_steps=s.num_steps, shift=s.shift, kind=s.kind, noise_level=s.noise_level,
                             window_size=s.window_size, cfg_scale=s.cfg_scale, temperature=cfg.text.temperature,
                             reduction=a.logprob_reduction)
             for idx in torch.arange(n).split(a.micro_batch_trajectories)]
    return R.Episode([R.Round.cat(parts, model.pad_id)])


@pytest.mark.parametrize("extra", [[], ["sampler.cfg_scale=2.0", "algo.ratio_norm=false", "sampler.kind=cps", "algo.share_window_in_group=false"]])
def test_ratio_is_exactly_one_on_the_first_micro_batches(tiny_checkpoint, tmp_path, extra):
    """Bitwise: training re-runs the rollout's exact chunks (same rows, order, padded width). This
    tiny model's CPU numerics DO depend on the batch composition (2 threads: text ~5e-7; 1 thread:
    image expert at batch 8 vs 16), so only an identical computation gives ratio == 1 exactly."""
    cfg = load_config(None, tiny_overrides(tiny_checkpoint, tmp_path, *extra))
    model = build_model(cfg)
    ref = model.reference()
    build_optimizer(model, cfg)
    roll = make_rollout(cfg, model)
    adv = torch.linspace(-1, 1, len(roll))
    for idx in torch.arange(len(roll)).split(cfg.algo.micro_batch_trajectories):
        _, st = T.micro_batch_loss(model, ref, roll.index(idx), adv[idx], cfg, 1.0, 1.0)
        for kind in ("text", "image"):
            assert st[f"loss/{kind}/ratio_min"] == 1.0 and st[f"loss/{kind}/ratio_max"] == 1.0
            assert st[f"loss/{kind}/logp_diff_max"] == 0.0
        # policy == reference, but not bitwise: the frozen copy (requires_grad=False) gets other CPU
        # conv kernels than the trainable policy even under no_grad (measured |dv| ~5e-7, MSE ~1e-14)
        assert 0.0 <= st["loss/image/mse"] < 1e-11 and 0.0 <= st["loss/image/kl"] < 1e-9
        assert st["loss/text/num_tokens"] > 0


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_micro_batch_accumulation_equals_full_batch(tiny_checkpoint, tmp_path, aggregation):
    cfg = load_config(None, tiny_overrides(tiny_checkpoint, tmp_path, f"algo.text_aggregation={aggregation}",
                                           "algo.detach_context=false", "algo.beta_img=0.5", "algo.text_beta=0.1"))
    model = build_model(cfg)
    ref = model.reference()
    with torch.no_grad():  # move the policy away from the reference so every term has a gradient
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    build_optimizer(model, cfg)
    roll = make_rollout(cfg, model)
    adv = torch.linspace(-1, 1, len(roll))
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro: int) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        chunks = torch.arange(len(roll)).split(micro)
        total_tokens = float(roll.reasoning_tokens().sum())
        for idx in chunks:
            mb = roll.index(idx)
            w_img = len(idx) / len(roll)
            w_text = float(mb.reasoning_tokens().sum()) / total_tokens if aggregation == "token_mean" else w_img
            loss, _ = T.micro_batch_loss(model, ref, mb, adv[idx], cfg, w_text, w_img)
            loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    full, accumulated = grads(len(roll)), grads(2)
    scale = max(float(g.abs().max()) for g in full)
    assert scale > 0
    for g_full, g_acc in zip(full, accumulated):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("frozen", ["text", "image"])
def test_frozen_expert_is_unchanged(tiny_checkpoint, tmp_path, frozen):
    other = "image" if frozen == "text" else "text"
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, f"algo.train_{frozen}=false", "steps=1",
                                          "eval_every=100")]) == 0
    before, after = load_file(tiny_checkpoint), load_file(tmp_path / "final.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen + "."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(other + "."))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert not any(k.startswith(f"loss/{frozen}/") for k in row)  # its loss is not even computed


def test_image_params_trains_only_the_selected_image_parameters(tiny_checkpoint, tmp_path):
    # attention only (Flow-GRPO trains LoRA on attention projections): convolutions stay frozen
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, "algo.train_text=false", "steps=1",
                                          "eval_every=100", r"optim.image_params=\.(a0|ma)\.")]) == 0
    before, after = load_file(tiny_checkpoint), load_file(tmp_path / "final.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("image.a0.", "image.ma.")) for k in changed)
    assert any(k.startswith("image.ma.") for k in changed)


def test_image_params_matching_nothing_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, "steps=1", "optim.image_params=nope")]) == 2
    assert "optim.image_params" in capsys.readouterr().err


def test_non_finite_loss_skips_the_update(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    real = T.micro_batch_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(T, "micro_batch_loss", poisoned)
    assert main(["train", *tiny_overrides(tiny_checkpoint, tmp_path, "steps=1", "eval_every=100")]) == 0
    before, after = load_file(tiny_checkpoint), load_file(tmp_path / "final.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["perf/skipped_updates"] == row["perf/updates"] == 4 and row["perf/skipped_total"] == 4
    out = capsys.readouterr().out
    assert "skipped an update" in out and "'image': " in out and "'text': " in out  # names the parameters
    assert not torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer"]["state"]  # Adam untouched


def test_minibatches_are_the_same_sets_for_any_number_of_ranks():
    """Every global minibatch holds T / P trajectories of every group, and is the same set of
    trajectories for 1 or 2 ranks (rank r owning prompts [r P/2, (r+1) P/2))."""
    cfg = load_config(None, ["algo.prompts_per_step=4", "algo.group_size=4", "algo.trajectories_per_minibatch=8",
                             "algo.micro_batch_trajectories=8"])
    one = ppo_order(cfg, step=3, epoch=1, p0=0, n_prompts=4, minibatch=8).view(2, 8)
    ranks = [ppo_order(cfg, step=3, epoch=1, p0=2 * r, n_prompts=2, minibatch=4).view(2, 4) + 8 * r
             for r in range(2)]
    for m in range(2):
        assert torch.equal(one[m], torch.cat([ranks[0][m], ranks[1][m]]))  # same rows, same order
        assert torch.bincount(one[m] // 4, minlength=4).tolist() == [2, 2, 2, 2]  # 2 of every group
    assert sorted(one.flatten().tolist()) == list(range(16))
    assert not torch.equal(one, ppo_order(cfg, step=3, epoch=2, p0=0, n_prompts=4, minibatch=8).view(2, 8))
    # fewer trajectories per minibatch than prompts: still a permutation, groups in turn
    small = ppo_order(cfg, step=0, epoch=0, p0=0, n_prompts=4, minibatch=2)
    assert sorted(small.tolist()) == list(range(16)) and (small[:4] // 4).tolist() == [0, 1, 2, 3]


def test_losses_sum_over_the_rounds_of_an_episode(tiny_checkpoint, tmp_path):
    """An episode is a list of rounds: two copies of one round give twice its loss and gradient
    (the statistics are the rounds' mean, min and max: here those of the one round)."""
    cfg = load_config(None, tiny_overrides(tiny_checkpoint, tmp_path))
    model = build_model(cfg)
    ref = model.reference()
    build_optimizer(model, cfg)
    one = make_rollout(cfg, model).index(torch.arange(4))
    adv = torch.linspace(-1, 1, 4)

    def loss_and_grads(episode):
        model.zero_grad(set_to_none=True)
        loss, stats = T.micro_batch_loss(model, ref, episode, adv, cfg, 1.0, 1.0)
        loss.backward()
        return loss, stats, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss1, stats1, grads1 = loss_and_grads(one)
    loss2, stats2, grads2 = loss_and_grads(R.Episode(one.rounds * 2))
    assert loss1 != 0 and torch.allclose(loss2, 2 * loss1)
    assert all(torch.allclose(g2, 2 * g1, rtol=1e-5, atol=1e-8) for g1, g2 in zip(grads1, grads2))
    assert stats2.keys() == stats1.keys()
    assert all(abs(float(stats2[k]) - float(stats1[k])) < 1e-6 for k in stats1)
    assert torch.equal(R.Episode(one.rounds * 2).reasoning_tokens(), 2 * one.reasoning_tokens())
