"""The configuration tree of unigrpo (one YAML file + ``key=value`` overrides).

Every field has a one-line doc. Batch sizes name their unit: *prompts* (distinct prompts),
*trajectories* (one reasoning chain + one image), always **per optimisation step, over all ranks**
unless the name says ``per_rank``. Paper values (UniGRPO, arXiv 2603.23500) are noted where ours
differ because the built-in world is tiny. ``validate(cfg)`` checks the combinations that typing
alone cannot; a section told apart by its ``kind`` (``model``, ``task``) checks its own keys
(``check(cfg)``), so ``validate`` names no kind. The model sections live beside their adapters
(``unigrpo/models/*_config.py``, light: no torch) and are re-exported here.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unigrpo.models.bagel_config import (
    BAGEL_GEN_TARGETS,
    BAGEL_UND_TARGETS,
    BagelLoRAConfig,
    BagelModelConfig,
)
from unigrpo.models.hf_config import HFModelConfig, LoRAConfig
from unigrpo.models.tiny_config import PretrainConfig, TinyModelConfig
from unigrpo.utils.typed_config import ConfigError, kind_of, load, require, to_dict

__all__ = ["BAGEL_GEN_TARGETS", "BAGEL_UND_TARGETS", "BagelLoRAConfig", "BagelModelConfig", "Config", "ConfigError",
           "HFModelConfig", "LoRAConfig", "PretrainConfig", "PromptsTaskConfig", "ShapesEditTaskConfig",
           "ShapesRefineTaskConfig", "ShapesTaskConfig", "TinyModelConfig", "builtin_configs", "load_config",
           "resolve_config_path", "resolve_rewards", "to_dict", "validate"]


# The ``model`` section, told apart by ``model.kind``: one dataclass per kind, in a light module beside
# its adapter (unigrpo/models/*_config.py), with ``own_schedule``, ``capabilities`` (what its models can
# do: sees_images, edits) and ``check(cfg)`` (its own checks).
ModelConfig = TinyModelConfig | HFModelConfig | BagelModelConfig


@dataclass
class ShapesTaskConfig:
    """``task.kind: shapes``: the built-in shapes world (generated prompts, held-out splits)."""

    kind: Literal["shapes"] = "shapes"  # prompt source + evaluator (unigrpo.tasks.TASKS)
    prompt_pool: int = 4096  # training prompts generated per data epoch (new seed each epoch)

    def check(self, cfg: Config) -> None:
        """The checks typing cannot make; ConfigError naming the key."""
        require(self.prompt_pool >= cfg.algo.prompts_per_step, "task.prompt_pool", "must be >= algo.prompts_per_step")

    def needs(self) -> frozenset[str]:
        """The model capabilities (``sees_images``, ``edits``) the task's episodes need: none."""
        return frozenset()


@dataclass
class PromptsTaskConfig:
    """``task.kind: prompts``: prompts from JSONL files, one object per line with at least
    ``"prompt"``; every other field reaches the rewards' metadata (GenEval's metadata loads as is)."""

    kind: Literal["prompts"] = "prompts"  # prompt source + evaluator (unigrpo.tasks.TASKS)
    prompts: str = ""  # JSONL file of training prompts
    eval_prompts: str | None = None  # JSONL file of evaluation prompts; null = the training file

    def check(self, cfg: Config) -> None:
        """The file is required (its lines are checked when the task reads it: ``tasks.load_prompt_file``)."""
        require(bool(self.prompts), "task.prompts", "a JSONL file of prompts is required for task.kind=prompts")

    def needs(self) -> frozenset[str]:
        """The model capabilities the task's episodes need: none (prompt images are not read yet)."""
        return frozenset()


@dataclass
class ShapesEditTaskConfig:
    """``task.kind: shapes_edit``: the shapes world's edits (a rendered input scene + an instruction;
    generated problems, held-out splits; docs/world.md)."""

    kind: Literal["shapes_edit"] = "shapes_edit"  # prompt source + evaluator (unigrpo.tasks.TASKS)
    prompt_pool: int = 4096  # training problems generated per data epoch (new seed each epoch)
    image_size: int = 32  # side of the rendered input images, in pixels (the model's input size)
    describe_weight: float = 0.0  # weight of "what is in the image" prompts (each edit category: 0.9 direct, 1.0 reasoning)

    def check(self, cfg: Config) -> None:
        """The checks typing cannot make; ConfigError naming the key."""
        require(self.prompt_pool >= cfg.algo.prompts_per_step, "task.prompt_pool", "must be >= algo.prompts_per_step")
        require(16 <= self.image_size <= 64, "task.image_size", "must be in [16, 64] (the renderer's range)")
        require(self.describe_weight >= 0, "task.describe_weight", "must be >= 0")
        for i, r in enumerate(cfg.rewards):  # the text-to-image rewards read a "spec" edits do not have
            require(r.name not in ("shapes", "shapes_dense"), f"rewards[{i}].name",
                    f"{r.name!r} scores text-to-image prompts; task.kind=shapes_edit is scored by "
                    "'shapes_edit' (or 'shapes_edit_dense')")

    def needs(self) -> frozenset[str]:
        """The model capabilities the task's episodes need: it looks at the input and redraws it."""
        return frozenset({"sees_images", "edits"})


@dataclass
class ShapesRefineTaskConfig:
    """``task.kind: shapes_refine``: the shapes world in multi-round episodes (``algo.rounds``): later
    rounds look at the image drawn before and reflect (``world/refine.py``); evaluated round by round."""

    kind: Literal["shapes_refine"] = "shapes_refine"  # prompt source + evaluator (unigrpo.tasks.TASKS)
    prompt_pool: int = 4096  # training prompts generated per data epoch (new seed each epoch)

    def check(self, cfg: Config) -> None:
        """The checks typing cannot make; ConfigError naming the key."""
        require(self.prompt_pool >= cfg.algo.prompts_per_step, "task.prompt_pool", "must be >= algo.prompts_per_step")

    def needs(self) -> frozenset[str]:
        """The model capabilities the task's episodes need: seeing the image it drew."""
        return frozenset({"sees_images"})


# The ``task`` section, told apart by ``task.kind``; each has ``check(cfg)`` (its own checks) and
# ``needs()`` (the model capabilities its episodes need).
TaskConfig = ShapesTaskConfig | PromptsTaskConfig | ShapesEditTaskConfig | ShapesRefineTaskConfig


@dataclass
class TextSamplingConfig:
    """How reasoning is sampled during rollouts (paper: temperature 1)."""

    temperature: float = 1.0  # logits are divided by this (also when scoring log-probs)
    top_p: float = 1.0  # nucleus sampling mass; 1 = full distribution (on-policy log-probs)
    max_reasoning_tokens: int = 32  # hard cap on generated reasoning tokens (incl. </think>, <eos>)
    thinking: bool = True  # False: skip reasoning and draw from the prompt alone
    # True: every group of a rank decodes in ONE loop (a generator per group; docs/performance.md);
    # False: one loop per group, whose tokens depend on nothing but the group (docs/reliability.md)
    batch_groups: bool = True
    # how a token is drawn (models/decode.py): "multinomial" = torch.multinomial's tokens from the same
    # stream (every seeded number in docs/); "inverse_cdf" = one uniform per row, faster, other tokens
    token_sampler: Literal["multinomial", "inverse_cdf"] = "multinomial"
    static_cache: bool = False  # hf kinds: a preallocated KV cache, written in place (docs/performance.md)
    compile: bool = False  # hf kinds: torch.compile the static decode step (implies static_cache; warms up for seconds)


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
    """UniGRPO objective: GRPO on tokens + lambda * FlowGRPO on window steps (or DiffusionNFT: image_objective;
    docs/algorithm.md)."""

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
    # flowgrpo: the SDE window's clipped likelihood ratio (UniGRPO); nft: DiffusionNFT (arXiv 2509.16117), forward-noised
    # clean latents and implicit policies around the behaviour velocity, no log-probs (docs/algorithm.md)
    image_objective: Literal["flowgrpo", "nft"] = "flowgrpo"  # the image expert's objective (the text side stays GRPO)
    nft_beta: float = 1.0  # nft: mixing strength beta of the implicit policies v+- (upstream `beta`: 1; 0.1 for OCR)
    nft_adv_clip: float = 5.0  # nft: C in r = clamp(A, -C, C) / (2C) + 1/2, also the loss multiplier (upstream adv_clip_max)
    nft_timestep_fraction: float = 0.99  # nft: trains int(fraction * sampler.num_steps) (>= 1) of the sampler's times per trajectory
    # multi-round episodes (think -> draw -> look -> reflect -> redraw; docs/training.md, "Multi-round episodes"):
    rounds: int = 1  # rounds per episode at most (1: one reasoning + one image, as the paper); > 1 needs a model that sees images
    credit: Literal["terminal", "per_round", "tree"] = "terminal"  # how the rounds share credit (algo.credit, docs/training.md)
    improvement_weight: float = 1.0  # per_round: weight w of the improvement term reward_r - reward_{r-1}
    tree_branches: int = 2  # tree: continuations K of each round-1 sample (group_size = round-1 samples x K)


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
    max_skipped_share: float = 0.25  # on_failure: skip: a run that skipped more of its steps than this exits 1
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


def _scheduled_kind() -> str:
    """A model kind with a timestep grid of its own (the example of the ``sampler.shift: null`` error)."""
    return next(kind_of(m) for m in typing.get_args(ModelConfig) if m.own_schedule)


def _check_rounds(cfg: Config) -> None:
    """Multi-round episodes: the model must see the image it drew; the tree needs whole sibling groups."""
    a = cfg.algo
    require(a.rounds >= 1, "algo.rounds", f"must be >= 1, got {a.rounds}")
    require(a.improvement_weight >= 0, "algo.improvement_weight", f"must be >= 0, got {a.improvement_weight}")
    if a.rounds == 1:
        require(a.credit == "terminal", "algo.credit", f"{a.credit!r} needs algo.rounds >= 2 (one round has one reward)")
        return
    # a model not on this machine yet (a built-in real-model config): its reflection turn is checked when built
    require("sees_images" in cfg.model.capabilities or not cfg.model.capabilities_known, "algo.rounds",
            f"{a.rounds} rounds need a model that sees the image it drew (model.sees_images=true)")
    require(cfg.text.thinking, "algo.rounds", "later rounds are reflections: text.thinking must be true")
    require(not getattr(cfg.model, "fsdp", False), "model.fsdp",
            f"a sharded model runs one round per episode (got algo.rounds={a.rounds}): ranks whose rows stop at "
            "different rounds would make different forward calls, and FSDP2's collectives would wait forever; "
            "set model.fsdp=false (a replica per rank runs any number of rounds) or algo.rounds=1")
    require(cfg.sampler.cfg_scale == 1 or "edits" not in cfg.model.capabilities, "sampler.cfg_scale",
            "training with CFG in multi-round episodes of a model that edits is not supported (a later round edits "
            "the image drawn before, and the unconditional branch's null context holds no image); train CFG-free (1)")
    if a.credit == "tree":
        k = a.tree_branches
        require(k >= 2 and a.group_size % k == 0 and a.group_size // k >= 2, "algo.tree_branches",
                f"must be >= 2 and divide algo.group_size={a.group_size} into >= 2 round-1 samples, got {k}")


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ConfigError naming the key. Returns ``cfg`` for chaining."""
    s, a, t, o = cfg.sampler, cfg.algo, cfg.text, cfg.optim
    bad = _nonfinite(to_dict(cfg))
    require(bad is None, bad or "", "must be a finite number (NaN / inf are not allowed)")
    require(a.group_size >= 2, "algo.group_size", f"must be >= 2 for group advantages, got {a.group_size}")
    require(a.prompts_per_step >= 1, "algo.prompts_per_step", "must be >= 1")
    require(a.ppo_epochs >= 1, "algo.ppo_epochs", "must be >= 1")
    total = a.prompts_per_step * a.group_size
    require(a.trajectories_per_minibatch >= 1 and total % a.trajectories_per_minibatch == 0,
            "algo.trajectories_per_minibatch",
            f"must divide prompts_per_step * group_size = {total}, got {a.trajectories_per_minibatch}")
    require(a.micro_batch_trajectories >= 1
            and a.trajectories_per_minibatch % a.micro_batch_trajectories == 0,
            "algo.micro_batch_trajectories",
            f"must divide trajectories_per_minibatch = {a.trajectories_per_minibatch}")
    require(a.train_text or a.train_image, "algo.train_text", "train_text and train_image are both false")
    require(s.num_steps >= 1, "sampler.num_steps", "must be >= 1")
    require(s.eval_num_steps >= 1, "sampler.eval_num_steps", "must be >= 1")
    require(s.shift is None or s.shift > 0, "sampler.shift", "must be > 0 (or null: the model's own schedule)")
    lacking = sorted(cfg.task.needs() - cfg.model.capabilities)
    require(not lacking, "task.kind", f"{cfg.task.kind!r} needs a model with {', '.join(lacking)}; "
            f"model.kind={cfg.model.kind!r} has {', '.join(sorted(cfg.model.capabilities)) or 'neither'}")
    # every kind's null_context(batch) knows no input images: CFG's unconditional branch would drop
    # the input (reference) images that an edit pipeline's own negative branch keeps
    require(s.cfg_scale == 1 or "edits" not in cfg.task.needs(), "sampler.cfg_scale",
            "training with CFG on an editing task is not supported (the unconditional branch would lose the input / "
            "reference images); train CFG-free (1) and guide at evaluation (sampler.eval_cfg_scale)")
    require(s.shift is not None or cfg.model.own_schedule, "sampler.shift",
            f"null (the model's own schedule) needs a model that has one, e.g. model.kind={_scheduled_kind()}; "
            "set a number")
    lo, hi = s.window_range
    require(0 <= lo < hi <= s.num_steps, "sampler.window_range",
            f"must satisfy 0 <= lo < hi <= num_steps ({s.num_steps}), got {list(s.window_range)}")
    require(1 <= s.window_size <= hi - lo, "sampler.window_size",
            f"must be in [1, window_range width {hi - lo}] (num_steps={s.num_steps}), got {s.window_size}")
    require(s.noise_level >= 0, "sampler.noise_level", "must be >= 0")
    flowgrpo = a.train_image and a.image_objective == "flowgrpo"  # the image loss reads the window's log-probs
    require(s.kind != "ode" or not flowgrpo, "sampler.kind",
            "'ode' has no log-probs; FlowGRPO needs flow_sde or cps (or algo.image_objective=nft, or algo.train_image=false)")
    require(s.noise_level > 0 or not flowgrpo, "sampler.noise_level",
            "must be > 0 for FlowGRPO (a deterministic step has no log-prob; algo.image_objective=nft needs none)")
    require(a.nft_beta > 0, "algo.nft_beta", f"must be > 0, got {a.nft_beta}")
    require(a.nft_adv_clip > 0, "algo.nft_adv_clip", f"must be > 0, got {a.nft_adv_clip}")
    require(0 < a.nft_timestep_fraction <= 1, "algo.nft_timestep_fraction",
            f"must be in (0, 1], got {a.nft_timestep_fraction}")
    require(a.image_objective != "nft" or a.beta_img == 0 or (s.kind != "ode" and s.noise_level > 0), "algo.beta_img",
            "the latent KL needs a stochastic sampler step (sampler.kind flow_sde / cps, noise_level > 0)")
    _check_rounds(cfg)
    require(s.cfg_scale >= 1 and s.eval_cfg_scale >= 1, "sampler.cfg_scale", "must be >= 1 (1 = no CFG)")
    require(t.temperature > 0, "text.temperature", "must be > 0")
    require(0 < t.top_p <= 1, "text.top_p", "must be in (0, 1]")
    require(1 <= t.max_reasoning_tokens, "text.max_reasoning_tokens", "must be >= 1")
    require(0 <= a.text_eps_low < 1 and a.text_eps_high >= 0, "algo.text_eps_low", "clip range must be in [0, 1)")
    require(a.image_eps > 0, "algo.image_eps", "must be > 0")
    require(a.adv_clip is None or a.adv_clip > 0, "algo.adv_clip", "must be > 0 or null")
    if cfg.optim.image_params is not None:
        try:
            re.compile(cfg.optim.image_params)
        except re.error as e:
            require(False, "optim.image_params", f"not a valid regular expression: {e}")
    require(bool(cfg.rewards), "rewards", "at least one reward is required")
    for i, r in enumerate(cfg.rewards):
        require(bool(r.name.strip()), f"rewards[{i}].name", "must not be empty")
    cfg.task.check(cfg)
    require(cfg.reward_workers >= 0, "reward_workers", "must be >= 0")
    require(cfg.steps >= 0, "steps", "must be >= 0")
    require(cfg.threads >= 0, "threads", f"must be >= 0 (0 = torch default), got {cfg.threads}")
    require(cfg.log_every >= 1, "log_every", f"must be >= 1, got {cfg.log_every}")
    for k in ("eval_every", "save_every"):
        require(getattr(cfg, k) >= 0, k, f"must be >= 0 (0 = only at the end), got {getattr(cfg, k)}")
    require(cfg.dist_timeout_s > 0, "dist_timeout_s", f"must be > 0 seconds, got {cfg.dist_timeout_s}")
    require(0 <= cfg.max_skipped_share <= 1, "max_skipped_share", f"must be in [0, 1], got {cfg.max_skipped_share}")
    require(o.lr_text >= 0, "optim.lr_text", f"must be >= 0, got {o.lr_text}")
    require(o.lr_image >= 0, "optim.lr_image", f"must be >= 0, got {o.lr_image}")
    require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    require(all(0 <= b < 1 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    require(a.adv_eps >= 0, "algo.adv_eps", f"must be >= 0, got {a.adv_eps}")
    require(a.lambda_image >= 0 and a.c_mse >= 0 and a.beta_img >= 0 and a.text_beta >= 0, "algo.lambda_image",
            "the loss weights lambda_image, c_mse, beta_img, text_beta must be >= 0")
    require(cfg.eval.grid_prompts >= 0, "eval.grid_prompts", "must be >= 0")
    require(cfg.eval.num_prompts >= 1, "eval.num_prompts", "must be >= 1")
    cfg.pretrain.check(cfg)
    cfg.model.check(cfg)
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

    An unknown builtin name is a one-line ConfigError naming the closest shipped names (the whole
    list is ``unigrpo configs``: too long for one line).
    """
    if not str(name).startswith(BUILTIN_PREFIX):
        return Path(name)
    key = str(name)[len(BUILTIN_PREFIX):]
    files = _builtin_files()
    if key not in files:
        import difflib

        close = difflib.get_close_matches(key, list(files), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(BUILTIN_PREFIX + k for k in close)}? " if close else ""
        raise ConfigError(f"{name}: no such built-in config ({hint}`unigrpo configs` lists the {len(files)} shipped)")
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
