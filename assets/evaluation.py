"""Long- and short-context evaluation of the base and the trained model, and the report."""


import hashlib
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
import torch
from pydantic import Field

from opsdl_core.config import DataConfig
from opsdl_core.data.curation import FOREIGN_SUITE
from opsdl_core.data.prepare import prepare_examples
from opsdl_core.evaluation.accuracy import EVAL_BACKENDS, EvalJob, evaluate_jobs, resolve_backend
from opsdl_core.evaluation.passes import eval_passes
from opsdl_core.experiment.report import paired_counts, sign_test_p
from opsdl_core.models.load import load_tokenizer

from .curation import md_table, read_examples
from .long_context import long_context_section
from .plots import accuracy_bars_png, png_markdown
from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource

GROUP = "evaluation"
# gained / lost: questions the trained model answers that the base did not, and the reverse (the same
# questions asked of both); sign_p: the exact two-sided sign test on those counts
TABLE_COLUMNS = ["suite", "context", "n", "before", "after", "delta", "gained", "lost", "sign_p"]


class EvaluationConfig(dg.Config):
    max_new_tokens: int = Field(default=32, description="Greedy tokens per answer.")
    batch_size: int = Field(default=8, description="Prompts per generation batch (transformers backend).")
    backend: str = Field(default="auto", description=f"Greedy generation: one of {EVAL_BACKENDS}. auto: vLLM when "
                         "installed (one engine per model, every question submitted at once), else transformers.")
    kv_cache_gib: float = Field(default=2.0, description="vLLM backend: KV cache size (CPU RAM on the CPU build).")
    dtype: str = Field(default="float32", description="Precision of the evaluated weights and activations: "
                       "float32 (the trainer's; the vLLM and transformers backends give the same answers) or "
                       "bfloat16 (about 2x faster on CPUs with AMX/AVX512-BF16; some answers differ from float32's). "
                       "The base and the trained model are always evaluated alike.")
    reuse_base_scores: bool = Field(default=True, description="Reuse the base model's scores on the same suite "
                                                              "and settings from the lineage store.")


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the Markdown table: the sign test's p written so that a small one does not read 0.000."""
    def p(v: Any) -> Any:
        return "" if v is None else "< 0.001" if v < 0.001 else f"{v:.3f}"
    return [{**r, "sign_p": p(r.get("sign_p"))} for r in rows]


def _suite_role(name: str) -> str:
    """The role of an eval_sets suite (``opsdl_core.evaluation.passes``): which contexts it is asked in."""
    if name == FOREIGN_SUITE:  # formats the training never uses: short-context retention only
        return "retention"
    return "in_template" if name.startswith("kv_in_template") else "heldout"


def _eval_model(model: Any, tokenizer: Any, eval_sets: dict[str, Any], config: EvaluationConfig,
                log, model_dir: str | None = None) -> list[dict[str, Any]]:
    """Every suite in each of its contexts (``eval_passes``), all questions generated together (one
    vLLM engine)."""
    suites = eval_sets["suites"]
    passes = eval_passes(list(suites), role=_suite_role, family=lambda name: name.split("@")[0],
                         length=lambda name: suites[name]["context_length"])
    prepared = {}
    for name in dict.fromkeys(name for name, _ in passes):
        prepared[name], bad = prepare_examples(read_examples(suites[name]["path"]), tokenizer,
                                               DataConfig(teacher_context="oracle"))
        if bad:
            raise dg.Failure(f"eval suite {name}: {len(bad)} examples without a usable C_s, e.g. {bad[0].reason}")
    jobs = [EvalJob((name, ctx), prepared[name], ctx) for name, ctx in passes]
    results = evaluate_jobs(model, tokenizer, jobs, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                            backend=config.backend, model_dir=model_dir, kv_cache_gib=config.kv_cache_gib,
                            engine_dtype=config.dtype, log=log)
    out = []
    for job in jobs:
        (name, ctx), r = job.key, results[job.key]
        suite = eval_sets["suites"][name]
        log(f"{name} {ctx}: accuracy {r.accuracy:.3f} (n={r.n}, {r.seconds:.0f}s, {r.backend})")
        out.append({"task": name.split("@")[0], "suite": name, "context": ctx,
                    "context_length": suite["context_length"], "metric": "accuracy", "value": r.accuracy,
                    "n": r.n, "dataset_digest": suite["digest"], "answers": r.answer_rows(job.items)})
    return out


@dg.asset(group_name=GROUP, kinds={"pytorch", "duckdb"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          description="Greedy accuracy of the base model and of the OPSDL model on every evaluation suite, with "
                      "the long context and (held-out templates) with C_s only; scores go to DuckDB by task, "
                      "context and context length, tied to the checkpoint and the suite's digest.")
def evaluation(context: dg.AssetExecutionContext, config: EvaluationConfig, opsdl: OpsdlResource,
               opsdl_model: dict[str, Any], eval_sets: dict[str, Any]) -> dict[str, Any]:
    store = opsdl.store()
    settings = json.dumps({"max_new_tokens": config.max_new_tokens, **({"dtype": config.dtype} if config.dtype !=
                           "float32" else {}), "suites": sorted(
        s["digest"] for s in eval_sets["suites"].values())}, sort_keys=True)
    tag = hashlib.sha256(settings.encode()).hexdigest()[:12]
    base_ckpt = f"base:{opsdl_model['base_model_hash'] or opsdl_model['base_model']}"
    scores: dict[str, list[dict[str, Any]]] = {}
    for which, ckpt, path in (("base", base_ckpt, None), ("opsdl", opsdl_model["checkpoint_id"],
                                                           opsdl_model["model_dir"])):
        run_id = f"eval-{ckpt.replace('base:', 'base-')[:24]}-{tag}"
        if which == "base" and config.reuse_base_scores:
            cols, rows = store.query("SELECT task, context, context_length, metric, value, n, dataset_digest "
                                     "FROM eval_scores WHERE run_id = ? ORDER BY task, context", [run_id])
            if rows:
                names = {s["digest"]: n for n, s in eval_sets["suites"].items()}
                _, got = store.query("SELECT task, context, context_length, example_id, correct FROM eval_answers "
                                     "WHERE run_id = ?", [run_id])
                answers: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
                for task, ctx, length, qid, ok in got:
                    answers.setdefault((task, ctx, length), []).append({"id": qid, "correct": bool(ok)})
                scores[which] = [{**dict(zip(cols, r)), "suite": names.get(r[6], r[0]),
                                  "answers": answers.get((r[0], r[1], r[2]), [])} for r in rows]
                context.log.info(f"base-model scores reused from lineage run {run_id}")
                continue
        started = time.time()
        folder = path or opsdl.model_path()
        try:
            backend = resolve_backend(config.backend, folder)
            if config.dtype not in ("float32", "bfloat16"):
                raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
        except ValueError as e:
            raise dg.Failure(f"evaluation config: {e}") from None
        if backend == "vllm":  # the engine loads the weights itself
            model, tokenizer = None, load_tokenizer(folder)
        else:
            model, tokenizer = opsdl.load_model(path)
            model = model.to(getattr(torch, config.dtype))
        scores[which] = _eval_model(model, tokenizer, eval_sets, config.model_copy(update={"backend": backend}),
                                    context.log.info, model_dir=folder)
        del model
        store.log_run(run_id, kind="eval", params={"eval": config.model_dump(), "checkpoint": ckpt},
                      dagster_run_id=context.run.run_id, asset_key="evaluation", base_model=opsdl_model["base_model"],
                      started_at=started, ended_at=time.time())
        store.log_eval_scores(run_id, ckpt, scores[which])
        for s in eval_sets["suites"].values():
            store.log_edge(("dataset", s["digest"]), ("run", run_id), "input", run_id=run_id)
    rows = []
    for b in scores["base"]:
        a = next(x for x in scores["opsdl"] if x["suite"] == b["suite"] and x["context"] == b["context"])
        gained, lost, pairs = paired_counts({q["id"]: q["correct"] for q in a["answers"]},
                                            {q["id"]: q["correct"] for q in b.get("answers") or []})
        rows.append({"suite": b["suite"], "context": b["context"], "n": b["n"], "before": b["value"],
                     "after": a["value"], "delta": a["value"] - b["value"],
                     **({"gained": gained, "lost": lost, "sign_p": round(sign_test_p(gained, lost), 4)} if pairs
                        else {"gained": None, "lost": None, "sign_p": None})})
    png = accuracy_bars_png(rows, opsdl.artifacts("evaluation") / f"accuracy-{tag}-{opsdl_model['config_hash']}.png")
    context.add_output_metadata({
        "scores": dg.MetadataValue.md(md_table(table_rows(rows), TABLE_COLUMNS)),
        "plot": dg.MetadataValue.md(png_markdown(png, "accuracy before/after")),
        **{f"{r['suite']}/{r['context']}/after": r["after"] for r in rows},
        **{f"{r['suite']}/{r['context']}/sign_p": r["sign_p"] for r in rows if r["sign_p"] is not None},
    })
    return {"rows": rows, "plot": str(png), "checkpoint_id": opsdl_model["checkpoint_id"], "base_checkpoint": base_ckpt}


@dg.asset(group_name=GROUP, kinds={"python"}, code_version=CODE_VERSION, owners=OWNERS,
          description="A Markdown report of the run: inputs by digest, training config and curves, the "
                      "before/after score table, the lm-eval scores per context length, and SQL to trace it all in the lineage store.")
def report(context: dg.AssetExecutionContext, opsdl: OpsdlResource, evaluation: dict[str, Any],
           long_context_eval: dict[str, Any], opsdl_model: dict[str, Any], base_rollouts: dict[str, Any],
           curated_prompts: dict[str, Any], teacher_contexts: dict[str, Any]) -> dict[str, Any]:
    table = md_table(table_rows(evaluation["rows"]), TABLE_COLUMNS)
    curves = Path(opsdl_model.get("curves") or  # outputs stored before "curves" was passed along
                  opsdl.artifacts("opsdl_model") / f"curves-{opsdl_model['config_hash']}.png")
    lines = [
        "# OPSDL report", "",
        f"- base model: `{opsdl_model['base_model']}` (hash `{(opsdl_model['base_model_hash'] or '')[:16]}`)",
        f"- training prompts: `{curated_prompts['digest']}` ({curated_prompts['n']} rows, source "
        f"`{curated_prompts['source']}`)",
        f"- teacher contexts: `{teacher_contexts['digest']}` ({teacher_contexts['config']['kind']}, "
        f"{teacher_contexts['config']['short_budget_tokens']} tokens)",
        f"- base-model rollouts: mean per-token KL {base_rollouts['kl_estimate_mean']:.3f}, accuracy "
        f"{base_rollouts['rollout_accuracy']}",
        f"- training run: `{opsdl_model['run_id']}`, {opsdl_model['steps']} steps, checkpoint "
        f"`{(opsdl_model['checkpoint_id'] or '')[:16]}`",
        f"- model folder: `{opsdl_model['model_dir']}`", "",
        "## Greedy accuracy, base → OPSDL", "",
        "gained / lost: questions the OPSDL model answers right that the base model got wrong, and the reverse "
        "(the same questions); sign_p: the exact two-sided sign test on them.", "", table, "",
        f"![accuracy]({Path(evaluation['plot']).name})", "",
        *long_context_section(long_context_eval),
        "## Training curves", "", f"![curves]({curves.name})", "",
        "## Lineage", "", "```sh",
        f"opsdl lineage --db {opsdl.db_path} sql \"SELECT * FROM v_checkpoint_provenance "
        f"WHERE run_id = '{opsdl_model['run_id']}'\"",
        f"opsdl lineage --db {opsdl.db_path} sql \"SELECT task, context, context_length, value FROM v_scores "
        f"WHERE train_run_id = '{opsdl_model['run_id']}'\"", "```", "",
    ]
    out_dir = opsdl.artifacts("report")
    path = out_dir / "report.md"
    for png in (Path(evaluation["plot"]), Path(long_context_eval["plot"]), curves):
        if png.exists():
            (out_dir / png.name).write_bytes(png.read_bytes())
    path.write_text("\n".join(lines))
    context.add_output_metadata({"path": dg.MetadataValue.path(str(path)),
                                 "report": dg.MetadataValue.md("\n".join(lines[:12]) + "\n\n" + table),
                                 "lineage_db": dg.MetadataValue.path(str(opsdl.db_path))})
    return {"path": str(path), "table": evaluation["rows"]}
