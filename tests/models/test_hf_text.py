"""The text phase of the HF adapter on a tiny random Qwen3 (built from config, tokenizer built in
code, nothing downloaded): seeded KV-cache sampling whose decode-time log-probs equal the
teacher-forced scores (the "ratio == 1" precondition), left / right padding that changes nothing,
the chat template, and teacher forcing of given responses."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from testkit import tiny_bpe_tokenizer

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
