"""Protocol conformance: every adapter of ``unigrpo.models.KINDS`` honours ``UnifiedModel``.

The recipe relies on these invariants without knowing which model it trains; each test names the
guarantee it protects. Adapters register in ``tests/models/conftest.py`` (``ADAPTERS``); the
tiny-model specifics (KV cache == no cache, manual softmax, ...) live in ``test_tiny_model.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, tiny_factory
from image_adapter import IgnoringTiny, seeing_factory

from unigrpo.models import KINDS, build_model, decode
from unigrpo.models.base import ReferencePolicy, UnifiedModel
from unigrpo.models.protocol import TokenBatch
from unigrpo.tasks import Prompt
from unigrpo.utils.dist import Dist

MAX_NEW = 8  # reasoning tokens sampled per row
TEST_ONLY: set[str] = set()  # adapters of the test suite that build_model cannot build (none today)
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 numerics of a different batch layout


# ----------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(model, prompts: list[str], seed: int = 0, max_new_tokens: int = MAX_NEW, **kw):
    return model.sample_reasoning(model.encode(prompts), max_new_tokens=max_new_tokens,
                                  generator=gen(seed), **kw)


def latents(model, b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, *model.latent_shape), generator=gen(seed))


def times(b: int) -> torch.Tensor:
    """[B] distinct flow times in (0, 1)."""
    return torch.linspace(0.2, 0.9, b)


def setup(adapter, seed: int = 0):
    """Sampled tokens of the adapter's prompts, latents x_t and per-row times t."""
    tokens = sample(adapter.model, adapter.prompts, seed)
    b = len(tokens)
    return tokens, latents(adapter.model, b, seed), times(b)


def outputs(m, tokens: TokenBatch, x: torch.Tensor, t: torch.Tensor, temperature: float = 1.0):
    """(logp, velocity) of a model or a reference policy, without gradient."""
    with torch.no_grad():
        logp, ctx = m.forward_context(tokens, temperature)
        return logp, m.velocity(x, t, ctx)


def assert_equal(a: tuple, b: tuple) -> None:
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v), (u - v).abs().max()


def assert_differ(a: tuple, b: tuple) -> None:
    for u, v in zip(a, b, strict=True):
        assert not torch.equal(u, v)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for group in model.parameter_groups().values() for _, p in group]


def train_step(model, tokens: TokenBatch, x: torch.Tensor, t: torch.Tensor, lr: float = 1e-2) -> None:
    """One AdamW step on every trainable parameter, with a loss reading both experts."""
    opt = torch.optim.AdamW(trainable(model), lr=lr)
    logp, ctx = model.forward_context(tokens)
    loss = -logp.sum() / tokens.response_mask.sum() + model.velocity(x, t, ctx).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def truncate_responses(tokens: TokenBatch, keep: list[int], pad_id: int) -> TokenBatch:
    """Keep the first ``keep[i]`` response tokens of row i (right padding after them), as if row i
    had stopped there."""
    resp = tokens.response_mask
    drop = resp & (resp.long().cumsum(1) > torch.tensor(keep)[:, None])
    return TokenBatch(tokens.ids.masked_fill(drop, pad_id), tokens.mask & ~drop, resp & ~drop, tokens.images,
                      tokens.image_mask)


def row_alone(tokens: TokenBatch, i: int) -> TokenBatch:
    """Row ``i`` with its left and right padding sliced off (what a batch of one would hold), with
    its own images only (none padded in)."""
    real = tokens.mask[i].nonzero()[:, 0]
    a, b = int(real[0]), int(real[-1]) + 1
    assert tokens.mask[i, a:b].all()  # layout: [left pad | prompt | response | right pad]
    alone = TokenBatch(tokens.ids[i:i + 1, a:b], tokens.mask[i:i + 1, a:b], tokens.response_mask[i:i + 1, a:b])
    return alone.with_images([tokens.row_images(i)])


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.any())


# ----------------------------------------------------------------------------- registry
def test_every_kind_is_tested(registered_kinds):
    """A new ``model.kind`` cannot ship without running this suite (register it in conftest.py)."""
    assert registered_kinds == set(KINDS)


# ----------------------------------------------------------------------------- 1. shapes, dtypes
def test_text_phase_layout(adapter):
    """Prompts LEFT-padded, responses RIGHT-padded: all rows generate in lockstep and every
    position is derived from the mask (protocol docstring)."""
    model, prompts = adapter.model, adapter.prompts
    assert isinstance(model, UnifiedModel) and isinstance(model.pad_id, int)
    enc = model.encode(prompts)
    b, lp = enc.ids.shape
    assert len(enc) == len(prompts) and enc.mask.shape == enc.response_mask.shape == (b, lp)
    assert enc.ids.dtype == torch.long and enc.mask.dtype == enc.response_mask.dtype == torch.bool
    assert enc.mask[:, -1].all() and not enc.response_mask.any()
    assert (enc.mask[:, 1:] >= enc.mask[:, :-1]).all()  # left padding: pads, then real tokens
    assert (enc.ids[~enc.mask] == model.pad_id).all()
    assert len(set(enc.mask.sum(1).tolist())) > 1, "adapter prompts must differ in token length"

    out = model.sample_reasoning(enc, max_new_tokens=MAX_NEW, generator=gen(0))
    assert isinstance(out, TokenBatch)  # return_logprobs=False: the tokens alone
    assert out.ids.dtype == torch.long and out.mask.dtype == out.response_mask.dtype == torch.bool
    assert lp < out.ids.shape[1] <= lp + MAX_NEW
    assert torch.equal(out.ids[:, :lp], enc.ids) and torch.equal(out.mask[:, :lp], enc.mask)
    assert not out.response_mask[:, :lp].any()
    resp = out.response_mask[:, lp:]
    assert torch.equal(out.mask[:, lp:], resp)  # after the prompt, real == generated
    assert (resp[:, 1:] <= resp[:, :-1]).all()  # right padding: generated, then pads
    assert (resp.sum(1) >= 1).all() and (out.ids[~out.mask] == model.pad_id).all()
    texts = model.decode_text(out)
    assert isinstance(texts, list) and len(texts) == b and all(isinstance(s, str) for s in texts)

    responses = ["a red circle", "two blue squares above a green triangle", "a green circle"][:b]
    responses += ["a red circle"] * (b - len(responses))
    given = model.with_response(enc, responses)
    assert torch.equal(given.ids[:, :lp], enc.ids) and not given.response_mask[:, :lp].any()
    assert torch.equal(given.mask[:, lp:], given.response_mask[:, lp:])
    assert len(set(given.response_mask.sum(1).tolist())) > 1  # each row its own length
    for r, text in zip(responses, model.decode_text(given), strict=True):
        assert r in text


def test_forward_context_and_image_phase_shapes(adapter):
    """Log-probs [B, L] that are zero off the response (the losses sum them unmasked) and valid
    log-probabilities on it; velocities, images and latents of the declared shapes."""
    model = adapter.model
    tokens, x, t = setup(adapter)
    b, length = tokens.ids.shape
    logp, ctx = model.forward_context(tokens)
    assert logp.shape == (b, length) and logp.is_floating_point() and logp.isfinite().all()
    assert (logp[~tokens.response_mask] == 0).all()
    assert (logp[tokens.response_mask] <= 0).all() and (logp[tokens.response_mask] < 0).any()

    v = model.velocity(x, t, ctx)
    assert v.shape == (b, *model.latent_shape) and v.is_floating_point() and v.isfinite().all()
    assert v.abs().max() > 0  # a zero velocity would make every image test vacuous
    v_null = model.velocity(x, t, model.null_context(b))
    assert v_null.shape == v.shape and v_null.isfinite().all()
    assert not torch.equal(v_null, v)  # the velocity reads its context

    images = model.decode(x)
    assert images.dim() == 4 and images.shape[:2] == (b, 3) and images.is_floating_point()
    assert images.min() >= 0 and images.max() <= 1
    z = model.encode_images(torch.rand(b, *images.shape[1:], generator=gen(1)))
    assert z.shape == (b, *model.latent_shape) and z.is_floating_point() and z.isfinite().all()


def test_parameter_groups(adapter):
    """The optimizer's two groups (and ``optim.image_params``) address real, distinct parameters
    by the names checkpoints use."""
    model = adapter.model
    groups = model.parameter_groups()
    assert set(groups) == {"text", "image"} and groups["text"] and groups["image"]
    named = dict(model.named_parameters())
    state = set(model.trainable_state())
    by_id = {id(p) for p in named.values()}
    entries = [e for g in groups.values() for e in g]
    names = [n for n, _ in entries]
    assert len(names) == len(set(names))  # names unique
    assert len({id(p) for _, p in entries}) == len(entries)  # text and image disjoint
    for name, p in entries:
        assert isinstance(p, torch.nn.Parameter) and id(p) in by_id, name
        assert name in named or name in state, name
        if name in named:
            assert named[name] is p, name
    assert isinstance(model.reference(), ReferencePolicy)


# ----------------------------------------------------------------------------- 2. determinism
def test_determinism_under_a_seed(adapter):
    """Reasoning is keyed by generator seeds (resume and any chunking / sharding reproduce a
    rollout), and scoring is a pure function of its inputs (recorded == re-scored)."""
    model, prompts = adapter.model, adapter.prompts
    a, b = sample(model, prompts, seed=7), sample(model, prompts, seed=7)
    assert_equal((a.ids, a.mask, a.response_mask), (b.ids, b.mask, b.response_mask))
    others = [sample(model, prompts, seed=s) for s in (8, 9, 10)]
    assert any(o.ids.shape != a.ids.shape or not torch.equal(o.ids, a.ids) for o in others)

    x, t = latents(model, len(a)), times(len(a))
    assert_equal(outputs(model, a, x, t), outputs(model, a, x, t))


# ----------------------------------------------------------------------------- 3. decode == score
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_scored_logprobs(adapter, temperature):
    """Ratio == 1 on the first update needs the distribution that sampled a token and the one
    ``forward_context`` scores it under to agree (temperature-scaled logits, same positions)."""
    model = adapter.model
    tokens, logp_decode = sample(model, adapter.prompts, seed=3, max_new_tokens=12,
                                 temperature=temperature, return_logprobs=True)
    assert isinstance(tokens, TokenBatch) and logp_decode.shape == tokens.ids.shape
    assert (logp_decode[~tokens.response_mask] == 0).all()
    logp, _ = model.forward_context(tokens, temperature)
    m = tokens.response_mask
    torch.testing.assert_close(logp[m], logp_decode[m].to(logp.dtype), **TOL)
    if temperature != 1.0:  # the temperature is applied, not ignored
        assert not torch.allclose(model.forward_context(tokens, 1.0)[0][m], logp[m], **TOL)


# ----------------------------------------------------------------------------- 4. padding
def test_padded_batch_equals_rows_alone(adapter):
    """A trajectory's log-probs and velocity do not depend on the rows it is batched with: left
    padding (prompt lengths), right padding (reasoning lengths) and the chunk's padded width
    (``pad_tokens``) change nothing beyond float tolerance."""
    model, prompts = adapter.model, adapter.prompts
    sampled = sample(model, prompts, seed=1)
    b = len(sampled)
    tokens = truncate_responses(sampled, [max(1, MAX_NEW - 3 * i) for i in range(b)], model.pad_id)
    assert len(set(tokens.response_mask.sum(1).tolist())) > 1
    x, t = latents(model, b, seed=1), times(b)
    logp, v = outputs(model, tokens, x, t)

    for i in range(b):
        row = row_alone(tokens, i)
        enc = model.encode([prompts[i]])  # the prompt re-encoded alone: no padding
        n = enc.ids.shape[1]
        assert torch.equal(row.ids[0, :n], enc.ids[0]) and row.response_mask[0, n:].all()
        logp_i, v_i = outputs(model, row, x[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(logp_i[0][row.response_mask[0]], logp[i][tokens.response_mask[i]], **TOL)
        torch.testing.assert_close(v_i[0], v[i], **TOL)

    width = tokens.ids.shape[1]
    wide = tokens.padded(width + 5, model.pad_id)
    logp_w, v_w = outputs(model, wide, x, t)
    assert (logp_w[:, width:] == 0).all()
    torch.testing.assert_close(logp_w[:, :width], logp, **TOL)
    torch.testing.assert_close(v_w, v, **TOL)


# ----------------------------------------------------------------------------- 5. per-row t
def test_velocity_at_per_row_times(adapter):
    """Rows of one call may sit at different flow times (``share_window=False``): row i's
    velocity must use t[i], and a scalar t means that time for every row."""
    model = adapter.model
    tokens, x, t = setup(adapter, seed=2)
    b = len(tokens)
    with torch.no_grad():
        _, ctx = model.forward_context(tokens)
        v = model.velocity(x, t, ctx)
        for i in range(b):
            _, ctx_i = model.forward_context(tokens.index(torch.tensor([i])))  # same padded width
            torch.testing.assert_close(model.velocity(x[i:i + 1], t[i:i + 1], ctx_i)[0], v[i], **TOL)
        assert not torch.allclose(model.velocity(x, t.flip(0), ctx), v, **TOL)  # t matters per row
        torch.testing.assert_close(model.velocity(x, torch.tensor(0.3), ctx),
                                   model.velocity(x, torch.full((b,), 0.3), ctx), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- 6. reference
def test_reference_is_frozen_and_restorable(adapter):
    """KL / reference terms regularise against the STARTING policy: an update must not move it
    (no shared or trainable weights), and a resumed run restores it from ``state_dict``."""
    model = adapter.model
    tokens, x, t = setup(adapter, seed=4)
    ref = model.reference()
    before_ref, before = outputs(ref, tokens, x, t), outputs(model, tokens, x, t)
    for u, v in zip(before_ref, before):  # the reference starts as the policy (float tolerance:
        torch.testing.assert_close(u, v, **TOL)  # frozen weights may take other CPU kernels)

    train_step(model, tokens, x, t)
    assert_differ(outputs(model, tokens, x, t), before)
    assert_equal(outputs(ref, tokens, x, t), before_ref)
    logp, ctx = ref.forward_context(tokens)  # with autograd on: nothing to differentiate
    assert not logp.requires_grad and not ref.velocity(x, t, ctx).requires_grad
    if hasattr(ref, "named_parameters"):
        assert not any(p.requires_grad for _, p in ref.named_parameters())
    state = ref.state_dict()
    assert all(not v.requires_grad for v in state.values())

    # Resume: a freshly built model's reference, loaded with the saved state, is the original one.
    fresh = adapter.fresh(seed=1)
    fresh_ref = fresh.reference()
    fresh_out = outputs(fresh, tokens, x, t)
    if state:
        assert_differ(outputs(fresh_ref, tokens, x, t), before_ref)
    fresh_ref.load_state_dict(state)
    assert_equal(outputs(fresh_ref, tokens, x, t), before_ref)
    assert_equal(outputs(fresh, tokens, x, t), fresh_out)  # loading the reference leaves the policy


# ----------------------------------------------------------------------------- 7. save / load
def test_trainable_state_round_trip(adapter):
    """Resuming a run restores the policy exactly (bitwise), and a checkpoint that does not fit
    the model is an error rather than a silently partial load."""
    model = adapter.model
    tokens, x, t = setup(adapter, seed=5)
    train_step(model, tokens, x, t)
    expected = outputs(model, tokens, x, t)
    state = model.trainable_state()
    assert state and all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())

    fresh = adapter.fresh(seed=1)
    assert_differ(outputs(fresh, tokens, x, t), expected)
    fresh.load_trainable_state(state)
    assert_equal(outputs(fresh, tokens, x, t), expected)

    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises((KeyError, RuntimeError, ValueError)):
        adapter.fresh(seed=2).load_trainable_state(missing)
    with pytest.raises((KeyError, RuntimeError, ValueError)):
        adapter.fresh(seed=2).load_trainable_state({**state, "not.a.parameter": torch.zeros(1)})


def test_save_then_build_model(adapter, tmp_path):
    """``model.save`` writes what ``build_model(cfg, checkpoint=path)`` (``model.checkpoint``)
    loads: the final policy evaluates and continues exactly as trained, in eval mode."""
    if adapter.kind in TEST_ONLY:
        pytest.skip("a test adapter, not a model.kind: build_model does not build it")
    model = adapter.model
    tokens, x, t = setup(adapter, seed=6)
    train_step(model, tokens, x, t)
    path = tmp_path / "policy.safetensors"
    model.save(path, extra={"step": 1})
    loaded = build_model(adapter.cfg, checkpoint=str(path))
    assert not getattr(loaded, "training", False)
    assert_equal(outputs(loaded, tokens, x, t), outputs(model, tokens, x, t))


# ----------------------------------------------------------------------------- 8. detach_context
def test_detach_context_cuts_text_gradient(adapter):
    """``algo.detach_context``-style training: the image loss must not reach the text expert
    through the context, while without detach it does (else detaching would be a no-op)."""
    model = adapter.model
    tokens, x, t = setup(adapter, seed=8)
    groups = model.parameter_groups()
    text, image = [p for _, p in groups["text"]], [p for _, p in groups["image"]]

    _, ctx = model.forward_context(tokens)
    model.velocity(x, t, model.detach_context(ctx)).pow(2).mean().backward()
    assert not any(nonzero(g) for g in grads(text))
    assert any(nonzero(g) for g in grads(image))
    model.zero_grad(set_to_none=True)

    _, ctx = model.forward_context(tokens)
    model.velocity(x, t, ctx).pow(2).mean().backward()
    # an adapter whose context cannot carry a text gradient (separate mode: frozen encoders read
    # the reasoning as text) says so; then the undetached context must not carry one either
    reaches = getattr(model, "context_grad_to_text", True)
    assert any(nonzero(g) for g in grads(text)) == reaches


# ----------------------------------------------------------------------------- 9. one process
def test_wrap_and_reduce_gradients_are_noops_on_one_process(adapter):
    """A single-process run has no distributed code in it: ``wrap`` changes no output and
    ``reduce_gradients`` no gradient (None stays None: AdamW skips those parameters)."""
    model, d = adapter.model, Dist()
    tokens, x, t = setup(adapter, seed=9)
    before = outputs(model, tokens, x, t)
    model.wrap(d)
    assert_equal(outputs(model, tokens, x, t), before)

    params = trainable(model)
    _, ctx = model.forward_context(tokens)
    model.velocity(x, t, model.detach_context(ctx)).pow(2).mean().backward()  # text grads stay None
    g0 = grads(params)
    model.reduce_gradients(params, d)
    for a, b in zip(g0, grads(params), strict=True):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    assert any(g is not None for g in g0)


# ----------------------------------------------------------------------------- 10. the text engine
def responses(tokens: TokenBatch) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(tokens.ids, tokens.response_mask)]


def test_cached_decode_equals_recomputing_the_sequence(adapter):
    """The engine's KV-cache loop samples the same tokens as recomputing the whole sequence at every
    step (``use_cache=False``: the adapter's ``prefill`` alone)."""
    model, prompts = adapter.model, adapter.prompts
    cached, lp = sample(model, prompts, seed=4, return_logprobs=True)
    full, lp_full = sample(model, prompts, seed=4, return_logprobs=True, use_cache=False)
    assert responses(cached) == responses(full)
    torch.testing.assert_close(lp, lp_full, **TOL)


def test_one_loop_of_groups_equals_a_loop_per_group(adapter):
    """``text.batch_groups`` for every kind: groups decoded in ONE loop, each with its own generator
    (one per row, shared within a group), sample the tokens of each group's own loop."""
    model, prompts, group, seeds = adapter.model, adapter.prompts, 2, [11, 12, 13]
    alone = []
    for prompt, seed in zip(prompts, seeds):
        alone += responses(model.sample_reasoning(model.encode([prompt] * group), max_new_tokens=MAX_NEW,
                                                  generator=gen(seed)))
    gens = [g for s in seeds for g in [gen(s)] * group]
    together = model.sample_reasoning(model.encode([p for p in prompts for _ in range(group)]),
                                      max_new_tokens=MAX_NEW, generator=gens)
    assert responses(together) == alone
    with pytest.raises(ValueError, match="generators for"):
        model.sample_reasoning(model.encode(prompts), max_new_tokens=2, generator=gens)


def multinomial_rows(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """The sampler the fixture was recorded with (the engine's until the inverse-CDF sampler):
    ``torch.multinomial`` of the renormalised nucleus, one call per run of rows sharing a generator."""
    def draw(rows: torch.Tensor, g) -> torch.Tensor:
        return torch.multinomial(decode.nucleus(rows.softmax(-1), top_p), 1, generator=g)[:, 0]

    if generator is None or isinstance(generator, torch.Generator):
        return draw(logits, generator)
    toks, start = [], 0
    for end in range(1, len(generator) + 1):
        if end == len(generator) or generator[end] is not generator[start]:
            toks.append(draw(logits[start:end], generator[start]))
            start = end
    return torch.cat(toks)


def test_decode_samples_the_tokens_of_the_per_adapter_loops(monkeypatch):
    """Given the sampler they used, the engine samples, bit for bit, the tokens (and decode-time
    log-probs) that each adapter's own decode loop sampled before the engine existed
    (``fixtures/decode_tokens.json``, recorded on main at 4f22dcd with
    ``model.sample_reasoning(model.encode_prompts(rows), ...)`` and the arguments below: one
    generator with top-p 0.9, temperature 1.3; one generator per row only for the HF families, whose
    loop alone took them): positions, caches, stopping and log-probs are theirs. The engine's own
    sampler draws other tokens from the same seeds (``tests/models/test_decode.py``). One CPU
    thread, as when recording: the float reductions of a matrix product depend on the thread count."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "fixtures" / "decode_tokens.json").read_text())
    monkeypatch.setattr(decode, "sample_rows", multinomial_rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the tiny model as recorded: drawn with the vocabulary of that day
        check_recorded_tokens({**ADAPTERS, "tiny": lambda seed=0: tiny_factory(seed, text_to_image_vocab=True)},
                              recorded)
    finally:
        torch.set_num_threads(threads)


def check_recorded_tokens(adapters: dict, recorded: dict) -> None:
    for kind, factory in sorted(adapters.items()):
        if kind in TEST_ONLY:
            continue
        model, _, prompts = factory(seed=0)
        rows = [p for p in prompts for _ in range(2)]
        for case, top_p in (("one_gen", 0.9), ("row_gens", 1.0)):
            if f"{kind}/{case}" not in recorded:
                continue
            want = recorded[f"{kind}/{case}"]
            g = gen(7) if case == "one_gen" else [x for i in range(len(prompts)) for x in [gen(11 + i)] * 2]
            toks, logp = model.sample_reasoning(model.encode(rows), max_new_tokens=8, temperature=1.3, top_p=top_p,
                                                generator=g, return_logprobs=True)
            assert toks.ids.tolist() == want["ids"], kind
            assert toks.mask.tolist() == want["mask"] and toks.response_mask.tolist() == want["response_mask"], kind
            assert torch.equal(logp, torch.tensor(want["logp"], dtype=logp.dtype)), kind


# ----------------------------------------------------------------------------- 11. input images
def image_prompts(adapter) -> list[Prompt]:
    """The adapter's prompts, the first with one random image and the third with two."""
    g, side = gen(5), 16
    return [Prompt(p if isinstance(p, str) else p.text, images=torch.rand(n, 3, side, side, generator=g) if n else None)
            for n, p in zip((1, 0, 2), adapter.prompts)]


def images_reach_the_model(model, prompts: list[Prompt]) -> bool:
    """Changing a row's images changes its next-token logits and its context (log-probs, velocity)."""
    other = [Prompt(p.text, images=None if p.images is None else 1 - p.images) for p in prompts]
    a, b = model.encode(prompts), model.encode(other)
    with torch.no_grad():
        la, lb = model.prefill(a)[0], model.prefill(b)[0]
        ta = model.with_response(a, ["a red circle"] * len(prompts))
        tb = model.with_response(b, ["a red circle"] * len(prompts))
        x, t = latents(model, len(prompts)), times(len(prompts))
        (pa, va), (pb, vb) = outputs(model, ta, x, t), outputs(model, tb, x, t)
    seen = [i for i, p in enumerate(prompts) if p.images is not None]
    return all(not torch.equal(u[i], v[i]) for i in seen for u, v in ((la, lb), (pa, pb), (va, vb)))


def images_reach_only_the_denoiser(model, prompts: list[Prompt]) -> bool:
    """An editing model that does not see: changing a row's images leaves the next-token logits and
    the log-probs alone and changes that row's velocity (rows without images keep theirs)."""
    other = [Prompt(p.text, images=None if p.images is None else 1 - p.images) for p in prompts]
    a, b = model.encode(prompts), model.encode(other)
    with torch.no_grad():
        blind = torch.equal(model.prefill(a)[0], model.prefill(b)[0])
        ta = model.with_response(a, ["a red circle"] * len(prompts))
        tb = model.with_response(b, ["a red circle"] * len(prompts))
        x, t = latents(model, len(prompts)), times(len(prompts))
        (pa, va), (pb, vb) = outputs(model, ta, x, t), outputs(model, tb, x, t)
    seen = [p.images is not None for p in prompts]
    return blind and torch.equal(pa, pb) and all(torch.equal(va[i], vb[i]) != s for i, s in enumerate(seen))


def test_images_reach_the_context_or_are_refused(adapter):
    """Nothing drops an image silently: a model that sees images lets them change the reasoning and
    the image context; one that only edits lets them change the denoiser's context and nothing
    of the reasoning; one that does neither refuses a prompt that carries one, in one line."""
    model, prompts = adapter.model, image_prompts(adapter)
    if model.edits and not model.sees_images:
        assert images_reach_only_the_denoiser(model, prompts)
        return
    if not model.sees_images:
        with pytest.raises(ValueError, match="does not see input images"):
            model.encode(prompts)
        model.encode([Prompt(p.text) for p in prompts])  # the same prompts without images are fine
        return
    assert images_reach_the_model(model, prompts)


def test_an_adapter_that_ignores_images_is_caught():
    """The fault injected once: an adapter that declares ``sees_images`` and drops the images fails
    the check above (its twin that looks passes it)."""
    seeing, _, prompts = seeing_factory(seed=0)
    ignoring, _, _ = seeing_factory(seed=0, cls=IgnoringTiny)
    assert images_reach_the_model(seeing, prompts)
    assert not images_reach_the_model(ignoring, prompts)


def test_an_editing_adapter_that_drops_its_images_is_caught(monkeypatch):
    """The same fault for a model that edits without seeing (FLUX.2 [klein] references): with its
    references dropped from the context it fails ``images_reach_only_the_denoiser``."""
    model, _, prompts = ADAPTERS["hf:flux2_ref"](seed=0)
    assert images_reach_only_the_denoiser(model, prompts)
    monkeypatch.setattr(type(model), "references", lambda self, tokens: (None, None))
    assert not images_reach_only_the_denoiser(model, prompts)


def test_input_batch_keeps_each_rows_images():
    """``TokenBatch`` carries images [B, N, 3, H, W] + mask through index / cat / padding /
    sampling: any count per row, none included."""
    a = TokenBatch.left_padded([[1, 2], [3]], 0, "cpu").with_images([torch.ones(2, 3, 4, 4), None])
    b = TokenBatch.left_padded([[4, 5, 6]], 0, "cpu").with_images([torch.zeros(1, 3, 4, 4)])
    assert a.images.shape == (2, 2, 3, 4, 4) and a.image_mask.tolist() == [[True, True], [False, False]]
    assert a.row_images(1) is None and torch.equal(a.row_images(0), torch.ones(2, 3, 4, 4))
    both = TokenBatch.cat([a, b.padded(4, 0)], 0)
    assert both.ids.shape == (3, 4) and both.images.shape == (3, 2, 3, 4, 4)
    assert both.image_mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(both.index(torch.tensor([2])).row_images(0), torch.zeros(1, 3, 4, 4))
    grown = both.with_responses([[7], [8, 9], [1]], 0).padded(8, 0)
    assert grown.images is both.images and grown.image_mask is both.image_mask
    assert TokenBatch.cat([TokenBatch.left_padded([[1]], 0, "cpu")] * 2, 0).images is None
    with pytest.raises(ValueError, match="resize them"):
        a.with_images([torch.ones(1, 3, 4, 4), torch.ones(1, 3, 8, 8)])


def test_padded_batch_with_images_equals_rows_alone(adapter):
    """Rows with 0, 1 and 2 images, batched (images padded to 2 per row, tokens padded) == each row
    alone with only its own images (``test_padded_batch_equals_rows_alone`` with images)."""
    model = adapter.model
    if not (model.sees_images or model.edits):
        pytest.skip("the model reads no input image")
    prompts = image_prompts(adapter)
    tokens = model.sample_reasoning(model.encode(prompts), max_new_tokens=MAX_NEW, generator=gen(3))
    x, t = latents(model, len(tokens)), times(len(tokens))
    logp, v = outputs(model, tokens, x, t)
    for i in range(len(tokens)):
        alone = row_alone(tokens, i)
        lp_i, v_i = outputs(model, alone, x[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(lp_i[alone.response_mask], logp[i][tokens.response_mask[i]], **TOL)
        torch.testing.assert_close(v_i[0], v[i], **TOL)


def test_a_groups_tokens_do_not_depend_on_the_groups_decoded_beside_it(adapter):
    """The promise of the default one-loop decode (``text.batch_groups``): with the prompts
    left-padded to one width (the widest of every rank: ``rollout.sample_reasoning``), a group's
    tokens are the same whichever other groups share its loop -- so they do not depend on how a
    step's prompts are sharded over ranks (docs/reliability.md, "Determinism")."""
    model, prompts, group, seeds = adapter.model, adapter.prompts, 2, [21, 22, 23]
    rows = [p for p in prompts for _ in range(group)]
    width = model.encode(rows).ids.shape[1]

    def decode(idx: list[int]) -> list[list[int]]:
        batch = model.encode([rows[i] for i in idx]).left_padded_to(width, model.pad_id)
        gens = {p: gen(seeds[p]) for p in sorted({i // group for i in idx})}
        return responses(model.sample_reasoning(batch, max_new_tokens=MAX_NEW, generator=[gens[i // group] for i in idx]))

    together = decode(list(range(len(rows))))
    split = decode(list(range(group))) + decode(list(range(group, len(rows))))  # as if on two ranks
    assert together == split
