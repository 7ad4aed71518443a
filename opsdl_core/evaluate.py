"""Greedy question-answering accuracy with the long context (x_L) or the teacher context (x_S)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from .prepare import Prepared
from .prompts import pad_token_id, stop_token_ids
from .rollout import SamplingParams, TransformersRollout
from .synthetic import score_example


@dataclass
class EvalResult:
    context: str  # "long" | "short"
    accuracy: float
    n: int
    correct: list[bool] = field(repr=False)
    outputs: list[str] = field(repr=False)
    mean_prompt_tokens: float = 0.0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"context": self.context, "accuracy": self.accuracy, "n": self.n,
                "mean_prompt_tokens": self.mean_prompt_tokens, "seconds": self.seconds}


def evaluate_accuracy(model: Any, tokenizer: Any, items: Sequence[Prepared], *, context: Literal["long", "short"],
                      max_new_tokens: int = 24, batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Greedy answers for every item; correct when the reference answer occurs in the output."""
    if context not in ("long", "short"):
        raise ValueError(f"context must be 'long' or 'short', got {context!r}")
    missing = [p.example.id for p in items if p.example.answer is None]
    if missing:
        raise ValueError(f"accuracy needs reference answers; examples without one: {missing[:5]}")
    t0 = time.perf_counter()
    prompts = [p.student_ids if context == "long" else p.teacher_ids for p in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    engine = TransformersRollout(model, pad_id=pad_token_id(tokenizer), max_batch_size=batch_size)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=stop_token_ids(tokenizer, getattr(model, "config", None)))
    outputs: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = engine.generate([prompts[i] for i in idx], n=1, params=params, seed=0)
        for i, ids in zip(idx, batch.response_ids):
            outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    correct = [bool(score_example(p.example, out))
               for p, out in zip(items, outputs)]
    n = len(items)
    return EvalResult(context, sum(correct) / n if n else float("nan"), n, correct, outputs,
                      sum(map(len, prompts)) / n if n else 0.0, time.perf_counter() - t0)

