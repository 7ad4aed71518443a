"""lm-evaluation-harness glue for the offline RULER tasks (``evals.ruler.generate``).

``--metadata '{"max_seq_lengths": [256, 512], "num_samples": 50}'`` picks the lengths and the
samples per length (the essay and QA tasks also take ``essays_path``, ``squad_path``,
``hotpotqa_path``: see ``evals.ruler.documents``); the tokenizer is the evaluated model's (``pretrained``/``tokenizer`` from
``--model_args``, which lm-eval passes to the task), so lengths are in that model's tokens.
"""

from __future__ import annotations

import functools
import logging

import datasets

from evals.ruler.documents import DOCUMENT_TASKS, generate_document_task
from evals.ruler.generate import LengthTooSmall, generate, string_match_all, string_match_part

log = logging.getLogger(__name__)

LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_LENGTHS = (4096,)
TOKENS_TO_GENERATE = {"niah_single_1": 128, "niah_multikey_2": 128, "niah_multikey_3": 128, "vt": 30, "cwe": 120,
                      "fwe": 50, "niah_single_2": 128, "niah_single_3": 128, "niah_multikey_1": 128,
                      "niah_multivalue": 128, "niah_multiquery": 128, "qa_1": 32, "qa_2": 32}


def _count_tokens(kwargs: dict):
    from transformers import AutoTokenizer

    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not name:
        raise ValueError("the opsdl RULER tasks size prompts with the evaluated model's tokenizer; pass "
                         "--model_args pretrained=FOLDER (or tokenizer=NAME)")
    tok = AutoTokenizer.from_pretrained(name)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _dataset(task: str, **kwargs) -> dict[str, datasets.Dataset]:
    lengths = [int(x) for x in kwargs.get("max_seq_lengths", DEFAULT_LENGTHS)]
    unknown = [x for x in lengths if x not in LENGTHS]
    if unknown:
        raise ValueError(f"max_seq_lengths {unknown} not supported; expected values among {list(LENGTHS)}")
    n = int(kwargs.get("num_samples", 50))
    count = _count_tokens(kwargs)
    rows = []
    for length in lengths:
        try:
            common = dict(length=length, n=n, count_tokens=count, seed=int(kwargs.get("seed", 42)),
                          tokens_to_generate=TOKENS_TO_GENERATE[task],
                          overhead_tokens=int(kwargs.get("chat_overhead_tokens", 32)))
            if task in DOCUMENT_TASKS:  # haystack / documents from the user's files (named in --metadata)
                samples = generate_document_task(task, options=kwargs, **common)
            else:
                samples = generate(task, **common)
        except LengthTooSmall as e:  # e.g. cwe below ~1K tokens: the length has no score for this task
            log.warning("opsdl_ruler_%s: skipping length %d: %s", task, length, e)
            continue
        rows += [s.to_dict() for s in samples]
    if not rows:
        raise LengthTooSmall(f"opsdl_ruler_{task}: none of the lengths {lengths} fits the task")
    return {"test": datasets.Dataset.from_list(rows)}


# the task YAMLs name these (`custom_dataset: !function utils.<task>`): utils.niah_single_1, utils.vt, ...,
# one per task of TOKENS_TO_GENERATE
for _task in TOKENS_TO_GENERATE:
    globals()[_task] = functools.partial(_dataset, _task)
del _task


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """One metric per length, named by the length: only the lengths that were generated appear
    in lm-eval's table (no -1 placeholders for the others)."""
    match = string_match_part if doc.get("match") == "part" else string_match_all  # QA: any reference
    return {str(doc["length"]): match(results[0].strip(), doc["outputs"])}


