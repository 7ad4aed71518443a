"""Is an answer right, and how is it wrong: the one grader of the project.

Every suite (synthetic needles, curriculum families, foreign formats, self-instruct), the rollout
metrics of a training run and the lineage store's error kinds judge a generated answer here:
normalised containment of the reference (case, whitespace and edge punctuation ignored; never glued
to other letters or digits), no credit for also naming a distractor's value, and the example's own
rule where its metadata sets one (aliases, first mention among named options).
"""
from __future__ import annotations

import re
import string
from typing import Any, Iterable, Protocol

__all__ = ["answer_matches", "answer_in_text", "score_answer", "score_example", "ERROR_KINDS", "error_kind",
           "rollout_judgement"]

_EDGE = string.punctuation + string.whitespace


class Graded(Protocol):
    """What the grader reads of an example (``opsdl_core.data.examples.Example`` has both)."""

    answer: str | None
    metadata: dict[str, Any] | None


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def answer_matches(answer: str, text: str) -> list[re.Match[str]]:
    """Every occurrence of ``answer`` in ``text`` under :func:`answer_in_text`'s normalisation
    (positions are in the normalised text); none for an empty answer."""
    ans = _norm(answer).strip(_EDGE)
    if not ans:
        return []
    pattern = ("(?<!\\w)" if ans[0].isalnum() else "") + re.escape(ans) + ("(?!\\w)" if ans[-1].isalnum() else "")
    return list(re.finditer(pattern, _norm(text)))


def answer_in_text(answer: str, text: str) -> bool:
    """Normalised containment: case-insensitive, whitespace runs collapsed, punctuation and
    whitespace stripped from the ends of ``answer``; the match must not be glued to other
    letters/digits (``"4821"`` is *not* found in ``"48213"``).  An empty answer is never found."""
    return bool(answer_matches(answer, text))


def score_answer(answer: str, generated: str, wrong_answers: Iterable[str] = ()) -> float:
    """1.0 if the reference ``answer`` occurs in ``generated`` (see :func:`answer_in_text`) and none of
    ``wrong_answers`` (e.g. the distractors' values) does, else 0.0: listing every value in the context
    earns no credit."""
    if not answer_in_text(answer, generated):
        return 0.0
    return 0.0 if any(answer_in_text(w, generated) for w in wrong_answers) else 1.0


def _first_at(answer: str, text: str) -> int | None:
    found = answer_matches(answer, text)
    return found[0].start() if found else None


def score_example(example: Graded, generated: str) -> float:
    """Score ``generated`` against an example's reference, as its metadata asks:

    * default: :func:`score_answer` with ``distractor_answers`` as the wrong answers;
    * ``answer_aliases``: other spellings that count as the answer (``"twice"`` for ``"2"``);
    * ``scoring: "first_mention"`` (a choice between named options, e.g. which of two towers is
      taller): correct when the answer is named and named before every wrong option."""
    md = example.metadata or {}
    wrong = md.get("distractor_answers", ())
    if md.get("scoring") == "first_mention":
        at = _first_at(example.answer, generated)
        others = [x for x in (_first_at(w, generated) for w in wrong) if x is not None]
        return float(at is not None and all(at < x for x in others))
    for ans in (example.answer, *md.get("answer_aliases", ())):
        if score_answer(ans, generated, wrong):
            return 1.0
    return 0.0


ERROR_KINDS = ("distractor", "other")


def error_kind(example: Graded, generated: str, correct: bool) -> str | None:
    """How a wrong answer went wrong: ``"distractor"`` when it names one of the example's listed
    wrong answers (``distractor_answers``: another record's value, for a count the count one off,
    for a comparison the other option): the model found a fact, the wrong one; ``"other"`` when it
    names none of them (on lookups mostly a value found nowhere in the context); ``None`` when right."""
    if correct:
        return None
    wrong = (example.metadata or {}).get("distractor_answers", ())
    return "distractor" if any(answer_in_text(w, generated) for w in wrong) else "other"


def rollout_judgement(examples: list[Graded], texts: list[str]) -> dict[str, float]:
    """Of the sampled answers to examples with a reference: the share right (``rollout_accuracy``)
    and, where the examples list their distractors' values, the share naming one of them instead
    (``rollout_distractor_rate``): a run whose accuracy stays flat while this falls is trading
    wrong facts for invented ones, not learning where to look."""
    judged = [(e, t, bool(score_example(e, t))) for e, t in zip(examples, texts) if e.answer is not None]
    if not judged:
        return {}
    out = {"rollout_accuracy": sum(ok for _, _, ok in judged) / len(judged)}
    if any("distractor_answers" in (e.metadata or {}) for e, _, _ in judged):
        out["rollout_distractor_rate"] = sum(error_kind(e, t, ok) == "distractor" for e, t, ok in judged) / len(judged)
    return out
