"""The ``judge`` reward term: a VLM judge behind an OpenAI-compatible chat-completions endpoint
(UnifiedReward, Qwen-VL, ... served by vLLM or SGLang), one request per image (docs/rewards.md).

Each request is ``POST {url}/chat/completions`` with the image as ``data:image/png;base64,...``
(8-bit PNG: what a VLM reads) and a text built from ``prompt_template`` (``{prompt}`` and, when
``include_reasoning``, ``{reasoning}`` are replaced). The first match of ``score_pattern`` in the
answer is the raw score, rescaled from ``score_range`` to [0, 1]; an answer without a match, or
out of the range, is a failure that quotes the answer (no retry: the judge answered). Timeouts,
retries, concurrency, breaker and ``on_failure`` are those of the ``remote`` term; the metrics are
``reward/judge_retries``, ``reward/judge_failures``, ``reward/judge_latency_s``.

``mode: yes_no`` is the form Flow-Factory's ``vllm_evaluate`` uses for UnifiedReward / Qwen-VL
judges: one generated token with its ``top_logprobs``; the score is P(yes) / (P(yes) + P(no)),
each probability summed over the candidate tokens that read "yes" (resp. "no") once stripped and
lower-cased ("Yes", " yes", "YES" are distinct tokens). When neither word is among the top
candidates the answer is a failure under ``on_failure`` (Flow-Factory returns 0.0, which biases
training), not a score.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import threading
from typing import Literal

import torch

from unigrpo.rewards.remote import ServiceClient, _Failure
from unigrpo.rewards.wire import png_bytes

__all__ = ["DEFAULT_TEMPLATE", "YES_NO_TEMPLATE", "JudgeReward", "parse_score", "parse_yes_no"]

DEFAULT_TEMPLATE = ("You are shown an image generated for the prompt: \"{prompt}\".{reasoning}\n"
                    "Rate how well the image matches the prompt, from 0 (not at all) to 10 (perfectly). "
                    "Answer with the number only.")
YES_NO_TEMPLATE = ("You are shown an image generated for the prompt: \"{prompt}\".{reasoning}\n"
                   "Does the image match the prompt? Answer Yes or No.")
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


def parse_yes_no(answer, yes: str = "yes", no: str = "no") -> float:
    """A chat completion with ``logprobs`` -> P(yes) / (P(yes) + P(no)) at the first generated
    position (``choices[0].logprobs.content[0].top_logprobs``)."""
    try:
        top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        cands = [(str(c["token"]), float(c["logprob"])) for c in top]
    except (KeyError, IndexError, TypeError, ValueError):
        raise _Failure(f"answered {str(answer)[:80]!r}, not a chat completion with top_logprobs "
                       f"(does the server support logprobs?)", False) from None
    p_yes = sum(math.exp(lp) for tok, lp in cands if tok.strip().lower() == yes)
    p_no = sum(math.exp(lp) for tok, lp in cands if tok.strip().lower() == no)
    if p_yes + p_no == 0.0:
        seen = [tok for tok, _ in cands[:8]]
        raise _Failure(f"neither {yes!r} nor {no!r} among the judge's top tokens {seen}", False)
    return p_yes / (p_yes + p_no)


class JudgeReward:
    """``{name: judge, kwargs: {url: http://HOST:PORT/v1, model: NAME, ...}}``; ``mode``: ``score``
    (parse a number from the answer) or ``yes_no`` (P(yes) from the top log-probs)."""

    def __init__(self, url: str, model: str, prompt_template: str | None = None,
                 mode: Literal["score", "yes_no"] = "score", top_logprobs: int = 20,
                 yes_no_words: tuple[str, str] | list = ("yes", "no"),
                 include_reasoning: bool = False, reasoning_template: str = REASONING_LINE,
                 system_prompt: str | None = None, score_pattern: str = r"(-?\d+(?:\.\d+)?)",
                 score_range: tuple[float, float] | list = (0.0, 10.0), max_tokens: int = 32,
                 temperature: float = 0.0, api_key_env: str | None = None, extra_body: dict | None = None,
                 timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 0.5, max_concurrency: int = 8,
                 on_failure: Literal["fail", "skip"] = "fail", breaker_failures: int = 3,
                 breaker_reset_s: float = 30.0):
        if mode not in ("score", "yes_no"):
            raise ValueError(f"mode={mode!r}: expected 'score' or 'yes_no'")
        if mode == "yes_no" and not 1 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be in 1..20 (the OpenAI API's and vLLM's default limit)")
        if prompt_template is None:
            prompt_template = YES_NO_TEMPLATE if mode == "yes_no" else DEFAULT_TEMPLATE
        self.mode, self.top_logprobs = mode, int(top_logprobs)
        self.yes, self.no = (str(w).strip().lower() for w in yes_no_words)
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
        req = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
               "temperature": self.temperature}
        if self.mode == "yes_no":  # one token, and the candidates at its position
            req.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        return json.dumps({**req, **self.extra_body}).encode()

    def _validate(self, answer) -> float:
        if self.mode == "yes_no":
            return parse_yes_no(answer, self.yes, self.no)
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
