"""A reward service that is slow, down, dying, failing, or answering garbage / the wrong length,
against the real client on loopback. Each ends as documented (docs/rewards.md): with
``on_failure: fail`` one error line naming the service; with ``skip`` the step's rewards are
missing and its update is skipped (``reward/skipped_steps``); no step trains on a missing score."""

import json
import time

import pytest
import torch
from services import FakeService, free_port, undocumented

from unigrpo.config import load_config
from unigrpo.rewards import RewardSet, RewardUnavailable
from unigrpo.rewards.remote import RemoteReward, RewardServiceError

FAST = {"timeout_s": 0.3, "retries": 2, "backoff_s": 0.01}


def batch(n=4):
    images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    return images, [f"p{i}" for i in range(n)], [{"prompt_index": i // 2} for i in range(n)]


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("mode, kwargs, message, retried", [
    ("slow", {"delay": 1.0}, "timed out after 0.3 s", True),
    ("error500", {}, "HTTP 500", True),
    ("garbage", {}, "not JSON: '<html>502 Bad Gateway</html>'", False),
    ("wrong_length", {}, "answered 3 scores for 4 images", False),
    ("nan", {}, "non-finite", False),
])
def test_failures_fail_with_one_line_naming_the_service(mode, kwargs, message, retried):
    with FakeService(mode, **kwargs) as svc:
        rs = RewardSet([("remote", 1.0, {"url": svc.url, **FAST})])
        start = time.perf_counter()
        with pytest.raises(RewardServiceError) as e:
            rs(*batch())
        msg = one_line(e)
        assert msg.startswith(f"reward service {svc.url}: ") and message in msg, msg
        assert svc.requests == (3 if retried else 1)  # retries only where a retry can help
        assert time.perf_counter() - start < 5  # bounded: (retries + 1) x timeout + backoff
        metrics = rs.terms[0][2].call_metrics()
        assert metrics["reward/remote_failures"] == 1 and metrics["reward/remote_retries"] == (2 if retried else 0)
        rs.close()


def test_down_at_start_fails_or_skips():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RewardServiceError, match=rf"^reward service {url}: cannot connect .*after 2 retries"):
        RewardSet([("remote", 1.0, {"url": url, **FAST})])(*batch())
    res = RewardSet([("remote", 1.0, {"url": url, **FAST, "on_failure": "skip"})])(*batch())
    assert res.missing == ["remote"] and torch.isnan(res.total).all()
    assert res.metrics == {"reward/remote_retries": 2.0, "reward/remote_failures": 1.0,
                           "reward/remote_latency_s": pytest.approx(res.metrics["reward/remote_latency_s"])}


def test_transient_500s_are_retried_and_recover():
    with FakeService("flaky", bad=2) as svc:
        fn = RemoteReward(svc.url, **FAST)
        images, prompts, meta = batch()
        assert torch.equal(fn(images, prompts, meta), images.mean(dim=(1, 2, 3)))
        assert fn.call_metrics()["reward/remote_retries"] == 2 and svc.requests == 3


def test_a_4xx_is_a_configuration_error_even_with_skip():
    with FakeService("bad_request") as svc:
        fn = RemoteReward(svc.url, **FAST, on_failure="skip")
        with pytest.raises(RewardServiceError, match="HTTP 400") as e:
            fn(*batch())
        assert svc.requests == 1 and "skip" not in one_line(e)


def test_circuit_breaker_stops_calling_a_dead_service():
    with FakeService("error500") as svc:
        fn = RemoteReward(svc.url, timeout_s=0.3, retries=0, on_failure="skip", breaker_failures=2,
                          breaker_reset_s=0.5)
        for _ in range(2):
            with pytest.raises(RewardUnavailable, match="HTTP 500"):
                fn(*batch())
        with pytest.raises(RewardUnavailable, match=r"circuit open after 2\+ consecutive failed requests"):
            fn(*batch())
        assert svc.requests == 2  # the open circuit sent nothing
        time.sleep(0.6)
        svc.mode = "ok"
        images, prompts, meta = batch()
        assert torch.equal(fn(images, prompts, meta), images.mean(dim=(1, 2, 3)))  # half-open: one try, closed


def test_concurrent_requests_are_capped():
    with FakeService("slow", delay=0.2) as svc:
        fn = RemoteReward(svc.url, timeout_s=2, batch_size=1, max_concurrency=3)
        images, prompts, meta = batch(n=9)
        start = time.perf_counter()
        assert torch.equal(fn(images, prompts, meta), images.mean(dim=(1, 2, 3)))
        seconds = time.perf_counter() - start
        assert svc.requests == 9 and svc.max_in_flight == 3
        assert seconds > 0.55  # at least 3 waves of 0.2 s: never more than 3 at once (no upper bound: shared CPUs)


# ---------------------------------------------------------------------------------- training runs
def run(tiny_checkpoint, out, url, *extra, monkeypatch=None):
    from unigrpo.recipes import train as T
    from unigrpo.recipes.train import train

    kwargs = json.dumps({"url": url, **FAST, "on_failure": "skip"})
    overrides = _tiny(tiny_checkpoint, out, *extra, f"rewards=[{{name: remote, kwargs: {kwargs}}}]")
    updates = []
    real = T.ppo_epochs
    monkeypatch.setattr(T, "ppo_epochs", lambda model, ref, opt, batch, *a: (updates.append(batch.reward.clone()),
                                                                          real(model, ref, opt, batch, *a))[1])
    res = train(load_config(None, overrides))
    return res, updates, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tiny(checkpoint, out, *extra):
    import sys

    tiny_overrides = sys.modules["_recipe_conftest"].tiny_overrides
    return tiny_overrides(checkpoint, out, "steps=3", *extra)


def test_service_dying_mid_run_skips_the_steps_without_scores(tiny_checkpoint, tmp_path, monkeypatch):
    # 2 prompts x 4 = 8 trajectories in chunks of 2: 4 requests a step; the service dies after step 1
    with FakeService(die_after=4) as svc:
        res, updates, rows = run(tiny_checkpoint, tmp_path, svc.url, monkeypatch=monkeypatch)
    assert len(updates) == 1 and torch.isfinite(updates[0]).all()  # only step 1 trained, on real scores
    steps = {r["step"]: r for r in rows if "reward/skipped_steps" in r}
    assert [steps[s]["reward/skipped_steps"] for s in (1, 2, 3)] == [0.0, 1.0, 2.0]
    assert "loss/text/loss" not in json.dumps(steps[2]) and "reward/mean" not in steps[2]
    assert steps[1]["reward/remote_failures"] == 0 and steps[2]["reward/remote_failures"] >= 1
    assert steps[2]["reward/remote_retries"] >= 1 and "reward/mean" in steps[1]
    assert not undocumented({k for r in rows for k in r if k != "step"}), "add them to docs/metrics.md"
    assert res["step"] == 3


def test_service_down_at_start_fails_the_run_with_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    from unigrpo.recipes.train import train

    url = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(None, _tiny(tiny_checkpoint, tmp_path, f"rewards=[{{name: remote, kwargs: {{url: '{url}', "
                                                                  f"timeout_s: 0.3, retries: 1, backoff_s: 0.01}}}}]"))
    with pytest.raises(RewardServiceError) as e:
        train(cfg)
    assert one_line(e).startswith(f"reward service {url}: cannot connect")
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing trained, nothing saved


def test_skipped_steps_count_survives_a_resume(tiny_checkpoint, tmp_path):
    from unigrpo.recipes.train import train

    def cfg(url, steps):
        kwargs = json.dumps({"url": url, **FAST, "on_failure": "skip"})
        return load_config(None, _tiny(tiny_checkpoint, tmp_path, f"steps={steps}",
                                       f"rewards=[{{name: remote, kwargs: {kwargs}}}]"))

    with FakeService(die_after=4) as svc:  # step 1 scored, step 2 skipped
        train(cfg(svc.url, 2))
    with FakeService() as svc:  # a healthy service again for step 3
        train(cfg(svc.url, 3), resume=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/skipped_steps"] for r in rows if "reward/skipped_steps" in r] == [0.0, 1.0, 1.0]
    assert "reward/mean" in next(r for r in rows if r["step"] == 3 and "reward/skipped_steps" in r)
