"""The ``remote`` term's ``flow_grpo`` and ``flow_factory`` protocols against fake servers written
from those protocols (peer_servers.py): exact scores, what goes on the wire (a pickle of built-in
types only), every fault ending as documented (docs/rewards.md), the URL trust rule, and tiny runs
over loopback that log the same metrics as the in-process reward."""

import json
import sys

import pytest
import torch
from peer_servers import EXECUTED, FakeFlowFactory, FakeFlowGrpo, jpeg_brightness, png_brightness

from unigrpo.config import load_config
from unigrpo.recipes.train import train
from unigrpo.rewards import RewardSet, RewardUnavailable, resolve_reward
from unigrpo.rewards.remote import RewardServiceError

RECIPE = sys.modules["_recipe_conftest"]
GLOBAL_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "EXT1", "EXT2", "EXT4"}


def batch(n=5):
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    meta = [{"tag": "counting" if i % 2 else "colors", "include": [{"class": "dog", "count": 2}],
             "prompt_index": i // 2, "group_index": i % 2, "score": torch.tensor(0.5)} for i in range(n)]
    return images, [f"two dogs {i}" for i in range(n)], meta


def term(url, **kw):
    return resolve_reward("remote", {"url": url, "retries": 1, "backoff_s": 0.01, **kw})


def test_flow_grpo_geneval_and_deqa_scores_and_wire():
    images, prompts, meta = batch()
    with FakeFlowGrpo() as srv:
        fn = term(srv.url, protocol="flow_grpo", batch_size=3, only_strict=True)
        torch.testing.assert_close(fn(images, prompts, meta), jpeg_brightness(images, prompts, meta), rtol=0, atol=0)
        assert srv.requests == 2 and sorted(len(r["images"]) for r in srv.received) == [2, 3]  # concurrent
        assert not srv.opcodes & GLOBAL_OPS  # the request names no class or function
        req = next(r for r in srv.received if len(r["images"]) == 3)
        assert req["only_strict"] is True and req["prompts"] == prompts[:3]
        assert req["meta_datas"][1]["tag"] == "counting" and req["meta_datas"][1]["score"] == 0.5  # tensor -> float
        assert all(r.startswith(b"\xff\xd8") for r in req["images"])  # JPEG
    with FakeFlowGrpo(kind="deqa") as srv:
        fn = term(srv.url, protocol="flow_grpo", score_key="outputs")
        torch.testing.assert_close(fn(images, prompts, meta), jpeg_brightness(images, prompts, meta), rtol=0, atol=0)
        with pytest.raises(RewardServiceError, match=r"answered \['outputs'\], expected a dict with 'scores'"):
            term(srv.url, protocol="flow_grpo")(images, prompts, meta)


@pytest.mark.parametrize("mode, message, retried", [
    ("error500", r"HTTP 500 RuntimeError: CUDA out of memory \(after 1 retry\)", True),  # the traceback's last line
    ("global", r"names a global \(refused global numpy", False),
    ("evil", r"names a global \(refused global peer_servers.mark_executed\)", False),
    ("wrong_length", "answered 4 scores for 5 images", False),
    ("garbage", "not a pickle", False),
])
def test_flow_grpo_faults(mode, message, retried):
    images, prompts, meta = batch()
    with FakeFlowGrpo(mode=mode) as srv:
        with pytest.raises(RewardServiceError, match=message) as e:
            RewardSet([("remote", 1.0, {"url": srv.url, "protocol": "flow_grpo", "retries": 1, "backoff_s": 0.01})])(
                images, prompts, meta)
        assert "\n" not in str(e.value) and f"flow_grpo reward server {srv.url}" in str(e.value)
        assert srv.requests == (2 if retried else 1)
        with pytest.raises(RewardUnavailable):
            term(srv.url, protocol="flow_grpo", on_failure="skip", retries=0)(images, prompts, meta)
    assert EXECUTED == []  # the evil reply never ran


def test_flow_grpo_transient_500_is_retried_and_counted():
    images, prompts, meta = batch()
    with FakeFlowGrpo(mode="flaky", bad=1) as srv:
        res = RewardSet([("remote", 1.0, {"url": srv.url, "protocol": "flow_grpo", "backoff_s": 0.01})])(
            images, prompts, meta)
        torch.testing.assert_close(res.total, jpeg_brightness(images, prompts, meta), rtol=0, atol=0)
        assert res.metrics["reward/remote_retries"] == 1 and res.metrics["reward/remote_failures"] == 0


def test_flow_grpo_refuses_a_url_that_is_not_loopback_unless_trusted():
    with pytest.raises(ValueError, match=r"host '10.0.0.5' is not loopback; list it in trusted_hosts") as e:
        term("http://10.0.0.5:18085", protocol="flow_grpo")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not loopback"):
        term("http://geneval.example.com:18085", protocol="flow_grpo")  # names are not resolved
    assert term("http://10.0.0.5:18085", protocol="flow_grpo", trusted_hosts=["10.0.0.5"]).url == "http://10.0.0.5:18085"
    assert term("http://localhost:18085", protocol="flow_grpo").protocol.name == "flow_grpo"
    assert term("http://[::1]:18085", protocol="flow_grpo").protocol.name == "flow_grpo"
    with pytest.raises(ValueError, match="protocol='grpc'"):
        term("http://127.0.0.1:1", protocol="grpc")


def test_flow_factory_scores_and_wire():
    images, prompts, meta = batch()
    with FakeFlowFactory() as srv:
        fn = term(srv.url + "/compute", protocol="flow_factory")
        torch.testing.assert_close(fn(images, prompts, meta), png_brightness(images, prompts, meta), rtol=0, atol=0)
        req = srv.received[0]
        assert req["prompt"] == prompts and len(req["image"]) == 5 and req["video"] is None


@pytest.mark.parametrize("mode, message, retried", [
    ("error500", r'HTTP 500 \{"detail": "reward model crashed"\}', True),
    ("error_body", "answered an error: 'prompt too long'", False),
    ("wrong_length", "answered 4 scores for 5 images", False),
    ("garbage", "not JSON", False),
])
def test_flow_factory_faults(mode, message, retried):
    images, prompts, meta = batch()
    with FakeFlowFactory(mode=mode) as srv:
        with pytest.raises(RewardServiceError, match=message) as e:
            term(srv.url, protocol="flow_factory")(images, prompts, meta)
        assert "\n" not in str(e.value) and f"flow_factory reward server {srv.url}" in str(e.value)
        assert srv.requests == (2 if retried else 1)
    with FakeFlowFactory() as srv, pytest.raises(RewardServiceError, match=r"HTTP 404 .*Not Found"):
        term(srv.url + "/v1", protocol="flow_factory", on_failure="skip")(images, prompts, meta)  # 4xx always fails


def read(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("server, local, kwargs", [
    (FakeFlowGrpo, "peer_servers:jpeg_brightness", {"protocol": "flow_grpo"}),
    (FakeFlowFactory, "peer_servers:png_brightness", {"protocol": "flow_factory"}),
])
def test_tiny_run_over_loopback_equals_the_in_process_reward(server, local, kwargs, tiny_checkpoint, tmp_path):
    base = ["steps=2", "eval_every=0", "eval.at_start=false"]
    train(load_config(None, RECIPE.tiny_overrides(tiny_checkpoint, tmp_path / "local", *base,
                                                  f"rewards=[{{name: '{local}'}}]")))
    with server() as srv:
        kw = json.dumps({"url": srv.url, **kwargs})
        train(load_config(None, RECIPE.tiny_overrides(tiny_checkpoint, tmp_path / "served", *base,
                                                      f"rewards=[{{name: remote, kwargs: {kw}}}]")))
        assert srv.requests >= 8  # 2 steps x 4 chunks, and the final evaluation
    rows_l, rows_s = read(tmp_path / "local"), read(tmp_path / "served")
    assert len(rows_l) == len(rows_s) > 0
    trained = 0
    for a, b in zip(rows_l, rows_s):
        assert a["step"] == b["step"]
        if "reward/mean" in a:  # a training row
            trained += 1
            assert a[f"reward/{local}"] == b["reward/remote"] == a["reward/mean"]
            assert b["reward/remote_failures"] == 0
        same = [k for k in a if k.startswith(("loss/", "rollout/", "eval/")) or k in (
            "reward/mean", "reward/std", "reward/min", "reward/max", "reward/group_std")]
        assert same and {k: a[k] for k in same} == {k: b[k] for k in same}
    assert trained == 2
