"""The baselines' training data: targets (Long-SFT) and preference pairs (DPO, LongPO form).

Both are built once, before the first step, with the initial weights, for exactly the prompts the
run will see (the trainer's prompt order), and written to ``run_dir/baseline_data.jsonl`` so a
resumed run trains on the same data::

    target / chosen  y_w = greedy answer of π_0 to x_S = chat(C_s ⊕ Q)   (or the data's answer)
    rejected         y_l = greedy answer of π_0 to x_L = chat(C_L ⊕ Q)   (dpo)
    reference        log π_0(y_w | x_S), log π_0(y_l | x_S)              (dpo: the short-context reference)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..data.prepare import PreparedData, prompt_order
from ..grading import score_example
from ..models.rollout import RolloutEngine, SamplingParams
from ..models.scoring import score_responses
from ..run_dir import RunDir, read_jsonl
from . import checkpoint as ckpt

__all__ = ["used_prompt_indices", "load_or_build_baseline_data"]


def used_prompt_indices(cfg: RunConfig, n_prompts: int, processes: int = 1) -> list[int]:
    """The training prompts a run of ``cfg`` on ``processes`` ranks visits, in the trainer's order
    (``prompt_order``: every rank takes its own slice of the same order)."""
    total = cfg.train.steps * cfg.train.grad_accum * cfg.train.prompts_per_step * processes
    return sorted({prompt_order(n_prompts, cfg.train.seed, i, cfg.train.prompt_order) for i in range(total)})


def _reference_ids(tokenizer: Any, answer: str, stop_id: int) -> list[int]:
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [stop_id]


def build_baseline_data(cfg: RunConfig, model: Any, tokenizer: Any, data: PreparedData, rollout: RolloutEngine,
                        sampling: SamplingParams, pad_id: int, processes: int = 1) -> dict[int, dict[str, Any]]:
    """``{prompt index: row}`` for the prompts the run uses; rows hold ``target_ids`` (and, for
    dpo, ``rejected_ids``, ``ref_chosen``, ``ref_rejected``) and whether each answer is right."""
    kind, greedy = cfg.method.kind, SamplingParams(temperature=0.0, top_p=1.0,
                                                   max_new_tokens=sampling.max_new_tokens,
                                                   stop_token_ids=sampling.stop_token_ids)
    idx = used_prompt_indices(cfg, len(data.train), processes)
    prepared = [data.train[i] for i in idx]
    if cfg.method.target == "reference":
        missing = [p.example.id for p in prepared if not p.example.answer]
        if missing:
            raise ValueError(f"method.target=reference: examples {missing[:5]} have no 'answer'; expected every "
                             f"training example to carry one (or use method.target=self_short)")
        targets = [_reference_ids(tokenizer, p.example.answer, sampling.stop_token_ids[0]) for p in prepared]
    else:
        targets = rollout.generate([p.teacher_ids for p in prepared], n=1, params=greedy, seed=0).response_ids
    rows = {i: {"target_ids": list(map(int, t))} for i, t in zip(idx, targets)}
    if kind == "dpo":
        rejected = rollout.generate([p.student_ids for p in prepared], n=1, params=greedy, seed=0).response_ids
        with torch.no_grad():
            ref = score_responses(model, prompts=[p.teacher_ids for p in prepared], responses=list(targets) + rejected,
                                  prompt_index=list(range(len(prepared))) * 2, pad_id=pad_id)
        seq = (ref.logprobs * ref.mask).sum(-1).tolist()
        for j, i in enumerate(idx):
            rows[i].update(rejected_ids=list(map(int, rejected[j])), ref_chosen=seq[j],
                           ref_rejected=seq[len(idx) + j])
    for i, p in zip(idx, prepared):
        ex = p.example
        if ex.answer is not None:
            for key, ids_key in (("target_correct", "target_ids"), ("rejected_correct", "rejected_ids")):
                if ids_key in rows[i]:
                    text = tokenizer.decode(rows[i][ids_key], skip_special_tokens=True)
                    rows[i][key] = bool(score_example(ex, text))
    return rows


def load_or_build_baseline_data(cfg: RunConfig, run_dir: Path, **build_args: Any) -> dict[int, dict[str, Any]]:
    """The run's baseline data: read from ``run_dir`` when a run of the same config wrote it (a
    resumed run), else built now and written atomically."""
    path = RunDir(run_dir).baseline_data
    processes = build_args.get("processes", 1)
    if path.exists():
        head, *rows = read_jsonl(path)
        if head.get("config_hash") == cfg.hash() and head.get("processes", 1) == processes:
            return {int(r.pop("index")): r for r in rows}
    data = build_baseline_data(cfg, **build_args)
    lines = [json.dumps({"config_hash": cfg.hash(), "method": cfg.method.kind, "processes": processes})]
    lines += [json.dumps({"index": i, **r}) for i, r in sorted(data.items())]
    ckpt.atomic_write_text(path, "\n".join(lines) + "\n")
    return data
