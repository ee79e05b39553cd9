"""The configuration tree of unigrpo (one YAML file + ``key=value`` overrides).

Every field has a one-line doc. Batch sizes name their unit: *prompts* (distinct prompts),
*trajectories* (one reasoning chain + one image), always **per optimisation step, over all ranks**
unless the name says ``per_rank``. Paper values (UniGRPO, arXiv 2603.23500) are noted where ours
differ because the built-in world is tiny. ``validate(cfg)`` checks the combinations that typing
alone cannot.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unigrpo.utils.typed_config import ConfigError, load, to_dict

__all__ = ["Config", "ConfigError", "builtin_configs", "load_config", "resolve_config_path", "resolve_rewards", "to_dict",
           "validate"]


@dataclass
class TinyModelConfig:
    """``model.kind: tiny``: the built-in tiny unified model (text transformer + UNet image expert)."""

    kind: Literal["tiny"] = "tiny"  # model adapter (unigrpo.models.KINDS); each kind has its own keys
    checkpoint: str | None = "builtin:sft"  # safetensors path, "builtin:sft", or null = random init
    d_text: int = 128  # text expert width
    text_layers: int = 3  # text expert transformer blocks
    text_heads: int = 4  # attention heads of the text expert
    unet_channels: tuple[int, int, int] = (48, 96, 96)  # UNet widths per level
    image_size: int = 32  # RGB canvas side in pixels
    max_seq_len: int = 64  # prompt + reasoning tokens (positional table size)


@dataclass
class LoRAConfig:
    """LoRA of the HF adapter (peft; alpha = rank, no dropout). Rank 0 = full fine-tune of that side."""

    text_rank: int = 16  # LoRA rank on the LM (reasoner + text encoder); 0 = train every LM weight
    image_rank: int = 16  # LoRA rank on the image transformer; 0 = train every transformer weight
    text_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # LM module names
    image_targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "to_qkv_mlp_proj"])  # transformer module names (FLUX.2: double- and single-stream attention)


@dataclass
class HFModelConfig:
    """``model.kind: hf``: a diffusers pipeline + a transformers LM (FLUX.2 [klein], Qwen-Image, SD3; docs/models.md)."""

    kind: Literal["hf"] = "hf"  # model adapter (unigrpo.models.KINDS); each kind has its own keys
    pipeline: str = ""  # a save_pretrained folder of a supported pipeline (docs/models.md), or a hub id
    reasoner: str = "text_encoder"  # who reasons: the pipeline's text encoder (shared), or a causal-LM folder / hub id (separate)
    checkpoint: str | None = None  # trainable weights written by model.save (LoRA or whole sides); null = the pipeline's
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype (bf16 / fp16: GPUs only)
    resolution: int = 512  # image side in pixels (a multiple of 2 * the VAE's scale factor)
    gradient_checkpointing: bool = False  # recompute activations in backward (LM and transformer, in train mode)
    fsdp: bool = False  # under torchrun with > 1 rank: shard LM + transformer with FSDP2 (False: a replica per rank)
    hidden_layers: list[int] | None = None  # LM hidden states conditioning the image; null = the pipeline's (FLUX.2 (9, 18, 27), Qwen-Image (-1,))
    max_text_tokens: int = 512  # conditioning length (the pipeline's max_sequence_length); longer rows are cut
    enable_thinking: bool = True  # chat template: True = the reasoning opens a <think> block; False = the pipeline's template


BAGEL_UND_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BAGEL_GEN_TARGETS = ["q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen",
                     "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj"]


@dataclass
class BagelLoRAConfig:
    """LoRA of the Bagel adapter (peft; alpha = rank, no dropout). Rank 0 = that expert trains in full."""

    text_rank: int = 64  # LoRA rank on the understanding expert's projections; 0 = train every und weight
    image_rank: int = 64  # LoRA rank on the generation expert's 7 *_moe_gen projections; 0 = train every gen weight
    text_targets: list[str] = field(default_factory=lambda: list(BAGEL_UND_TARGETS))  # und module-name suffixes
    image_targets: list[str] = field(default_factory=lambda: list(BAGEL_GEN_TARGETS))  # gen module-name suffixes


@dataclass
class BagelModelConfig:
    """``model.kind: bagel``: BAGEL-7B-MoT from its released folder (docs/models.md, Bagel section)."""

    kind: Literal["bagel"] = "bagel"  # model adapter (unigrpo.models.KINDS); each kind has its own keys
    path: str = ""  # folder with llm_config.json, ema.safetensors, ae.safetensors, tokenizer.json
    checkpoint: str | None = None  # trainable tensors written by model.save (LoRA / whole experts); null = the release's
    lora: BagelLoRAConfig = field(default_factory=BagelLoRAConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype (VAE: float32); bf16 on GPUs
    resolution: int = 512  # image side in pixels (multiple of 16; at most 16 * max_latent_size = 1024)
    think: bool = True  # think mode: Bagel's planning system prompt before the prompt (its T2I thinking recipe)
    system_prompt: str | None = None  # think-mode system prompt; null = Bagel's GEN_THINK_SYSTEM_PROMPT
    train_heads: bool = False  # also train time_embedder, vae2llm, llm2vae with the image expert
    gradient_checkpointing: bool = False  # recompute every decoder layer in backward (text pass and velocity)
    logits_chunk: int = 1024  # lm_head + log-softmax over this many positions at a time (recomputed in backward)
    fsdp: bool = False  # under torchrun with > 1 rank: FSDP2, one unit per MoT decoder layer (False: a replica per rank)


# The ``model`` section, told apart by ``model.kind`` (one dataclass per kind; adapters add theirs).
ModelConfig = TinyModelConfig | HFModelConfig | BagelModelConfig


@dataclass
class ShapesTaskConfig:
    """``task.kind: shapes``: the built-in shapes world (generated prompts, held-out splits)."""

    kind: Literal["shapes"] = "shapes"  # prompt source + evaluator (unigrpo.tasks.TASKS)
    prompt_pool: int = 4096  # training prompts generated per data epoch (new seed each epoch)


@dataclass
class PromptsTaskConfig:
    """``task.kind: prompts``: prompts from JSONL files, one object per line with at least
    ``"prompt"``; every other field reaches the rewards' metadata (GenEval's metadata loads as is)."""

    kind: Literal["prompts"] = "prompts"  # prompt source + evaluator (unigrpo.tasks.TASKS)
    prompts: str = ""  # JSONL file of training prompts
    eval_prompts: str | None = None  # JSONL file of evaluation prompts; null = the training file


TaskConfig = ShapesTaskConfig | PromptsTaskConfig


@dataclass
class TextSamplingConfig:
    """How reasoning is sampled during rollouts (paper: temperature 1)."""

    temperature: float = 1.0  # logits are divided by this (also when scoring log-probs)
    top_p: float = 1.0  # nucleus sampling mass; 1 = full distribution (on-policy log-probs)
    max_reasoning_tokens: int = 32  # hard cap on generated reasoning tokens (incl. </think>, <eos>)
    thinking: bool = True  # False: skip reasoning and draw from the prompt alone
    # True: every group of a rank decodes in ONE loop (a generator per group; model.kind=hf only):
    # ~3.5x faster sampling (docs/performance.md), but the tokens then equal the per-group loop's
    # only up to float rounding, so they may depend on the chunking / ranks. False: one loop per group
    batch_groups: bool = False


@dataclass
class SamplerConfig:
    """The image policy: flow-matching SDE with an SDE window (Flow-GRPO-Fast)."""

    num_steps: int = 10  # denoising steps during rollouts (paper: 25)
    shift: float | None = 3.0  # timestep shift s in t' = s t / (1 + (s - 1) t) (paper: 3); null = the model's own (an hf pipeline's)
    kind: Literal["flow_sde", "cps", "ode"] = "flow_sde"  # stochastic sampler of the window steps
    noise_level: float = 0.8  # SDE noise level a (paper: 0.8)
    window_size: int = 3  # consecutive stochastic, trained steps per trajectory (paper: 3)
    window_range: tuple[int, int] = (0, 5)  # window start drawn from {lo, ..., hi - size} (paper: [0, 5])
    cfg_scale: float = 1.0  # classifier-free guidance during rollout + training; 1 = none (UniGRPO)
    eval_num_steps: int = 20  # deterministic ODE steps at evaluation (paper: 50)
    eval_cfg_scale: float = 1.0  # CFG scale at evaluation


@dataclass
class AlgoConfig:
    """UniGRPO objective: GRPO on tokens + lambda * FlowGRPO on window steps (docs/algorithm.md)."""

    prompts_per_step: int = 8  # distinct prompts per optimisation step (paper: 32)
    group_size: int = 8  # trajectories per prompt (paper: 24)
    trajectories_per_minibatch: int = 16  # trajectories per optimizer update (over all ranks)
    micro_batch_trajectories: int = 16  # trajectories per forward/backward (accumulated to a minibatch)
    ppo_epochs: int = 2  # passes over the rollout batch (paper: 2)
    adv_scale: Literal["group", "batch", "none"] = "group"  # advantage std normalisation
    adv_eps: float = 1e-4  # added to the std (paper code: 1e-4)
    adv_clip: float | None = 5.0  # clip advantages to [-c, c]; null = no clip
    train_text: bool = True  # False: text policy frozen (FlowGRPO baseline)
    train_image: bool = True  # False: image policy frozen (TextGRPO baseline)
    text_eps_low: float = 0.2  # text ratio clip below 1 (paper: unstated)
    text_eps_high: float = 0.2  # text ratio clip above 1
    text_aggregation: Literal["seq_mean", "token_mean", "dr_grpo"] = "seq_mean"  # paper eq. 2
    text_beta: float = 0.0  # k3 KL to the reference on tokens (paper: 0)
    image_eps: float = 1e-4  # image ratio clip (paper: 1e-6, with mean-reduced log-probs)
    logprob_reduction: Literal["mean", "sum"] = "mean"  # latent reduction of step log-probs
    ratio_norm: bool = True  # GRPO-Guard RatioNorm on the image log-ratio (used by UniGRPO)
    lambda_image: float = 1.0  # weight of the image objective (paper: 1)
    c_mse: float = 1.5e-5  # velocity-MSE weight vs the frozen reference (paper: 1.5e-5)
    mse_reduction: Literal["mean", "sum"] = "mean"  # MSE over latent elements (paper: unstated)
    beta_img: float = 0.0  # latent-KL weight (original FlowGRPO ablation; paper UniGRPO: 0)
    detach_context: bool = True  # image loss does not back-propagate into the text expert
    share_window_in_group: bool = True  # all trajectories of a group use the same window
    share_initial_noise_in_group: bool = False  # group members start from the same noise and differ only from the SDE window on


@dataclass
class OptimConfig:
    """AdamW with separate learning rates for the two experts (paper: 1e-6 text, 3e-5 image)."""

    lr_text: float = 5e-5  # text (reasoning) expert learning rate (tuned on the tiny model, docs/demo.md)
    lr_image: float = 2e-6  # image (generation) expert learning rate (tuned on the tiny model, docs/demo.md)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    image_params: str | None = None  # regex (re.search) on parameter names: train only these image-expert parameters; null = all


@dataclass
class RewardTerm:
    """One reward term: its name, weight and (for a factory) kwargs; docs/rewards.md."""

    name: str = "shapes"  # built-in name (remote, judge, ocr, reasoning_format, ...) or dotted path "pkg.module:callable"
    weight: float = 1.0  # weight in the weighted sum of rewards
    kwargs: dict[str, Any] = field(default_factory=dict)  # given: `name` is a factory, name(**kwargs) is the reward


@dataclass
class EvalConfig:
    """Held-out evaluation (deterministic ODE sampling)."""

    split: Literal["train", "val", "test"] = "val"  # shapes task: which split to evaluate on
    num_prompts: int = 96  # prompts evaluated (shapes: balanced over categories; prompts: the file's first)
    thinking: bool = True  # sample reasoning before drawing
    seed: int = 1234  # fixes the prompts and the initial noise
    grid_prompts: int = 8  # prompts shown in the image grid
    at_start: bool = False  # also evaluate the starting policy before the first RL step


@dataclass
class PretrainConfig:
    """Supervised (SFT) training of the tiny model from scratch on generated data."""

    steps: int = 6000  # optimizer steps
    batch_size: int = 64  # samples per step
    lr: float = 1e-3  # AdamW learning rate (cosine decay, short warm-up)
    wrong_reasoning_frac: float = 0.3  # fraction of reasoning-required samples with wrong reasoning
    no_think_frac: float = 0.15  # fraction of samples drawn without reasoning (prompt only)
    uncond_frac: float = 0.1  # fraction with an empty context for the image loss (enables CFG)
    image_loss_weight: float = 1.0  # flow-matching loss weight vs text loss


@dataclass
class LoggingConfig:
    """Experiment trackers beside metrics.jsonl and TensorBoard, rank 0 only (docs/metrics.md, "Trackers")."""

    wandb: bool = False  # log to Weights & Biases (extra `wandb`; WANDB_MODE=offline needs no account)
    trackio: bool = False  # log to trackio (extra `trackio`; a local SQLite file under $TRACKIO_DIR)
    project: str = "unigrpo"  # the trackers' project
    run_name: str | None = None  # the tracker run's display name; null = the output directory's name
    entity: str | None = None  # wandb entity (team or user); null = the account's default
    group: str | None = None  # the trackers' run group
    tags: list[str] = field(default_factory=list)  # wandb tags
    images: bool = True  # also send the evaluation and rollout grids as images


@dataclass
class Config:
    """The whole run: `unigrpo train|eval|pretrain CONFIG [key=value ...]`."""

    seed: int = 0  # global seed (rollout noise, prompt order, init)
    steps: int = 50  # RL optimisation steps
    output_dir: str = "runs/unigrpo"  # where metrics, grids and checkpoints go
    device: str = "cpu"  # torch device ("cpu", "cuda", "cuda:0")
    threads: int = 0  # torch CPU threads; 0 = torch default
    log_every: int = 1  # steps between metric lines
    eval_every: int = 10  # steps between evaluations; 0 = only at the end
    save_every: int = 10  # steps between checkpoints; 0 = only at the end
    reward_workers: int = 0  # background threads computing rewards during the next rollout chunk; 0 = inline
    dist_timeout_s: float = 1800.0  # torchrun: a collective waiting longer ends the job naming the silent rank
    model: ModelConfig = field(default_factory=TinyModelConfig)
    task: TaskConfig = field(default_factory=ShapesTaskConfig)
    text: TextSamplingConfig = field(default_factory=TextSamplingConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# The longest prompt of the built-in shapes world, in tokens (with <bos>): prompt + reasoning must fit
# the tiny model's positional table (model.max_seq_len), or sampling crashes mid-rollout.
SHAPES_MAX_PROMPT_TOKENS = 19


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _nonfinite(obj, prefix: str = ""):
    """The first dotted key holding a NaN / inf float (a NaN weight skips every update silently)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else prefix.rstrip(".")
    if isinstance(obj, dict):
        return next((k for key, v in obj.items() if (k := _nonfinite(v, f"{prefix}{key}.")) is not None), None)
    if isinstance(obj, (list, tuple)):
        return next((k for i, v in enumerate(obj) if (k := _nonfinite(v, f"{prefix.rstrip('.')}[{i}].")) is not None),
                    None)
    return None


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ConfigError naming the key. Returns ``cfg`` for chaining."""
    s, a, t, o = cfg.sampler, cfg.algo, cfg.text, cfg.optim
    bad = _nonfinite(to_dict(cfg))
    _check(bad is None, bad or "", "must be a finite number (NaN / inf are not allowed)")
    _check(a.group_size >= 2, "algo.group_size", f"must be >= 2 for group advantages, got {a.group_size}")
    _check(a.prompts_per_step >= 1, "algo.prompts_per_step", "must be >= 1")
    _check(a.ppo_epochs >= 1, "algo.ppo_epochs", "must be >= 1")
    total = a.prompts_per_step * a.group_size
    _check(a.trajectories_per_minibatch >= 1 and total % a.trajectories_per_minibatch == 0,
           "algo.trajectories_per_minibatch",
           f"must divide prompts_per_step * group_size = {total}, got {a.trajectories_per_minibatch}")
    _check(a.micro_batch_trajectories >= 1
           and a.trajectories_per_minibatch % a.micro_batch_trajectories == 0,
           "algo.micro_batch_trajectories",
           f"must divide trajectories_per_minibatch = {a.trajectories_per_minibatch}")
    _check(a.train_text or a.train_image, "algo.train_text", "train_text and train_image are both false")
    _check(s.num_steps >= 1, "sampler.num_steps", "must be >= 1")
    _check(s.eval_num_steps >= 1, "sampler.eval_num_steps", "must be >= 1")
    _check(s.shift is None or s.shift > 0, "sampler.shift", "must be > 0 (or null: the model's own schedule)")
    _check(s.shift is not None or cfg.model.kind != "tiny", "sampler.shift",
           "null (the model's own schedule) needs a model that has one, e.g. model.kind=hf; set a number")
    lo, hi = s.window_range
    _check(0 <= lo < hi <= s.num_steps, "sampler.window_range",
           f"must satisfy 0 <= lo < hi <= num_steps ({s.num_steps}), got {list(s.window_range)}")
    _check(1 <= s.window_size <= hi - lo, "sampler.window_size",
           f"must be in [1, window_range width {hi - lo}] (num_steps={s.num_steps}), got {s.window_size}")
    _check(s.noise_level >= 0, "sampler.noise_level", "must be >= 0")
    _check(s.kind != "ode" or not a.train_image, "sampler.kind",
           "'ode' has no log-probs; the image policy needs flow_sde or cps (or algo.train_image=false)")
    _check(s.noise_level > 0 or not a.train_image, "sampler.noise_level",
           "must be > 0 to train the image policy (a deterministic step has no log-prob)")
    _check(s.cfg_scale >= 1 and s.eval_cfg_scale >= 1, "sampler.cfg_scale", "must be >= 1 (1 = no CFG)")
    _check(t.temperature > 0, "text.temperature", "must be > 0")
    _check(0 < t.top_p <= 1, "text.top_p", "must be in (0, 1]")
    _check(1 <= t.max_reasoning_tokens, "text.max_reasoning_tokens", "must be >= 1")
    _check(0 <= a.text_eps_low < 1 and a.text_eps_high >= 0, "algo.text_eps_low", "clip range must be in [0, 1)")
    _check(a.image_eps > 0, "algo.image_eps", "must be > 0")
    _check(a.adv_clip is None or a.adv_clip > 0, "algo.adv_clip", "must be > 0 or null")
    if cfg.optim.image_params is not None:
        try:
            re.compile(cfg.optim.image_params)
        except re.error as e:
            _check(False, "optim.image_params", f"not a valid regular expression: {e}")
    _check(bool(cfg.rewards), "rewards", "at least one reward is required")
    for i, r in enumerate(cfg.rewards):
        _check(bool(r.name.strip()), f"rewards[{i}].name", "must not be empty")
    if cfg.task.kind == "shapes":
        _check(cfg.task.prompt_pool >= a.prompts_per_step, "task.prompt_pool", "must be >= algo.prompts_per_step")
    else:
        _check(bool(cfg.task.prompts), "task.prompts", "a JSONL file of prompts is required for task.kind=prompts")
    _check(cfg.reward_workers >= 0, "reward_workers", "must be >= 0")
    _check(cfg.steps >= 0, "steps", "must be >= 0")
    _check(cfg.threads >= 0, "threads", f"must be >= 0 (0 = torch default), got {cfg.threads}")
    _check(cfg.log_every >= 1, "log_every", f"must be >= 1, got {cfg.log_every}")
    for k in ("eval_every", "save_every"):
        _check(getattr(cfg, k) >= 0, k, f"must be >= 0 (0 = only at the end), got {getattr(cfg, k)}")
    _check(cfg.dist_timeout_s > 0, "dist_timeout_s", f"must be > 0 seconds, got {cfg.dist_timeout_s}")
    _check(o.lr_text >= 0, "optim.lr_text", f"must be >= 0, got {o.lr_text}")
    _check(o.lr_image >= 0, "optim.lr_image", f"must be >= 0, got {o.lr_image}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    _check(a.adv_eps >= 0, "algo.adv_eps", f"must be >= 0, got {a.adv_eps}")
    _check(a.lambda_image >= 0 and a.c_mse >= 0 and a.beta_img >= 0 and a.text_beta >= 0, "algo.lambda_image",
           "the loss weights lambda_image, c_mse, beta_img, text_beta must be >= 0")
    _check(cfg.eval.grid_prompts >= 0, "eval.grid_prompts", "must be >= 0")
    _check(cfg.eval.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
    for k in ("wrong_reasoning_frac", "no_think_frac", "uncond_frac"):
        v = getattr(cfg.pretrain, k)
        _check(0.0 <= v <= 1.0, f"pretrain.{k}", f"must be in [0, 1], got {v}")
    _check(not t.batch_groups or cfg.model.kind == "hf", "text.batch_groups",
           f"needs a model whose decode loop takes a generator per row (model.kind=hf), not {cfg.model.kind!r}")
    if cfg.model.kind == "tiny":
        _check(cfg.model.image_size % 4 == 0 and 16 <= cfg.model.image_size <= 64, "model.image_size",
               "must be a multiple of 4 in [16, 64]")
        if cfg.task.kind == "shapes":
            room = cfg.model.max_seq_len - SHAPES_MAX_PROMPT_TOKENS
            _check(t.max_reasoning_tokens <= room, "text.max_reasoning_tokens",
                   f"{t.max_reasoning_tokens} does not fit model.max_seq_len={cfg.model.max_seq_len} after the "
                   f"longest prompt ({SHAPES_MAX_PROMPT_TOKENS} tokens): at most {room}")
    elif cfg.model.kind == "hf":
        m = cfg.model
        _check(bool(m.pipeline), "model.pipeline", "a pipeline folder (save_pretrained) or hub id is required")
        _check(m.reasoner == "text_encoder" or Path(m.reasoner).expanduser().is_dir()
               or re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", m.reasoner) is not None, "model.reasoner",
               f"{m.reasoner!r} is neither 'text_encoder' (shared mode), a causal-LM folder, nor a hub id")
        _check(m.lora.text_rank >= 0 and m.lora.image_rank >= 0, "model.lora.text_rank", "ranks must be >= 0")
        _check(m.resolution > 0 and m.resolution % 16 == 0, "model.resolution", "must be a positive multiple of 16")
        _check(m.max_text_tokens >= 1, "model.max_text_tokens", "must be >= 1")
    elif cfg.model.kind == "bagel":
        m = cfg.model
        _check(m.lora.text_rank >= 0 and m.lora.image_rank >= 0, "model.lora.text_rank", "ranks must be >= 0")
        _check(m.resolution > 0 and m.resolution % 16 == 0, "model.resolution", "must be a positive multiple of 16")
        _check(m.logits_chunk >= 1, "model.logits_chunk", "must be >= 1")
        full = [side for side, rank in (("text", m.lora.text_rank), ("image", m.lora.image_rank)) if rank == 0]
        trained = [s for s in full if getattr(cfg.algo, f"train_{s}")]
        _check(m.dtype == "float32" or not trained, "model.dtype",
               f"{m.dtype} weights cannot take the small AdamW steps of a fully trained expert "
               f"({', '.join(f'model.lora.{s}_rank=0' for s in trained)}: the update rounds away, and this "
               "adapter keeps no float32 master copy); use model.dtype=float32 or LoRA")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML + overrides -> validated Config (raises ConfigError with the key on any problem).

    ``path`` is a YAML file or ``builtin:NAME``, a config shipped in the package (`unigrpo configs`).
    """
    return validate(load(Config, None if path is None else resolve_config_path(path), overrides))


def resolve_rewards(cfg: Config) -> Config:
    """Every reward name imports now, before any model loads (one line naming the reward)."""
    from unigrpo.rewards import resolve_reward

    for i, r in enumerate(cfg.rewards):
        try:
            resolve_reward(r.name, r.kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"rewards[{i}].name: {e}") from None
    return cfg


BUILTIN_PREFIX = "builtin:"


def _builtin_files() -> dict:
    """NAME -> the packaged NAME.yaml (an importlib.resources Traversable), sorted by name."""
    import importlib.resources

    root = importlib.resources.files("unigrpo") / "configs"
    return {f.name[: -len(".yaml")]: f for f in sorted(root.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def resolve_config_path(name: str | Path) -> Path:
    """``builtin:NAME`` -> the packaged ``unigrpo/configs/NAME.yaml``; any other path unchanged.

    An unknown builtin name is a ConfigError listing the available ones.
    """
    if not str(name).startswith(BUILTIN_PREFIX):
        return Path(name)
    key = str(name)[len(BUILTIN_PREFIX):]
    files = _builtin_files()
    if key not in files:
        known = ", ".join(BUILTIN_PREFIX + k for k in files)
        raise ConfigError(f"{name}: no such built-in config (available: {known})")
    return Path(str(files[key]))  # a regular file: the package is installed unzipped


def builtin_configs() -> dict[str, str]:
    """Shipped configs: NAME -> the first comment line of NAME.yaml (its one-line description)."""
    out = {}
    for key, f in _builtin_files().items():
        lines = f.read_text().splitlines()
        first = next((i for i, ln in enumerate(lines) if ln.startswith("#")), None)
        text = "" if first is None else lines[first].lstrip("#").strip()
        continues = first is not None and first + 1 < len(lines) and lines[first + 1].startswith("#")
        out[key] = text + " ..." if continues and not text.endswith((".", ":", ";")) else text
    return out
