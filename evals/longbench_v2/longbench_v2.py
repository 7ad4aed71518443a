"""LongBench v2 with the official protocol: load and check the rows, build the 0-shot prompt,
middle-truncate it to the model's window, extract the answer letter, score per bucket.

Source: THUDM/LongBench (LongBench v2, Bai et al. 2024), ``pred.py``, ``prompts/0shot.txt`` and
``result.py``; data set https://huggingface.co/datasets/THUDM/LongBench-v2 (``data.json``, 503
four-choice questions with contexts of 8K to 2M words).

The protocol, as implemented here:

* prompt: ``prompts/0shot.txt`` (no chain of thought) with the context, question and choices
  ``.strip()``-ed, sent as the single user message (lm-eval's ``--apply_chat_template``);
* truncation: the prompt is tokenized with the evaluated model's tokenizer; when it has more than
  ``max_input_tokens`` tokens the first ``max//2`` and the last ``-max//2`` (that is, ceil) tokens
  are kept and decoded back (``skip_special_tokens=True``), so the question and choices survive;
* generation: at most 128 new tokens, stopping at EOS only;
* extraction: ``*`` removed, then ``The correct answer is \\(([A-D])\\)``, else
  ``The correct answer is ([A-D])``, else no answer (counted wrong);
* metrics: accuracy ``overall`` and per ``easy``/``hard`` difficulty and ``short``/``medium``/``long``
  length bucket; each question counts in ``overall``, its difficulty and its length bucket.

Deliberate differences from ``pred.py``: decoding is greedy (``pred.py`` samples at temperature
0.1 through an OpenAI-compatible server), tokens are counted without special tokens
(``pred.py``'s ``tokenizer.encode`` adds a BOS for some tokenizers), an empty response counts as
wrong (``pred.py`` drops it and retries on a later run), and if the decoded truncated prompt
re-tokenizes to more than ``max_input_tokens`` tokens (a merge or a split multi-byte character at
the cut) the kept halves are shrunk until it fits.

This is NOT lm-eval's built-in ``longbench2`` task, which scores the four choices by
log-likelihood over the hub data set; here the model generates an answer, as in the paper.

No lm-eval import here: ``evals/longbench_v2/tasks/utils.py`` is the glue.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATA_URL", "ENV_VAR", "GEN_TOKENS", "METRICS", "PROMPT_0SHOT", "build_docs", "build_prompt",
           "chat_template_tokens", "default_max_input_tokens", "extract_answer", "load_rows", "middle_truncate", "model_window",
           "resolve_data_path", "score"]

ENV_VAR = "OPSDL_LONGBENCH_V2"
DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench-v2"
GEN_TOKENS = 128  # pred.py's max_new_tokens without CoT; the task YAML's max_gen_toks
CHAT_OVERHEAD_TOKENS = 32  # least allowance for the chat template around the user message

PROMPT_0SHOT = """Please read the following text and answer the question below.

<text>
$DOC$
</text>

What is the correct answer to this question: $Q$
Choices:
(A) $C_A$
(B) $C_B$
(C) $C_C$
(D) $C_D$

Format your response as follows: "The correct answer is (insert answer here)"."""

FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
          "choice_D", "answer", "context")
ALLOWED = {"answer": ("A", "B", "C", "D"), "difficulty": ("easy", "hard"), "length": ("short", "medium", "long")}
METRICS = ("overall",) + ALLOWED["difficulty"] + ALLOWED["length"]

_ANSWER_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")


def resolve_data_path(data_path: str | os.PathLike | None = None) -> Path:
    """The local ``data.json``: *data_path* (the task's ``--metadata`` key ``data_path``), else the
    ``OPSDL_LONGBENCH_V2`` environment variable; a clear ``FileNotFoundError`` when neither names a file."""
    how = (f"pass --metadata '{{\"data_path\": \"/path/to/data.json\"}}' or set {ENV_VAR}=/path/to/data.json; "
           f"the file is data.json from {DATA_URL} (download it once, e.g. `hf download THUDM/LongBench-v2 "
           f"data.json --repo-type dataset --local-dir DIR`)")
    raw = data_path if data_path not in (None, "") else os.environ.get(ENV_VAR) or None
    if raw is None:
        raise FileNotFoundError(f"LongBench v2 needs a local copy of its data: no data_path given and {ENV_VAR} is unset; {how}")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LongBench v2 data file {str(path)!r} does not exist (from "
                                f"{'data_path' if data_path not in (None, '') else ENV_VAR}); {how}")
    return path


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``data.json`` (a JSON list, as published) or JSON Lines, each checked: all of
    :data:`FIELDS` present as strings, ``answer`` in A-D, ``difficulty`` easy/hard, ``length``
    short/medium/long, ``_id`` unique. A bad row raises ``ValueError`` naming its index, ``_id``
    and field. Only the official fields are kept."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON ({e.msg}); expected a JSON list or JSON Lines "
                                     f"as in {DATA_URL} data.json") from e
    if not rows:
        raise ValueError(f"{path}: no rows")
    seen: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i}" + (f" (_id {row.get('_id')!r})" if isinstance(row, dict) and "_id" in row else "")
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
        for field in FIELDS:
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r}; every row needs {list(FIELDS)}")
            if not isinstance(row[field], str):
                raise ValueError(  # noqa: TRY004 (a bad data file, as for the values below)
                    f"{where}: field {field!r} should be a string, got {type(row[field]).__name__}")
        for field, allowed in ALLOWED.items():
            if row[field] not in allowed:
                raise ValueError(f"{where}: field {field!r} is {row[field]!r}; expected one of {list(allowed)}")
        if row["_id"] in seen:
            raise ValueError(f"{where}: field '_id' repeats row {seen[row['_id']]}; expected unique ids")
        seen[row["_id"]] = i
        out.append({field: row[field] for field in FIELDS})
    return out


def build_prompt(row: dict[str, Any]) -> str:
    """``prompts/0shot.txt`` filled as ``pred.py`` does (same replacement order, each value stripped)."""
    return (PROMPT_0SHOT.replace("$DOC$", row["context"].strip()).replace("$Q$", row["question"].strip())
            .replace("$C_A$", row["choice_A"].strip()).replace("$C_B$", row["choice_B"].strip())
            .replace("$C_C$", row["choice_C"].strip()).replace("$C_D$", row["choice_D"].strip()))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def middle_truncate(prompt: str, tokenizer, max_tokens: int) -> tuple[str, int, bool]:
    """``pred.py``'s truncation: at most *max_tokens* tokens of *tokenizer*, keeping the first
    ``max_tokens//2`` and the last ``-max_tokens//2`` (ceil) tokens. Returns ``(prompt, n_tokens,
    truncated)`` where *n_tokens* counts the returned prompt re-tokenized (always ``<= max_tokens``)."""
    if max_tokens < 2:
        raise ValueError(f"max_input_tokens must be at least 2, got {max_tokens}")
    ids = _encode(tokenizer, prompt)
    if len(ids) <= max_tokens:
        return prompt, len(ids), False
    keep = max_tokens
    for _ in range(8):
        text = tokenizer.decode(ids[:keep // 2] + ids[-keep // 2:], skip_special_tokens=True)
        n = len(_encode(tokenizer, text))
        if n <= max_tokens:
            return text, n, True
        keep -= n - max_tokens  # the cut re-tokenized longer: shrink by the excess and cut again
        if keep < 2:
            break
    raise ValueError(f"could not truncate the prompt to {max_tokens} tokens: the re-tokenized text keeps growing")


def model_window(config: Any = None, tokenizer: Any = None, max_length: int | None = None) -> int:
    """The evaluated model's context window, resolved as lm-eval's ``hf`` model does: its
    ``max_length`` model argument, else ``n_positions``/``max_position_embeddings``/``n_ctx`` of
    the config (its ``text_config`` first), else the tokenizer's ``model_max_length``. Unlike
    lm-eval (which falls back to 2048) an unknown window is an error: pass ``max_input_tokens``."""
    if max_length:
        return int(max_length)
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value < 10**9:  # transformers' "unset" is ~1e30
        return int(value)
    raise ValueError("cannot tell the model's context window from its config or tokenizer; pass "
                     "--metadata '{\"max_input_tokens\": N}'")


def chat_template_tokens(tokenizer) -> int:
    """Tokens the tokenizer's chat template adds around one user message (with the generation
    prompt), e.g. 47 for SmolLM2's template with its default system prompt in the tiny test
    tokenizer; 0 without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    probe = "LongBench v2 probe text."
    text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], add_generation_prompt=True,
                                         tokenize=False)
    return max(0, len(_encode(tokenizer, text)) - len(_encode(tokenizer, probe)))


def default_max_input_tokens(window: int, *, gen_tokens: int = GEN_TOKENS,
                             chat_overhead_tokens: int = CHAT_OVERHEAD_TOKENS) -> int:
    """Prompt budget so that chat template + prompt + generation fit *window* (lm-eval would
    otherwise silently cut the prompt's head to ``window - max_gen_toks``)."""
    budget = window - gen_tokens - chat_overhead_tokens
    if budget < 2:
        raise ValueError(f"window {window} leaves no room for a prompt after {gen_tokens} generated and "
                         f"{chat_overhead_tokens} chat-template tokens")
    return budget


def build_docs(rows: Sequence[dict[str, Any]], tokenizer, max_input_tokens: int) -> list[dict[str, Any]]:
    """One lm-eval doc per row: the official fields except ``context`` (it lives on in ``prompt``,
    which would otherwise double the memory and the logged samples), plus the truncated
    ``prompt``, its token count ``n_prompt_tokens`` and whether it was ``truncated``."""
    docs = []
    for row in rows:
        prompt, n, truncated = middle_truncate(build_prompt(row), tokenizer, max_input_tokens)
        doc = {k: v for k, v in row.items() if k != "context"}
        docs.append({**doc, "prompt": prompt, "n_prompt_tokens": n, "truncated": truncated})
    return docs


def extract_answer(response: str) -> str | None:
    """``pred.py``'s ``extract_answer``: the letter after "The correct answer is", with or without
    parentheses (Markdown ``*`` ignored), or ``None``."""
    response = response.replace("*", "")
    match = _ANSWER_PAREN.search(response) or _ANSWER_BARE.search(response)
    return match.group(1) if match else None


def score(doc: dict[str, Any], response: str) -> dict[str, float]:
    """1.0/0.0 under ``overall``, the doc's difficulty and its length bucket (three keys; the
    other buckets are absent, so lm-eval averages each bucket over its own docs)."""
    judge = float(extract_answer(response.strip()) == doc["answer"])
    return {"overall": judge, doc["difficulty"]: judge, doc["length"]: judge}
