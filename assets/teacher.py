"""Teacher-context construction and the base model's rollout snapshot."""


import hashlib
import json
from dataclasses import asdict
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from opsdl_core.config import TEACHER_CONTEXT_STRATEGIES, DataConfig
from opsdl_core.data.curation import dataset_digest
from opsdl_core.data.examples import Example
from opsdl_core.data.prepare import prepare_examples, teacher_context_params
from opsdl_core.data.short_context import teacher_context_record
from opsdl_core.data.writers import write_json_lines, write_jsonl, write_rejected_jsonl

from .curation import example_rows, md_table, read_examples
from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource, run_config_field

GROUP = "teacher"


class TeacherContextConfig(dg.Config):
    kind: Literal[TEACHER_CONTEXT_STRATEGIES] = run_config_field("data.teacher_context")
    short_budget_tokens: int = run_config_field("data.short_budget_tokens")
    window_tokens: int = run_config_field("data.window_tokens")
    bm25_chunk_tokens: int = run_config_field("data.bm25_chunk_tokens")
    bm25_top_k: int = run_config_field("data.bm25_top_k")

    def data_config(self, **kw: Any) -> DataConfig:
        return DataConfig(teacher_context=self.kind, short_budget_tokens=self.short_budget_tokens,
                          window_tokens=self.window_tokens, bm25_chunk_tokens=self.bm25_chunk_tokens,
                          bm25_top_k=self.bm25_top_k, **kw)


@dg.asset(group_name=GROUP, kinds={"python"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          description="C_s for every curated prompt (oracle / window / BM25), with its spans in C_L and its "
                      "token count; prompts whose C_s cannot be built within the budget are set aside.")
def teacher_contexts(context: dg.AssetExecutionContext, config: TeacherContextConfig, opsdl: OpsdlResource,
                     curated_prompts: dict[str, Any]) -> dict[str, Any]:
    examples = read_examples(curated_prompts["path"])
    data_cfg = config.data_config()
    prepared, bad = prepare_examples(examples, opsdl.tokenizer(), data_cfg)
    out: list[Example] = []
    for p in prepared:  # the C_s the training process reads (data.prepare uses a stored C_s as is)
        rec = teacher_context_record(p.teacher_context, config.short_budget_tokens, teacher_context_params(data_cfg))
        out.append(Example(**{**asdict(p.example), "metadata": {**p.example.metadata, "teacher_context": rec}}))
    if not out:
        raise dg.Failure(f"no teacher context could be built ({len(bad)} prompts set aside; e.g. "
                         f"{bad[0].reason if bad else 'none'})")
    digest = dataset_digest(out) + f"-{config.kind}"
    path = write_jsonl(out, opsdl.artifacts("teacher_contexts") / f"teacher-{digest}.jsonl")
    if bad:
        write_rejected_jsonl(bad, opsdl.artifacts("teacher_contexts") / f"set-aside-{digest}.jsonl")
    store = opsdl.store()
    store.log_dataset(digest, name="teacher_contexts", kind="teacher_contexts", path=str(path), n_rows=len(out),
                      metadata={"config": config.model_dump(), "n_set_aside": len(bad)})
    store.log_edge(("dataset", curated_prompts["digest"]), ("dataset", digest), "derived")
    lengths = [e.metadata["teacher_context"]["n_tokens"] for e in out]
    context.add_output_metadata({
        "n_examples": len(out), "n_set_aside": len(bad), "digest": digest, "path": dg.MetadataValue.path(str(path)),
        "strategy": config.kind, "budget_tokens": config.short_budget_tokens,
        "c_s_tokens_mean": sum(lengths) / len(lengths), "c_s_tokens_max": max(lengths),
        "sample_rows": dg.MetadataValue.md(md_table(example_rows(out), ["id", "question", "C_s"])),
    })
    return {"path": str(path), "digest": digest, "n": len(out), "config": config.model_dump(),
            "prompts_digest": curated_prompts["digest"]}


class RolloutSnapshotConfig(dg.Config):
    n_prompts: int = Field(default=4, description="Prompts to sample (the first of the teacher-context set).")
    samples_per_prompt: int = Field(default=2, description="Samples per prompt (a snapshot; training's own is "
                                                           "rollout.samples_per_prompt).")
    temperature: float = run_config_field("rollout.temperature")
    top_p: float = run_config_field("rollout.top_p")
    max_new_tokens: int = run_config_field("rollout.max_new_tokens")
    seed: int = Field(default=0, description="Sampling seed.")


@dg.asset(group_name="rollout", kinds={"pytorch", "duckdb"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          description="On-policy samples of the base model on long-context prompts, every token scored by the "
                      "teacher prompt (C_s only): the student-teacher gap before training, and the raw "
                      "material of the baselines.")
def base_rollouts(context: dg.AssetExecutionContext, config: RolloutSnapshotConfig, opsdl: OpsdlResource,
                  teacher_contexts: dict[str, Any]) -> dict[str, Any]:
    from opsdl_core.evaluation.snapshot import rollout_snapshot

    examples = read_examples(teacher_contexts["path"])[: config.n_prompts]
    model, tokenizer = opsdl.load_model()
    tc = TeacherContextConfig(**teacher_contexts["config"])
    prepared, _ = prepare_examples(examples, tokenizer, tc.data_config())
    rows = rollout_snapshot(model, tokenizer, prepared, n=config.samples_per_prompt, temperature=config.temperature,
                            top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed)
    if not rows:
        raise dg.Failure("the rollout snapshot is empty; expected n_prompts >= 1 with usable teacher contexts")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    path = write_json_lines(rows, opsdl.artifacts("base_rollouts") / f"rollouts-{digest}.jsonl")
    run_id = f"rollout-{digest}"
    store = opsdl.store()
    store.log_run(run_id, kind="rollout", params=config.model_dump(), dagster_run_id=context.run.run_id,
                  asset_key="base_rollouts", base_model=opsdl.model)
    store.log_dataset(digest, name="base_rollouts", kind="rollouts", path=str(path), n_rows=len(rows))
    store.log_edges([(("dataset", teacher_contexts["digest"]), ("run", run_id), "input"),
                     (("run", run_id), ("dataset", digest), "output")], run_id=run_id)
    store.log_rollout_samples(run_id, [{**r, "step": 0, "dataset_digest": teacher_contexts["digest"]} for r in rows])
    kl = sum(r["kl_estimate"] for r in rows) / len(rows)
    scored = [r["correct"] for r in rows if r["correct"] is not None]
    acc = sum(scored) / len(scored) if scored else None
    context.add_output_metadata({
        "n_samples": len(rows), "kl_estimate_mean": kl, "rollout_accuracy": acc,
        "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows), "path": dg.MetadataValue.path(str(path)),
        "samples": dg.MetadataValue.md(md_table(rows[:6], ["example_id", "sample_index", "response", "kl_estimate",
                                                            "correct"])),
    })
    return {"path": str(path), "digest": digest, "n": len(rows), "kl_estimate_mean": kl, "rollout_accuracy": acc}
