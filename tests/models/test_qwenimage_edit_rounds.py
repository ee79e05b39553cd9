"""Qwen-Image-Edit (``model.kind: hf``, shared mode) in multi-round episodes (``algo.rounds`` > 1) on
the tiny pipeline folder: round 1 is drawn by the edit transformer (no reference for a text-only
prompt), round 2's reflection turn holds the drawn image's vision block (Qwen2.5-VL sees it after the
reasoning) and the transformer reads it as the row's last reference (round 2 edits it). References:
the decode loop's own log-probs for the reflection's; the CLI for the first ratio in every round."""

import json
import math
import os
import zlib

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import HF_PROMPTS, edit_overrides, tiny_qwenimage_edit_dir

from unigrpo import rollout as R
from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.decode import sample
from unigrpo.models.hf_qwenimage_edit import QwenImageEdit
from unigrpo.models.protocol import TokenBatch
from unigrpo.tasks import Prompt
from unigrpo.utils.dist import Dist

SIDE = 32  # model.resolution of the tiny overrides: a prompt's image shares the drawn image's size


def some_say_done(self, response: str) -> bool:
    """A random model never writes the stop word: about half of its reflections stop instead (by their text)."""
    return zlib.crc32(response.encode()) % 2 == 0


@pytest.fixture(scope="module")
def model():
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(None, edit_overrides(tiny_qwenimage_edit_dir()))
    torch.manual_seed(0)
    m = build_model(cfg, checkpoint=None).eval()
    with torch.no_grad():  # LoRA B = 0 at the start: move the adapters so both sides are the trained policy's
        for _, p in m.parameter_groups()["text"] + m.parameter_groups()["image"]:
            p.add_(0.05 * torch.randn_like(p))
    return m


def prompts():
    g = torch.Generator().manual_seed(5)
    return [Prompt(HF_PROMPTS[0], images=torch.randint(0, 256, (1, 3, SIDE, SIDE), generator=g) / 255.0),
            Prompt(HF_PROMPTS[1])]


def episode(model, group=2, max_new_tokens=5):
    """One step's 2-round episodes of ``prompts()`` x ``group``, every row in one chunk (fixed seeds)."""
    n = 2 * group
    zero = torch.zeros(n, dtype=torch.long)
    seeds = R.EpisodeSeeds([0, 1], [10 + i for i in range(n)], zero, None,
                           [R.RoundSeeds([100 + i for i in range(n)], [200 + i for i in range(n)], zero)])
    text = {"thinking": True, "max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "batch_groups": True}
    sampler = {"num_steps": 3, "shift": 3.0, "kind": "flow_sde", "noise_level": 0.8, "window_size": 2,
               "cfg_scale": 1.0, "temperature": 1.0, "reduction": "mean"}
    return R.sample_episode(model, prompts(), group, seeds, [torch.arange(n)], Dist(), text=text, sampler=sampler)


def test_the_reflection_turn_holds_the_drawn_images_vision_block(model):
    """Round 2's tokens: round 1's + the turn (a user turn with one vision block of the drawn image's
    token count, then the assistant turn opened) + the reflection; the drawn image is the row's last
    image, so the transformer reads it as its last reference."""
    r0, r1 = episode(model).rounds
    turn = model.reflection_ids()
    w, t = r0.tokens.ids.shape[1], r1.tokens
    assert t.ids.shape[1] == w + len(turn) + 5  # no masked mark: the vision block places the image
    assert (t.ids[:, w:w + len(turn)] == torch.tensor(turn)).all() and t.mask[:, w:w + len(turn)].all()
    n_pad = sum(i == model.image_id for i in turn)
    assert n_pad == model.encode_rows(["x"], [torch.zeros(1, 3, SIDE, SIDE)]).ids.eq(model.image_id).sum() > 0
    assert model.token_text(turn).endswith("<|im_start|>assistant\n") and model.reflection_prompt in model.token_text(turn)
    assert t.image_mask.sum(1).tolist() == [2, 2, 1, 1]  # the prompt's image (rows 0, 1) + the drawn one
    assert torch.equal(t.images[torch.arange(4), t.image_mask.sum(1) - 1].cpu(), r0.images)
    assert not t.response_mask[:, :w + len(turn)].any() and t.response_mask.any(1).all()
    with torch.no_grad():
        _, ctx = model.forward_context(t)
    assert ctx.n_refs.tolist() == [2, 2, 1, 1]


def test_plus_numbers_the_drawn_picture_on_from_the_rows_images():
    """Qwen-Image-Edit-Plus labels every image ``Picture i:`` as its template numbers a conversation's
    images: the drawn image of a row that came with one input image is Picture 2, of a text-only row
    Picture 1; the turns are one width, and training re-scores the round bitwise."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    plus = build_model(load_config(None, edit_overrides(tiny_qwenimage_edit_dir(plus=True), plus=True)),
                       checkpoint=None).eval()
    assert plus.picture_labels
    r0, r1 = episode(plus).rounds
    w, n = r0.tokens.ids.shape[1], len(plus.reflection_ids())
    turns = [plus.token_text(r1.tokens.ids[i, w:w + n].tolist()) for i in range(4)]
    assert ["Picture 2: <|vision_start|>" in x for x in turns] == [True, True, False, False]
    assert ["Picture 1: <|vision_start|>" in x for x in turns] == [False, False, True, True]
    assert len(plus.reflection_ids(2)) == n and plus.reflection_ids(2) != plus.reflection_ids(1)
    with torch.no_grad():
        again, _ = plus.forward_context(r1.tokens)
    assert torch.equal(again, r1.logp_old)


def test_the_reflection_is_scored_as_it_was_sampled(model):
    """The decode loop's own log-probs of round 2's reflection (prefill over both images' vision
    tokens and the holes of the padded round-1 reasoning, then cached steps with mrope offsets) ==
    the teacher-forced pass the rollout records; re-sampling gives the rollout's tokens."""
    r0, r1 = episode(model, max_new_tokens=6).rounds
    w = r0.tokens.ids.shape[1] + len(model.reflection_ids())
    t = r1.tokens
    ctx = TokenBatch(t.ids[:, :w], t.mask[:, :w], t.response_mask[:, :w], t.images, t.image_mask)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]  # the episode's round-2 seeds
    tokens, lp = sample(model, ctx, max_new_tokens=6, generator=gens, return_logprobs=True)
    assert torch.equal(tokens.padded(t.ids.shape[1], model.pad_id).ids, t.ids)
    m = t.response_mask[:, :lp.shape[1]]
    assert m.any()
    torch.testing.assert_close(r1.logp_old[:, :lp.shape[1]][m], lp[m], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        again, _ = model.forward_context(t)
    assert torch.equal(again, r1.logp_old)  # what training recomputes: bitwise


def test_the_drawn_image_reaches_the_reflection_and_the_redraw(model):
    """Another drawn image under the same tokens changes the reflection's log-probs (the encoder sees
    it) and the round-2 velocity (a reference latent)."""
    _, r1 = episode(model).rounds
    t = r1.tokens
    other = t.images.clone()
    last = t.image_mask.sum(1) - 1
    other[torch.arange(4), last] = 1 - other[torch.arange(4), last]
    swapped = TokenBatch(t.ids, t.mask, t.response_mask, other, t.image_mask)
    x, tt = torch.randn((4, *model.latent_shape), generator=torch.Generator().manual_seed(1)), torch.full((4,), 0.6)
    with torch.no_grad():
        (la, ca), (lb, cb) = model.forward_context(t), model.forward_context(swapped)
        m = t.response_mask
        assert (la[m] - lb[m]).abs().max() > 1e-4
        assert (model.velocity(x, tt, ca) - model.velocity(x, tt, cb)).abs().max() > 1e-4


@pytest.mark.parametrize("credit", ["terminal"])
def test_cli_two_rounds_ratio_exactly_one_in_every_round(tmp_path, monkeypatch, credit):
    """Done-when: ``unigrpo train builtin:qwen_image_edit_rounds_unigrpo algo.rounds=2`` on the tiny
    folder with text-only prompts (round 1 without a reference, round 2 an edit of it), some rows
    stopping after their reflection: the first update's log-probs equal the rollout's, text and image,
    in both rounds."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    monkeypatch.setattr(QwenImageEdit, "says_done", some_say_done)
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    out = tmp_path / "run"
    args = ["train", "builtin:qwen_image_edit_rounds_unigrpo", *edit_overrides(tiny_qwenimage_edit_dir()),
            "model.fsdp=false", "model.gradient_checkpointing=false", "model.max_text_tokens=320", "device=cpu",
            f"task.prompts={file}", f"task.eval_prompts={file}", "rewards=[{name: 'test_hf_qwenimage_edit:brightness'}]",
            "reward_workers=0", "algo.prompts_per_step=2", "algo.group_size=2", "algo.trajectories_per_minibatch=4",
            "algo.micro_batch_trajectories=2", f"algo.credit={credit}", "sampler.num_steps=3",
            "sampler.window_range=[0,2]", "sampler.window_size=2", "sampler.eval_num_steps=2", "eval.num_prompts=2",
            "eval.grid_prompts=2", "text.max_reasoning_tokens=4", "threads=1", "optim.lr_text=1e-3",
            "optim.lr_image=1e-3", "steps=1", "eval_every=0", "save_every=0", f"output_dir={out}"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward/mean" in r)
    assert step["loss/text/first_logp_diff_max"] == 0.0 and step["loss/image/first_logp_diff_max"] == 0.0
    assert step["rollout/round1/live_frac"] == 1.0 and 0 < step["rollout/round1/done_frac"] < 1
    assert all(math.isfinite(v) for v in step.values() if isinstance(v, float))
