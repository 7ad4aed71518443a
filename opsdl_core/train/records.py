"""What the trainer hands around: a micro-batch of a step (``Distilled`` for OPSDL, ``BaselineBatch`` for
Long-SFT and DPO), one of its loss terms (``LossTerm``), and a finished run (``TrainResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BaselineBatch", "Distilled", "LossTerm", "TrainResult"]


@dataclass
class Distilled:
    """One micro-batch of an OPSDL step: its prompts, the samples and the teacher's scores of them
    (``OPSDLTrainer._sample``), then the student's scores and the loss (``_student_loss``); ``anchor``:
    the retention guard's own micro-batch on the short prompt."""

    batch: list[Any]
    student_prompts: list[list[int]]
    rollout: Any
    teacher: Any
    student: Any = None
    loss: Any = None
    sampler_logprobs: Any = None
    anchor: "Distilled | None" = None
    prefilled: Any = None  # the student prompts' prefill (with grad) the rollout decoded from, scored on once
    metrics: dict[str, float] = field(default_factory=dict)  # set once its loss terms are done

    @property
    def n_tokens(self) -> int:
        """Response tokens of the micro-batch (the teacher's mask: the same tokens the student scores)."""
        return max(1, int(self.teacher.mask.sum()))

    def sizes(self) -> dict[str, int]:
        """Each loss term's share of the step: response tokens (the token-level mean over the step)."""
        out = {"distill": self.n_tokens}
        if self.anchor:
            out["short_anchor"] = self.anchor.n_tokens
        return out


@dataclass
class BaselineBatch:
    """One micro-batch of a Long-SFT or DPO step: its prompts and their stored targets (``baselines.py``)."""

    batch: list[Any]
    rows: list[dict[str, Any]]
    kind: str  # "sft" or "dpo"
    metrics: dict[str, float] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Long-SFT: target tokens (the token-level mean over the step); DPO: pairs (the mean over its pairs)."""
        if self.kind == "sft":
            return {"sft": sum(len(r["target_ids"]) for r in self.rows)}
        return {"dpo": len(self.rows)}


@dataclass
class LossTerm:
    """One backward of a micro-batch: ``weight * loss``, scaled by ``size`` over the term's total in the step."""

    name: str
    loss: Any  # a scalar tensor with grad
    size: int
    weight: float = 1.0


@dataclass
class TrainResult:
    steps_done: int
    resumed_from: int | None
    metrics: list[dict[str, Any]] = field(repr=False)
    seconds: float = 0.0
    final_dir: Path | None = None
