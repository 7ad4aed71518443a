"""Gradient checkpointing that keeps the KV cache (``train.gradient_checkpointing``).

The student encodes its long prompt once, with gradient, into a KV cache, and its answers are then scored
on top of that cache (``scoring.py``): the cache is what saves the second encoding, and gradients flow from
the answers' log-probs back through the cached keys and values into the prompt's layers. transformers'
gradient checkpointing switches the cache off in training (``GradientCheckpointingLayer`` drops
``past_key_values``) because a checkpointed layer runs twice, once in the forward and once when the
backward recomputes it, and a cache written in both would hold every position twice.

Here the recompute leaves the cache alone instead. transformers' own checkpointing is used as it is —
``gradient_checkpointing_enable`` with ``use_reentrant=False`` — with a ``context_fn``: its first context
manager is active while a layer runs forward and the second while the backward recomputes it, both for the
same checkpointed call. The cache's layers are :class:`ReplaySafeLayer`: in the forward they append as a
``DynamicLayer`` does and keep a reference to the keys and values they returned in this call (tensors the
cache holds anyway, until it is re-indexed); in the recompute they return those and append nothing. Non-reentrant checkpointing takes only the
*values* of the recomputed tensors (the gradient runs along the forward's graph), so the backward is the
one without checkpointing, to float rounding (tests: log-probs, gradients, LoRA and full fine-tuning).

What stays in memory per layer is its input ``[T, hidden]`` and the cache's keys and values; each layer's
intermediate activations (the MLP's ``[T, intermediate]`` products above all) exist only while that layer
runs forward or is recomputed. ``benchmarks/bench_step.py`` measures peak memory and time against the
context length with and without it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_state = threading.local()  # .recording / .replaying: the _Region of the checkpointed call now running


class _Region:
    """One checkpointed call (a decoder layer on one input): what each cache layer returned in it."""

    __slots__ = ("returned",)

    def __init__(self) -> None:
        self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class _Active:
    def __init__(self, attr: str, region: _Region):
        self.attr, self.region, self.previous = attr, region, None

    def __enter__(self) -> None:
        self.previous = getattr(_state, self.attr, None)
        setattr(_state, self.attr, self.region)

    def __exit__(self, *exc: Any) -> None:
        setattr(_state, self.attr, self.previous)


def _contexts() -> tuple[_Active, _Active]:
    """``torch.utils.checkpoint``'s ``context_fn``: (forward context, recompute context) of one call."""
    region = _Region()
    return _Active("recording", region), _Active("replaying", region)


class ReplaySafeLayer(DynamicLayer):
    """A ``DynamicLayer`` that a checkpointed layer's recompute reads without appending to it again."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        replay = getattr(_state, "replaying", None)
        if replay is not None and id(self) in replay.returned:
            return replay.returned[id(self)]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        record = getattr(_state, "recording", None)
        if record is not None:
            record.returned[id(self)] = (keys, values)
        return keys, values


def enable(model: Any) -> int:
    """Checkpoint every decoder layer of ``model`` (a transformers model, unwrapped) with a cache that survives
    the recompute. Returns the number of layers checkpointed; raises ``ValueError`` for a model whose layers
    do not use transformers' checkpointing interface (remote code in the old format)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} has no decoder layers that use "
                         "transformers' GradientCheckpointingLayer; turn train.gradient_checkpointing off for it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": _contexts})
    for layer in layers:
        layer._can_checkpoint_with_cache = True  # the cache is ours, and replay-safe
    return len(layers)


def is_enabled(model: Any) -> bool:
    return bool(getattr(model, "is_gradient_checkpointing", False))


def replay_safe_cache(config: Any) -> DynamicCache:
    """An empty cache for ``config`` whose layers are :class:`ReplaySafeLayer`. A model whose cache has layers
    of another kind (sliding windows, ...) is refused: their recompute would append twice."""
    cache = DynamicCache(config=config)
    other = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if other:
        raise ValueError(f"train.gradient_checkpointing: this model's KV cache has {', '.join(other)} layers; "
                         "checkpointing with the cache supports full-attention (DynamicLayer) caches only")
    for layer in cache.layers:
        layer.__class__ = ReplaySafeLayer
    return cache
