"""The text phase of the HF adapter on a tiny random Qwen3 (built from config, tokenizer built in
code, nothing downloaded): seeded KV-cache sampling whose decode-time log-probs equal the
teacher-forced scores (the "ratio == 1" precondition), left / right padding that changes nothing,
the chat template, and teacher forcing of given responses."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from testkit import tiny_bpe_tokenizer

from unigrpo.models import hf_text
from unigrpo.models.hf_text import CausalLMReasoner, positions

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["a red circle", "two green triangles above a yellow circle", "a blue square"]


@pytest.fixture(scope="module")
def reasoner():
    tok = tiny_bpe_tokenizer(CHATML)
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)).eval()
    # many stop ids: rows of a random model then stop at different steps (right padding is exercised)
    return CausalLMReasoner(lm, tok, hidden_layers=(1, 2), stop_ids=(tok.eos_token_id, *range(5, 120)))


def sample(reasoner, seed=0, temperature=1.0, n=12):
    batch = reasoner.encode(PROMPTS)
    return reasoner.sample_reasoning(batch, max_new_tokens=n, temperature=temperature,
                                     generator=torch.Generator().manual_seed(seed), return_logprobs=True)


def test_prompts_use_the_chat_template_and_are_left_padded(reasoner):
    batch = reasoner.encode(PROMPTS)
    assert batch.mask[:, -1].all() and not batch.mask[0, 0] and batch.mask[1].all()  # longest row unpadded
    text = reasoner.tokenizer.decode(batch.ids[0][batch.mask[0]].tolist())
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
    assert torch.equal(positions(batch.mask)[0][batch.mask[0]], torch.arange(int(batch.mask[0].sum())))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_decode_time_logprobs_equal_teacher_forced_scores(reasoner, temperature):
    tokens, logp_decode = sample(reasoner, temperature=temperature)
    lengths = tokens.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # rows stopped at different steps
    logp, ctx = reasoner.forward_context(tokens, temperature)
    resp = tokens.response_mask
    assert (logp[~resp] == 0).all() and (logp[resp] < 0).all()
    torch.testing.assert_close(logp, logp_decode, rtol=0, atol=1e-5)
    assert ctx.hidden.shape == (*tokens.ids.shape, 2 * 32)  # two layers concatenated


def test_sampling_is_seeded(reasoner):
    a, b, c = sample(reasoner, 3)[0], sample(reasoner, 3)[0], sample(reasoner, 4)[0]
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)


def test_a_padded_batch_equals_its_rows_one_at_a_time(reasoner):
    tokens, _ = sample(reasoner)
    logp, ctx = reasoner.forward_context(tokens)
    wide = tokens.padded(tokens.ids.shape[1] + 5, reasoner.pad_id)  # extra right padding
    logp_wide, _ = reasoner.forward_context(wide)
    torch.testing.assert_close(logp_wide[:, :logp.shape[1]], logp, rtol=0, atol=1e-5)
    for i in range(len(tokens)):
        real = tokens.mask[i]
        alone = tokens.index(torch.tensor([i]))
        alone = type(alone)(alone.ids[:, real], alone.mask[:, real], alone.response_mask[:, real])
        logp_i, ctx_i = reasoner.forward_context(alone)
        torch.testing.assert_close(logp_i[0], logp[i][real], rtol=0, atol=1e-5)
        torch.testing.assert_close(ctx_i.hidden[0], ctx.hidden[i][real], rtol=0, atol=1e-5)


def test_with_response_teacher_forces_given_text(reasoner):
    batch = reasoner.with_response(reasoner.encode(PROMPTS[:2]), ["a blue circle", "two red squares"])
    texts = reasoner.decode_text(batch)
    assert texts == ["a blue circle<|im_end|>", "two red squares<|im_end|>"]
    logp, _ = reasoner.forward_context(batch)
    assert (logp[batch.response_mask] < 0).all() and (logp[~batch.response_mask] == 0).all()
    detached = reasoner.detach_context(reasoner.forward_context(batch)[1])
    assert not detached.hidden.requires_grad


def test_one_loop_with_a_generator_per_row_equals_one_loop_per_group(reasoner):
    """Groups decoded together (one generator per row, shared within a group) sample the same
    tokens as each group's own loop with its own generator (the recipe's per-group seeding)."""
    group, seeds = 3, [11, 12, 13]

    def responses(tokens):
        return [row[m].tolist() for row, m in zip(tokens.ids, tokens.response_mask)]

    alone, logp_alone = [], []
    for prompt, seed in zip(PROMPTS, seeds):
        t, lp = reasoner.sample_reasoning(reasoner.encode([prompt] * group), max_new_tokens=10,
                                          generator=torch.Generator().manual_seed(seed), return_logprobs=True)
        alone += responses(t)
        logp_alone += [row[m] for row, m in zip(lp, t.response_mask)]
    gens = [g for s in seeds for g in [torch.Generator().manual_seed(s)] * group]
    together, logp = reasoner.sample_reasoning(reasoner.encode([p for p in PROMPTS for _ in range(group)]),
                                               max_new_tokens=10, generator=gens, return_logprobs=True)
    assert responses(together) == alone
    assert len({len(r) for r in alone}) > 1  # rows stopped at different steps
    for row, m, ref in zip(logp, together.response_mask, logp_alone):
        torch.testing.assert_close(row[m], ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="generators for"):
        reasoner.sample_reasoning(reasoner.encode(PROMPTS), max_new_tokens=2, generator=gens)


def static_twin(reasoner, **kw) -> CausalLMReasoner:
    """The same LM and tokenizer decoding on a ``StaticKV``."""
    return CausalLMReasoner(reasoner.lm, reasoner.tokenizer, hidden_layers=reasoner.hidden_layers,
                            stop_ids=reasoner.stop_ids, static_cache=True, **kw)


@pytest.mark.parametrize("chunk", [hf_text.CACHE_CHUNK, 4])  # 4: the cache grows during the decode
def test_the_static_cache_samples_the_dynamic_caches_tokens(reasoner, monkeypatch, chunk):
    """Preallocated keys written in place, the mask given ready-made: the same tokens as the
    ``DynamicCache`` loop from the same seeds, log-probs equal up to float rounding and equal to the
    teacher-forced scores (the ratio == 1 precondition), rows stopping at different steps."""
    monkeypatch.setattr(hf_text, "CACHE_CHUNK", chunk)
    static = static_twin(reasoner)
    gens = [g for s in (11, 12, 13) for g in [torch.Generator().manual_seed(s)] * 2]
    rows = reasoner.encode([p for p in PROMPTS for _ in range(2)])
    want, lp_want = reasoner.sample_reasoning(rows, max_new_tokens=14, temperature=0.7, generator=gens,
                                              return_logprobs=True)
    gens = [g for s in (11, 12, 13) for g in [torch.Generator().manual_seed(s)] * 2]
    got, lp = static.sample_reasoning(rows, max_new_tokens=14, temperature=0.7, generator=gens, return_logprobs=True)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.response_mask, want.response_mask)
    assert len(set(got.response_mask.sum(1).tolist())) > 1  # rows stopped at different steps
    torch.testing.assert_close(lp, lp_want, rtol=0, atol=1e-6)
    logp, _ = reasoner.forward_context(got, 0.7)
    torch.testing.assert_close(lp, logp, rtol=0, atol=1e-5)


def test_the_static_cache_grows_by_chunks_and_keeps_what_it_holds():
    cache = transformers.DynamicCache()
    k = torch.randn(2, 3, 5, 4)
    cache.update(k, -k, 0)
    kv = hf_text.StaticKV(cache)
    assert kv.capacity == hf_text.CACHE_CHUNK and int(kv.at) == 5  # 5 written + room for the next token
    kv.reserve(hf_text.CACHE_CHUNK + 1)
    assert kv.capacity == 2 * hf_text.CACHE_CHUNK
    assert torch.equal(kv.keys[0][:, :, :5], k) and torch.equal(kv.values[0][:, :, :5], -k)
    assert not kv.keys[0][:, :, 5:].any()


def test_a_sliding_window_lm_is_refused_a_static_cache(reasoner):
    lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=len(reasoner.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=8,
        max_window_layers=1))
    with pytest.raises(ValueError, match="static_cache: the LM has .*sliding_attention"):
        CausalLMReasoner(lm, reasoner.tokenizer, static_cache=True)


@pytest.mark.slow  # compiling takes 20-40 s on this 2-core CPU
def test_the_compiled_static_step_samples_the_same_tokens(reasoner):
    """``compile``: the static step under ``torch.compile`` (inductor's CPU code) samples the eager
    static step's tokens with log-probs equal up to float rounding."""
    rows = reasoner.encode(PROMPTS)
    runs = [r.sample_reasoning(rows, max_new_tokens=6, generator=torch.Generator().manual_seed(5),
                               return_logprobs=True) for r in (static_twin(reasoner), static_twin(reasoner, compile=True))]
    (eager, lp_eager), (compiled, lp) = runs
    assert torch.equal(compiled.ids, eager.ids)
    torch.testing.assert_close(lp, lp_eager, rtol=0, atol=1e-5)
