"""A rollout snapshot: samples of a (base) model on long-context prompts, each token scored by the
teacher prompt.  Diagnostics (how far apart are student and teacher before training?) and the raw
material of the baselines (Long-SFT targets, DPO pairs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.prepare import Prepared
from ..data.prompts import pad_token_id, stop_token_ids
from ..grading import score_example
from ..models.rollout import SamplingParams, TransformersRollout
from ..models.scoring import score_responses

__all__ = ["rollout_snapshot"]


@torch.no_grad()
def rollout_snapshot(model: Any, tokenizer: Any, items: Sequence[Prepared], *, n: int, temperature: float = 1.0,
                     top_p: float = 1.0, max_new_tokens: int = 32, seed: int = 0,
                     batch_prompts: int = 2) -> list[dict[str, Any]]:
    """One row per sample: example id, sample index, response text and token count, finish
    reason, summed log-probs under the student (long) and teacher (short) prompts, the
    per-token reverse-KL estimate ``mean(s_t - q_t)``, ``correct`` when the example has a
    reference answer (else None), and per token: ids, text pieces, student and teacher log-probs."""
    pad = pad_token_id(tokenizer)
    engine = TransformersRollout(model, pad_id=pad, max_batch_size=max(n * batch_prompts, 1))
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            stop_token_ids=stop_token_ids(tokenizer, getattr(model, "config", None)))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), batch_prompts):
        chunk = list(items[start : start + batch_prompts])
        ro = engine.generate([p.student_ids for p in chunk], n=n, params=params, seed=seed + start)
        stu = score_responses(model, prompts=[p.student_ids for p in chunk], responses=ro.response_ids,
                              prompt_index=ro.prompt_index, pad_id=pad)
        tch = score_responses(model, prompts=[p.teacher_ids for p in chunk], responses=ro.response_ids,
                              prompt_index=ro.prompt_index, pad_id=pad)
        for b, (g, ids) in enumerate(zip(ro.prompt_index, ro.response_ids)):
            ex = chunk[g].example
            m = stu.mask[b]
            s, q = stu.logprobs[b][m], tch.logprobs[b][m]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            correct = (bool(score_example(ex, text))
                       if ex.answer is not None else None)
            rows.append({"example_id": ex.id, "sample_index": b - ro.prompt_index.index(g), "response": text,
                         "response_ids": list(map(int, ids)), "n_tokens": len(ids),
                         "finish_reason": ro.finish_reasons[b], "student_logprob": float(s.sum()),
                         "teacher_logprob": float(q.sum()),
                         "kl_estimate": float((s - q).mean()) if len(s) else 0.0, "correct": correct,
                         "token_ids": list(map(int, ids)), "tokens": [tokenizer.decode([t]) for t in ids],
                         "student_token_logprobs": s.tolist(), "teacher_token_logprobs": q.tolist()})
    return rows
