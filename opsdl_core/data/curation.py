"""Prompt curation: load or generate examples, drop duplicates, drop anything that overlaps the
evaluation data, refuse contexts longer than the budget, bucket by token length, and keep every
row that was set aside with its reason.

Used by the pipeline's ``curated_prompts`` asset (no Dagster here) and, through
:func:`clean_examples`, by the trainer's own data path (``opsdl_core.data.prepare``): both
paths clean with the same function.

Duplicates: an example whose content hash (:meth:`Example.content_hash`: C_L, C_s, Q and the
answer, not the id) equals an earlier one's.

Decontamination: an example overlaps the reference (evaluation, held-out) data when its
content hash equals a reference example's, when its ``C_s + Q`` equals one's up to case and
whitespace (:func:`match_key`: NFKC, casefolded, every run of whitespace or invisible
characters as one space), or, with ``ngram``, when its ``C_s + Q`` shares a word
``n``-gram (default 8, after lower-casing and stripping punctuation) with a reference
example's ``C_s + Q``.  The evidence and the question are what a model could memorize; the
filler of ``C_L`` is not compared (synthetic filler repeats common phrases by design).

Length: a C_L longer than ``max_tokens`` is set aside; one of more than
:data:`MAX_CHARS_PER_TOKEN` characters per allowed token is refused on its character count,
without tokenizing it (no tokenizer packs that much text into one token on average).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from .examples import Example, RejectedRow, RowOrigin
from .seeds import stream_seed
from .sources import draw, needle_templates
from .tasks.needle import HELDOUT_TEMPLATES
from .text_rules import squash_invisible

__all__ = ["CurationResult", "CleanResult", "clean_examples", "curate", "eval_suites", "dataset_digest",
           "length_buckets", "ngrams", "match_key", "too_many_chars", "reject_example", "MAX_CHARS_PER_TOKEN"]

BUCKET_EDGES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
MAX_CHARS_PER_TOKEN = 32  # more characters than this per allowed token: too long, without tokenizing


def dataset_digest(examples: Iterable[Example]) -> str:
    """16-hex digest of an ordered list of examples (their content hashes and ids)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.id}:{ex.content_hash()}\n".encode())
    return h.hexdigest()[:16]


def length_bucket(n_tokens: int) -> str:
    lo = 0
    for edge in BUCKET_EDGES:
        if n_tokens <= edge:
            return f"{lo + 1}-{edge}"
        lo = edge
    return f">{BUCKET_EDGES[-1]}"


def length_buckets(lengths: Iterable[int]) -> dict[str, int]:
    """Histogram of token lengths over power-of-two buckets, in bucket order."""
    counts: dict[str, int] = {}
    for n in lengths:
        b = length_bucket(n)
        counts[b] = counts.get(b, 0) + 1
    order = [length_bucket(e) for e in BUCKET_EDGES] + [f">{BUCKET_EDGES[-1]}"]
    return {b: counts[b] for b in order if b in counts}


_WORD = re.compile(r"[a-z0-9]+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class CurationResult:
    examples: list[Example]
    quarantined: list[RejectedRow]
    n_loaded: int
    n_duplicates: int
    n_contaminated: int
    lengths: list[int] = field(default_factory=list)  # tokens of C_L, aligned with examples

    @property
    def digest(self) -> str:
        return dataset_digest(self.examples)

    @property
    def histogram(self) -> dict[str, int]:
        return length_buckets(self.lengths)

    def summary(self) -> dict[str, Any]:
        return {"n_examples": len(self.examples), "n_loaded": self.n_loaded, "n_duplicates": self.n_duplicates,
                "n_contaminated": self.n_contaminated, "n_quarantined": len(self.quarantined),
                "digest": self.digest, "length_histogram": self.histogram}


def eval_suites(*, count_tokens: Callable[[str], int], lengths: Sequence[int], n: int, seed: int,
                n_distractors: tuple[int, int] = (4, 12), in_template_n: int = 0,
                train_templates: Sequence[str] | None = None, families: Sequence[str] = (),
                heldout_families: Sequence[str] = (), haystack: str = "noise",
                foreign_n: int = 0) -> dict[str, list[Example]]:
    """The synthetic evaluation suites: held-out templates at each context length
    (``kv_heldout@{L}``) and, when ``in_template_n``, fresh keys of the training templates
    (``kv_in_template@{L}``).  Seeds are offset from training's, so the streams are disjoint.

    With curriculum ``families`` (trained) and ``heldout_families`` (never trained): one suite per
    family and length, ``in_family:{family}@{L}`` and ``out_of_family:{family}@{L}``, ``n``
    questions each, held-out names, every template of the family.

    ``foreign_n``: also ``foreign@0``, short-context questions in formats the training never uses
    (``opsdl_core.data.tasks.foreign``; asked with C_s only)."""
    out = _eval_suites(count_tokens=count_tokens, lengths=lengths, n=n, seed=seed, n_distractors=n_distractors,
                       in_template_n=in_template_n, train_templates=train_templates, families=families,
                       heldout_families=heldout_families, haystack=haystack)
    if foreign_n:
        from .tasks.foreign import generate_foreign

        out[FOREIGN_SUITE] = generate_foreign(foreign_n, seed=seed)
    return out


FOREIGN_SUITE = "foreign@0"  # its name among the evaluation suites (context length 0: C_s only)


def _eval_suites(*, count_tokens: Callable[[str], int], lengths: Sequence[int], n: int, seed: int,
                 n_distractors: tuple[int, int], in_template_n: int, train_templates: Sequence[str] | None,
                 families: Sequence[str], heldout_families: Sequence[str], haystack: str) -> dict[str, list[Example]]:
    if families or heldout_families:
        overlap = set(families) & set(heldout_families)
        if overlap:
            raise ValueError(f"families {sorted(overlap)} are both trained and held out; expected disjoint lists")
        out = {}
        for kind, fams in (("in_family", families), ("out_of_family", heldout_families)):
            for f in fams:
                for L in lengths:
                    out[f"{kind}:{f}@{L}"] = draw("curriculum", split="heldout", family=f, n=n, lengths=[L],
                                                  count_tokens=count_tokens, seed=stream_seed(seed, "heldout"),
                                                  haystack=haystack, n_distractors=n_distractors,
                                                  templates="all").examples
        return out
    streams = [("kv_heldout", n, HELDOUT_TEMPLATES, "train")]
    if in_template_n:
        streams.append(("kv_in_template", in_template_n, needle_templates(train_templates or None), "in_template"))
    out: dict[str, list[Example]] = {}
    for L in lengths:
        for name, count, tpl, stream in streams:
            out[f"{name}@{L}"] = draw("synthetic", split="heldout", n=count, templates=tpl, lengths=[L],
                                      count_tokens=count_tokens, seed=stream_seed(seed, stream),
                                      n_distractors=n_distractors).examples
    return out


def match_key(ex: Example) -> str:
    """``C_s + Q`` as compared up to case and whitespace: NFKC, casefolded, every run of
    whitespace or invisible characters one space."""
    text = unicodedata.normalize("NFKC", f"{ex.short_context}\n{ex.question}").casefold()
    return squash_invisible(text)


def reject_example(ex: Example, index: int, field_name: str, reason: str, *, source: str,
                   raw: dict | None = None) -> RejectedRow:
    """A :class:`RejectedRow` for ``ex`` at the row it was loaded from (its ``origin``); a
    generated example (no origin) at ``index`` of its list, under its own source or ``source``."""
    return RejectedRow.at(ex.origin or RowOrigin(ex.source or source, index), field_name, reason, raw)


def too_many_chars(ex: Example, max_tokens: int | None, limit: str = " tokens allowed") -> tuple[str, str] | None:
    """``(field, why)`` when the prompt text of ``ex`` (C_L + Q) has more than
    :data:`MAX_CHARS_PER_TOKEN` characters per token of ``max_tokens`` (``limit`` says whose
    limit that is), so cannot fit without being tokenized; ``None`` if it might fit."""
    n_chars = len(ex.long_context) + len(ex.question)
    if max_tokens is None or n_chars <= MAX_CHARS_PER_TOKEN * max_tokens:
        return None
    name = "question" if len(ex.question) > len(ex.long_context) else "long_context"
    return name, (f"C_L + Q has {n_chars} characters: more than {MAX_CHARS_PER_TOKEN} per token of the "
                  f"{max_tokens}{limit} (refused without tokenizing); expected at most {max_tokens} tokens")


@dataclass
class _Reference:
    """What the cleaned examples are compared with (:func:`clean_examples`)."""

    hashes: dict[str, str]
    keys: dict[str, str]
    grams: set[tuple[str, ...]]
    ngram: int | None

    @classmethod
    def of(cls, examples: Iterable[Example], ngram: int | None) -> "_Reference":
        ref = cls({}, {}, set(), ngram)
        for ex in examples:
            ref.hashes.setdefault(ex.content_hash(), ex.id)
            ref.keys.setdefault(match_key(ex), ex.id)
            if ngram:
                ref.grams |= ngrams(f"{ex.short_context} {ex.question}", ngram)
        return ref

    def overlap(self, ex: Example, h: str) -> str | None:
        """How ``ex`` (content hash ``h``) overlaps the reference, or ``None``."""
        if h in self.hashes:
            return f"identical content to {self.hashes[h]}"
        key = match_key(ex)
        if key in self.keys:
            return f"same C_s + Q as {self.keys[key]} up to case and whitespace"
        if self.grams and ngrams(f"{ex.short_context} {ex.question}", self.ngram) & self.grams:
            return f"a shared {self.ngram}-word n-gram of C_s + Q"
        return None


@dataclass
class CleanResult:
    """What :func:`clean_examples` kept and set aside, with the counts of duplicates and overlaps."""

    examples: list[Example]
    rejected: list[RejectedRow]
    n_duplicates: int = 0
    n_contaminated: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens of C_L, aligned with examples, when counted


def clean_examples(examples: Iterable[Example], *, reference: Iterable[Example] = (), ngram: int | None = 8,
                   count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None,
                   reference_name: str = "the evaluation data", source: str = "examples") -> CleanResult:
    """``examples`` without exact duplicates (after the first), without those overlapping
    ``reference`` (see the module docstring; ``ngram=None``: no n-gram test) and without those
    whose C_L is longer than ``max_tokens``: more than :data:`MAX_CHARS_PER_TOKEN` characters
    per token are refused uncounted; the rest is counted with ``count_tokens`` when given.
    Each one set aside is a :class:`RejectedRow` at its row (:func:`reject_example`)."""
    ref = _Reference.of(reference, ngram)
    out = CleanResult([], [])
    seen: dict[str, Example] = {}
    for i, ex in enumerate(examples):
        def set_aside(field_name: str, why: str) -> None:
            out.rejected.append(reject_example(ex, i, field_name, f"example {ex.id}: {why}", source=source,
                                               raw=ex.to_dict()))

        h = ex.content_hash()
        if h in seen:
            out.n_duplicates += 1
            first = seen[h]
            where = f" at {first.origin.where()}" if first.origin else ""
            set_aside("", f"duplicate of example {first.id}{where} (same content hash {h[:12]}); expected unique "
                          "examples")
            continue
        seen[h] = ex
        overlap = ref.overlap(ex, h)
        if overlap:
            out.n_contaminated += 1
            set_aside("short_context", f"overlaps {reference_name} ({overlap}); expected no overlap")
            continue
        too_long = too_many_chars(ex, max_tokens)
        n_tok = count_tokens(ex.long_context) if count_tokens is not None and too_long is None else None
        if n_tok is not None and max_tokens is not None and n_tok > max_tokens:
            too_long = "long_context", f"C_L has {n_tok} tokens; expected at most {max_tokens}"
        if too_long:
            set_aside(*too_long)
            continue
        out.examples.append(ex)
        if n_tok is not None:
            out.lengths.append(n_tok)
    return out


def curate(source: str, *, count_tokens: Callable[[str], int], size: int, context_tokens: int = 1024,
           seed: int = 0, templates: Sequence[str] | None = None, n_distractors: tuple[int, int] = (4, 12),
           eval_examples: Iterable[Example] = (), ngram: int = 8, max_tokens: int | None = None,
           field_map: dict[str, str] | None = None, curriculum: dict[str, Any] | None = None) -> CurationResult:
    """Training prompts from ``source`` ("synthetic", "curriculum" or a file/folder), cleaned.

    ``curriculum`` (source "curriculum"): keyword arguments of
    :func:`opsdl_core.data.tasks.curriculum.generate_curriculum` (``families``, ``haystacks``, ``lengths``,
    ``length_order``, ``prose``); lengths default to ``[context_tokens]``.

    Rows that cannot be used are returned in ``quarantined`` with the source, row (and line),
    field and reason: malformed rows (from the loader) and those :func:`clean_examples` sets
    aside: exact duplicates after the first, rows overlapping ``eval_examples``, and rows whose
    ``C_L`` exceeds ``max_tokens``.  At most ``size`` examples are kept (after cleaning, in
    source order)."""
    kw: dict[str, Any] = dict(lengths=[context_tokens])
    if source == "synthetic":
        kw["templates"] = needle_templates(templates or None)
    elif source == "curriculum":
        mix = dict(curriculum or {})
        kw = dict(lengths=mix.pop("lengths", None) or [context_tokens], curriculum=mix)
    res = draw(source, split="train", n=size, count_tokens=count_tokens, seed=seed, n_distractors=n_distractors,
               field_map=field_map, **kw)
    loaded, quarantined = list(res.examples), list(res.rejected)
    clean = clean_examples(loaded, reference=eval_examples, ngram=ngram, count_tokens=count_tokens,
                           max_tokens=max_tokens, source=source)
    return CurationResult(clean.examples[:size], quarantined + clean.rejected, len(loaded), clean.n_duplicates,
                          clean.n_contaminated, clean.lengths[:size])
