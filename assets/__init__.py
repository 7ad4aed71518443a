"""Dagster asset and asset-check definitions: prompt curation → teacher contexts → rollout →
distillation training → long- and short-context evaluation, each a thin wrapper over ``opsdl_core``."""

from .checks import ALL_CHECKS
from .curation import curated_prompts, eval_sets
from .evaluation import evaluation, report
from .experiment import method_comparison
from .long_context import long_context_eval
from .resources import OpsdlResource
from .teacher import base_rollouts, teacher_contexts
from .training import opsdl_model

ALL_ASSETS = [eval_sets, curated_prompts, teacher_contexts, base_rollouts, opsdl_model, evaluation,
              long_context_eval, report]  # the pipeline (the main job)
EXPERIMENT_ASSETS = [method_comparison]  # OPSDL against the baselines, over seeds (its own job)

__all__ = ["ALL_ASSETS", "ALL_CHECKS", "EXPERIMENT_ASSETS", "OpsdlResource"]
