"""A training step's record: each micro-batch's metrics (``micro_metrics``), their sum over the step
(``add_metrics``), the step's log line (``format_step``), and the seeds and layouts the step uses."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..grading import rollout_judgement
from .records import Distilled

__all__ = ["NonFiniteGuard", "micro_metrics", "add_metrics", "format_step", "hash_seed", "pad_like"]


def micro_metrics(part: Distilled, tokenizer: Any, *, step: int, max_logprob_diff: float | None) -> dict[str, float]:
    """One OPSDL micro-batch's metrics (loss, teacher-student gap, answers judged right, ...), with its
    ``tokens`` and ``samples``; raises if the sampler's log-probs are not the trainer's on the same
    tokens by more than ``max_logprob_diff`` nats (stale or wrong engine weights)."""
    out, stu, tch, ro, sampler = part.loss, part.student, part.teacher, part.rollout, part.sampler_logprobs
    mask = stu.mask
    ntok = max(1, int(mask.sum()))
    lens = [len(r) for r in ro.response_ids]
    exs = [part.batch[g].example for g in ro.prompt_index]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ro.response_ids]
    vals = {
        "loss": float(out.loss.detach()),
        "advantage_mean": float(((tch.logprobs - stu.logprobs.detach()) * mask).sum() / ntok),
        "kl_estimate": float(((stu.logprobs.detach() - tch.logprobs) * mask).sum() / ntok),
        "response_len": sum(lens) / len(lens),
        "stop_frac": sum(r == "stop" for r in ro.finish_reasons) / len(lens),
        "sampler_logprob_absdiff": float(((stu.logprobs.detach() - sampler).abs() * mask).sum() / ntok),
        **{f"loss_{k}": v for k, v in out.metrics.items() if k != "tokens"},
        **rollout_judgement(exs, texts),
    }
    if max_logprob_diff is not None and vals["sampler_logprob_absdiff"] > max_logprob_diff:
        raise RuntimeError(
            f"step {step + 1}: the rollout engine's log-probs differ from the trainer's by "
            f"{vals['sampler_logprob_absdiff']:.4f} nats per token on the same tokens (limit "
            f"rollout.max_logprob_diff={max_logprob_diff}); its weights are stale or wrong (engine weight version "
            f"{ro.weight_version}, trainer step {step}). Not training on these samples.")
    return {**vals, "tokens": ntok, "samples": len(lens)}


def add_metrics(sums: dict[str, float], vals: dict[str, float]) -> None:
    """Add one micro-batch's ``vals`` to the step's ``sums``."""
    for k, v in vals.items():
        sums[k] = sums.get(k, 0.0) + v


def format_step(m: dict[str, Any], total: int) -> str:
    """The step's log line."""
    acc = f" acc={m['rollout_accuracy']:.2f}" if "rollout_accuracy" in m else ""
    kl = f" kl={m['kl_estimate']:.4f}" if "kl_estimate" in m else ""  # baselines have none
    skipped = " SKIPPED (non-finite)" if m.get("skipped_nonfinite") else ""
    return (f"[opsdl] step {m['step']}/{total}{skipped} loss={m['loss']:+.4f}{kl} "
            f"len={m['response_len']:.1f}{acc} | gen {m['generate_s']:.2f}s teacher {m['teacher_s']:.2f}s "
            f"student {m['student_s']:.2f}s optim {m['optim_s']:.2f}s step {m['step_s']:.2f}s")


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def pad_like(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Ragged per-token ``rows`` as a float32 tensor of ``like``'s shape, zero-padded."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


@dataclass
class NonFiniteGuard:
    """Steps skipped for a non-finite loss or gradient norm, in all and in a row; ``check`` stops the run once
    ``limit`` (``train.max_nonfinite_steps``) were skipped in a row. Its state goes into every checkpoint."""

    limit: int
    total: int = 0
    run: int = 0

    def record(self, skipped: bool) -> None:
        self.total += skipped
        self.run = self.run + 1 if skipped else 0

    def check(self, step: int) -> None:
        if self.run >= self.limit:
            raise FloatingPointError(
                f"step {step}: {self.run} steps in a row had a non-finite loss or gradient norm "
                f"(train.max_nonfinite_steps={self.limit}); stopping. The weights are those of the last finite update "
                f"and the last checkpoint is kept; lower optim.lr or check the data, then resume or restart.")

    def state(self) -> dict[str, int]:
        return {"nonfinite_steps": self.total, "nonfinite_consecutive": self.run}

    def load(self, state: dict[str, Any]) -> None:
        self.total, self.run = int(state.get("nonfinite_steps", 0)), int(state.get("nonfinite_consecutive", 0))
