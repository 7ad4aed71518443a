"""Writing examples, plain JSON rows and set-aside rows as JSON lines (atomically: a temp file next to
the target, fsync, rename), and reading set-aside rows back."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .examples import Example, RejectedRow
from .readers import SURROGATE

__all__ = ["atomic_write", "write_jsonl", "write_json_lines", "write_rejected_jsonl", "read_rejected"]


def atomic_write(path: str | os.PathLike, chunks: Iterable[str]) -> Path:
    """Write ``chunks`` (UTF-8 text, as given) to a temp file next to ``path``, fsync, then ``os.replace``:
    a reader sees the old file or the whole new one. If producing a chunk raises, the temp file is removed
    and ``path`` is left untouched. The one atomic writer of the project (JSON lines here, a run folder's
    logs and records in ``train.checkpoint``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for chunk in chunks:
                fh.write(chunk)
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


def _atomic_write_lines(lines: Iterable[str], path: str | os.PathLike) -> Path:
    return atomic_write(path, (line + "\n" for line in lines))


def _example_line(ex: Example) -> str:
    """``ex`` as one line of strict JSON (no NaN/Infinity), or a ``ValueError`` naming it; a
    loaded example always passes (:func:`validate_row` rejects what would not)."""
    try:
        line = json.dumps(ex.to_dict(), ensure_ascii=False, allow_nan=False)
        line.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"example {ex.id!r} cannot be written as JSON ({err}); expected finite numbers, "
                         "UTF-8-encodable text and JSON-serialisable metadata") from err
    return line


def _rejected_line(r: RejectedRow) -> str:
    """``r`` as one JSON line that always writes: values JSON cannot encode in ``raw`` (bytes,
    dates, ...) as their ``str``, lone surrogates escaped, and a ``raw`` that still cannot be
    written (too deep, a huge int) dropped with a note in the reason."""
    try:
        line = json.dumps(r.to_dict(), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError) as err:
        note = f" (raw row not kept: {type(err).__name__})"
        return _rejected_line(dataclasses.replace(r, raw=None, reason=r.reason + note))
    return line if not SURROGATE.search(line) else json.dumps(r.to_dict(), ensure_ascii=True, default=str)


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> Path:
    """Atomically write examples as JSON lines (``Example.to_dict``); returns the path.  An example
    JSON cannot carry (NaN in its metadata, say) raises ``ValueError`` and leaves ``path`` as it was."""
    return _atomic_write_lines((_example_line(ex) for ex in examples), path)


def write_json_lines(rows: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Atomically write plain dicts as JSON lines; returns the path."""
    return _atomic_write_lines((json.dumps(dict(r), ensure_ascii=False, default=str) for r in rows), path)


def write_rejected_jsonl(rejected: Iterable[RejectedRow], path: str | os.PathLike) -> Path:
    """Atomically write rejected rows as JSON lines (:func:`_rejected_line`: never fails on a row)."""
    return _atomic_write_lines((_rejected_line(r) for r in rejected), path)


def read_rejected(path: str | os.PathLike) -> list[RejectedRow]:
    """Read a file written by :func:`write_rejected_jsonl`."""
    out: list[RejectedRow] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(RejectedRow(str(d["source"]), int(d["row"]), str(d["field"]), str(d["reason"]), d.get("raw"),
                                       None if d.get("line") is None else int(d["line"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: line {lineno}: expected a rejected-row JSON object with "
                                 f"source/row/field/reason/raw ({err})") from err
    return out
