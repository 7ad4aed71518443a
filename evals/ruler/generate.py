"""Offline generators for RULER's purely synthetic tasks, at lengths counted in the evaluated
model's own tokens.

Tasks (names and prompt wording as in RULER, NVIDIA 2024, and lm-eval's ``tasks/ruler``):

* ``niah_single_1``   one needle ("One of the special magic numbers for {key} is: {value}.") in a
  repeated-sentence haystack; key a word, value a 7-digit number.
* ``niah_multikey_2`` the haystack is made of other needles (distractor keys and values); keys
  words, values numbers.
* ``niah_multikey_3`` as multikey_2 with UUID keys and UUID values.
* ``vt``              variable tracking: a chain ``VAR X1 = 12345``, ``VAR X2 = VAR X1``, ... hidden
  in the repeated haystack; the answer is every variable of the chain.
* ``cwe``             common-words extraction: a numbered word list in which 10 words appear 30
  times and the others 3 times (6 and 1 below 4K tokens); the answer is the 10 common words.
* ``fwe``             frequent-words extraction: "coded" words drawn from a Zipf distribution; the
  answer is the 3 most frequent.

Differences from lm-eval's implementation, on purpose: no download (needle keys are built in; cwe
draws from ``wonderwords``' lists as RULER does, read from the installed package), every sample is seeded from (task, length, index, seed), the needle
depth can be requested, and the haystack size is fitted per sample by bisection on the model's
token count (lm-eval fits it once on the first sample); cwe has no in-context example list.  The word lists differ from
``wonderwords``', so individual samples differ from lm-eval's; the task definitions do not.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TASKS", "RulerSample", "LengthTooSmall", "generate", "string_match_all", "string_match_part", "DEPTHS",
           "generation_budget", "largest_fitting"]

CountTokens = Callable[[str], int]

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's 40 evenly spaced depths, in percent

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are:")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                "above list?")
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.\n{context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"

_ADJ = ("able", "acidic", "aloof", "amber", "ancient", "angry", "bashful", "bitter", "bold", "brave", "brief",
        "bright", "busy", "calm", "careful", "cheap", "chilly", "clever", "cloudy", "clumsy", "coarse", "cozy",
        "crisp", "curious", "damp", "dapper", "dark", "eager", "early", "earnest", "empty", "faint", "fancy",
        "fierce", "fluffy", "fragile", "fresh", "frozen", "gentle", "giant", "glossy", "grumpy", "hollow",
        "humble", "icy", "jolly", "keen", "lazy", "lively", "lucky", "merry", "misty", "modest", "narrow", "noisy",
        "odd", "plain", "polite", "proud", "quick", "quiet", "rapid", "rare", "rough", "rusty", "shaggy", "shiny",
        "silent", "sleepy", "smooth", "soft", "solid", "spicy", "steady", "sticky", "stormy", "sturdy", "subtle",
        "sunny", "swift", "tame", "tender", "tidy", "tiny", "vast", "vivid", "warm", "weary", "wild", "witty")
_NOUN = ("anchor", "apple", "arrow", "badge", "banjo", "barrel", "basket", "beacon", "blanket", "bottle", "bucket",
         "button", "cabin", "camel", "candle", "canoe", "carpet", "castle", "cattle", "cellar", "chair", "cherry",
         "cloak", "clock", "cobra", "comet", "copper", "cotton", "crayon", "cricket", "dagger", "desk", "dolphin",
         "donkey", "drum", "eagle", "engine", "falcon", "feather", "fiddle", "flute", "forest", "fossil", "garden",
         "giraffe", "glove", "goblet", "hammer", "harbor", "helmet", "hermit", "honey", "island", "jacket",
         "kettle", "ladder", "lantern", "lemon", "lizard", "magnet", "marble", "meadow", "mirror", "monkey",
         "needle", "oyster", "paddle", "parrot", "pebble", "pepper", "pillow", "pirate", "planet", "pocket",
         "puzzle", "rabbit", "ribbon", "rocket", "saddle", "salmon", "scarf", "shovel", "spider", "statue",
         "tablet", "teapot", "thistle", "tiger", "tunnel", "turtle", "violin", "wagon", "walnut", "whistle")
WORDS = tuple(f"{a}-{n}" for a in _ADJ for n in _NOUN)  # needle keys ("words")


@functools.lru_cache(maxsize=1)
def cwe_vocabulary() -> tuple[str, ...]:
    """cwe's words, as RULER draws them: wonderwords' noun, adjective and verb lists (MIT licence,
    shipped in the package), one-word entries only, sorted; a few thousand words."""
    from importlib.resources import files

    words: set[str] = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        text = files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
        words |= {w.strip() for w in text.splitlines() if w.strip().isalpha() and w.strip().islower()}
    return tuple(sorted(words))


@dataclass(frozen=True)
class RulerSample:
    task: str
    length: int  # the requested maximum prompt + answer length, in the model's tokens
    index: int
    input: str  # the prompt, without the answer prefix
    outputs: list[str]  # every reference that must appear in the answer
    gen_prefix: str  # the start of the assistant's answer (RULER's answer prefix)
    n_tokens: int  # tokens of input (+ prefix), as counted
    depth: float | None = None  # needle / chain start depth in percent (NIAH, VT)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "length": self.length, "index": self.index, "input": self.input,
                "outputs": list(self.outputs), "gen_prefix": self.gen_prefix, "n_tokens": self.n_tokens,
                "depth": self.depth, "max_length": self.length, **self.metadata}


def _rand(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return rng.choice(WORDS)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}; expected 'numbers', 'words' or 'uuids'")


def _insert_at_depth(units: list[str], item: str, depth: float) -> list[str]:
    pos = int(round(len(units) * depth / 100))
    return units[:pos] + [item] + units[pos:]


def _niah(rng: random.Random, n_units: int, depth: float, *, haystack: str, type_k: str, type_v: str):
    key, value = _rand(rng, type_k), _rand(rng, type_v)
    if haystack == "repeat":
        units = [REPEAT] * n_units
    else:  # other needles, with keys that differ from the asked one
        units = []
        while len(units) < n_units:
            k = _rand(rng, type_k)
            if k != key:
                units.append(NEEDLE.format(type_v=type_v, key=k, value=_rand(rng, type_v)))
    units = _insert_at_depth(units, NEEDLE.format(type_v=type_v, key=key, value=value), depth)
    context = "\n".join(units) if haystack != "repeat" else " ".join(units)
    single_v = type_v[:-1]  # one needle asked: singular wording, as RULER does
    prompt = (NIAH_TEMPLATE.replace("Some", "A").replace("are all", "is").replace("are", "is")
              .format(type_v=single_v, context=context, query=key))
    prefix = NIAH_PREFIX.replace("are", "is").format(type_v=single_v, query=key)
    return prompt, [value], prefix, {"key": key}


def _vt(rng: random.Random, n_units: int, depth: float, *, n_hops: int = 4):
    value = str(rng.randint(10_000, 99_999))
    names = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, len(names))]
    units = [REPEAT] * n_units
    # the chain is spread evenly from the requested depth to the end, in order
    start = int(round(n_units * depth / 100))
    span = max(n_units - start, 0)
    positions = [start + (span * i) // len(chain) for i in range(len(chain))]
    for offset, (pos, stmt) in enumerate(zip(positions, chain)):
        units.insert(pos + offset, stmt + ".")
    prompt = VT_TEMPLATE.format(context=" ".join(units), query=value)
    return prompt, names, VT_PREFIX.format(num_v=len(names), query=value), {"value": value}


def _cwe(rng: random.Random, n_units: int, depth: float, *, length: int, n_common: int = 10):
    # RULER: below 4K tokens the common words appear 6 times and the others once; else 30 and 3
    freq_common, freq_rare = (6, 1) if length < 4096 else (30, 3)
    vocab = cwe_vocabulary()
    words = rng.sample(vocab, min(len(vocab), n_common + max(n_units, 1)))
    common, rare = words[:n_common], words[n_common : n_common + max(n_units, 1)]
    items = [w for w in common for _ in range(freq_common)] + [w for w in rare for _ in range(freq_rare)]
    rng.shuffle(items)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    return CWE_TEMPLATE.format(context=context), common, CWE_PREFIX, {}


def _fwe(rng: random.Random, n_units: int, depth: float, *, alpha: float = 2.0, vocab: int = 1000):
    # Zipf-like frequencies over random 6-letter "coded" words; the top three are unique
    coded = []
    while len(coded) < vocab:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        if w not in coded:
            coded.append(w)
    weights = [1.0 / (k + 1) ** alpha for k in range(vocab)]
    items = rng.choices(coded, weights=weights, k=max(n_units, 10))
    counts = Counter(items).most_common()
    while len(counts) > 3 and counts[2][1] == counts[3][1]:  # break a tie for third place
        items.append(counts[2][0])
        counts = Counter(items).most_common()
    rng.shuffle(items)
    top = [w for w, _ in Counter(items).most_common(3)]
    return FWE_TEMPLATE.format(context=" .... ".join(items)), top, FWE_PREFIX, {}


class LengthTooSmall(ValueError):
    """Even the smallest instance of a task does not fit the requested length."""


def generation_budget(tokens_to_generate: int, length: int) -> int:
    """Tokens reserved for the answer when fitting a prompt into ``length``: the task's budget,
    capped at a quarter of the length (RULER reserves 128 tokens at 4K and above; at 256 tokens that
    would leave 96 for the prompt). The reserve only sizes the prompt: generation still stops at
    the model's end-of-turn token or ``max_gen_toks``."""
    return min(tokens_to_generate, length // 4)


_BUILDERS: dict[str, Callable[..., tuple[str, list[str], str, dict]]] = {
    "niah_single_1": lambda rng, n, d, L: _niah(rng, n, d, haystack="repeat", type_k="words", type_v="numbers"),
    "niah_multikey_2": lambda rng, n, d, L: _niah(rng, n, d, haystack="needle", type_k="words", type_v="numbers"),
    "niah_multikey_3": lambda rng, n, d, L: _niah(rng, n, d, haystack="needle", type_k="uuids", type_v="uuids"),
    "vt": lambda rng, n, d, L: _vt(rng, n, d),
    "cwe": lambda rng, n, d, L: _cwe(rng, n, d, length=L),
    "fwe": lambda rng, n, d, L: _fwe(rng, n, d),
}
_HAS_DEPTH = {"niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt"}
# cwe grows by rare words, fwe by coded words
_MIN_UNITS = {"cwe": 0, "fwe": 10}



def largest_fitting(tokens_at: Callable[[int], int], lo: int, budget: int, cap: int | None,
                    too_few: Callable[[int], str]) -> int:
    """The largest haystack size ``n >= lo`` (at most ``cap``) whose prompt fits ``budget`` tokens,
    ``tokens_at(n)`` growing with ``n`` and ``tokens_at(lo) <= budget``: an exponential search for an
    upper bound, then bisection. ``ValueError(too_few(tokens))`` when all ``cap`` units still fit."""
    hi = max(lo + 1, 2)
    while tokens_at(hi) <= budget:
        if cap is not None and hi >= cap:
            raise ValueError(too_few(tokens_at(hi)))
        lo, hi = hi, min(hi * 2, cap) if cap is not None else hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens_at(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _max_units(task: str) -> int | None:
    """The most haystack units a task can use (cwe: its vocabulary), or None (unbounded)."""
    return len(cwe_vocabulary()) - 10 if task == "cwe" else None


def generate(task: str, *, length: int, n: int, count_tokens: CountTokens, seed: int = 42,
             tokens_to_generate: int = 128, depths: Sequence[float] | None = None,
             overhead_tokens: int = 0) -> list[RulerSample]:
    """``n`` samples of ``task`` whose prompt (+ answer prefix) + ``tokens_to_generate`` +
    ``overhead_tokens`` (e.g. a chat template's tokens) fits in ``length`` model tokens, as large
    as fits (``tokens_to_generate`` is capped by :func:`generation_budget`).  ``depths`` (percent, cycled) fixes the needle depth; default: RULER's 40 depths, drawn
    per sample.  Raises :class:`LengthTooSmall` (a ``ValueError``) naming the task and length when even the smallest haystack
    does not fit."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown RULER task {task!r}; expected one of {TASKS}")
    tokens_to_generate = generation_budget(tokens_to_generate, length)
    budget = length - tokens_to_generate - overhead_tokens
    cap = _max_units(task)
    return fit_samples(
        task, length=length, n=n, seed=seed, depths=depths, budget=budget, count_tokens=count_tokens,
        build_prompt=lambda rng, units, d, i: _BUILDERS[task](rng, units, d, length), lo=_MIN_UNITS.get(task, 1),
        cap=cap, has_depth=task in _HAS_DEPTH,
        budget_note=f" (= length - tokens_to_generate {tokens_to_generate} - overhead {overhead_tokens})",
        too_few=lambda filled: (f"{task} at length {length}: {cap} haystack units (all there are) fill only {filled} "
                                f"of {budget} tokens; expected a smaller length"))


def fit_samples(task: str, *, length: int, n: int, seed: int, depths: Sequence[float] | None, budget: int,
                count_tokens: CountTokens, build_prompt: Callable[..., tuple[str, list[str], str, dict]], lo: int,
                cap: int | None, has_depth: bool, too_few: Callable[[int], str], budget_note: str = "",
                meta: dict[str, Any] | None = None) -> list[RulerSample]:
    """``n`` samples of ``task``, each with the most haystack units (from ``lo``, at most ``cap``) whose prompt
    and answer prefix fit ``budget`` model tokens. ``build_prompt(rng, units, depth, i)`` gives (prompt,
    references, answer prefix, metadata); sample ``i``'s generator is seeded by (task, length, seed, i) and
    draws its needle depth first (``depths``, cycled, fixes it). Raises :class:`LengthTooSmall` when even
    ``lo`` units do not fit."""
    out = []
    for i in range(n):
        fixed = float(depths[i % len(depths)]) if depths else None

        def build(units: int, i=i, fixed=fixed):
            rng = random.Random(f"ruler:{task}:{length}:{seed}:{i}")
            d = fixed if fixed is not None else float(rng.choice(DEPTHS))
            prompt, refs, prefix, extra = build_prompt(rng, units, d, i)
            return prompt, refs, prefix, extra, d, count_tokens(prompt + "\n" + prefix)

        first = build(lo)
        if first[5] > budget:
            raise LengthTooSmall(f"{task} at length {length}: the smallest prompt has {first[5]} tokens, more than "
                                 f"{budget}{budget_note}; expected a larger length")
        units = largest_fitting(lambda u: build(u)[5], lo, budget, cap, too_few)
        prompt, refs, prefix, extra, d, n_tok = build(units)
        out.append(RulerSample(task, length, i, prompt, refs, prefix, n_tok, d if has_depth else None,
                               {**extra, "haystack_units": units, **(meta or {})}))
    return out


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for NIAH/VT/CWE/FWE: the fraction of references found in the prediction
    (case-insensitive)."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for QA: 1 if any reference is found in the prediction (case-insensitive)."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))
