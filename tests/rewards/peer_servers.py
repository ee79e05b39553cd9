"""Fake reward servers of the peer frameworks, written from their protocols (docs/rewards.md,
"Other reward servers"), on 127.0.0.1, and the in-process rewards they must agree with
(dotted path ``peer_servers:...``).

- ``FakeFlowGrpo``: yifan123/reward-server ``app_geneval.py`` / ``app_deqa.py`` (Flask): only
  ``POST /``; the body is a pickle; images are opened as JPEG only; an exception is a 500 whose body
  is the traceback as plain text; the answer is a pickled dict. GenEval answers ``scores``,
  ``rewards``, ``strict_rewards``, ``group_rewards``, ``group_strict_rewards`` (-10.0 = "not this
  tag"); DeQA answers ``outputs``. The "detector" here is the decoded JPEG's mean brightness.
- ``FakeFlowFactory``: Flow-Factory ``reward_server/example_server.py`` (FastAPI): ``GET /health``,
  ``POST /compute`` JSON with base64 images decoded by PIL, ``{"rewards": [...]}``; an exception is
  a 500 ``{"detail": msg}``; an unknown path a 404 ``{"detail": "Not Found"}``.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import pickletools
import time
import traceback

import numpy as np
import torch
from PIL import Image
from services import _Handler, _Server

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EXECUTED: list[str] = []  # a reply's payload appends here if the client ever ran it (it must not)


def mark_executed(what: str) -> None:
    EXECUTED.append(what)


class _Evil:
    def __reduce__(self):
        return mark_executed, ("the trainer unpickled a global",)


def brightness_u8(arr: np.ndarray) -> float:
    return float(np.asarray(arr, dtype=np.float64).mean() / 255.0)


def _u8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] in [0, 1] -> uint8 HWC, rounded (flow_grpo's and unigrpo's 8-bit conversion)."""
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def jpeg_brightness(images, prompts, metadata):
    """In process: what the fake GenEval server scores, written with PIL directly (q75 JPEG)."""
    out = []
    for arr in _u8(images):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="JPEG", quality=75)
        out.append(brightness_u8(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))))
    return torch.tensor(out)


def png_brightness(images, prompts, metadata):
    """In process: what the fake Flow-Factory server scores (8-bit pixels, PNG is lossless)."""
    return torch.tensor([brightness_u8(a) for a in _u8(images)])


class FakeFlowGrpo(_Server):
    """``kind``: ``geneval`` or ``deqa``. ``mode``: ``ok``, ``error500`` (every request), ``flaky``
    (500 for the first ``bad`` requests), ``global`` (a numpy float in the reply, as a careless
    server would send), ``evil`` (a reply whose unpickling calls a function), ``wrong_length``,
    ``garbage`` (an HTML page), ``slow`` (sleeps ``delay``)."""

    def __init__(self, kind: str = "geneval", mode: str = "ok", bad: int = 0, delay: float = 0.0):
        self.kind, self.mode, self.bad, self.delay = kind, mode, bad, delay
        self.handler, self.received, self.opcodes = FlowGrpoHandler, [], set()
        super().__init__()


class FlowGrpoHandler(_Handler):
    def do_GET(self):
        self.send(405, b"<!doctype html><title>405 Method Not Allowed</title>", "text/html")

    def do_POST(self):
        svc: FakeFlowGrpo = self.server.service
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with svc.lock:
            svc.requests += 1
            n_req = svc.requests
            svc.opcodes |= {op.name for op, _, _ in pickletools.genops(body)}
        if self.path != "/":
            return self.send(404, b"<!doctype html><title>404 Not Found</title>", "text/html")
        try:
            if svc.mode == "slow":
                time.sleep(svc.delay)
            if svc.mode == "error500" or (svc.mode == "flaky" and n_req <= svc.bad):
                raise RuntimeError("CUDA out of memory")
            data = pickle.loads(body)  # the real server trusts its client: that is the danger
            svc.received.append(data)
            images = [Image.open(io.BytesIO(b), formats=["jpeg"]).convert("RGB") for b in data["images"]]
            scores = [brightness_u8(np.asarray(im)) for im in images]
            if svc.mode == "wrong_length":
                scores = scores[:-1]
            if svc.kind == "deqa":
                answer = {"outputs": scores}
            else:
                metas = data["meta_datas"]
                strict = [float(s > 0.5) for s in scores]
                rewards = [0.0] * len(scores) if data["only_strict"] else strict
                tags = [m.get("tag", "single_object") for m in metas]
                answer = {"scores": scores, "rewards": rewards, "strict_rewards": strict,
                          "group_rewards": {t: [r if tag == t else -10.0 for r, tag in zip(rewards, tags)] for t in TAGS},
                          "group_strict_rewards": {t: [r if tag == t else -10.0 for r, tag in zip(strict, tags)]
                                                   for t in TAGS}}
            if svc.mode == "global":
                answer[next(iter(answer))] = [np.float64(s) for s in scores]
            if svc.mode == "evil":
                answer["scores"] = _Evil()
            if svc.mode == "garbage":
                return self.send(200, b"<html>502 Bad Gateway</html>", "text/html")
            self.send(200, pickle.dumps(answer), "application/octet-stream")
        except Exception:  # noqa: BLE001 -- as app_geneval.py: any error is a 500 with the traceback
            self.send(500, traceback.format_exc().encode(), "text/plain")


class FakeFlowFactory(_Server):
    """``mode``: ``ok``, ``error500``, ``flaky`` (first ``bad`` requests), ``error_body`` (a 200
    ``{"error": ...}``), ``wrong_length``, ``garbage``."""

    def __init__(self, mode: str = "ok", bad: int = 0):
        self.mode, self.bad = mode, bad
        self.handler, self.received = FlowFactoryHandler, []
        super().__init__()


class FlowFactoryHandler(_Handler):
    def do_GET(self):
        if self.path == "/health":
            return self.send(200, b'{"status": "ok"}')
        self.send(404, b'{"detail": "Not Found"}')

    def do_POST(self):
        svc: FakeFlowFactory = self.server.service
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with svc.lock:
            svc.requests += 1
            n_req = svc.requests
        if self.path != "/compute":
            return self.send(404, b'{"detail": "Not Found"}')
        try:
            req = json.loads(body)
            svc.received.append(req)
            if svc.mode == "error500" or (svc.mode == "flaky" and n_req <= svc.bad):
                raise RuntimeError("reward model crashed")
            images = [Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for s in req["image"]]
            rewards = [brightness_u8(np.asarray(im)) for im in images]
            assert len(req["prompt"]) == len(rewards)
            if svc.mode == "wrong_length":
                rewards = rewards[:-1]
            if svc.mode == "error_body":
                return self.send(200, json.dumps({"error": "prompt too long"}).encode())
            if svc.mode == "garbage":
                return self.send(200, b"<html>502 Bad Gateway</html>", "text/html")
            self.send(200, json.dumps({"rewards": rewards}).encode())
        except Exception as e:  # noqa: BLE001 -- as example_server.py: HTTPException(500, detail=str(e))
            self.send(500, json.dumps({"detail": str(e)}).encode())
