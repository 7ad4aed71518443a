"""The row generators of ``test_fuzz_rows.py``: good rows, every class of malformed row, the files
they are written to, and where each planted row must end up (:class:`Planted`)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from opsdl_core.data.examples import Example, RejectedRow

WINDOW = 512  # the model window the paths are run with (tokens)
SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff")
FORMAT_CHARS = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u2061", "\u206f",
                "\u3164")
INVISIBLE = (*FORMAT_CHARS, " ", "\t", "\n", "\u3000", "\u2028", "\u00a0", "\x0b")
UNICODE_WORDS = ("café", "naïve", "中文", "😀", "Ωμέγα", "Straße", "x\u200by", "tab\there", "new\nline", "ﬁne")
SYLLABLES = ("zor", "bla", "quim", "vex", "thu", "dran", "pel", "okk", "yss", "mur", "fen", "gli")
TEXT_FIELDS = ("long_context", "short_context", "question")
_PLACEHOLDER = re.compile(r'"@@([A-Z]+)(-?\d*)@@"')


def word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def filler(rng: random.Random, n: int | None = None) -> str:
    words = [rng.choice(UNICODE_WORDS) if rng.random() < 0.15 else word(rng) for _ in range(n or rng.randint(3, 8))]
    return " ".join(words) + "."


def _expand(m: re.Match) -> str:
    """The JSON text a placeholder stands for (what ``json.dumps`` cannot write)."""
    kind, n = m.group(1), m.group(2)
    if kind == "HUGE":
        return ("-" if n.startswith("-") else "") + "7" * abs(int(n))
    if kind == "DEEP":
        return "[" * int(n) + "]" * int(n)
    if kind == "DEEPOBJ":
        return '{"a":' * int(n) + "1" + "}" * int(n)
    return {"NAN": "NaN", "INF": "Infinity", "NINF": "-Infinity", "BIGFLOAT": "1e999"}[kind]


def render(row: Any, rng: random.Random) -> str:
    """``row`` as one JSON line: escaped or raw non-ASCII at random (escaped when it holds a lone
    surrogate, which only an escape can carry), placeholders expanded."""
    raw = json.dumps(row, ensure_ascii=False)
    escape = bool(re.search("[\ud800-\udfff]", raw)) or rng.random() < 0.5
    return _PLACEHOLDER.sub(_expand, json.dumps(row, ensure_ascii=True) if escape else raw)


def expected_example(row: dict, source: str) -> tuple:
    """What the loader must make of good ``row``: its fields, untouched but for the documented
    conversions (answer to text, missing id to the content hash, missing source to the file)."""
    answer = row.get("answer")
    if isinstance(answer, str) and not answer.strip():
        answer = None
    elif isinstance(answer, int):
        answer = str(answer)
    src = row.get("source") if isinstance(row.get("source"), str) and row["source"].strip() else source
    ex = Example("", row["long_context"], row["short_context"], row["question"], answer, src,
                 dict(row.get("metadata") or {}))
    ex_id = str(row["id"]) if row.get("id") is not None else ex.content_hash()[:16]
    return (ex_id, ex.long_context, ex.short_context, ex.question, ex.answer, ex.source, ex.metadata)


def fields_of(ex: Example) -> tuple:
    return (ex.id, ex.long_context, ex.short_context, ex.question, ex.answer, ex.source, ex.metadata)


@dataclass
class Planted:
    """The rows of one file and where each must end up. Keys are ``(row, line)`` as the loader
    numbers them (``line`` ``None`` for tables)."""

    path: Path
    good: dict[tuple[int, int | None], dict] = field(default_factory=dict)
    bad: dict[tuple[int, int | None], str] = field(default_factory=dict)  # the loader's: -> field
    later: dict[tuple[int, int | None], tuple[str, str]] = field(default_factory=dict)  # cleaning's: -> (kind, field)
    classes: Counter = field(default_factory=Counter)

    def add(self, key: tuple[int, int | None], e: Entry) -> None:
        self.classes[e.cls] += 1
        if e.field is not None:
            self.bad[key] = e.field
            return
        self.good[key] = e.row
        if e.later:
            self.later[key] = (e.later, e.later_field)

    def expected_examples(self, *, without: tuple[str, ...] = ()) -> list[tuple]:
        """``(source, row, line, fields)`` of each row that loads and is not set aside as one of
        the kinds ``without``, in row order."""
        keys = sorted(k for k in self.good if self.later.get(k, ("",))[0] not in without)
        return [(str(self.path), *k, expected_example(self.good[k], str(self.path))) for k in keys]

    def expected_rejections(self, *kinds: str) -> set[tuple]:
        """``(source, row, line, field)`` of the rows the loader rejects and of those cleaning
        sets aside as one of ``kinds``."""
        out = {(str(self.path), *k, f) for k, f in self.bad.items()}
        return out | {(str(self.path), *k, f) for k, (kind, f) in self.later.items() if kind in kinds}


def loaded(examples: list[Example]) -> list[tuple]:
    return [(e.origin.source, e.origin.row, e.origin.line, fields_of(e)) for e in examples]


def located(rejected: list[RejectedRow]) -> set[tuple]:
    return {(r.source, r.row, r.line, r.field) for r in rejected}


# --------------------------------------------------------------------------- row generators
class Entry(NamedTuple):
    """One planted line: its class, the row (or raw bytes), the field the loader must reject it
    under (``None``: it loads), and for a row that loads, the kind of row cleaning must set
    aside (``duplicate``, ``overlap``, ``too_long``; ``""``: none) and under which field."""

    cls: str
    row: Any
    field: str | None = None
    later: str = ""
    later_field: str = ""


def in_metadata(value: Any) -> dict:
    return {"ok": 1, "deep": {"inner": value}}


class Rows:
    """Good rows and every class of bad row, from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.n = 0

    def good(self, *, plain: bool = False) -> dict:
        rng = self.rng
        self.n += 1
        n, name, attr = self.n, f"{word(rng)}{self.n}", word(rng)
        cs = f"The {attr} of {name} is {7919 * n + 13}."
        row = {"long_context": f"{filler(rng)} {cs} {filler(rng)}", "short_context": cs,
               "question": f"What is the {attr} of {name}?"}
        if plain:
            return {"id": f"g{n}", **row, "answer": str(7919 * n + 13)}
        pick = rng.random()
        if pick < 0.6:
            row["id"] = f"g{n}"
        elif pick < 0.8:
            row["id"] = 10_000_000 + n
        row["answer"] = rng.choice([str(7919 * n + 13), 7919 * n + 13, None, "", "  ", "é 😀", int("9" * 4300)])
        if rng.random() < 0.5:
            row["metadata"] = rng.choice([{"k": n, "nested": {"a": [1, 2, {"b": "é\u200b"}]}, "f": 1.5},
                                          {"big": int("8" * 4300), "neg": -(10 ** 30)}, {}, {"t": "tab\there"},
                                          json.loads('{"a":' * 64 + "1" + "}" * 64)])  # 64 levels: the limit
        if rng.random() < 0.2:
            row["source"] = f"wiki-{n}"
        if rng.random() < 0.2:  # of the columns we do not read, only the nesting is checked
            row["junk"] = rng.choice(["@@DEEP60@@", "@@HUGE5000@@", "@@NAN@@", "\ud800", [None, {"x": "\udc00"}]])
        return row

    def with_value(self, name: str, value: Any) -> dict:
        row = self.good(plain=True)
        row[name] = value
        return row

    def deep(self) -> tuple[Any, str]:
        rng = self.rng
        d = rng.choice([65, 66, 100, 500, 990, 1500, 5000, 40_000] + [250_000] * (rng.random() < 0.05))
        kind = rng.random()
        if kind < 0.1:
            return "@@DEEP%d@@" % d, ""  # the whole row: [[[[...]]]]
        if kind < 0.2:
            return "@@DEEPOBJ%d@@" % (d + 1), "a"  # the whole row {"a": {"a": ...}}: column "a" d levels deep
        if kind < 0.3:
            return self.with_value("junk", "@@DEEP%d@@" % d), "junk"  # a column we do not read
        name = rng.choice(["long_context", "short_context", "question", "answer", "id", "metadata", "source"])
        value = "@@%s%d@@" % (rng.choice(["DEEP", "DEEPOBJ"]), d - 2 * (name == "metadata"))
        return self.with_value(name, in_metadata(value) if name == "metadata" else value), name

    def huge_int(self) -> tuple[dict, str]:
        name = self.rng.choice(["answer", "id", "metadata", "long_context", "short_context", "question"])
        value = "@@HUGE%s%d@@" % (self.rng.choice(["", "-"]), self.rng.choice([4301, 4400, 10_000, 50_000]))
        return self.with_value(name, in_metadata(value) if name == "metadata" else value), name

    def surrogate(self) -> tuple[dict, str]:
        rng = self.rng
        name = rng.choice(["long_context", "short_context", "question", "answer", "id", "source", "metadata",
                           "metadata key"])
        row, ch = self.good(plain=True), rng.choice(SURROGATES)
        base = row.get(name, word(rng))
        at = rng.randint(0, len(base))
        value = base[:at] + ch + base[at:]
        if name.startswith("metadata"):
            row["metadata"] = in_metadata(value) if name == "metadata" else {value: 1}
            return row, "metadata"
        row[name] = value
        return row, name

    def non_finite(self) -> tuple[dict, str]:
        token = self.rng.choice(["@@NAN@@", "@@INF@@", "@@NINF@@", "@@BIGFLOAT@@"])
        name = self.rng.choice(["metadata", "answer"])
        return self.with_value(name, in_metadata(token) if name == "metadata" else token), name

    def invisible(self) -> tuple[dict, str]:
        rng = self.rng
        name = rng.choice(["long_context", "short_context", "question", "answer", "id"])
        chars = [rng.choice(INVISIBLE) for _ in range(rng.randint(1, 12))]
        if name == "answer" or rng.random() < 0.7:  # a format character, not only whitespace
            chars.insert(rng.randint(0, len(chars)), rng.choice(FORMAT_CHARS))
        return self.with_value(name, "".join(chars)), name

    def empty(self) -> tuple[dict, str]:
        name = self.rng.choice(TEXT_FIELDS)
        return self.with_value(name, self.rng.choice(["", " ", "\t\n", "\u3000\u2028"])), name

    def nul(self) -> tuple[dict, str]:
        name = self.rng.choice(["long_context", "short_context", "question", "answer", "id", "source"])
        row = self.good(plain=True)
        base = row.get(name, word(self.rng))
        at = self.rng.randint(0, len(base))
        row[name] = base[:at] + "\0" + base[at:]
        return row, name

    def wrong_type(self) -> tuple[dict, str]:
        rng = self.rng
        name = rng.choice(["long_context", "short_context", "question", "answer", "id", "metadata"])
        values = {"answer": [True, False, ["a"], {"a": 1}], "id": [1.5, True, ["x"], {"x": 1}],
                  "metadata": [[1, 2], "text", 5, True]}.get(name, [5, 2.5, ["text"], {"t": 1}, True, None])
        return self.with_value(name, rng.choice(values)), name

    def missing(self) -> tuple[dict, str]:
        name = self.rng.choice(TEXT_FIELDS)
        row = self.good(plain=True)
        del row[name]
        return row, name

    def not_in_context(self) -> tuple[dict, str]:
        row = self.good(plain=True)
        row["short_context"] = row["short_context"].replace("The", "A", 1)
        return row, "short_context"

    def non_object(self) -> tuple[Any, str]:
        return self.rng.choice([[1, 2], "a string row", 42, None, True, [self.good(plain=True)], 1.5]), ""

    def invalid_json(self) -> tuple[bytes, str]:
        rng = self.rng
        text = json.dumps(self.good(plain=True), ensure_ascii=False)
        kind = rng.randrange(6)
        if kind == 0:
            text = text[: rng.randint(1, len(text) - 1)]
        elif kind == 1:
            text += " trailing"
        elif kind == 2:
            text = text.replace('"', "'")
        elif kind == 3:
            text = text.replace("The", "The\x00", 1)  # a raw NUL byte: a control character in a string
        elif kind == 4:
            return text.encode()[:-3] + rng.choice([b"\xff\xfe", b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80"]) + b"}", ""
        else:
            text = '{"long_context": "' + "x" * rng.choice([50_000, 50_000, 2_000_000])  # long, never closed
        return text.encode(), ""

    def entry(self, cls: str) -> Entry:
        row, name = getattr(self, cls)()
        return Entry(cls, row, name)


LOADER_CLASSES = ("deep", "huge_int", "surrogate", "non_finite", "invisible", "empty", "nul", "wrong_type",
                  "missing", "not_in_context", "non_object", "invalid_json")


def write_jsonl_file(path: Path, entries: list[Entry], rng: random.Random, *, ends: tuple[str, ...] = ("\n",),
                     bom: bool = False, blanks: bool = True) -> Planted:
    """Write ``entries`` one per line, line ends drawn from ``ends``, blank lines between (never
    an empty one right after a lone CR, which would make a CRLF); record where each lands."""
    planted = Planted(path)
    chunks, line, end = [b"\xef\xbb\xbf"] if bom else [], 0, ""
    for e in entries:
        while blanks and rng.random() < 0.05:
            pad = rng.choice([b" ", b"\t"] if end == "\r" else [b"", b"   ", b"\t"])
            end = rng.choice(ends)
            chunks.append(pad + end.encode())
            line += 1
        end = rng.choice(ends)
        chunks.append((e.row if isinstance(e.row, bytes) else render(e.row, rng).encode()) + end.encode())
        line += 1
        planted.add((line - 1, line), e)
    path.write_bytes(b"".join(chunks))
    return planted


def main_entries(rows: Rows, held_rows: list[dict], n: int, *, per_class: int = 0) -> list[Entry]:
    """``n`` entries of every class, good rows included, in a random order (``per_class``: that
    many of each class instead, shuffled); duplicates and overlaps refer to rows already planted."""
    rng = rows.rng
    entries = [Entry("too_long", long_row(rows, 0, monster=5_000_000), None, "too_long", "long_context"),
               Entry("deep", "@@DEEP300000@@", ""), Entry("deep", "@@DEEPOBJ300000@@", "a"),
               Entry("deep", rows.with_value("metadata", "@@DEEPOBJ300000@@"), "metadata")]
    goods: list[dict] = []
    copied: set[str] = set()
    kinds = [*LOADER_CLASSES, "dup_id", "dup_content", "overlap", "too_long", "good"]
    weights = [10, 8, 10, 6, 10, 4, 6, 8, 4, 4, 4, 5, 4, 5, 4, 3, 40]
    drawn = [k for k in kinds for _ in range(per_class)]
    rng.shuffle(drawn)
    while (drawn if per_class else len(entries) < n):
        kind = drawn.pop() if per_class else rng.choices(kinds, weights)[0]
        k = len(entries)
        if kind in LOADER_CLASSES:
            entries.append(rows.entry(kind))
        elif kind == "dup_id" and goods:
            entries.append(Entry(kind, {**rows.good(plain=True), "id": str(rng.choice(goods)["id"])}, "id"))
        elif kind == "dup_content" and goods:
            entries.append(Entry(kind, {**rng.choice(goods), "id": f"dup{k}", "metadata": {"copy": k}}, None,
                                 "duplicate"))
        elif kind == "overlap":
            entries.append(Entry(kind, overlap_row(rng, rng.choice(held_rows), k, copied), None, "overlap",
                                 "short_context"))
        elif kind == "too_long":
            row = long_row(rows, k)
            name = "question" if len(row["question"]) > len(row["long_context"]) else "long_context"
            entries.append(Entry(kind, row, None, "too_long", name))
        else:
            row = rows.good()
            if "id" in row:
                goods.append(row)
            entries.append(Entry("good", row))
    return entries


def vary(text: str, rng: random.Random) -> str:
    """``text`` in other case, with other whitespace (zero-width spaces beside it)."""
    text = "".join(ch.swapcase() if rng.random() < 0.3 else ch for ch in text)
    return rng.choice(["", " ", "\t"]) + re.sub(" ", lambda _: rng.choice([" ", "  ", "\t", "\n ", " \u200b"]), text)


def overlap_row(rng: random.Random, held: dict, k: int, copied: set[str]) -> dict:
    """A training row equal to held-out row ``held`` (once per held row), else equal to it up to
    case and whitespace; its answer is its own, so no two of them are duplicates."""
    if held["id"] not in copied:
        copied.add(held["id"])
        return {**held, "id": f"ov{k}"}
    cs, q = vary(held["short_context"], rng), vary(held["question"], rng)
    return {"id": f"ov{k}", "long_context": f"{filler(rng)} {cs} {filler(rng)}", "short_context": cs, "question": q,
            "answer": f"{held['answer']} ({k})"}


def long_row(rows: Rows, k: int, monster: int = 0) -> dict:
    """A row longer than the window: moderately (counted to tell), or a monster (``monster``
    characters, or a random size) refused on its character count."""
    rng = rows.rng
    row = {**rows.good(plain=True), "id": f"long{k}"}
    pick = 1.0 if monster else rng.random()
    if pick < 0.6:
        row["long_context"] = " ".join(word(rng) for _ in range(1400)) + " " + row["long_context"]
    elif pick < 0.8:
        row["question"] = "Why " + "zorbla " * 40_000 + "?"
    else:
        sentence = filler(rng) + " "
        size = monster or rng.choice([3_000, 20_000])
        row["long_context"] = sentence * (size // len(sentence)) + row["long_context"]
    return row


def array_file(path: Path, rows: Rows, n: int, *, pretty: bool, broken: bool = False) -> Planted:
    """A JSON array saved as ``.jsonl``: element ``i`` is row ``i``, at the line it starts on.
    ``broken``: a colon missing in the last good element, so it and the rest are one error."""
    rng = rows.rng
    planted = Planted(path)
    text, starts = "[", []
    for i in range(n):
        cls = rng.choice(["good", "good", "good", "missing", "wrong_type", "invisible", "non_object", "huge_int",
                          "deep_element"])
        if cls == "deep_element":  # past the parser's limit: skipped by its brackets, the next one read
            e = Entry("deep", "@@DEEP%d@@" % rng.choice([100, 20_000]), "")
        else:
            e = Entry("good", rows.good(plain=True)) if cls == "good" else rows.entry(cls)
        text += ("," if i else "") + ("\n" if pretty else "")
        starts.append(len(text))
        planted.add((i, text.count("\n") + 1), e._replace(cls=f"array:{e.cls}"))
        text += _PLACEHOLDER.sub(_expand, json.dumps(e.row, indent=2 if pretty else None))
    text += "\n]\n" if pretty else "]"
    if broken:
        last = max(row for row, _ in planted.good)
        at = text.index('"question":', starts[last])
        text = text[:at] + '"question" ' + text[at + len('"question":'):]
        for key in [k for k in [*planted.good, *planted.bad] if k[0] >= last]:
            planted.good.pop(key, None)
            planted.bad.pop(key, None)
        planted.bad[(last, text.count("\n", 0, at) + 1)] = ""
    path.write_text(text, encoding="utf-8")
    return planted


def whole_file_cases(folder: Path, rows: Rows) -> list[Planted]:
    """The file-level classes: BOM, CR-only and mixed line ends, JSON arrays (pretty, compact,
    broken), and JSON lines whose first row is an array."""
    rng = rows.rng
    folder.mkdir()

    def entries(n: int) -> list[Entry]:
        kinds = ["good", "good", "good", *LOADER_CLASSES]
        return [Entry("good", rows.good()) if k == "good" else rows.entry(k)
                for k in (rng.choice(kinds) for _ in range(n))]

    out = [write_jsonl_file(folder / "bom.jsonl", entries(40), rng, bom=True),
           write_jsonl_file(folder / "cr_only.jsonl", entries(40), rng, ends=("\r",)),
           write_jsonl_file(folder / "mixed_ends.jsonl", entries(40), rng, ends=("\n", "\r\n", "\r")),
           write_jsonl_file(folder / "bom_crlf.jsonl", entries(20), rng, ends=("\r\n",), bom=True),
           array_file(folder / "array_pretty.jsonl", rows, 40, pretty=True),
           array_file(folder / "array_compact.jsonl", rows, 25, pretty=False),
           array_file(folder / "array_broken.jsonl", rows, 20, pretty=True, broken=True),
           write_jsonl_file(folder / "leading_array_row.jsonl", [Entry("non_object", [1, 2, 3], "")] + entries(10),
                            rng, blanks=False)]
    for p in out:
        p.classes[f"file:{p.path.stem}"] += 1
    return sorted(out, key=lambda p: p.path)


def table_rows(rows: Rows, n: int) -> tuple[list[dict], list[Entry]]:
    """Rows a Parquet table can carry (one type per column), and what each must become."""
    rng = rows.rng
    out: list[dict] = []
    entries: list[Entry] = []
    accepted: list[dict] = []
    for i in range(n):
        base = rows.good(plain=True)
        row = {**base, "answer": rng.choice([base["answer"], None]),
               "metadata": rng.choice([None, {"score": 0.5, "tag": "é"}])}
        cls = rng.choice(["good"] * 6 + ["invisible", "empty", "nul", "missing", "non_finite", "not_in_context",
                                         "dup_id", "dup_content", "too_long"])
        name = rng.choice(TEXT_FIELDS)
        later = bad = None
        if cls == "invisible":
            row[name], bad = "".join(rng.choice(INVISIBLE) for _ in range(3)) + rng.choice(FORMAT_CHARS), name
        elif cls == "empty":
            row[name], bad = rng.choice(["", "  "]), name
        elif cls == "nul":
            row[name], bad = row[name] + "\0", name
        elif cls == "missing":
            row[name], bad = None, name
        elif cls == "non_finite":
            row["metadata"], bad = {"score": float(rng.choice(["nan", "inf", "-inf"])), "tag": "x"}, "metadata"
        elif cls == "not_in_context":
            row["short_context"], bad = "Nowhere in the context.", "short_context"
        elif cls == "dup_id" and accepted:
            row["id"], bad = rng.choice(accepted)["id"], "id"
        elif cls == "dup_content" and accepted:
            row, later = {**rng.choice(accepted), "id": f"tdup{i}"}, ("duplicate", "")
        elif cls == "too_long":
            row["long_context"] = (filler(rng) + " ") * rng.choice([700, 4000]) + row["long_context"]
            later = ("too_long", "long_context")
        else:
            cls = "good"
        if bad is None:
            accepted.append(row)
        out.append(row)
        good = {k: v for k, v in row.items() if v is not None}
        entries.append(Entry(f"parquet:{cls}", good, bad, *(later or ("", ""))))
    return out, entries


def table_cases(folder: Path, rows: Rows) -> tuple[list[Planted], Planted]:
    """Parquet files (rows; a question column of ints; nesting too deep to read) and a
    ``datasets`` folder of the same rows."""
    import datasets

    folder.mkdir()
    table, entries = table_rows(rows, 160)
    planted = []
    for path, rows_, ents in [
        (folder / "a_rows.parquet", table, entries),
        (folder / "b_int_question.parquet", [{**rows.good(plain=True), "question": i} for i in range(12)], None),
        (folder / "c_too_deep.parquet", [{**rows.good(plain=True), "metadata": json.loads("[" * 70 + "]" * 70)}],
         [Entry("parquet:too_deep", None, "")]),
    ]:
        pq.write_table(pa.Table.from_pylist(rows_), path)
        ents = ents or [Entry("parquet:wrong_type", r, "question") for r in rows_]
        p = Planted(path)
        for i, e in enumerate(ents):
            p.add((i, None), e)
        p.classes[f"file:{path.stem}"] += 1
        planted.append(p)
    ds_folder = folder.parent / "dataset"
    datasets.Dataset.from_list(table).save_to_disk(str(ds_folder))
    dataset = Planted(ds_folder)
    for i, e in enumerate(entries):
        dataset.add((i, None), e._replace(cls=e.cls.replace("parquet", "datasets")))
    dataset.classes["file:datasets"] += 1
    return planted, dataset
