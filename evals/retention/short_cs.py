"""The ``opsdl_short_cs`` documents and score: the synthetic needle questions asked with their
relevant context only (C_s), prompted and scored as the pipeline's evaluation does.

The examples are the pipeline's held-out evaluation suites (``opsdl_core.data.curation.eval_suites``):
``kv_heldout`` (held-out templates) and ``kv_in_template`` (fresh keys of the training templates),
``num_samples`` each. Each document's text (``prompt``) is the raw user message of the pipeline's
teacher prompt, ``opsdl_core.data.prompts.user_message(C_s, Q)`` (the oracle C_s of
``opsdl_core.data.prepare.prepare_examples``), and lm-eval applies the evaluated model's chat template
to it: run WITH ``--apply_chat_template``, as every opsdl long-context task (``opsdl_ruler*``) and
``opsdl_core/evaluation/lm_eval.py`` do. lm-eval's ``hf`` model then feeds the model the pipeline's teacher prompt
ids ``chat(C_s ⊕ Q)`` (``opsdl_core.data.prompts.chat_prompt_ids``). An answer is right when
``opsdl_core.data.tasks.needle.score_answer`` says so: the reference value occurs in the output and no
distractor value does.

Settings come from lm-eval's ``--metadata``: ``num_samples`` (50), ``seed`` (0, the pipeline's
evaluation seed), ``context_tokens`` (1024: the C_L length the examples are drawn at; only C_s is
shown, but keys and values depend on it, so 1024 / seed 0 reproduce the pipeline's
``kv_heldout@1024`` questions), ``n_distractors`` ([4, 12]). Run::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lm_eval --model hf --model_args pretrained=MODEL \\
        --include_path evals/retention/tasks --tasks opsdl_short_cs --apply_chat_template \\
        --metadata '{"num_samples": 50}'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opsdl_core.config import DataConfig
from opsdl_core.data.curation import eval_suites
from opsdl_core.data.prepare import prepare_examples, token_counter
from opsdl_core.data.prompts import user_message
from opsdl_core.grading import score_answer

__all__ = ["SUITES", "build_docs", "lm_eval_chat_ids", "score"]

log = logging.getLogger(__name__)

SUITES = ("kv_heldout", "kv_in_template")  # one lm-eval metric each


def lm_eval_chat_ids(tokenizer: Any, message: str) -> list[int]:
    """The ids lm-eval's ``hf`` model feeds for the user message ``message`` under
    ``--apply_chat_template`` (default ``add_bos_token``, no system instruction): the chat template
    rendered as text with the generation prompt, then encoded with the tokenizer's special tokens
    unless the text already starts with the BOS token. (A sanity check only; the tests run lm-eval's
    own code.)"""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def build_docs(tokenizer: Any, *, num_samples: int = 50, seed: int = 0, context_tokens: int = 1024,
               n_distractors: Sequence[int] = (4, 12)) -> list[dict[str, Any]]:
    """``num_samples`` documents per suite in :data:`SUITES` order: ``id, suite, template, prompt,
    question, short_context, answer, distractor_answers``. ``prompt`` is the raw user message
    ``user_message(C_s, question)``, for lm-eval to wrap in the model's chat template;
    ``distractor_answers`` are the values of the other records of the same example (an output
    naming one of them is wrong)."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: expected an integer >= 1")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        log.warning("opsdl_short_cs: the tokenizer has no chat template, which lm-eval's --apply_chat_template "
                    "needs; the pipeline prompts such a model with the plain text user message + '\\nAnswer:'")
    suites = eval_suites(count_tokens=token_counter(tokenizer), lengths=[context_tokens], n=num_samples, seed=seed,
                         in_template_n=num_samples, n_distractors=tuple(n_distractors))
    docs, mismatched = [], 0
    for suite in SUITES:
        examples = suites[f"{suite}@{context_tokens}"]
        prepared, bad = prepare_examples(examples, tokenizer, DataConfig(teacher_context="oracle"))
        if bad:
            raise ValueError(f"{suite}: {len(bad)} examples without a usable C_s, e.g. {bad[0].reason}")
        for p in prepared:
            ex = p.example
            prompt = user_message(p.teacher_context.text, ex.question)
            if has_template:
                mismatched += lm_eval_chat_ids(tokenizer, prompt) != p.teacher_ids
            docs.append({"id": ex.id, "suite": suite, "template": ex.metadata["template"], "prompt": prompt,
                         "question": ex.question, "short_context": p.teacher_context.text, "answer": ex.answer,
                         "distractor_answers": list(ex.metadata.get("distractor_answers", ()))})
    if mismatched:
        log.warning("opsdl_short_cs: for %d of %d prompts, the chat template applied as text and re-encoded (as "
                    "lm-eval does) gives other token ids than the pipeline's teacher prompt with this tokenizer; "
                    "scores may differ slightly from the pipeline's", mismatched, len(docs))
    return docs


def score(doc: dict[str, Any], generated: str) -> float:
    """1.0 when the reference answer occurs in ``generated`` and no distractor value does."""
    return score_answer(doc["answer"], generated, doc["distractor_answers"])
