import numpy as np
import torch

from unigrpo.world import WordTokenizer, build_world_tokenizer, wrong_reasoning
from unigrpo.world.knowledge import EDIT_WORDS, all_words
from unigrpo.world.tokenizer import SPECIALS


def test_special_ids_are_fixed_and_vocab_deterministic():
    tok = build_world_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.think_id, tok.end_think_id, tok.unk_id) == (
        0,
        1,
        2,
        3,
        4,
        5,
    )
    assert tok.vocab[:6] == list(SPECIALS)
    n = len(all_words())
    assert tok.vocab[6 : 6 + n] == sorted(tok.vocab[6 : 6 + n]) == all_words()
    assert tok.vocab[6 + n :] == list(EDIT_WORDS)  # appended: the original ids never move
    assert build_world_tokenizer().vocab == tok.vocab
    assert {".", ",", "<think>", "</think>"} <= set(tok.vocab)


def test_every_generated_text_encodes_without_unk(all_tasks):
    tok = build_world_tokenizer()
    rng = np.random.default_rng(0)
    texts = [x for t in all_tasks for x in (t.prompt, t.reasoning, t.description)]
    texts += [wrong_reasoning(t, rng)[0] for t in all_tasks if t.requires_reasoning]
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids, text
        assert tok.decode(ids) == text
    assert (
        max(len(tok.encode(t.prompt)) + len(tok.encode(t.reasoning)) for t in all_tasks) + 2 <= 64
    )


def test_encode_decode_options_and_unknown_words():
    tok = build_world_tokenizer()
    ids = tok.encode(
        "<think> a lemon is yellow . </think> a yellow square", add_bos=True, add_eos=True
    )
    assert ids[0] == tok.bos_id and ids[1] == tok.think_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special=True) == "a lemon is yellow . a yellow square"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.encode("a zebra") == [tok.index["a"], tok.unk_id]


def test_save_load_and_dict_round_trip(tmp_path):
    tok = build_world_tokenizer()
    tok.save(tmp_path / "tok.json")
    loaded = WordTokenizer.load(tmp_path / "tok.json")
    assert loaded.vocab == tok.vocab and loaded.vocab_size == tok.vocab_size
    assert WordTokenizer.from_dict(tok.to_dict()).vocab == tok.vocab


def test_max_prompt_tokens_bounds_every_generated_prompt(all_tasks):
    """``knowledge.MAX_PROMPT_TOKENS`` (what the tiny model's config check leaves room for) is the
    longest prompt of 9,000 generated tasks, <bos> included."""
    from unigrpo.world.knowledge import MAX_PROMPT_TOKENS

    tok = build_world_tokenizer()
    assert max(len(tok.encode(t.prompt, add_bos=True)) for t in all_tasks) == MAX_PROMPT_TOKENS
