"""Prompt curation: load or generate examples, drop duplicates, drop anything that overlaps the
evaluation data, bucket by token length, and keep every row that was set aside with its reason.

Used by the pipeline's ``curated_prompts`` asset; no Dagster here.

Decontamination: an example overlaps the evaluation data when its content hash equals an
evaluation example's, or when its ``C_s + Q`` shares a word ``n``-gram (default 8, after
lower-casing and stripping punctuation) with an evaluation example's ``C_s + Q``.  The
evidence and the question are what a model could memorize; the filler of ``C_L`` is not
compared (synthetic filler repeats common phrases by design).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from .examples import Example, RejectedRow, load_examples
from .tasks.needle import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, generate_examples

__all__ = ["CurationResult", "curate", "eval_suites", "dataset_digest", "length_buckets", "ngrams"]

BUCKET_EDGES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


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


def _templates(names: Sequence[str] | None) -> tuple:
    if not names:
        return TRAIN_TEMPLATES
    known = {t.name: t for t in TRAIN_TEMPLATES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown training template(s) {unknown}; expected names among {list(known)}")
    return tuple(known[n] for n in dict.fromkeys(names))


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
        from .tasks.curriculum import generate_family

        overlap = set(families) & set(heldout_families)
        if overlap:
            raise ValueError(f"families {sorted(overlap)} are both trained and held out; expected disjoint lists")
        out = {}
        for kind, fams in (("in_family", families), ("out_of_family", heldout_families)):
            for f in fams:
                for L in lengths:
                    out[f"{kind}:{f}@{L}"] = generate_family(f, n=n, split="heldout", target_tokens=L,
                                                             count_tokens=count_tokens, seed=seed + 7_000_003,
                                                             haystack=haystack, n_distractors=n_distractors,
                                                             templates="all")
        return out
    tpl = _templates(train_templates)
    out: dict[str, list[Example]] = {}
    for L in lengths:
        out[f"kv_heldout@{L}"] = generate_examples(n=n, split="heldout", templates=HELDOUT_TEMPLATES,
                                                   target_tokens=L, count_tokens=count_tokens, seed=seed,
                                                   n_distractors=n_distractors)
        if in_template_n:
            out[f"kv_in_template@{L}"] = generate_examples(n=in_template_n, split="heldout", templates=tpl,
                                                           target_tokens=L, count_tokens=count_tokens,
                                                           seed=seed + 1_000_003, n_distractors=n_distractors)
    return out


def curate(source: str, *, count_tokens: Callable[[str], int], size: int, context_tokens: int = 1024,
           seed: int = 0, templates: Sequence[str] | None = None, n_distractors: tuple[int, int] = (4, 12),
           eval_examples: Iterable[Example] = (), ngram: int = 8, max_tokens: int | None = None,
           field_map: dict[str, str] | None = None, curriculum: dict[str, Any] | None = None) -> CurationResult:
    """Training prompts from ``source`` ("synthetic", "curriculum" or a file/folder), cleaned.

    ``curriculum`` (source "curriculum"): keyword arguments of
    :func:`opsdl_core.data.tasks.curriculum.generate_curriculum` (``families``, ``haystacks``, ``lengths``,
    ``length_order``, ``prose``); lengths default to ``[context_tokens]``.

    Rows that cannot be used are returned in ``quarantined`` with the source, row, field and
    reason: malformed rows (from the loader), exact duplicates (by content hash) after the
    first, rows overlapping the evaluation data, and rows whose ``C_L`` exceeds ``max_tokens``.
    At most ``size`` examples are kept (after cleaning, in source order)."""
    quarantined: list[RejectedRow] = []
    if source == "curriculum":
        from .tasks.curriculum import generate_curriculum

        kw = dict(curriculum or {})
        kw["lengths"] = kw.get("lengths") or [context_tokens]
        loaded = generate_curriculum(n=size, split="train", count_tokens=count_tokens, seed=seed,
                                     n_distractors=n_distractors, **kw)
    elif source == "synthetic":
        tpl = _templates(templates)
        loaded = generate_examples(n=size, split="train", templates=tpl, target_tokens=context_tokens,
                                   count_tokens=count_tokens, seed=seed, n_distractors=n_distractors)
    else:
        res = load_examples(source, field_map=field_map)
        loaded, quarantined = list(res.examples), list(res.rejected)
    eval_hashes: set[str] = set()
    eval_grams: set[tuple[str, ...]] = set()
    for ex in eval_examples:
        eval_hashes.add(ex.content_hash())
        eval_grams |= ngrams(f"{ex.short_context} {ex.question}", ngram)
    kept: list[Example] = []
    lengths: list[int] = []
    seen: dict[str, str] = {}
    n_dup = n_cont = 0
    for i, ex in enumerate(loaded):
        h = ex.content_hash()
        src = ex.source or source
        row = int(ex.metadata.get("row", i)) if isinstance(ex.metadata.get("row"), int) else i
        if h in seen:
            n_dup += 1
            quarantined.append(RejectedRow(src, row, "", f"duplicate of example {seen[h]} (same content hash "
                                           f"{h[:12]}); expected unique examples", ex.to_dict()))
            continue
        seen[h] = ex.id
        if h in eval_hashes or (eval_grams and ngrams(f"{ex.short_context} {ex.question}", ngram) & eval_grams):
            n_cont += 1
            quarantined.append(RejectedRow(src, row, "short_context", f"example {ex.id} overlaps the evaluation "
                                           f"data (shared {ngram}-word n-gram of C_s + Q or identical content); "
                                           "expected no overlap", ex.to_dict()))
            continue
        n_tok = count_tokens(ex.long_context)
        if max_tokens is not None and n_tok > max_tokens:
            quarantined.append(RejectedRow(src, row, "long_context", f"example {ex.id}: C_L has {n_tok} tokens; "
                                           f"expected at most {max_tokens}", ex.to_dict()))
            continue
        if len(kept) < size:
            kept.append(ex)
            lengths.append(n_tok)
    return CurationResult(kept, quarantined, len(loaded), n_dup, n_cont, lengths)
