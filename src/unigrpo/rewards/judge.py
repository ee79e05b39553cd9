"""The ``judge`` reward term: a VLM judge behind an OpenAI-compatible chat-completions endpoint
(UnifiedReward, Qwen-VL, ... served by vLLM or SGLang), one request per image (docs/rewards.md).

Each request is ``POST {url}/chat/completions`` with the image as ``data:image/png;base64,...``
(8-bit PNG: what a VLM reads) and a text built from ``prompt_template`` (``{prompt}`` and, when
``include_reasoning``, ``{reasoning}`` are replaced). The first match of ``score_pattern`` in the
answer is the raw score, rescaled from ``score_range`` to [0, 1]; an answer without a match, or
out of the range, is a failure that quotes the answer (no retry: the judge answered). Timeouts,
retries, concurrency, breaker and ``on_failure`` are those of the ``remote`` term; the metrics are
``reward/judge_retries``, ``reward/judge_failures``, ``reward/judge_latency_s``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from typing import Literal

import torch

from unigrpo.rewards.remote import ServiceClient, _Failure
from unigrpo.rewards.wire import png_bytes

__all__ = ["DEFAULT_TEMPLATE", "JudgeReward", "parse_score"]

DEFAULT_TEMPLATE = ("You are shown an image generated for the prompt: \"{prompt}\".{reasoning}\n"
                    "Rate how well the image matches the prompt, from 0 (not at all) to 10 (perfectly). "
                    "Answer with the number only.")
REASONING_LINE = "\nBefore drawing, the model reasoned: \"{reasoning}\"."


def parse_score(answer: str, pattern: re.Pattern, lo: float, hi: float) -> float:
    """The first match of ``pattern`` (its first group, else the whole match) rescaled to [0, 1]."""
    found = pattern.search(answer)
    if found is None:
        raise _Failure(f"unparseable judge answer (no match for {pattern.pattern!r}): {answer[:120]!r}", False)
    text = found.group(1) if found.groups() else found.group(0)
    try:
        raw = float(text)
    except ValueError:
        raise _Failure(f"unparseable judge answer ({text!r} is not a number): {answer[:120]!r}", False) from None
    if not lo <= raw <= hi:
        raise _Failure(f"judge score {raw:g} is outside score_range [{lo:g}, {hi:g}]: {answer[:120]!r}", False)
    return (raw - lo) / (hi - lo)


class JudgeReward:
    """``{name: judge, kwargs: {url: http://HOST:PORT/v1, model: NAME, ...}}``."""

    def __init__(self, url: str, model: str, prompt_template: str = DEFAULT_TEMPLATE,
                 include_reasoning: bool = False, reasoning_template: str = REASONING_LINE,
                 system_prompt: str | None = None, score_pattern: str = r"(-?\d+(?:\.\d+)?)",
                 score_range: tuple[float, float] | list = (0.0, 10.0), max_tokens: int = 32,
                 temperature: float = 0.0, api_key_env: str | None = None, extra_body: dict | None = None,
                 timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 0.5, max_concurrency: int = 8,
                 on_failure: Literal["fail", "skip"] = "fail", breaker_failures: int = 3,
                 breaker_reset_s: float = 30.0):
        lo, hi = (float(v) for v in score_range)
        if not hi > lo:
            raise ValueError(f"score_range={list(score_range)}: expected [low, high] with high > low")
        headers = {}
        if api_key_env:
            if api_key_env not in os.environ:
                raise ValueError(f"api_key_env={api_key_env!r}: the environment variable is not set")
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        base = url.rstrip("/").removesuffix("/chat/completions")
        self.client = ServiceClient(base, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                    max_concurrency=max_concurrency, breaker_failures=breaker_failures,
                                    breaker_reset_s=breaker_reset_s, on_failure=on_failure, headers=headers,
                                    kind=f"judge {model!r} at")
        self.model, self.template, self.system_prompt = model, prompt_template, system_prompt
        self.include_reasoning, self.reasoning_template = include_reasoning, reasoning_template
        self.pattern, self.lo, self.hi = re.compile(score_pattern), lo, hi
        self.max_tokens, self.temperature, self.extra_body = max_tokens, temperature, dict(extra_body or {})
        self._local = threading.local()

    def call_metrics(self) -> dict[str, float]:
        return dict(getattr(self._local, "metrics", {}))

    def text(self, prompt: str, meta: dict) -> str:
        reasoning = ""
        if self.include_reasoning:
            reasoning = self.reasoning_template.replace("{reasoning}", str(meta.get("reasoning", "")))
        return self.template.replace("{prompt}", prompt).replace("{reasoning}", reasoning)

    def request(self, image: torch.Tensor, prompt: str, meta: dict) -> bytes:
        url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": self.text(prompt, meta)}]})
        return json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature, **self.extra_body}).encode()

    def _validate(self, answer) -> float:
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Failure(f"answered {str(answer)[:80]!r}, not a chat completion", False) from None
        if isinstance(content, list):  # some servers answer with content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return parse_score(str(content), self.pattern, self.lo, self.hi)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        bodies = [self.request(images[i], prompts[i], metadata[i]) for i in range(len(prompts))]
        answers, m = self.client.map("/chat/completions", bodies, [self._validate] * len(bodies))
        self._local.metrics = {"reward/judge_retries": m["retries"], "reward/judge_failures": m["failures"],
                               "reward/judge_latency_s": m["latency_s"]}
        if m["failed"] is not None:
            self.client.give_up(m["failed"])
        return torch.tensor(answers, dtype=torch.float32)

    def close(self) -> None:
        self.client.close()
