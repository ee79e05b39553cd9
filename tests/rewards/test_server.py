"""`unigrpo serve-reward`'s app (FastAPI under uvicorn, loopback): /health, /info, lossless
scores, clear 4xx errors, a bounded queue (503), the reward's own failure (500)."""

import base64
import json
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from services import AppThread, post

from unigrpo.rewards import RewardSet
from unigrpo.rewards.remote import RemoteReward
from unigrpo.rewards.server import build_app
from unigrpo.rewards.wire import encode_images, encode_request


def batch(n=3, size=8):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images, [f"prompt {i}" for i in range(n)], [{"i": i} for i in range(n)]


@pytest.fixture(scope="module")
def brightness():
    with AppThread(build_app("smooth_reward:brightness", max_batch=4)) as srv:
        yield srv


def test_health_info_and_lossless_scores(brightness):
    import urllib.request

    with urllib.request.urlopen(brightness.url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(brightness.url + "/info") as r:
        info = json.loads(r.read())
    assert info["reward"] == "smooth_reward:brightness" and info["max_batch"] == 4 and info["formats"] == ["npy", "png"]
    images, prompts, meta = batch()
    status, out = post(brightness.url + "/score", encode_request(images, prompts, meta))
    assert status == 200
    assert torch.equal(torch.tensor(out["scores"], dtype=torch.float32), images.mean(dim=(1, 2, 3)))  # bitwise
    status, out = post(brightness.url + "/score", encode_request(images, prompts, meta, "png"))
    assert status == 200  # png quantises to 1/255
    torch.testing.assert_close(torch.tensor(out["scores"]), images.mean(dim=(1, 2, 3)), atol=1 / 255, rtol=0)
    client = RemoteReward(brightness.url)
    assert torch.equal(client(images, prompts, meta), images.mean(dim=(1, 2, 3)))
    client.close()


def _req(**change):
    images, prompts, meta = batch()
    req = json.loads(encode_request(images, prompts, meta))
    req.update(change)
    return {k: v for k, v in req.items() if v is not None}


@pytest.mark.parametrize("change, message", [
    ({"images": ["!!not base64!!"] * 3}, r"images\[0\]: not valid base64"),
    ({"format": "png"}, r"images\[0\]: not a PNG"),
    ({"images": [base64.b64encode(b"GIF89a....").decode()] * 3}, r"images\[0\]: not an .npy"),
    ({"prompts": ["a", "b"]}, "length mismatch: 3 images, 2 prompts, 3 metadata"),
    ({"images": None}, "missing field.*images"),
    ({"format": "jpeg"}, "format: 'jpeg'"),
    ({"metadata": [1, 2, 3]}, "metadata: expected a list of objects"),
])
def test_bad_payloads_are_clear_400s(brightness, change, message):
    import re

    status, out = post(brightness.url + "/score", _req(**change))
    assert status == 400 and re.search(message, out["error"]), out


def test_not_json_mixed_sizes_and_too_large_batches(brightness):
    status, out = post(brightness.url + "/score", b"{not json")
    assert status == 400 and "not JSON" in out["error"]
    images, prompts, meta = batch(n=5)
    status, out = post(brightness.url + "/score", encode_request(images, prompts, meta))
    assert status == 400 and "larger than the server's max_batch 4" in out["error"]
    req = _req()
    req["images"][1] = encode_images(torch.rand(1, 3, 4, 4))[0]
    status, out = post(brightness.url + "/score", req)
    assert status == 400 and "one size" in out["error"]


def test_a_body_over_the_limit_is_a_413():
    images, prompts, meta = batch(n=2, size=64)
    with AppThread(build_app("smooth_reward:brightness", max_body_mb=0.05)) as srv:
        status, out = post(srv.url + "/score", encode_request(images, prompts, meta))
        assert status == 413 and "larger than max_body_mb 0.05" in out["error"]


def test_reward_failure_is_a_500_and_a_full_queue_a_503():
    images, prompts, meta = batch(n=1)
    with AppThread(build_app("slow_rewards:boom")) as srv:
        status, out = post(srv.url + "/score", encode_request(images, prompts, meta))
        assert status == 500 and "ran out of memory" in out["error"] and "slow_rewards:boom" in out["error"]
    with AppThread(build_app("slow_rewards:sleepy", max_queue=1)) as srv:
        body = encode_request(images, prompts, [{"sleep": 1.0}])
        first = {}
        t = threading.Thread(target=lambda: first.update(r=post(srv.url + "/score", body)))
        t.start()
        import time
        import urllib.request

        for _ in range(100):  # until the first request is in: the queue (1) is full
            with urllib.request.urlopen(srv.url + "/info") as r:
                if json.loads(r.read())["pending"] == 1:
                    break
            time.sleep(0.02)
        status, out = post(srv.url + "/score", body)
        t.join()
        assert status == 503 and "queue full" in out["error"]
        assert first["r"][0] == 200


def test_bad_reward_name_fails_at_start():
    with pytest.raises(ValueError, match="not a built-in"):
        build_app("no_such_reward")
    with pytest.raises(ValueError, match="bad kwargs"):
        build_app("remote", {"nope": 1})


def test_serve_reward_cli_errors_are_one_line(capsys):
    from unigrpo.cli import main

    assert main(["serve-reward", "no_such_reward", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unigrpo: reward 'no_such_reward'") and "\n" not in err
    assert main(["serve-reward", "shapes", "--kwargs", "[1, 2]"]) == 2
    assert "--kwargs: expected a mapping" in capsys.readouterr().err


def test_a_served_reward_in_a_reward_set(brightness):
    images, prompts, meta = batch()
    rs = RewardSet([("remote", 2.0, {"url": brightness.url + "/score"}), ("smooth_reward:brightness", -1.0)])
    res = rs(images, prompts, meta)
    torch.testing.assert_close(res.total, images.mean(dim=(1, 2, 3)), rtol=0, atol=1e-7)
    assert res.metrics["reward/remote_retries"] == 0 and res.metrics["reward/remote_failures"] == 0
    assert res.metrics["reward/remote_latency_s"] > 0
    rs.close()


def test_binary_transport_is_negotiated_and_lossless(brightness):
    from unigrpo.rewards.wire import BINARY_TYPE, encode_binary_request

    images, prompts, meta = batch()
    client = RemoteReward(brightness.url)
    assert client.protocol.transport == "auto"
    assert torch.equal(client(images, prompts, meta), images.mean(dim=(1, 2, 3)))  # float32: bitwise
    assert client.protocol.transport == "binary" and client.protocol.content_type == BINARY_TYPE
    client.close()
    # 8-bit: the binary body carries exactly the PNG's levels, so the scores equal the JSON png ones
    png_json, png_bin = RemoteReward(brightness.url, image_format="png", transport="json"), \
        RemoteReward(brightness.url, image_format="png")
    assert torch.equal(png_json(images, prompts, meta), png_bin(images, prompts, meta))
    assert png_bin.protocol.transport == "binary" and png_json.protocol.transport == "json"
    assert len(encode_binary_request(images, prompts, meta, "png")) < len(encode_binary_request(images, prompts, meta)) / 3
    png_json.close()
    png_bin.close()


def test_a_server_without_the_binary_transport_gets_json():
    from services import FakeService

    # FakeService answers any GET (also /info) without "transports", as an older server does

    images, prompts, meta = batch()
    with FakeService() as srv:
        client = RemoteReward(srv.url)
        assert torch.equal(client(images, prompts, meta), images.mean(dim=(1, 2, 3)))
        assert client.protocol.transport == "json"
        client.close()
    down = RemoteReward("http://127.0.0.1:9", retries=0, on_failure="skip")
    down.protocol.prepare(down.client)
    assert down.protocol.transport == "auto"  # not answered: asked again at the next call
    down.close()


def _binary(images, prompts, meta, drop=()):
    from safetensors.torch import save

    md = {"prompts": json.dumps(prompts), "metadata": json.dumps(meta)}
    return save({"images": images.contiguous()}, metadata={k: v for k, v in md.items() if k not in drop})


@pytest.mark.parametrize("make, message", [
    (lambda i, p, m: b"\x00" * 4, "not a safetensors file"),
    (lambda i, p, m: b"garbage body that is long enough", "not a safetensors file"),
    (lambda i, p, m: _binary(i, p, m, drop=("prompts",)), r"__metadata__ \{prompts, metadata\}"),
    (lambda i, p, m: _binary(i, p[:2], m), "length mismatch: 3 images, 2 prompts, 3 metadata"),
    (lambda i, p, m: _binary(i.double(), p, m), r"expected float32 or uint8 \[B, 3, H, W\], got torch.float64"),
    (lambda i, p, m: _binary(i[:, :2], p, m), r"got torch.float32 \[3, 2, 8, 8\]"),
    (lambda i, p, m: _binary(i, p, [1, 2, 3]), "metadata: expected a list of objects"),
])
def test_bad_binary_payloads_are_clear_400s(brightness, make, message):
    import re
    import urllib.error
    import urllib.request

    from unigrpo.rewards.wire import BINARY_TYPE

    images, prompts, meta = batch()
    req = urllib.request.Request(brightness.url + "/score", data=make(images, prompts, meta), method="POST",
                                 headers={"Content-Type": BINARY_TYPE})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and re.search(message, json.loads(e.value.read())["error"])


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.index_fill_(0, torch.tensor([1]), float("nan")), r"images\[1\]: non-finite pixels"),
    (lambda x: x.index_fill_(0, torch.tensor([2]), float("inf")), r"images\[2\]: non-finite pixels"),
    (lambda x: x.index_fill_(0, torch.tensor([0]), 1.5), r"images\[0\]: pixels outside \[0, 1\] \(min 1.5"),
    (lambda x: x[:, :, :0], r"images: zero-size images \[3, 3, 0, 8\]"),
])
@pytest.mark.parametrize("binary", [False, True])
def test_pixels_the_wire_format_forbids_are_400s_naming_the_image(brightness, bad, message, binary):
    import re

    from unigrpo.rewards.wire import BINARY_TYPE, encode_binary_request

    images, prompts, meta = batch()
    images = bad(images)
    body = (encode_binary_request if binary else encode_request)(images, prompts, meta)
    status, out = post(brightness.url + "/score", body, content_type=BINARY_TYPE if binary else "application/json")
    assert status == 400 and re.search(message, out["error"]), out


def test_a_reward_missing_a_metadata_key_is_a_422_the_client_does_not_retry():
    from unigrpo.rewards.remote import RewardServiceError

    images, prompts, meta = batch(n=2)
    with AppThread(build_app("slow_rewards:needs_target")) as srv:
        status, out = post(srv.url + "/score", encode_request(images, prompts, meta))
        assert status == 422 and "needs metadata key 'target'" in out["error"]
        client = RemoteReward(srv.url, retries=3, backoff_s=5.0, on_failure="skip")  # 4xx: fails at once
        with pytest.raises(RewardServiceError, match="HTTP 422"):
            client(images, prompts, meta)
        client.close()
        status, out = post(srv.url + "/score", encode_request(images, prompts, [{"target": 0.25}] * 2))
        assert status == 200 and out["scores"] == [0.25, 0.25]


def test_a_chunked_body_over_the_limit_is_a_413_counted_on_the_bytes_read():
    import http.client
    import urllib.parse

    with AppThread(build_app("smooth_reward:brightness", max_body_mb=0.05)) as srv:
        u = urllib.parse.urlsplit(srv.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)

        def chunks():  # no Content-Length: 2 MB in 64 KB chunks
            for _ in range(32):
                yield b" " * 65536

        try:
            conn.request("POST", "/score", body=chunks(), encode_chunked=True,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            status, out = resp.status, json.loads(resp.read())
        finally:
            conn.close()
        assert status == 413 and "larger than max_body_mb 0.05" in out["error"]


def test_a_token_guards_score_and_info_and_the_remote_client_sends_it(monkeypatch):
    import urllib.error
    import urllib.request

    from unigrpo.rewards.remote import RewardServiceError
    from unigrpo.rewards.server import TOKEN_ENV, open_warning

    images, prompts, meta = batch(n=2)
    with AppThread(build_app("smooth_reward:brightness", token="s3cret")) as srv:
        status, out = post(srv.url + "/score", encode_request(images, prompts, meta))
        assert status == 401 and "token" in out["error"]
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(srv.url + "/info")
        with urllib.request.urlopen(srv.url + "/health") as r:  # health checks need no secret
            assert r.status == 200
        client = RemoteReward(srv.url, token="s3cret")
        assert torch.equal(client(images, prompts, meta), images.mean(dim=(1, 2, 3)))
        client.close()
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        client = RemoteReward(srv.url)  # from the environment
        assert torch.equal(client(images, prompts, meta), images.mean(dim=(1, 2, 3)))
        client.close()
        monkeypatch.setenv(TOKEN_ENV, "wrong")
        client = RemoteReward(srv.url)
        with pytest.raises(RewardServiceError, match="HTTP 401"):
            client(images, prompts, meta)
        client.close()
    assert open_warning("0.0.0.0", None) and "without a token" in open_warning("0.0.0.0", None)
    assert open_warning("0.0.0.0", "s3cret") is None and open_warning("127.0.0.1", None) is None
    assert open_warning("localhost", None) is None and open_warning("::1", None) is None
