"""``model.fsdp`` (FSDP2) for ``model.kind: bagel`` on the tiny BAGEL folder, CPU + gloo: 2 torchrun
processes through the real CLI give the same trained weights and losses as 1 process on the same
global batch (LoRA on both experts: 2 steps == 1 step + ``--resume`` 1 step), with ratio == 1 on
the first update; the sharded decode loop runs the same number of forwards on every rank whatever
its rows do and returns the tokens of the unsharded loop; the trainable state is gathered whole
and loaded back shard-wise; a sharded snapshot reference is refused in one line.

The per-rank micro-batch is 2 trajectories in both runs (``micro_batch_trajectories`` counts over
all ranks), as in tests/models/test_hf_fsdp.py, so each micro-batch sees the same rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("peft")
from conftest import HF_PROMPTS, bagel_overrides, tiny_bagel_dir
from safetensors.torch import load_file

from unigrpo.cli import main
from unigrpo.config import load_config
from unigrpo.models import build_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARDED = "[unigrpo] model.fsdp: sharded over 2 ranks: 2 MoT decoder layers"


def brightness(images, prompts, metadata):  # the reward of the CLI runs ("test_bagel_fsdp:brightness")
    return images.mean(dim=(1, 2, 3))


def env() -> dict:
    path = [str(HERE), str(HERE.parent), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_args(tmp_path, *extra, text_rank: int = 4) -> list[str]:
    """The shipped config on the tiny folder: 2 prompts x 2 trajectories, one minibatch of 4 per
    epoch (2 PPO epochs: 2 updates a step), the velocity MSE and the text KL to the reference on."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HF_PROMPTS[:2]))
    return ["builtin:bagel_unigrpo", *bagel_overrides(tiny_bagel_dir(), text_rank, 4), "task.kind=prompts",
            f"task.prompts={prompts}", "rewards=[{name: 'test_bagel_fsdp:brightness'}]", "algo.prompts_per_step=2",
            "algo.group_size=2", "algo.trajectories_per_minibatch=4", "sampler.num_steps=4",
            "sampler.window_range=[0,3]", "sampler.window_size=2", "sampler.eval_num_steps=2", "eval.num_prompts=2",
            "eval.grid_prompts=1", "text.max_reasoning_tokens=6", "threads=1", "optim.lr_text=1e-2",
            "optim.lr_image=1e-2", "algo.c_mse=1e-2", "algo.text_beta=0.1", "save_every=1", *extra]


def torchrun(args: list[str], cwd: Path) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "unigrpo.cli", "train", *args, "model.fsdp=true", "algo.micro_batch_trajectories=4"]
    proc = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=240, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert SHARDED in proc.stdout and "(2 per rank)" in proc.stdout
    return proc.stdout


def steps_of(out: Path) -> dict[int, dict]:
    """The training rows of metrics.jsonl by step (evaluation rows have no reward/mean)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward/mean" in r}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


LOSSES = ("loss/text/loss", "loss/image/loss", "loss/text/grad_norm", "loss/image/grad_norm", "reward/mean",
          "loss/image/mse", "loss/text/kl_ref")


def test_two_sharded_processes_match_one_process_and_resume(tmp_path):
    """LoRA on both experts (the reference = adapters off, regularisers on), activation
    checkpointing on (the shipped setting): 1 process x 2 steps vs 2 FSDP processes x (1 step,
    then --resume to 2)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *run_args(tmp_path, f"output_dir={one}", "steps=2", "algo.micro_batch_trajectories=2")]) == 0
    torchrun(run_args(tmp_path, f"output_dir={two}", "steps=1"), tmp_path)
    assert (two / "checkpoint.pt").is_file() and (two / "grids" / "eval_step000001.png").is_file()
    out = torchrun([*run_args(tmp_path, f"output_dir={two}", "steps=2"), "--resume"], tmp_path)
    assert "resuming at step 1" in out
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert a and all("lora_" in k for k in a)
    base = build_model(load_config(None, bagel_overrides(tiny_bagel_dir(), 4, 4)), checkpoint=None).trainable_state()
    for expert in (lambda k: "moe_gen" in k, lambda k: "moe_gen" not in k):  # training moved both experts' LoRA
        assert any(not torch.equal(a[k], base[k]) for k in a if "lora_B" in k and expert(k))
    print("max weight diff", max_diff(a, b))
    assert max_diff(a, b) <= 1e-6
    s1, s2 = steps_of(one), steps_of(two)
    assert s1.keys() == s2.keys() == {1, 2}
    for step in (1, 2):
        assert s2[step]["loss/text/first_logp_diff_max"] == 0.0 and s2[step]["loss/image/first_logp_diff_max"] == 0.0
        for k in LOSSES:
            print(step, k, s1[step][k], s2[step][k])
            assert s2[step][k] == pytest.approx(s1[step][k], rel=1e-5, abs=1e-9), k


def test_a_sharded_snapshot_reference_is_refused_in_one_line():
    model = build_model(load_config(None, bagel_overrides(tiny_bagel_dir(), 0, 4)), checkpoint=None)
    model.sharded = True  # as after wrap() on > 1 rank with model.fsdp
    with pytest.raises(NotImplementedError, match="model.fsdp: the reference of a fully trained expert"):
        model.reference()


def counted_sample(model, prompts, n: int = 6):
    """sample_reasoning and the number of decoder passes it ran (a hook on the first layer)."""
    calls = []
    hook = model.language_model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = model.sample_reasoning(model.encode_prompts(prompts), max_new_tokens=n,
                                     generator=torch.Generator().manual_seed(3), return_logprobs=True)
    finally:
        hook.remove()
    return out, len(calls)


def stop_at_once(model) -> None:
    """Every row samples ``<|im_end|>`` first (its logit raised far above the others)."""
    logits, end = model._logits, model.ids["end"]

    def raised(h, temperature):
        out = logits(h, temperature)
        return out.index_fill(-1, torch.tensor([end]), 1e4)
    model._logits = raised


def test_fixed_step_decode_runs_every_forward_and_returns_the_early_stopping_tokens():
    """Rows that stop early do not change the number of decode passes under fixed steps (1 prefill
    + max_new_tokens), and the tokens / log-probs are those of the loop that stops early."""
    model = build_model(load_config(None, bagel_overrides(tiny_bagel_dir(), 4, 4)), checkpoint=None).eval()
    stop_at_once(model)
    (free, lp_free), n_free = counted_sample(model, HF_PROMPTS)
    model.fixed_steps = True
    (fixed, lp_fixed), n_fixed = counted_sample(model, HF_PROMPTS)
    assert n_free == 1 and n_fixed == 1 + 6
    assert int(free.response_mask.sum(1).max()) == 1
    assert torch.equal(free.ids, fixed.ids) and torch.equal(free.response_mask, fixed.response_mask)
    assert torch.equal(lp_free, lp_fixed)
