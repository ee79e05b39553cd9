"""``model.kind: bagel`` in multi-round episodes (``algo.rounds`` > 1) on the tiny folder with the ViT
path: a later round's context holds the image the row drew, as Bagel's VAE and ViT blocks, after
that round's reasoning and before the reflection turn (``bagel_edit.image_anchors``); round 2 redraws
as an image-to-image edit of it. References: Bagel's own incremental cache updates (text, then per
image the VAE block through the gen expert and the ViT block, then text; ``incremental``) for the
context; the decode loop's own log-probs for the reflection's; the CLI for the first ratio."""

import json
import math
import zlib

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("peft")
from conftest import (
    BAGEL_PROMPTS,
    bagel_incremental,
    bagel_overrides,
    tiny_bagel_dir,
    tiny_bagel_edit_dir,
)

from unigrpo import rollout as R
from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.bagel import BagelModel
from unigrpo.models.bagel_edit import image_anchors
from unigrpo.models.decode import sample
from unigrpo.tasks import Prompt
from unigrpo.utils.dist import Dist

SIDE = 32  # the tiny folder's resolution = the ViT's full input


def some_say_done(self, response: str) -> bool:
    """A random model never writes the stop word: about half of its reflections stop instead (by their text)."""
    return zlib.crc32(response.encode()) % 2 == 0


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, bagel_overrides(tiny_bagel_edit_dir(), 4, 4))
    torch.manual_seed(0)
    m = build_model(cfg, checkpoint=None).eval()
    with torch.no_grad():  # LoRA B = 0 at the start: move every trainable tensor, so both experts matter
        for _, p in m.parameter_groups()["text"] + m.parameter_groups()["image"]:
            p.add_(0.05 * torch.randn_like(p))
    return m


def episode(model, prompts, rounds=2, group=2, max_new_tokens=5):
    """One step's episodes of ``prompts`` x ``group``, every row in one chunk (fixed seeds)."""
    n = len(prompts) * group
    zero = torch.zeros(n, dtype=torch.long)
    later = [R.RoundSeeds([100 * r + i for i in range(n)], [1000 * r + i for i in range(n)], zero)
             for r in range(1, rounds)]
    seeds = R.EpisodeSeeds(list(range(len(prompts))), [10 + i for i in range(n)], zero, None, later)
    text = {"thinking": True, "max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "batch_groups": True}
    sampler = {"num_steps": 3, "shift": 3.0, "kind": "flow_sde", "noise_level": 0.8, "window_size": 2,
               "cfg_scale": 1.0, "temperature": 1.0, "reduction": "mean"}
    return R.sample_episode(model, prompts, group, seeds, [torch.arange(n)], Dist(), text=text, sampler=sampler)


def test_the_second_round_reads_the_drawn_image_after_the_reasoning(model):
    """Round 2's tokens: round 1's + ONE masked column of ``drawn_image_id`` + the reflection turn
    (Bagel's segment around ``reflection_prompt`` + the decode start) + the reflection; the image
    drawn is appended to the row's images and anchored at that column (after the prompt's own)."""
    prompts = [Prompt(BAGEL_PROMPTS[0], images=torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))),
               Prompt(BAGEL_PROMPTS[1])]
    r0, r1 = episode(model, prompts).rounds
    turn = model.reflection_ids()
    assert turn == model._segment(model.reflection_prompt) + [model.ids["start"]]
    w = r0.tokens.ids.shape[1]
    t = r1.tokens
    assert t.ids.shape[1] == w + 1 + len(turn) + 5
    assert torch.equal(t.ids[:, :w], r0.tokens.ids) and torch.equal(t.mask[:, :w], r0.tokens.mask)
    assert (t.ids[:, w] == model.drawn_image_id).all() and not t.mask[:, w].any()  # the mark: not a token
    assert (t.ids[:, w + 1:w + 1 + len(turn)] == torch.tensor(turn)).all() and t.mask[:, w + 1:w + 1 + len(turn)].all()
    assert not t.response_mask[:, :w + 1 + len(turn)].any() and t.response_mask.any(1).all()
    assert t.image_mask.sum(1).tolist() == [2, 2, 1, 1]  # the prompt's image (rows 0, 1) + the drawn one
    last = t.image_mask.sum(1) - 1
    assert torch.equal(t.images[torch.arange(4), last].cpu(), r0.images)
    s = len(model._segment(model.system_prompt))
    anchors = image_anchors(model, t)
    real_before = r0.tokens.mask.sum(1)  # every real token of round 1 precedes the drawn image
    assert anchors[:2].tolist() == [[s, int(real_before[0])], [s, int(real_before[1])]]
    assert anchors[2:, 0].tolist() == real_before[2:].tolist()


def test_the_second_round_equals_bagels_incremental_cache_updates(model):
    """Rows with and without a prompt image batched together: round 2's reflection log-probs and a
    velocity on its context == Bagel's incremental updates of that row alone, in the interleaved order
    ``[sys] [prompt image] prompt reasoning [drawn image] turn reflection`` -- the drawn image after the
    reasoning (moving it before the prompt, as a prompt's image, changes both: checked)."""
    prompts = [Prompt(BAGEL_PROMPTS[2], images=torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))),
               Prompt(BAGEL_PROMPTS[0])]
    r0, r1 = episode(model, prompts, group=1).rounds
    t = r1.tokens
    s = len(model._segment(model.system_prompt))
    x, tt = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3)), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        logp, ctx = model.forward_context(t)
        v = model.velocity(x, tt, ctx)
        w = r0.tokens.ids.shape[1]
        for i in range(2):
            before = [int(a) for a, keep in zip(t.ids[i, :w], t.mask[i, :w]) if keep]
            after = [int(a) for a, keep in zip(t.ids[i, w:], t.mask[i, w:]) if keep]
            own = [("image", img) for img in (prompts[i].images if prompts[i].images is not None else [])]
            drawn = ("image", r0.images[i])
            ref_lp, ref_ctx = bagel_incremental(model, [("text", before[:s]), *own, ("text", before[s:]), drawn,
                                                  ("text", after)])
            resp = t.response_mask[i, w:][t.mask[i, w:]][1:]
            got = logp[i, w:][t.mask[i, w:]][1:]
            assert resp.any()
            torch.testing.assert_close(got[resp], ref_lp[0][resp], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[i:i + 1], model.velocity(x[i:i + 1], tt[i:i + 1], ref_ctx), atol=1e-5, rtol=1e-5)
            assert int(ctx.next_pos[i]) == int(ref_ctx.next_pos[0])
            early, _ = bagel_incremental(model, [("text", before[:s]), *own, drawn, ("text", before[s:]), ("text", after)])
            assert (early[0][resp] - ref_lp[0][resp]).abs().max() > 1e-4  # the place of the image matters


def test_the_reflection_is_scored_as_it_was_sampled(model):
    """The decode loop's own log-probs of round 2's reflection (prefill over the context with its
    masked column and both images, then cached steps) == the teacher-forced pass ``sample_images``
    records: the first ratio of the reflection's tokens is 1."""
    prompts = [Prompt(BAGEL_PROMPTS[1], images=torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(4))),
               Prompt(BAGEL_PROMPTS[2])]
    r0, r1 = episode(model, prompts, max_new_tokens=6).rounds
    w = r0.tokens.ids.shape[1] + 1 + len(model.reflection_ids())
    ctx = r1.tokens.index(torch.arange(4))
    ctx = type(ctx)(ctx.ids[:, :w], ctx.mask[:, :w], ctx.response_mask[:, :w], ctx.images, ctx.image_mask)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]  # the episode's round-2 seeds
    tokens, lp_decode = sample(model, ctx, max_new_tokens=6, generator=gens, return_logprobs=True)
    tokens = tokens.padded(r1.tokens.ids.shape[1], model.pad_id)
    assert torch.equal(tokens.ids, r1.tokens.ids)  # the rollout's reflection, re-sampled
    m = r1.tokens.response_mask
    assert m.any()
    torch.testing.assert_close(r1.logp_old[:, :lp_decode.shape[1]][m[:, :lp_decode.shape[1]]],
                               lp_decode[m[:, :lp_decode.shape[1]]], atol=1e-5, rtol=1e-5)
    again, _ = model.forward_context(r1.tokens)
    assert torch.equal(again, r1.logp_old)  # what training recomputes: bitwise


def test_a_bagel_without_its_vit_has_no_reflection_turn():
    cfg = load_config(None, bagel_overrides(tiny_bagel_dir(), 4, 4))
    blind = build_model(cfg, checkpoint=None)
    with pytest.raises(NotImplementedError, match="cannot see the image it drew"):
        blind.reflection_ids()


@pytest.mark.parametrize("credit", ["terminal", "per_round"])
def test_cli_two_rounds_ratio_exactly_one_in_every_round(tmp_path, monkeypatch, credit):
    """Done-when: ``unigrpo train builtin:bagel_rounds_unigrpo algo.rounds=2`` on the tiny folder, some
    rows stopping after their reflection (the others redraw as an edit of their first image): the
    first update's log-probs equal the rollout's, text and image, in both rounds; the
    ``shapes_refine`` evaluation runs the 2-round episodes on Bagel."""
    monkeypatch.setattr(BagelModel, "says_done", some_say_done)
    out = tmp_path / "run"
    tiny = [*bagel_overrides(tiny_bagel_edit_dir(), 4, 4), "threads=1", "model.vit_max_size=null",
            "text.max_reasoning_tokens=4", "sampler.eval_num_steps=1"]
    args = ["builtin:bagel_rounds_unigrpo", *tiny, "task.kind=shapes_refine", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=4", "algo.micro_batch_trajectories=2", "sampler.num_steps=3",
            "sampler.window_range=[0,2]", "sampler.window_size=2", "eval.num_prompts=2", "eval.grid_prompts=2",
            f"algo.credit={credit}", "optim.lr_text=1e-2", "optim.lr_image=1e-2", "steps=1", "eval_every=1",
            f"output_dir={out}"]
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward/mean" in r)
    assert step["loss/text/first_logp_diff_max"] == 0.0 and step["loss/image/first_logp_diff_max"] == 0.0
    assert step["rollout/round1/live_frac"] == 1.0
    assert all(math.isfinite(v) for v in step.values() if isinstance(v, float))
    assert 0 < step["rollout/round1/done_frac"] < 1  # both kinds of rows: some stopped, some redrew
    ev = next(r for r in rows if "eval/round1/accuracy" in r)  # the shapes_refine evaluation, round by round
    assert ev["eval/accuracy"] == ev["eval/round1/accuracy"]
