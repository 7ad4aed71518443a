"""The foreign-format retention suite: deterministic, every format, short, graded strictly, and
sharing no wording with what the training uses."""

from __future__ import annotations

import re

import pytest

from opsdl_core.data.tasks.families import FAMILIES
from opsdl_core.data.tasks.foreign import FOREIGN_FORMATS, generate_foreign
from opsdl_core.data.tasks.needle import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
from opsdl_core.grading import score_example


def test_every_format_in_turn_deterministic_and_distinct():
    a = generate_foreign(70, seed=3)
    assert a == generate_foreign(70, seed=3) and a != generate_foreign(70, seed=4)
    assert [e.metadata["format"] for e in a[:7]] == list(FOREIGN_FORMATS)
    assert len({e.id for e in a}) == 70 and len({(e.short_context, e.question) for e in a}) >= 60
    for e in a:
        assert e.long_context == e.short_context and e.answer and e.answer in e.short_context or \
            e.metadata["format"] == "sentiment"
    assert [e.metadata["format"] for e in generate_foreign(4, formats=["sentiment", "race_winner"])] == [
        "sentiment", "race_winner"] * 2
    with pytest.raises(ValueError, match="unknown"):
        generate_foreign(3, formats=["access_code"])


def test_the_reference_answer_scores_and_the_training_shape_does_not():
    for e in generate_foreign(140, seed=0):
        assert score_example(e, e.answer) == 1.0
        assert score_example(e, f"The answer is {e.answer}.") == 1.0
        assert score_example(e, "The access code is 4821.") == 0.0  # the damage seen: the training's shape
        for w in e.metadata["distractor_answers"]:  # naming the other candidate, or both, earns nothing
            assert score_example(e, w) == 0.0 and score_example(e, f"{e.answer} or {w}") == 0.0


def test_short_enough_for_the_c_s_budget():
    from opsdl_core.models.tiny import build_tiny_model

    _, tok = build_tiny_model(seed=0)
    for e in generate_foreign(140, seed=0):
        assert len(tok(e.short_context + " " + e.question)["input_ids"]) < 128


_STOP = {"what", "which", "when", "does", "from", "with", "that", "this", "only", "have", "many", "there"}


def _words(text: str) -> set[str]:
    text = re.sub(r"\{.*?\}", " ", text)  # template slots are not words
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3 and w not in _STOP}


def test_no_wording_shared_with_the_training_templates_or_families():
    used = set()
    for t in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES):
        used |= _words(t.record) | _words(t.question)
    for fam in FAMILIES.values():
        for t in (*fam.train, *fam.heldout):
            used |= _words(" ".join(t.records)) | _words(t.question)
    for e in generate_foreign(70, seed=0):
        # content words: no question borrows the training's (code, number, record, room, town...)
        assert not _words(e.question) & used, (e.question, _words(e.question) & used)
