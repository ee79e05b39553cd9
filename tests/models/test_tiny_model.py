"""The tiny unified model: protocol conformance, KV cache == no cache, one-pass context, IO."""

import copy

import pytest
import torch

from unigrpo.config import load_config
from unigrpo.models import build_model
from unigrpo.models.base import UnifiedModel
from unigrpo.models.protocol import TokenBatch
from unigrpo.models.tiny import TinyUnifiedModel

SMALL = ["model.d_text=32", "model.text_layers=2", "model.unet_channels=[16,32,32]", "model.image_size=16"]
PROMPTS = ["a red circle", "two blue squares", "a yellow triangle left of a green circle"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(None, SMALL), checkpoint=None).eval()


def test_conforms_to_protocol(model):
    assert isinstance(model, UnifiedModel)
    text, image = set(map(id, (p for _, p in model.parameter_groups()['text']))), set(map(id, (p for _, p in model.parameter_groups()['image'])))
    assert text and image and not text & image
    assert text | image == set(map(id, model.parameters()))  # a clean split, nothing left over


def test_kv_cache_sampling_equals_uncached(model):
    prompts = model.encode(PROMPTS)
    a = model.sample_reasoning(prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    b = model.sample_reasoning(prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(3),
                               use_cache=False)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    assert a.response_mask.sum() > 0


def test_left_padding_does_not_change_a_row(model):
    """A prompt's log-probs and context do not depend on how much its row is padded."""
    alone = model.with_response(model.encode(PROMPTS[:1]), ["<think> red . </think> a red circle"])
    padded = model.with_response(model.encode(PROMPTS), ["<think> red . </think> a red circle"] * 3)
    lp_a, ctx_a = model.forward_context(alone)
    lp_p, ctx_p = model.forward_context(padded)
    resp_a = lp_a[0][alone.response_mask[0]]
    resp_p = lp_p[0][padded.response_mask[0]]
    torch.testing.assert_close(resp_a, resp_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx_a.hidden[0][alone.mask[0]], ctx_p.hidden[0][padded.mask[0]],
                               atol=1e-5, rtol=1e-5)


def test_forward_context_logp_matches_manual_softmax(model):
    tokens = model.with_response(model.encode(PROMPTS), ["a red circle"] * 3)
    logp, _ = model.forward_context(tokens, temperature=0.7)
    hidden = model.text(tokens.ids, tokens.mask)
    for b in range(3):
        for i in torch.nonzero(tokens.response_mask[b])[:, 0].tolist():
            ref = torch.log_softmax(model.text.head(hidden[b, i - 1]) / 0.7, -1)[tokens.ids[b, i]]
            torch.testing.assert_close(logp[b, i], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(logp[~tokens.response_mask] == 0)


def test_sampled_rows_stop_at_eos(model):
    out = model.sample_reasoning(model.encode(PROMPTS), max_new_tokens=20,
                                 generator=torch.Generator().manual_seed(0))
    eos = model.tokenizer.eos_id
    for ids, m in zip(out.ids.tolist(), out.response_mask.tolist()):
        resp = [i for i, keep in zip(ids, m) if keep]
        assert eos not in resp[:-1]  # nothing is generated after <eos>


def test_velocity_shapes_context_and_gradients(model):
    model = copy.deepcopy(model)
    torch.nn.init.normal_(model.image.out[-1].weight, std=0.02)  # zero-init head would block all grads
    tokens = model.with_response(model.encode(PROMPTS), ["a red circle"] * 3)
    _, ctx = model.forward_context(tokens)
    x = torch.randn(3, *model.latent_shape)
    v = model.velocity(x, torch.full((3,), 0.5), ctx)
    assert v.shape == x.shape
    v.pow(2).sum().backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in (p for _, p in model.parameter_groups()['text']))
    model.zero_grad(set_to_none=True)
    v2 = model.velocity(x, torch.full((3,), 0.5), model.detach_context(ctx))
    v2.pow(2).sum().backward()
    assert all(p.grad is None for p in (p for _, p in model.parameter_groups()['text']))  # detach cuts the text expert
    model.zero_grad(set_to_none=True)
    null = model.null_context(3)
    assert model.velocity(x, torch.tensor(0.3), null).shape == x.shape


def test_encode_decode_images_round_trip(model):
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(model.decode(model.encode_images(images)), images)


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save(path, extra={"note": "test"})
    loaded = TinyUnifiedModel.load(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.tokenizer.vocab_size == model.tokenizer.vocab_size
    with pytest.raises(FileNotFoundError):
        TinyUnifiedModel.load(tmp_path / "missing.safetensors")


def test_token_batch_cat_pads_widths(model):
    a = model.encode(PROMPTS[:1])
    b = model.encode(PROMPTS)
    c = TokenBatch.cat([a, b], pad_id=model.pad_id)
    assert c.ids.shape == (4, b.ids.shape[1]) and c.mask[:1].sum() == a.mask.sum()
