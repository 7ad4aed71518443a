"""Greedy question-answering accuracy with the long context (x_L) or the teacher context (x_S).

All the questions of an evaluation (every suite, both contexts) go to one generator at once:

    results = evaluate_jobs(model, tok, [EvalJob("kv@1024", items, "long"), EvalJob("kv@C_s", items, "short")],
                            backend="auto", model_dir=folder)

``backend="vllm"`` starts one vLLM engine on ``model_dir`` and submits every prompt in one call (the
engine batches them continuously); ``"transformers"`` runs the trainer's own KV-cache decoder in
batches of similar length; ``"auto"`` takes vLLM when it is installed and the model has a folder.
Both are greedy on the same prompt token ids and give the same answers (tests/test_evaluate_engine.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Literal, Sequence

from ..data.prepare import Prepared
from ..data.prompts import pad_token_id, stop_token_ids
from ..grading import error_kind, score_example
from ..models.rollout import SamplingParams, TransformersRollout

EVAL_BACKENDS = ("auto", "transformers", "vllm")


@dataclass
class EvalResult:
    context: str  # "long" | "short"
    accuracy: float
    n: int
    correct: list[bool] = field(repr=False)
    outputs: list[str] = field(repr=False)
    mean_prompt_tokens: float = 0.0
    seconds: float = 0.0  # this job's share of the generation time (by prompt tokens) when jobs ran together
    backend: str = "transformers"

    def answer_rows(self, items: Sequence[Prepared]) -> list[dict[str, Any]]:
        """One dict per question (``id``, ``output``, ``correct``, ``error``: a wrong answer's
        ``synthetic.error_kind``): what the lineage store's ``eval_answers`` and the paired counts take."""
        return [{"id": it.example.id, "output": out, "correct": ok, "error": error_kind(it.example, out, ok)}
                for it, out, ok in zip(items, self.outputs, self.correct)]

    def summary(self) -> dict[str, Any]:
        return {"context": self.context, "accuracy": self.accuracy, "n": self.n,
                "mean_prompt_tokens": self.mean_prompt_tokens, "seconds": self.seconds, "backend": self.backend}


@dataclass(frozen=True)
class EvalJob:
    key: Hashable  # the caller's name for it
    items: Sequence[Prepared]
    context: Literal["long", "short"]


def resolve_backend(backend: str, model_dir: str | Path | None) -> str:
    """``auto`` → ``vllm`` when vLLM imports and the model has a folder the engine can start from."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"evaluation backend must be one of {EVAL_BACKENDS}, got {backend!r}")
    has_folder = bool(model_dir) and (Path(model_dir) / "config.json").is_file()
    if backend == "vllm" and not has_folder:
        raise ValueError(f"evaluation backend 'vllm' needs the model's folder (config.json); got {model_dir!r}")
    if backend != "auto":
        return backend
    from ..models.rollout_vllm import vllm_available

    return "vllm" if has_folder and vllm_available() and engine_supports(model_dir) else "transformers"


def engine_supports(model_dir: str | Path) -> bool:
    """Whether vLLM's attention can serve this model here: on the CPU build, head sizes of 32, 64, 80, ...
    only (``CPUAttentionBackend.get_supported_head_sizes``); a tiny test model with 16 falls back."""
    import json

    import torch

    if torch.cuda.is_available():
        return True
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = set(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # noqa: BLE001 - another vLLM layout: let the engine decide
        return True
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get("num_attention_heads", 1)))
    return int(head) in sizes


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   backend: str = "transformers", model_dir: str | Path | None = None, batch_size: int = 8,
                   kv_cache_gib: float = 2.0, engine_dtype: str | None = None,
                   log: Callable[[str], None] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy answer token ids (stop token included when it stopped) for every prompt, in order.
    ``engine_dtype``: the vLLM engine's dtype (default: the model's, float32 for the embedded one)."""
    config = getattr(model, "config", None)
    if config is None and model_dir is not None:  # the engine path needs no model in this process
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir))
    stops = tuple(stop_token_ids(tokenizer, config))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stops)
    if not prompts:
        return []
    if backend == "vllm":
        from ..config import VLLMConfig
        from ..models.rollout_vllm import VLLMRollout

        dtype = engine_dtype or str(getattr(model, "dtype", None) or getattr(config, "dtype", None)
                                    or "float32").replace("torch.", "")
        longest = max(map(len, prompts)) + max_new_tokens
        # in this process: no engine process to spawn and import (12 s against 34 s to start on this 2-core
        # machine, the same answers; nothing to sync, so nothing the own-process engine would add)
        settings = VLLMConfig(max_model_len=max(16, -(-longest // 256) * 256), kv_cache_gib=kv_cache_gib,
                              in_process=True)
        engine = VLLMRollout(str(model_dir), settings, dtype=dtype, log=log, greedy_only=True)
        try:
            batch = engine.generate(prompts, n=1, params=params, seed=0)
        finally:
            engine.release()
        if progress is not None:
            progress(len(prompts), len(prompts))
        return batch.response_ids
    if backend != "transformers":
        raise ValueError(f"greedy_answers: backend must be 'transformers' or 'vllm', got {backend!r}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    engine = TransformersRollout(model, pad_id=pad_token_id(tokenizer), max_batch_size=batch_size)
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = engine.generate([prompts[i] for i in idx], n=1, params=params, seed=0)
        for i, ids in zip(idx, batch.response_ids):
            out[i] = ids
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    return out


def evaluate_jobs(model: Any, tokenizer: Any, jobs: Sequence[EvalJob], *, max_new_tokens: int = 24,
                  batch_size: int = 8, backend: str = "transformers", model_dir: str | Path | None = None,
                  kv_cache_gib: float = 2.0, engine_dtype: str | None = None,
                  log: Callable[[str], None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[Hashable, EvalResult]:
    """Greedy answers for every item of every job, generated together; a question is right when its
    reference answer occurs in the output (``synthetic.score_example``). Returns ``{job.key: result}``."""
    for job in jobs:
        if job.context not in ("long", "short"):
            raise ValueError(f"context must be 'long' or 'short', got {job.context!r} (job {job.key!r})")
        missing = [p.example.id for p in job.items if p.example.answer is None]
        if missing:
            raise ValueError(f"accuracy needs reference answers; examples without one: {missing[:5]} (job {job.key!r})")
    if len({job.key for job in jobs}) != len(jobs):
        raise ValueError("evaluate_jobs: job keys must be distinct")
    which = resolve_backend(backend, model_dir)
    prompts = [[p.student_ids if job.context == "long" else p.teacher_ids for p in job.items] for job in jobs]
    flat = [ids for ps in prompts for ids in ps]
    t0 = time.perf_counter()
    answers = greedy_answers(model, tokenizer, flat, max_new_tokens=max_new_tokens, backend=which,
                             model_dir=model_dir, batch_size=batch_size, kv_cache_gib=kv_cache_gib,
                             engine_dtype=engine_dtype, log=log, progress=progress)
    seconds = time.perf_counter() - t0
    total_tokens = sum(map(len, flat)) or 1
    out: dict[Hashable, EvalResult] = {}
    start = 0
    for job, ps in zip(jobs, prompts):
        outputs = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers[start: start + len(ps)]]
        start += len(ps)
        correct = [bool(score_example(p.example, o)) for p, o in zip(job.items, outputs)]
        n = len(job.items)
        tokens = sum(map(len, ps))
        out[job.key] = EvalResult(job.context, sum(correct) / n if n else float("nan"), n, correct, outputs,
                                  tokens / n if n else 0.0, seconds * tokens / total_tokens, which)
    return out
