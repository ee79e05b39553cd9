"""The reward service's wire format (docs/rewards.md, "The HTTP API"), shared by client and server.

Two transports. A JSON request is ``{"format": "npy" | "png", "images": [base64, ...], "prompts": [...],
"metadata": [...]}``. ``npy`` (the default) is each image's float32 array [3, H, W] in [0, 1] as an
``.npy`` file: lossless, the served reward sees exactly the trainer's pixels. ``png`` is an 8-bit
RGB PNG: 4x smaller, but it quantises to 1/255 (what off-the-shelf judges read anyway).

A binary request (``Content-Type: application/x-safetensors``, offered by servers whose ``/info``
lists it in ``transports``) is one safetensors file: the tensor ``images`` [B, 3, H, W], float32
(``npy``: the same lossless pixels) or uint8 (``png``: the same 8-bit levels as the PNG, no
compression), and in the header's ``__metadata__`` the JSON strings ``prompts`` and ``metadata``.
No base64, no per-image files, no JSON over pixels: the bytes are the tensor's memory.

A prompt's input images (an editing task: ``metadata["input_images"]``, a tensor [n, 3, H, W] in
[0, 1] in process) travel in either transport as a list of base64 images in the request's format
(the same encoding as ``images``) and reach the served reward as the same tensor again
(``pack_metadata`` / ``unpack_metadata``): a reward reads them the same way in process and served.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BINARY_TYPE",
    "FORMATS",
    "INPUT_IMAGES",
    "PayloadError",
    "check_pixels",
    "decode_binary_request",
    "decode_images",
    "decode_request",
    "encode_binary_request",
    "encode_images",
    "encode_request",
    "pack_metadata",
    "png_bytes",
    "to_json",
    "unpack_metadata",
]

FORMATS = ("npy", "png")
BINARY_TYPE = "application/x-safetensors"
MAX_SIDE = 4096


class PayloadError(ValueError):
    """A request the server cannot score (HTTP 400), with a message saying which field and why."""


def png_bytes(image: torch.Tensor) -> bytes:
    """[3, H, W] float in [0, 1] -> 8-bit RGB PNG bytes (rounded to the nearest level)."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_images(images: torch.Tensor, fmt: str = "npy") -> list[str]:
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r}: expected one of {FORMATS}")
    out = []
    for img in images.detach().float().cpu():
        if fmt == "png":
            raw = png_bytes(img)
        else:
            buf = io.BytesIO()
            np.save(buf, img.numpy().astype("<f4"), allow_pickle=False)
            raw = buf.getvalue()
        out.append(base64.b64encode(raw).decode("ascii"))
    return out


def _decode_one(data, fmt: str, i: int) -> np.ndarray:
    if not isinstance(data, str):
        raise PayloadError(f"images[{i}]: expected a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError(f"images[{i}]: not valid base64") from None
    if fmt == "png":
        if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
            raise PayloadError(f"images[{i}]: not a PNG (format 'png')")
        try:
            with Image.open(io.BytesIO(raw)) as im:
                if max(im.size) > MAX_SIDE:
                    raise PayloadError(f"images[{i}]: {im.size} is larger than {MAX_SIDE} px")
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except PayloadError:
            raise
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for a corrupt file
            raise PayloadError(f"images[{i}]: corrupt PNG ({e})") from None
        return np.ascontiguousarray(arr.transpose(2, 0, 1))  # [3, H, W] in the usual layout: a reward's
        # reductions then sum in the same order whatever the transport (a channels-last view would not)
    if not raw.startswith(b"\x93NUMPY"):
        raise PayloadError(f"images[{i}]: not an .npy array (format 'npy')")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- numpy raises many types for a corrupt file
        raise PayloadError(f"images[{i}]: corrupt .npy ({e})") from None
    if arr.ndim != 3 or arr.shape[0] != 3 or max(arr.shape) > MAX_SIDE or arr.dtype.kind != "f":
        raise PayloadError(f"images[{i}]: expected a float array [3, H, W], got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.float32, copy=False)


def decode_images(items: list, fmt: str) -> torch.Tensor:
    arrs = [_decode_one(d, fmt, i) for i, d in enumerate(items)]
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise PayloadError(f"images: all images of a request must have one size, got {sorted(shapes)}")
    return check_pixels(torch.from_numpy(np.stack(arrs))) if arrs else torch.zeros(0, 3, 1, 1)


def check_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float -> itself, or a PayloadError naming the first image the wire format forbids:
    zero-size, a NaN / inf pixel, a value outside [0, 1] (a reward would score garbage silently)."""
    if x.numel() == 0:
        raise PayloadError(f"images: zero-size images {list(x.shape)}")
    flat = x.reshape(len(x), -1)
    for bad, what in ((~torch.isfinite(flat), "non-finite pixels (NaN or inf)"),
                      ((flat < 0) | (flat > 1), "pixels outside [0, 1]")):
        rows = bad.any(dim=1).nonzero().flatten()
        if len(rows):
            i = int(rows[0])
            extra = "" if "finite" in what else f" (min {float(flat[i].min()):g}, max {float(flat[i].max()):g})"
            raise PayloadError(f"images[{i}]: {what}{extra}; the wire format carries [0, 1]")
    return x


def to_json(obj):
    """Metadata -> JSON-safe built-ins (tensors and numpy values become lists / numbers, others str)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return to_json(obj.tolist())
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)


INPUT_IMAGES = "input_images"


def pack_metadata(metadata: list[dict], fmt: str) -> list:
    """Metadata -> JSON-safe, each row's ``input_images`` tensor as base64 images in format ``fmt``."""
    return to_json([{**m, INPUT_IMAGES: encode_images(m[INPUT_IMAGES], fmt)}
                    if isinstance(m.get(INPUT_IMAGES), torch.Tensor) else m for m in metadata])


def unpack_metadata(metadata: list[dict], fmt: str) -> list[dict]:
    """The server's side of ``pack_metadata``: each row's ``input_images`` back to [n, 3, H, W]."""
    out = []
    for i, m in enumerate(metadata):
        if INPUT_IMAGES in m:
            items = m[INPUT_IMAGES]
            if not isinstance(items, list) or not items:
                raise PayloadError(f"metadata[{i}].{INPUT_IMAGES}: expected a non-empty list of base64 images")
            try:
                m = {**m, INPUT_IMAGES: decode_images(items, fmt)}
            except PayloadError as e:
                raise PayloadError(f"metadata[{i}].{INPUT_IMAGES}: {e}") from None
        out.append(m)
    return out


def encode_request(images: torch.Tensor, prompts: list[str], metadata: list[dict], fmt: str = "npy") -> bytes:
    return json.dumps({"format": fmt, "images": encode_images(images, fmt), "prompts": list(prompts),
                       "metadata": pack_metadata(list(metadata), fmt)}).encode()


def _check_lists(prompts, metadata, n: int, max_batch: int) -> list[dict]:
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise PayloadError("metadata: expected a list of objects")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError("prompts: expected a list of strings")
    if not (n == len(prompts) == len(metadata)):
        raise PayloadError(f"length mismatch: {n} images, {len(prompts)} prompts, {len(metadata)} metadata")
    if not n:
        raise PayloadError("images: empty batch")
    if n > max_batch:
        raise PayloadError(f"images: batch of {n} is larger than the server's max_batch {max_batch}")
    return metadata


def u8_levels(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> uint8, the levels ``png_bytes`` writes (x * 255 + 0.5, floored)."""
    return (images.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)


def encode_binary_request(images: torch.Tensor, prompts: list[str], metadata: list[dict], fmt: str = "npy") -> bytes:
    from safetensors.torch import save

    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r}: expected one of {FORMATS}")
    x = images.detach().cpu()
    x = u8_levels(x) if fmt == "png" else x.float()
    return save({"images": x.contiguous()}, metadata={"prompts": json.dumps(list(prompts)), "format": fmt,
                                                        "metadata": json.dumps(pack_metadata(list(metadata), fmt))})


def decode_binary_request(body: bytes, max_batch: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The server's parser of a binary request: every malformed part is a PayloadError naming it."""
    from safetensors.torch import load

    if len(body) < 8 or int.from_bytes(body[:8], "little") > min(len(body) - 8, 100 * 2**20):
        raise PayloadError("body: not a safetensors file (bad header length)")
    size = int.from_bytes(body[:8], "little")
    try:
        meta = json.loads(body[8:8 + size]).get("__metadata__") or {}
        prompts, metadata = json.loads(meta["prompts"]), json.loads(meta.get("metadata", "null"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        raise PayloadError("body: the safetensors header needs __metadata__ {prompts, metadata} as JSON") from None
    try:
        tensors = load(body)
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
        raise PayloadError(f"body: corrupt safetensors ({str(e).splitlines()[0][:120]})") from None
    x = tensors.get("images")
    if x is None or x.ndim != 4 or x.shape[1] != 3 or max(x.shape[2:]) > MAX_SIDE or x.dtype not in (
            torch.float32, torch.uint8):
        got = "no tensor 'images'" if x is None else f"{x.dtype} {list(x.shape)}"
        raise PayloadError(f"images: expected float32 or uint8 [B, 3, H, W], got {got}")
    metadata = _check_lists(prompts, metadata, len(x), max_batch)
    fmt = meta.get("format", "png" if x.dtype == torch.uint8 else "npy")
    if fmt not in FORMATS:
        raise PayloadError(f"format: {fmt!r} is not one of {list(FORMATS)}")
    return check_pixels(x.float() / 255.0 if x.dtype == torch.uint8 else x), prompts, unpack_metadata(metadata, fmt)


def decode_request(body: bytes, max_batch: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The server's parser: every malformed field is a PayloadError naming it."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PayloadError(f"body: not JSON ({e})") from None
    if not isinstance(req, dict):
        raise PayloadError("body: expected a JSON object {format, images, prompts, metadata}")
    missing = [k for k in ("images", "prompts") if k not in req]
    if missing:
        raise PayloadError(f"missing field(s): {', '.join(missing)}")
    fmt = req.get("format", "npy")
    if fmt not in FORMATS:
        raise PayloadError(f"format: {fmt!r} is not one of {list(FORMATS)}")
    images, prompts, metadata = req["images"], req["prompts"], req.get("metadata")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise PayloadError("images and prompts must be lists")
    metadata = _check_lists(prompts, metadata, len(images), max_batch)
    return decode_images(images, fmt), prompts, unpack_metadata(metadata, fmt)
