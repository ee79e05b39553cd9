"""The cost of CFG for editing with FLUX.2 [klein] reference images (issue 19, item 5), on the tests'
tiny random pipeline: UniGRPO steps CFG-free vs with the pipeline's default guidance.

    HF_HUB_OFFLINE=1 python benchmarks/edit_cfg_cost_flux2.py [--repeats 3] [--steps 3] [--threads 2] [key=value ...]

Runs the real ``unigrpo.recipes.train.train`` (``model.kind=hf``, LoRA 4 on both sides) on prompts
that each carry one reference image of the output's size (the prompt file has no ``"images"``
field on main yet: the benchmark attaches them to the loaded prompts). Two settings, interleaved
(A B A B ...) in one process so that both see the same machine state:

- ``cfg_free``: ``sampler.cfg_scale=1`` (UniGRPO): one transformer pass per denoising step.
- ``cfg``: ``sampler.cfg_scale=4`` (the pipeline's default ``guidance_scale``) in rollout AND
  training (what CFG-trained FlowGRPO does), with the pipeline's negative branch: the prompt ""
  WITH the same references. The protocol's ``null_context(batch)`` knows no images (so unigrpo
  refuses CFG training on an editing task); here a benchmark-only shim gives the null context the
  references of the batch's last ``forward_context``, which is the batch it guides.

Per setting, in process CPU seconds (``time.process_time``, one torch thread by default: the box is
shared, and waiting for a core is not compute): the rollout per trajectory (``rollout_step``:
reasoning + denoising + decode + the reward), the training of a step (``ppo_epochs``), and the
transformer passes of a step and the image tokens each reads, counted by a hook. The first
``--warmup`` steps of each run are not counted. Also the pipeline's own ``__call__(image=...)`` at
``guidance_scale`` 1 and 4 (inference only, CPU seconds per image).
Writes benchmarks/results/edit_cfg_cost_flux2.json: ``{family: {rollout_s_per_traj_cfg_free,
rollout_s_per_traj_cfg, passes, train_step_ratio, ...}}`` (the layout of edit_cfg_cost.py).

``--memory`` prints instead the memory row of docs/models.md for FLUX.2 [klein] Base 4B with
references, COMPUTED from the module shapes (Qwen3-4B, the klein-4B transformer and the FLUX.2 VAE
built on the meta device: nothing allocated, nothing measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "edit_cfg_cost_flux2.json"
PROMPTS = ["make the circle red", "add two green triangles above the circle"]
FAMILY = "flux2_klein_ref"
PIPELINE_CFG = 4.0  # Flux2KleinPipeline's default guidance_scale (is_distilled: false)
NUM_STEPS = 4  # denoising steps of the rollout and of the pipeline's own calls


def conftest():
    """The tests' tiny pipeline builder and overrides (one copy: tests/models/conftest.py)."""
    sys.path.insert(0, str(ROOT / "tests"))  # conftest's builder imports testkit
    spec = importlib.util.spec_from_file_location("hf_conftest", ROOT / "tests" / "models" / "conftest.py")
    module = sys.modules["hf_conftest"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(i: int, side: int) -> torch.Tensor:
    """[1, 3, side, side] an 8-bit random reference image (a PNG's values)."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 256, (1, 3, side, side), generator=g).float() / 255


class Counter:
    """Transformer passes and the image tokens (noisy + reference) of a row in each."""

    def __init__(self):
        self.calls, self.tokens = 0, 0

    def pre(self, module, args, kwargs):
        self.calls += 1
        self.tokens += kwargs["hidden_states"].shape[1]


def guided_with_references(model) -> None:
    """The benchmark-only shim (module docstring): ``null_context(b)`` carries the references of the
    last ``forward_context`` (the batch being guided; the reference policy goes through it too)."""
    last = {}
    forward_context, null_context = model.forward_context, model.null_context

    def remembered(tokens, temperature=1.0):
        logp, ctx = forward_context(tokens, temperature)
        last["ctx"] = ctx
        return logp, ctx

    def null_with_references(batch_size):
        ctx = last["ctx"]
        null = null_context(batch_size)  # itself a forward_context: restore the batch's after it
        last["ctx"] = ctx
        if ctx.refs is None:  # the final evaluation draws from the texts alone (PromptsTask, today)
            return null
        assert len(ctx.refs) == batch_size
        return dataclasses.replace(null, refs=ctx.refs, ref_count=ctx.ref_count)

    model.forward_context, model.null_context = remembered, null_with_references


def cpu_timed(fn, into: list):
    """``fn`` whose process CPU seconds per call are appended to ``into`` (CPU time, not wall time:
    the 2-core box is shared, and waiting for a core is not compute)."""
    def timed(*a, **kw):
        t0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            into.append(time.process_time() - t0)
    return timed


def one_run(overrides: list[str], cfg_scale: float, steps: int, warmup: int, side: int, tmp: Path) -> dict:
    """``warmup + steps`` training steps at ``cfg_scale``; the counted steps' CPU seconds and passes."""
    import unigrpo.recipes.train as T
    import unigrpo.tasks.prompts as P
    from unigrpo.config import load_config

    counter, marks, roll_s, train_s = Counter(), [], [], []
    load, build, rollout_step, ppo_epochs = P.load_prompt_file, T.build_model, T.rollout_step, T.ppo_epochs

    def with_images(path, key="task.prompts"):
        return [dataclasses.replace(p, images=reference(i, side)) for i, p in enumerate(load(path, key))]

    def built(*a, **kw):
        model = build(*a, **kw)
        model.dit.register_forward_pre_hook(counter.pre, with_kwargs=True)
        if cfg_scale != 1.0:
            guided_with_references(model)
        return model

    def marked(*a, **kw):  # a step starts here: the passes so far belong to the steps before
        marks.append((counter.calls, counter.tokens))
        return rollout_step(*a, **kw)

    out = tmp / f"run_{cfg_scale}_{time.monotonic_ns()}"
    cfg = load_config(None, [*overrides, f"sampler.cfg_scale={cfg_scale}", f"steps={warmup + steps}",
                             f"output_dir={out}"])
    P.load_prompt_file, T.build_model = with_images, built
    T.rollout_step, T.ppo_epochs = cpu_timed(marked, roll_s), cpu_timed(ppo_epochs, train_s)
    try:
        T.train(cfg)
    finally:
        P.load_prompt_file, T.build_model, T.rollout_step, T.ppo_epochs = load, build, rollout_step, ppo_epochs
    marks.append((counter.calls, counter.tokens))
    n = cfg.algo.prompts_per_step * cfg.algo.group_size
    # between consecutive step starts (the last step's interval also holds the final evaluation)
    pairs = list(zip(marks[warmup:-2], marks[warmup + 1:-1]))
    calls = [b[0] - a[0] for a, b in pairs]
    return {"rollout_s_per_traj": [s / n for s in roll_s[warmup:]], "train_s": train_s[warmup:],
            "passes_per_step": calls, "tokens_per_pass": [(b[1] - a[1]) / c for (a, b), c in zip(pairs, calls)],
            "trajectories": n}


def pipeline_call_s(folder: str, side: int, num_steps: int, repeats: int) -> dict:
    """Seconds per image of the pipeline's own ``__call__(image=[ref])`` at guidance 1 and 4, interleaved."""
    import PIL.Image
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = PIL.Image.fromarray((reference(0, side)[0] * 255).byte().permute(1, 2, 0).numpy(), mode="RGB")
    times = {1.0: [], PIPELINE_CFG: []}
    for _ in range(repeats + 1):  # the first round warms up
        for g in (1.0, PIPELINE_CFG):
            t0 = time.process_time()
            with torch.no_grad():
                pipe(prompt=PROMPTS, image=[ref], height=side, width=side, num_inference_steps=num_steps,
                     guidance_scale=g, max_sequence_length=48, text_encoder_out_layers=(1, 2), output_type="pt")
            times[g].append((time.process_time() - t0) / len(PROMPTS))
    return {"s_per_image_cfg_free": statistics.median(times[1.0][1:]),
            "s_per_image_cfg": statistics.median(times[PIPELINE_CFG][1:])}


def memory(resolution: int, refs: int, micro: int, rank: int, text_tokens: int) -> None:
    """The memory row (``--memory``; module docstring): parameters by module shapes, bf16 weights,
    LoRA state, and the transformer sequence with and without the references."""
    import transformers
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from unigrpo.models.hf_config import LoRAConfig

    with torch.device("meta"):  # Qwen3-4B and FLUX.2 [klein] 4B (their published configs)
        lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True))
        dit = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                                      mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
        vae = AutoencoderKLFlux2()

    def count(m):
        return sum(p.numel() for p in m.parameters())

    def lora(m, targets):
        return sum(rank * (x.in_features + x.out_features) for n, x in m.named_modules()
                   if isinstance(x, torch.nn.Linear) and any(n.endswith("." + t) for t in targets))

    n_lm, n_dit, n_vae = count(lm), count(dit), count(vae)
    lo = LoRAConfig()
    n_lora = lora(lm, lo.text_targets) + lora(dit, lo.image_targets)
    side = resolution // 16  # VAE 8x, then 2x2 patchify
    noisy = side * side
    hidden = 24 * 128
    blocks = 5 + 20
    weights = 2 * (n_lm + n_dit + n_vae)

    def block_inputs(seq):  # checkpointed activations: every block's input, bf16, per micro-batch
        return blocks * seq * hidden * 2 * micro

    seq_t2i, seq_ref = text_tokens + noisy, text_tokens + noisy * (1 + refs)
    print(f"Qwen3-4B {n_lm / 1e9:.2f} B, transformer {n_dit / 1e9:.2f} B, VAE {n_vae / 1e6:.0f} M; "
          f"LoRA r={rank} both sides {n_lora / 1e6:.1f} M")
    print(f"bf16 weights {weights / 1e9:.1f} GB; LoRA weights + grads + AdamW (fp32, 16 B) {16 * n_lora / 1e9:.2f} GB")
    print(f"transformer sequence at {resolution} px: {seq_t2i} tokens text-to-image, {seq_ref} with {refs} "
          f"reference(s) of {resolution} px (x{seq_ref / seq_t2i:.2f} linear, x{(seq_ref / seq_t2i) ** 2:.2f} attention)")
    print(f"checkpointed block inputs per micro-batch of {micro}: {block_inputs(seq_t2i) / 1e9:.1f} GB -> "
          f"{block_inputs(seq_ref) / 1e9:.1f} GB; reference latents in the context: "
          f"{refs * 128 * noisy * 4 / 1e6:.1f} MB per row (fp32)")


def overrides_for(c, folder: str, prompts: Path, args, extra: list[str]) -> list[str]:
    return [*c.hf_overrides(folder), f"model.resolution={args.side}", "task.kind=prompts", f"task.prompts={prompts}",
            "rewards=[{name: group_diversity}]", "algo.prompts_per_step=2", "algo.group_size=4",
            "algo.trajectories_per_minibatch=8", "algo.micro_batch_trajectories=8", "algo.ppo_epochs=1",
            f"sampler.num_steps={NUM_STEPS}", "sampler.window_range=[0,3]", "sampler.window_size=2",
            "text.max_reasoning_tokens=16", f"threads={args.threads}", "eval_every=0", "eval.at_start=false",
            "eval.num_prompts=1", "eval.grid_prompts=1", "sampler.eval_num_steps=2", "save_every=0", "log_every=1",
            *extra]


def measure(parts: list[str], args, extra: list[str]) -> list[dict]:
    """Each of ``parts`` ("cfg_free", "cfg", "pipeline") once, in this order, in this process."""
    c = conftest()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = c.build_tiny_flux2(str(tmp / "pipe"))
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        overrides = overrides_for(c, folder, prompts, args, extra)
        for part in parts:
            if part == "pipeline":
                out.append({"part": part, **pipeline_call_s(folder, args.side, NUM_STEPS, 1)})
            else:
                scale = 1.0 if part == "cfg_free" else PIPELINE_CFG
                out.append({"part": part, **one_run(overrides, scale, args.steps, args.warmup, args.side, tmp)})
    return out


def summarize(measured: list[dict], args, extra: list[str]) -> dict:
    import diffusers
    import transformers

    runs = {k: [m for m in measured if m["part"] == k] for k in ("cfg_free", "cfg", "pipeline")}

    def med(part: str, key: str) -> float:
        return statistics.median(v for r in runs[part] for v in (r[key] if isinstance(r[key], list) else [r[key]]))

    r = {
        "rollout_s_per_traj_cfg_free": med("cfg_free", "rollout_s_per_traj"),
        "rollout_s_per_traj_cfg": med("cfg", "rollout_s_per_traj"),
        "passes": {"cfg_free": 1, "cfg": 2, "per_step_measured_cfg_free": med("cfg_free", "passes_per_step"),
                   "per_step_measured_cfg": med("cfg", "passes_per_step"),
                   "tokens_per_pass_cfg_free": med("cfg_free", "tokens_per_pass"),
                   "tokens_per_pass_cfg": med("cfg", "tokens_per_pass")},
        "train_step_ratio": med("cfg", "train_s") / med("cfg_free", "train_s"),
        "train_s_cfg_free": med("cfg_free", "train_s"), "train_s_cfg": med("cfg", "train_s"),
        "rollout_ratio": med("cfg", "rollout_s_per_traj") / med("cfg_free", "rollout_s_per_traj"),
        "clock": "process CPU seconds (time.process_time), torch threads as --threads",
        "cfg_scale": PIPELINE_CFG, "guidance": "neg + s (pos - neg), negative prompt \"\" with the same references",
        "pipeline_call": ({"s_per_image_cfg_free": med("pipeline", "s_per_image_cfg_free"),
                           "s_per_image_cfg": med("pipeline", "s_per_image_cfg")} if runs["pipeline"] else None),
        "batch": {"trajectories_per_step": runs["cfg_free"][0]["trajectories"], "side_px": args.side,
                  "references_per_prompt": 1, "num_steps": NUM_STEPS, "window_size": 2, "ppo_epochs": 1,
                  "reasoning_tokens": 16, "runs_per_setting": len(runs["cfg"]),
                  "counted_steps_per_setting": sum(len(x["train_s"]) for x in runs["cfg"]), "overrides": extra},
    }
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "diffusers": diffusers.__version__, "gpu": None},
            FAMILY: r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting (interleaved)")
    ap.add_argument("--steps", type=int, default=2, help="counted steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted first steps per run")
    ap.add_argument("--side", type=int, default=64, help="output and reference side in pixels (the pipeline refuses references under 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time == compute time)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--memory", action="store_true", help="print the memory row of docs/models.md and exit")
    ap.add_argument("--part", choices=["cfg_free", "cfg", "pipeline"], action="append",
                    help="measure only these (repeatable) and append them to --parts; a busy machine runs the "
                         "benchmark in several short processes this way, then --collect")
    ap.add_argument("--parts", default=str(OUT.with_suffix(".parts.jsonl")))
    ap.add_argument("--collect", action="store_true", help="summarize --parts into --out")
    args, extra = ap.parse_known_args()
    if args.memory:
        memory(resolution=512, refs=1, micro=8, rank=32, text_tokens=512)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.part:
        with open(args.parts, "a") as f:
            f.writelines(json.dumps(m) + "\n" for m in measure(args.part, args, extra))
        return
    if args.collect:
        measured = [json.loads(x) for x in Path(args.parts).read_text().splitlines() if x.strip()]
    else:  # interleaved in one process: A B A B ..., then the pipeline's own calls
        measured = measure(["cfg_free", "cfg"] * args.repeats + ["pipeline"], args, extra)
    result = summarize(measured, args, extra)
    r = result[FAMILY]
    pipe = r["pipeline_call"] or {"s_per_image_cfg_free": float("nan"), "s_per_image_cfg": float("nan")}
    print(f"{FAMILY}: rollout {r['rollout_s_per_traj_cfg_free'] * 1e3:.1f} ms/traj CFG-free vs "
          f"{r['rollout_s_per_traj_cfg'] * 1e3:.1f} ms/traj CFG {PIPELINE_CFG} (x{r['rollout_ratio']:.2f}); "
          f"train step x{r['train_step_ratio']:.2f} ({r['train_s_cfg_free']:.2f} s vs {r['train_s_cfg']:.2f} s); "
          f"transformer passes per step {r['passes']['per_step_measured_cfg_free']:.0f} vs "
          f"{r['passes']['per_step_measured_cfg']:.0f}; pipeline __call__ {pipe['s_per_image_cfg_free'] * 1e3:.1f} vs "
          f"{pipe['s_per_image_cfg'] * 1e3:.1f} ms/image (CPU seconds)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
