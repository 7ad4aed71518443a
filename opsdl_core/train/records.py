"""What the trainer hands around: one OPSDL micro-batch (``Distilled``) and a finished run (``TrainResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Distilled", "TrainResult"]


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

    @property
    def n_tokens(self) -> int:
        """Response tokens of the micro-batch (the teacher's mask: the same tokens the student scores)."""
        return max(1, int(self.teacher.mask.sum()))


@dataclass
class TrainResult:
    steps_done: int
    resumed_from: int | None
    metrics: list[dict[str, Any]] = field(repr=False)
    seconds: float = 0.0
    final_dir: Path | None = None
