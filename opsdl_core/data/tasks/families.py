"""The curriculum's task families (``opsdl_core.data.tasks.curriculum``): their templates, split-specific
value pools, and the checker that re-derives an example's answer from C_s and Q alone by parsing
them with the template's own patterns."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..examples import EVIDENCE_SEPARATOR, Example
from .needle import HELDOUT_TEMPLATES as KV_HELDOUT
from .needle import TRAIN_TEMPLATES as KV_TRAIN

__all__ = ["Template", "Family", "FAMILIES", "family_names", "answer_from_short_context"]


@dataclass(frozen=True)
class Template:
    """``records``: the fact sentences (one per evidence kind), with ``{field}`` slots;
    ``question`` has slots of the key fields; ``answer`` names the field asked (lookups)."""

    name: str
    records: tuple[str, ...]
    question: str
    answer: str = "value"


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # lookup | multi_hop | comparison | counting
    train: tuple[Template, ...]
    heldout: tuple[Template, ...]
    fields: Mapping[str, str]  # field -> value pool name
    description: str

    def templates(self, split: str) -> tuple[Template, ...]:
        return self.train if split == "train" else self.heldout


# --------------------------------------------------------------------------- value pools
def _pairs(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{x} {y}" for x in a for y in b)


_POOLS_SPLIT: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "train": _pairs(("Ada", "Bruno", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas",
                         "Kira", "Lars", "Mira", "Nils", "Olga", "Pavel"),
                        ("Brandt", "Castell", "Dorsey", "Ekwall", "Fenner", "Gould", "Harlan", "Ibsen", "Jurado",
                         "Kessler", "Lindqvist", "Moreau")),
        "heldout": _pairs(("Quentin", "Rosa", "Stellan", "Tamsin", "Ulrich", "Vera", "Wendell", "Xenia", "Yusuf",
                           "Zora", "Anselm", "Beatrix"),
                          ("Norberg", "Okafor", "Pellegrini", "Quist", "Rasmussen", "Sorensen", "Thackeray", "Ulloa",
                           "Vasquez", "Whitlock")),
    },
    "town": {
        "train": ("Ashford", "Brambleton", "Coldwater", "Dunmore", "Eastwick", "Fairhaven", "Glenrock", "Hollowmere",
                  "Ironbridge", "Kingsbury", "Larkhill", "Millbrook", "Northam", "Oakridge", "Pinecrest", "Redcliff"),
        "heldout": ("Saltmarsh", "Thornbury", "Upton", "Westerly", "Yarrowby", "Zennor", "Alderney", "Brackwood",
                    "Cresthaven", "Dovercourt", "Elmstead", "Foxley"),
    },
    "room": {
        "train": tuple(f"{c}-{n}" for c in "ABCD" for n in range(101, 131)),
        "heldout": tuple(f"{c}-{n}" for c in "PQRS" for n in range(201, 231)),
    },
    "event": {
        "train": _pairs(("harvest", "lantern", "river", "winter", "spring", "market"),
                        ("festival", "parade", "regatta", "fair")),
        "heldout": _pairs(("kite", "cider", "poetry", "glass"), ("contest", "exhibition", "gala", "tournament")),
    },
}
_POOLS: dict[str, tuple[str, ...]] = {
    "profession": ("glassblower", "cartographer", "beekeeper", "locksmith", "bookbinder", "clockmaker", "tailor",
                   "surveyor", "violinist", "pharmacist", "astronomer", "carpenter", "jeweller", "archivist",
                   "stonemason", "ferryman", "perfumer", "upholsterer"),
    "item": ("brass telescope", "silver teapot", "oak chest", "paper lantern", "violin case", "copper kettle",
             "woollen blanket", "glass globe", "iron anvil", "leather saddle", "marble bust", "clay urn",
             "wicker basket", "pewter tankard", "velvet cushion", "bronze bell"),
    "department": ("Accounts", "Logistics", "Research", "Legal", "Facilities", "Procurement", "Archives",
                   "Security", "Translation", "Training"),
    "month": ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"),
}


def _value(rng: random.Random, pool: str, split: str) -> str:
    if pool == "digits":
        k = rng.randint(5, 7)
        return str(rng.randint(10 ** (k - 1), 10**k - 1))
    if pool == "code":
        return f"{''.join(rng.choices(string.ascii_uppercase, k=2))}-{rng.randint(1000, 9999)}"
    if pool == "ext":
        return str(rng.randint(2000, 8999))
    if pool == "height":
        return str(rng.randint(21, 389))
    if pool == "date":
        return f"{rng.randint(1, 28)} {rng.choice(_POOLS['month'])}"
    if pool in _POOLS_SPLIT:
        return rng.choice(_POOLS_SPLIT[pool][split])
    return rng.choice(_POOLS[pool])


# --------------------------------------------------------------------------- families
def _kv(t: Any) -> Template:
    return Template(t.name, (t.record,), t.question, "value")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("kv_lookup", "lookup", tuple(_kv(t) for t in KV_TRAIN), tuple(_kv(t) for t in KV_HELDOUT),
           {"key": "kvkey", "value": "digits"}, "the value stored under one key among distractor keys"),
    Family("record_lookup", "lookup",
           (Template("staff_room", ("Staff record: {name}, department of {department}, room {room}, extension {ext}.",),
                     "In which room does {name} work?", "room"),
            Template("staff_extension", ("Staff record: {name}, department of {department}, room {room}, "
                                         "extension {ext}.",), "What is the phone extension of {name}?", "ext"),
            Template("pipe_row", ("{name} | {department} | office {room} | line {ext}",),
                     "Which office is listed for {name}?", "room")),
           (Template("directory", ("Directory entry for {name}: works in {department}, desk {room}, dial {ext}.",),
                     "What number do you dial to reach {name}?", "ext"),
            Template("badge_desk", ("{name} (badge of {department}) sits at desk {room}; call {ext}.",),
                     "At which desk does {name} sit?", "room")),
           {"name": "person", "department": "department", "room": "room", "ext": "ext"},
           "one field of one person's record among other people's records"),
    Family("prose_attribute", "lookup",
           (Template("trade", ("{name}, who has worked as a {profession} for many years, lives in {town}.",),
                     "What does {name} work as?", "profession"),
            Template("hometown", ("Everyone in the square knew {name}, the {profession} from {town}.",),
                     "Which town is {name} from?", "town")),
           (Template("letter", ("A letter arrived from {name}, now a {profession} settled in {town}.",),
                     "In which town has {name} settled?", "town"),
            Template("portrait", ("The portrait shows {name}, a {profession} born and raised in {town}.",),
                     "What profession does the portrait of {name} show?", "profession")),
           {"name": "person", "profession": "profession", "town": "town"},
           "an attribute of a person described in a prose sentence"),
    Family("event_date", "lookup",
           (Template("held_on", ("The {event} of {town} is held every year on {date}.",),
                     "On what date is the {event} of {town} held?", "date"),
            Template("opens", ("This year the {event} in {town} opens on {date}.",),
                     "When does the {event} in {town} open?", "date")),
           (Template("scheduled", ("Organisers scheduled the {event} at {town} for {date}.",),
                     "For which date did organisers schedule the {event} at {town}?", "date"),),
           {"event": "event", "town": "town", "date": "date"},
           "the date of one event among other dated events"),
    Family("multi_hop", "multi_hop",
           (Template("key_room", ("{name} keeps the key to room {room}.", "Room {room} holds the {item}."),
                     "What does the room whose key {name} keeps hold?", "item"),
            Template("assigned_room", ("{name} was assigned room {room}.", "Inside room {room} stands the {item}."),
                     "What stands inside the room assigned to {name}?", "item")),
           (Template("locker", ("{name} rents locker {room}.", "Locker {room} contains the {item}."),
                     "What is in the locker that {name} rents?", "item"),),
           {"name": "person", "room": "room", "item": "item"},
           "follow a link (person -> room) and then a fact about that room"),
    Family("comparison", "comparison",
           (Template("tower", ("The bell tower of {town} is {height} metres tall.",),
                     "Which bell tower is taller: the one of {a} or the one of {b}?", "town"),
            Template("bridge", ("The old bridge at {town} spans {height} metres.",),
                     "Which old bridge is longer: the one at {a} or the one at {b}?", "town")),
           (Template("lake", ("The lake near {town} is {height} metres deep.",),
                     "Which lake is deeper: the one near {a} or the one near {b}?", "town"),),
           {"town": "town", "height": "height"},
           "which of two facts far apart is larger"),
    Family("counting", "counting",
           (Template("parcels", ("{name} delivered a parcel to the {town} depot.",),
                     "How many parcels did {name} deliver?", "count"),
            Template("visits", ("{name} paid a visit to the museum in {town}.",),
                     "How many times did {name} visit a museum?", "count")),
           (Template("letters", ("{name} posted a letter from {town}.",),
                     "How many letters did {name} post?", "count"),),
           {"name": "person", "town": "town"},
           "how many sentences report one person's action"),
)}


def family_names() -> list[str]:
    return list(FAMILIES)


def _check_design() -> None:
    """Import-time guard: template names unique; train and held-out wording disjoint within each
    family; name pools disjoint between splits."""
    seen: set[str] = set()
    for fam in FAMILIES.values():
        for t in fam.train + fam.heldout:
            assert f"{fam.name}/{t.name}" not in seen, f"template {fam.name}/{t.name} defined twice"
            seen.add(f"{fam.name}/{t.name}")
        train_q = {t.question for t in fam.train}
        assert not train_q & {t.question for t in fam.heldout}, f"{fam.name}: a question is in both splits"
        assert not {r for t in fam.train for r in t.records} & {r for t in fam.heldout for r in t.records}, \
            f"{fam.name}: a record template is in both splits"
    for pool, splits in _POOLS_SPLIT.items():
        a = {w for v in splits["train"] for w in v.split()}
        b = {w for v in splits["heldout"] for w in v.split()}
        assert not a & b, f"pool {pool}: words in both splits: {a & b}"


_check_design()


# --------------------------------------------------------------------------- parsing (the checker)
def _pattern(fmt: str) -> re.Pattern[str]:
    """A template with ``{field}`` slots as a regex with named groups (a field repeated in one
    template must match the same text)."""
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", fmt):
        out.append(re.escape(fmt[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>.+?)")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(fmt[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _parse(fmt: str, text: str) -> dict[str, str] | None:
    m = _pattern(fmt).match(text.strip())
    return m.groupdict() if m else None


def _template(ex: Example) -> tuple[Family, Template]:
    fam = FAMILIES[ex.metadata["family"]]
    name = ex.metadata["template"]
    for t in fam.train + fam.heldout:
        if t.name == name:
            return fam, t
    raise KeyError(f"example {ex.id}: unknown template {name!r} of family {fam.name}")


def answer_from_short_context(ex: Example) -> str | None:
    """The answer derived from C_s and Q alone, by parsing both with the example's template;
    ``None`` when C_s does not determine it. A deterministic checker, independent of generation."""
    fam, t = _template(ex)
    q = _parse(t.question, ex.question)
    if q is None:
        return None
    pieces = ex.short_context.split(EVIDENCE_SEPARATOR)
    if fam.kind == "lookup":
        for piece in pieces:
            rec = _parse(t.records[0], piece)
            if rec and all(rec.get(k) == v for k, v in q.items()):
                return rec[t.answer]
        return None
    if fam.kind == "multi_hop":
        links = [r for r in (_parse(t.records[0], p) for p in pieces) if r and r["name"] == q["name"]]
        facts = [r for r in (_parse(t.records[1], p) for p in pieces) if r]
        for link in links:
            for fact in facts:
                if fact["room"] == link["room"]:
                    return fact["item"]
        return None
    if fam.kind == "comparison":
        vals = {}
        for piece in pieces:
            rec = _parse(t.records[0], piece)
            if rec and rec["town"] in (q["a"], q["b"]):
                vals[rec["town"]] = int(rec["height"])
        if len(vals) != 2 or vals[q["a"]] == vals[q["b"]]:
            return None
        return max(vals, key=vals.get)
    if fam.kind == "counting":
        recs = [_parse(t.records[0], p) for p in pieces]
        return str(sum(1 for r in recs if r and r["name"] == q["name"]))
    raise ValueError(f"family kind {fam.kind!r}")
