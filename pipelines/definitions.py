"""The code location: assets, checks, jobs, the re-training schedule and the data-inbox sensor.

Loaded by ``workspace.yaml`` (``dagster dev`` from the project root) and by ``dagster asset
materialize -m pipelines.definitions``."""


import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from assets import ALL_ASSETS, ALL_CHECKS, EXPERIMENT_ASSETS, OpsdlResource
from opsdl_core.data.examples import JSONL_SUFFIXES, PARQUET_SUFFIXES

INBOX_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + (".json",)

full_pipeline = dg.define_asset_job(
    "opsdl_full_pipeline", selection=dg.AssetSelection.assets(*ALL_ASSETS),
    description="Curate prompts → teacher contexts → base rollouts → OPSDL training → evaluation (synthetic "
                "suites and lm-eval RULER per length) → report.")

evaluation_only = dg.define_asset_job(
    "opsdl_evaluation_only", selection=dg.AssetSelection.assets("evaluation", "long_context_eval", "report"),
    description="Re-evaluate the latest trained model on the latest evaluation suites and rewrite the report.")

experiment = dg.define_asset_job(
    "opsdl_experiment", selection=dg.AssetSelection.assets(*EXPERIMENT_ASSETS),
    description="OPSDL against Long-SFT and DPO on the same prompts, over seeds, per context length: the "
                "comparison table, accuracy against length and sample efficiency (configs/experiment.yaml).")

retrain_schedule = dg.ScheduleDefinition(
    name="opsdl_weekly_retrain", job=full_pipeline, cron_schedule="0 3 * * 1",
    run_config={"ops": {"curated_prompts": {"config": {"source": "inbox"}}}},
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every Monday 03:00: re-train on the newest data in the inbox folder.")


def _inbox_files(inbox: Path) -> dict[str, str]:
    if not inbox.is_dir():
        return {}
    return {p.name: f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(inbox.iterdir())
            if p.is_file() and p.suffix.lower() in INBOX_SUFFIXES and not p.name.startswith(".")}


@dg.sensor(job=full_pipeline, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Starts the full pipeline on the inbox folder when files are added or changed there.")
def inbox_sensor(context: dg.SensorEvaluationContext, opsdl: OpsdlResource):
    files = _inbox_files(opsdl.inbox)
    seen = json.loads(context.cursor) if context.cursor else {}
    changed = sorted(name for name, sig in files.items() if seen.get(name) != sig)
    if not changed:
        return dg.SkipReason(f"no new or changed files in {opsdl.inbox}")
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    context.update_cursor(json.dumps(files, sort_keys=True))
    return dg.RunRequest(run_key=f"inbox-{key}", tags={"opsdl/inbox_files": ",".join(changed)[:200]},
                         run_config={"ops": {"curated_prompts": {"config": {"source": "inbox"}}}})


def build_definitions(opsdl: OpsdlResource | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=[*ALL_ASSETS, *EXPERIMENT_ASSETS], asset_checks=ALL_CHECKS,
        jobs=[full_pipeline, evaluation_only, experiment],
        schedules=[retrain_schedule], sensors=[inbox_sensor],
        resources={"opsdl": opsdl or OpsdlResource(), "pipes_subprocess_client": dg.PipesSubprocessClient()})


defs = build_definitions(OpsdlResource(model=os.environ.get("OPSDL_MODEL", "smollm2-135m-instruct")))
