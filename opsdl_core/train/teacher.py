"""Which weights the teacher scores with: ``live``, ``base`` or ``ema``.

The teacher is the same network as the student, given the short context. Its weights:

* ``live``: the current weights (stop-gradient only);
* ``base``: the initial weights, frozen. With LoRA the adapter is disabled (exactly the base
  model, no copy); with full fine-tuning a snapshot of the initial weights is swapped in;
* ``ema``: an exponential moving average of the trainable weights, swapped in for scoring.

Swapping points every module slot that holds a *trainable* tensor (the adapter under LoRA; tied
weights in each of their slots) at the teacher's tensor for the block and back afterwards. The
student's Parameter objects are never written, so its optimizer state and any autograd graph
built before the block (the long-context term when the retention anchor scores next) stay valid.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def check_teacher_sharding(kind: str, *, lora: bool, distributed_type: str) -> None:
    """Refuse a teacher whose weights would be swapped into sharded parameters (FSDP, DeepSpeed): FSDP
    gathers each layer's weights from its own shards, not from the module slot, so a swapped-in tensor
    would be ignored and the teacher would silently score with the student's weights. ``live`` and
    ``base`` with LoRA (the adapter switched off, no tensor swapped) are what works there."""
    sharded = str(distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED")
    if sharded and swaps_weights(kind, lora=lora):
        what = "the EMA teacher" if kind == "ema" else "the frozen-base teacher without LoRA"
        raise ValueError(
            f"train.teacher={kind!r} with lora.enabled={lora} under {str(distributed_type).split('.')[-1]}: {what} "
            "swaps a copy of the weights into the module slots, which sharded parameters do not read, so the "
            "teacher would score with the student's weights. Use train.teacher='base' with LoRA or "
            "train.teacher='live' under FSDP / ZeRO-3, or DDP (configs/accelerate/cpu2.yaml's kind) for this teacher.")


def swaps_weights(kind: str, *, lora: bool) -> bool:
    """Whether the teacher kind scores with a copy of the weights swapped in (``ema``; ``base`` without LoRA)."""
    return kind == "ema" or (kind == "base" and not lora)


class TeacherWeights:
    def __init__(self, model: Any, kind: str, *, lora: bool, ema_decay: float = 0.95):
        if kind not in ("live", "base", "ema"):
            raise ValueError(f"teacher kind must be 'live', 'base' or 'ema', got {kind!r}")
        self.model, self.kind, self.lora, self.decay = model, kind, lora, ema_decay
        self.shadow: dict[str, torch.Tensor] = {}
        if swaps_weights(kind, lora=lora):
            self.shadow = {n: p.detach().clone() for n, p in self._trainable()}

    def _trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    @contextlib.contextmanager
    def scoring(self) -> Iterator[None]:
        """Inside this block the model carries the teacher's weights, in eval mode (no dropout: the
        teacher's log-probs are a target, not a sample), and no grad is recorded; the student's mode is
        restored afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                if self.kind == "live":
                    yield
                elif self.kind == "base" and self.lora:
                    with self.model.disable_adapter():
                        yield
                else:
                    with self._swapped():
                        yield
        finally:
            for m, training in modes:
                m.training = training

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        # one stand-in per parameter, shared by all its slots, so tied weights stay tied
        teacher = {id(p): torch.nn.Parameter(self.shadow[n], requires_grad=False)
                   for n, p in self._trainable() if n in self.shadow}
        slots = [(m, k, p) for m in self.model.modules() for k, p in m._parameters.items()
                 if p is not None and id(p) in teacher]
        try:
            for m, k, p in slots:
                m._parameters[k] = teacher[id(p)]
            yield
        finally:
            for m, k, p in slots:
                m._parameters[k] = p

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the EMA towards the new weights (no-op otherwise)."""
        if self.kind != "ema":
            return
        for n, p in self._trainable():
            self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise KeyError(f"teacher state has keys {sorted(state)[:3]}..., expected {sorted(self.shadow)[:3]}...")
        for n, t in state.items():
            self.shadow[n].copy_(t)
