"""opsdl_core: on-policy self-distillation (OPSDL) for long-context language models.

The library holds all the logic (data, teacher contexts, rollout, scoring, losses, the
trainer, evaluation); the Dagster layer in ``assets/`` and ``pipelines/`` only calls it.
"""

__version__ = "0.1.0"
