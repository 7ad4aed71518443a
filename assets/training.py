"""Distillation training, launched as its own process through Dagster Pipes."""


import math
import os
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from opsdl_core.config import RunConfig
from opsdl_core.config_reference import field_default, field_help
from opsdl_core.config_schema import deep_merge, parse_overrides
from opsdl_core.lineage.store import ingest_training_run
from opsdl_core.run_dir import RunDir

from .curation import md_table
from .plots import png_markdown, training_curves_png
from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource

GROUP = "training"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# The headline fields of the Launchpad form: field -> its run-config path. Each means "the run-config
# file's value (else the library's default)" unless set; every other field is reachable through
# ``overrides``. Their help and defaults come from RunConfig (opsdl_core.config): declared once.
HEADLINE_FIELDS = {
    "steps": "train.steps", "lr": "optim.lr", "loss": "loss.kind", "teacher": "train.teacher",
    "lora": "lora.enabled", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
    "samples_per_prompt": "rollout.samples_per_prompt", "prompts_per_step": "train.prompts_per_step",
    "grad_accum": "train.grad_accum", "temperature": "rollout.temperature", "top_p": "rollout.top_p",
    "max_new_tokens": "rollout.max_new_tokens", "advantage_clip": "loss.advantage_clip",
    "short_anchor": "loss.short_anchor", "seed": "train.seed", "save_every": "train.save_every",
    "num_threads": "train.num_threads", "rollout_backend": "rollout.backend",
}
# what the pipeline sets itself (the model from the resource, the data from the teacher_contexts asset,
# the run folder from the config hash; evaluation is the evaluation asset's)
PIPELINE_SECTIONS = ("model", "data")


def _headline(path: str) -> Any:
    return Field(default=None, description=f"{field_help(path)} Unset: the run-config file's value, else "
                                           f"{field_default(path)!r} ({path}).")


class TrainingConfig(dg.Config):
    """A run-config file (the same YAML as ``python -m opsdl_core.train --config``), a few headline
    fields that mean the file's value unless set, and overrides of any other field."""

    run_config_file: Optional[str] = Field(
        default=None, description="A run-config YAML (configs/demo.yaml's schema); its values are the defaults "
                                  "of the fields below. Its model and data sections are ignored: the resource's "
                                  "model and the teacher_contexts asset's data are used. Unset: the library's defaults.")
    steps: Optional[int] = _headline("train.steps")
    lr: Optional[float] = _headline("optim.lr")
    loss: Optional[str] = _headline("loss.kind")  # Dagster has no optional Literal: RunConfig checks the value
    teacher: Optional[str] = _headline("train.teacher")
    lora: Optional[bool] = _headline("lora.enabled")
    lora_r: Optional[int] = _headline("lora.r")
    lora_alpha: Optional[int] = _headline("lora.alpha")
    samples_per_prompt: Optional[int] = _headline("rollout.samples_per_prompt")
    prompts_per_step: Optional[int] = _headline("train.prompts_per_step")
    grad_accum: Optional[int] = _headline("train.grad_accum")
    temperature: Optional[float] = _headline("rollout.temperature")
    top_p: Optional[float] = _headline("rollout.top_p")
    max_new_tokens: Optional[int] = _headline("rollout.max_new_tokens")
    advantage_clip: Optional[float] = _headline("loss.advantage_clip")
    short_anchor: Optional[float] = _headline("loss.short_anchor")
    seed: Optional[int] = _headline("train.seed")
    save_every: Optional[int] = _headline("train.save_every")
    num_threads: Optional[int] = _headline("train.num_threads")
    rollout_backend: Optional[str] = _headline("rollout.backend")
    overrides: list[str] = Field(default=[], description="Any other run-config field: 'SECTION.FIELD=VALUE' "
                                                         "(docs/configuration.md lists them); applied last.")

    def run_config(self, *, model: str, model_cache_dir: str | None, data: dict[str, Any], run_dir: str) -> RunConfig:
        """File, then headline fields, then overrides; then what the pipeline sets itself."""
        base: dict[str, Any] = {}
        if self.run_config_file:
            path = Path(self.run_config_file)
            if not path.is_absolute():
                path = PROJECT_ROOT / path
            base = {k: v for k, v in RunConfig.from_yaml(path).to_dict().items() if k not in PIPELINE_SECTIONS}
        headline: dict[str, Any] = {}
        for name, dotted in HEADLINE_FIELDS.items():
            if getattr(self, name) is not None:
                *sections, key = dotted.split(".")
                node = headline
                for section in sections:
                    node = node.setdefault(section, {})
                node[key] = getattr(self, name)
        merged = deep_merge(deep_merge(base, headline), parse_overrides(self.overrides))
        for section in PIPELINE_SECTIONS:
            merged.pop(section, None)
        pipeline = {"model": {"name": model, "cache_dir": model_cache_dir}, "data": data,
                    "train": {"run_dir": run_dir}, "eval": {"enabled": False}}
        return RunConfig.from_dict(deep_merge(merged, pipeline))


@dg.asset(group_name=GROUP, kinds={"pytorch", "duckdb"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          retry_policy=dg.RetryPolicy(max_retries=1),
          description="OPSDL training of the base model on the teacher-context prompts, in its own process "
                      "(Dagster Pipes): logs and per-step metrics stream back; a retried step resumes from the "
                      "last checkpoint. Records the run, params, metric history and checkpoints in DuckDB.")
def opsdl_model(context: dg.AssetExecutionContext, config: TrainingConfig, opsdl: OpsdlResource,
                pipes_subprocess_client: dg.PipesSubprocessClient, teacher_contexts: dict[str, Any],
                eval_sets: dict[str, Any]) -> dg.Output:
    tc = teacher_contexts["config"]
    heldout = next(iter(eval_sets["suites"].values()))
    data = {"source": teacher_contexts["path"], "heldout_source": heldout["path"], "train_size": teacher_contexts["n"],
            "heldout_size": heldout["n"], "teacher_context": tc["kind"], "short_budget_tokens": tc["short_budget_tokens"],
            "window_tokens": tc["window_tokens"], "bm25_chunk_tokens": tc["bm25_chunk_tokens"],
            "bm25_top_k": tc["bm25_top_k"]}
    try:
        cfg = config.run_config(model=opsdl.model, model_cache_dir=opsdl.model_cache_dir, data=data, run_dir="")
    except (ValueError, OSError) as e:  # ConfigError names the field; a missing run_config_file its path
        raise dg.Failure(f"invalid training config: {e}") from None
    run_dir = opsdl.home_path / "runs" / f"opsdl-{cfg.hash()}"
    cfg.train.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "pipeline-config.yaml"
    cfg.to_yaml(cfg_path)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "OPSDL_CONFIG_PATH": str(cfg_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        command = opsdl.train_command("pipelines.pipes_train")
    except FileNotFoundError as e:
        raise dg.Failure(str(e)) from None
    inv = pipes_subprocess_client.run(context=context, command=command,
                                      extras={"config_path": str(cfg_path)}, env=env, cwd=str(PROJECT_ROOT))
    messages = inv.get_custom_messages()
    results = next((m["results"] for m in messages if isinstance(m, dict) and m.get("kind") == "results"), None)
    if results is None:
        raise dg.Failure(f"the training process ended without results (see its logs; run folder {run_dir})")
    metrics = RunDir(run_dir).metric_records()
    store = opsdl.store()
    ingested = ingest_training_run(store, run_dir, run_id=f"train-{cfg.hash()}", experiment="opsdl",
                                   input_datasets=[teacher_contexts["digest"], teacher_contexts["prompts_digest"]],
                                   code_version=context.assets_def.code_versions_by_key.get(context.asset_key),
                                   dagster_run_id=context.run.run_id, asset_key="opsdl_model")
    losses = [m["loss"] for m in metrics]
    kl = [m["kl_estimate"] for m in metrics]
    phases = results.get("mean_phase_seconds", {})
    png = training_curves_png(metrics, opsdl.artifacts("opsdl_model") / f"curves-{cfg.hash()}.png")
    final = results["final_dir"]
    merged = ingested["final"].get("merged")
    value = {"run_id": ingested["run_id"], "run_dir": str(run_dir), "final_dir": final,
             "model_dir": str(Path(final) / "model"), "checkpoint_id": merged or ingested["final"].get("adapter"),
             "config_hash": cfg.hash(), "steps": results["steps"], "losses_finite": all(map(math.isfinite, losses)),
             "base_model": opsdl.model, "base_model_hash": results.get("model_hash"), "curves": str(png)}
    return dg.Output(value, metadata={
        "steps": results["steps"], "train_seconds": results.get("train_seconds"),
        "config_hash": cfg.hash(), "checkpoint_id": value["checkpoint_id"] or "",
        "kl_first_10": sum(kl[:10]) / max(len(kl[:10]), 1), "kl_last_10": sum(kl[-10:]) / max(len(kl[-10:]), 1),
        "final_loss": losses[-1] if losses else float("nan"),
        "phase_seconds": dg.MetadataValue.md(md_table([{"phase": k, "seconds": v} for k, v in phases.items()],
                                                      ["phase", "seconds"])),
        "run_dir": dg.MetadataValue.path(str(run_dir)), "final_dir": dg.MetadataValue.path(final),
        "curves": dg.MetadataValue.md(png_markdown(png)),
    })
