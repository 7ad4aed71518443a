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


def test_training_reads_the_stored_c_s_and_sets_aside_a_damaged_one(tiny_model_and_tokenizer, tmp_path):
    """One data path: a row carrying the C_s built upstream (the teacher_contexts asset's output) trains
    on that C_s, not on one rebuilt from config; built with other settings it is built again; a stored
    C_s that is not made of its C_L's spans, over budget, or malformed sets the row aside naming
    metadata.teacher_context."""
    import copy
    from dataclasses import replace

    from opsdl_core.config import DataConfig
    from opsdl_core.data.writers import write_jsonl
    from opsdl_core.data.prepare import prepare_data, prepare_examples, teacher_context_params
    from opsdl_core.data.short_context import teacher_context_record

    _, tok = tiny_model_and_tokenizer
    cfg = DataConfig(teacher_context="oracle", short_budget_tokens=256)
    exs = generate_examples(n=4, split="train", target_tokens=400, count_tokens=lambda s: len(tok.encode(s)), seed=3)
    built, bad = prepare_examples(exs, tok, cfg)
    assert len(built) == 4 and not bad
    # store, for row 0, a C_s the oracle would never pick: the first sentence of its C_L
    ex0 = exs[0]
    end = ex0.long_context.index(".") + 1
    other = TeacherContext(ex0.long_context[:end], ((0, end),), len(tok.encode(ex0.long_context[:end])), "oracle")
    assert other.text != built[0].teacher_context.text
    rows = [replace(p.example, metadata={**p.example.metadata, "teacher_context": teacher_context_record(
        other if i == 0 else p.teacher_context, 256, teacher_context_params(cfg))}) for i, p in enumerate(built)]
    path = write_jsonl(rows, tmp_path / "teacher.jsonl")
    data = prepare_data(replace(cfg, source=str(path), train_size=4, heldout_size=0), tok)
    got = {p.example.id: p for p in data.train}
    assert got[ex0.id].teacher_context.text == other.text  # the stored one
    assert got[ex0.id].teacher_ids == prepare_examples([rows[0]], tok, cfg)[0][0].teacher_ids
    # other settings (budget) than the stored C_s was built with: built again
    again, _ = prepare_examples([rows[0]], tok, replace(cfg, short_budget_tokens=200))
    assert again[0].teacher_context.text == built[0].teacher_context.text
    # damaged: text not its spans, over budget, malformed spans
    damaged = []
    for change in ({"text": other.text + " extra"}, {"n_tokens": 999}, {"spans": [[0, "x"]]}, {"budget": "256"}):
        r = copy.deepcopy(rows[0])
        r.metadata["teacher_context"].update(change)
        damaged.append(r)
    good, bad = prepare_examples(damaged, tok, cfg)
    assert not good and [b.field for b in bad] == ["metadata.teacher_context"] * 4
    assert [b.row for b in bad] == [0, 1, 2, 3] and all(ex0.id in b.reason for b in bad)
    assert "text mismatch" in bad[0].reason and "n_tokens" in bad[1].reason and "spans" in bad[2].reason
    assert "budget" in bad[3].reason
