"""Seeded multi-key needle generator: determinism, split disjointness, answerability, lengths."""
from __future__ import annotations

import re

import pytest

from opsdl_core.data.tasks.needle import (HELDOUT_KEYS, HELDOUT_TEMPLATES, TRAIN_KEYS, TRAIN_TEMPLATES,
                                          generate_examples, length_tolerance)
from opsdl_core.grading import answer_in_text, score_answer


def words(s: str) -> int:
    return len(s.split())


def regex_tokens(s: str) -> int:
    """Word/punctuation tokenizer: 'Harbor-17' is 3 tokens, '4821937.' is 2."""
    return len(re.findall(r"\w+|[^\w\s]", s))


def fragments(text: str) -> list[str]:
    parts = re.split(r"\{key\}|\{value\}", text)
    return [p.strip(" .,:?") for p in parts if len(p.strip(" .,:?").split()) >= 2]


def gen(split="train", n=12, target=512, seed=0, count=words, **kw):
    return generate_examples(n=n, split=split, target_tokens=target, count_tokens=count, seed=seed, **kw)


def test_same_seed_identical_different_seed_differs():
    a, b = gen(seed=7), gen(seed=7)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    c = gen(seed=8)
    assert all(x.long_context != y.long_context for x, y in zip(a, c))
    assert {x.answer for x in a} != {y.answer for y in c}
    assert len({e.id for e in a + c}) == len(a) + len(c)
    assert a[0].id != gen(seed=7, target=600)[0].id  # id depends on target_tokens too


def test_train_and_heldout_are_disjoint():
    train_names = {t.name for t in TRAIN_TEMPLATES}
    held_names = {t.name for t in HELDOUT_TEMPLATES}
    assert len(TRAIN_TEMPLATES) >= 6 and len(HELDOUT_TEMPLATES) >= 3
    assert not train_names & held_names
    assert not set(TRAIN_KEYS) & set(HELDOUT_KEYS)
    train_key_words = {w.lower() for k in TRAIN_KEYS for w in re.findall(r"[A-Za-z]+", k)}
    held_key_words = {w.lower() for k in HELDOUT_KEYS for w in re.findall(r"[A-Za-z]+", k)}
    assert not train_key_words & held_key_words

    train = gen("train", n=40, target=256)
    held = gen("heldout", n=20, target=256)
    assert {e.metadata["template"] for e in train} <= train_names
    assert {e.metadata["template"] for e in held} <= held_names
    assert all(e.metadata["key"] in TRAIN_KEYS for e in train)
    assert all(e.metadata["key"] in HELDOUT_KEYS for e in held)
    train_text = "\n".join(e.long_context + "\n" + e.question for e in train).lower()
    held_text = "\n".join(e.long_context + "\n" + e.question for e in held).lower()
    for e in held:
        assert e.question.lower() not in train_text
    for t in HELDOUT_TEMPLATES:  # fixed wording of every held-out template is absent from train data
        for frag in fragments(t.record) + fragments(t.question):
            assert frag.lower() not in train_text, (t.name, frag)
    for t in TRAIN_TEMPLATES:
        for frag in fragments(t.record) + fragments(t.question):
            assert frag.lower() not in held_text, (t.name, frag)
    # same (seed, i) in the two splits draws different streams
    assert all(x.answer != y.answer for x, y in zip(train, held))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_needle_is_the_only_evidence(split):
    for e in gen(split, n=25, target=400, seed=3):
        key = e.metadata["key"]
        assert e.short_context in e.long_context and e.long_context.count(e.short_context) == 1
        assert answer_in_text(e.answer, e.short_context)
        assert e.long_context.count(e.answer) == 1
        assert e.long_context.count(key) == 1 and key in e.short_context and key in e.question
        tpl = next(t for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES if t.name == e.metadata["template"])
        assert e.short_context == tpl.record.format(key=key, value=e.answer)
        assert e.question == tpl.question.format(key=key)
        # distractor records: same template, other keys and values
        frag = max(fragments(tpl.record), key=len)
        assert e.long_context.count(frag) == e.metadata["n_distractors"] + 1
        assert 4 <= e.metadata["n_distractors"] <= 12
        assert e.metadata["family"] == "kv_needle" and e.metadata["split"] == split


def test_lengths_hit_targets_with_few_token_counts():
    calls = 0

    def counting(s: str) -> int:
        nonlocal calls
        calls += 1
        return regex_tokens(s)

    for target in (256, 1024, 2048):
        calls = 0
        exs = gen(n=10, target=target, seed=11, count=counting)
        assert calls <= 10 * 8, (target, calls)
        for e in exs:
            n = regex_tokens(e.long_context)
            assert abs(n - target) <= length_tolerance(target), (target, n)
            assert e.metadata["actual_tokens"] == n and e.metadata["target_tokens"] == target
            assert words(e.short_context) < words(e.long_context) / 3


def test_depth_spread_and_distractor_counts():
    exs = gen(n=40, target=600, seed=5)
    depths = sorted(e.metadata["depth"] for e in exs)
    assert all(0.0 <= d <= 1.0 for d in depths)
    assert depths[0] < 0.2 and depths[-1] > 0.8
    assert sum(d < 0.5 for d in depths) >= 8 and sum(d >= 0.5 for d in depths) >= 8
    for e in exs:  # metadata depth matches where the needle really is
        pos = e.long_context.index(e.short_context) / (len(e.long_context) - len(e.short_context))
        assert abs(pos - e.metadata["depth"]) < 1e-3
    assert len({e.metadata["n_distractors"] for e in exs}) >= 3
    fixed = gen(n=5, target=600, n_distractors=6)
    assert {e.metadata["n_distractors"] for e in fixed} == {6}


def test_filler_is_varied():
    (e,) = gen(n=1, target=2048)
    sentences = [s for s in re.split(r"(?<=\.)\s+", e.long_context) if s]
    assert len(set(sentences)) > 0.9 * len(sentences)


def test_bad_arguments_and_too_small_target():
    with pytest.raises(ValueError, match="split"):
        gen(split="test")
    with pytest.raises(ValueError, match="n_distractors"):
        gen(n_distractors=(5, 2))
    with pytest.raises(ValueError, match="too small"):
        gen(n=1, target=20, n_distractors=8)


def test_answer_in_text_and_score_answer():
    assert answer_in_text("QX-4821", "The answer is qx-4821.")
    assert answer_in_text(" 4821937. ", "It is 4821937")
    assert answer_in_text("amber  falcon", "AMBER falcon!")
    assert not answer_in_text("4821", "48213")
    assert not answer_in_text("4821", "X4821")
    assert not answer_in_text("", "anything")
    assert not answer_in_text("...", "...")
    assert score_answer("4821937", "The code is 4821937.") == 1.0
    assert score_answer("4821937", "The code is 4821936.") == 0.0


def test_lengths_in_a_real_hf_fast_tokenizer():
    """Train a tiny byte-level BPE locally (no downloads) and hit targets in its tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [e.long_context for e in gen(n=3, target=800, seed=99)]
    corpus += ["The quick brown fox jumps over the lazy dog. 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ-:,.?!"] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)

    def count(s: str) -> int:
        return len(hf.encode(s, add_special_tokens=False))

    assert count("hello world") > 2  # a real subword tokenizer, not word counting
    for target, split in ((300, "train"), (1500, "heldout")):
        for e in gen(split, n=4, target=target, seed=1, count=count):
            assert abs(count(e.long_context) - target) <= length_tolerance(target), (target, count(e.long_context))
            assert e.metadata["actual_tokens"] == count(e.long_context)


def test_in_template_split_uses_training_templates_with_held_out_keys():
    count = lambda s: len(s.split())  # noqa: E731
    ex = generate_examples(n=6, split="heldout", templates=TRAIN_TEMPLATES, target_tokens=200,
                           count_tokens=count, seed=1_000_003, n_distractors=(2, 3))
    names = {t.name for t in TRAIN_TEMPLATES}
    assert all(e.metadata["template"] in names for e in ex)
    assert all(e.metadata["key"] in HELDOUT_KEYS for e in ex)
