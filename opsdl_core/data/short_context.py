"""Teacher contexts C_s: what the teacher sees instead of the long context C_L.

Three strategies, each returning a :class:`TeacherContext` whose text is made of spans
of ``C_L`` (so the teacher never sees text the student did not) and which has passed
:func:`check_teacher_context` before it is returned:

* ``oracle``: the example's ``short_context`` located in ``C_L`` (first occurrence), or its
  pieces joined by ``SEPARATOR`` located one after the other (evidence far apart);
* ``window``: the evidence plus surrounding text, grown the same number of characters on
  both sides and snapped inwards to sentence starts/ends (word boundaries where no sentence
  boundary is in reach) while it fits ``min(window_tokens, max_tokens)``; when one side
  reaches the document edge the other side keeps growing;
* ``bm25``: ``C_L`` cut into sentence-aligned chunks of about ``chunk_tokens`` tokens,
  ranked against the question with ``bm25s`` (lower-cased, English stop words removed, no
  stemming); the best ``top_k`` chunks with a positive score that fit ``max_tokens``
  are returned in document order (adjacent chunks merged into one span), joined by
  ``"\\n...\\n"``.  It does not use ``short_context``.

All failures raise :class:`TeacherContextError` (a ``ValueError``) naming the example id,
the check that failed and the token counts involved.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

from .examples import EVIDENCE_SEPARATOR, Example, locate_evidence

__all__ = [
    "TeacherContext",
    "TeacherContextError",
    "STRATEGIES",
    "SEPARATOR",
    "oracle_context",
    "evidence_spans",
    "window_context",
    "bm25_context",
    "build_teacher_context",
    "check_teacher_context",
    "stored_teacher_context",
    "teacher_context_record",
    "sentence_spans",
]

STRATEGIES = ("oracle", "window", "bm25")
SEPARATOR = EVIDENCE_SEPARATOR
CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class TeacherContext:
    """``text == separator.join(C_L[s:e] for s, e in spans)``; spans sorted, non-overlapping."""

    text: str
    spans: tuple[tuple[int, int], ...]
    n_tokens: int
    strategy: str
    separator: str = SEPARATOR


class TeacherContextError(ValueError):
    """A teacher context could not be built, or failed its checks."""


def check_teacher_context(ctx: TeacherContext, long_context: str, *, max_tokens: int, count_tokens: CountTokens) -> None:
    """Raise :class:`TeacherContextError` unless ``ctx`` is non-empty, its spans lie in
    ``long_context`` sorted and non-overlapping, its text equals the joined spans, its
    ``n_tokens`` equals ``count_tokens(text)`` and that is ``<= max_tokens``."""
    if not ctx.text.strip():
        raise TeacherContextError(f"{ctx.strategy}: empty teacher context; expected non-whitespace text")
    if not ctx.spans:
        raise TeacherContextError(f"{ctx.strategy}: no spans; expected at least one (start, end) span of C_L")
    prev_end = 0
    for k, (s, e) in enumerate(ctx.spans):
        if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(long_context)):
            raise TeacherContextError(f"{ctx.strategy}: span {k} ({s}, {e}) is not in C_L; "
                                      f"expected 0 <= start < end <= {len(long_context)}")
        if s < prev_end:
            raise TeacherContextError(f"{ctx.strategy}: span {k} ({s}, {e}) starts before the previous span ends "
                                      f"({prev_end}); expected sorted, non-overlapping spans")
        prev_end = e
    expected = ctx.separator.join(long_context[s:e] for s, e in ctx.spans)
    if ctx.text != expected:
        at = next((i for i, (a, b) in enumerate(zip(ctx.text, expected)) if a != b), min(len(ctx.text), len(expected)))
        raise TeacherContextError(f"{ctx.strategy}: text mismatch: text ({len(ctx.text)} chars) differs from the "
                                  f"joined C_L spans ({len(expected)} chars) at char {at}")
    n = count_tokens(ctx.text)
    if n != ctx.n_tokens:
        raise TeacherContextError(f"{ctx.strategy}: n_tokens={ctx.n_tokens} but count_tokens(text)={n}")
    if n > max_tokens:
        raise TeacherContextError(f"{ctx.strategy}: over budget: {n} tokens > max_tokens={max_tokens}")


def _checked(ctx: TeacherContext, ex: Example, max_tokens: int, count_tokens: CountTokens) -> TeacherContext:
    try:
        check_teacher_context(ctx, ex.long_context, max_tokens=max_tokens, count_tokens=count_tokens)
    except TeacherContextError as err:
        raise TeacherContextError(f"example {ex.id}: {err}") from None
    return ctx


def _locate_evidence(ex: Example, strategy: str) -> tuple[int, int]:
    start = ex.long_context.find(ex.short_context)
    if start < 0 or not ex.short_context:
        raise TeacherContextError(f"example {ex.id}: {strategy}: short_context ({len(ex.short_context)} chars) does "
                                  f"not occur in long_context ({len(ex.long_context)} chars); expected a verbatim substring")
    return start, start + len(ex.short_context)


def evidence_spans(ex: Example, strategy: str = "oracle") -> tuple[tuple[int, int], ...]:
    """Where ``short_context`` lies in ``long_context``: one span when it occurs verbatim; several
    when it is pieces of ``C_L`` joined by :data:`SEPARATOR` (evidence far apart: two facts to
    compare, the links of a chain), each piece found after the previous one."""
    spans = locate_evidence(ex.short_context, ex.long_context)
    if spans is None and SEPARATOR in ex.short_context:
        raise TeacherContextError(f"example {ex.id}: {strategy}: the {ex.short_context.count(SEPARATOR) + 1} "
                                  f"evidence pieces of short_context do not occur in long_context in that order; "
                                  f"expected pieces of C_L in document order joined by {SEPARATOR!r}")
    return spans if spans is not None else (_locate_evidence(ex, strategy),)


def oracle_context(ex: Example, *, count_tokens: CountTokens, max_tokens: int) -> TeacherContext:
    """The example's ``short_context``, located (first occurrence) in ``long_context``; several
    evidence pieces joined by :data:`SEPARATOR` are located one by one (:func:`evidence_spans`)."""
    spans = evidence_spans(ex, "oracle")
    n = count_tokens(ex.short_context)
    if n > max_tokens:
        raise TeacherContextError(f"example {ex.id}: oracle: short_context has {n} tokens > max_tokens={max_tokens}")
    return _checked(TeacherContext(ex.short_context, spans, n, "oracle"), ex, max_tokens, count_tokens)


# --------------------------------------------------------------------------- sentences
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"'\)\]]*(?=\s|$)|(?=\n)|$)", re.S)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Char spans of the sentences of ``text``: each ends after ``.``/``!``/``?`` (plus
    closing quotes/brackets) followed by whitespace, or at a line break, or at the end."""
    return [(m.start(), m.start() + len(m.group().rstrip())) for m in _SENTENCE.finditer(text)]


def window_context(ex: Example, *, count_tokens: CountTokens, max_tokens: int, window_tokens: int) -> TeacherContext:
    """Evidence plus surrounding text, grown symmetrically in characters and snapped to
    sentence (else word) boundaries, with at most ``min(window_tokens, max_tokens)`` tokens."""
    budget = min(window_tokens, max_tokens)
    text = ex.long_context
    s, e = _locate_evidence(ex, "window")
    n_ev = count_tokens(ex.short_context)
    if n_ev > budget:
        raise TeacherContextError(f"example {ex.id}: window: short_context has {n_ev} tokens > budget "
                                  f"min(window_tokens={window_tokens}, max_tokens={max_tokens})={budget}")
    sents = sentence_spans(text)
    sent_starts = [a for a, _ in sents]
    sent_ends = [b for _, b in sents]
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    word_starts = [a for a, _ in words]
    word_ends = [b for _, b in words]

    def snap_left(x: int) -> int:  # leftmost boundary in [x, s]: sentence start, else word start, else s
        for starts in (sent_starts, word_starts):
            i = bisect.bisect_left(starts, x)
            if i < len(starts) and starts[i] <= s:
                return starts[i]
        return s

    def snap_right(y: int) -> int:  # rightmost boundary in [e, y]: sentence end, else word end, else e
        for ends in (sent_ends, word_ends):
            i = bisect.bisect_right(ends, y) - 1
            if i >= 0 and ends[i] >= e:
                return ends[i]
        return e

    cache: dict[tuple[int, int], int] = {(s, e): n_ev}

    def measure(r: int) -> tuple[int, int, int]:
        span = (snap_left(max(0, s - r)), snap_right(min(len(text), e + r)))
        if span not in cache:
            cache[span] = count_tokens(text[span[0]:span[1]])
        return span[0], span[1], cache[span]

    full = max(s, len(text) - e)
    best = (s, e, n_ev)
    lo, hi = 0, None  # lo fits; hi (if known) does not
    r = max(1, int((budget - n_ev) * len(ex.short_context) / max(n_ev, 1) / 2))
    while hi is None:  # gallop
        cand = measure(min(r, full))
        if cand[2] <= budget:
            lo, best = min(r, full), cand
            if r >= full:
                break
            r *= 2
        else:
            hi = r
    while hi is not None and hi - lo > 1:  # bisect on the radius in characters
        mid = (lo + hi) // 2
        cand = measure(mid)
        if cand[2] <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    a, b, n = best
    return _checked(TeacherContext(text[a:b], ((a, b),), n, "window"), ex, budget, count_tokens)


# --------------------------------------------------------------------------- bm25
def _chunks(text: str, count_tokens: CountTokens, chunk_tokens: int) -> list[tuple[int, int]]:
    """Sentence-aligned chunks of about ``chunk_tokens`` tokens (chars-per-token estimated once)."""
    sample = text[:20000]
    chars_per_token = len(sample) / max(1, count_tokens(sample))
    limit = chunk_tokens * chars_per_token
    chunks: list[tuple[int, int]] = []
    for a, b in sentence_spans(text):
        if chunks and b - chunks[-1][0] <= limit:
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return chunks


def _merge_adjacent(indices: list[int], chunks: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    spans: list[tuple[int, int]] = []
    prev = None
    for i in sorted(indices):
        if prev is not None and i == prev + 1:
            spans[-1] = (spans[-1][0], chunks[i][1])
        else:
            spans.append(chunks[i])
        prev = i
    return tuple(spans)


def bm25_context(ex: Example, *, count_tokens: CountTokens, max_tokens: int, chunk_tokens: int = 64,
                 top_k: int = 3) -> TeacherContext:
    """Best ``top_k`` BM25 chunks of ``C_L`` for the question that fit ``max_tokens``, in
    document order, joined by :data:`SEPARATOR`."""
    import bm25s

    if chunk_tokens <= 0 or top_k <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}, top_k={top_k}: expected both > 0")
    text = ex.long_context
    chunks = _chunks(text, count_tokens, chunk_tokens)
    if not chunks:
        raise TeacherContextError(f"example {ex.id}: bm25: long_context has no text to chunk")
    corpus = bm25s.tokenize([text[a:b] for a, b in chunks], stopwords="en", return_ids=False, show_progress=False)
    query = bm25s.tokenize(ex.question, stopwords="en", return_ids=False, show_progress=False)[0]
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    query = [t for t in query if t in retriever.vocab_dict]
    if not query:
        raise TeacherContextError(f"example {ex.id}: bm25: no term of the question occurs in long_context "
                                  f"({len(chunks)} chunks); expected at least one shared term")
    scores = retriever.get_scores(query)
    ranked = sorted(range(len(chunks)), key=lambda i: (-float(scores[i]), i))
    chosen: list[int] = []
    n_chosen = 0
    for i in ranked[: 4 * top_k + 8]:  # bounded number of count_tokens calls
        if scores[i] <= 0 or len(chosen) == top_k:
            break
        spans = _merge_adjacent(chosen + [i], chunks)
        n = count_tokens(SEPARATOR.join(text[a:b] for a, b in spans))
        if n <= max_tokens:
            chosen.append(i)
            n_chosen = n
    if not chosen:
        best = chunks[ranked[0]]
        raise TeacherContextError(f"example {ex.id}: bm25: no positively scored chunk fits max_tokens={max_tokens} "
                                  f"(best chunk has {count_tokens(text[best[0]:best[1]])} tokens)")
    spans = _merge_adjacent(chosen, chunks)
    ctx = TeacherContext(SEPARATOR.join(text[a:b] for a, b in spans), spans, n_chosen, "bm25")
    return _checked(ctx, ex, max_tokens, count_tokens)


STORED_KEY = "teacher_context"  # where a row carries its C_s once built (the teacher_contexts asset writes it)


def teacher_context_record(ctx: TeacherContext, budget: int, params: dict | None = None) -> dict:
    """``ctx`` as a row stores it under ``metadata["teacher_context"]``: with the budget it was built
    for and the strategy's other settings (``params``: window_tokens, bm25_chunk_tokens, bm25_top_k)."""
    return {"text": ctx.text, "spans": [list(x) for x in ctx.spans], "n_tokens": ctx.n_tokens,
            "strategy": ctx.strategy, "separator": ctx.separator, "budget": budget, "params": dict(params or {})}


def stored_teacher_context(ex: Example) -> tuple[TeacherContext, dict] | None:
    """The C_s stored in the row (``metadata["teacher_context"]``) and the record it came from (its
    ``budget`` and ``params``); ``None`` when the row carries none. Not checked against C_L here
    (:func:`check_teacher_context` does that).

    Raises:
        TeacherContextError: the stored record is malformed, naming the field and what was expected.
    """
    rec = (ex.metadata or {}).get(STORED_KEY)
    if rec is None:
        return None
    where = f"example {ex.id}: metadata.{STORED_KEY}"
    if not isinstance(rec, dict):
        raise TeacherContextError(f"{where}: expected an object with text, spans, n_tokens, strategy, budget")
    want = {"text": str, "spans": list, "n_tokens": int, "strategy": str, "budget": int}
    for key, kind in want.items():
        if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
            raise TeacherContextError(f"{where}.{key}: expected {kind.__name__}, got {rec.get(key)!r:.60}")
    spans = rec["spans"]
    if not all(isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in x) for x in spans):
        raise TeacherContextError(f"{where}.spans: expected a list of [start, end] integer pairs")
    sep = rec.get("separator", SEPARATOR)
    if not isinstance(sep, str):
        raise TeacherContextError(f"{where}.separator: expected a string, got {sep!r:.60}")
    if not isinstance(rec.get("params", {}), dict):
        raise TeacherContextError(f"{where}.params: expected an object, got {rec.get('params')!r:.60}")
    ctx = TeacherContext(rec["text"], tuple((int(a), int(b)) for a, b in spans), rec["n_tokens"], rec["strategy"], sep)
    return ctx, rec


def build_teacher_context(ex: Example, strategy: str, *, count_tokens: CountTokens, max_tokens: int,
                          window_tokens: int = 256, chunk_tokens: int = 64, top_k: int = 3) -> TeacherContext:
    """Dispatch to the builder named by ``strategy`` (one of :data:`STRATEGIES`)."""
    if strategy == "oracle":
        return oracle_context(ex, count_tokens=count_tokens, max_tokens=max_tokens)
    if strategy == "window":
        return window_context(ex, count_tokens=count_tokens, max_tokens=max_tokens, window_tokens=window_tokens)
    if strategy == "bm25":
        return bm25_context(ex, count_tokens=count_tokens, max_tokens=max_tokens, chunk_tokens=chunk_tokens,
                            top_k=top_k)
    raise ValueError(f"unknown teacher-context strategy {strategy!r}; expected one of {STRATEGIES}")
