"""Overhead of a remote reward (`unigrpo serve-reward` on loopback) vs the same reward in-process.

Usage: python benchmarks/remote_reward.py [--repeats 7] [--steps 5] [--out benchmarks/results/remote_reward.json]

1. Per call: a near-free reward (mean brightness) scored in-process and through the service, at a
   few batch sizes / image sides, both image formats (npy lossless, png 8-bit) and both transports
   (JSON + base64, and the binary safetensors body); the median over ``--repeats`` calls after a
   warm-up. The difference is the transport cost (encode, HTTP, decode).
2. Per training step: the tiny random model of the tests (2 prompts x 4, chunks of 2, 16 px)
   for ``--steps`` steps with the in-process and the served reward (JSON and binary transport), with and without a reward
   thread (``reward_workers``); the median ``perf/step_s`` and ``perf/reward_wait_s`` over the
   steps after the first.
Needs the ``serve`` extra. Writes JSON to benchmarks/results/ and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def brightness(images, prompts, metadata):  # the served reward (`remote_reward:brightness`, cwd benchmarks/)
    return images.mean(dim=(1, 2, 3))


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "unigrpo.cli", "serve-reward", "remote_reward:brightness",
                             "--port", str(port), "--max-batch", "1024"], cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the reward service did not start")


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_call(url: str, repeats: int) -> list[dict]:
    from unigrpo.rewards.remote import RemoteReward

    rows = []
    for batch, side in ((2, 16), (16, 64), (32, 256)):
        images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
        prompts, meta = ["a prompt"] * batch, [{"reasoning": "<think> a b c </think> d e f", "prompt_index": 0}] * batch
        local = median_s(lambda images=images, prompts=prompts, meta=meta: brightness(images, prompts, meta), repeats)
        row = {"batch": batch, "side": side, "in_process_ms": 1e3 * local}
        for fmt in ("npy", "png"):
            for transport, suffix in (("json", ""), ("binary", "_binary")):
                client = RemoteReward(url, image_format=fmt, timeout_s=60, transport=transport)
                row[f"remote_{fmt}{suffix}_ms"] = 1e3 * median_s(
                    lambda c=client, i=images, p=prompts, m=meta: c(i, p, m), repeats)
                client.close()
        rows.append(row)
    return rows


def per_step(url: str, steps: int) -> list[dict]:
    from unigrpo.config import load_config
    from unigrpo.recipes.train import train

    model = ["model.d_text=32", "model.text_layers=1", "model.text_heads=2", "model.unet_channels=[8,16,16]",
             "model.image_size=16", "model.checkpoint=null"]
    sizes = [f"steps={steps}", "algo.prompts_per_step=2", "algo.group_size=4", "algo.trajectories_per_minibatch=4",
             "algo.micro_batch_trajectories=2", "sampler.num_steps=4", "sampler.window_range=[0,3]",
             "sampler.window_size=2", "sampler.eval_num_steps=2", "eval.num_prompts=2", "eval_every=0",
             "text.max_reasoning_tokens=6", "task.prompt_pool=64", "threads=1", "save_every=0"]
    sys.path.insert(0, str(HERE))  # `remote_reward:brightness` in-process
    rows = []
    for workers in (0, 1):
        for label, reward in (("in_process", "{name: 'remote_reward:brightness'}"),
                              ("remote", f"{{name: remote, kwargs: {{url: '{url}', transport: json}}}}"),
                              ("remote_binary", f"{{name: remote, kwargs: {{url: '{url}', transport: binary}}}}")):
            with tempfile.TemporaryDirectory() as out:
                train(load_config(None, [*model, *sizes, f"output_dir={out}", f"reward_workers={workers}",
                                         f"rewards=[{reward}]"]))
                logged = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
            logged = [r for r in logged if "perf/step_s" in r][1:]  # the first step warms up
            rows.append({"reward": label, "reward_workers": workers, "steps": len(logged),
                         "step_s": statistics.median(r["perf/step_s"] for r in logged),
                         "reward_wait_s": statistics.median(r["perf/reward_wait_s"] for r in logged),
                         "reward_s": statistics.median(r["perf/reward_s"] for r in logged)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "remote_reward.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        calls, steps = per_call(url, args.repeats), per_step(url, args.steps)
    finally:
        proc.terminate()
        proc.wait(10)
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpus": os.cpu_count()},
              "repeats": args.repeats, "per_call": calls, "per_step": steps}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("per call (median ms): batch x side | in-process | npy json | npy binary | png json | png binary")
    for r in calls:
        print(f"  {r['batch']:>3} x {r['side']:>3} px | {r['in_process_ms']:8.3f} | {r['remote_npy_ms']:8.2f} | "
              f"{r['remote_npy_binary_ms']:8.2f} | {r['remote_png_ms']:8.2f} | {r['remote_png_binary_ms']:8.2f}")
    print("per training step (median s): reward, reward_workers | step_s | reward_wait_s | reward_s")
    for r in steps:
        print(f"  {r['reward']:<13} {r['reward_workers']} | {r['step_s']:.3f} | {r['reward_wait_s']:.4f} | "
              f"{r['reward_s']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
