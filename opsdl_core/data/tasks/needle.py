"""Seeded multi-key needle ("kv_needle") examples at target lengths in the model's own tokens.

Each example hides one *needle* record (``"The access code for amber falcon is 4821937."``)
among several *distractor* records of the same template (other keys, other values) in
generated filler prose.  ``C_s`` is the needle sentence exactly as it appears in ``C_L``,
``Q`` the template's question about the needle key, ``answer`` the needle value.

Determinism: every example draws from its own ``random.Random`` seeded with the string
``"kv_needle:{split}:{seed}:{target_tokens}:{i}"`` (never the global RNG), so train and
held-out streams are disjoint, and the same call always returns the same examples.
Train and held-out use disjoint template names, template wording and key pools.

Length: the filler is a prefix of a per-example sentence stream, cut at word granularity.
The generator measures the record tokens and a filler sample once, guesses the filler
word count from tokens-per-word, then corrects with secant steps on the full ``C_L``
(bracketed, falling back to bisection) aiming at ±1% (at least ±2 tokens) and accepting
anything within ``max(0.05 * target_tokens, 8)`` - typically 3-4 ``count_tokens`` calls per
example, each on a string no longer than ``C_L``.
"""
from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ...grading import answer_in_text
from ..examples import Example

__all__ = [
    "Template",
    "TRAIN_TEMPLATES",
    "HELDOUT_TEMPLATES",
    "TRAIN_KEYS",
    "HELDOUT_KEYS",
    "FAMILY",
    "length_tolerance",
    "generate_examples",
]

FAMILY = "kv_needle"


@dataclass(frozen=True)
class Template:
    """A record sentence and its question.  ``record`` has ``{key}`` and ``{value}``;
    ``question`` has ``{key}``.  ``value_kind``: ``"digits"`` (a 5-7 digit number) or
    ``"code"`` (two capitals, a dash, four digits, e.g. ``QX-4821``)."""

    name: str
    record: str
    question: str
    value_kind: Literal["digits", "code"] = "digits"


TRAIN_TEMPLATES: tuple[Template, ...] = (
    Template("access_code", "The access code for {key} is {value}.", "What is the access code for {key}?"),
    Template("serial_number", "The serial number assigned to {key} is {value}.",
             "What serial number is assigned to {key}?", "code"),
    Template("shipment_tracking", "Shipment {key} carries tracking number {value}.",
             "What tracking number does shipment {key} carry?"),
    Template("badge_id", "The badge issued to {key} reads {value}.", "What does the badge issued to {key} read?", "code"),
    Template("ledger_credits", "The ledger shows that {key} owes exactly {value} credits.",
             "How many credits does {key} owe according to the ledger?"),
    Template("radio_channel", "{key} broadcasts on channel {value}.", "On which channel does {key} broadcast?"),
    Template("locker_assignment", "Locker {value} has been assigned to {key}.", "Which locker has been assigned to {key}?",
             "code"),
)

HELDOUT_TEMPLATES: tuple[Template, ...] = (
    Template("magic_number", "One of the special magic numbers for {key} is: {value}.",
             "What is the special magic number for {key} mentioned in the provided text?"),
    Template("vault_dial", "To open the vault of {key}, turn the dial to {value}.",
             "Which dial setting opens the vault of {key}?"),
    Template("passport", "{key} travels under passport {value}.", "Under which passport does {key} travel?", "code"),
    Template("licence_plate", "The car parked by {key} displays the plate {value}.",
             "What plate does the car parked by {key} display?", "code"),
)

# Key pools: "<Adjective> <noun>" pairs and "<Place>-<10..99>" tags, disjoint words per split.
_TRAIN_ADJ = ("amber", "crimson", "silver", "rapid", "golden", "hollow", "velvet", "frosty", "lucky", "noble",
              "rustic", "scarlet", "swift", "tawny", "copper", "ivory")
_TRAIN_NOUN = ("falcon", "otter", "badger", "comet", "lantern", "anchor", "walrus", "pelican", "saddle", "kettle",
               "garnet", "beetle", "marlin", "compass", "thistle", "raven")
_TRAIN_PLACE = ("Harbor", "Summit", "Bastion", "Canyon", "Pioneer", "Redwood", "Granite", "Oakmont")
_HELDOUT_ADJ = ("azure", "cobalt", "dusky", "ember", "jade", "lilac", "mossy", "onyx", "pale", "russet", "umber",
                "wistful")
_HELDOUT_NOUN = ("lynx", "heron", "cedar", "quokka", "tapir", "zephyr", "sparrow", "ferret", "nebula", "oriole",
                 "puffin", "yarrow")
_HELDOUT_PLACE = ("Quarry", "Beacon", "Citadel", "Foxglove", "Juniper", "Mariner")


def _key_pool(adjs: Sequence[str], nouns: Sequence[str], places: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{a} {n}" for a in adjs for n in nouns) + tuple(f"{p}-{k}" for p in places for k in range(10, 100))


TRAIN_KEYS: tuple[str, ...] = _key_pool(_TRAIN_ADJ, _TRAIN_NOUN, _TRAIN_PLACE)
HELDOUT_KEYS: tuple[str, ...] = _key_pool(_HELDOUT_ADJ, _HELDOUT_NOUN, _HELDOUT_PLACE)

# Filler vocabulary: landscape / weather / village life; no digits, no key or template words.
_F_ADJ = ("quiet", "narrow", "distant", "muddy", "sunlit", "windy", "ancient", "crowded", "gentle", "weathered",
          "bright", "silent", "damp", "wide", "steep", "faded", "busy", "lonely", "green", "cold", "warm", "small")
_F_NOUN = ("river", "meadow", "village", "orchard", "bridge", "market", "forest", "valley", "chapel", "garden",
           "harvest", "fisherman", "shepherd", "baker", "traveller", "cottage", "hillside", "path", "well", "barn",
           "lake", "mill", "wagon", "festival", "choir", "fence", "kitchen", "storm", "season", "potter")
_F_VERB_PAST = ("rested", "wandered", "waited", "lingered", "glowed", "trembled", "settled", "faded", "echoed",
                "drifted", "gathered", "shifted", "returned", "paused", "vanished", "softened")
_F_VERB_BASE = ("change", "listen", "gather", "wander", "return", "settle", "recover", "travel", "sing", "rest")
_F_ADV = ("slowly", "quietly", "gently", "early", "often", "rarely", "calmly", "suddenly", "patiently", "softly")
_F_PREP = ("near", "beyond", "beside", "under", "across", "behind", "along", "toward", "past", "around")
_F_TIME = ("In the morning", "By late afternoon", "Every autumn", "Long before the winter", "After the rain",
           "On most evenings", "During the spring fair", "At first light", "Later that week", "Once in a while")
_F_PATTERNS = (
    "The {a} {n} {v} {p} the {n2}.",
    "{t}, the {n} {v} {adv}.",
    "Nobody expected the {n} to {vb} so {adv}.",
    "A {a} {n} {v} {p} the {n2} while the {n3} {v2}.",
    "{t}, people from the {n} would {vb} {p} the {a} {n2}.",
    "Some said the {n2} {v} {adv}, but the {a} {n} never did.",
    "It was a {a} day, and the {n} {v} {p} the {a2} {n2}.",
    "The old {n} remembered how the {n2} {v} {adv} {p} the {n3}.",
)


def _filler_sentence(rng: random.Random) -> str:
    pat = rng.choice(_F_PATTERNS)
    n, n2, n3 = rng.sample(_F_NOUN, 3)
    a, a2 = rng.sample(_F_ADJ, 2)
    v, v2 = rng.sample(_F_VERB_PAST, 2)
    return pat.format(a=a, a2=a2, n=n, n2=n2, n3=n3, v=v, v2=v2, vb=rng.choice(_F_VERB_BASE),
                      adv=rng.choice(_F_ADV), p=rng.choice(_F_PREP), t=rng.choice(_F_TIME))


def _fragments(text: str) -> list[str]:
    """Fixed wording of a template (placeholders removed), lower-cased, multi-word pieces only."""
    parts = re.split(r"\{key\}|\{value\}", text)
    return [p.strip(" .,:?").lower() for p in parts if len(p.strip(" .,:?").split()) >= 2]


def _check_split_design() -> None:
    """Import-time guard: train/held-out names, wording, key words and filler words disjoint."""
    train_names = {t.name for t in TRAIN_TEMPLATES}
    held_names = {t.name for t in HELDOUT_TEMPLATES}
    assert not train_names & held_names, f"template names overlap: {train_names & held_names}"
    train_text = " | ".join(f"{t.record} {t.question}".lower() for t in TRAIN_TEMPLATES)
    held_text = " | ".join(f"{t.record} {t.question}".lower() for t in HELDOUT_TEMPLATES)
    for t in HELDOUT_TEMPLATES:
        for frag in _fragments(t.record) + _fragments(t.question):
            assert frag not in train_text, f"held-out wording {frag!r} of {t.name} occurs in train templates"
    for t in TRAIN_TEMPLATES:
        for frag in _fragments(t.record) + _fragments(t.question):
            assert frag not in held_text, f"train wording {frag!r} of {t.name} occurs in held-out templates"
    train_words = {w.lower() for w in _TRAIN_ADJ + _TRAIN_NOUN + _TRAIN_PLACE}
    held_words = {w.lower() for w in _HELDOUT_ADJ + _HELDOUT_NOUN + _HELDOUT_PLACE}
    assert not train_words & held_words, f"key words overlap: {train_words & held_words}"
    filler = {w.lower() for group in (_F_ADJ, _F_NOUN, _F_VERB_PAST, _F_VERB_BASE, _F_ADV, _F_PREP) for w in group}
    filler |= {w.lower() for phrase in _F_TIME + _F_PATTERNS for w in re.findall(r"[A-Za-z]+", phrase)}
    assert not filler & (train_words | held_words), f"filler uses key words: {filler & (train_words | held_words)}"


_check_split_design()


# --------------------------------------------------------------------------- generation
def length_tolerance(target_tokens: int) -> float:
    """Allowed |count_tokens(C_L) - target_tokens|: 5% of the target, at least 8 tokens."""
    return max(0.05 * target_tokens, 8.0)


def _value(rng: random.Random, kind: str) -> str:
    if kind == "digits":
        n_digits = rng.randint(5, 7)
        return str(rng.randint(10 ** (n_digits - 1), 10**n_digits - 1))
    if kind == "code":
        return f"{''.join(rng.choices(string.ascii_uppercase, k=2))}-{rng.randint(1000, 9999)}"
    raise ValueError(f"template value_kind {kind!r}: expected 'digits' or 'code'")


class _Layout:
    """Filler stream plus records at fixed relative depths; ``text(W)`` uses W filler words.
    ``sentence(rng)`` gives the next filler sentence (default: the generated village prose)."""

    def __init__(self, rng: random.Random, records: list[str], depths: list[float],
                 sentence: Callable[[random.Random], str] | None = None):
        self._rng = rng
        self._sentence = sentence or _filler_sentence
        self._sentences: list[list[str]] = []
        self._words = 0
        self.records, self.depths = records, depths
        self.par_every = rng.randint(4, 8)

    def _ensure(self, n_words: int) -> None:
        while self._words < n_words:
            words = self._sentence(self._rng).split()
            self._sentences.append(words)
            self._words += len(words)

    def filler(self, n_words: int) -> list[str]:
        self._ensure(n_words)
        out, left = [], n_words
        for words in self._sentences:
            if left <= 0:
                break
            take = words[:left]
            sent = " ".join(take)
            out.append(sent if sent.endswith(".") else sent.rstrip(",") + ".")
            left -= len(take)
        return out

    def text(self, n_words: int) -> tuple[str, int]:
        """C_L with ``n_words`` filler words, and the char offset of record 0 (the needle)."""
        fill = self.filler(n_words)
        slots: list[list[int]] = [[] for _ in range(len(fill) + 1)]
        for r, depth in enumerate(self.depths):
            slots[round(depth * len(fill))].append(r)
        units: list[tuple[str, int | None]] = []
        for pos in range(len(fill) + 1):
            units.extend((self.records[r], r) for r in slots[pos])
            if pos < len(fill):
                units.append((fill[pos], None))
        pieces, offset, needle_at = [], 0, -1
        for k, (unit, rec) in enumerate(units):
            if k:
                sep = "\n\n" if k % self.par_every == 0 else " "
                pieces.append(sep)
                offset += len(sep)
            if rec == 0:
                needle_at = offset
            pieces.append(unit)
            offset += len(unit)
        return "".join(pieces), needle_at


def _fit_length(layout: _Layout, count_tokens: Callable[[str], int], target: int, tol: float,
                record_tokens: int, tokens_per_word: float, where: str) -> tuple[str, int, int]:
    """Find a filler word count W with |count_tokens(C_L) - target| <= tol; returns (C_L, needle offset, tokens)."""
    aim = max(2.0, 0.01 * target)  # aim at ±1% (at least ±2), accept the tolerance after the iteration cap
    lo, hi = 0, None  # lo: W known to give <= target (W=0 assumed); hi: W known to give > target
    w = max(0, round((target - record_tokens) / tokens_per_word))
    best: tuple[float, str, int, int] | None = None
    for _ in range(24):
        text, needle_at = layout.text(w)
        n = count_tokens(text)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), text, needle_at, n)
        if abs(n - target) <= aim:
            break
        if n < target:
            lo = max(lo, w)
        else:
            hi = w if hi is None else min(hi, w)
            if w == 0:
                break
        rate = (n - record_tokens) / w if w > 0 and n > record_tokens else tokens_per_word
        guess = w + round((target - n) / max(rate, 1e-3))
        if guess == w:
            guess = w + (1 if n < target else -1)
        upper = hi if hi is not None else max(guess, 2 * w + 16)
        if upper - lo <= 1:
            break
        w = guess if lo < guess < upper else (lo + upper) // 2
    assert best is not None
    gap, text, needle_at, n = best
    if gap > tol:
        raise ValueError(f"{where}: could not reach target_tokens={target} within ±{tol:.1f}: closest C_L has {n} "
                         f"tokens (the records alone take ~{record_tokens}); use a larger target or fewer distractors")
    return text, needle_at, n


def generate_examples(
    *,
    n: int,
    split: Literal["train", "heldout"],
    target_tokens: int,
    count_tokens: Callable[[str], int],
    seed: int,
    n_distractors: int | tuple[int, int] = (4, 12),
    templates: Sequence[Template] | None = None,
) -> list[Example]:
    """Generate ``n`` multi-key needle examples whose ``C_L`` has ``target_tokens`` tokens
    (± :func:`length_tolerance`) as measured by ``count_tokens``.

    ``n_distractors`` is a fixed count or an inclusive ``(low, high)`` range; with a range,
    ``high`` is lowered (not below ``low``) so that the records take at most about half the
    target.  ``templates`` overrides the split's templates (the key pool stays the split's).
    Raises ``ValueError`` for bad arguments or a target too small for the records."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    if n < 0 or target_tokens <= 0:
        raise ValueError(f"n={n}, target_tokens={target_tokens}: expected n >= 0 and target_tokens > 0")
    lo_d, hi_d = (n_distractors, n_distractors) if isinstance(n_distractors, int) else tuple(n_distractors)
    if not 0 <= lo_d <= hi_d:
        raise ValueError(f"n_distractors={n_distractors!r}: expected an int >= 0 or (low, high) with 0 <= low <= high")
    tpls = tuple(templates) if templates is not None else (TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES)
    if not tpls:
        raise ValueError("templates: expected at least one Template")
    keys = TRAIN_KEYS if split == "train" else HELDOUT_KEYS
    if hi_d + 1 > len(keys):
        raise ValueError(f"n_distractors={n_distractors!r}: at most {len(keys) - 1} distractors (key pool size)")
    tol = length_tolerance(target_tokens)
    out = []
    for i in range(n):
        out.append(_one_example(i, split, seed, target_tokens, tol, count_tokens, lo_d, hi_d, tpls, keys))
    return out


def _one_example(i: int, split: str, seed: int, target: int, tol: float, count_tokens: Callable[[str], int],
                 lo_d: int, hi_d: int, tpls: tuple[Template, ...], keys: tuple[str, ...]) -> Example:
    ex_id = f"{FAMILY}-{split}-s{seed}-t{target}-{i:05d}"
    rng = random.Random(f"{FAMILY}:{split}:{seed}:{target}:{i}")
    tpl = rng.choice(tpls)
    needle_key, *other_keys = rng.sample(keys, hi_d + 1)
    answer = _value(rng, tpl.value_kind)
    values: list[str] = []
    while len(values) < hi_d:  # distinct values, none containing the answer or each other's text
        v = _value(rng, tpl.value_kind)
        if answer not in v and v not in answer and v not in values:
            values.append(v)
    needle = tpl.record.format(key=needle_key, value=answer)
    records_all = [needle] + [tpl.record.format(key=k, value=v) for k, v in zip(other_keys, values)]

    # Measure once: records and a filler sample (tokens per filler word).
    filler_rng = random.Random(f"{FAMILY}:{split}:{seed}:{target}:{i}:filler")
    layout = _Layout(filler_rng, records_all, [])
    sample = " ".join(layout.filler(200))
    tokens_per_word = max(count_tokens(sample) / 200, 1e-3)
    record_tokens_all = count_tokens(" ".join(records_all))
    per_record = record_tokens_all / len(records_all)
    cap = max(lo_d, min(hi_d, int(0.5 * target / per_record) - 1))
    n_d = rng.randint(lo_d, cap)
    records = records_all[: n_d + 1]
    record_tokens = round(per_record * len(records))
    if record_tokens > target + tol:
        raise ValueError(f"example {ex_id}: target_tokens={target} is too small: needle plus {n_d} distractors take "
                         f"~{record_tokens} tokens; expected target_tokens >= ~{2 * record_tokens}")
    depths = [rng.random() for _ in records]
    layout.records, layout.depths = records, depths
    long_context, needle_at, n_tokens = _fit_length(layout, count_tokens, target, tol, record_tokens,
                                                   tokens_per_word, f"example {ex_id}")
    question = tpl.question.format(key=needle_key)

    # Deterministic answerability checks: the needle is the only place the key and answer occur.
    assert long_context[needle_at:needle_at + len(needle)] == needle, f"{ex_id}: needle offset wrong"
    problems = []
    if long_context.count(needle) != 1:
        problems.append(f"needle sentence occurs {long_context.count(needle)} times in C_L, expected once")
    if long_context.count(needle_key) != 1:
        problems.append(f"needle key {needle_key!r} occurs {long_context.count(needle_key)} times in C_L, expected once")
    if long_context.count(answer) != 1:
        problems.append(f"answer {answer!r} occurs {long_context.count(answer)} times in C_L, expected once")
    if not answer_in_text(answer, needle):
        problems.append("answer not recoverable from the needle sentence")
    if problems:
        raise RuntimeError(f"example {ex_id}: generator invariant failed: " + "; ".join(problems))

    return Example(
        id=ex_id,
        long_context=long_context,
        short_context=needle,
        question=question,
        answer=answer,
        source=f"synthetic:{FAMILY}:{split}",
        metadata={
            "family": FAMILY,
            "template": tpl.name,
            "split": split,
            "key": needle_key,
            "depth": round(needle_at / max(1, len(long_context) - len(needle)), 4),
            "n_distractors": n_d,
            "distractor_answers": values[:n_d],
            "target_tokens": target,
            "actual_tokens": n_tokens,
            "seed": seed,
            "index": i,
        },
    )
