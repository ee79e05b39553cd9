"""The client side of reward services: the ``remote`` reward term and the HTTP machinery it shares
with the ``judge`` term (docs/rewards.md).

Every request has a timeout; connection errors, timeouts, 429 and 5xx are retried with exponential
backoff; at most ``max_concurrency`` requests are in flight per term (over all reward threads); a
circuit breaker stops calling a service after ``breaker_failures`` consecutive failed requests and
tries again after ``breaker_reset_s``. A response is validated (JSON, one finite number per image).
When a request still fails, ``on_failure`` decides: ``fail`` (default) raises
``RewardServiceError``, one line naming the service; ``skip`` raises ``RewardUnavailable``, the
step's rewards are missing and the training loop skips that step's update on every rank (logged
as ``reward/skipped_steps``). A 4xx answer (the service refused the request itself: a bad payload,
a batch over its ``max_batch``) is a configuration error: it always fails.

Only the standard library is used (``urllib.request``); no new core dependency.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from unigrpo.rewards.wire import FORMATS

__all__ = ["RemoteReward", "RewardServiceError", "ServiceClient"]


class RewardServiceError(RuntimeError):
    """A reward service failed for good (``on_failure: fail``); the message is one line naming it."""


class _Failure(Exception):
    def __init__(self, reason: str, retryable: bool, fatal: bool = False):
        super().__init__(reason)
        self.reason, self.retryable, self.fatal = reason, retryable, fatal


class ServiceClient:
    """POSTs JSON to one service with timeouts, retries + backoff, a concurrency cap and a breaker."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5,
                 backoff_max_s: float = 8.0, max_concurrency: int = 4, breaker_failures: int = 3,
                 breaker_reset_s: float = 30.0, on_failure: Literal["fail", "skip"] = "fail",
                 headers: dict | None = None, kind: str = "reward service"):
        if on_failure not in ("fail", "skip"):
            raise ValueError(f"on_failure={on_failure!r}: expected 'fail' or 'skip'")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r}: expected http://HOST:PORT")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_concurrency < 1 or breaker_failures < 1:
            raise ValueError("need timeout_s > 0, retries >= 0, backoff_s >= 0, max_concurrency >= 1, "
                             "breaker_failures >= 1")
        self.url, self.timeout_s, self.retries = url.rstrip("/"), float(timeout_s), int(retries)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.breaker_failures, self.breaker_reset_s = int(breaker_failures), float(breaker_reset_s)
        self.on_failure, self.headers, self.kind = on_failure, dict(headers or {}), kind
        self.max_concurrency = int(max_concurrency)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._consecutive, self._open_until, self._last_warning = 0, 0.0, ""
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="reward-http")

    # ------------------------------------------------------------------ one request
    def _attempt(self, path: str, body: bytes | None, content_type: str, decode):
        req = urllib.request.Request(self.url + path, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": content_type, **self.headers})
        try:
            with self._slots, urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:65536].decode("utf-8", "replace").strip()
            if detail.startswith("Traceback (most recent call last)"):  # a Flask 500 (flow_grpo's servers):
                detail = detail.splitlines()[-1]  # the exception is the last line
            detail = detail[:200].replace("\n", " ")
            retryable = e.code >= 500 or e.code == 429
            raise _Failure(f"HTTP {e.code} {detail}".strip(), retryable, fatal=not retryable) from None
        except TimeoutError:
            raise _Failure(f"timed out after {self.timeout_s:g} s", True) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Failure(f"timed out after {self.timeout_s:g} s", True) from None
            raise _Failure(f"cannot connect ({reason})", True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Failure(f"connection lost ({type(e).__name__}: {e})", True) from None
        return decode(raw)

    def post(self, path: str, body: bytes | None, validate=None, content_type: str = "application/json",
             decode=None) -> tuple[object, int, float]:
        """-> (validated answer, retries used, seconds incl. retries); raises _Failure when it gives up.
        ``body`` None is a GET; ``decode`` turns the raw answer into an object (default: JSON)."""
        start, retries = time.perf_counter(), 0
        with self._lock:
            if self._consecutive >= self.breaker_failures and time.monotonic() < self._open_until:
                raise _Failure(f"circuit open after {self.breaker_failures}+ consecutive failed requests "
                               f"(tries again {self.breaker_reset_s:g} s after the last one)", False)
        while True:
            try:
                out = self._attempt(path, body, content_type, decode or json_answer)
                if validate is not None:
                    out = validate(out)
                with self._lock:
                    self._consecutive, self._last_warning = 0, ""
                return out, retries, time.perf_counter() - start
            except _Failure as f:
                if f.retryable and retries < self.retries:
                    time.sleep(min(self.backoff_s * 2 ** retries, self.backoff_max_s))
                    retries += 1
                    continue
                with self._lock:
                    self._consecutive += 1
                    if self._consecutive >= self.breaker_failures:
                        self._open_until = time.monotonic() + self.breaker_reset_s
                f.retries = retries
                raise

    def probe(self, path: str):
        """One GET, no retry, not counted by the breaker -> (JSON answer or None, the server answered)."""
        try:
            return self._attempt(path, None, "application/json", json_answer), True
        except _Failure as f:
            return None, not f.retryable or f.fatal  # an HTTP 4xx / non-JSON answer: it is up, lacks it

    def give_up(self, failure: _Failure):
        """Apply ``on_failure`` to a request that failed for good (never returns)."""
        from unigrpo.rewards import RewardUnavailable

        tries = getattr(failure, "retries", 0)
        msg = (f"{self.kind} {self.url}: {failure.reason}"
               + (f" (after {tries} retr{'y' if tries == 1 else 'ies'})" if tries else ""))
        if self.on_failure == "skip" and not failure.fatal:
            with self._lock:
                repeated, self._last_warning = msg == self._last_warning, msg
            if not repeated:  # one line per new failure, not one per chunk
                print(f"[unigrpo] {msg}; on_failure=skip: the step's rewards are missing, its update is skipped",
                      file=sys.stderr, flush=True)
            raise RewardUnavailable(msg)
        hint = "" if failure.fatal else "; on_failure=skip would skip the step instead"
        raise RewardServiceError(msg + hint)

    def map(self, path: str, bodies: list[bytes], validators: list, **post_kwargs) -> tuple[list, dict]:
        """POST every body (concurrently, at most max_concurrency in flight), each answer checked by
        its validator; -> (answers, {"retries", "failures", "latency_s", "failed": first _Failure or None}).
        ``post_kwargs``: ``content_type``, ``decode`` (as for ``post``)."""
        futures = [self._pool.submit(self._post_counted, path, b, v, post_kwargs) for b, v in zip(bodies, validators)]
        answers, retries, failures, latency, failed = [], 0, 0, 0.0, None
        for f in futures:
            ok, value, n, seconds = f.result()
            retries, latency = retries + n, max(latency, seconds)
            if ok:
                answers.append(value)
            else:
                failures, failed = failures + 1, failed or value
        return answers, {"retries": float(retries), "failures": float(failures), "latency_s": latency,
                         "failed": failed}

    def _post_counted(self, path, body, validate, post_kwargs):
        start = time.perf_counter()
        try:
            out, n, seconds = self.post(path, body, validate, **post_kwargs)
            return True, out, n, seconds
        except _Failure as f:
            return False, f, getattr(f, "retries", 0), time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def json_answer(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        snippet = raw[:80].decode("utf-8", "replace").replace("\n", " ")
        raise _Failure(f"answered with a body that is not JSON: {snippet!r}", False) from None


def check_scores_answer(answer, n: int, kind: str = "reward service"):
    """A /score answer -> [n] floats; anything else is a (non-retryable) failure."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        raise _Failure(f"answered {str(answer)[:80]!r}, expected {{\"scores\": [...]}}", False)
    if len(scores) != n:
        raise _Failure(f"answered {len(scores)} scores for {n} images", False)
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise _Failure(f"answered non-numeric or non-finite scores: {scores[:8]}", False)
    return [float(s) for s in scores]


class RemoteReward:
    """The ``remote`` reward term: ``{name: remote, kwargs: {url: http://HOST:PORT, ...}}``.

    ``protocol``: ``unigrpo`` (default: ``unigrpo serve-reward`` or any server speaking the API of
    docs/rewards.md), ``flow_grpo`` (flow_grpo's GenEval / DeQA reward servers) or ``flow_factory``
    (Flow-Factory's reward server); ``unigrpo.rewards.protocols``. Each chunk is split into requests
    of at most ``batch_size`` images (0: one request; flow_grpo: 64, its client's chunk size) sent
    concurrently, behind the same timeouts, retries, breaker and ``on_failure``.
    ``image_format`` (unigrpo): ``npy`` (lossless float32, default) or ``png`` (8-bit); ``transport``
    (unigrpo): ``auto`` (binary safetensors when the server's ``/info`` offers it, else JSON),
    ``json`` or ``binary``. ``token`` (unigrpo; default ``$UNIGRPO_REWARD_TOKEN``): the service's
    shared secret, sent as ``Authorization: Bearer``."""

    def __init__(self, url: str, protocol: str = "unigrpo", timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0, max_concurrency: int = 4, batch_size: int = 0,
                 image_format: str = "npy", on_failure: Literal["fail", "skip"] = "fail",
                 breaker_failures: int = 3, breaker_reset_s: float = 30.0, headers: dict | None = None,
                 score_key: str = "scores", only_strict: bool = False, trusted_hosts: list | None = None,
                 transport: Literal["auto", "json", "binary"] = "auto", token: str | None = None):
        import os

        from unigrpo.rewards.protocols import PROTOCOLS
        from unigrpo.rewards.server import TOKEN_ENV

        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}")
        if image_format not in FORMATS:
            raise ValueError(f"image_format={image_format!r}: expected one of {FORMATS}")
        if batch_size < 0:
            raise ValueError("batch_size must be >= 0 (0: the whole chunk in one request)")
        if token and protocol != "unigrpo":
            raise ValueError(f"token is for protocol 'unigrpo' (unigrpo serve-reward); for {protocol!r} use headers")
        token = token or (os.environ.get(TOKEN_ENV) if protocol == "unigrpo" else None)
        if token:  # the service's shared secret (serve-reward --token); never sent to other protocols' servers
            headers = {**(headers or {}), "Authorization": f"Bearer {token}"}
        base = url.rstrip("/")
        base = base.removesuffix("/score" if protocol == "unigrpo" else "/compute")
        self.protocol = PROTOCOLS[protocol](url=base, image_format=image_format, score_key=score_key,
                                            only_strict=only_strict, trusted_hosts=trusted_hosts,
                                            transport=transport)
        self.client = ServiceClient(base, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                    backoff_max_s=backoff_max_s, max_concurrency=max_concurrency,
                                    breaker_failures=breaker_failures, breaker_reset_s=breaker_reset_s,
                                    on_failure=on_failure, headers=headers,
                                    kind="reward service" if protocol == "unigrpo" else f"{protocol} reward server")
        self.url, self.image_format = base, image_format
        self.batch_size = int(batch_size) or (64 if protocol == "flow_grpo" else 0)
        self._local = threading.local()

    def call_metrics(self) -> dict[str, float]:
        """This thread's last call: ``reward/remote_retries``, ``_failures``, ``_latency_s``."""
        return dict(getattr(self._local, "metrics", {}))

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        n, proto = len(prompts), self.protocol
        proto.prepare(self.client)  # unigrpo: asks /info once whether the server takes binary bodies
        size = self.batch_size or n
        spans = [(i, min(i + size, n)) for i in range(0, n, size)]
        bodies = [proto.encode(images[a:b], prompts[a:b], metadata[a:b]) for a, b in spans]
        validators = [lambda answer, k=b - a: proto.scores(answer, k) for a, b in spans]
        answers, m = self.client.map(proto.path, bodies, validators, content_type=proto.content_type,
                                     decode=proto.decode)
        self._local.metrics = {"reward/remote_retries": m["retries"], "reward/remote_failures": m["failures"],
                               "reward/remote_latency_s": m["latency_s"]}
        if m["failed"] is not None:
            self.client.give_up(m["failed"])
        return torch.tensor([s for a in answers for s in a], dtype=torch.float32)

    def close(self) -> None:
        self.client.close()
