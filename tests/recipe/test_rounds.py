"""Multi-round episodes (algo.rounds > 1): what a later round reads, the stop word's masks, the
seeds keyed by the round (chunking, resume and ranks change nothing), the rewards' round metadata,
and the first PPO ratio being exactly 1 in every round of a real CLI run, for every credit option."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import HERE, MODEL, tiny_overrides
from safetensors.torch import load_file
from testkit import save_tiny_random_model

from unigrpo import rollout as R
from unigrpo.cli import main
from unigrpo.config import ConfigError, load_config
from unigrpo.models import build_model
from unigrpo.models.tiny import TinyUnifiedModel
from unigrpo.recipes.batches import round_seeds, seeds, tree_copies
from unigrpo.utils.dist import Dist

ROOT = Path(__file__).resolve().parents[2]
SEEING = ["model.sees_images=true", "model.edits=true"]
SEEN: list[dict] = []  # every metadata dict `recording` was called with


def recording(images, prompts, metadata):
    """Brightness, recording what it was shown (a reward plugged in as ``test_rounds:recording``)."""
    SEEN.extend(metadata)
    return images.mean(dim=(1, 2, 3))


def some_say_done(self, response: str) -> bool:
    """A random model never writes the stop word: about half of its reflections stop instead (by their text)."""
    return zlib.crc32(response.encode()) % 2 == 0


@pytest.fixture(scope="module")
def seeing_checkpoint(tmp_path_factory) -> str:
    return save_tiny_random_model(MODEL + SEEING, tmp_path_factory.mktemp("seeing") / "tiny.safetensors")


def episode(ckpt, tmp_path, chunks, *extra, branches=1):
    """One step's episodes of 2 prompts x 4 (rounds from ``extra``), sampled over ``chunks``."""
    cfg = load_config(None, tiny_overrides(ckpt, tmp_path, *SEEING, *extra))
    model = build_model(cfg)
    prompts, n, s = ["a red circle", "two blue squares"], 8, cfg.sampler
    starts = R.window_starts(seeds(cfg, 0, 0, 2, R.WINDOW), seeds(cfg, 0, 0, n, R.TRAJ_WINDOW), 4, s.num_steps,
                             s.window_size, s.window_range, True)
    draws = R.EpisodeSeeds(seeds(cfg, 0, 0, 2, R.REASONING), seeds(cfg, 0, 0, n, R.NOISE), starts, None,
                           round_seeds(cfg, 0, 0, 2, 0, n))
    draws = tree_copies(draws, branches) if branches > 1 else draws
    text = {"thinking": True, "max_new_tokens": cfg.text.max_reasoning_tokens, "temperature": 1.0, "top_p": 1.0,
            "batch_groups": True}
    sampler = {"num_steps": s.num_steps, "shift": s.shift, "kind": s.kind, "noise_level": s.noise_level,
               "window_size": s.window_size, "cfg_scale": s.cfg_scale, "temperature": 1.0, "reduction": "mean"}
    roll = R.sample_episode(model, prompts, 4, draws, chunks, Dist(), text=text, sampler=sampler, branches=branches)
    return model, roll


def test_a_later_round_reads_the_context_its_image_and_the_reflection_turn(seeing_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    model, roll = episode(seeing_checkpoint, tmp_path, [torch.arange(8)], "algo.rounds=3")
    turn = model.reflection_ids()
    assert model.token_text(turn) == "is the image right"
    r0, r1, r2 = roll.rounds
    for prev, rnd in ((r0, r1), (r1, r2)):
        w = prev.tokens.ids.shape[1]
        assert rnd.tokens.ids.shape[1] == w + len(turn) + 6  # fixed width: + turn + max_reasoning_tokens
        assert torch.equal(rnd.tokens.ids[:, :w], prev.tokens.ids) and torch.equal(rnd.tokens.mask[:, :w],
                                                                                   prev.tokens.mask)
        assert not rnd.tokens.response_mask[:, :w + len(turn)].any()  # the previous reasoning is context now
        assert (rnd.tokens.ids[:, w:w + len(turn)] == torch.tensor(turn)).all()
        # the image the row drew is appended to its images: the model sees it, and an editing model edits it
        n_before = 0 if prev.tokens.image_mask is None else int(prev.tokens.image_mask[0].sum())
        assert rnd.tokens.image_mask.sum(1).eq(n_before + 1).all()
        assert torch.equal(rnd.tokens.images[:, n_before].cpu(), prev.images)
        # a live row wrote a reflection; a row that had stopped wrote nothing and drew nothing
        assert torch.equal(rnd.tokens.response_mask.any(1).cpu(), rnd.live)
        assert torch.equal(rnd.live, prev.drew)
    done = r1.live & ~r1.drew
    assert done.any() and r1.drew.any()  # both kinds of rows
    for rnd, prev in ((r1, r0), (r2, r1)):
        kept = ~rnd.drew
        assert torch.equal(rnd.images[kept], prev.images[kept])  # it keeps its image: no fake sample
        assert (rnd.logp_img_old[kept] == 0).all() and (rnd.x_t[kept] == 0).all()
        assert (rnd.logp_img_old[rnd.drew] != 0).all()
        said = [model.says_done(t) for t in rnd.reasoning]
        assert torch.equal(torch.tensor(said) & rnd.live, rnd.live & ~rnd.drew)
    assert torch.equal(roll.images, r2.images)  # the final images: each row's last one
    # an editing model reads the row's LAST image: the one it drew, not the first
    ref = model._ref(r2.tokens)
    last = r2.tokens.image_mask.sum(1) - 1
    assert torch.equal(ref, model.encode_images(r2.tokens.images[torch.arange(8), last]))


def test_rounds_do_not_depend_on_the_chunking(seeing_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    _, whole = episode(seeing_checkpoint, tmp_path, [torch.arange(8)], "algo.rounds=2")
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    _, chunked = episode(seeing_checkpoint, tmp_path, list(perm.split(3)), "algo.rounds=2")
    for a, b in zip(whole.rounds, chunked.rounds):
        assert torch.equal(a.tokens.ids, b.tokens.ids)  # each row's reflection: its own generator
        assert torch.equal(a.drew, b.drew) and torch.equal(a.live, b.live)
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-4)  # batch-size float rounding only


def test_tree_copies_share_round_one_and_branch_after(seeing_checkpoint, tmp_path):
    _, roll = episode(seeing_checkpoint, tmp_path, [torch.arange(8)], "algo.rounds=2", "algo.credit=tree",
                      branches=2)
    r0, r1 = roll.rounds
    assert torch.equal(r0.tokens.ids[0::2], r0.tokens.ids[1::2]) and torch.equal(r0.images[0::2], r0.images[1::2])
    assert not torch.equal(r0.tokens.ids[0], r0.tokens.ids[2])  # two round-1 samples per group
    assert not torch.equal(r1.tokens.ids[0::2], r1.tokens.ids[1::2])  # the continuations branch


@pytest.mark.parametrize("credit", ["terminal", "per_round", "tree"])
def test_a_two_round_run_has_first_ratio_one_in_every_round(seeing_checkpoint, tmp_path, monkeypatch, credit):
    """The real CLI, 2 rounds: the first update recomputes every round's behaviour log-probs exactly
    (the statistic is the max over rounds), the parameters move, the rewards see the rounds."""
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    SEEN.clear()
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(seeing_checkpoint, out, *SEEING, "algo.rounds=2", f"algo.credit={credit}",
                                          "steps=1", "eval_every=0", "rewards=[{name: 'test_rounds:recording'}]")]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    r = next(r for r in rows if "loss/text/first_logp_diff_max" in r)
    assert r["loss/text/first_logp_diff_max"] == 0.0 and r["loss/image/first_logp_diff_max"] == 0.0
    assert r["rollout/round1/live_frac"] == 1.0 and 0 < r["rollout/round1/done_frac"] < 1
    a, b = load_file(out / "final.safetensors"), load_file(seeing_checkpoint)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    rounds = sorted({m["round"] for m in SEEN})
    assert rounds == [0, 1] and len(SEEN) == 2 * 8
    assert all("previous_image" not in m for m in SEEN if m["round"] == 0)
    later = [m for m in SEEN if m["round"] == 1]
    assert all(m["previous_image"].shape == (3, 16, 16) for m in later)
    first = {(m["prompt_index"], m["group_index"]): m["reasoning"] for m in SEEN if m["round"] == 0}
    assert all(m["reasoning"].startswith(first[m["prompt_index"], m["group_index"]] + " ") for m in later)  # both rounds


def test_a_two_round_nft_run_starts_from_the_old_velocity_in_every_round(seeing_checkpoint, tmp_path, monkeypatch):
    """``algo.image_objective: nft`` in 2 rounds, some rows stopping after round 1: the old velocity
    of every round (of a later round: the rows that drew, on a pass over them alone) is the policy's
    at the first update (the statistic is the max over rounds), and the parameters move."""
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(seeing_checkpoint, out, *SEEING, "algo.rounds=2", "algo.image_objective=nft",
                                          "algo.credit=per_round", "steps=1", "eval_every=0")]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    r = next(r for r in rows if "loss/text/first_logp_diff_max" in r)
    assert r["loss/text/first_logp_diff_max"] == 0.0 and r["loss/image/first_v_old_diff_max"] == 0.0
    assert 0 < r["rollout/round1/done_frac"] < 1  # round 2 trains the rows that drew only
    a, b = load_file(out / "final.safetensors"), load_file(seeing_checkpoint)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("image"))


def test_resume_of_a_two_round_run_equals_uninterrupted(seeing_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    full, part = tmp_path / "full", tmp_path / "part"
    run = [*SEEING, "algo.rounds=2", "algo.credit=per_round", "eval_every=100"]
    assert main(["train", *tiny_overrides(seeing_checkpoint, full, *run, "steps=2")]) == 0
    assert main(["train", *tiny_overrides(seeing_checkpoint, part, *run, "steps=1", "save_every=1")]) == 0
    assert main(["train", *tiny_overrides(seeing_checkpoint, part, *run, "steps=2"), "--resume"]) == 0
    a, b = load_file(full / "final.safetensors"), load_file(part / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (full, part))
    ma, mb = ([r for r in m if "reward/mean" in r] for m in (ma, mb))
    assert [r["step"] for r in mb] == [1, 2]
    for ra, rb in zip(ma, mb):
        assert {k: v for k, v in ra.items() if not k.startswith("perf/")} == \
               {k: v for k, v in rb.items() if not k.startswith("perf/")}


def test_two_gloo_processes_match_one_process_in_two_rounds(seeing_checkpoint, tmp_path):
    common = [*SEEING, "algo.rounds=2", "algo.credit=per_round", "steps=1", "eval_every=100"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *tiny_overrides(seeing_checkpoint, one, *common, "algo.micro_batch_trajectories=2")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unigrpo.cli",
           "train", *tiny_overrides(seeing_checkpoint, two, *common, "algo.micro_batch_trajectories=4")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert any(not torch.equal(a[k], load_file(seeing_checkpoint)[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    r1, r2 = (next(json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines() if "reward/mean" in x)
              for o in (one, two))
    assert r1["reward/mean"] == r2["reward/mean"]  # from the gathered rewards: exact
    # a rank's mean, averaged over ranks (dist.reduce_metrics): equal up to float rounding
    assert r1["rollout/round1/reward"] == pytest.approx(r2["rollout/round1/reward"], rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["algo.rounds=2"], "algo.rounds: 2 rounds need a model that sees the image it drew"),
    (["algo.credit=per_round"], "algo.credit: 'per_round' needs algo.rounds >= 2"),
    ([*SEEING, "algo.rounds=2", "algo.credit=tree", "algo.tree_branches=3"], "algo.tree_branches: must be >= 2"),
    ([*SEEING, "algo.rounds=2", "text.max_reasoning_tokens=30"], "in 2 rounds: at most 20"),
    ([*SEEING, "algo.rounds=6", "text.max_reasoning_tokens=2"], "it sees at most 4"),
    (["algo.rounds=0"], "algo.rounds: must be >= 1"),
    ([*SEEING, "algo.rounds=2", "sampler.cfg_scale=2"], "sampler.cfg_scale: training with CFG in multi-round episodes"),
])
def test_bad_round_settings_are_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, ["model.checkpoint=null", *extra])
    assert "\n" not in str(e.value)


def test_a_sharded_model_is_refused_more_than_one_round():
    """FSDP2's forwards are collectives; rows that stop at different rounds on different ranks would
    make different calls (a hang), so ``model.fsdp`` with ``algo.rounds`` > 1 is one line at validation."""
    with pytest.raises(ConfigError, match="model.fsdp: a sharded model runs one round per episode") as e:
        load_config("builtin:qwen_image_edit_rounds_unigrpo", ["model.fsdp=true"])
    assert "\n" not in str(e.value)
    assert load_config("builtin:qwen_image_edit_rounds_unigrpo", ["model.fsdp=true", "algo.rounds=1"]).model.fsdp


def test_the_refine_task_trains_and_evaluates_round_by_round(seeing_checkpoint, tmp_path, monkeypatch):
    """task.kind=shapes_refine through the CLI: the shapes reward on every round, the evaluation's
    per-round table and its grid of rounds side by side; ``unigrpo eval`` prints the table."""
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(seeing_checkpoint, out, *SEEING, "task.kind=shapes_refine", "algo.rounds=3",
                                      "steps=1", "eval_every=1", "eval.num_prompts=4", "eval.grid_prompts=3")
            if not a.startswith("rewards=")]
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in rows if "eval/round2/accuracy" in r)
    for k in ("fix_rate", "break_rate", "done_rate", "reflection_ok", "accuracy", "round1/done_frac"):
        assert f"eval/{k}" in ev
    assert ev["eval/accuracy"] == ev["eval/round2/accuracy"]  # the final image is the last round's
    from PIL import Image

    grid = Image.open(out / "grids" / "eval_step000001.png")
    assert grid.size == (2 + 3 * (16 * 4 + 2), 2 + 3 * (16 * 4 + 2))  # 3 prompts x 3 rounds, scale 4
    assert (out / "grids" / "eval_step000001.md").read_text().count("round 2:") == 3
    rollout_keys = next(r for r in rows if "rollout/round2/reward" in r)
    assert 0 <= rollout_keys["rollout/fix_frac"] <= 1
    assert main(["eval", *args, "--checkpoint", seeing_checkpoint]) == 0


def test_every_multi_round_key_is_documented(seeing_checkpoint, tmp_path, monkeypatch):
    from testkit import documented_metric_patterns

    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(seeing_checkpoint, out, *SEEING, "task.kind=shapes_refine", "algo.rounds=2",
                                      "steps=1", "eval.num_prompts=2") if not a.startswith("rewards=")]
    assert main(["train", *args]) == 0
    keys = {k for line in (out / "metrics.jsonl").read_text().splitlines() for k in json.loads(line) if k != "step"}
    keys.discard("nonfinite")
    pats = documented_metric_patterns()
    assert not sorted(k for k in keys if not any(p.match(k) for p in pats))


def test_each_round_gets_its_own_advantage_column(seeing_checkpoint, tmp_path, monkeypatch):
    """``micro_batch_loss`` with [B, R] advantages: column r reaches round r (a shared [B] advantage
    is the same as every column equal to it, bit for bit)."""
    from unigrpo.recipes import train as T

    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    cfg = load_config(None, tiny_overrides(seeing_checkpoint, tmp_path, *SEEING, "algo.rounds=2", "algo.c_mse=0"))
    model, roll = episode(seeing_checkpoint, tmp_path, [torch.arange(8)], "algo.rounds=2")
    mb = roll.index(torch.arange(4))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def loss(a):
        return T.micro_batch_loss(model, None, mb, a, cfg, 1.0, 1.0)[0]

    assert torch.equal(loss(adv), loss(torch.stack([adv, adv], 1)))
    zero = torch.zeros(4)
    # the first update is at the behaviour policy: each round's loss is -mean(A) over its rows, so the
    # columns add: (A, 0) + (0, A) == (A, A), and (A, 0) is round 0's alone
    both, first, second = loss(torch.stack([adv, adv], 1)), loss(torch.stack([adv, zero], 1)), loss(torch.stack([zero, adv], 1))
    torch.testing.assert_close(first + second, both)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("response, done", [
    ("<think> i see a red circle . right . </think> done <eos>", True),
    ("<think> i see a red circle . right . </think> Done . <eos> <pad>", True),
    ("done", True),
    ("<think> done </think> a red circle <eos>", False),  # the stop word in the thought is not the answer
    ("<think> i see a red circle . wrong . </think> a red circle done <eos>", False),
    ("", False),
])
def test_the_stop_word_is_the_answer_after_the_thought(seeing_checkpoint, response, done):
    model = TinyUnifiedModel.load(seeing_checkpoint)
    assert model.stop_word == "done" and model.says_done(response) is done


def test_a_model_without_a_reflection_turn_is_refused_by_the_refine_task(tmp_path):
    from unigrpo.models.base import UnifiedModel
    from unigrpo.tasks import build_task
    from unigrpo.utils.errors import InputError

    cfg = load_config(None, [*MODEL, *SEEING, "model.checkpoint=null", "task.kind=shapes_refine", "algo.rounds=2",
                             "text.max_reasoning_tokens=6"])
    with pytest.raises(InputError, match="task.kind=shapes_refine: NoTurn has no reflection turn yet"):
        build_task(cfg).check(object.__new__(type("NoTurn", (), {"reflection_ids": UnifiedModel.reflection_ids})),
                              cfg)


def test_the_refine_evaluation_with_given_reflections(tmp_path):
    """``unigrpo eval --mode``: ``gt`` teacher-forces the world's reflection on each drawn image,
    ``no_think`` an empty one; ``all`` prints the three in one table."""
    from unigrpo.tasks import build_task
    from unigrpo.tasks.shapes_refine import eval_episode, no_reflections, world_reflections
    from unigrpo.world import describe
    from unigrpo.world.refine import parse_reflection, reflection, seen_descriptions

    ckpt = save_tiny_random_model(MODEL + SEEING + ["model.max_seq_len=80"], tmp_path / "long.safetensors")
    over = [*MODEL, *SEEING, "model.max_seq_len=80", f"model.checkpoint={ckpt}", "task.kind=shapes_refine",
            "algo.rounds=2", "text.max_reasoning_tokens=28", "eval.num_prompts=4", "sampler.eval_num_steps=2"]
    cfg = load_config(None, over)
    model, task = build_model(cfg), build_task(cfg)
    tasks = task.eval_world_tasks()
    roll = eval_episode(model, task.eval_prompts(), cfg, 2, world_reflections(tasks))
    first, second = roll.rounds
    from unigrpo.world import score_images

    right = score_images(first.images, [t.spec for t in tasks]).correct
    for i, (t, seen) in enumerate(zip(tasks, seen_descriptions(first.images))):
        assert parse_reflection(second.reasoning[i]) == parse_reflection(reflection(seen, bool(right[i]),
                                                                                    describe(t.target)))
    assert torch.equal(second.drew, torch.from_numpy(~right))  # the world's verdict decides who redraws
    empty = eval_episode(model, task.eval_prompts(), cfg, 2, no_reflections).rounds[1]
    assert empty.tokens.response_mask.sum(1).eq(1).all() and empty.drew.all()  # just <eos>: it draws again
    text = task.report(model, cfg, "all", None)
    assert "| own reflections |" in text and "| no reflection |" in text and "| ground-truth reflections |" in text


def sample_args(ckpt, out, *extra):
    return ["sample", "a red circle", *MODEL, *SEEING, f"model.checkpoint={ckpt}", "threads=1", "sampler.eval_num_steps=2",
            "text.max_reasoning_tokens=6", *extra, "--n", "3", "--seed", "1", "--out", str(out)]


def test_sample_prints_and_writes_every_round(seeing_checkpoint, tmp_path, monkeypatch, capsys):
    """``unigrpo sample --rounds 2``: each sample's reasoning and reflection printed (a row that said
    done keeps its image), each round's images in OUT_r1.png / OUT_r2.png, the rounds side by side in
    OUT; ``algo.rounds=2`` instead of the flag gives the same; ``--rounds 1`` is the one-round command."""
    from PIL import Image

    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    out = tmp_path / "s" / "out.png"
    assert main(sample_args(seeing_checkpoint, out, "--rounds", "2")) == 0
    printed = capsys.readouterr().out
    assert all(f"[{i}] round {r}: " in printed for i in range(3) for r in (1, 2))
    strip, r1, r2 = (Image.open(p) for p in (out, out.with_name("out_r1.png"), out.with_name("out_r2.png")))
    side = 16 * 4 + 2
    assert strip.size == (2 + 2 * side, 2 + 3 * side) and r1.size == r2.size == (2 + 3 * side, 2 + side)
    same = tmp_path / "t" / "out.png"
    assert main(sample_args(seeing_checkpoint, same, "algo.rounds=2")) == 0
    assert capsys.readouterr().out.replace(str(same.parent), str(out.parent)) == printed
    assert all(Image.open(same.with_name(n)).tobytes() == Image.open(out.with_name(n)).tobytes()
               for n in ("out.png", "out_r1.png", "out_r2.png"))
    one = tmp_path / "u" / "out.png"
    assert main(sample_args(seeing_checkpoint, one, "--rounds", "1")) == 0
    assert not one.with_name("out_r1.png").exists() and "round" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, patch, message", [
    (["--rounds", "2"], True, "algo.rounds=2: TinyUnifiedModel has no reflection turn yet"),
    (["--rounds", "2", "sampler.eval_cfg_scale=3"], False, "sampler.eval_cfg_scale=3 with algo.rounds=2: a later round"),
    (["--rounds", "0"], False, "--rounds must be >= 1"),
])
def test_sample_rounds_errors_are_one_line(seeing_checkpoint, tmp_path, monkeypatch, capsys, extra, patch, message):
    from unigrpo.models.base import UnifiedModel

    if patch:  # a model without a reflection turn
        monkeypatch.setattr(TinyUnifiedModel, "reflection_ids", UnifiedModel.reflection_ids)
    assert main(sample_args(seeing_checkpoint, tmp_path / "out.png", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    blind = save_tiny_random_model(MODEL, tmp_path / "blind.safetensors")  # sees no image: the config refuses
    assert main(["sample", "a red circle", *MODEL, f"model.checkpoint={blind}", "--rounds", "2",
                 "--out", str(tmp_path / "b.png")]) == 2
    assert "algo.rounds: 2 rounds need a model that sees the image it drew" in capsys.readouterr().err


def test_eval_of_the_refine_checkpoint_in_three_rounds(tmp_path, capsys):
    """``unigrpo eval builtin:demo_rounds algo.rounds=3``: the shipped refine checkpoint evaluated in
    3-round episodes (its 80-position table holds 3 rounds of at most 17 tokens: one line says so)."""
    base = ["eval", "builtin:demo_rounds", "algo.rounds=3", "eval.num_prompts=4", "sampler.eval_num_steps=4",
            "threads=1"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "text.max_reasoning_tokens: 24" in err and "in 3 rounds: at most 17" in err
    assert main([*base, "text.max_reasoning_tokens=17", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "3 rounds" in printed and "| round 1 | round 2 | round 3 |" in printed
    assert (tmp_path / "ev" / "grids" / "eval_step000000.png").is_file()


def test_a_prompt_file_evaluates_every_round(seeing_checkpoint, tmp_path, monkeypatch, capsys):
    """``task.kind: prompts`` with ``algo.rounds=2``: ``unigrpo eval`` scores every round's image (the
    rewards see ``round`` and ``previous_image``), ``eval/reward`` is the final images', and the grid
    holds the rounds side by side; a model without a reflection turn is refused in one line."""
    monkeypatch.setattr(TinyUnifiedModel, "says_done", some_say_done)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n"
                               for p, t in (("a red circle", "one"), ("two blue squares", "two"))))
    SEEN.clear()
    out = tmp_path / "eval"
    args = [a for a in tiny_overrides(seeing_checkpoint, out, *SEEING, "algo.rounds=2", "task.kind=prompts",
                                      f"task.prompts={prompts}", "rewards=[{name: 'test_rounds:recording'}]")
            if not a.startswith("task.prompt_pool")]
    assert main(["eval", *args, "--out", str(out)]) == 0
    lines = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines() if line.startswith("eval/"))
    assert {"eval/round0/reward", "eval/round1/reward", "eval/done_rate", "eval/category/one/reward"} <= set(lines)
    assert [m["round"] for m in SEEN] == [0, 0, 1, 1]
    assert all(m["previous_image"].shape == (3, 16, 16) for m in SEEN[2:])
    texts = (out / "grids" / "eval_step000000.md").read_text().splitlines()  # beside the grid: a row per prompt
    assert (out / "grids" / "eval_step000000.png").exists() and len(texts) == 2
    assert all("round 0: `" in t and " | round 1: `" in t for t in texts)
    no_turn = [a for a in args if not a.startswith("model.sees_images") and not a.startswith("model.edits")]
    assert main(["eval", *no_turn, "--out", str(tmp_path / "x")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_input_images_and_drawn_ones_over_the_models_limit_are_one_line(seeing_checkpoint, tmp_path, capsys):
    """The tiny model holds at most 4 images in a row; a prompt with 4 input images cannot run 2
    rounds (its drawn image would be the 5th): refused before the run directory exists, naming the line."""
    from PIL import Image

    files = []
    for i in range(4):
        files.append(str(tmp_path / f"in{i}.png"))
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(files[-1])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n"
                       + json.dumps({"prompt": "two blue squares", "images": files}) + "\n")
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(seeing_checkpoint, out, *SEEING, "algo.rounds=2", "task.kind=prompts",
                                      f"task.prompts={prompts}", "rewards=[{name: 'test_rounds:recording'}]")
            if not a.startswith("task.prompt_pool")]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{prompts}:2: 4 input images + 1 drawn ones" in err, err
    assert not out.exists()
    assert main(["train", *args, "algo.rounds=1", "steps=1", "eval_every=0"]) == 0  # one round: 4 images fit
