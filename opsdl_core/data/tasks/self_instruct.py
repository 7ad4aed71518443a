"""The paper's label-free path: (C_L, C_s, Q) triples from the user's own long documents.

For each document: cut it into prose chunks (paragraph-aligned, ``min_chunk_tokens`` to
``chunk_tokens``); the model itself writes a question (and usually an answer) about a chunk
(self-instruct, greedy, one chat turn, one worked example in the prompt); then

1. the reply must contain a question (``Question: ...``, at least 3 words), else ``unparsed``, and
   be about the chunk rather than the prompt's worked example, else ``copies_the_example``;
2. the model answers the question from the chunk alone (the teacher's prompt); the reference
   answer is the longest phrase of that answer (at most ``max_answer_words`` words, not only stop
   words, not in the question) that occurs in the chunk, else ``not_answerable_from_chunk``;
3. if the writer gave an answer, the phrase must be one both answers name (the longest such),
   else ``inconsistent`` (self-consistency);
4. the phrase must not occur in C_L outside the chunk, else ``answer_outside_chunk`` (it must
   identify the chunk: a phrase repeated over the document would not).

C_s is the chunk exactly as it stands in the document; C_L is the document around it (the chunk at
a seeded depth) filled to ``target_tokens`` with other documents when the document is shorter.
Every attempt is recorded with the reason it was dropped, so the kept fraction is measured.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..examples import Example

__all__ = ["SelfInstructSettings", "SelfInstructResult", "prose_chunks", "parse_question", "answer_span",
           "copies_the_example", "self_instruct",
           "QUESTION_PROMPT", "load_documents"]

QUESTION_PROMPT = ("Write one question about a specific fact stated in the passage, and its short answer copied "
                   "from the passage.\n\nExample passage: The lighthouse on the north cape was built by the engineer "
                   "Thomas Hale after the great storm.\nQuestion: Who built the lighthouse on the north cape?\n"
                   "Answer: Thomas Hale\n\nPassage:\n{chunk}\n\nReply in exactly this form:\nQuestion: <your question>\n"
                   "Answer: <short answer>")


@dataclass
class SelfInstructSettings:
    target_tokens: int = 1024  # length of C_L
    chunk_tokens: int = 128  # longest chunk (C_s)
    min_chunk_tokens: int = 30
    chunks_per_document: int = 8  # chunks asked per document (spread over the document)
    max_answer_words: int = 6
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0


@dataclass
class SelfInstructResult:
    examples: list[Example]
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every chunk asked, with its outcome
    documents: int = 0
    seconds: float = 0.0

    @property
    def stats(self) -> dict[str, Any]:
        reasons = Counter(a["outcome"] for a in self.attempts)
        written = sum(1 for a in self.attempts if a["outcome"] != "unparsed")  # a question was written
        return {"documents": self.documents, "chunks_asked": len(self.attempts), "questions_written": written,
                "questions_kept": len(self.examples),
                "kept_fraction_of_written": round(len(self.examples) / written, 4) if written else 0.0,
                "outcomes": dict(sorted(reasons.items())), "seconds": round(self.seconds, 1)}


def load_documents(folder: str | Path, *, min_chars: int = 2000) -> list[tuple[str, str]]:
    """(name, text) of the ``.txt``/``.md``/``.rst`` files in ``folder`` with at least ``min_chars``."""
    from .prose import document_texts

    docs = [(n, t) for n, t in document_texts(f"folder:{folder}") if len(t) >= min_chars]
    if not docs:
        raise FileNotFoundError(f"{folder}: no text file with at least {min_chars} characters; expected long documents")
    return docs


def prose_chunks(text: str, count_tokens: Callable[[str], int], *, max_tokens: int,
                 min_tokens: int) -> list[tuple[int, int]]:
    """Char spans of prose paragraphs (``opsdl_core.data.tasks.prose`` rules) with ``min_tokens``..``max_tokens``
    tokens, consecutive short paragraphs merged while they fit."""
    from .prose import _paragraph_is_prose

    spans, cur = [], None
    for m in re.finditer(r"(?:[^\n]+\n?)+", text):
        par = m.group().rstrip("\n")
        if not _paragraph_is_prose(par):
            cur = None
            continue
        s, e = m.start(), m.start() + len(par)
        if cur is not None and count_tokens(text[cur[0]:e]) <= max_tokens:
            cur = (cur[0], e)
            spans[-1] = cur
        elif count_tokens(par) <= max_tokens:
            cur = (s, e)
            spans.append(cur)
        else:
            cur = None
    return [(s, e) for s, e in spans if count_tokens(text[s:e]) >= min_tokens]


_Q = re.compile(r"question\s*:\s*(.+?)\s*(?:\n|$)", re.I)
_A = re.compile(r"answer\s*:\s*(.*?)\s*(?:\n\s*question\s*:|$)", re.I | re.S)
_STOP = frozenset("a an the of in on at to for by with from and or but is are was were be been it its this that these "
                  "those as not no can may if then than so such which what who when where how why there their they "
                  "you your we our he she his her i do does did has have had will would should could also into "
                  "about any all each other more most some only same".split())


def parse_question(text: str) -> tuple[str, str] | None:
    """(question, answer) from the model's reply (the answer may be ``""`` when the reply has
    none), or ``None`` without a question."""
    q = _Q.search(text)
    if not q:
        return None
    question = q.group(1).strip().strip('"').strip()
    if len(question.strip("?").split()) < 3:
        return None
    a = _A.search(text, q.end())
    answer = " ".join(a.group(1).split()).strip('"').rstrip(".").strip() if a else ""
    return (question if question.endswith("?") else question + "?"), answer


_EXAMPLE_WORDS = re.compile(r"lighthouse|thomas hale|north cape|great storm", re.I)


def copies_the_example(question: str, chunk: str) -> bool:
    """True when the question is about the prompt's worked example rather than the chunk (it names
    the example's lighthouse, Thomas Hale, ... and the chunk does not)."""
    return any(not re.search(re.escape(m.group()), chunk, re.I) for m in _EXAMPLE_WORDS.finditer(question))


def answer_span(said: str, chunk: str, question: str, *, max_words: int, agree_with: str = "") -> str | None:
    """The short answer inside a long reply: the longest run of at most ``max_words`` words of
    ``said`` that occurs in ``chunk`` (whole words), is not in ``question``, neither starts nor ends
    with a stop word and (``agree_with``, when given) also occurs in that other answer; the
    earliest among equals.
    ``None`` when there is none."""
    from ...grading import answer_in_text

    words = re.findall(r"[\w'-]+|[^\w\s]", said)
    for n in range(max_words, 0, -1):
        for i in range(len(words) - n + 1):
            gram = words[i:i + n]
            if not gram[0][0].isalnum() or not gram[-1][0].isalnum():
                continue
            if gram[0].lower() in _STOP or gram[-1].lower() in _STOP:
                continue  # no stop word at either end: "Thomas Hale", not "was rebuilt by Thomas"
            text = " ".join(gram).replace(" ,", ",").replace(" .", ".")
            if answer_in_text(text, chunk) and not answer_in_text(text, question) \
                    and (not agree_with or answer_in_text(text, agree_with)):
                return text
    return None


def _occurrences(needle: str, text: str) -> int:
    from ...grading import answer_matches

    return len(answer_matches(needle, text))


def _long_context(doc: str, span: tuple[int, int], others: Sequence[str], target: int,
                  count_tokens: Callable[[str], int], rng: random.Random) -> tuple[str, int]:
    """C_L: the document around ``span`` (the chunk at a random depth), topped up with other
    documents, cut at paragraph or sentence boundaries to about ``target`` tokens."""
    s, e = span
    chunk = doc[s:e]
    before, after = doc[:s], doc[e:]
    pool = list(others)
    rng.shuffle(pool)
    filler = "\n\n".join(pool)
    chars_per_token = max(1.0, len(doc) / max(1, count_tokens(doc)))
    budget = max(0, target - count_tokens(chunk))
    depth = rng.random()
    text, at = chunk, 0
    for _ in range(4):
        want_pre = int(depth * budget * chars_per_token)
        want_post = int((1 - depth) * budget * chars_per_token)
        pre = before[-want_pre:] if want_pre else ""
        if len(pre) < want_pre and filler:
            pre = filler[-(want_pre - len(pre)):] + "\n\n" + pre
        post = after[:want_post]
        if len(post) < want_post and filler:
            post = post + "\n\n" + filler[: want_post - len(post)]
        # cut to boundaries: pre starts at a line/sentence start, post ends at a sentence end
        if want_pre and pre:
            m = re.search(r"(?:\n|[.!?]\s)", pre)
            pre = pre[m.end():].lstrip(" ") if m and m.end() < len(pre) else pre
        else:
            pre = ""
        if post:
            ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n", post)]
            post = post[: ends[-1]] if ends else post
        text, at = pre + chunk + post, len(pre)
        n = count_tokens(text)
        if abs(n - target) <= max(0.05 * target, 16):
            break
        chars_per_token *= target / max(n, 1)
    return text, at


def self_instruct(documents: Sequence[tuple[str, str]], model: Any, tokenizer: Any, *,
                  settings: SelfInstructSettings | None = None, log: Callable[[str], None] = lambda m: None,
                  generate: Callable[[list[list[int]]], list[str]] | None = None) -> SelfInstructResult:
    """Questions written by ``model`` about chunks of ``documents``, filtered (module docstring).
    ``generate`` (prompt token ids -> reply texts) replaces the model's greedy decoding, e.g. for
    another engine; both the question writing and the answerability check go through it."""
    from ...models.rollout import SamplingParams, TransformersRollout
    from ..prepare import token_counter
    from ..prompts import chat_prompt_ids, pad_token_id, stop_token_ids

    cfg = settings or SelfInstructSettings()
    t0 = time.perf_counter()
    count = token_counter(tokenizer)
    if generate is None:
        engine = TransformersRollout(model, pad_id=pad_token_id(tokenizer), max_batch_size=cfg.batch_size)
        params = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                                stop_token_ids=stop_token_ids(tokenizer, getattr(model, "config", None)))

    def greedy(prompts: list[list[int]]) -> list[str]:
        if generate is not None:
            return list(generate(prompts))
        out: list[str] = []
        for i in range(0, len(prompts), cfg.batch_size):
            batch = engine.generate(prompts[i:i + cfg.batch_size], n=1, params=params, seed=0)
            out += [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch.response_ids]
        return out

    def ask(chunk: str) -> list[int]:
        messages = [{"role": "user", "content": QUESTION_PROMPT.format(chunk=chunk)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]

    jobs: list[dict[str, Any]] = []
    for d, (name, text) in enumerate(documents):
        spans = prose_chunks(text, count, max_tokens=cfg.chunk_tokens, min_tokens=cfg.min_chunk_tokens)
        if len(spans) > cfg.chunks_per_document:  # spread over the document
            step = len(spans) / cfg.chunks_per_document
            spans = [spans[int(k * step)] for k in range(cfg.chunks_per_document)]
        jobs += [{"doc": d, "name": name, "span": sp, "chunk": text[sp[0]:sp[1]]} for sp in spans]
    log(f"[self-instruct] {len(documents)} documents, {len(jobs)} chunks: writing questions")
    replies = greedy([ask(j["chunk"]) for j in jobs])
    asked = []
    for j, reply in zip(jobs, replies):
        j["reply"] = reply
        qa = parse_question(reply)
        if qa is None:
            j["outcome"] = "unparsed"
        elif copies_the_example(qa[0], j["chunk"]):
            j["question"], j["written_answer"] = qa
            j["outcome"] = "copies_the_example"
        else:
            j["question"], j["written_answer"] = qa
            asked.append(j)
    log(f"[self-instruct] {len(asked)} questions written: answering each from its chunk alone")
    said = greedy([chat_prompt_ids(tokenizer, j["chunk"], j["question"]) for j in asked])
    examples = []
    for j, reply in zip(asked, said):
        j["chunk_answer"] = reply
        span = answer_span(reply, j["chunk"], j["question"], max_words=cfg.max_answer_words)
        if span is None:
            j["outcome"] = "not_answerable_from_chunk"  # no short phrase of the chunk in the answer
            continue
        if j["written_answer"]:  # the phrase both answers name
            span = answer_span(reply, j["chunk"], j["question"], max_words=cfg.max_answer_words,
                               agree_with=j["written_answer"])
            if span is None:
                j["outcome"] = "inconsistent"  # the writer's answer and the chunk answer share no phrase
                continue
        j["answer"] = span
        doc_text = documents[j["doc"]][1]
        others = [t for k, (_, t) in enumerate(documents) if k != j["doc"]]
        rng = random.Random(f"self-instruct:{cfg.seed}:{j['name']}:{j['span'][0]}")
        long_context, at = _long_context(doc_text, j["span"], others, cfg.target_tokens, count, rng)
        if _occurrences(span, long_context) > _occurrences(span, j["chunk"]):
            j["outcome"] = "answer_outside_chunk"  # would not identify the chunk
            continue
        j["outcome"] = "kept"
        examples.append(Example(
            id=f"self-instruct-s{cfg.seed}-{len(examples):05d}", long_context=long_context,
            short_context=j["chunk"], question=j["question"], answer=span, source=f"self_instruct:{j['name']}",
            metadata={"family": "self_instruct", "document": j["name"], "chunk_chars": list(j["span"]),
                      "written_answer": j["written_answer"], "depth": round(at / max(1, len(long_context)), 4),
                      "target_tokens": cfg.target_tokens, "actual_tokens": count(long_context)}))
    attempts = [{k: v for k, v in j.items() if k not in ("long_context",)} for j in jobs]
    return SelfInstructResult(examples, attempts, len(documents), time.perf_counter() - t0)
