"""``unigrpo serve-reward``: any reward (a built-in name or a dotted path, with kwargs) over HTTP.

Needs the ``serve`` extra (FastAPI + uvicorn). The API (docs/rewards.md, "The HTTP API"):

- ``POST /score`` JSON ``{"format": "npy" | "png", "images": [base64...], "prompts": [...],
  "metadata": [...]}``, or a binary safetensors body (``Content-Type: application/x-safetensors``,
  ``unigrpo.rewards.wire``) -> ``{"scores": [...], "seconds": float}``. 400 for a bad payload (bad base64,
  not an .npy / PNG, lengths that differ, a missing field, a batch over ``max_batch``, pixels the
  wire format forbids: NaN / inf, outside [0, 1], zero-size), 401 without the service's ``token``,
  413 for a body over ``max_body_mb`` (counted on the bytes read, chunked or not), 422 when the
  reward reads a metadata key the request lacks (the client's fault: not retried), 503 with
  ``Retry-After`` when ``max_queue`` requests are already waiting or running, 500 when the reward
  itself fails. Errors are ``{"error": "one line"}``.
- ``GET /health`` -> ``{"status": "ok"}``; ``GET /info`` -> what is served, the server's limits and
  its ``transports`` (``json``, ``safetensors``): a client sends binary only to a server listing it.

Scoring runs in ``workers`` threads (1 by default: a judge model is usually not thread-safe); the
event loop only parses and queues requests.
"""


# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the signature
import asyncio
import hmac
import ipaddress
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from unigrpo.rewards.wire import (
    BINARY_TYPE,
    FORMATS,
    PayloadError,
    decode_binary_request,
    decode_request,
)

__all__ = ["TOKEN_ENV", "build_app", "open_warning", "serve"]

TOKEN_ENV = "UNIGRPO_REWARD_TOKEN"  # the shared secret, when --token is not given


def _missing_key(e: BaseException) -> str | None:
    """The metadata key a reward failed to find (a KeyError anywhere in the cause chain), else None."""
    while e is not None:
        if isinstance(e, KeyError):
            return str(e)
        e = e.__cause__ or e.__context__
    return None


def open_warning(host: str, token: str | None) -> str | None:
    """The warning for a service that other hosts can reach and that asks for no token (else None)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name: assume other hosts can reach it
    if token or loopback:
        return None
    return (f"[unigrpo] warning: listening on {host} without a token: any host that reaches this port can "
            f"use the reward (set --token or {TOKEN_ENV})")


def build_app(reward: str, kwargs: dict | None = None, *, max_batch: int = 256, max_queue: int = 8,
              workers: int = 1, max_body_mb: float = 1024.0, token: str | None = None):
    """The FastAPI app serving ``reward`` (resolved once, at start: a bad name fails here). With
    ``token``, ``/score`` and ``/info`` need ``Authorization: Bearer TOKEN`` (``/health`` does not)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
    except ImportError as e:
        raise RuntimeError("serve-reward needs the 'serve' extra: pip install 'unigrpo[serve]'") from e
    from unigrpo import __version__
    from unigrpo.rewards import RewardSet

    if max_batch < 1 or max_queue < 1 or workers < 1:
        raise ValueError("max_batch, max_queue and workers must be >= 1")
    rewards = RewardSet([(reward, 1.0, dict(kwargs or {}))])
    fn = rewards.terms[0][2]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="serve-reward")
    state = {"pending": 0, "served": 0, "errors": 0, "rejected": 0}
    lock = threading.Lock()
    app = FastAPI(title="unigrpo reward service", version=__version__)

    def error(status: int, msg: str, **headers) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status, headers=headers or None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    def refused(request) -> JSONResponse | None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token and not hmac.compare_digest(given.encode(), token.encode()):
            return error(401, "missing or wrong token (send 'Authorization: Bearer TOKEN'; the remote "
                              f"term reads kwargs token or {TOKEN_ENV})")
        return None

    @app.get("/info")
    def info(request: Request):
        if (no := refused(request)) is not None:
            return no
        return {"api": 1, "unigrpo": __version__, "reward": reward, "kwargs": dict(kwargs or {}),
                "groupwise": bool(getattr(fn, "groupwise", False)), "formats": list(FORMATS),
                "transports": ["json", "safetensors"],
                "max_batch": max_batch, "max_queue": max_queue, "workers": workers, "max_body_mb": max_body_mb,
                **state}

    def score(images, prompts, metadata):
        res = rewards(images, prompts, metadata)
        if res.missing:
            raise RuntimeError(f"reward {reward!r} is unavailable ({', '.join(res.missing)})")
        return res.total.tolist(), res.seconds

    async def read_body(request) -> bytes | None:
        """The body, or None once more than ``max_body_mb`` has arrived (a chunked body declares no size)."""
        limit, chunks, n = int(max_body_mb * 2**20), [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/score")
    async def score_endpoint(request: Request):
        if (no := refused(request)) is not None:
            return no
        with lock:
            if state["pending"] >= max_queue:
                state["rejected"] += 1
                return error(503, f"queue full ({max_queue} requests waiting or running); retry later",
                             **{"Retry-After": "1"})
            state["pending"] += 1
        try:
            size = request.headers.get("content-length", "")
            if size.isdigit() and int(size) > max_body_mb * 2**20:
                return error(413, f"body of {int(size) / 2**20:.0f} MB is larger than max_body_mb {max_body_mb:g}")
            body = await read_body(request)
            if body is None:
                return error(413, f"body is larger than max_body_mb {max_body_mb:g}")
            binary = request.headers.get("content-type", "").split(";")[0].strip() == BINARY_TYPE
            try:
                images, prompts, metadata = (decode_binary_request if binary else decode_request)(body, max_batch)
            except PayloadError as e:
                return error(400, str(e))
            try:
                scores, seconds = await asyncio.get_running_loop().run_in_executor(
                    pool, score, images, prompts, metadata)
            except Exception as e:  # noqa: BLE001 -- the reward failed: one line to the client (a 500)
                with lock:
                    state["errors"] += 1
                if (key := _missing_key(e)) is not None:  # the request lacks what the reward reads: 4xx
                    return error(422, f"reward {reward!r} needs metadata key {key} that the request lacks")
                return error(500, f"reward {reward!r} failed: {type(e).__name__}: {e}".replace("\n", " "))
            with lock:
                state["served"] += 1
            return {"scores": scores, "seconds": seconds}
        finally:
            with lock:
                state["pending"] -= 1

    app.state.rewards, app.state.pool = rewards, pool
    return app


def serve(reward: str, kwargs: dict | None = None, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    """Blocks: serve ``reward`` on ``host:port`` until interrupted."""
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError("serve-reward needs the 'serve' extra: pip install 'unigrpo[serve]'") from e
    limits["token"] = limits.get("token") or os.environ.get(TOKEN_ENV) or None
    app = build_app(reward, kwargs, **limits)
    if (warning := open_warning(host, limits["token"])) is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"[unigrpo] serving reward {reward!r} on http://{host}:{port} (POST /score, GET /health, GET /info)",
          flush=True)
    start = time.perf_counter()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        app.state.pool.shutdown(wait=False)
        app.state.rewards.close()
        print(f"[unigrpo] reward service stopped after {time.perf_counter() - start:.0f} s", flush=True)
