"""Model-based reward terms on a CLIP model loaded with ``transformers`` (extra ``hf``):
``clip_score``, ``pickscore`` and ``aesthetic`` (docs/rewards.md, "Model-based terms").

- ``clip_score``: ``scale * cos(image, prompt)`` of CLIP's projected embeddings. No clamp at 0
  (the paper's CLIPScore is ``2.5 * max(cos, 0)``, torchmetrics' ``max(100 * cos, 0)``): GRPO
  normalises rewards per group, so the scale does not matter, but a clamp would erase the ranking
  among images that all score poorly.
- ``pickscore``: ``scale * logit_scale.exp() * cos(image, prompt)``, the per-pair score of a
  PickScore checkpoint (a fine-tuned CLIP, whose processor ships under a different id: kwarg
  ``processor``). ``scale`` defaults to 1/26, the division flow_grpo's and Flow-Factory's scorers
  apply. The PickScore README's softmax across candidate images is a preference probability, not a
  per-image reward, and is not applied.
- ``aesthetic``: the LAION aesthetic predictor (improved-aesthetic-predictor ``simple_inference.py``):
  an MLP head on the L2-normalised CLIP image embedding; the head is a local ``.pth`` / ``.safetensors``
  state dict with the upstream key names ``layers.{0,2,4,6,7}.{weight,bias}``. Roughly a 1-10 rating.

Images are rounded to 8-bit RGB first (what flow_grpo's scorers and any image file see) and go
through the checkpoint's own processor (resize, crop, normalise). Every term runs batched
(``batch_size`` images per forward) on ``device`` in ``dtype``, in eval mode and under
``torch.inference_mode`` (no gradient ever reaches the reward model). ``model`` is a local folder
written by ``save_pretrained`` or a hub id already in the local cache; nothing is downloaded that the
user did not ask for. A checkpoint is loaded once per process (the CLI builds each term once to
check the config and once to train).
"""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import torch
from torch import nn

__all__ = ["AestheticReward", "ClipScoreReward", "PickScoreReward", "aesthetic_head", "load_clip"]

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "org/name" or "name": not a filesystem path


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _check_source(term: str, what: str, source: str) -> str:
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise ValueError(f"{term}: {what} {source!r} is a file, expected a folder written by save_pretrained "
                         f"or a hub id")
    if not _HUB_ID.match(source) or source.startswith("."):
        raise ValueError(f"{term}: {what} folder {source!r} does not exist")
    return source  # a hub id: transformers looks in the local cache (or downloads, if the user allows it)


def _dtype(term: str, name) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"{term}: dtype={name!r} is not a torch floating dtype (float32, bfloat16, float16)")
    return dt


_LOADED: dict[tuple, tuple] = {}  # one copy per process: `unigrpo train` builds each term twice (check, run)
_LOCK = threading.Lock()


def load_clip(term: str, model: str, processor: str | None, device: str, dtype, image_only: bool = False):
    """-> (model in eval mode on ``device``/``dtype``, processor), loaded once per process and
    shared (read-only: eval mode, no gradient); one-line errors for a missing folder, a non-CLIP
    checkpoint or a checkpoint transformers cannot read."""
    key = (term, str(model), str(processor), str(device), str(dtype), image_only)
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load_clip(term, model, processor, device, dtype, image_only)
        return _LOADED[key]


def _load_clip(term: str, model: str, processor: str | None, device: str, dtype, image_only: bool):
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError(f"{term} needs transformers: pip install 'unigrpo[hf]'") from e
    src = _check_source(term, "model", model)
    proc_src = _check_source(term, "processor", processor) if processor else src
    try:
        config = transformers.AutoConfig.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, JSON errors: all mean "cannot read it"
        raise ValueError(f"{term}: cannot load {src!r} ({_one_line(e)})") from None
    allowed = ("clip", "clip_vision_model") if image_only else ("clip",)
    if config.model_type not in allowed:
        raise ValueError(f"{term}: {src!r} is a {config.model_type!r} model, expected model_type "
                         f"{' or '.join(map(repr, allowed))} (a CLIP checkpoint)")
    cls = transformers.CLIPModel if config.model_type == "clip" else transformers.CLIPVisionModelWithProjection
    try:
        net = cls.from_pretrained(src)
        proc_cls = transformers.AutoImageProcessor if image_only else transformers.AutoProcessor
        proc = proc_cls.from_pretrained(proc_src)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{term}: cannot load {src!r} ({_one_line(e)})") from None
    net = net.to(device=device, dtype=_dtype(term, dtype)).eval().requires_grad_(False)
    return net, proc


def _features(out) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling (projection in .pooler_output), 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()  # cosine in float32 whatever the model's dtype
    n = x.norm(dim=-1, keepdim=True)
    return x / torch.where(n == 0, torch.ones_like(n), n)  # a zero embedding stays zero (upstream: norm 1)


def uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] in [0, 1] -> B uint8 HWC arrays, rounded (flow_grpo: ``(x * 255).round()``)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(arr.cpu().numpy())


class _ClipTerm:
    term = "clip"

    def __init__(self, model: str, processor: str | None = None, device: str = "cpu", dtype="float32",
                 batch_size: int = 32, scale: float = 1.0, max_text_tokens: int = 77):
        if batch_size < 1:
            raise ValueError(f"{self.term}: batch_size must be >= 1")
        self.model, self.processor = load_clip(self.term, model, processor, device, dtype)
        self.device, self.dtype = torch.device(device), _dtype(self.term, dtype)
        self.batch_size, self.scale = int(batch_size), float(scale)
        self.max_text_tokens = min(int(max_text_tokens), self.model.config.text_config.max_position_embeddings)

    def embeddings(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> L2-normalised float32 (image [B, D], text [B, D])."""
        inputs = self.processor(text=list(prompts), images=uint8_images(images), return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_text_tokens)
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        text = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        img = _features(self.model.get_image_features(pixel_values=pixels))
        txt = _features(self.model.get_text_features(**text))
        return _normalise(img), _normalise(txt)

    def pair_scores(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return (img * txt).sum(-1)  # [B] cosine of each image with its own prompt

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        del metadata
        out = []
        for a in range(0, len(prompts), self.batch_size):
            img, txt = self.embeddings(images[a:a + self.batch_size], prompts[a:a + self.batch_size])
            out.append(self.pair_scores(img, txt))
        return (self.scale * torch.cat(out)).cpu() if out else torch.zeros(0)


class ClipScoreReward(_ClipTerm):
    """``{name: clip_score, kwargs: {model: DIR_OR_HUB_ID, scale: 1.0, device, dtype, batch_size}}``."""

    term = "clip_score"


class PickScoreReward(_ClipTerm):
    """``{name: pickscore, kwargs: {model: yuvalkirstain/PickScore_v1,
    processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K, scale: 1/26, ...}}``."""

    term = "pickscore"

    def __init__(self, model: str, processor: str | None = None, scale: float = 1 / 26, **kwargs):
        super().__init__(model, processor, scale=scale, **kwargs)

    def pair_scores(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


def aesthetic_head(path: str) -> nn.Sequential:
    """The LAION aesthetic MLP (``layers`` = Linear, Dropout, Linear, Dropout, Linear, Dropout,
    Linear, Linear, no activations, as upstream) from a state dict file, sizes read from it."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise ValueError(f"aesthetic: head file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)  # weights only: no pickled code
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"aesthetic: cannot read head {path!r} ({_one_line(e)})") from None
    sd = {k.removeprefix("module."): v for k, v in dict(sd).items()}
    want = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    if sorted(sd) != sorted(want):
        raise ValueError(f"aesthetic: head {path!r} has keys {sorted(sd)[:6]}..., expected the LAION "
                         f"predictor's {want}")
    dims = [sd[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    layers: list[nn.Module] = []
    for i, (out_f, in_f) in enumerate(dims):
        layers.append(nn.Linear(in_f, out_f))
        if i < 3:
            layers.append(nn.Dropout(0.0))  # upstream's dropouts (0.2, 0.2, 0.1) do nothing in eval
    head = nn.Sequential(*layers)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})
    return head.eval().requires_grad_(False)


class AestheticReward:
    """``{name: aesthetic, kwargs: {model: openai/clip-vit-large-patch14, head: sac+logos+ava1-l14-linearMSE.pth,
    device, dtype, batch_size}}``."""

    def __init__(self, model: str, head: str, processor: str | None = None, device: str = "cpu",
                 dtype="float32", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError("aesthetic: batch_size must be >= 1")
        self.head = aesthetic_head(head).to(device)  # kept in float32: a 1-10 rating from a tiny affine map
        self.model, self.processor = load_clip("aesthetic", model, processor, device, dtype, image_only=True)
        dim = self.head[0].in_features
        proj = getattr(self.model.config, "projection_dim", None)
        if proj != dim:
            raise ValueError(f"aesthetic: the head takes {dim}-d embeddings, the CLIP model {model!r} gives {proj}-d")
        self.device, self.dtype, self.batch_size = torch.device(device), _dtype("aesthetic", dtype), int(batch_size)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=uint8_images(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        if hasattr(self.model, "get_image_features"):
            return _normalise(_features(self.model.get_image_features(pixel_values=pixels)))
        return _normalise(self.model(pixel_values=pixels).image_embeds)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        del prompts, metadata
        out = [self.head(self.image_embeddings(images[a:a + self.batch_size]))[:, 0]
               for a in range(0, len(images), self.batch_size)]
        return torch.cat(out).cpu() if out else torch.zeros(0)
