"""Short-context questions in formats the training never uses: a retention suite that can see damage.

The project's own retention suites (C_s only) are variants of the training templates: a model that
learnt to answer every question in the training template's shape ("The code is 4821.") scores them
as well as ever. This suite asks what an instruct model is asked every day, in other domains,
answer shapes and instructions: a colour word, an e-mail address, a capital city, a time of day, a
review's sentiment, who won, which word is an animal, each with an instruction on the reply's form::

    from opsdl_core.data.tasks.foreign import FOREIGN_FORMATS, generate_foreign
    examples = generate_foreign(n=60, seed=0)   # formats in turn, deterministic

Every example is short (one to three sentences, well under 128 tokens) and its context is the
whole evidence (``long_context == short_context``): it is asked with C_s only. A reply is right
when it names the answer and none of the other candidates the context offers
(``metadata["distractor_answers"]``, ``synthetic.score_example``), so a reply that lists every
option earns nothing. No format shares a word pattern with the synthetic templates or the
curriculum families (test: ``tests/test_foreign.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..examples import Example

__all__ = ["FOREIGN_FORMATS", "ForeignFormat", "generate_foreign"]

_NAMES = ("Mia", "Omar", "Lena", "Tariq", "Ines", "Bruno", "Yuki", "Nadia", "Pavel", "Chloe", "Kofi", "Greta",
          "Rafael", "Sana", "Elliot", "Ayla")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "pink")
_THINGS = ("door", "bicycle", "scarf", "kite", "umbrella", "mug", "backpack", "fence")
_DOMAINS = ("northbay.org", "lumen-labs.com", "fairfield.edu", "kestrel.io", "oakline.net")
_CITIES = ("Lyon", "Nice", "Porto", "Turin", "Ghent", "Bern", "Graz", "Split")
_GOOD = ("The staff were friendly and the food arrived hot and fresh.", "I loved the quiet room and the kind staff.",
         "Everything worked perfectly and the price was fair.", "The guide was funny and the tour was wonderful.")
_BAD = ("The soup was cold and the waiter was rude.", "The room was dirty and the noise kept me awake.",
        "It broke after two days and support never answered.", "We waited an hour and the food was awful.")
_CAPITALS = (("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Egypt", "Cairo"), ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Greece", "Athens"),
             ("Poland", "Warsaw"), ("Chile", "Santiago"))
_ANIMALS = ("tiger", "rabbit", "horse", "dolphin", "eagle", "sheep", "wolf", "camel")
_OBJECTS = ("chair", "spoon", "pencil", "window", "bottle", "ladder", "candle", "hammer", "pillow")


@dataclass(frozen=True)
class ForeignFormat:
    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, str, list[str]]]  # -> context, question, answer, wrong


def _colour(rng: random.Random) -> tuple[str, str, str, list[str]]:
    a, b = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    ca, cb = rng.sample(_COLOURS, 2)
    context = f"{a} has a {ca} {thing}, and {b} has a {cb} one."
    return context, f"What colour is {a}'s {thing}? Reply with one word.", ca, [cb]


def _email(rng: random.Random) -> tuple[str, str, str, list[str]]:
    first = rng.choice(_NAMES)
    addr = f"{first.lower()}.{rng.choice(('ops', 'desk', 'office'))}@{rng.choice(_DOMAINS)}"
    context = f"Contact sheet. Name: {first}. E-mail: {addr}. Office hours: mornings."
    return context, f"What is {first}'s e-mail address? Reply with the address only.", addr, []


def _capital(rng: random.Random) -> tuple[str, str, str, list[str]]:
    country, city = rng.choice(_CAPITALS)
    context = f"{city} is the capital and the largest city of {country}."
    return context, f"What is the capital of {country}? Reply with the city's name only.", city, []


def _time(rng: random.Random) -> tuple[str, str, str, list[str]]:
    city = rng.choice(_CITIES)
    t = f"{rng.randint(6, 21):02d}:{rng.choice((5, 10, 20, 35, 40, 50)):02d}"
    context = f"The last train to {city} leaves at {t} tonight."
    return context, f"When does the last train to {city} leave? Reply with the time.", t, []


def _sentiment(rng: random.Random) -> tuple[str, str, str, list[str]]:
    good = rng.random() < 0.5
    review = rng.choice(_GOOD if good else _BAD)
    answer = "positive" if good else "negative"
    return (f'A customer wrote this review: "{review}"', "Is the review positive or negative? Answer with one word.",
            answer, ["negative" if good else "positive"])


def _order(rng: random.Random) -> tuple[str, str, str, list[str]]:
    a, b = rng.sample(_NAMES, 2)
    context = f"At the race, {a} crossed the line first and {b} finished a minute later."
    return context, "Who won the race? Reply with the name only.", a, [b]


def _odd_one(rng: random.Random) -> tuple[str, str, str, list[str]]:
    animal = rng.choice(_ANIMALS)
    objects = rng.sample(_OBJECTS, 2)
    words = [animal, *objects]
    rng.shuffle(words)
    context = f"Here is a list of three words: {', '.join(words)}."
    return context, "Which word in the list is an animal? Reply with that word only.", animal, objects


FOREIGN_FORMATS: dict[str, ForeignFormat] = {f.name: f for f in (
    ForeignFormat("colour_word", "the colour of one person's object (another's named too), one word", _colour),
    ForeignFormat("email_address", "the e-mail address in a note, verbatim", _email),
    ForeignFormat("capital_city", "a country's capital stated in the sentence, a city", _capital),
    ForeignFormat("departure_time", "a train's departure time, hh:mm", _time),
    ForeignFormat("sentiment", "a review's sentiment, positive or negative", _sentiment),
    ForeignFormat("race_winner", "who of two runners won, a name", _order),
    ForeignFormat("odd_one_out", "the animal among three words, that word", _odd_one),
)}


def generate_foreign(n: int, seed: int = 0, formats: list[str] | None = None) -> list[Example]:
    """``n`` examples, the formats in turn (all of them by default), deterministic in ``seed``; ids
    ``foreign-<format>-<i>``; ``metadata``: ``format``, ``distractor_answers``, ``family: "foreign"``."""
    names = list(formats) if formats is not None else list(FOREIGN_FORMATS)
    unknown = [f for f in names if f not in FOREIGN_FORMATS]
    if unknown or not names:
        raise ValueError(f"foreign formats: unknown {unknown or names}; expected names from {list(FOREIGN_FORMATS)}")
    if n < 0:
        raise ValueError(f"foreign suite size must be >= 0, got {n}")
    out = []
    for i in range(n):
        fmt = FOREIGN_FORMATS[names[i % len(names)]]
        rng = random.Random(f"foreign:{seed}:{fmt.name}:{i}")
        context, question, answer, wrong = fmt.make(rng)
        out.append(Example(id=f"foreign-{fmt.name}-{i}", long_context=context, short_context=context,
                           question=question, answer=answer, source="foreign",
                           metadata={"format": fmt.name, "distractor_answers": wrong, "family": "foreign"}))
    return out
