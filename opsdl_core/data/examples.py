"""Loading and validating (long context, short context, question) triples.

One row becomes one :class:`Example`; a row that cannot become one becomes a
:class:`RejectedRow` that names the source, the 0-based row index, the offending field
and what was expected.  Loading never raises on a bad row; it raises only when the
*path* itself is unusable (missing, unknown format).

Accepted inputs (:func:`load_examples`):

* a JSON-lines file (``.jsonl``, ``.jsonlines``, ``.ndjson``): one JSON object per line.
  The row index is the 0-based *line* index (blank lines are skipped but counted), so
  line ``row + 1`` of the file is the one to look at;
* a Parquet file (``.parquet``, ``.pq``);
* a folder written by ``datasets.Dataset.save_to_disk`` (has ``dataset_info.json`` or
  ``state.json``), or by ``DatasetDict.save_to_disk`` (has ``dataset_dict.json``; splits
  are loaded in sorted order, each with source ``<folder>/<split>``);
* a folder of ``.jsonl``/``.parquet`` files (non-recursive, sorted by name; each row's
  source is its own file).

Field rules (:func:`validate_row`): ``long_context``, ``short_context``, ``question`` are
required non-empty strings (whitespace-only counts as empty; text is kept unmodified);
``answer`` is optional: ``None``/missing, a string (an empty or whitespace-only string
becomes ``None``), or an ``int``/``float`` that is converted with ``str`` (integral floats
lose their ``.0``: ``5.0 -> "5"``); ``bool``, NaN and infinities are rejected.  ``id`` is
optional (a string or an int, converted with ``str``); the default is the first 16 hex
digits of :meth:`Example.content_hash`.  ``metadata`` is an optional JSON-serialisable
mapping.  ``source`` is taken from the row if it is a non-empty string, otherwise the
file path.  Other columns are ignored.  When ``require_evidence_in_context`` is true,
``short_context`` must occur verbatim (no normalisation at all) in ``long_context``, or be
pieces of it in document order joined by ``EVIDENCE_SEPARATOR`` (:func:`locate_evidence`).
Ids must be unique within one load: a later duplicate is rejected, naming the first row.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Example",
    "EVIDENCE_SEPARATOR",
    "locate_evidence",
    "RejectedRow",
    "LoadResult",
    "validate_row",
    "load_examples",
    "write_jsonl",
    "write_json_lines",
    "read_rejected",
    "write_rejected_jsonl",
    "JSONL_SUFFIXES",
    "PARQUET_SUFFIXES",
]

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
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
class Example:
    """One training/evaluation triple: the model answers ``question`` from ``long_context``
    (C_L); the same model given ``short_context`` (C_s, gold evidence inside C_L) scores it."""

    id: str
    long_context: str
    short_context: str
    question: str
    answer: str | None = None
    source: str = ""
    metadata: dict = field(default_factory=dict, hash=False)

    def content_hash(self) -> str:
        """sha256 hex digest of the canonical JSON of (long_context, short_context, question, answer)."""
        payload = {
            "answer": self.answer,
            "long_context": self.long_context,
            "question": self.question,
            "short_context": self.short_context,
        }
        blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        """Plain dict with every field (metadata copied), ready for ``json.dumps``."""
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
    """A row that did not become an :class:`Example`, and why."""

    source: str
    row: int
    field: str
    reason: str
    raw: dict | None

    def to_dict(self) -> dict:
        return {"source": self.source, "row": self.row, "field": self.field,
                "reason": self.reason, "raw": self.raw}


@dataclass
class LoadResult:
    examples: list[Example]
    rejected: list[RejectedRow]


# --------------------------------------------------------------------------- validation
def _describe(value: Any) -> str:
    """Short type-and-value description for error messages, e.g. ``int 5``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _column_note(name: str, column: str) -> str:
    return "" if name == column else f" (column {column!r})"


def validate_row(
    raw: Mapping,
    *,
    row: int,
    source: str,
    field_map: Mapping[str, str] | None = None,
    require_evidence_in_context: bool = True,
) -> Example | RejectedRow:
    """Turn one raw row into an :class:`Example`, or a :class:`RejectedRow` saying why not.

    ``field_map`` maps our field names to the row's column names, e.g.
    ``{"long_context": "context"}``; unmapped fields use their own name.  Never raises on
    bad data (only on a bad ``field_map``)."""
    fmap = dict(field_map or {})
    unknown = set(fmap) - set(_OUR_FIELDS)
    if unknown:
        raise ValueError(f"field_map has unknown field(s) {sorted(unknown)}; expected keys among {list(_OUR_FIELDS)}")
    if not isinstance(raw, Mapping):
        return RejectedRow(source, row, "", f"expected a JSON object (mapping) per row, got {_describe(raw)}", None)
    raw_dict = dict(raw)

    def reject(name: str, reason: str) -> RejectedRow:
        return RejectedRow(source, row, name, reason, raw_dict)

    col = {name: fmap.get(name, name) for name in _OUR_FIELDS}
    text: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        note = _column_note(name, col[name])
        if col[name] not in raw_dict:
            return reject(name, f"missing required field {name!r}{note}; expected a non-empty string")
        value = raw_dict[col[name]]
        if not isinstance(value, str):
            return reject(name, f"{name}{note}: expected a non-empty string, got {_describe(value)}")
        if not value.strip():
            return reject(name, f"{name}{note}: expected a non-empty string, got an empty/whitespace-only string")
        text[name] = value

    answer: str | None
    value = raw_dict.get(col["answer"])
    note = _column_note("answer", col["answer"])
    if value is None:
        answer = None
    elif isinstance(value, bool):
        return reject("answer", f"answer{note}: expected a string, a number or null, got {_describe(value)}")
    elif isinstance(value, str):
        answer = value if value.strip() else None
    elif isinstance(value, int):
        answer = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return reject("answer", f"answer{note}: expected a string, a finite number or null, got {_describe(value)}")
        answer = str(int(value)) if value.is_integer() else repr(value)
    else:
        return reject("answer", f"answer{note}: expected a string, a number or null, got {_describe(value)}")

    value = raw_dict.get(col["metadata"])
    note = _column_note("metadata", col["metadata"])
    if value is None:
        metadata: dict = {}
    elif not isinstance(value, Mapping):
        return reject("metadata", f"metadata{note}: expected a JSON object (mapping) or null, got {_describe(value)}")
    else:
        metadata = dict(value)
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as err:
            return reject("metadata", f"metadata{note}: expected a JSON-serialisable mapping ({err})")

    value = raw_dict.get(col["source"])
    row_source = value if isinstance(value, str) and value.strip() else source

    if require_evidence_in_context and locate_evidence(text["short_context"], text["long_context"]) is None:
        return reject(
            "short_context",
            f"short_context ({len(text['short_context'])} chars) does not occur verbatim in long_context "
            f"({len(text['long_context'])} chars); expected an exact substring (no normalisation is applied), "
            f"or substrings in document order joined by {EVIDENCE_SEPARATOR!r}",
        )

    value = raw_dict.get(col["id"])
    note = _column_note("id", col["id"])
    example = Example("", text["long_context"], text["short_context"], text["question"], answer, row_source, metadata)
    if value is None:
        ex_id = example.content_hash()[:16]
    elif isinstance(value, bool) or not isinstance(value, (str, int)):
        return reject("id", f"id{note}: expected a non-empty string, an int or null, got {_describe(value)}")
    else:
        ex_id = str(value)
        if not ex_id.strip():
            return reject("id", f"id{note}: expected a non-empty string, got an empty/whitespace-only string")
    return Example(ex_id, example.long_context, example.short_context, example.question, answer, row_source, metadata)


# --------------------------------------------------------------------------- readers
# Each reader yields (row_index, raw_row_or_None, error_reason_or_None).
def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, "rb") as fh:
        for idx, line_bytes in enumerate(fh):
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                yield idx, None, f"line {idx + 1}: not valid UTF-8 ({err}); expected one UTF-8 JSON object per line"
                continue
            if not line.strip():
                continue
            try:
                yield idx, json.loads(line), None
            except json.JSONDecodeError as err:
                yield idx, None, (f"line {idx + 1}: invalid JSON: {err.msg} at column {err.colno}; "
                                  "expected one JSON object per line")


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    idx = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield idx, rec, None
            idx += 1


def _iter_dataset(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import datasets

    for idx, rec in enumerate(datasets.load_from_disk(str(path))):
        yield idx, rec, None


def _sources(path: Path) -> list[tuple[str, Iterator[tuple[int, Any, str | None]]]]:
    """(source name, row iterator) pairs for ``path``; raises on an unusable path."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return [(str(path), _iter_dataset(path))]
        if (path / "dataset_dict.json").exists():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            return [(str(path / s), _iter_dataset(path / s)) for s in sorted(splits)]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no {'/'.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files and is not "
                             "a datasets save_to_disk folder (no dataset_info.json/state.json/dataset_dict.json)")
        return [pair for f in files for pair in _sources(f)]
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return [(str(path), _iter_jsonl(path))]
    if suffix in PARQUET_SUFFIXES:
        return [(str(path), _iter_parquet(path))]
    raise ValueError(f"unknown file type {suffix or '(no suffix)'!r} for {path}; expected one of "
                     f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}, a datasets save_to_disk folder, or a folder of such files")


def load_examples(
    path: str | os.PathLike,
    *,
    field_map: Mapping[str, str] | None = None,
    require_evidence_in_context: bool = True,
) -> LoadResult:
    """Load and validate every row under ``path`` (see the module docstring for formats).

    Bad rows go to ``LoadResult.rejected``; good rows, in file/row order, to ``examples``.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unknown format."""
    examples: list[Example] = []
    rejected: list[RejectedRow] = []
    seen: dict[str, tuple[str, int]] = {}
    for source, rows in _sources(Path(path)):
        for idx, raw, error in rows:
            if error is not None:
                rejected.append(RejectedRow(source, idx, "", error, None))
                continue
            result = validate_row(raw, row=idx, source=source, field_map=field_map,
                                  require_evidence_in_context=require_evidence_in_context)
            if isinstance(result, RejectedRow):
                rejected.append(result)
            elif result.id in seen:
                first_source, first_row = seen[result.id]
                where = f"row {first_row}" + ("" if first_source == source else f" of {first_source}")
                rejected.append(RejectedRow(source, idx, "id", f"duplicate id {result.id!r}: already used by {where}; "
                                            "expected ids unique within one load", dict(raw)))
            else:
                seen[result.id] = (source, idx)
                examples.append(result)
    return LoadResult(examples, rejected)


# --------------------------------------------------------------------------- writers
def _atomic_write_lines(lines: Iterable[str], path: str | os.PathLike) -> Path:
    """Write ``lines`` to a temp file next to ``path``, fsync, then ``os.replace``.

    If producing a line raises, the temp file is removed and ``path`` is left untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> Path:
    """Atomically write examples as JSON lines (``Example.to_dict``); returns the path."""
    return _atomic_write_lines((json.dumps(ex.to_dict(), ensure_ascii=False) for ex in examples), path)


def write_json_lines(rows: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Atomically write plain dicts as JSON lines; returns the path."""
    return _atomic_write_lines((json.dumps(dict(r), ensure_ascii=False, default=str) for r in rows), path)


def write_rejected_jsonl(rejected: Iterable[RejectedRow], path: str | os.PathLike) -> Path:
    """Atomically write rejected rows as JSON lines; values JSON cannot encode in ``raw``
    (bytes, dates, ...) are written as their ``str``."""
    return _atomic_write_lines((json.dumps(r.to_dict(), ensure_ascii=False, default=str) for r in rejected), path)


def read_rejected(path: str | os.PathLike) -> list[RejectedRow]:
    """Read a file written by :func:`write_rejected_jsonl`."""
    out: list[RejectedRow] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(RejectedRow(str(d["source"]), int(d["row"]), str(d["field"]), str(d["reason"]), d.get("raw")))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: line {lineno}: expected a rejected-row JSON object with "
                                 f"source/row/field/reason/raw ({err})") from err
    return out
