"""Dagster definitions for opsdl: jobs, schedules, sensors and resources (the code location that
``workspace.yaml`` loads). Thin by design: every asset calls into ``opsdl_core``."""
