"""Teacher-context builders: spans come from C_L, budgets hold, failures name what failed."""
from __future__ import annotations

import pytest

from opsdl_core.data.examples import Example
from opsdl_core.data.short_context import (SEPARATOR, STRATEGIES, TeacherContext, TeacherContextError, bm25_context,
                                           build_teacher_context, check_teacher_context, oracle_context, sentence_spans,
                                           window_context)
from opsdl_core.data.tasks.needle import generate_examples


def words(s: str) -> int:
    return len(s.split())


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return (generate_examples(n=15, split="train", target_tokens=1024, count_tokens=words, seed=21)
            + generate_examples(n=5, split="heldout", target_tokens=1024, count_tokens=words, seed=21))


def assert_well_formed(ctx: TeacherContext, ex: Example, budget: int) -> None:
    assert ctx.text.strip() and ctx.n_tokens == words(ctx.text) <= budget
    assert ctx.text == ctx.separator.join(ex.long_context[s:e] for s, e in ctx.spans)
    ends = [e for _, e in ctx.spans]
    starts = [s for s, _ in ctx.spans]
    assert all(0 <= s < e <= len(ex.long_context) for s, e in ctx.spans)
    assert all(a <= b for a, b in zip(ends, starts[1:]))
    check_teacher_context(ctx, ex.long_context, max_tokens=budget, count_tokens=words)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_spans_of_c_l_within_budget(strategy, examples):
    budget = 200
    for ex in examples:
        ctx = build_teacher_context(ex, strategy, count_tokens=words, max_tokens=budget, window_tokens=120)
        assert ctx.strategy == strategy
        assert_well_formed(ctx, ex, budget)


def test_oracle_is_exactly_the_short_context(examples):
    for ex in examples:
        ctx = oracle_context(ex, count_tokens=words, max_tokens=100)
        assert ctx.text == ex.short_context
        (span,) = ctx.spans
        assert ex.long_context[span[0]:span[1]] == ex.short_context


def test_window_contains_evidence_longer_than_oracle_within_window(examples):
    for ex in examples:
        oracle = oracle_context(ex, count_tokens=words, max_tokens=1000)
        win = window_context(ex, count_tokens=words, max_tokens=1000, window_tokens=150)
        assert ex.short_context in win.text
        assert oracle.n_tokens < win.n_tokens <= 150
        assert win.n_tokens >= 150 - 40  # grew close to the budget (whole sentences)
        (s, e) = win.spans[0]
        o = oracle.spans[0]
        assert s <= o[0] and e >= o[1]
        assert s == 0 or ex.long_context[s - 1].isspace()  # starts at a boundary
        assert win.text.rstrip()[-1] == "."  # ends at a sentence end
        # the budget is min(window_tokens, max_tokens)
        small = window_context(ex, count_tokens=words, max_tokens=60, window_tokens=150)
        assert small.n_tokens <= 60 and ex.short_context in small.text


def test_window_is_roughly_symmetric_and_handles_the_document_edge():
    sents = [f"Sentence number {w} is here." for w in ("one", "two", "three", "four", "five", "six", "seven")]
    ctx_text = " ".join(sents)
    mid = Example("mid", ctx_text, sents[3], "Which sentence?")
    win = window_context(mid, count_tokens=words, max_tokens=100, window_tokens=15)
    assert win.text == " ".join(sents[2:5])
    edge = Example("edge", ctx_text, sents[0], "Which sentence?")
    win = window_context(edge, count_tokens=words, max_tokens=100, window_tokens=15)
    assert win.text == " ".join(sents[:3])  # the right side keeps growing at the left edge


def test_bm25_ranks_the_needle_chunk_into_its_result(examples):
    for ex in examples:
        ctx = bm25_context(ex, count_tokens=words, max_tokens=300, chunk_tokens=64, top_k=3)
        assert ex.short_context in ctx.text, ex.id
        assert len(ctx.spans) in (1, 2, 3) and ctx.n_tokens <= 300
        assert all(SEPARATOR not in ex.long_context[s:e] for s, e in ctx.spans)
        assert ctx.text.count(SEPARATOR) == len(ctx.spans) - 1


def test_bm25_respects_a_tight_budget_and_needs_shared_terms(examples):
    ex = examples[0]
    ctx = bm25_context(ex, count_tokens=words, max_tokens=80, chunk_tokens=64, top_k=3)
    assert ctx.n_tokens <= 80 and len(ctx.spans) == 1
    nothing = Example("x1", "Rain fell on the hills. Birds sang.", "Birds sang.", "Quantum chromodynamics?")
    with pytest.raises(TeacherContextError, match="x1.*no term of the question"):
        bm25_context(nothing, count_tokens=words, max_tokens=50)


def test_oracle_raises_when_evidence_not_in_context():
    ex = Example("ex-missing", "Alpha beta gamma. Delta epsilon.", "Zeta eta.", "What?")
    with pytest.raises(TeacherContextError, match="ex-missing.*does not occur"):
        oracle_context(ex, count_tokens=words, max_tokens=100)
    with pytest.raises(TeacherContextError, match="ex-missing"):
        window_context(ex, count_tokens=words, max_tokens=100, window_tokens=50)


def test_over_budget_raises_naming_the_counts(examples):
    ex = examples[0]
    n = words(ex.short_context)
    with pytest.raises(TeacherContextError, match=rf"{ex.id}.*{n} tokens > max_tokens=3"):
        oracle_context(ex, count_tokens=words, max_tokens=3)
    with pytest.raises(TeacherContextError, match=rf"{ex.id}.*{n} tokens > budget.*=3"):
        window_context(ex, count_tokens=words, max_tokens=100, window_tokens=3)
    with pytest.raises(TeacherContextError, match="no positively scored chunk fits max_tokens=3"):
        bm25_context(ex, count_tokens=words, max_tokens=3)


def test_check_teacher_context_names_each_failure():
    long = "One two three. Four five six. Seven eight nine."
    ok = TeacherContext("Four five six.", ((15, 29),), 3, "oracle")
    check_teacher_context(ok, long, max_tokens=3, count_tokens=words)
    cases = [
        (TeacherContext("   ", ((0, 3),), 0, "t"), "empty"),
        (TeacherContext("x", (), 1, "t"), "no spans"),
        (TeacherContext("x", ((40, 99),), 1, "t"), "not in C_L"),
        (TeacherContext("Four five six.\n...\nOne", ((15, 29), (0, 3)), 4, "t"), "starts before"),
        (TeacherContext("Four five SIX.", ((15, 29),), 3, "t"), "text mismatch"),
        (TeacherContext("Four five six.", ((15, 29),), 2, "t"), "n_tokens=2 but count_tokens"),
        (ok, "over budget: 3 tokens > max_tokens=2"),
    ]
    for ctx, msg in cases:
        budget = 2 if ctx is ok else 10
        with pytest.raises(TeacherContextError, match=msg):
            check_teacher_context(ctx, long, max_tokens=budget, count_tokens=words)


def test_unknown_strategy_and_sentence_spans():
    ex = Example("e", "A b. C d.", "C d.", "Q?")
    with pytest.raises(ValueError, match="unknown teacher-context strategy 'nope'"):
        build_teacher_context(ex, "nope", count_tokens=words, max_tokens=10)
    text = "First one. Second (quoted!)\n\nThird line\nlast"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["First one.", "Second (quoted!)", "Third line", "last"]
