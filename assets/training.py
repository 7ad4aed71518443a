"""Distillation training, launched as its own process through Dagster Pipes."""


import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from opsdl_core.config import RunConfig, parse_overrides
from opsdl_core.lineage.store import ingest_training_run

from .curation import md_table
from .plots import png_markdown, training_curves_png
from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource

GROUP = "training"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TrainingConfig(dg.Config):
    steps: int = Field(default=40, description="Optimizer steps.")
    lr: float = Field(default=2e-4, description="AdamW learning rate (LoRA: 1e-4-2e-4; full fine-tuning: ~1e-6).")
    loss: Literal["pointwise", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl"] = Field(
        default="pointwise", description="Distillation objective (pointwise = the paper's sampled reverse KL).")
    teacher: Literal["live", "base", "ema"] = Field(default="base", description="Teacher weights.")
    lora: bool = Field(default=True, description="LoRA adapters (false: full fine-tuning).")
    lora_r: int = Field(default=16, description="LoRA rank.")
    lora_alpha: int = Field(default=32, description="LoRA alpha.")
    samples_per_prompt: int = Field(default=8, description="On-policy samples per prompt.")
    prompts_per_step: int = Field(default=1, description="Prompts per micro-batch.")
    grad_accum: int = Field(default=1, description="Micro-batches per optimizer step.")
    temperature: float = Field(default=1.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, description="Nucleus sampling threshold.")
    max_new_tokens: int = Field(default=24, description="Tokens per sample at most.")
    advantage_clip: float | None = Field(default=None, description="Clamp the per-token advantage to [-c, c].")
    short_anchor: float = Field(default=0.0, description="Retention guard: weight of the same loss on the short "
                                                          "prompt against the base/ema teacher (0: off).")
    seed: int = Field(default=0, description="Training seed.")
    save_every: int = Field(default=10, description="Checkpoint every N steps (a retried step resumes there).")
    num_threads: int = Field(default=2, description="torch CPU threads of the training process.")
    rollout_backend: Literal["transformers", "vllm"] = Field(
        default="transformers", description="Sampler: the trainer's own model (transformers) or a vLLM engine "
                                            "synced after every step (settings: overrides 'rollout.vllm.FIELD=...').")
    overrides: list[str] = Field(default=[], description="Any other RunConfig field: 'SECTION.FIELD=VALUE'.")

    def run_config(self, *, model: str, model_cache_dir: str | None, data: dict[str, Any], run_dir: str) -> RunConfig:
        d = {
            "model": {"name": model, "cache_dir": model_cache_dir},
            "data": data,
            "rollout": {"backend": self.rollout_backend, "samples_per_prompt": self.samples_per_prompt,
                        "temperature": self.temperature,
                        "top_p": self.top_p, "max_new_tokens": self.max_new_tokens},
            "loss": {"kind": self.loss, "advantage_clip": self.advantage_clip, "short_anchor": self.short_anchor},
            "lora": {"enabled": self.lora, "r": self.lora_r, "alpha": self.lora_alpha},
            "optim": {"lr": self.lr},
            "train": {"run_dir": run_dir, "steps": self.steps, "prompts_per_step": self.prompts_per_step,
                      "grad_accum": self.grad_accum, "teacher": self.teacher, "seed": self.seed,
                      "save_every": self.save_every, "num_threads": self.num_threads},
            "eval": {"enabled": False},
        }
        return RunConfig.from_dict(d, parse_overrides(self.overrides))


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
    except ValueError as e:
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
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
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
