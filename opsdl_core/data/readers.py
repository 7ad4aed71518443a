"""The row readers behind ``examples.load_examples``: JSON lines (any line end, a BOM dropped), one
JSON array under a JSON-lines name, Parquet, a ``datasets`` save_to_disk folder, and a folder of
such files. Each yields :class:`Read` items, a parsed row or why it could not be parsed, with its
row and (text files) its 1-based line; nothing a reader meets raises past it but an unusable path.
Validation of the rows' fields is ``examples.validate_row``'s."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["JSONL_SUFFIXES", "PARQUET_SUFFIXES", "MAX_NESTING", "MAX_INT_DIGITS", "Read", "HugeInt", "parse_int",
           "sources"]

JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_NESTING = 64  # deepest arrays/objects accepted in one of our fields
MAX_INT_DIGITS = 4300  # Python's default int-str conversion limit
SURROGATE = re.compile("[\ud800-\udfff]")


class HugeInt:
    """Stands in for a JSON integer literal longer than :data:`MAX_INT_DIGITS` digits, which
    Python refuses to convert (and could not write back)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"

    __str__ = __repr__


def parse_int(text: str) -> int | HugeInt:
    digits = len(text) - text.startswith("-")
    if digits <= MAX_INT_DIGITS:
        try:
            return int(text)
        except ValueError:  # a lower limit set with sys.set_int_max_str_digits
            pass
    return HugeInt(digits)



class Read(NamedTuple):
    """One row as a reader found it: the parsed value, or why it could not be parsed."""

    row: int
    line: int | None
    raw: Any = None
    error: str | None = None
    field: str = ""


_JSON_WS = re.compile(r"[ \t\n\r]*")
# A JSON string (with, for object keys, the colon after it) or a bracket: enough to follow nesting.
_JSON_TOKEN = re.compile(r'("[^"\\]*(?:\\.[^"\\]*)*")(\s*:)?|[\[\]{}]')


def _printable_key(token: str) -> str:
    try:
        key = json.loads(token)
    except ValueError:
        key = token[1:-1]
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _scan_nesting(text: str, pos: int = 0, *, find_end: bool = False) -> tuple[str, int | None]:
    """Follow the brackets of the JSON value at ``pos`` without building it (for values too deep
    for the parser): ``(field, end)``, ``field`` the top-level key under which the nesting first
    exceeds :data:`MAX_NESTING` (``""`` if none, or for a value that is not an object) and ``end``
    the position after the value (``None`` when not asked for, or when it never closes)."""
    depth, key, deep = 0, "", None
    for m in _JSON_TOKEN.finditer(text, pos):
        token = m.group()
        if m.group(1) is not None:
            if depth == 1 and m.group(2) and text[pos] == "{":
                key = _printable_key(m.group(1))
        elif token in "[{":
            depth += 1
            if deep is None and depth > MAX_NESTING + 1:
                deep = key
                if not find_end:
                    return deep, None
        else:
            depth -= 1
            if depth == 0:
                return deep or "", m.end()
    return deep or "", None


def _nesting_error(text: str, pos: int = 0) -> tuple[str, str]:
    """``(field, reason)`` for a value at ``pos`` that the JSON parser found too deep."""
    name, _ = _scan_nesting(text, pos)
    where = f"field {name!r}: " if name else ""
    return name, f"{where}nested more than {MAX_NESTING} levels deep; expected at most {MAX_NESTING} levels"


def _parse_json(text: str) -> tuple[Any, tuple[str, str] | None]:
    """``(value, None)`` or ``(None, (field, reason))``; integers past the int-str limit become
    :class:`HugeInt` (reported by ``examples.validate_row`` with their field)."""
    try:
        return json.loads(text, parse_int=parse_int), None
    except json.JSONDecodeError as err:
        return None, ("", f"invalid JSON: {err.msg} at column {err.colno}; expected one JSON object per line")
    except RecursionError:
        return None, _nesting_error(text, len(text) - len(text.lstrip()))


def _open_text(path: Path):
    """``path`` as text: UTF-8, a leading BOM dropped, lines ending at \\n, \\r\\n or \\r, and bytes
    that are not UTF-8 kept as lone surrogates (U+DC80..U+DCFF) to be reported per line."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=None)


def _utf8_error(line: str) -> str:
    try:
        line.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError as err:
        return str(err)
    return "lone surrogates"


def _read_line(line: str, lineno: int) -> Read | None:
    """The row on physical line ``lineno`` (1-based), or ``None`` for a blank line."""
    if SURROGATE.search(line):  # only undecodable bytes become surrogates here
        return Read(lineno - 1, lineno, error=f"line {lineno}: not valid UTF-8 ({_utf8_error(line)}); expected "
                                               "one UTF-8 JSON object per line")
    line = line.removeprefix("\ufeff")
    if not line.strip():
        return None
    value, failed = _parse_json(line)
    if failed is None:
        return Read(lineno - 1, lineno, value)
    name, why = failed
    return Read(lineno - 1, lineno, error=f"line {lineno}: {why}", field=name)


def _iter_json_lines(path: Path) -> Iterator[Read]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            item = _read_line(line, lineno)
            if item is not None:
                yield item


def _array_items(text: str) -> tuple[list[Read], tuple[int, str] | None]:
    """The elements of ``text``, one JSON array, with the line each starts on; and
    ``(line, reason)`` of what stopped the reading, or ``None`` if the whole text was read."""
    decoder = json.JSONDecoder(parse_int=parse_int)
    items: list[Read] = []
    pos = _JSON_WS.match(text).end() + 1  # past "["
    line, counted = 1, 0

    def line_at(at: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, at), at
        return line

    pos = _JSON_WS.match(text, pos).end()
    while not text.startswith("]", pos):
        if items:  # a comma before every element but the first
            if not text.startswith(",", pos):
                return items, (line_at(pos), f"expected ',' or ']' after element {len(items) - 1}")
            pos = _JSON_WS.match(text, pos + 1).end()
        start = line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
            items.append(Read(len(items), start, value))
        except json.JSONDecodeError as err:
            return items, (err.lineno, f"invalid JSON: {err.msg} at column {err.colno}")
        except RecursionError:  # skip the element by its brackets and read on
            name, why = _nesting_error(text, pos)
            _, end = _scan_nesting(text, pos, find_end=True)
            if end is None:
                return items, (start, why)
            items.append(Read(len(items), start, error=f"line {start}: {why}", field=name))
            pos = end
        pos = _JSON_WS.match(text, pos).end()
    pos = _JSON_WS.match(text, pos + 1).end()
    if pos < len(text):
        return items, (line_at(pos), "extra data after the closing ']'")
    return items, None


def _is_json_value(line: str) -> bool:
    try:
        json.loads(line, parse_int=parse_int)
    except json.JSONDecodeError:
        return False
    except RecursionError:  # a value, only too deep
        pass
    return True


def _looks_like_json_lines(text: str) -> bool:
    """Whether ``text``, not one JSON array, is JSON lines: its first or second non-blank line is
    a JSON value on its own (one of them may be a broken row), which no line of the first two of
    an array spread over lines is."""
    lines = [ln for ln in text.split("\n", 64)[:64] if ln.strip()][:2]
    return any(_is_json_value(ln) for ln in lines)


def _iter_jsonl(path: Path) -> Iterator[Read]:
    """A JSON-lines file, or one JSON array saved under a JSON-lines name (module docstring)."""
    with _open_text(path) as fh:
        head = fh.read(1 << 16)
        text = head + fh.read() if head.lstrip(" \t\r\n").startswith("[") else None
    items, stop = _array_items(text) if text is not None else ([], (0, ""))
    if text is None or (stop is not None and _looks_like_json_lines(text)):
        yield from _iter_json_lines(path)
        return
    yield from items
    if stop is not None:
        at, why = stop
        yield Read(len(items), at, error=f"line {at}: {why} in the JSON array, which was not read from here on; "
                                          "expected a JSON array of objects, or one JSON object per line")


def _table_rows(rows: Iterator[Any], what: str) -> Iterator[Read]:
    """``rows`` of a table file as :class:`Read` items (no lines); a failure to read on is one
    rejected row at the row where it happened, not an exception."""
    import pyarrow as pa

    idx = 0
    try:
        for rec in rows:
            yield Read(idx, None, rec)
            idx += 1
    except (OSError, ValueError, pa.ArrowException) as err:
        yield Read(idx, None, error=f"row {idx}: cannot read the {what} from here on ({type(err).__name__}: "
                                     f"{str(err)[:300]}); expected a readable {what}")


def _iter_parquet(path: Path) -> Iterator[Read]:
    import pyarrow.parquet as pq

    def rows() -> Iterator[Any]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()

    return _table_rows(rows(), "Parquet file")


def _iter_dataset(path: Path) -> Iterator[Read]:
    def rows() -> Iterator[Any]:
        import datasets

        yield from datasets.load_from_disk(str(path))

    return _table_rows(rows(), "datasets folder")


def sources(path: Path) -> list[tuple[str, Iterator[Read]]]:
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
        return [pair for f in files for pair in sources(f)]
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return [(str(path), _iter_jsonl(path))]
    if suffix in PARQUET_SUFFIXES:
        return [(str(path), _iter_parquet(path))]
    raise ValueError(f"unknown file type {suffix or '(no suffix)'!r} for {path}; expected one of "
                     f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}, a datasets save_to_disk folder, or a folder of such files")
