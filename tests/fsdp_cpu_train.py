"""``python -m opsdl_core.train`` with accelerate's FSDP on CPU processes (for ``tests/test_distributed.py``).

accelerate selects FSDP only for processes on an accelerator (GPU, XPU, NPU, ...): on CPU processes
(``MULTI_CPU``) it ignores ``ACCELERATE_USE_FSDP`` and runs DDP, every rank holding all the weights. torch's
FSDP2 (``fully_shard``) shards on CPU processes over gloo. This entry point lifts accelerate's gate and
nothing else: accelerate then prepares the model with ``fully_shard`` (its ``fsdp2_prepare_model``, the
plugin read from the launch's environment) as on GPUs, and the trainer runs on sharded parameters.

    accelerate launch --config_file FSDP_CPU.yaml tests/fsdp_cpu_train.py --config RUN.yaml
"""

from __future__ import annotations

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerate_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what a later AcceleratorState() reads


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from opsdl_core.train.job import main

    raise SystemExit(main())
