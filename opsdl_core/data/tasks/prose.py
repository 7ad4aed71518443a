"""Natural English prose for haystacks and for the self-instruct path, from sources present offline.

* ``python-reference`` (built in, always present): the text of the Python Language Reference and
  library topics that every CPython installation ships for ``help()`` (``pydoc_data.topics``,
  ~470,000 characters of technical English). Licence: the Python Software Foundation License
  Version 2 (the documentation's licence), which permits derivative works with its notice kept.
* a folder of the user's own ``.txt``/``.md`` files (``folder:<path>``): used as they are; the
  licence is the user's to state (recorded as ``user-supplied``).

Sentences are cut with the teacher-context sentence splitter; code, grammar rules, tables and
sentences with digits are dropped (a digit in the haystack could collide with a numeric answer).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ProseSource", "BUILTIN", "prose_source", "document_texts", "write_documents"]

BUILTIN = "python-reference"
PSF_LICENCE = "Python Software Foundation License Version 2 (CPython documentation, pydoc_data.topics)"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class ProseSource:
    name: str
    licence: str
    sentences: tuple[str, ...]

    def stream(self, rng: random.Random) -> Callable[[random.Random], str]:
        """A sentence source for a haystack: consecutive sentences from a random start (wrapping),
        so the haystack reads as running text."""
        at = [rng.randrange(len(self.sentences))]

        def nxt(_: random.Random) -> str:
            s = self.sentences[at[0] % len(self.sentences)]
            at[0] += 1
            return s

        return nxt


_PROSE_LINE = re.compile(r"^[A-Z\"'(][^\n]*$")


def _paragraph_is_prose(par: str) -> bool:
    lines = par.splitlines()
    if not lines or any(line.startswith((" ", "\t")) for line in lines):
        return False  # indented: code, grammar, examples
    text = " ".join(lines)
    if len(text) < 80 or re.search(r"[*=]{3,}|::=|>>>|\|", text):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.9


def split_sentences(text: str, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Prose sentences of ``text``: paragraph by paragraph, digits-free, ``min_words``..``max_words``."""
    from ..short_context import sentence_spans

    out = []
    for par in re.split(r"\n\s*\n", text):
        if not _paragraph_is_prose(par):
            continue
        flat = " ".join(par.split())
        for a, b in sentence_spans(flat):
            sent = flat[a:b]
            n = len(sent.split())
            if min_words <= n <= max_words and sent[-1] in ".!?" and not re.search(r"\d", sent) \
                    and _PROSE_LINE.match(sent):
                out.append(sent)
    return out


def document_texts(name: str = BUILTIN) -> list[tuple[str, str]]:
    """(title, text) of each document of a source: the reference topics, or the folder's files."""
    if name == BUILTIN:
        from pydoc_data.topics import topics

        return [(k, topics[k]) for k in sorted(topics)]
    folder = Path(name.removeprefix("folder:"))
    if not folder.is_dir():
        raise FileNotFoundError(f"prose source {name!r}: {folder} is not a folder; expected {BUILTIN!r} or "
                                "'folder:<path>' of .txt/.md files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"prose source {name!r}: no {'/'.join(TEXT_SUFFIXES)} files in {folder}")
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]


@lru_cache(maxsize=8)
def prose_source(name: str = BUILTIN) -> ProseSource:
    """The named source's prose sentences (cached per process)."""
    sentences = tuple(s for _, text in document_texts(name) for s in split_sentences(text))
    if len(sentences) < 50:
        raise ValueError(f"prose source {name!r}: only {len(sentences)} usable prose sentences; expected at least 50 "
                         "(paragraphs of plain sentences without digits)")
    licence = PSF_LICENCE if name == BUILTIN else "user-supplied"
    return ProseSource(name, licence, sentences)


def write_documents(out_dir: str | Path, *, name: str = BUILTIN, min_chars: int = 6000,
                    titles: Sequence[str] | None = None) -> list[Path]:
    """Write a source's long documents (at least ``min_chars`` characters) as ``.txt`` files: a
    ready folder of long text files for the self-instruct path. Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for title, text in document_texts(name):
        if len(text) >= min_chars and (titles is None or title in titles):
            path = out / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', title)}.txt"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    (out / "SOURCE").write_text(f"Source: {name}\nLicence: {PSF_LICENCE if name == BUILTIN else 'user-supplied'}\n")
    return paths
