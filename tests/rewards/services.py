"""Real HTTP servers on 127.0.0.1 (random free ports) for the reward tests: a scoring service that
misbehaves on demand, an OpenAI-compatible judge, the FastAPI app in a thread, and
``unigrpo serve-reward`` in a subprocess."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from unigrpo.rewards.wire import decode_request

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


class _Server:
    handler: type

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        self.httpd.service = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.requests, self.bodies, self.lock = 0, [], threading.Lock()
        self.in_flight, self.max_in_flight = 0, 0
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.alive = True

    def stop(self) -> None:
        if self.alive:
            self.alive = False
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send(200, b'{"status": "ok"}')


class FakeService(_Server):
    """``/score`` answers each image's brightness, or misbehaves: ``mode`` is ``ok``, ``slow``
    (sleeps ``delay`` first), ``error500``, ``flaky`` (500 for the first ``bad`` requests),
    ``garbage``, ``wrong_length``, ``nan``, ``bad_request`` (400); ``die_after``: after that many
    answers the server shuts down (a service dying mid-run)."""

    def __init__(self, mode: str = "ok", delay: float = 0.0, bad: int = 0, die_after: int | None = None):
        self.mode, self.delay, self.bad, self.die_after = mode, delay, bad, die_after
        self.handler = ScoreHandler
        super().__init__()


class ScoreHandler(_Handler):
    def do_POST(self):
        svc: FakeService = self.server.service
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with svc.lock:
            svc.requests += 1
            n_req = svc.requests
            svc.in_flight += 1
            svc.max_in_flight = max(svc.max_in_flight, svc.in_flight)
        done = []

        def leave():  # a request stops being in flight BEFORE its response goes out: the client may
            if not done:  # send its next request as soon as it has read this one's
                done.append(True)
                with svc.lock:
                    svc.in_flight -= 1

        def reply(*args):
            leave()
            return self.send(*args)

        try:
            images, _, _ = decode_request(body, 10_000)
            scores = images.mean(dim=(1, 2, 3)).tolist()
            mode = svc.mode
            if mode == "slow" or svc.delay:
                time.sleep(svc.delay)
            if mode == "error500" or (mode == "flaky" and n_req <= svc.bad):
                return reply(500, b'{"error": "judge crashed"}')
            if mode == "bad_request":
                return reply(400, b'{"error": "images[0]: not valid base64"}')
            if mode == "garbage":
                return reply(200, b"<html>502 Bad Gateway</html>", "text/html")
            if mode == "wrong_length":
                scores = scores[:-1]
            if mode == "nan":
                scores[0] = float("nan")
            reply(200, json.dumps({"scores": scores}).encode())
        finally:
            leave()
            if svc.die_after is not None and n_req >= svc.die_after:
                threading.Thread(target=svc.stop, daemon=True).start()


def png_brightness(data_url: str) -> float:
    raw = base64.b64decode(data_url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float64).mean() / 255.0)


class FakeJudge(_Server):
    """An OpenAI-compatible ``/v1/chat/completions``: decodes the data-URL PNG and answers
    ``"Score: <10 x brightness>"`` (or ``answer`` verbatim when set); records the request texts.
    A request with ``logprobs`` gets one token and ``top_logprobs`` candidates (the OpenAI schema)
    with P(yes) = brightness spread over "Yes" / " yes" and P(no) over "No" / "no", plus an
    unrelated token; ``top_tokens`` replaces the candidates verbatim."""

    def __init__(self, answer: str | None = None, top_tokens: list[dict] | None = None):
        self.answer, self.top_tokens, self.texts, self.bodies = answer, top_tokens, [], []
        self.handler = JudgeHandler
        super().__init__()


class JudgeHandler(_Handler):
    def do_POST(self):
        svc: FakeJudge = self.server.service
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions", self.path
        parts = req["messages"][-1]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,")
        with svc.lock:
            svc.requests += 1
            svc.texts.append(next(p["text"] for p in parts if p["type"] == "text"))
            svc.bodies.append(req)
        if req.get("logprobs"):
            b = png_brightness(url)
            top = svc.top_tokens or [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in
                                     [("Yes", 0.7 * b), ("No", 0.5 * (1 - b)), (" yes", 0.3 * b),
                                      ("no", 0.4 * (1 - b)), ("Maybe", 0.1 * (1 - b))]]
            top = top[:req["top_logprobs"]]
            choice = {"index": 0, "message": {"role": "assistant", "content": top[0]["token"]},
                      "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                "top_logprobs": top}]}, "finish_reason": "length"}
            return self.send(200, json.dumps({"id": "x", "object": "chat.completion", "model": req["model"],
                                              "choices": [choice]}).encode())
        answer = svc.answer if svc.answer is not None else f"Score: {10 * png_brightness(url)!r}"
        self.send(200, json.dumps({"id": "x", "object": "chat.completion", "model": req["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                "finish_reason": "stop"}]}).encode())


class AppThread:
    """``unigrpo.rewards.server.build_app(...)`` under uvicorn in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_healthy(self.url, 30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class ServeRewardProcess:
    """``unigrpo serve-reward REWARD`` in a subprocess (cwd: ``cwd``, so dotted paths resolve there)."""

    def __init__(self, reward: str, *args: str, cwd: Path | str = ROOT):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "unigrpo.cli", "serve-reward", reward, "--port", str(port),
                                      *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        try:
            wait_healthy(self.url, 90, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def post(url: str, body: bytes | dict, timeout: float = 10.0, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def undocumented(keys) -> list[str]:
    """Keys matched by no backticked key of docs/metrics.md's tables (``<x>`` is one segment), the
    rule of tests/recipe/test_train_cli.py."""
    from testkit import documented_metric_patterns

    pats = documented_metric_patterns()
    return sorted(k for k in keys if not any(p.match(k) for p in pats))
