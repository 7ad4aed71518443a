"""A diverse long-context curriculum: many task families, templates and haystacks, mixed by config.

Each example is a (C_L, C_s, Q, answer) quadruple of one *family*:

=================  =======================================================  ================
family             what the question needs                                  evidence (C_s)
=================  =======================================================  ================
kv_lookup          the value stored under one key among distractor keys     one record
record_lookup      one field of one person's record among other records     one record
prose_attribute    an attribute of a person described in a prose sentence   one sentence
event_date         the date of one event among other dated events           one sentence
multi_hop          follow a link (person -> room) then a fact (room -> item) two sentences
comparison         which of two facts far apart is larger                   two sentences
counting           how many sentences mention one person's deliveries       2-5 sentences
=================  =======================================================  ================

Every family has training templates and held-out templates (disjoint wording) and draws its
names from split-specific pools (disjoint between ``train`` and ``heldout``); a whole family can
be kept out of training (leave-one-family-out evaluation, :mod:`opsdl_core.experiment`).

Haystacks: ``noise`` (generated village prose), ``prose`` (natural English from an offline
licensed source, :mod:`opsdl_core.data.tasks.prose`) and ``records`` (the noise haystack with three times
the distractor records). C_s of a multi-fact family is its evidence sentences in document order
joined by :data:`opsdl_core.data.examples.EVIDENCE_SEPARATOR` (the oracle teacher context locates each).

:func:`answer_from_short_context` re-derives every answer from C_s and Q alone by parsing them with
the template's own patterns; generation checks it on every example, and each answer, key and
distractor value occurs in C_L exactly where it was put (an example that breaks this is redrawn).
Determinism: every example has its own ``random.Random`` seeded from (family, split, seed,
length, index); the mixture is split into per-family counts by largest remainder.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...grading import answer_in_text
from ..examples import EVIDENCE_SEPARATOR, Example
from .families import (_POOLS, _POOLS_SPLIT, FAMILIES, KV_HELDOUT, KV_TRAIN, Family, Template, _value,
                       answer_from_short_context, family_names)
from .needle import _fit_length, _Layout, length_tolerance

__all__ = ["FAMILIES", "HAYSTACKS", "Family", "Template", "allocate", "generate_curriculum", "generate_family",
           "answer_from_short_context", "family_names"]

HAYSTACKS = ("noise", "prose", "records")


# --------------------------------------------------------------------------- one example
@dataclass
class _Drawn:
    evidence: list[str]  # the fact sentences C_s is made of (order of drawing)
    distractors: list[str]  # other fact sentences of the same template
    question: str
    answer: str
    wrong: list[str]  # values a wrong answer would name
    must_be_unique: list[str]  # strings that must occur exactly once in C_L
    key: str


def _distinct(rng: random.Random, pool: str, split: str, n: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    for _ in range(200 * (n + 1)):
        if len(out) == n:
            break
        v = _value(rng, pool, split)
        if v not in avoid and not any(v in a or a in v for a in avoid | set(out)):
            out.append(v)
    if len(out) < n:
        raise ValueError(f"value pool {pool!r} ({split}): cannot draw {n} distinct values; use fewer distractors")
    return out


def _kv_keys(split: str) -> tuple[str, ...]:
    from .needle import HELDOUT_KEYS, TRAIN_KEYS

    return TRAIN_KEYS if split == "train" else HELDOUT_KEYS


def _draw(fam: Family, t: Template, rng: random.Random, split: str, n_d: int) -> _Drawn:
    """The facts of one example: the evidence, ``n_d`` distractor facts, the question and answer."""
    fields = dict(fam.fields)
    if fam.name == "kv_lookup":
        kind = next(k.value_kind for k in KV_TRAIN + KV_HELDOUT if k.name == t.name)
        keys = rng.sample(_kv_keys(split), n_d + 1)
        vals = _distinct(rng, kind, split, n_d + 1, set())
        recs = [t.records[0].format(key=k, value=v) for k, v in zip(keys, vals)]
        return _Drawn([recs[0]], recs[1:], t.question.format(key=keys[0]), vals[0], vals[1:],
                      [keys[0], vals[0], *vals[1:]], keys[0])
    if fam.kind == "lookup":
        q_fields = re.findall(r"\{(\w+)\}", t.question)
        rows: list[dict[str, str]] = []
        answers: set[str] = set()
        keys_seen: set[tuple[str, ...]] = set()
        for _ in range(50 * (n_d + 1)):  # rows with distinct keys and distinct answers (pools bound n_d)
            if len(rows) == n_d + 1:
                break
            row = {f: _value(rng, pool, split) for f, pool in fields.items()}
            key = tuple(row[f] for f in q_fields)
            ans = row[t.answer]
            if key in keys_seen or any(ans in a or a in ans for a in answers):
                continue
            keys_seen.add(key)
            answers.add(ans)
            rows.append(row)
        recs = [t.records[0].format(**r) for r in rows]
        question = t.question.format(**rows[0])
        ans = rows[0][t.answer]
        wrong = [r[t.answer] for r in rows[1:]]
        keys = [rows[0][f] for f in q_fields]
        return _Drawn([recs[0]], recs[1:], question, ans, wrong, [ans] + (keys if len(keys) == 1 else []),
                      " / ".join(keys))
    if fam.kind == "multi_hop":
        n_d = min(n_d, len(_POOLS["item"]) - 1)  # one item per room
        names = _distinct(rng, "person", split, n_d + 1, set())
        rooms = _distinct(rng, "room", split, n_d + 1, set())
        items = rng.sample(_POOLS["item"], n_d + 1)
        links = [t.records[0].format(name=n, room=r) for n, r in zip(names, rooms)]
        facts = [t.records[1].format(room=r, item=i) for r, i in zip(rooms, items)]
        wrong = [i for i in items[1:] if i != items[0]]
        return _Drawn([links[0], facts[0]], links[1:] + facts[1:], t.question.format(name=names[0]), items[0], wrong,
                      [names[0], items[0]], names[0])
    if fam.kind == "comparison":
        n_d = min(n_d, len(_POOLS_SPLIT["town"][split]) - 2)  # one fact per town
        towns = _distinct(rng, "town", split, n_d + 2, set())
        heights = _distinct(rng, "height", split, n_d + 2, set())
        recs = [t.records[0].format(town=tw, height=h) for tw, h in zip(towns, heights)]
        a, b = towns[0], towns[1]
        ans = a if int(heights[0]) > int(heights[1]) else b
        qa, qb = (a, b) if rng.random() < 0.5 else (b, a)
        return _Drawn([recs[0], recs[1]], recs[2:], t.question.format(a=qa, b=qb), ans, [b if ans == a else a],
                      [*towns[:2], *heights[:2]], f"{a} / {b}")
    if fam.kind == "counting":
        k = rng.randint(2, 5)
        names = _distinct(rng, "person", split, 1 + max(1, n_d // 2), set())
        target = [t.records[0].format(name=names[0], town=tw) for tw in _distinct(rng, "town", split, k, set())]
        others = [t.records[0].format(name=rng.choice(names[1:]), town=_value(rng, "town", split)) for _ in range(n_d)]
        return _Drawn(target, others, t.question.format(name=names[0]), str(k), [str(k - 1), str(k + 1)],
                      [], names[0])
    raise ValueError(f"family kind {fam.kind!r}")


def _haystack_sentence(haystack: str, rng: random.Random, prose: str) -> Callable[[random.Random], str] | None:
    if haystack == "prose":
        from .prose import prose_source

        return prose_source(prose).stream(rng)
    return None  # noise and records: the generated village prose


def generate_family(family: str, *, n: int, split: str, target_tokens: int, count_tokens: Callable[[str], int],
                    seed: int, haystack: str = "noise", n_distractors: tuple[int, int] = (4, 12),
                    templates: str = "split", prose: str = "python-reference", start: int = 0) -> list[Example]:
    """``n`` examples of one family. ``templates``: ``"split"`` (the split's own templates),
    ``"train"`` or ``"heldout"`` (that set with the split's names), or ``"all"``."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {list(FAMILIES)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack {haystack!r}: expected one of {HAYSTACKS}")
    fam = FAMILIES[family]
    tpls = {"split": fam.templates(split), "train": fam.train, "heldout": fam.heldout,
            "all": fam.train + fam.heldout}.get(templates)
    if tpls is None:
        raise ValueError(f"templates={templates!r}: expected 'split', 'train', 'heldout' or 'all'")
    return [_one(fam, tpls, split, seed, target_tokens, count_tokens, haystack, n_distractors, prose, i)
            for i in range(start, start + n)]


def _one(fam: Family, tpls: tuple[Template, ...], split: str, seed: int, target: int,
         count_tokens: Callable[[str], int], haystack: str, n_distractors: tuple[int, int], prose: str,
         i: int) -> Example:
    ex_id = f"{fam.name}-{split}-{haystack}-s{seed}-t{target}-{i:05d}"
    tol = length_tolerance(target)
    last_err = ""
    for attempt in range(8):
        rng = random.Random(f"{fam.name}:{split}:{haystack}:{seed}:{target}:{i}:{attempt}")
        t = rng.choice(tpls)
        lo, hi = n_distractors
        if haystack == "records":
            lo, hi = 3 * lo, 3 * hi
        # cap the facts at about half the context
        per = max(1, count_tokens(t.records[0].format(**{k: "Xx Yy" for k in re.findall(r"\{(\w+)\}", t.records[0])})))
        cap = max(0, min(hi, int(0.5 * target / per) - 2))
        n_d = rng.randint(min(lo, cap), cap)
        d = _draw(fam, t, rng, split, n_d)
        records = d.evidence + d.distractors
        depths = [rng.random() for _ in records]
        if fam.kind == "comparison":  # the two facts far apart
            depths[0], depths[1] = rng.uniform(0.0, 0.35), rng.uniform(0.65, 1.0)
            if rng.random() < 0.5:
                depths[0], depths[1] = depths[1], depths[0]
        sentence = _haystack_sentence(haystack, rng, prose)
        layout = _Layout(random.Random(f"{ex_id}:{attempt}:filler"), records, depths, sentence)
        sample = " ".join(layout.filler(200))
        tpw = max(count_tokens(sample) / 200, 1e-3)
        rec_tokens = count_tokens(" ".join(records))
        try:
            text, _, n_tok = _fit_length(layout, count_tokens, target, tol, rec_tokens, tpw, f"example {ex_id}")
        except ValueError as err:
            last_err = str(err)
            continue
        problems = _problems(text, d)
        evidence = sorted(d.evidence, key=text.find)
        ex = Example(
            id=ex_id, long_context=text, short_context=EVIDENCE_SEPARATOR.join(evidence), question=d.question,
            answer=d.answer, source=f"curriculum:{fam.name}:{split}",
            metadata={**_scoring(fam, d.answer),
                      "family": fam.name, "template": t.name, "split": split, "haystack": haystack,
                      "haystack_source": _haystack_meta(haystack, prose), "key": d.key,
                      "n_evidence": len(d.evidence), "n_distractors": n_d, "distractor_answers": d.wrong,
                      "depths": [round(text.find(e) / max(1, len(text)), 4) for e in evidence],
                      "target_tokens": target, "actual_tokens": n_tok, "seed": seed, "index": i},
        )
        if not problems and answer_from_short_context(ex) != d.answer:
            problems.append(f"answer {d.answer!r} is not recoverable from C_s "
                            f"(checker says {answer_from_short_context(ex)!r})")
        if problems:
            last_err = "; ".join(problems)
            continue
        return ex
    raise RuntimeError(f"example {ex_id}: no valid example in 8 draws; last problem: {last_err}")


_COUNT_WORDS = {1: ("one", "once"), 2: ("two", "twice"), 3: ("three", "thrice"), 4: ("four",), 5: ("five",),
                6: ("six",)}


def _scoring(fam: Family, answer: str) -> dict[str, Any]:
    """How answers of this family are scored (``opsdl_core.data.tasks.needle.score_example``)."""
    if fam.kind == "comparison":
        return {"scoring": "first_mention"}  # "A is taller than B" names both: the first named is the answer
    if fam.kind == "counting":
        return {"answer_aliases": list(_COUNT_WORDS.get(int(answer), ()))}
    return {}


def _haystack_meta(haystack: str, prose: str) -> dict[str, str]:
    if haystack == "prose":
        from .prose import prose_source

        src = prose_source(prose)
        return {"name": src.name, "licence": src.licence}
    return {"name": "generated village prose (opsdl_core.data.tasks.needle)", "licence": "Apache-2.0 (this project)"}


def _problems(text: str, d: _Drawn) -> list[str]:
    out = []
    for ev in d.evidence:
        if text.count(ev) != 1:
            out.append(f"evidence {ev!r} occurs {text.count(ev)} times in C_L, expected once")
    for s in d.must_be_unique:
        if text.count(s) != 1:
            out.append(f"{s!r} occurs {text.count(s)} times in C_L, expected once")
    if d.answer.isdigit() and len(d.answer) >= 3 and re.search(rf"(?<!\d){d.answer}(?!\d)", text) is None:
        out.append(f"answer {d.answer!r} not in C_L")
    if not any(answer_in_text(d.answer, ev) for ev in d.evidence) and not d.answer.isdigit():
        out.append("answer not in the evidence")
    return out


# --------------------------------------------------------------------------- the mixture
def allocate(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` by ``weights`` with largest remainder (ties: the order given): the counts sum to
    ``n`` and each is within 1 of ``n * w / sum(w)``."""
    items = [(k, float(w)) for k, w in weights.items()]
    if not items or any(w < 0 or not math.isfinite(w) for _, w in items) or sum(w for _, w in items) <= 0:
        raise ValueError(f"mixture weights {dict(weights)}: expected non-negative numbers with a positive sum")
    total = sum(w for _, w in items)
    exact = [(k, n * w / total) for k, w in items]
    counts = {k: int(math.floor(x)) for k, x in exact}
    left = n - sum(counts.values())
    for k, _ in sorted(exact, key=lambda kx: -(kx[1] - math.floor(kx[1])))[:left]:
        counts[k] += 1
    return counts


def generate_curriculum(*, n: int, split: str, families: Mapping[str, float], lengths: Sequence[int],
                        count_tokens: Callable[[str], int], seed: int,
                        haystacks: Mapping[str, float] | None = None, n_distractors: tuple[int, int] = (4, 12),
                        length_order: str = "mixed", templates: str = "split",
                        prose: str = "python-reference") -> list[Example]:
    """``n`` examples mixed by ``families`` weights; within a family, context lengths and haystacks
    by ``lengths`` (equal shares) and ``haystacks`` weights. ``length_order``: ``"mixed"`` (seeded
    shuffle) or ``"ascending"`` (short contexts first, a length curriculum; families interleaved)."""
    if length_order not in ("mixed", "ascending"):
        raise ValueError(f"length_order={length_order!r}: expected 'mixed' or 'ascending'")
    if not lengths:
        raise ValueError("lengths: expected at least one context length")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families {unknown}: expected names among {list(FAMILIES)}")
    hay = dict(haystacks or {"noise": 1.0})
    bad = [h for h in hay if h not in HAYSTACKS]
    if bad:
        raise ValueError(f"haystacks {bad}: expected names among {HAYSTACKS}")
    out: list[Example] = []
    for f, k in allocate(n, families).items():
        # k examples of this family: haystacks by weight, lengths in equal shares (round robin)
        hays = [h for h, c in allocate(k, hay).items() for _ in range(c)]
        plan: dict[tuple[int, str], int] = {}
        for j, h in enumerate(hays):
            plan[(lengths[j % len(lengths)], h)] = plan.get((lengths[j % len(lengths)], h), 0) + 1
        start = 0
        for (L, h), c in sorted(plan.items()):
            out += generate_family(f, n=c, split=split, target_tokens=L, count_tokens=count_tokens, seed=seed,
                                   haystack=h, n_distractors=n_distractors, templates=templates, prose=prose,
                                   start=start)
            start += c
    rng = random.Random(f"curriculum:{split}:{seed}")
    rng.shuffle(out)
    if length_order == "ascending":
        out.sort(key=lambda e: e.metadata["target_tokens"])  # stable: families stay interleaved
    return out
