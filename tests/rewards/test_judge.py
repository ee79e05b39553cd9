"""The OpenAI-compatible VLM judge against a local chat-completions server that scores each
image's brightness (decoded from the data-URL PNG): exact scores end to end, the template with
the prompt and reasoning, and clear failures on unparseable or out-of-range answers."""

import re

import numpy as np
import pytest
import torch
from services import FakeJudge

from unigrpo.rewards import RewardSet, RewardUnavailable
from unigrpo.rewards.judge import parse_score
from unigrpo.rewards.remote import RewardServiceError


def batch(n=3):
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    meta = [{"reasoning": f"<think> idea {i} </think> a dot"} for i in range(n)]
    return images, [f"a bright dot {i}" for i in range(n)], meta


def quantised_brightness(images):  # what the judge sees: 8-bit PNG levels
    levels = np.floor(images.clamp(0, 1).numpy() * 255 + 0.5) / 255
    return torch.tensor(levels.astype(np.float64).mean(axis=(1, 2, 3)), dtype=torch.float32)


def test_judge_scores_end_to_end():
    with FakeJudge() as judge:
        rs = RewardSet([("judge", 1.0, {"url": judge.url + "/v1", "model": "unified-reward", "include_reasoning": True,
                                        "max_concurrency": 2})])
        images, prompts, meta = batch()
        res = rs(images, prompts, meta)
        torch.testing.assert_close(res.total, quantised_brightness(images), rtol=0, atol=1e-6)
        assert judge.requests == 3 and res.metrics["reward/judge_failures"] == 0
        text = next(t for t in judge.texts if "a bright dot 1" in t)
        assert 'the prompt: "a bright dot 1"' in text and "<think> idea 1 </think> a dot" in text
        rs.close()


def test_template_without_reasoning_and_a_custom_parser():
    with FakeJudge(answer="I would say 4 out of 5.") as judge:
        rs = RewardSet([("judge", 1.0, {"url": judge.url + "/v1/chat/completions", "model": "m",
                                        "prompt_template": "Prompt: {prompt}{reasoning}. Score 1-5.",
                                        "score_range": [1, 5]})])
        images, prompts, meta = batch(n=2)
        assert rs(images, prompts, meta).total.tolist() == [0.75, 0.75]
        assert judge.texts[0].startswith("Prompt: a bright dot ") and "think" not in judge.texts[0]


@pytest.mark.parametrize("answer, message", [("I cannot judge this image.", "unparseable judge answer"),
                                             ("Score: 12", r"outside score_range \[0, 10\]")])
def test_bad_answers_fail_clearly_quoting_the_answer(answer, message):
    with FakeJudge(answer=answer) as judge:
        kwargs = {"url": judge.url + "/v1", "model": "qwen-vl", "retries": 0}
        with pytest.raises(RewardServiceError, match=message) as e:
            RewardSet([("judge", 1.0, kwargs)])(*batch(n=1))
        assert "judge 'qwen-vl' at " + judge.url in str(e.value) and answer in str(e.value)
        with pytest.raises(RewardUnavailable):
            RewardSet([("judge", 1.0, {**kwargs, "on_failure": "skip"})]).terms[0][2](*batch(n=1))


def test_parse_score():
    pat = re.compile(r"(-?\d+(?:\.\d+)?)")
    assert parse_score("Score: 7.5/10", pat, 0, 10) == 0.75
    assert parse_score("rating 3", re.compile(r"\d"), 0, 5) == 0.6  # no group: the whole match
    with pytest.raises(Exception, match="not a number"):
        parse_score("yes", re.compile(r"yes"), 0, 1)


def test_yes_no_mode_is_p_yes_over_p_yes_plus_p_no():
    with FakeJudge() as judge:
        rs = RewardSet([("judge", 1.0, {"url": judge.url + "/v1", "model": "unified-reward", "mode": "yes_no"})])
        images, prompts, meta = batch()
        res = rs(images, prompts, meta)
        # the fake spreads P(yes) = b over "Yes" / " yes" and 1 - b (less "Maybe") over "No" / "no"
        b = quantised_brightness(images).double()
        expected = b / (b + 0.9 * (1 - b))
        torch.testing.assert_close(res.total, expected.float(), rtol=0, atol=1e-6)
        body = judge.bodies[0]
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert "Answer Yes or No." in judge.texts[0]
        rs.close()


def test_yes_no_mode_with_neither_word_is_a_failure_not_a_zero():
    top = [{"token": "Maybe", "logprob": -0.1}, {"token": "Perhaps", "logprob": -2.0}]
    with FakeJudge(top_tokens=top) as judge:
        kwargs = {"url": judge.url + "/v1", "model": "m", "mode": "yes_no", "retries": 0}
        with pytest.raises(RewardServiceError, match=r"neither 'yes' nor 'no' among the judge's top tokens"):
            RewardSet([("judge", 1.0, kwargs)])(*batch(n=1))
        with pytest.raises(RewardUnavailable):
            RewardSet([("judge", 1.0, {**kwargs, "on_failure": "skip"})]).terms[0][2](*batch(n=1))
    with FakeJudge(answer="Yes") as judge, pytest.raises(RewardServiceError,  # a server that ignores logprobs
                                                        match="not a chat completion with top_logprobs"):
        RewardSet([("judge", 1.0, {"url": judge.url + "/v1", "model": "m", "mode": "yes_no", "retries": 0,
                                   "extra_body": {"logprobs": False}})])(*batch(n=1))
    with pytest.raises(ValueError, match="top_logprobs must be in 1..20"):
        RewardSet([("judge", 1.0, {"url": "http://127.0.0.1:9/v1", "model": "m", "mode": "yes_no",
                                   "top_logprobs": 50})])
