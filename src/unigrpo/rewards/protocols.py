"""Wire protocols of the ``remote`` term (kwarg ``protocol``; docs/rewards.md, "Other reward servers").

- ``unigrpo``: ``unigrpo serve-reward``'s ``POST /score`` (``unigrpo.rewards.wire``): JSON, or a
  binary safetensors body when the server's ``GET /info`` lists ``safetensors`` in ``transports``
  (asked once, at the first call; a server without it, an older one, gets JSON).
- ``flow_grpo``: the reward servers of flow_grpo (github.com/yifan123/reward-server, ``app_geneval.py``,
  ``app_deqa.py``; client ``flow_grpo/rewards.py: geneval_score``): ``POST /`` with a pickled dict
  ``{"images": [JPEG bytes], "meta_datas": [dict], "only_strict": bool, "prompts": [str]}``, answered
  by a pickled dict whose ``score_key`` list holds the rewards (``scores`` for GenEval, ``outputs``
  for DeQA); an exception is a 500 with the traceback as text. Images are encoded as flow_grpo's
  client does: ``(x * 255).round()`` to uint8, JPEG at PIL's default quality 75.
- ``flow_factory``: Flow-Factory's ``reward_server/example_server.py`` (client
  ``flow_factory/rewards/my_reward_remote.py``): ``POST /compute`` JSON ``{"prompt": [str],
  "image": [base64 PNG], "video": null, ...}`` -> ``{"rewards": [float]}``; an exception is a 500
  ``{"detail": msg}``.

Pickle runs code while it loads, in both directions. This client sends only built-in types
(dict, list, str, bytes, float, int, bool, None: no global is ever pickled), reads answers with an
unpickler that refuses every global (a reply naming any class or function is a failure, never
executed), and refuses a URL whose host is neither loopback nor listed in ``trusted_hosts``.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import pickle
import threading
import urllib.parse

import numpy as np
import torch
from PIL import Image

from unigrpo.rewards.remote import _Failure, check_scores_answer, json_answer
from unigrpo.rewards.wire import (
    BINARY_TYPE,
    encode_binary_request,
    encode_request,
    png_bytes,
    to_json,
)

__all__ = ["PROTOCOLS", "FlowFactoryProtocol", "FlowGrpoProtocol", "UnigrpoProtocol", "safe_unpickle"]


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # every class, function and extension code comes through here
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def safe_unpickle(raw: bytes):
    """A pickle of built-in types only -> the object; any global in it is a (non-retryable) failure."""
    try:
        return _NoGlobals(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        if "refused global" in str(e):
            raise _Failure(f"answered a pickle that names a global ({e}); only built-in types are read", False) from None
        snippet = raw[:80].decode("utf-8", "replace").replace("\n", " ")
        raise _Failure(f"answered with a body that is not a pickle: {snippet!r}", False) from None
    except Exception:  # noqa: BLE001 -- truncated or garbage bytes raise many types
        snippet = raw[:80].decode("utf-8", "replace").replace("\n", " ")
        raise _Failure(f"answered with a body that is not a pickle: {snippet!r}", False) from None


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: not resolved here (it could point anywhere)


def jpeg_bytes(image: torch.Tensor, quality: int = 75) -> bytes:
    """[3, H, W] in [0, 1] -> JPEG bytes as flow_grpo's client writes them (rounded, PIL quality 75)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class UnigrpoProtocol:
    name, path = "unigrpo", "/score"
    decode = staticmethod(json_answer)

    def __init__(self, image_format: str = "npy", transport: str = "auto", **unused):
        if transport not in ("auto", "json", "binary"):
            raise ValueError(f"transport={transport!r}: expected 'auto', 'json' or 'binary'")
        self.image_format, self.transport, self._lock = image_format, transport, threading.Lock()

    @property
    def content_type(self) -> str:
        return BINARY_TYPE if self.transport == "binary" else "application/json"

    def prepare(self, client) -> None:
        """``auto``: settle on binary or JSON from the server's ``/info`` (until then: JSON)."""
        with self._lock:
            if self.transport != "auto":
                return
            info, answered = client.probe("/info")
            if answered:  # a server that is down is asked again at the next call
                offers = isinstance(info, dict) and "safetensors" in (info.get("transports") or [])
                self.transport = "binary" if offers else "json"

    def encode(self, images, prompts, metadata) -> bytes:
        if self.transport == "binary":
            return encode_binary_request(images, prompts, metadata, self.image_format)
        return encode_request(images, prompts, metadata, self.image_format)

    def scores(self, answer, n: int) -> list[float]:
        return check_scores_answer(answer, n)


class FlowGrpoProtocol:
    name, path, content_type = "flow_grpo", "/", "application/octet-stream"
    decode = staticmethod(safe_unpickle)

    def prepare(self, client) -> None:
        pass

    def __init__(self, url: str, score_key: str = "scores", only_strict: bool = False, jpeg_quality: int = 75,
                 trusted_hosts: list | None = None, **unused):
        host = urllib.parse.urlsplit(url).hostname or ""
        if not is_loopback(url) and host not in [str(h) for h in (trusted_hosts or [])]:
            raise ValueError(f"protocol flow_grpo exchanges pickles, which run code when loaded: host {host!r} "
                             f"is not loopback; list it in trusted_hosts only if it is a server you run on "
                             f"a network you trust")
        self.score_key, self.only_strict, self.quality = str(score_key), bool(only_strict), int(jpeg_quality)

    def encode(self, images, prompts, metadata) -> bytes:
        # built-in types only (to_json: tensors / numpy become lists and floats): no global in the pickle
        req = {"images": [jpeg_bytes(im, self.quality) for im in images], "meta_datas": to_json(list(metadata)),
               "only_strict": self.only_strict, "prompts": [str(p) for p in prompts]}
        return pickle.dumps(req, protocol=4)  # flow_grpo's default protocol; its server is Python 3.10

    def scores(self, answer, n: int) -> list[float]:
        if not isinstance(answer, dict) or self.score_key not in answer:
            keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
            raise _Failure(f"answered {keys}, expected a dict with {self.score_key!r}", False)
        return check_scores_answer({"scores": answer[self.score_key]}, n)


class FlowFactoryProtocol:
    name, path, content_type = "flow_factory", "/compute", "application/json"
    decode = staticmethod(json_answer)

    def __init__(self, **unused):
        pass

    def prepare(self, client) -> None:
        pass

    def encode(self, images, prompts, metadata) -> bytes:
        del metadata  # the server's `extra` field is parsed but never passed on
        pngs = [base64.b64encode(png_bytes(im)).decode("ascii") for im in images]
        return json.dumps({"prompt": [str(p) for p in prompts], "image": pngs, "video": None,
                           "condition_images": None, "condition_videos": None}).encode()

    def scores(self, answer, n: int) -> list[float]:
        if isinstance(answer, dict) and "error" in answer:  # Flow-Factory's client raises on it too
            raise _Failure(f"answered an error: {str(answer['error'])[:120]!r}", False)
        if not isinstance(answer, dict) or "rewards" not in answer:
            raise _Failure(f"answered {str(answer)[:80]!r}, expected {{\"rewards\": [...]}}", False)
        return check_scores_answer({"scores": answer["rewards"]}, n)


PROTOCOLS = {"unigrpo": UnigrpoProtocol, "flow_grpo": FlowGrpoProtocol, "flow_factory": FlowFactoryProtocol}
