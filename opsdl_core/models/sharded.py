"""Whether a model's parameters are sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): the one test
the scoring path (which must not run the LM head outside the model's forward there) and the trainer's
gathering (``opsdl_core.train.sharding``) share."""

from __future__ import annotations

from typing import Any


def fsdp_units(model: Any) -> list[Any]:
    """The FSDP2 units of ``model`` (empty when it is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: Any) -> bool:
    return bool(fsdp_units(model))
