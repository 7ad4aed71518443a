"""The self-instruct path: chunks, the question filter's outcomes, and the triples it keeps."""

import collections
import json
import re

import pytest

from opsdl_core.data.examples import load_examples
from opsdl_core.data.tasks.prose import document_texts, write_documents
from opsdl_core.data.tasks.self_instruct import SelfInstructSettings, parse_question, prose_chunks, self_instruct
from opsdl_core.grading import answer_in_text


def count_words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def docs():
    return [(n, t) for n, t in document_texts() if len(t) > 8000][:4]


def test_parse_question_reads_the_form_and_rejects_the_rest():
    assert parse_question("Question: Who wrote it\nAnswer: Ada Brandt.") == ("Who wrote it?", "Ada Brandt")
    assert parse_question('question: "What is kept?"\nanswer: "the key"') == ("What is kept?", "the key")
    assert parse_question("The passage is about keys.") is None
    assert parse_question("Question: ?\nAnswer:") is None


def test_prose_chunks_are_paragraphs_within_budget(docs):
    name, text = docs[0]
    spans = prose_chunks(text, count_words, max_tokens=120, min_tokens=30)
    assert spans
    for s, e in spans:
        chunk = text[s:e]
        assert 30 <= count_words(chunk) <= 120
        assert not chunk.startswith((" ", "\t")) and "::=" not in chunk


class Writer:
    """A stand-in for the model's decoding: for the ``k``-th chunk it writes reply kind
    ``kinds[k % len(kinds)]`` about a rare word of the chunk, and answers questions from the chunk
    by quoting that word (or refusing). It exercises every outcome of the filter."""

    def __init__(self, tokenizer, kinds):
        self.tok, self.kinds, self.asked, self.answers = tokenizer, kinds, 0, {}

    def __call__(self, prompts):
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            if "Reply in exactly this form" in text:
                chunk = text.split("Passage:\n", 1)[1].split("\n\nReply in exactly", 1)[0]
                words = [w for w in re.findall(r"[A-Za-z]+", chunk) if len(w) >= 7]
                word = sorted(words, key=lambda w: (words.count(w), w))[0]  # the chunk's rarest long word
                kind = self.kinds[self.asked % len(self.kinds)]
                self.asked += 1
                q = f"Which rare word does passage {self.asked} use?"
                reply = {"good": f"Question: {q}\nAnswer: The word {word}.",
                         "question_only": f"Question: {q}",
                         "unparsed": "I do not know.",
                         "inconsistent": f"Question: {q}\nAnswer: zebra crossing",
                         "refuse": f"Question: {q}\nAnswer: {word}"}[kind]
                self.answers[q] = (word, kind)
                out.append(reply)
            else:
                q = text.rsplit("Question: ", 1)[1].split("<|im_end|>")[0].strip()
                word, kind = self.answers[q]
                out.append("I cannot tell." if kind == "refuse" else f"It says {word}.")
        return out


def test_filter_outcomes_and_kept_triples(docs, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    kinds = ["good", "question_only", "unparsed", "inconsistent", "refuse"]
    settings = SelfInstructSettings(target_tokens=600, chunk_tokens=120, chunks_per_document=5)
    res = self_instruct(docs, model, tok, settings=settings, generate=Writer(tok, kinds))
    outcomes = res.stats["outcomes"]
    n = len(res.attempts)
    assert res.stats["chunks_asked"] == sum(outcomes.values()) == n >= 15
    made = collections.Counter(kinds[k % len(kinds)] for k in range(n))
    assert outcomes["unparsed"] == made["unparsed"] and outcomes["inconsistent"] == made["inconsistent"]
    assert outcomes["not_answerable_from_chunk"] == made["refuse"]
    assert outcomes.get("kept", 0) + outcomes.get("answer_outside_chunk", 0) == made["good"] + made["question_only"]
    assert res.stats["questions_kept"] == len(res.examples) == outcomes["kept"] > 0
    assert res.stats["questions_written"] == n - made["unparsed"]
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    for ex in res.examples:
        assert ex.short_context in ex.long_context  # C_s is the chunk, verbatim
        assert answer_in_text(ex.answer, ex.short_context)
        assert not answer_in_text(ex.answer, ex.long_context.replace(ex.short_context, " "))  # only in the chunk
        assert abs(count(ex.long_context) - 600) <= 0.1 * 600
        assert ex.metadata["document"] in {n for n, _ in docs}
    kept = [a for a in res.attempts if a["outcome"] == "kept"]
    assert [a["question"] for a in kept] == [e.question for e in res.examples]
    assert all(a["answer"] == e.answer for a, e in zip(kept, res.examples))


def test_questions_about_the_worked_example_are_dropped():
    from opsdl_core.data.tasks.self_instruct import copies_the_example

    assert copies_the_example("Who built the lighthouse on the north cape?", "The for statement iterates.")
    assert not copies_the_example("Who built the lighthouse?", "The old lighthouse was rebuilt in spring.")
    assert not copies_the_example("What does the for statement do?", "The for statement iterates.")


def test_answer_span_is_the_longest_shared_phrase_of_the_chunk():
    from opsdl_core.data.tasks.self_instruct import answer_span

    chunk = "The north tower was rebuilt by Thomas Hale in the spring, after the storm."
    q = "Who rebuilt the north tower?"
    assert answer_span("It was rebuilt by Thomas Hale.", chunk, q, max_words=4) == "rebuilt by Thomas Hale"
    assert answer_span("It was rebuilt by Thomas Hale.", chunk, q, max_words=2) == "Thomas Hale"
    assert answer_span("Thomas Hale did.", chunk, q, max_words=4) == "Thomas Hale"
    assert answer_span("Thomas Hale did.", chunk, q, max_words=4, agree_with="Hale") == "Hale"
    assert answer_span("Nobody knows.", chunk, q, max_words=4) is None
    assert answer_span("The tower.", chunk, q, max_words=4) is None  # only words of the question


def test_real_tiny_model_end_to_end_from_the_cli(tmp_path, tiny_model_dir):
    from opsdl_core.cli import main

    folder = tmp_path / "docs"
    paths = write_documents(folder, min_chars=12000)
    assert len(paths) >= 3 and "Python Software Foundation" in (folder / "SOURCE").read_text()
    for p in paths[3:]:
        p.unlink()
    out = tmp_path / "si.jsonl"
    assert main(["data", "self-instruct", str(folder), "--out", str(out), "--model", str(tiny_model_dir),
                 "--target-tokens", "300", "--chunks-per-document", "2"]) == 0
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["documents"] == 3 and 3 <= stats["chunks_asked"] <= 6  # at most 2 chunks per document
    attempts = [json.loads(line) for line in out.with_suffix(".attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == stats["chunks_asked"] and all(a["reply"] is not None and a["outcome"] for a in attempts)
    assert sum(stats["outcomes"].values()) == len(attempts)
    assert len(load_examples(out).examples) == stats["questions_kept"]  # a random model keeps ~none; all counted
