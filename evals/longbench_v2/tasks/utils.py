"""lm-evaluation-harness glue for ``opsdl_longbench_v2`` (logic in ``evals.longbench_v2.longbench_v2``).

``--metadata '{"data_path": "/data/LongBench-v2/data.json"}'`` (or ``OPSDL_LONGBENCH_V2``) names
the local data; optional keys ``max_input_tokens`` (prompt budget in the model's tokens; default
the model's window - 128 generated - ``chat_overhead_tokens``) and ``chat_overhead_tokens``
(default: what the tokenizer's chat template adds to one user message, at least 32; raise it for
``--system_instruction``). The tokenizer and window are the evaluated model's (``pretrained``/``tokenizer``/
``max_length`` from ``--model_args``, which lm-eval passes to the task).
"""

from __future__ import annotations

import datasets

from evals.longbench_v2.longbench_v2 import (CHAT_OVERHEAD_TOKENS, build_docs, chat_template_tokens,
                                             default_max_input_tokens, load_rows, model_window, resolve_data_path,
                                             score)


def dataset(**kwargs) -> dict[str, datasets.Dataset]:
    from transformers import AutoConfig, AutoTokenizer

    rows = load_rows(resolve_data_path(kwargs.get("data_path")))
    name = kwargs.get("tokenizer") or kwargs.get("pretrained")
    if not name:
        raise ValueError("opsdl_longbench_v2 truncates prompts with the evaluated model's tokenizer; pass "
                         "--model_args pretrained=FOLDER (or tokenizer=NAME)")
    trust = bool(kwargs.get("trust_remote_code", False))
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
    if kwargs.get("max_input_tokens") is not None:
        max_input = int(kwargs["max_input_tokens"])
    else:
        config = AutoConfig.from_pretrained(kwargs["pretrained"], trust_remote_code=trust) \
            if kwargs.get("pretrained") else None
        window = model_window(config, tok, kwargs.get("max_length"))
        overhead = kwargs.get("chat_overhead_tokens")
        overhead = int(overhead) if overhead is not None else max(CHAT_OVERHEAD_TOKENS, chat_template_tokens(tok))
        max_input = default_max_input_tokens(window, chat_overhead_tokens=overhead)
    return {"test": datasets.Dataset.from_list(build_docs(rows, tok, max_input))}


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return score(doc, results[0])
