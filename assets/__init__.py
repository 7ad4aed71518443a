"""Dagster asset and asset-check definitions: prompt curation → teacher contexts → rollout →
distillation training → long- and short-context evaluation, each a thin wrapper over ``opsdl_core``."""
