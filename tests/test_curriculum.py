"""The built-in curriculum: split design, answerability from C_s, the mixture, and its wiring."""

import collections
import dataclasses
import re

import pytest

from opsdl_core.config import CURRICULUM_FAMILIES, ConfigError, DataConfig, RunConfig
from opsdl_core.data.examples import EVIDENCE_SEPARATOR, Example, locate_evidence
from opsdl_core.data.prepare import prompt_order
from opsdl_core.data.tasks import curriculum as cur


def count_words(text: str) -> int:  # a stand-in tokenizer: fast and deterministic
    return len(re.findall(r"\w+|[^\w\s]", text))


def gen(family, split="train", n=6, haystack="noise", target=400, **kw):
    return cur.generate_family(family, n=n, split=split, target_tokens=target, count_tokens=count_words, seed=3,
                               haystack=haystack, **kw)


def test_config_lists_every_family():
    assert list(CURRICULUM_FAMILIES) == cur.family_names()


@pytest.mark.parametrize("family", cur.family_names())
def test_train_and_heldout_templates_and_names_are_disjoint(family):
    fam = cur.FAMILIES[family]
    assert fam.train and fam.heldout
    assert not {t.name for t in fam.train} & {t.name for t in fam.heldout}
    assert not {t.question for t in fam.train} & {t.question for t in fam.heldout}
    train, held = gen(family, "train", n=8), gen(family, "heldout", n=8)
    assert {e.metadata["template"] for e in train} <= {t.name for t in fam.train}
    assert {e.metadata["template"] for e in held} <= {t.name for t in fam.heldout}
    # the names asked about never cross splits (keys are drawn from split-specific pools)
    train_words = {w for e in train for w in re.findall(r"[A-Z][a-z]+", e.metadata["key"])}
    held_words = {w for e in held for w in re.findall(r"[A-Z][a-z]+", e.metadata["key"])}
    assert not train_words & held_words, train_words & held_words
    assert not {e.content_hash() for e in train} & {e.content_hash() for e in held}


def test_a_family_left_out_never_appears_in_the_training_mixture():
    left_out = "record_lookup"
    mix = {f: 1.0 for f in cur.family_names() if f != left_out}
    exs = cur.generate_curriculum(n=24, split="train", families=mix, lengths=[300], count_tokens=count_words, seed=0)
    assert left_out not in {e.metadata["family"] for e in exs}
    assert {e.metadata["family"] for e in exs} == set(mix)
    cfg = DataConfig(source="curriculum", train_size=12, heldout_size=0, context_tokens=300,
                     curriculum={"families": {**mix, left_out: 0.0}})
    from opsdl_core.data.prepare import load_raw

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0] * count_words(text)}

    train, _, _ = load_raw(cfg, Tok())
    assert len(train) == 12 and left_out not in {e.metadata["family"] for e in train}


@pytest.mark.parametrize("haystack", cur.HAYSTACKS)
@pytest.mark.parametrize("family", cur.family_names())
def test_every_answer_is_recoverable_from_c_s_alone(family, haystack):
    for split in ("train", "heldout"):
        for ex in gen(family, split, n=5, haystack=haystack, target=500):
            assert cur.answer_from_short_context(ex) == ex.answer, ex.id
            assert locate_evidence(ex.short_context, ex.long_context) is not None
            assert len(ex.short_context) < len(ex.long_context) / 3
            assert abs(ex.metadata["actual_tokens"] - 500) <= 25
            if ex.metadata["n_evidence"] > 1:
                assert ex.short_context.count(EVIDENCE_SEPARATOR) == ex.metadata["n_evidence"] - 1


def test_the_checker_fails_when_c_s_does_not_determine_the_answer():
    ex = gen("comparison", n=1)[0]
    first, second = ex.short_context.split(EVIDENCE_SEPARATOR)
    assert cur.answer_from_short_context(dataclasses.replace(ex, short_context=first)) is None
    hop = gen("multi_hop", n=1)[0]
    link = hop.short_context.split(EVIDENCE_SEPARATOR)[0]
    assert cur.answer_from_short_context(dataclasses.replace(hop, short_context=link)) is None
    cnt = gen("counting", n=1)[0]
    fewer = EVIDENCE_SEPARATOR.join(cnt.short_context.split(EVIDENCE_SEPARATOR)[1:])
    assert cur.answer_from_short_context(dataclasses.replace(cnt, short_context=fewer)) == str(int(cnt.answer) - 1)
    look = gen("record_lookup", n=1)[0]
    other = dataclasses.replace(look, short_context=look.short_context.replace(look.answer, "Z-999"))
    assert cur.answer_from_short_context(other) != look.answer


@pytest.mark.parametrize("family", cur.family_names())
def test_wrong_answers_are_told_apart_by_whether_they_name_a_distractor(family):
    from opsdl_core.grading import error_kind, score_example

    ex = gen(family, "heldout", n=1, n_distractors=(2, 3))[0]
    other = ex.metadata["distractor_answers"][0]
    assert error_kind(ex, f"It is {ex.answer}.", bool(score_example(ex, f"It is {ex.answer}."))) is None
    assert not score_example(ex, f"It is {other}.") and error_kind(ex, f"It is {other}.", False) == "distractor"
    assert error_kind(ex, "It is nowhere to be found.", False) == "other"


def test_mixture_matches_its_weights_lengths_and_haystacks():
    weights = {"kv_lookup": 3.0, "counting": 1.0, "comparison": 0.0, "event_date": 2.0}
    assert cur.allocate(13, weights) == {"kv_lookup": 7, "counting": 2, "comparison": 0, "event_date": 4}
    for n in (0, 1, 7, 50):
        counts = cur.allocate(n, weights)
        assert sum(counts.values()) == n
        assert all(abs(counts[k] - n * w / 6.0) < 1 for k, w in weights.items())
    exs = cur.generate_curriculum(n=24, split="train", families=weights, lengths=[300, 600],
                                  haystacks={"noise": 1, "prose": 1}, count_tokens=count_words, seed=1)
    fam = collections.Counter(e.metadata["family"] for e in exs)
    assert fam == {"kv_lookup": 12, "event_date": 8, "counting": 4}
    for f, k in fam.items():
        mine = [e for e in exs if e.metadata["family"] == f]
        assert collections.Counter(e.metadata["target_tokens"] for e in mine) == {300: k // 2, 600: k // 2}
        assert collections.Counter(e.metadata["haystack"] for e in mine) == {"noise": k // 2, "prose": k // 2}
    assert len({e.id for e in exs}) == len(exs)
    again = cur.generate_curriculum(n=24, split="train", families=weights, lengths=[300, 600],
                                    haystacks={"noise": 1, "prose": 1}, count_tokens=count_words, seed=1)
    assert [e.content_hash() for e in again] == [e.content_hash() for e in exs]
    asc = cur.generate_curriculum(n=12, split="train", families=weights, lengths=[600, 300], length_order="ascending",
                                  count_tokens=count_words, seed=1)
    lengths = [e.metadata["target_tokens"] for e in asc]
    assert lengths == sorted(lengths) and len(set(lengths)) == 2


def test_prose_haystack_is_natural_text_with_its_source_and_licence():
    ex = gen("prose_attribute", haystack="prose", n=1, target=600)[0]
    meta = ex.metadata["haystack_source"]
    assert meta["name"] == "python-reference" and "Python Software Foundation License" in meta["licence"]
    from opsdl_core.data.tasks.prose import prose_source

    sentences = prose_source().sentences
    assert sum(s in ex.long_context for s in sentences[:]) >= 5


def test_oracle_teacher_context_locates_each_evidence_piece():
    from opsdl_core.data.short_context import oracle_context

    ex = gen("multi_hop", n=1, target=500)[0]
    ctx = oracle_context(ex, count_tokens=count_words, max_tokens=200)
    assert len(ctx.spans) == 2 and ctx.spans[0][1] < ctx.spans[1][0]
    assert ctx.text == ex.short_context
    swapped = EVIDENCE_SEPARATOR.join(reversed(ex.short_context.split(EVIDENCE_SEPARATOR)))
    with pytest.raises(ValueError, match="in that order"):
        oracle_context(Example(ex.id, ex.long_context, swapped, ex.question), count_tokens=count_words, max_tokens=200)


def test_curriculum_config_is_validated_and_keeps_old_hashes():
    with pytest.raises(ConfigError, match="data.curriculum.families"):
        DataConfig(source="curriculum", curriculum={"families": {"needle_in_space": 1.0}})
    with pytest.raises(ConfigError, match="data.curriculum.haystacks"):
        DataConfig(source="curriculum", curriculum={"haystacks": {"noise": 0.0}})
    assert DataConfig(source="curriculum").curriculum.active_families() == list(CURRICULUM_FAMILIES)
    plain = RunConfig()
    assert plain.data.curriculum is None and "curriculum" not in str(plain.hash())
    cur_cfg = RunConfig.from_dict({"data": {"source": "curriculum"}})
    assert cur_cfg.hash() != plain.hash()
    assert RunConfig.from_dict(cur_cfg.to_dict()).hash() == cur_cfg.hash()
    other = RunConfig.from_dict({"data": {"source": "curriculum", "curriculum": {"families": {"counting": 1.0}}}})
    assert other.hash() != cur_cfg.hash()


def test_training_distractors_are_set_apart_from_the_evaluation_ones():
    from opsdl_core.data.prepare import load_raw

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0] * count_words(text)}

    with pytest.raises(ConfigError, match="data.curriculum.distractors"):
        DataConfig(source="curriculum", curriculum={"distractors": [3, 1]})
    mix = {"kv_lookup": 1.0, "record_lookup": 1.0, "event_date": 1.0}
    cfg = DataConfig(source="curriculum", train_size=12, heldout_size=6, context_tokens=600, n_distractors=[6, 9],
                     curriculum={"families": mix, "haystacks": {"noise": 1.0}, "distractors": [1, 2]})
    train, held, _ = load_raw(cfg, Tok())
    assert {e.metadata["n_distractors"] for e in train} <= {1, 2}
    assert {e.metadata["n_distractors"] for e in held} <= set(range(6, 10)) and len(held) == 6
    base = RunConfig.from_dict({"data": {"source": "curriculum"}})
    easy = RunConfig.from_dict({"data": {"source": "curriculum", "curriculum": {"distractors": [1, 2]}}})
    assert easy.hash() != base.hash()


def test_sequential_prompt_order_follows_the_data():
    assert [prompt_order(5, 0, i, "sequential") for i in range(7)] == [0, 1, 2, 3, 4, 0, 1]
    assert sorted(prompt_order(5, 0, i) for i in range(5)) == [0, 1, 2, 3, 4]
