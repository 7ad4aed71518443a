"""What text and values a row may hold (``examples.validate_row`` applies them to each field).

Text is *visible* when it has a character that is not whitespace and not in Unicode category Cf
(format: zero-width space and joiners, word joiner, BOM, soft hyphen, ...), Cc, Zs, Zl or Zp, nor
one of the blank letters U+115F, U+1160, U+3164, U+FFA0 and U+2800; a text without one counts as
empty. A value JSON text can hold but this program cannot carry is a problem: nesting past
:data:`MAX_NESTING`, integers past :data:`MAX_INT_DIGITS` digits, lone surrogates, NaN and
Infinity."""

from __future__ import annotations

import functools
import math
import re
import reprlib
import sys
import unicodedata
from collections.abc import Mapping
from typing import Any

from .readers import MAX_INT_DIGITS, MAX_NESTING, SURROGATE, HugeInt

__all__ = ["has_visible_text", "squash_invisible", "invisible_only", "nul_problem", "describe", "value_problem",
           "int_text"]

_SAFE_INT_BITS = int((MAX_INT_DIGITS - 1) * math.log2(10))  # ints this wide have fewer digits than the limit
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Zs", "Zl", "Zp"})
_BLANK_LETTERS = "\u115f\u1160\u3164\uffa0\u2800"  # rendered blank, though letters/symbols by category
_ASCII_VISIBLE = re.compile("[!-~]")


@functools.cache
def _invisible_class() -> str:
    """A regex character class body of every invisible character (the module docstring's rule)."""
    codes = [c for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c)) in _INVISIBLE_CATEGORIES and not 0xD800 <= c <= 0xDFFF]
    codes += [ord(ch) for ch in _BLANK_LETTERS]
    ranges: list[list[int]] = []
    for c in sorted(codes):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)


@functools.cache
def _visible_char() -> re.Pattern:
    return re.compile(f"[^{_invisible_class()}]")


@functools.cache
def _invisible_run() -> re.Pattern:
    return re.compile(f"[{_invisible_class()}]+")


def has_visible_text(text: str) -> bool:
    """Whether ``text`` has a visible character (the module docstring's rule)."""
    if _ASCII_VISIBLE.search(text):
        return True
    return not text.isascii() and _visible_char().search(text) is not None


def squash_invisible(text: str) -> str:
    """``text`` with each run of invisible characters (whitespace included) as one space, trimmed."""
    return _invisible_run().sub(" ", text).strip()


def invisible_only(value: str) -> str:
    """How to describe a string without visible text: ``an empty/whitespace-only string`` or
    ``only invisible characters (U+200B ZERO WIDTH SPACE, ...)``."""
    if not value.strip():
        return "an empty/whitespace-only string"
    kinds = sorted(ch for ch in set(value) if not ch.isspace())
    names = ", ".join(f"U+{ord(ch):04X} {unicodedata.name(ch, unicodedata.category(ch))}" for ch in kinds[:3])
    return f"only invisible characters ({names}{', ...' if len(kinds) > 3 else ''}), which counts as empty"


def nul_problem(value: str) -> str | None:
    at = value.find("\0")
    return None if at < 0 else f"holds a NUL character (U+0000) at index {at}; expected text without NUL characters"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel = 3


def describe(value: Any) -> str:
    """Short type-and-value description for error messages, e.g. ``int 5`` (never raises)."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # ints past the int-str limit
        text = "<too large to print>"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _scalar_problem(value: Any) -> str | None:
    """What JSON cannot carry back in a string, number or other leaf value, or ``None``."""
    if isinstance(value, str):
        bad = SURROGATE.search(value)
        return None if bad is None else (f"holds a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()}; "
                                         "expected valid Unicode text (UTF-8 encodable)")
    if isinstance(value, HugeInt):
        return f"an integer of {value.digits} digits; expected at most {MAX_INT_DIGITS} digits"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _SAFE_INT_BITS:
        text = int_text(abs(value))
        if text is None or len(text) > MAX_INT_DIGITS:
            digits = len(text) if text else int(value.bit_length() / math.log2(10))
            return f"an integer of about {digits} digits; expected at most {MAX_INT_DIGITS}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"a non-finite number ({value}); expected a finite number (JSON has no NaN or Infinity)"
    return None


def value_problem(value: Any, *, depth_only: bool = False) -> tuple[str, str] | None:
    """``(path, problem)`` for the first value inside ``value`` that this program cannot carry
    (too deep; unless ``depth_only``, also a huge int, a lone surrogate, NaN), the path like
    ``['a'][0]``; ``None`` if all is well.  Iterative: never recurses, whatever the depth."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if not isinstance(v, (Mapping, list, tuple)):
            problem = None if depth_only else _scalar_problem(v)
            if problem:
                return path, problem
            continue
        if depth >= MAX_NESTING:
            return path, f"nested more than {MAX_NESTING} levels deep; expected at most {MAX_NESTING} levels"
        if isinstance(v, Mapping):
            children = [(k, x, f"{path}[{_REPR.repr(k)}]") for k, x in v.items()]
        else:
            children = [(None, x, f"{path}[{i}]") for i, x in enumerate(v)]
        for key, child, child_path in reversed(children):
            problem = _scalar_problem(key) if isinstance(key, str) and not depth_only else None
            if problem:
                return child_path, f"key {problem}"
            stack.append((child, child_path, depth + 1))
    return None


def int_text(value: int) -> str | None:
    """``str(value)``, or ``None`` past the int-str limit."""
    try:
        return str(value)
    except ValueError:  # past the int-str limit
        return None
