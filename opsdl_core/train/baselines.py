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
from ..data.prepare import PreparedData, step_prompts
from ..grading import score_example
from ..models.rollout import RolloutEngine, SamplingParams
from ..models.scoring import score_responses
from ..run_dir import RunDir, read_jsonl
from . import checkpoint as ckpt
from .baseline_losses import longpo_dpo_loss, sequence_logprobs, sft_loss
from .records import BaselineBatch, LossTerm

__all__ = ["baseline_loss", "used_prompt_indices", "load_or_build_baseline_data"]


def used_prompt_indices(cfg: RunConfig, n_prompts: int, processes: int = 1) -> list[int]:
    """The training prompts a run of ``cfg`` on ``processes`` ranks visits, in the trainer's order
    (``prompt_order``: every rank takes its own slice of the same order)."""
    return sorted({i for step in range(cfg.train.steps) for micro in range(cfg.train.grad_accum)
                   for rank in range(processes)
                   for i in step_prompts(n_prompts, cfg.train, step=step, micro=micro, ranks=processes, rank=rank)})


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


def baseline_loss(model: Any, part: BaselineBatch, method: Any, *, pad_id: int, autocast: Any) -> LossTerm:
    """Long-SFT's loss on the targets, or DPO's (LongPO form) on the pairs, scored by the policy with grad
    (inside ``autocast()``); sets ``part.metrics``."""
    rows, k = part.rows, len(part.batch)
    responses = [r["target_ids"] for r in rows] + ([r["rejected_ids"] for r in rows] if part.kind == "dpo" else [])
    with autocast():
        pol = score_responses(model, prompts=[p.student_ids for p in part.batch], responses=responses,
                              prompt_index=list(range(k)) * (len(responses) // k), pad_id=pad_id)
    if part.kind == "sft":
        out = sft_loss(target_logprobs=pol.logprobs, mask=pol.mask)
    else:
        seq = sequence_logprobs(pol.logprobs, pol.mask)  # [2k]: chosen then rejected
        ref = torch.tensor([[r["ref_chosen"], r["ref_rejected"]] for r in rows], dtype=seq.dtype)
        out = longpo_dpo_loss(policy_chosen_logps=seq[:k], policy_rejected_logps=seq[k:],
                              ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1], beta=method.beta,
                              nll_weight=method.nll_weight, chosen_lengths=pol.mask[:k].sum(-1))
    vals = {"loss": float(out.loss.detach()), **{f"loss_{m}": v for m, v in out.metrics.items() if m != "tokens"},
            "response_len": sum(len(r["target_ids"]) for r in rows) / k}
    right = [r["target_correct"] for r in rows if "target_correct" in r]
    if right:
        vals["target_accuracy"] = sum(right) / len(right)
    part.metrics = {**vals, "tokens": float(pol.mask[:k].sum()), "samples": k}
    return LossTerm(part.kind, out.loss, part.sizes()[part.kind])
