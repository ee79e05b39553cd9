"""``UnifiedModel``: the interface the recipe uses and the one base of every adapter, with the
protocol's defaults and the lifecycle every kind shares (``models.protocol`` has the overview).

An adapter (``tiny``, each ``hf`` family, ``bagel``) derives from :class:`UnifiedModel` and writes only
what is model-specific: how a prompt becomes tokens (``prompt_ids``, ``response_ids``,
``token_text``), the decode contract of the text engine (``prefill``, ``decode_step``:
``models.decode``), the teacher-forced pass (``forward_context``), the null context, the velocity,
the VAE, and ``parameter_groups``. Everything a model CAN do beyond that is a declared member with
a default here, never probed with ``getattr``:

- capabilities ``sees_images`` (input images enter the reasoning context) and ``edits`` (the
  denoiser is conditioned on input images' latents); a task that needs one the model lacks is
  refused at ``validate``, and ``encode`` refuses images the model would drop;
- ``timesteps`` (the sampling grid; ``sampler.shift: null`` = the model's ``own_timesteps``),
  ``combine_guidance`` (how CFG blends two velocities), ``eval_guidance`` (a model's own
  evaluation guidance, e.g. Bagel's two branches), ``sharded`` / ``fixed_steps`` (FSDP2: every
  forward is a collective), ``validate_prompts`` (a closed vocabulary).

**Lifecycle** (one implementation for every kind): the trainable state is ``parameter_groups``'
tensors by name (gathered on every rank when sharded); ``save`` writes it with the LoRA ranks, the
model section it was built from and the sha256 of the tensors in the metadata (every load,
``read_weights``, verifies the hash; ``unigrpo export`` rebuilds the model from the section and
calls ``export_formats`` / ``write_export``, what each kind writes for its ecosystem); ``wrap`` broadcasts rank 0's weights and, with ``model.fsdp`` on > 1 rank, shards
the units of ``fsdp_plan``; the **reference** (:class:`ReferencePolicy`) is the same model under other
weights: its LoRA adapters switched off and a snapshot of every other trainable tensor substituted
by name (``substituted``), never a second copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unigrpo.algo.guidance import cfg_blend
from unigrpo.algo.schedule import timesteps
from unigrpo.models import decode
from unigrpo.models.fsdp import GatheredState, load_full_state
from unigrpo.models.protocol import TokenBatch
from unigrpo.utils import dist

__all__ = ["FSDPRoot", "ReferencePolicy", "TextSide", "UnifiedModel", "adapters_disabled", "inject_lora", "lora_layers", "read_weights",
           "substituted"]


def lora_layers(*modules: nn.Module | None) -> list[nn.Module]:
    """Every peft LoRA layer (``BaseTunerLayer``) in ``modules``: one walk over all their modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for mod in modules if mod is not None for m in mod.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(*modules: nn.Module | None, layers: list[nn.Module] | None = None):
    """Every peft LoRA layer in ``modules`` (or the given ``lora_layers``, found once by a caller that
    switches them often) switched off inside the block, restored after (diffusers models have
    ``disable_adapters()`` but no context manager; this one works for any module)."""
    layers = lora_layers(*modules) if layers is None else layers
    # peft's flag behind ``disable_adapters``, which its layers' forward reads. Not through
    # ``enable_adapters``: that also resets requires_grad of every adapter weight (which the caller
    # set: a frozen side must stay frozen), and a reference call made it twice per denoising step
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was


@contextlib.contextmanager
def substituted(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """``model`` with the parameters named in ``tensors`` replaced by those tensors inside the block
    (every module holding one of them: tied weights stay tied), restored after."""
    if not tensors:
        yield
        return
    params = dict(model.named_parameters())
    new = {id(params[n]): t for n, t in tensors.items()}
    slots = [(m, k, p) for m in model.modules() for k, p in m._parameters.items() if p is not None and id(p) in new]
    try:
        for m, k, p in slots:
            del m._parameters[k]
            setattr(m, k, new[id(p)])  # a plain tensor attribute: what the forward reads
        yield
    finally:
        for m, k, p in slots:
            if k in m.__dict__:
                delattr(m, k)
            m._parameters[k] = p


def inject_lora(module: nn.Module, ranks: dict[str, int]) -> None:
    """peft LoRA layers on the modules named by the suffixes of ``ranks`` (target -> rank; alpha =
    rank, no dropout, B = 0: the policy starts as the base). LoRA weights are float32 whatever the
    model's dtype: they are what the optimizer steps (peft casts the input, returns the layer's dtype)."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = max(ranks.values())
    per_target = {} if len(set(ranks.values())) == 1 else {"rank_pattern": ranks, "alpha_pattern": ranks}
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(ranks),
                                       **per_target), module)
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()


def read_weights(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors weight file; a missing, unreadable (truncated, empty,
    another format), altered (its recorded sha256 differs: ``verify_hash``) or non-finite file is one
    line naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from unigrpo.utils.checkpoint import nonfinite_tensor, verify_hash
    from unigrpo.utils.errors import CheckpointError

    if not Path(path).is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=device)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__})") from e
    verify_hash(state, meta, path)
    if (bad := nonfinite_tensor(state)) is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN/inf; refusing to load broken weights")
    return state, meta


@dataclass
class FSDPRoot:
    """One FSDP2 root of ``UnifiedModel.fsdp_plan``: ``module`` is sharded last, after each of its
    ``units``; ``ignored`` parameters stay replicated; ``methods`` are called outside ``forward``."""

    module: nn.Module
    units: list[nn.Module]
    ignored: set | None = None
    methods: tuple[str, ...] = ()
    unit_name: str = "block"  # what a unit is, in messages


class TextSide:
    """The text methods of the protocol, written once over an adapter's ``prompt_ids`` /
    ``response_ids`` / ``token_text`` and the text engine's contract (``prefill``, ``decode_step``,
    ``stop_ids``, ``pad_id``, ``fixed_steps``: ``models.decode``). ``UnifiedModel`` has them; so does
    ``hf_text.CausalLMReasoner`` (an LM on its own)."""

    sees_images = False  # input images enter the reasoning context (the text can be about them)
    max_input_images: int | None = None  # images a row can hold (its inputs + drawn ones); None: no limit
    token_sampler = "multinomial"  # how the engine draws a token (``decode.TOKEN_SAMPLERS``; ``configure_decode``)

    def configure_decode(self, *, token_sampler: str = "multinomial", static_cache: bool = False,
                         compile: bool = False) -> None:
        """How this model's decode loop runs (``text.token_sampler`` / ``static_cache`` / ``compile``):
        the engine's sampler for every model; a preallocated KV cache and a ``torch.compile``d step
        only where the text side is a transformers causal LM (``hf_text.CausalLMReasoner``), which
        overrides this. Raises ValueError (one line) for what the model cannot do."""
        if token_sampler not in decode.TOKEN_SAMPLERS:
            raise ValueError(f"text.token_sampler: {token_sampler!r} is none of {', '.join(decode.TOKEN_SAMPLERS)}")
        if static_cache or compile:
            raise ValueError(f"text.static_cache / text.compile: {type(self).__name__} decodes on its own cache; "
                             "the static cache and the compiled step exist for the hf kinds' transformers LMs: "
                             "set both to false")
        self.token_sampler = token_sampler

    def encode(self, prompts: Sequence[Any]) -> TokenBatch:
        """The input batch of ``prompts`` (``tasks.Prompt`` objects or plain strings), LEFT-padded,
        with each row's input images (``Prompt.images``) where the model sees them."""
        texts = [p if isinstance(p, str) else p.text for p in prompts]
        images = [None if isinstance(p, str) else p.images for p in prompts]
        batch = TokenBatch.left_padded([self.cached_prompt_ids(t) for t in texts], self.pad_id, self.device)
        if all(x is None or x.shape[0] == 0 for x in images):
            return batch
        if not self.sees_images:  # never drop an image silently
            raise ValueError(f"{type(self).__name__} does not see input images (sees_images = False), and a "
                             "prompt carries some: use a model that sees images, or prompts without images")
        return batch.with_images(images)

    PROMPT_CACHE = 4096  # prompts whose ids ``cached_prompt_ids`` keeps (the oldest go first)

    def cached_prompt_ids(self, text: str) -> list[int]:
        """``prompt_ids(text)``, kept: a step encodes each prompt once per trajectory of its group, and
        a chat template + tokenizer call is a few percent of a tiny model's step."""
        cache = self.__dict__.setdefault("_prompt_ids", {})  # per instance (not a class attribute)
        if text not in cache:
            if len(cache) >= self.PROMPT_CACHE:
                cache.pop(next(iter(cache)))
            cache[text] = self.prompt_ids(text)
        return list(cache[text])

    # what an adapter writes: a prompt's ids (its template, up to where the reasoning starts), a given
    # response's ids closed by the stop token, ids as text (special tokens kept)
    def prompt_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def response_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def validate_prompts(self, texts: list[str], max_new_tokens: int = 0) -> None:
        """Raise ValueError (one line) if the model cannot read a prompt, or cannot fit it plus
        ``max_new_tokens`` of reasoning in its context (default: it reads any)."""

    def sample_reasoning(self, prompts: TokenBatch, **options):
        return decode.sample(self, prompts, token_sampler=self.token_sampler, **options)

    def with_response(self, prompts: TokenBatch, responses: list[str]) -> TokenBatch:
        return prompts.with_responses([self.response_ids(r) for r in responses], self.pad_id)

    def decode_text(self, tokens: TokenBatch) -> list[str]:
        return [self.token_text([i for i, keep in zip(ids, m) if keep])
                for ids, m in zip(tokens.ids.tolist(), tokens.response_mask.tolist())]

    @staticmethod
    def detach_context(ctx):
        """The context with its hidden states cut from the text graph (a dataclass with ``hidden``)."""
        return dataclasses.replace(ctx, hidden=ctx.hidden.detach())


class UnifiedModel(TextSide, nn.Module):
    """What the recipe needs from a reason-then-draw model: the members an adapter writes (below,
    raising NotImplementedError), the declared capabilities with their defaults, the lifecycle."""

    edits = False  # the denoiser is conditioned on input images' latents
    # (H, W) every input image is resized to when a task loads it (None: the model takes no images);
    # a model that sees or edits sets it (e.g. its output size)
    input_image_size: tuple[int, int] | None = None
    context_grad_to_text = True  # the image context carries a gradient to the text side (separate mode: no)
    # multi-round episodes (``rollout.sample_episode``): after each drawn image the model reads this turn and
    # writes a reflection; an answer (after the last ``</think>``) equal to ``stop_word`` ends its episode
    reflection_prompt = ("Look at the image you drew. If it shows what the prompt asks, answer done; "
                         "otherwise describe the image to draw.")
    stop_word = "done"
    # multi-round: the id of a MASKED column ``rollout.reflection_tokens`` writes before the reflection turn,
    # marking where the image the row drew enters the context (Bagel: its VAE and ViT blocks go there, after
    # the round's reasoning); None: the model places a row's images itself (tiny: before the text; Qwen-Image-
    # Edit: at the vision block of its reflection turn)
    drawn_image_id: int | None = None
    pad_id: int
    stop_ids: tuple[int, ...]
    latent_shape: tuple[int, ...]  # shape of one image latent, e.g. (12, 16, 16)

    def __init__(self):
        super().__init__()
        self.fsdp = False  # model.fsdp (set by build): shard in wrap when on > 1 rank
        self.sharded = False  # every forward is a collective: every rank runs the same calls
        self.fixed_steps = False  # the decode loop runs max_new_tokens steps (set when sharded)
        self._gathered, self._is_main, self._fsdp_roots = GatheredState(), True, []
        self.config_section: dict | None = None  # the model section it was built from (build_model): saved with it

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ----------------------------------------------------------------- what an adapter writes
    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0) -> tuple[torch.Tensor, Any]:
        """One teacher-forced pass: (log-probs [B, L] of ``tokens.ids`` under temperature-scaled
        logits, zero outside ``response_mask``; the image context for ``velocity``)."""
        raise NotImplementedError

    def null_context(self, batch_size: int) -> Any:
        """The unconditional context (no prompt, no reasoning) for classifier-free guidance."""
        raise NotImplementedError

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Predicted velocity ``v = eps - x0`` at state ``x_t`` [B, *latent], flow time ``t`` [B]
        (one time per row; a 0-dim ``t`` is broadcast to all rows)."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent] -> RGB images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB images [B, 3, H, W] in [0, 1] -> latents (supervised flow matching, edits)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """``{"text": [(name, parameter), ...], "image": [...]}``: what each expert may train.
        Names are those of ``trainable_state`` (``optim.image_params`` matches them)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- declared defaults
    def timesteps(self, num_steps: int, shift: float | None) -> torch.Tensor:
        """``timesteps(num_steps, shift)``; ``shift`` None (``sampler.shift: null``): ``own_timesteps``."""
        return timesteps(num_steps, shift) if shift is not None else self.own_timesteps(num_steps)

    def own_timesteps(self, num_steps: int) -> torch.Tensor:
        """The model's own flow-time grid ``[1, ..., 0]`` (a pipeline's dynamic shift)."""
        raise ValueError(f"sampler.shift: null asks for the model's own schedule, and {type(self).__name__} "
                         "has none (set a number)")

    def combine_guidance(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        return cfg_blend(v_cond, v_uncond, cfg_scale)  # the plain rule

    def eval_guidance(self, tokens: TokenBatch, ctx: Any, cfg_scale: float):
        return

    def reflection_ids(self, picture: int = 1) -> list[int]:
        """The ids of the reflection turn (``reflection_prompt`` in the model's template), appended after
        the row's context and the image it drew, before its reflection is sampled (multi-round).
        ``picture``: the drawn image's 1-based place among the row's images, for a model that labels
        its images (Qwen-Image-Edit-Plus's ``Picture i:``); the others ignore it."""
        raise NotImplementedError(f"{type(self).__name__} has no reflection turn yet: it cannot run multi-round "
                                  "episodes (algo.rounds > 1)")

    def says_done(self, response: str) -> bool:
        """Whether a decoded reflection stops the episode: its answer (after the last ``</think>``, special
        tokens and a final '.' dropped) is ``stop_word``, case aside."""
        answer = response.rsplit("</think>", 1)[-1].split()
        words = [w for w in answer if not (w.startswith("<") and w.endswith(">"))]
        return " ".join(words).rstrip(" .").lower() == self.stop_word.lower()

    # ----------------------------------------------------------------- lifecycle
    def _named_trainable(self) -> dict[str, nn.Parameter]:
        for root in self._fsdp_roots:  # a root keeps its gathered params after a forward: back to the shards
            root.reshard()
        return {n: p for g in self.parameter_groups().values() for n, p in g}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors (sharded: every rank gathers, in the same order)."""
        return self._gathered.gather(self._named_trainable(), keep=self.sharded and self._is_main)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Sharded: every rank loads the same full tensors and keeps its own shard (no collective)."""
        load_full_state(self._named_trainable(), state)

    def configured(self, m, checkpoint: str | Path | None) -> UnifiedModel:
        """The end of every builder: the model section ``m``'s ``fsdp`` and ``gradient_checkpointing``
        applied, the trainable tensors of ``checkpoint`` (a ``save`` file) loaded if given."""
        self.fsdp = m.fsdp
        if m.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        return self

    def load_checkpoint(self, path: str | Path) -> None:
        """The trainable tensors of a ``save`` file (``model.checkpoint``), checked before anything
        is copied: readable, finite, every name and shape the model's (one line naming the misfit)."""
        from unigrpo.utils.checkpoint import check_fits

        state, _ = read_weights(path)
        check_fits(state, {n: p for g in self.parameter_groups().values() for n, p in g}, path)
        self.load_trainable_state(state)

    def save_metadata(self) -> dict[str, str]:
        """What ``save`` records beside the tensors: the model section it was built from (``model``:
        base pipeline / reasoner / path, LoRA ranks and targets, dtype, kind; what ``unigrpo export``
        rebuilds it from) + an adapter's own (the LoRA ranks)."""
        return {} if self.config_section is None else {"model": json.dumps({**self.config_section, "checkpoint": None})}

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """The trainable tensors as safetensors (the base weights are named by the config). Sharded:
        ``save`` runs on rank 0 alone, so it writes the state every rank gathered last
        (``save_checkpoint`` calls ``trainable_state`` on every rank first); refused if a parameter
        was written since."""
        from safetensors.torch import save

        from unigrpo.utils.checkpoint import atomic_save, hashed_metadata

        meta = {**self.save_metadata(), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        own = self.trainable_state() if not self.sharded else self._gathered.take(self._named_trainable().values())
        state = {k: v.contiguous() for k, v in own.items()}
        meta = hashed_metadata(state, meta)  # verified by every load (read_weights)
        atomic_save(lambda f: f.write(save(state, metadata=meta)), path)  # a crash never leaves half a file

    def export_formats(self) -> tuple[str, ...]:
        """What ``unigrpo export`` writes for this model (``lora``, ``merged``), the default first."""
        return ()

    def write_export(self, folder: Path, fmt: str, extra: dict) -> str:
        """The policy written to the empty ``folder`` in format ``fmt`` (one of ``export_formats``;
        ``extra``: what ``save`` was given, e.g. the step); returns how to load it (README code)."""
        raise NotImplementedError

    def fsdp_plan(self) -> tuple[list[FSDPRoot], str]:
        """The FSDP2 roots (each with its units) and a one-line description for the log."""
        raise ValueError(f"model.fsdp: {type(self).__name__} cannot be sharded")

    def wrap(self, ranks) -> None:
        """Every rank starts from rank 0's weights; with ``model.fsdp`` on > 1 rank, then sharded:
        ``fully_shard`` on every unit of each root of ``fsdp_plan``, then on the root."""
        dist.broadcast_parameters(self, ranks)
        if not (self.fsdp and ranks.enabled):
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        roots, what = self.fsdp_plan()
        check_unit_dtypes(roots)
        mesh = init_device_mesh(self.device.type, (ranks.world,))
        for root in roots:
            for unit in root.units:
                fully_shard(unit, mesh=mesh)
            fully_shard(root.module, mesh=mesh, ignored_params=root.ignored)
            for method in root.methods:
                register_fsdp_forward_method(root.module, method)
        self._fsdp_roots = [r.module for r in roots]
        self.sharded, self.fixed_steps, self._is_main = True, True, ranks.is_main
        if ranks.is_main:
            print(f"[unigrpo] model.fsdp: sharded over {ranks.world} ranks: {what}", flush=True)

    def reduce_gradients(self, params: list[nn.Parameter], ranks) -> None:
        if not self.sharded:  # sharded: FSDP2 reduce-scattered (averaged) them in backward
            dist.average_gradients(params, ranks)

    def reference(self) -> ReferencePolicy:
        """The frozen starting policy (:class:`ReferencePolicy`); call before the first update."""
        return ReferencePolicy(self)


def check_unit_dtypes(roots: list[FSDPRoot]) -> None:
    """FSDP2 reduces one unit's gradients in one dtype: the trainable tensors of each unit (and of
    each root outside its units) must share theirs. LoRA weights are float32, a fully trained side
    keeps ``model.dtype``: mixing them in a unit is refused here, in one line, rather than by
    FSDP2's assertion at the first forward."""
    for root in roots:
        inner = {id(p) for m in root.units for p in m.parameters()} | {id(p) for p in root.ignored or ()}
        units = [(f"{root.unit_name} {i}", list(u.named_parameters())) for i, u in enumerate(root.units)]
        units.append(("the root",
                      [(n, p) for n, p in root.module.named_parameters() if id(p) not in inner]))
        for unit, params in units:
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in params if p.requires_grad})
            if len(dtypes) > 1:
                raise ValueError(f"model.fsdp: {unit} trains tensors of dtypes {dtypes} (LoRA weights are float32, a "
                                 "fully trained side model.dtype); FSDP2 needs one per unit: use model.dtype=float32, "
                                 "or LoRA on both sides or on neither")


class ReferencePolicy:
    """The starting policy as the regularisers read it (``forward_context``, ``null_context``,
    ``velocity``, ``combine_guidance`` of the model under its starting weights): the same model with its LoRA adapters off
    and a snapshot (taken now) of every other trainable tensor substituted by name. Memory: one
    copy of the fully trained tensors, nothing for LoRA."""

    def __init__(self, model: UnifiedModel):
        self.model = model
        self.snapshot = {n: p.detach().clone() for g in model.parameter_groups().values() for n, p in g
                         if "lora_" not in n}
        if model.sharded and self.snapshot:
            raise NotImplementedError("model.fsdp: the reference of a fully trained side (an expert with lora rank 0) "
                                      "is a snapshot of its tensors, not sharded yet; use LoRA on that side or no "
                                      "regulariser (algo.c_mse = algo.beta_img = algo.text_beta = 0)")
        # found once: a reference call switches them every denoising step (LoRA is injected at build)
        self.lora = lora_layers(self.model)

    @contextlib.contextmanager
    def _weights(self):
        with torch.no_grad(), adapters_disabled(layers=self.lora) if self.lora else contextlib.nullcontext(), \
                substituted(self.model, self.snapshot):
            yield

    def forward_context(self, tokens: TokenBatch, temperature: float = 1.0):
        with self._weights():
            return self.model.forward_context(tokens, temperature)

    def null_context(self, batch_size: int):
        with self._weights():
            return self.model.null_context(batch_size)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        with self._weights():
            return self.model.velocity(x_t, t, ctx)

    def combine_guidance(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        return self.model.combine_guidance(v_cond, v_uncond, cfg_scale)  # the policy's rule

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot (empty when every side is LoRA: the reference is then the frozen base)."""
        return {k: v.cpu().clone() for k, v in self.snapshot.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(self.snapshot.keys() - state.keys()), sorted(state.keys() - self.snapshot.keys())
        if missing or unexpected:  # checked first: a rejected state leaves the reference untouched
            raise ValueError(f"reference state does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in self.snapshot.items():
            v.copy_(state[k])
