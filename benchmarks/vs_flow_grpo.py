"""Image-only FlowGRPO step time: unigrpo's pieces against flow_grpo's own SD3 code, same pipeline, same CPU.

    HF_HUB_OFFLINE=1 python benchmarks/vs_flow_grpo.py --flow-grpo DIR [--repeats 3] [--warmup 1]
        [--threads 2] [--prompts 4] [--group 4]

flow_grpo (github.com/yifan123/flow_grpo) is not on a package index and is NOT a dependency: pass
the path of your own checkout with ``--flow-grpo``. This script imports exactly three modules
from it and says which at start: ``flow_grpo.diffusers_patch.sd3_sde_with_logprob``
(``sde_step_with_logprob``), ``sd3_pipeline_with_logprob_fast`` (the ``train_sd3_fast.py``
sampler: SDE window) and ``sd3_pipeline_with_logprob`` (the ``train_sd3.py`` sampler: every step
stochastic), plus ``flow_grpo.stat_tracking.PerPromptStatTracker`` (its advantages). Its training
loop lives inside ``main()`` of ``scripts/train_sd3*.py`` (with wandb, absl and accelerate around
it), so the inner loop is restated here, line for line in what it computes: per trained step one
transformer call (a doubled batch with CFG), ``sde_step_with_logprob`` in scoring mode, the clipped
loss ``mean(max(-A r, -A clip(r)))`` with clamped advantages, ``backward`` of loss / W (what
accelerate's gradient accumulation over the W steps divides by), and after the W steps gradient
clipping, AdamW and ``zero_grad``. No shim was needed: the modules run unchanged with diffusers
0.42.1.

Both sides start from the same tiny random ``StableDiffusion3Pipeline`` (the tests' builder,
``tests/models/conftest.py::build_tiny_sd3``: SD3.5-style 2-layer transformer, CLIP-L, CLIP-G, T5,
3-level VAE, static shift 3), each loading its own copy from the same folder and fully training its
transformer (flow_grpo ``use_lora=False``; ours ``image_rank=0``), AdamW lr 1e-4, weight decay 1e-4,
clip 1.0, fp32. The prompts are encoded once by the pipeline's own ``encode_prompt`` (flow_grpo's
train script also encodes outside its sampler) and both sides get the same tensors, and the same
negative-prompt ("") embedding for CFG. The schedule is the scheduler's own default grid on both
sides (flow_grpo calls the pipeline without ``sigmas``; ours ``sampler.shift: null``). Reward, on
both sides: the mean pixel value of each image (cheap, identical; not the point here).

Two settings, each on the same batch (``--prompts`` x ``--group`` images, 32 px, 10 steps):

- **fast** (flow_grpo's ``geneval_sd3_fast_nocfg``): no CFG in sampling or training, noise level
  0.8, a 3-step SDE window starting uniformly in [0, 5 - 3], clip range 1e-5, beta 0. The window
  start is the same on both sides (flow_grpo draws it with python ``random``; we seed that and give
  ours the same start).
- **cfg** (flow_grpo's ``train_sd3.py`` default path): CFG 4.5 in sampling and training, noise
  level 0.7, every step stochastic in flow_grpo's sampler and the first 9 of 10 trained
  (``timestep_fraction`` 0.99), clip range 1e-4, beta 0. Ours: a 9-step window at 0 with CFG 4.5
  (our last step is the Euler step, flow_grpo's a stochastic one: the same model calls).

What one timed step includes, on each side: sampling with log-probs (all model calls, the VAE
decode), the reward, the advantages, the training pass over the trained steps with backward, and
gradient clipping + AdamW + ``zero_grad``. Ours is ``rollout.sample_images`` (the recipe's
sampler), ``group_advantages``, ``rollout.score_window`` + ``flow_grpo_loss`` (the recipe's
``image_loss`` without a reference), one ``backward`` over the window.

A third side, ``ours_batched_cfg`` (cfg setting only), is ours with the two CFG branches in one
transformer call on a doubled batch, as flow_grpo does (``BatchedCFGStep``: a measurement of what
``rollout.guided_velocity``, which makes two calls, would gain; not the library's behaviour).

The sides are interleaved in one process (each repeat: one step of each side per setting, the order
rotating), after ``--warmup`` uncounted steps of each. Before timing, an equivalence check on the
same states: the window states of one of our rollouts re-scored by our ``sde_step`` and by
flow_grpo's ``sde_step_with_logprob`` (each with its own transformer call on identical weights; with
CFG each with its own guidance), max |difference| of the per-step log-probs and velocities.
Writes benchmarks/results/vs_flow_grpo.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "vs_flow_grpo.json"
PROMPTS = ["a red circle", "two green triangles above a yellow circle", "a blue square",
           "a yellow circle left of a red square", "two red triangles", "a green square above a blue triangle"]
LR, WEIGHT_DECAY, RESOLUTION, NUM_STEPS, MAX_TOKENS, ADV_CLIP = 1e-4, 1e-4, 32, 10, 64, 5.0
SETTINGS = {
    "fast": {"cfg": 1.0, "noise_level": 0.8, "window_size": 3, "window_range": (0, NUM_STEPS // 2), "eps": 1e-5},
    "cfg": {"cfg": 4.5, "noise_level": 0.7, "window_size": int(NUM_STEPS * 0.99), "window_range": None, "eps": 1e-4},
}


def load_flow_grpo(path: str) -> dict:
    """flow_grpo's own modules from the user's checkout ``path`` (module docstring)."""
    root = Path(path).expanduser().resolve()
    if not (root / "flow_grpo" / "diffusers_patch" / "sd3_sde_with_logprob.py").is_file():
        raise SystemExit(f"--flow-grpo: {root} is not a flow_grpo checkout "
                         "(no flow_grpo/diffusers_patch/sd3_sde_with_logprob.py)")
    sys.path.insert(0, str(root))
    mods = {name: importlib.import_module(f"flow_grpo.{name}") for name in (
        "diffusers_patch.sd3_sde_with_logprob", "diffusers_patch.sd3_pipeline_with_logprob_fast",
        "diffusers_patch.sd3_pipeline_with_logprob", "stat_tracking")}
    for name, m in mods.items():
        print(f"[vs_flow_grpo] flow_grpo: imported flow_grpo.{name} from {m.__file__}")
    return {"sde_step": mods["diffusers_patch.sd3_sde_with_logprob"].sde_step_with_logprob,
            "pipeline_fast": mods["diffusers_patch.sd3_pipeline_with_logprob_fast"].pipeline_with_logprob,
            "pipeline": mods["diffusers_patch.sd3_pipeline_with_logprob"].pipeline_with_logprob,
            "tracker": mods["stat_tracking"].PerPromptStatTracker, "root": str(root)}


def build_pipeline(folder: str) -> str:
    """The tests' tiny random SD3 pipeline (one copy of the recipe: tests/models/conftest.py)."""
    sys.path.insert(0, str(ROOT / "tests"))  # conftest's builders import testkit
    spec = importlib.util.spec_from_file_location("hf_conftest", ROOT / "tests" / "models" / "conftest.py")
    conftest = sys.modules["hf_conftest"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    conftest.build_tiny_sd3(str(Path(folder) / "pipe"))
    conftest.build_tiny_reasoner(str(Path(folder) / "reasoner"))
    return folder


def reward_fn(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N] mean pixel value (both sides)."""
    return images.float().reshape(len(images), -1).mean(1)


class ImageOnly:
    """Our SD3 adapter with the text side replaced by fixed, pre-encoded prompts: what
    ``rollout.sample_images`` / ``score_window`` read. A row's token id is its index into the
    encoded batch (``forward_context`` looks its context up; no reasoning, log-probs 0)."""

    def __init__(self, sd3, hidden: torch.Tensor, pooled: torch.Tensor, neg_hidden: torch.Tensor,
                 neg_pooled: torch.Tensor):
        from unigrpo.models.hf_sd3 import SD3Context

        self.sd3, self.ctx_type = sd3, SD3Context
        self.hidden, self.pooled, self.neg = hidden, pooled, (neg_hidden, neg_pooled)
        self.latent_shape, self.device = sd3.latent_shape, hidden.device

    def tokens(self, n: int):
        from unigrpo.models.protocol import TokenBatch

        ids = torch.arange(n, device=self.hidden.device)[:, None]
        return TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))

    def _ctx(self, hidden, pooled):
        return self.ctx_type(hidden, pooled, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device))

    def forward_context(self, tokens, temperature: float = 1.0):
        rows = tokens.ids[:, 0]
        return torch.zeros(tokens.ids.shape, device=rows.device), self._ctx(self.hidden[rows], self.pooled[rows])

    def null_context(self, b: int):
        h, p = self.neg
        return self._ctx(h.expand(b, -1, -1), p.expand(b, -1))

    def detach_context(self, ctx):
        return self.sd3.detach_context(ctx)

    def velocity(self, x_t, t, ctx):
        return self.sd3.velocity(x_t, t, ctx)

    def combine_guidance(self, v_cond, v_uncond, cfg_scale):
        return self.sd3.combine_guidance(v_cond, v_uncond, cfg_scale)

    def timesteps(self, num_steps, shift):
        return self.sd3.timesteps(num_steps, shift)

    def decode(self, x0):
        return self.sd3.decode(x0)

    def decode_text(self, tokens):
        return [""] * len(tokens)


class OurStep:
    """An image-only FlowGRPO step from unigrpo's own pieces (module docstring, "ours")."""

    def __init__(self, model: ImageOnly, group: int):
        self.model, self.group = model, group
        self.params = [p for p in model.sd3.dit.parameters()]
        model.sd3.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)

    def sample(self, s: dict, step: int, start: int):
        from unigrpo import rollout as R

        n = len(self.model.hidden)
        return R.sample_images(self.model, self.model.tokens(n), [R.derive_seed(0, step, i, R.NOISE) for i in range(n)],
                               torch.full((n,), start), num_steps=NUM_STEPS, shift=None, kind="flow_sde",
                               noise_level=s["noise_level"], window_size=s["window_size"], cfg_scale=s["cfg"],
                               temperature=1.0, reduction="mean")

    def step(self, s: dict, step: int, start: int) -> dict:
        from unigrpo import rollout as R
        from unigrpo.algo.advantages import group_advantages
        from unigrpo.algo.image_loss import flow_grpo_loss

        rnd = self.sample(s, step, start)
        adv = group_advantages(reward_fn(rnd.images).reshape(-1, self.group)).flatten()
        _, ctx = self.model.forward_context(rnd.tokens)
        sc = R.score_window(self.model, rnd, self.model.detach_context(ctx), kind="flow_sde",
                            noise_level=s["noise_level"], cfg_scale=s["cfg"], reduction="mean")
        logp = torch.stack(sc.logp, 1)  # [N, W]
        loss, st = flow_grpo_loss(logp, rnd.logp_img_old, adv.to(logp.device), s["eps"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"ratio_max": float(st["ratio_max"]), "logp_diff_max": float((logp - rnd.logp_img_old).abs().max().detach())}


class BatchedCFGStep(OurStep):
    """Ours with the two CFG branches in ONE transformer call on a doubled batch (flow_grpo's way),
    sampling and scoring alike (so the first ratio is still exactly 1): what ``rollout.guided_velocity``
    would gain by batching its two calls. Not the library's behaviour: a measurement of it."""

    def _guided(self, model, x_t, t, ctx, null_ctx, cfg_scale):
        if cfg_scale == 1.0 or null_ctx is None:
            return model.velocity(x_t, t, ctx)
        both = model._ctx(torch.cat([null_ctx.hidden, ctx.hidden]), torch.cat([null_ctx.pooled, ctx.pooled]))
        v_u, v_c = model.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return model.combine_guidance(v_c, v_u, cfg_scale)

    def _patched(self, fn, *a):
        from unigrpo import rollout as R

        saved, R.guided_velocity = R.guided_velocity, self._guided
        try:
            return fn(*a)
        finally:
            R.guided_velocity = saved

    def sample(self, s: dict, step: int, start: int):
        return self._patched(super().sample, s, step, start)

    def step(self, s: dict, step: int, start: int) -> dict:
        return self._patched(super().step, s, step, start)


class FlowGRPOStep:
    """flow_grpo's sampling-with-log-prob and its training inner loop (module docstring)."""

    def __init__(self, fg: dict, pipe, embeds: tuple, prompts: list[str]):
        self.fg, self.pipe, self.prompts = fg, pipe, prompts
        self.hidden, self.pooled, self.neg_hidden, self.neg_pooled = embeds
        pipe.vae.requires_grad_(False)
        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            enc.requires_grad_(False)
        pipe.transformer.requires_grad_(True)  # use_lora=False
        pipe.set_progress_bar_config(disable=True)
        self.params = [p for p in pipe.transformer.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999), eps=1e-8)

    def sample(self, s: dict, seed: int):
        """(images, latents [N, W+1, ...], log_probs [N, W], timesteps [N, W]) as its train scripts stack them."""
        n = len(self.hidden)
        kw = {"prompt_embeds": self.hidden, "pooled_prompt_embeds": self.pooled,
              "negative_prompt_embeds": self.neg_hidden.expand(n, -1, -1),
              "negative_pooled_prompt_embeds": self.neg_pooled.expand(n, -1),
              "num_inference_steps": NUM_STEPS, "guidance_scale": s["cfg"], "output_type": "pt",
              "height": RESOLUTION, "width": RESOLUTION, "noise_level": s["noise_level"], "max_sequence_length": MAX_TOKENS}
        if s["window_range"] is not None:  # train_sd3_fast.py
            random.seed(seed)  # its window start: python random
            images, latents, log_probs, ts = self.fg["pipeline_fast"](
                self.pipe, sde_window_size=s["window_size"], sde_window_range=s["window_range"], sde_type="sde", **kw)
            timesteps = torch.stack(ts).unsqueeze(0).repeat(n, 1)
        else:  # train_sd3.py: every step stochastic, the first W trained
            images, latents, log_probs = self.fg["pipeline"](self.pipe, **kw)
            timesteps = self.pipe.scheduler.timesteps.repeat(n, 1)
        return images, torch.stack(latents, 1), torch.stack(log_probs, 1), timesteps

    def step(self, s: dict, step: int, start: int) -> dict:
        images, latents, log_probs, timesteps = self.sample(s, seed=step)
        tracker = self.fg["tracker"](False)
        adv = torch.as_tensor(tracker.update(self.prompts, reward_fn(images).cpu().numpy())).float().to(images.device)
        cfg = s["cfg"] > 1
        embeds = torch.cat([self.neg_hidden.expand(len(adv), -1, -1), self.hidden]) if cfg else self.hidden
        pooled = torch.cat([self.neg_pooled.expand(len(adv), -1), self.pooled]) if cfg else self.pooled
        w = s["window_size"]
        self.pipe.transformer.train()
        ratio_max, diff_max = 0.0, 0.0
        for j in range(w):
            x, t = latents[:, j], timesteps[:, j]
            noise_pred = self.pipe.transformer(hidden_states=torch.cat([x] * 2) if cfg else x,
                                               timestep=torch.cat([t] * 2) if cfg else t, encoder_hidden_states=embeds,
                                               pooled_projections=pooled, return_dict=False)[0]
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + s["cfg"] * (text - uncond)
            _, log_prob, _, _ = self.fg["sde_step"](self.pipe.scheduler, noise_pred.float(), t, x.float(),
                                                    prev_sample=latents[:, j + 1].float(), noise_level=s["noise_level"])
            a = torch.clamp(adv, -ADV_CLIP, ADV_CLIP)
            ratio = torch.exp(log_prob - log_probs[:, j])
            loss = torch.mean(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - s["eps"], 1.0 + s["eps"])))
            (loss / w).backward()  # accelerate's accumulation over the W steps divides by W
            ratio_max = max(ratio_max, float(ratio.max().detach()))
            diff_max = max(diff_max, float((log_prob - log_probs[:, j]).abs().max()))
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.pipe.transformer.eval()
        return {"ratio_max": ratio_max, "logp_diff_max": diff_max}


def window_start(s: dict, step: int) -> int:
    """The fast pipeline's own draw (python ``random`` seeded with the step), so both sides train the same steps."""
    if s["window_range"] is None:
        return 0
    random.seed(step)
    lo, hi = s["window_range"]
    return random.randint(lo, hi - s["window_size"])


def check_equivalence(ours: OurStep, theirs: FlowGRPOStep, s: dict) -> dict:
    """Per-step log-probs of the same window states, ours vs flow_grpo's, each from its own transformer
    call (identical weights) and its own CFG combination."""
    from unigrpo.algo.sde import sde_step
    from unigrpo.rollout import guided_velocity

    m, pipe = ours.model, theirs.pipe
    start = window_start(s, 10_000)
    rnd = ours.sample(s, 10_000, start)
    pipe.scheduler.set_timesteps(NUM_STEPS, device=rnd.x_t.device)
    _, ctx = m.forward_context(rnd.tokens)
    null = m.null_context(len(rnd)) if s["cfg"] != 1.0 else None
    cfg = s["cfg"] > 1
    out = {"logp_max_abs_diff": 0.0, "logp_max_abs": 0.0, "velocity_max_abs_diff": 0.0, "recorded_vs_ours_max_abs_diff": 0.0}
    with torch.no_grad():
        for j in range(s["window_size"]):
            x, x_next, t, t_next = rnd.x_t[:, j], rnd.x_next[:, j], rnd.t[:, j], rnd.t_next[:, j]
            v = guided_velocity(m, x, t, ctx, null, s["cfg"]).float()
            lp = sde_step(x, v, t, t_next, s["noise_level"], "flow_sde", prev_sample=x_next).log_prob
            ts = pipe.scheduler.timesteps[start + j].expand(len(x))  # the scheduler's own timestep value
            h = torch.cat([theirs.neg_hidden.expand(len(x), -1, -1), theirs.hidden]) if cfg else theirs.hidden
            p = torch.cat([theirs.neg_pooled.expand(len(x), -1), theirs.pooled]) if cfg else theirs.pooled
            pred = pipe.transformer(hidden_states=torch.cat([x] * 2) if cfg else x, timestep=torch.cat([ts] * 2) if cfg else ts,
                                    encoder_hidden_states=h, pooled_projections=p, return_dict=False)[0]
            if cfg:
                u, c = pred.chunk(2)
                pred = u + s["cfg"] * (c - u)
            _, lp_fg, _, _ = theirs.fg["sde_step"](pipe.scheduler, pred.float(), ts, x.float(), prev_sample=x_next.float(),
                                                   noise_level=s["noise_level"])
            out["logp_max_abs_diff"] = max(out["logp_max_abs_diff"], float((lp - lp_fg).abs().max()))
            out["logp_max_abs"] = max(out["logp_max_abs"], float(lp.abs().max()))
            out["velocity_max_abs_diff"] = max(out["velocity_max_abs_diff"], float((v - pred.float()).abs().max()))
            out["recorded_vs_ours_max_abs_diff"] = max(out["recorded_vs_ours_max_abs_diff"],
                                                       float((lp - rnd.logp_img_old[:, j]).abs().max()))
    out["window_start"], out["steps_checked"] = start, s["window_size"]
    return out


def encode_batch(pipe, prompts: list[str], group: int) -> tuple:
    """(hidden, pooled, negative hidden, negative pooled): the pipeline's own ``encode_prompt`` of
    the batch (prompt-major, as both samplers lay groups out) and of the negative prompt ""."""
    rows = [p for p in prompts for _ in range(group)]
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(rows, rows, rows, do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_TOKENS)
        neg_hidden, _, neg_pooled, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False,
                                                          max_sequence_length=MAX_TOKENS)
    return hidden, pooled, neg_hidden, neg_pooled


def build_ours(folder: str, embeds: tuple, group: int, cls=OurStep, device: str = "cpu") -> OurStep:
    """Our side on its own copy of the pipeline (``folder`` from ``build_pipeline``)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unigrpo.models.hf_sd3 import SD3

    pipe = StableDiffusion3Pipeline.from_pretrained(str(Path(folder) / "pipe")).to(device)
    reasoner = Path(folder) / "reasoner"  # SD3's adapter carries a reasoner; this benchmark never calls it
    sd3 = SD3(AutoModelForCausalLM.from_pretrained(reasoner), AutoTokenizer.from_pretrained(reasoner),
              pipe.transformer, pipe.vae, dict(pipe.scheduler.config),
              {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2, "t5": pipe.text_encoder_3},
              (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), resolution=RESOLUTION, max_text_tokens=MAX_TOKENS)
    return cls(ImageOnly(sd3, *embeds), group)


def build_sides(folder: str, fg: dict, prompts: list[str], group: int, device: str = "cpu"):
    """{side: step} on their own copies of the same pipeline, the same encoded batch."""
    from diffusers import StableDiffusion3Pipeline

    pipe_fg = StableDiffusion3Pipeline.from_pretrained(str(Path(folder) / "pipe")).to(device)
    embeds = encode_batch(pipe_fg, prompts, group)
    rows = [p for p in prompts for _ in range(group)]
    return {"ours": build_ours(folder, embeds, group, device=device),
            "ours_batched_cfg": build_ours(folder, embeds, group, BatchedCFGStep, device),
            "flow_grpo": FlowGRPOStep(fg, pipe_fg, embeds, rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow-grpo", required=True, help="path of a flow_grpo checkout (not a dependency)")
    ap.add_argument("--repeats", type=int, default=3, help="counted interleaved steps of each side and setting")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted first steps of each side and setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (both sides)")
    ap.add_argument("--settings", default="fast,cfg", help="comma-separated subset of: " + ",".join(SETTINGS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        raise SystemExit(f"--prompts: between 1 and {len(PROMPTS)}, got {args.prompts}")
    if args.group < 2:
        raise SystemExit(f"--group: at least 2 (group advantages), got {args.group}")
    names = args.settings.split(",")
    if unknown := [n for n in names if n not in SETTINGS]:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    fg = load_flow_grpo(args.flow_grpo)
    import diffusers
    import transformers

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_pipeline(tmp)
        torch.manual_seed(0)
        sides = build_sides(tmp, fg, PROMPTS[:args.prompts], args.group, args.device)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        equivalence = {n: check_equivalence(sides["ours"], sides["flow_grpo"], SETTINGS[n]) for n in names}
        print(f"[vs_flow_grpo] equivalence: {equivalence}", flush=True)
        # the batched-CFG variant only differs from ours with CFG
        run = {n: [k for k in sides if k != "ours_batched_cfg" or SETTINGS[n]["cfg"] != 1.0] for n in names}
        times = {n: {k: [] for k in run[n]} for n in names}
        info = {n: {k: [] for k in run[n]} for n in names}
        for step in range(args.warmup + args.repeats):
            for n in names:
                s = SETTINGS[n]
                start = window_start(s, step)
                k = step % len(run[n])
                for side in run[n][k:] + run[n][:k]:  # rotate the order
                    sync()
                    t0 = time.perf_counter()
                    info[n][side].append(sides[side].step(s, step, start))
                    sync()
                    times[n][side].append(time.perf_counter() - t0)
                    print(f"[vs_flow_grpo] step {step} {n} {side}: {times[n][side][-1]:.3f} s", flush=True)
    for n in names:
        med = {k: statistics.median(v[args.warmup:]) for k, v in times[n].items()}
        ratios = {k: med[k] / med["flow_grpo"] for k in med if k != "flow_grpo"}
        per_repeat = {k: [o / f for o, f in zip(times[n][k][args.warmup:], times[n]["flow_grpo"][args.warmup:])]
                      for k in ratios}
        results[n] = {"setting": dict(SETTINGS[n]), "median_step_s": med, "ratio_over_flow_grpo": ratios,
                      "ratio_per_repeat": per_repeat, "step_s": times[n],
                      "images_per_s": {k: args.prompts * args.group / v for k, v in med.items()},
                      "first_update_logp_diff_max": {k: max(r["logp_diff_max"] for r in v) for k, v in info[n].items()},
                      "equivalence": equivalence[n]}
        r, e = results[n], equivalence[n]
        print(f"{n}: median of {args.repeats} steps: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        for k, q in ratios.items():
            print(f"  {k} / flow_grpo {q:.2f} (per repeat {[round(x, 2) for x in per_repeat[k]]})")
        print(f"  equivalence on the same states: max|logp ours - flow_grpo| {e['logp_max_abs_diff']:.2g} "
              f"(max|logp| {e['logp_max_abs']:.3g}), max|v diff| {e['velocity_max_abs_diff']:.2g}; "
              f"first re-scoring vs the rollout's logp (ratio 1): {r['first_update_logp_diff_max']}")
    out = {"machine": {"device": args.device, "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "threads": args.threads, "torch": torch.__version__, "diffusers": diffusers.__version__,
                       "transformers": transformers.__version__},
           "flow_grpo_checkout": fg["root"],
           "batch": {"prompts": args.prompts, "group": args.group, "resolution": RESOLUTION, "num_steps": NUM_STEPS,
                     "lr": LR}, "repeats": args.repeats, "warmup": args.warmup, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
