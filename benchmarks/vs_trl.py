"""Text-only GRPO step time: unigrpo's pieces against TRL's ``GRPOTrainer``, same model, same CPU.

    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py [--steps 10] [--warmup 2] [--threads 2]
        [--trl-gradient-checkpointing] [--compile] [--no-per-group] [--profile] [--device cpu|cuda]

Needs the ``bench`` extra (``pip install -e '.[dev,bench]'``: trl, datasets). Nothing is
downloaded: the tokenizer is the tests' byte-level BPE trained in code (``tests/testkit.py``), the
model a random ``Qwen2ForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128,
tied embeddings) built once from a seed; each side trains its own deep copy of the same weights.

The batch, on both sides: 8 prompts x 8 completions (64 trajectories), exactly 32 new tokens per
completion (TRL: ``min_new_tokens=32`` keeps EOS out; ours: no stop ids), temperature 1, top-p 1,
1 PPO epoch (on-policy, ratio 1), beta 0 (no reference model), ``loss_type="grpo"`` == our
``seq_mean``, AdamW at the same constant lr, gradient clipping at 1.0, no gradient checkpointing
(TRL's default is on; ``--trl-gradient-checkpointing`` measures that too), fp32. The reward, on
both sides: the number of times the letter "e" occurs in the completion text. Advantages: each side its own
(TRL's std has ddof 1, ours ddof 0: the same up to a factor sqrt(8/7); no effect on the work).

What one timed step includes:

- **TRL**: from ``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback``: chat template and
  tokenisation of the 64 prompts, ``model.generate`` (KV cache), decoding, the reward, its
  advantages and its metric bookkeeping, one teacher-forced pass with gradient (its fused
  lm-head log-prob and entropy), the loss, backward, gradient clipping, AdamW, lr scheduler and
  ``zero_grad``. Not included: the data loader's fetch (before the step) and the trainer's
  logging (after it).
- **ours** (``OurGRPO.step``): the chat template + tokenisation of the 64 prompts, our seeded
  KV-cache loop ``CausalLMReasoner.sample_reasoning`` with one ``torch.Generator`` per group (one
  loop for all rows, a generator per row, on transformers' ``DynamicCache``, ``unigrpo train``'s
  defaults: ``text.token_sampler: multinomial``, i.e. ``torch.multinomial``'s tokens drawn without its
  checks); ``ours_before``: the same with ``torch.multinomial`` itself, the library before the fast
  decode (the same tokens); ``ours_inverse_cdf``: ``text.token_sampler: inverse_cdf`` (other tokens);
  ``ours_static``: that on our preallocated ``StaticKV`` (``text.static_cache``);
  ``ours_compiled`` (``--compile``): that static step under ``torch.compile`` (``text.compile``);
  ``ours_per_group``: ``rollout.sample_reasoning``, one loop per group, as
  ``unigrpo train`` samples with ``text.batch_groups: false``), decoding, the same reward,
  ``group_advantages``, ONE teacher-forced ``forward_context`` pass with gradient,
  ``text_grpo_loss(aggregation="seq_mean")`` with ``logp_old = logp.detach()`` (what TRL does at
  ``num_iterations=1``), backward, gradient clipping, AdamW, ``zero_grad``. Not included: logging.

The sides are interleaved in one process (each TRL step's ``on_step_end`` runs and times one step
of each of ours, in alternating order), so all see the same machine load; the first ``--warmup``
steps of each are not counted. Each step's wall time and process CPU time are both recorded: on a
machine shared with other jobs the CPU time (``--threads 1``: no thread waits on another) is what
a step costs, the wall time also what the scheduler gave it.
Before timing, two cheap equivalence checks: on one group of our sampled batch, with the same
advantages, our loss and TRL's own ``_compute_loss`` give the same value and the same gradient;
and for each one-loop variant of ours, the decode-time log-probs of a full sampled batch equal
the teacher-forced ones (max |difference| printed).
Also timed: each side's phases (ours: sampling / reward + advantages / forward + loss / backward /
clip + AdamW; TRL: its ``_generate_and_score_completions``, its ``compute_loss`` and the rest).
Prints the medians and writes benchmarks/results/vs_trl.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "vs_trl.json"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["a red circle", "two green triangles above a yellow circle", "a blue square",
           "the sky is blue so draw a blue circle", "a yellow circle left of a red square",
           "two red triangles", "a green square above a blue triangle", "draw a red circle left of a blue square"]
GROUP, NEW_TOKENS, LR, SEED = 8, 32, 1e-4, 0


def now() -> float:
    """The wall clock after the GPU's queued work (if any) is done: a step's time includes its kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def build_model_and_tokenizer(seed: int = SEED):
    """The tests' code-trained BPE (ChatML template, left padding) and a random tiny Qwen2."""
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))  # testkit: the one copy of the tokenizer recipe
    from testkit import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(CHATML, padding_side="left")
    torch.manual_seed(seed)
    lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None))
    return lm, tok


def e_count(texts: list[str]) -> list[float]:
    """The toy reward of both sides: occurrences of the letter "e" (a random model rarely writes
    "red": its groups would all score 0, advantages 0 and no gradient)."""
    return [float(t.count("e")) for t in texts]


def multinomial_rows(logits: torch.Tensor, top_p: float, generator, token_sampler=None) -> torch.Tensor:
    """The engine's sampler before the fast decode (``ours_before``): ``torch.multinomial`` of the
    nucleus (its probability checks included), one call per run of rows sharing a generator."""
    from unigrpo.models.decode import nucleus, runs

    return torch.cat([torch.multinomial(nucleus(logits[start:end].softmax(-1), top_p), 1, generator=g)[:, 0]
                      for start, end, g in runs(generator, len(logits))])


@contextlib.contextmanager
def previous_sampler(on: bool):
    """While ``on``: the engine samples with ``multinomial_rows`` (only the sampler differs)."""
    from unigrpo.models import decode

    current = decode.sample_rows
    decode.sample_rows = multinomial_rows if on else current
    try:
        yield
    finally:
        decode.sample_rows = current


class OurGRPO:
    """A text-only GRPO step from unigrpo's own pieces (module docstring, "ours")."""

    def __init__(self, lm, tok, batched: bool, lr: float = LR, seed: int = SEED, static_cache: bool = False,
                 compile: bool = False, multinomial: bool = False, token_sampler: str = "multinomial"):
        from unigrpo.models.hf_text import CausalLMReasoner

        self.lm = lm
        # no stop id: exactly NEW_TOKENS tokens
        self.reasoner = CausalLMReasoner(lm, tok, stop_ids=())
        self.reasoner.configure_decode(token_sampler=token_sampler, static_cache=static_cache, compile=compile)
        # TRL's (transformers Trainer's) AdamW: betas (0.9, 0.999), eps 1e-8, weight decay 0
        self.opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
        self.seed, self.batched, self.multinomial = seed, batched, multinomial

    def sample(self, prompts: list[str], step: int, return_logprobs: bool = False):
        """[P * G, L] prompt + completion, group p drawing from its own seeded generator (and with
        ``return_logprobs`` the decode-time log-probs [P * G, L]; the one-loop path only)."""
        from unigrpo import rollout as R

        seeds = [R.derive_seed(self.seed, step, p, R.REASONING) for p in range(len(prompts))]
        if not self.batched:  # as `unigrpo train` samples with text.batch_groups: false: a loop per group
            return R.sample_reasoning(self.reasoner, prompts, GROUP, seeds, thinking=True, batch_groups=False,
                                      max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0)
        # one decode loop for all groups: one generator per row, shared by a group's rows
        device = self.reasoner.device  # a generator lives where its draws are made
        gens = [g for s in seeds for g in [torch.Generator(device=device).manual_seed(s)] * GROUP]
        batch = self.reasoner.encode([p for p in prompts for _ in range(GROUP)])
        with previous_sampler(self.multinomial):
            return self.reasoner.sample_reasoning(batch, max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0,
                                                  generator=gens, return_logprobs=return_logprobs)

    def loss(self, tokens, adv: torch.Tensor):
        """(loss, stats) of one teacher-forced pass; ``logp_old = logp.detach()`` (1 epoch, on-policy)."""
        from unigrpo.algo.text_loss import text_grpo_loss

        logp, _ = self.reasoner.forward_context(tokens)  # [N, L], 0 off the response
        return text_grpo_loss(logp, logp.detach(), adv, tokens.response_mask, aggregation="seq_mean")

    def step(self, prompts: list[str], step: int) -> dict:
        from unigrpo.algo.advantages import group_advantages

        t = [now()]
        tokens = self.sample(prompts, step)  # [P * G, L] prompt-major
        t.append(now())
        reward = torch.tensor(e_count(self.reasoner.decode_text(tokens))).reshape(len(prompts), GROUP)
        adv = group_advantages(reward).flatten()  # [P * G]
        t.append(now())
        loss, st = self.loss(tokens, adv)
        t.append(now())
        loss.backward()
        t.append(now())
        torch.nn.utils.clip_grad_norm_(self.lm.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t.append(now())
        phases = dict(zip(("sample", "reward_adv", "forward_loss", "backward", "clip_adamw"),
                          (b - a for a, b in itertools.pairwise(t))))
        return {"reward_mean": float(reward.mean()), "ratio_max": float(st["ratio_max"]),
                "completion_len_mean": float(tokens.response_mask.sum(1).float().mean()), "phases_s": phases}


def make_trainer(lm, tok, steps: int, gradient_checkpointing: bool, device: str = "cpu"):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(prompts, completions, **kw):
        return e_count([c[0]["content"] if isinstance(c, list) else c for c in completions])

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS] * (steps + 1))
    args = GRPOConfig(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "unigrpo_vs_trl"), per_device_train_batch_size=len(PROMPTS) * GROUP,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        loss_type="grpo", beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0, use_cpu=device == "cpu", bf16=False,
        gradient_checkpointing=gradient_checkpointing, report_to="none", save_strategy="no", logging_steps=1,
        shuffle_dataset=False, disable_tqdm=True, seed=SEED)
    return GRPOTrainer(model=lm, processing_class=tok, reward_funcs=reward, args=args, train_dataset=data)


def check_equivalence(ours: OurGRPO, trainer) -> dict:
    """Our loss and TRL's ``_compute_loss`` on one group of our batch (same tokens, advantages and
    weights, ratio 1): values and gradients."""
    tokens = ours.sample(PROMPTS[:1], step=10_000)  # one group: one prompt, no padding
    n_prompt = int((~tokens.response_mask[0]).sum())
    adv = torch.linspace(-1.5, 1.5, GROUP, device=tokens.ids.device)
    model = trainer.model
    model.load_state_dict(ours.lm.state_dict())
    ours.lm.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    loss_ours, st = ours.loss(tokens, adv)
    loss_ours.backward()
    inputs = {"prompt_ids": tokens.ids[:, :n_prompt], "prompt_mask": tokens.mask[:, :n_prompt].long(),
              "completion_ids": tokens.ids[:, n_prompt:], "completion_mask": tokens.response_mask[:, n_prompt:].long(),
              "advantages": adv, "num_items_in_batch": tokens.response_mask.sum()}
    trainer.current_gradient_accumulation_steps = 1
    loss_trl = trainer._compute_loss(model, inputs)
    loss_trl.backward()
    g_ours = dict(ours.lm.named_parameters())
    grad_diff = max(float((p.grad - g_ours[n].grad).abs().max()) for n, p in model.named_parameters())
    grad_scale = max(float(p.grad.abs().max()) for p in model.parameters())
    ours.lm.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    return {"loss_ours": loss_ours.item(), "loss_trl": loss_trl.item(), "ratio_max_ours": float(st["ratio_max"]),
            "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale}


def decode_vs_teacher_forced(ours: OurGRPO) -> float:
    """max |decode-time log-prob - teacher-forced log-prob| over a full sampled batch (64 rows x 32
    tokens): what makes the first PPO ratio 1 when the rollout's log-probs are the old ones."""
    with torch.no_grad():
        tokens, logp_decode = ours.sample(PROMPTS, step=10_001, return_logprobs=True)
        logp, _ = ours.reasoner.forward_context(tokens)
    return float((logp - logp_decode).abs().max())


def our_sides(lm, tok, compile: bool, per_group: bool = True) -> dict:
    """Each of our variants on its own copy of ``lm`` (module docstring): ``ours_before``
    (``torch.multinomial``: the library before the fast decode), ``ours`` (``unigrpo train``'s
    defaults), ``ours_inverse_cdf``, ``ours_static`` and (``--compile``) ``ours_compiled`` (the
    opt-in decode: the inverse-CDF sampler, then the static cache, then its compiled step),
    ``ours_per_group`` (a loop per group, ``text.batch_groups: false``)."""
    fast = {"batched": True, "token_sampler": "inverse_cdf"}
    sides = {"ours_before": OurGRPO(copy.deepcopy(lm), tok, batched=True, multinomial=True),
             "ours": OurGRPO(copy.deepcopy(lm), tok, batched=True),
             "ours_inverse_cdf": OurGRPO(copy.deepcopy(lm), tok, **fast),
             "ours_static": OurGRPO(copy.deepcopy(lm), tok, static_cache=True, **fast)}
    if compile:
        sides["ours_compiled"] = OurGRPO(copy.deepcopy(lm), tok, compile=True, **fast)
    if per_group:
        sides["ours_per_group"] = OurGRPO(copy.deepcopy(lm), tok, batched=False)
    return sides


def run(steps: int, warmup: int, gradient_checkpointing: bool, compile: bool = False, device: str = "cpu",
        per_group: bool = True) -> dict:
    from transformers import TrainerCallback

    lm, tok = build_model_and_tokenizer()
    lm.to(device)  # fp32 on every device: the same work on both sides
    ours = our_sides(lm, tok, compile, per_group)
    trainer = make_trainer(copy.deepcopy(lm), tok, warmup + steps, gradient_checkpointing, device)
    equivalence = check_equivalence(ours["ours"], trainer)
    equivalence["decode_vs_teacher_forced_max_abs"] = {k: decode_vs_teacher_forced(o) for k, o in ours.items()
                                                       if o.batched}
    for model in (trainer.model, *(o.lm for o in ours.values())):
        model.load_state_dict(lm.state_dict())  # every side starts from the same weights again
    times = {"trl": [], **{k: [] for k in ours}}
    cpu = {k: [] for k in times}  # process CPU time per step: what a step costs, whatever else the machine runs
    info = {k: [] for k in ours}

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = now(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times["trl"].append(now() - self.t0)
            cpu["trl"].append(time.process_time() - self.c0)
            step = len(times["trl"]) - 1
            for name in (list(ours) if step % 2 == 0 else list(ours)[::-1]):  # alternate the order
                t0, c0 = now(), time.process_time()
                info[name].append(ours[name].step(PROMPTS, step))
                times[name].append(now() - t0)
                cpu[name].append(time.process_time() - c0)

    trl_phases = {"generate_and_score": [], "forward_loss": []}  # TRL's own methods, timed

    def timed(fn, key):
        @functools.wraps(fn)
        def call(*a, **kw):
            t0 = now()
            out = fn(*a, **kw)
            trl_phases[key].append(now() - t0)
            return out
        return call

    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "generate_and_score")
    trainer.compute_loss = timed(trainer.compute_loss, "forward_loss")
    trainer.add_callback(Interleave())
    trainer.train()
    trl_phases = {k: statistics.median(v[warmup:]) for k, v in trl_phases.items()}
    trl_phases["backward_clip_adamw_rest"] = statistics.median(times["trl"][warmup:]) - sum(trl_phases.values())
    trl_len = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    med = {k: statistics.median(v[warmup:]) for k, v in times.items()}
    med_cpu = {k: statistics.median(v[warmup:]) for k, v in cpu.items()}
    n = len(PROMPTS) * GROUP
    return {"trl_gradient_checkpointing": gradient_checkpointing, "compile": compile, "median_step_s": med,
            "ratio_over_trl": {k: med[k] / med["trl"] for k in ours},
            "trajectories_per_s": {k: n / v for k, v in med.items()},
            "median_step_cpu_s": med_cpu, "cpu_ratio_over_trl": {k: med_cpu[k] / med_cpu["trl"] for k in ours},
            "step_s": times, "step_cpu_s": cpu, "counted_steps": steps, "warmup_steps": warmup,
            "completion_len_mean": {"trl": trl_len, **{k: [r["completion_len_mean"] for r in v] for k, v in info.items()}},
            "reward_mean": {k: [r["reward_mean"] for r in v] for k, v in info.items()},
            "median_phases_s": {"trl": trl_phases, **{k: {p: statistics.median(r["phases_s"][p] for r in v[warmup:])
                                                          for p in v[0]["phases_s"]} for k, v in info.items()}},
            "ours_ratio_max": max(r["ratio_max"] for v in info.values() for r in v), "equivalence": equivalence}


def profile_ours(path: Path) -> None:
    """torch.profiler tables (self CPU time) of one step of ``ours``, ``ours_inverse_cdf``,
    ``ours_static`` and ``ours_compiled``, each after one warm-up step (which compiles)."""
    from torch.profiler import ProfilerActivity, profile

    lm, tok = build_model_and_tokenizer()
    tables = []
    variants = (("ours", "multinomial", False, False), ("ours_inverse_cdf", "inverse_cdf", False, False),
                ("ours_static", "inverse_cdf", True, False), ("ours_compiled", "inverse_cdf", True, True))
    for name, sampler, static, compile in variants:
        ours = OurGRPO(copy.deepcopy(lm), tok, batched=True, static_cache=static, compile=compile, token_sampler=sampler)
        t0 = now()
        ours.step(PROMPTS, 0)
        warmup_s = now() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours.step(PROMPTS, 1)
        tables.append(f"{name}: one step (the warm-up step before it took {warmup_s:.2f} s)\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    path.write_text("\n\n".join(tables) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="counted steps of each side")
    ap.add_argument("--warmup", type=int, default=2, help="uncounted first steps of each side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="also run TRL with its default gradient checkpointing (a second interleaved run)")
    ap.add_argument("--profile", action="store_true",
                    help="also write torch.profiler's op table of one of our steps (vs_trl_profile.txt)")
    ap.add_argument("--compile", action="store_true",
                    help="also time ours_compiled: the static decode step under torch.compile (warm-up: the first steps)")
    ap.add_argument("--no-per-group", action="store_true", help="leave ours_per_group out (a shorter run)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: both sides on the GPU (TRL: use_cpu=False)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    runs = [run(args.steps, args.warmup, False, args.compile, args.device, not args.no_per_group)]
    if args.trl_gradient_checkpointing:
        runs.append(run(args.steps, args.warmup, True, args.compile, args.device, not args.no_per_group))
    for r in runs:
        m, q, e = r["median_step_s"], r["ratio_over_trl"], r["equivalence"]
        print(f"TRL gradient checkpointing={r['trl_gradient_checkpointing']}, median of {r['counted_steps']} steps:")
        for k in m:
            ratio = f"  ratio to TRL {q[k]:.2f} (CPU time: {r['cpu_ratio_over_trl'][k]:.2f})" if k in q else ""
            print(f"  {k:15s} {m[k]:.3f} s/step  {r['median_step_cpu_s'][k]:.3f} CPU s/step  "
                  f"{r['trajectories_per_s'][k]:6.1f} traj/s{ratio}")
        print(f"  equivalence (1 group, same advantages): loss ours {e['loss_ours']:.3g} TRL {e['loss_trl']:.3g}, "
              f"max|grad diff| {e['grad_max_abs_diff']:.2g} (max|grad| {e['grad_max_abs']:.2g}); "
              f"our ratio max over all steps {r['ours_ratio_max']}")
        print("  decode-time vs teacher-forced log-probs, max|diff|: "
              + "  ".join(f"{k} {x:.2g}" for k, x in e["decode_vs_teacher_forced_max_abs"].items()))
        for k, ph in r["median_phases_s"].items():
            print(f"  phases {k:15s} " + "  ".join(f"{p} {x:.3f}" for p, x in ph.items()))
        lens = {k: sorted(set(v)) for k, v in r["completion_len_mean"].items()}
        print(f"  completion lengths (set of per-step means): {lens}")
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                       "trl": trl.__version__},
           "batch": {"prompts": len(PROMPTS), "group": GROUP, "new_tokens": NEW_TOKENS, "lr": LR},
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.profile:
        profile_ours(Path(args.out).with_name("vs_trl_profile.txt"))


if __name__ == "__main__":
    main()
