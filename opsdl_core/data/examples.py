"""Loading and validating (long context, short context, question) triples.

One row becomes one :class:`Example`; a row that cannot become one becomes a
:class:`RejectedRow` that names the source, the row, the offending field and what was
expected.  Loading never raises on a bad row (nor on a file that cannot be read past some
row: the rest of it is one rejected row); it raises only when the *path* itself is unusable
(missing, unknown format).

Where a row is (:class:`RowOrigin`, carried by every :class:`Example` loaded from a file and
by every :class:`RejectedRow`): ``source`` is the file (or split folder); ``row`` is the
0-based position of the row in it: for JSON lines its physical line index, for a JSON array
file its element index, for Parquet and datasets its row index; ``line`` is the 1-based
physical line the row starts on in a JSON text file (``None`` for Parquet and datasets).
Messages name a place as ``row 4 (line 5)``, or ``row 4`` where there are no lines.

Accepted inputs (:func:`load_examples`):

* a JSON-lines file (``.jsonl``, ``.jsonlines``, ``.ndjson``): one JSON object per line.
  Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r``; a UTF-8 byte-order mark at the start of
  the file (or of a line, as concatenated files have) is not part of the row; blank lines are
  skipped but counted, so ``row + 1`` is the line to look at.  A file that is, as a whole, one
  JSON array (``[{...}, {...}]``, on one line or pretty-printed over many) is read element by
  element; a broken array is read up to the first element that is not JSON, the rest being
  one rejected row;
* a Parquet file (``.parquet``, ``.pq``);
* a folder written by ``datasets.Dataset.save_to_disk`` (has ``dataset_info.json`` or
  ``state.json``), or by ``DatasetDict.save_to_disk`` (has ``dataset_dict.json``; splits
  are loaded in sorted order, each with source ``<folder>/<split>``);
* a folder of ``.jsonl``/``.parquet`` files (non-recursive, sorted by name; each row's
  source is its own file).

Nothing read is executed: JSON is parsed with :mod:`json`, tables with pyarrow/datasets.

Values JSON text can hold but this program cannot carry (:func:`validate_row`, for each of
our fields, ``metadata`` included): arrays/objects nested more than :data:`MAX_NESTING`
levels deep, integers of more than :data:`MAX_INT_DIGITS` digits (Python's int-str limit),
lone surrogates such as ``"\\ud800"`` (not UTF-8 encodable, so not hashable or writable),
and NaN/Infinity.  A row holding one is rejected naming the field.  Of the columns we do not
read only the nesting is checked (a row too deep for the parser itself cannot be read at all,
whatever the column; it is rejected naming that column).

Field rules: ``long_context``, ``short_context``, ``question`` are required strings with
*visible* text, kept unmodified.  A character is visible unless it is whitespace or in
Unicode category Cf (format: zero-width space/joiners U+200B..U+200D, word joiner U+2060,
BOM U+FEFF, soft hyphen U+00AD, ...), Cc (controls), Zs, Zl or Zp, or one of the blank
letters U+115F, U+1160, U+3164, U+FFA0 (Hangul fillers) and U+2800 (blank Braille); a text
without a visible character counts as empty.  A NUL character (U+0000) in any of our text
fields is rejected (it marks binary data or truncation, and C-string tools stop at it).
``answer`` is optional: ``None``/missing, a string (an empty or whitespace-only string
becomes ``None``; one of invisible characters only is rejected), or an ``int``/``float``
that is converted with ``str`` (integral floats lose their ``.0``: ``5.0 -> "5"``);
``bool``, NaN and infinities are rejected.  ``id`` is optional (a string with visible text
or an int, converted with ``str``); the default is the first 16 hex digits of
:meth:`Example.content_hash`.  ``metadata`` is an optional mapping that JSON writes back
as it is (no NaN/Infinity).  ``source`` is taken from the row if it is a string with
visible text, otherwise the file path.  Other columns are ignored.  When
``require_evidence_in_context`` is true, ``short_context`` must occur verbatim (no
normalisation at all) in ``long_context``, or be pieces of it in document order joined by
``EVIDENCE_SEPARATOR`` (:func:`locate_evidence`).  Ids must be unique within one load: a
later duplicate is rejected, naming the first row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .readers import JSONL_SUFFIXES, MAX_INT_DIGITS, MAX_NESTING, PARQUET_SUFFIXES, sources
from .text_rules import describe, has_visible_text, int_text, invisible_only, nul_problem, value_problem

__all__ = [
    "Example",
    "EVIDENCE_SEPARATOR",
    "locate_evidence",
    "RowOrigin",
    "RejectedRow",
    "LoadResult",
    "validate_row",
    "load_examples",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
    "MAX_NESTING",
    "MAX_INT_DIGITS",
]

REQUIRED_FIELDS = ("long_context", "short_context", "question")
_OUR_FIELDS = ("id", *REQUIRED_FIELDS, "answer", "source", "metadata")
# C_s made of several pieces of C_L (facts far apart) joins them, in document order, with this.
EVIDENCE_SEPARATOR = "\n...\n"


def locate_evidence(short_context: str, long_context: str) -> tuple[tuple[int, int], ...] | None:
    """Char spans of ``short_context`` in ``long_context``: its first verbatim occurrence, else
    its :data:`EVIDENCE_SEPARATOR`-joined pieces found one after the other; ``None`` if neither."""
    if not short_context:
        return None
    start = long_context.find(short_context)
    if start >= 0:
        return ((start, start + len(short_context)),)
    if EVIDENCE_SEPARATOR not in short_context:
        return None
    spans, at = [], 0
    for piece in short_context.split(EVIDENCE_SEPARATOR):
        start = long_context.find(piece, at) if piece else -1
        if start < 0:
            return None
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    return tuple(spans)


@dataclass(frozen=True)
class RowOrigin:
    """Where a row was read: its file (or split folder), its 0-based ``row`` and, in a JSON
    text file, the 1-based ``line`` it starts on (see the module docstring)."""

    source: str
    row: int
    line: int | None = None

    def where(self) -> str:
        """``row 4 (line 5)``, or ``row 4`` without lines."""
        return f"row {self.row}" + ("" if self.line is None else f" (line {self.line})")


@dataclass(frozen=True)
class Example:
    """One training/evaluation triple: the model answers ``question`` from ``long_context``
    (C_L); the same model given ``short_context`` (C_s, gold evidence inside C_L) scores it.
    ``origin``: where it was loaded from (``None`` when generated); not part of equality."""

    id: str
    long_context: str
    short_context: str
    question: str
    answer: str | None = None
    source: str = ""
    metadata: dict = field(default_factory=dict, hash=False)
    origin: RowOrigin | None = field(default=None, compare=False, repr=False)

    def content_hash(self) -> str:
        """sha256 hex digest of the canonical JSON of (long_context, short_context, question, answer).
        Lone surrogates (never in a loaded example) are hashed as their code points, not raised on."""
        payload = {
            "answer": self.answer,
            "long_context": self.long_context,
            "question": self.question,
            "short_context": self.short_context,
        }
        blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def to_dict(self) -> dict:
        """Plain dict with every field but ``origin`` (metadata copied), ready for ``json.dumps``."""
        return {
            "id": self.id,
            "long_context": self.long_context,
            "short_context": self.short_context,
            "question": self.question,
            "answer": self.answer,
            "source": self.source,
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class RejectedRow:
    """A row that did not become an :class:`Example`, and why; ``row`` and ``line`` as in
    :class:`RowOrigin`."""

    source: str
    row: int
    field: str
    reason: str
    raw: dict | None
    line: int | None = None

    @classmethod
    def at(cls, origin: RowOrigin, field: str, reason: str, raw: dict | None = None) -> "RejectedRow":
        return cls(origin.source, origin.row, field, reason, raw, origin.line)

    @property
    def location(self) -> str:
        """``<source> row 4 (line 5)``: where to look."""
        return f"{self.source} {RowOrigin(self.source, self.row, self.line).where()}"

    def to_dict(self) -> dict:
        return {"source": self.source, "row": self.row, "line": self.line, "field": self.field,
                "reason": self.reason, "raw": self.raw}


@dataclass
class LoadResult:
    examples: list[Example]
    rejected: list[RejectedRow]


# --------------------------------------------------------------------------- validation
def _column_note(name: str, column: str) -> str:
    return "" if name == column else f" (column {column!r})"


def _required_text(name: str, note: str, value: Any) -> str | None:
    """Why ``value`` cannot be required text field ``name``, or ``None``."""
    if not isinstance(value, str):
        return f"{name}{note}: expected a non-empty string, got {describe(value)}"
    if not has_visible_text(value):
        return f"{name}{note}: expected a non-empty string with visible text, got {invisible_only(value)}"
    problem = nul_problem(value)
    return None if problem is None else f"{name}{note}: {problem}"


def _answer(value: Any, note: str) -> tuple[str | None, str | None]:
    """``(answer, None)`` or ``(None, why not)``."""
    if value is None:
        return None, None
    if isinstance(value, str):
        if not value.strip():
            return None, None
        if not has_visible_text(value):
            return None, f"answer{note}: expected visible text, an empty string or null, got {invisible_only(value)}"
        problem = nul_problem(value)
        return (value, None) if problem is None else (None, f"answer{note}: {problem}")
    if isinstance(value, int) and not isinstance(value, bool):
        text = int_text(value)
        return (text, None) if text is not None else (None, f"answer{note}: an integer of more than {MAX_INT_DIGITS} "
                                                            f"digits; expected at most {MAX_INT_DIGITS}")
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"answer{note}: expected a string, a finite number or null, got {describe(value)}"
        return (str(int(value)) if value.is_integer() else repr(value)), None
    return None, f"answer{note}: expected a string, a number or null, got {describe(value)}"


def _metadata(value: Any, note: str) -> tuple[dict, str | None]:
    """``(metadata, None)`` or ``({}, why not)``."""
    if value is None:
        return {}, None
    if not isinstance(value, Mapping):
        return {}, f"metadata{note}: expected a JSON object (mapping) or null, got {describe(value)}"
    metadata = dict(value)
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        return {}, f"metadata{note}: expected a JSON-serialisable mapping ({err})"
    return metadata, None


def _identifier(value: Any, note: str) -> tuple[str | None, str | None]:
    """``(id, None)``, ``(None, None)`` when the row has none, or ``(None, why not)``."""
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"id{note}: expected a non-empty string, an int or null, got {describe(value)}"
    text = value if isinstance(value, str) else int_text(value)
    if text is None:
        return None, f"id{note}: an integer of more than {MAX_INT_DIGITS} digits; expected a string or a shorter int"
    if not has_visible_text(text):
        return None, f"id{note}: expected a non-empty string, got {invisible_only(text)}"
    problem = nul_problem(text)
    return (text, None) if problem is None else (None, f"id{note}: {problem}")


def _printable(name: Any) -> str:
    """A column name as text that can always be written (lone surrogates escaped)."""
    text = name if isinstance(name, str) else repr(name)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _row_problem(raw: dict, col: Mapping[str, str]) -> tuple[str, Any, str] | None:
    """``(field, column, reason)`` for the first value of ``raw`` that cannot be carried: in our
    columns anything :func:`value_problem` finds, in the others nesting past :data:`MAX_NESTING`
    (the field is then the column's name)."""
    ours = {column: name for name, column in col.items()}
    for column, value in raw.items():
        name = ours.get(column) if isinstance(column, str) else None
        found = value_problem(value, depth_only=name is None)
        if found:
            path, problem = found
            path = path if len(path) <= 60 else path[:57] + "..."
            label = name + _column_note(name, column) if name else f"column {_printable(column)!r}"
            return name or _printable(column), column, f"{label}{path}: {problem}"
    return None


def _placeholder(raw: dict, column: Any, problem: str) -> dict:
    """``raw`` with the value of ``column``, which cannot be carried (too deep to print or write
    back, say), replaced by a note."""
    return {**raw, column: f"<not kept: {problem.split(';')[0]}>"}


def validate_row(
    raw: Mapping,
    *,
    row: int,
    source: str,
    line: int | None = None,
    field_map: Mapping[str, str] | None = None,
    require_evidence_in_context: bool = True,
) -> Example | RejectedRow:
    """Turn one raw row into an :class:`Example`, or a :class:`RejectedRow` saying why not.

    ``row``/``line`` locate it in ``source`` (:class:`RowOrigin`).  ``field_map`` maps our
    field names to the row's column names, e.g. ``{"long_context": "context"}``; unmapped
    fields use their own name.  Never raises on bad data (only on a bad ``field_map``)."""
    fmap = dict(field_map or {})
    unknown = set(fmap) - set(_OUR_FIELDS)
    if unknown:
        raise ValueError(f"field_map has unknown field(s) {sorted(unknown)}; expected keys among {list(_OUR_FIELDS)}")
    origin = RowOrigin(source, row, line)
    if not isinstance(raw, Mapping):
        return RejectedRow.at(origin, "", f"expected a JSON object (mapping) per row, got {describe(raw)}")
    raw_dict = dict(raw)
    col = {name: fmap.get(name, name) for name in _OUR_FIELDS}
    note = {name: _column_note(name, col[name]) for name in _OUR_FIELDS}

    def reject(name: str, reason: str, kept: dict | None = None) -> RejectedRow:
        return RejectedRow.at(origin, name, reason, raw_dict if kept is None else kept)

    found = _row_problem(raw_dict, col)
    if found:
        name, column, problem = found
        return reject(name, problem, _placeholder(raw_dict, column, problem))

    text: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        if col[name] not in raw_dict:
            return reject(name, f"missing required field {name!r}{note[name]}; expected a non-empty string")
        why = _required_text(name, note[name], raw_dict[col[name]])
        if why:
            return reject(name, why)
        text[name] = raw_dict[col[name]]

    answer, why = _answer(raw_dict.get(col["answer"]), note["answer"])
    if why:
        return reject("answer", why)
    metadata, why = _metadata(raw_dict.get(col["metadata"]), note["metadata"])
    if why:
        return reject("metadata", why)
    value = raw_dict.get(col["source"])
    why = nul_problem(value) if isinstance(value, str) else None
    if why:
        return reject("source", f"source{note['source']}: {why}")
    row_source = value if isinstance(value, str) and has_visible_text(value) else source

    if require_evidence_in_context and locate_evidence(text["short_context"], text["long_context"]) is None:
        return reject(
            "short_context",
            f"short_context ({len(text['short_context'])} chars) does not occur verbatim in long_context "
            f"({len(text['long_context'])} chars); expected an exact substring (no normalisation is applied), "
            f"or substrings in document order joined by {EVIDENCE_SEPARATOR!r}",
        )

    ex_id, why = _identifier(raw_dict.get(col["id"]), note["id"])
    if why:
        return reject("id", why)
    example = Example(ex_id or "", text["long_context"], text["short_context"], text["question"], answer, row_source,
                      metadata, origin)
    return example if ex_id is not None else dataclasses.replace(example, id=example.content_hash()[:16])


def load_examples(
    path: str | os.PathLike,
    *,
    field_map: Mapping[str, str] | None = None,
    require_evidence_in_context: bool = True,
) -> LoadResult:
    """Load and validate every row under ``path`` (see the module docstring for formats).

    Bad rows go to ``LoadResult.rejected``; good rows, in file/row order, to ``examples``,
    each with its :class:`RowOrigin`.  Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` for an unknown format."""
    examples: list[Example] = []
    rejected: list[RejectedRow] = []
    seen: dict[str, RowOrigin] = {}
    for source, rows in sources(Path(path)):
        for item in rows:
            origin = RowOrigin(source, item.row, item.line)
            if item.error is not None:
                rejected.append(RejectedRow.at(origin, item.field, item.error))
                continue
            result = validate_row(item.raw, row=item.row, line=item.line, source=source, field_map=field_map,
                                  require_evidence_in_context=require_evidence_in_context)
            if isinstance(result, RejectedRow):
                rejected.append(result)
            elif result.id in seen:
                first = seen[result.id]
                where = first.where() + ("" if first.source == source else f" of {first.source}")
                rejected.append(RejectedRow.at(origin, "id", f"duplicate id {result.id!r}: already used by {where}; "
                                               "expected ids unique within one load", dict(item.raw)))
            else:
                seen[result.id] = origin
                examples.append(result)
    return LoadResult(examples, rejected)
