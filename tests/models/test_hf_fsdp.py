"""``model.fsdp`` (FSDP2) for ``model.kind: hf`` on the tiny FLUX.2 [klein] pipeline, CPU + gloo:
2 torchrun processes through the real CLI give the same trained weights and losses as 1 process
on the same global batch (LoRA: 2 steps == 1 step + ``--resume`` 1 step; a fully trained text side:
1 step), with ratio == 1 on the first update; the sharded decode loop runs the same number of
forwards on every rank whatever its rows do, returns the tokens of the unsharded loop, and does not
hang when one rank's rows all stop at once; the trainable state is gathered whole and loaded back
shard-wise.

The per-rank micro-batch is 2 trajectories in both runs (``micro_batch_trajectories`` counts over
all ranks), as in tests/recipe/test_train_distributed.py, so each micro-batch sees the same rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from conftest import HF_PROMPTS, hf_overrides, qwen_overrides, tiny_flux2_dir, tiny_qwenimage_dir
from safetensors import safe_open
from safetensors.torch import load_file
from testkit import max_diff, steps_of, torchrun_env

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.hf_flux2 import flux2_shift

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARDED = "[unigrpo] model.fsdp: sharded over 2 ranks: 2 LM blocks, 2 transformer blocks"


def brightness(images, prompts, metadata):  # the reward of the CLI runs ("test_hf_fsdp:brightness")
    return images.mean(dim=(1, 2, 3))


def env() -> dict:
    return torchrun_env(HERE)


def run_args(tmp_path, text_rank: int, *extra) -> list[str]:
    """2 prompts x 2 trajectories, one minibatch of 4 per epoch (2 PPO epochs: 2 updates a step)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    shift = flux2_shift(8 * 8, 4, {"use_dynamic_shifting": True})
    return [*hf_overrides(tiny_flux2_dir(), text_rank, 4), "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: 'test_hf_fsdp:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=4", "sampler.num_steps=4", "sampler.window_range=[0,3]",
            "sampler.window_size=2", f"sampler.shift={shift}", "sampler.eval_num_steps=2", "eval.num_prompts=2",
            "eval.grid_prompts=1", "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-3",
            "optim.lr_image=1e-3", "save_every=1", *extra]


def torchrun(args: list[str], cwd: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "unigrpo.cli", "train", *args, "model.fsdp=true", "algo.micro_batch_trajectories=4"]
    proc = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=240, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert SHARDED in proc.stdout and "(2 per rank)" in proc.stdout
    return proc.stdout


LOSSES = ("loss/text/loss", "loss/image/loss", "loss/text/grad_norm", "loss/image/grad_norm", "reward/mean")


def test_two_sharded_processes_match_one_process_and_resume(tmp_path):
    """LoRA on both sides (the reference = adapters off, regularisers on): 1 process x 2 steps vs
    2 FSDP processes x (1 step, then --resume to 2). Measured: weights bitwise equal, losses equal
    up to the sharded grad-norm's summation order (~1e-8)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *run_args(tmp_path, 4, f"output_dir={one}", "steps=2",
                                    "algo.micro_batch_trajectories=2")]) == 0
    torchrun(run_args(tmp_path, 4, f"output_dir={two}", "steps=1"), tmp_path)
    assert (two / "checkpoint.pt").is_file() and (two / "grids" / "eval_step000001.png").is_file()
    out = torchrun([*run_args(tmp_path, 4, f"output_dir={two}", "steps=2"), "--resume"], tmp_path)
    assert "resuming at step 1" in out
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert a and all("lora_" in k for k in a)
    base = build_model(load_config(None, hf_overrides(tiny_flux2_dir())), checkpoint=None).trainable_state()
    assert any(not torch.equal(a[k], base[k]) for k in a if "lora_B" in k)  # training moved the LoRA weights
    assert max_diff(a, b) <= 1e-6  # measured 0.0
    # the sharded run's file is the 1-process layout: same model section, same content hash; it exports
    (m1, m2) = (safe_open(str(d / "final.safetensors"), framework="pt").metadata() for d in (one, two))
    (s1, s2) = ({**json.loads(m["model"]), "fsdp": None} for m in (m1, m2))  # model.fsdp: what differs
    assert s1 == s2 and m1["sha256"] == m2["sha256"]
    assert main(["export", str(two), "--out", str(tmp_path / "export")]) == 0
    s1, s2 = steps_of(one), steps_of(two)
    assert s1.keys() == s2.keys() == {1, 2}
    for step in (1, 2):
        assert s2[step]["loss/text/first_logp_diff_max"] == 0.0 and s2[step]["loss/image/first_logp_diff_max"] == 0.0
        for k in (*LOSSES, "loss/image/mse", "loss/text/kl_ref"):
            assert s2[step][k] == pytest.approx(s1[step][k], rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_a_fully_trained_text_side_shards_and_matches_one_process(tmp_path):
    """text_rank=0: every LM weight is trained (and sharded; no regulariser, whose frozen copy is
    not sharded yet). Measured: max weight diff 6.7e-8 after 1 step (2 updates; 6.5e-7 after 2
    steps), text loss -0.04617700 vs -0.04617706: the text grad norm (1.69) is clipped at 1, and
    the sharded norm sums in another order."""
    extra = ("algo.c_mse=0", "algo.beta_img=0", "algo.text_beta=0", "steps=1")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *run_args(tmp_path, 0, f"output_dir={one}", *extra, "algo.micro_batch_trajectories=2")]) == 0
    torchrun(run_args(tmp_path, 0, f"output_dir={two}", *extra), tmp_path)
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert any(k.startswith("lm.") and "lora_" not in k for k in a)
    assert max_diff(a, b) <= 1e-5
    r1, r2 = steps_of(one)[1], steps_of(two)[1]
    assert r2["loss/text/first_logp_diff_max"] == 0.0 and r2["loss/image/first_logp_diff_max"] == 0.0
    for k in LOSSES:
        assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-9), k


def test_a_sharded_full_fine_tune_reference_is_refused_in_one_line():
    model = build_model(load_config(None, hf_overrides(tiny_flux2_dir(), 0, 4)), checkpoint=None)
    model.sharded = True  # as after wrap() on > 1 rank with model.fsdp
    with pytest.raises(NotImplementedError, match="model.fsdp: the reference of a fully trained side"):
        model.reference()


def counted_sample(model, prompts, fixed: bool, n: int = 6):
    """sample_reasoning with ``fixed_steps`` set, and the number of LM forwards it ran."""
    calls = []
    hook = model.lm.register_forward_pre_hook(lambda *_: calls.append(1))
    model.fixed_steps = fixed
    try:
        out = model.sample_reasoning(model.encode(prompts), max_new_tokens=n,
                                     generator=torch.Generator().manual_seed(3), return_logprobs=True)
    finally:
        hook.remove()
    return out, len(calls)


def test_fixed_step_decode_runs_every_forward_and_returns_the_early_stopping_tokens():
    """Rows that stop early do not change the number of decode forwards under fixed steps (1 prefill
    + max_new_tokens - 1 steps), and the tokens / log-probs are those of the loop that stops early."""
    model = build_model(load_config(None, hf_overrides(tiny_flux2_dir())), checkpoint=None).eval()
    model.reasoner.stop_ids = tuple(range(len(model.tokenizer)))  # every row stops at its first token
    (free, lp_free), n_free = counted_sample(model, HF_PROMPTS, fixed=False)
    (fixed, lp_fixed), n_fixed = counted_sample(model, HF_PROMPTS, fixed=True)
    assert n_free == 1 and n_fixed == 6  # 1 prefill + 5 steps: none after the last token
    assert int(free.response_mask.sum(1).max()) == 1
    assert torch.equal(free.ids, fixed.ids) and torch.equal(free.response_mask, fixed.response_mask)
    assert torch.equal(lp_free, lp_fixed)


DECODE = """
import json, sys, torch
sys.path[:0] = {paths!r}
from conftest import HF_PROMPTS, hf_overrides
from test_hf_fsdp import counted_sample
from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.utils import dist

ranks, _ = dist.init("cpu", timeout_s=60)
model = build_model(load_config(None, [*hf_overrides({folder!r}), "model.fsdp=true"]), checkpoint=None).eval()
if ranks.rank == 0:  # rank 0's rows all stop at their first token; rank 1's run the whole budget
    model.reasoner.stop_ids = tuple(range(len(model.tokenizer)))
(before, _), _ = counted_sample(model, HF_PROMPTS, fixed=False)
model.wrap(ranks)
(after, _), calls = counted_sample(model, HF_PROMPTS, fixed=True)
# the trainable state: gathered whole on every rank, loaded back shard-wise; save (rank 0) writes
# the last gather, and refuses one a parameter was written after
state = model.trainable_state()
name = next(n for n in state if "lora_A" in n)
with torch.no_grad():
    dict(model.named_parameters())[name].add_(1.0)
stale = None
if ranks.is_main:
    try:
        model.save({out!r} + "/stale.safetensors")
    except RuntimeError as e:
        stale = str(e)
moved = not torch.equal(model.trainable_state()[name], state[name])
model.load_trainable_state(state)
back = model.trainable_state()
if ranks.is_main:
    model.save({out!r} + "/final.safetensors")
with open({out!r} + f"/rank{{ranks.rank}}.json", "w") as f:
    json.dump({{"calls": calls, "same": torch.equal(before.ids, after.ids),
               "width": int(after.response_mask.sum(1).max()), "moved": moved, "stale": stale,
               "loaded": all(torch.equal(back[k], v) for k, v in state.items()), "shapes": {{k: list(v.shape)
               for k, v in state.items()}}, "local": list(dict(model.named_parameters())[name].to_local().shape)}}, f)
dist.shutdown(ranks)
"""


@pytest.mark.slow
def test_two_sharded_ranks_decode_in_lockstep_and_gather_and_load_the_state(tmp_path):
    """2 sharded ranks: rank 0's rows all stop at their first token, rank 1's run the whole budget;
    then the trainable state round trip (gather, write, load back shard-wise; a stale save refused)."""
    script = tmp_path / "decode.py"
    script.write_text(DECODE.format(paths=[str(HERE), str(HERE.parent)], folder=tiny_flux2_dir(), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"] == r1["calls"] == 6  # the same forwards (collectives) on both ranks
    assert r0["same"] and r1["same"]  # sharded tokens == the unsharded loop's
    assert r0["width"] == 1 and r1["width"] > 1
    assert r0["moved"] and r1["moved"] and r0["loaded"] and r1["loaded"]
    assert "model.fsdp: save() writes the state gathered by trainable_state()" in r0["stale"]
    name = next(n for n in r0["shapes"] if "lora_A" in n)
    assert r0["local"][0] * 2 == r0["shapes"][name][0]  # each rank holds half of the rows
    saved = load_file(tmp_path / "final.safetensors")
    assert {k: list(v.shape) for k, v in saved.items()} == r0["shapes"]


@pytest.mark.slow
def test_qwen_image_shards_its_vlm_decoder_and_matches_one_process(tmp_path):
    """The Qwen-Image family under FSDP2: its LM blocks are Qwen2.5-VL's text decoder layers
    (``model.language_model.layers``); LoRA 4/4, 1 step on its own grid (``sampler.shift=null``),
    2 sharded processes == 1 process."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    args = [*qwen_overrides(tiny_qwenimage_dir()), "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: 'test_hf_fsdp:brightness'}]", "algo.prompts_per_step=2", "algo.group_size=2",
            "algo.trajectories_per_minibatch=4", "sampler.num_steps=4", "sampler.window_range=[0,3]",
            "sampler.window_size=2", "sampler.shift=null", "sampler.eval_num_steps=2", "eval.num_prompts=2",
            "eval.grid_prompts=1", "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-3",
            "optim.lr_image=1e-3", "steps=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *args, f"output_dir={one}", "algo.micro_batch_trajectories=2"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unigrpo.cli",
           "train", *args, f"output_dir={two}", "model.fsdp=true", "algo.micro_batch_trajectories=4"]
    proc = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "model.fsdp: sharded over 2 ranks: 2 LM blocks, 2 transformer blocks" in proc.stdout
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert a and all("lora_" in k for k in a)
    assert max_diff(a, b) <= 1e-6
    r1, r2 = steps_of(one)[1], steps_of(two)[1]
    assert r2["loss/text/first_logp_diff_max"] == 0.0 and r2["loss/image/first_logp_diff_max"] == 0.0
    for k in LOSSES:
        assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_two_sharded_ranks_decode_on_the_static_cache_with_ratio_one(tmp_path):
    """``text.static_cache`` with the inverse-CDF sampler on 2 FSDP ranks (every decode step a
    collective: lockstep on the preallocated cache): the first update's log-probs equal the rollout's."""
    out = tmp_path / "two"
    torchrun(run_args(tmp_path, 4, f"output_dir={out}", "steps=1", "text.token_sampler=inverse_cdf",
                      "text.static_cache=true"), tmp_path)
    step = steps_of(out)[1]
    assert step["loss/text/first_logp_diff_max"] == 0.0 and step["loss/image/first_logp_diff_max"] == 0.0
