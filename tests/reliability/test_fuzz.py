"""Property-based fuzzing (hypothesis) of the three parsers that read what a user or a client
sends: the config loader (YAML file + key=value overrides), the prompt-file loader (JSONL) and the
reward service's wire decoders (JSON and safetensors bodies). Any input gives a result or ONE
line of the parser's own error type -- never a traceback of another type, never a hang (each
example has a deadline). Examples are bounded so the file runs in a few seconds."""

import json
import os
import struct
from datetime import timedelta

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unigrpo.cli import _one_line
from unigrpo.config import Config, ConfigError, load_config, to_dict
from unigrpo.rewards.wire import PayloadError, decode_binary_request, decode_request
from unigrpo.tasks import load_prompt_file

# Deterministic in the suite; UNIGRPO_FUZZ_EXAMPLES=5000 runs a longer, random campaign.
EXAMPLES = int(os.environ.get("UNIGRPO_FUZZ_EXAMPLES", "0"))
FAST = settings(max_examples=EXAMPLES or 150, deadline=timedelta(seconds=5), derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


KEYS = _keys(to_dict(Config()))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                    max_size=3), max_leaves=6)


def one_line(err: BaseException, kind: type) -> None:
    """The parser's own error type, with a message (``unigrpo`` prints it on one line, ``cli._one_line``)."""
    assert isinstance(err, kind), f"{type(err).__name__}: {err}"
    assert _one_line(str(err)), repr(err)


def attempt(fn, kind: type):
    try:
        return fn()
    except kind as e:
        one_line(e, kind)
        return None


@FAST
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10),
                          values.map(lambda v: json.dumps(v)) | st.text(max_size=20)), max_size=4))
def test_config_overrides_give_a_config_or_one_line(pairs):
    attempt(lambda: load_config(None, [f"{k}={v}" for k, v in pairs]), ConfigError)


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=4).map(
           lambda d: json.dumps(d).encode()))
def test_config_files_give_a_config_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(data)
    attempt(lambda: load_config(path), ConfigError)


json_lines = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "tag", "line", "x"]) | st.text(max_size=5), values, max_size=3),
    values, st.text(max_size=30)).map(lambda v: v if isinstance(v, str) else json.dumps(v)), max_size=5)


@FAST
@given(st.binary(max_size=200) | json_lines.map(lambda rows: "\n".join(rows).encode()))
def test_prompt_files_give_prompts_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "p.jsonl"
    path.write_bytes(data)
    prompts = attempt(lambda: load_prompt_file(path), ConfigError)
    assert prompts is None or all(p.text.strip() and p.metadata["line"] >= 1 for p in prompts)


request_fields = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["npy", "png", "jpeg"]) | values, "images": values | st.lists(
        st.text(max_size=40), max_size=3), "prompts": values, "metadata": values})


@FAST
@given(st.binary(max_size=300) | request_fields.map(lambda r: json.dumps(r).encode()))
def test_json_wire_bodies_give_a_batch_or_a_400(body):
    attempt(lambda: decode_request(body, max_batch=4), PayloadError)


def _safetensors_like(header, rest: bytes) -> bytes:
    """A body framed as safetensors (8-byte length + JSON header) around an arbitrary header and payload."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + rest


@FAST
@given(st.binary(max_size=300)
       | st.tuples(values, st.binary(max_size=64)).map(lambda hv: _safetensors_like(*hv)))
def test_binary_wire_bodies_give_a_batch_or_a_400(body):
    attempt(lambda: decode_binary_request(body, max_batch=4), PayloadError)
