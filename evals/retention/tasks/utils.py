"""lm-evaluation-harness glue for ``opsdl_short_cs`` (logic in ``evals.retention.short_cs``).

``--metadata '{"num_samples": 50, "seed": 0}'`` sets the questions per suite and the seed; the
tokenizer is the evaluated model's (``pretrained``/``tokenizer`` from ``--model_args``, which
lm-eval passes to the task with the metadata). Each document's text is the raw user message; run
WITH ``--apply_chat_template`` so lm-eval applies the model's chat template, as for ``opsdl_ruler*``.
"""

from __future__ import annotations

import datasets

from evals.retention.short_cs import build_docs, score

FEATURES = datasets.Features({
    "id": datasets.Value("string"), "suite": datasets.Value("string"), "template": datasets.Value("string"),
    "prompt": datasets.Value("string"), "question": datasets.Value("string"),
    "short_context": datasets.Value("string"), "answer": datasets.Value("string"),
    "distractor_answers": datasets.Sequence(datasets.Value("string")),
})


def short_cs(**kwargs) -> dict[str, datasets.Dataset]:
    """``custom_dataset``: lm-eval passes ``--metadata`` merged with ``--model_args``."""
    from transformers import AutoTokenizer

    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not name:
        raise ValueError("opsdl_short_cs builds its prompts with the evaluated model's tokenizer; pass "
                         "--model_args pretrained=FOLDER (or tokenizer=NAME)")
    tok = AutoTokenizer.from_pretrained(name)
    docs = build_docs(tok, num_samples=int(kwargs.get("num_samples", 50)), seed=int(kwargs.get("seed", 0)),
                      context_tokens=int(kwargs.get("context_tokens", 1024)),
                      n_distractors=tuple(kwargs.get("n_distractors", (4, 12))))
    return {"test": datasets.Dataset.from_list(docs, features=FEATURES)}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """One metric per suite, named by the suite: each document scores only its own."""
    return {doc["suite"]: score(doc, results[0])}
