"""Prompt curation: the evaluation suites, the training prompts, and the rows set aside."""


import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from opsdl_core.data.curation import curate, dataset_digest, eval_suites
from opsdl_core.data.examples import Example
from opsdl_core.data.prepare import model_window, token_counter
from opsdl_core.data.sources import is_generated
from opsdl_core.data.writers import write_jsonl, write_rejected_jsonl
from opsdl_core.lineage.store import content_hash

from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource, run_config_field

GROUP = "curation"
QUARANTINE_COLUMNS = ["source", "row", "line", "field", "reason"]


class EvalSetsConfig(dg.Config):
    lengths: list[int] = Field(default=[1024], description="Context lengths (model tokens) of the suites.")
    n: int = Field(default=30, description="Questions per held-out-template suite and length.")
    in_template_n: int = Field(default=20, description="Questions with fresh keys of the training templates "
                                                       "(0: no in-template suite).")
    seed: int = Field(default=0, description="Seed of the evaluation streams (disjoint from training's).")
    n_distractors: list[int] = run_config_field("data.n_distractors")
    templates: list[str] = Field(default=[], description="Training templates asked in the in-template suite "
                                                         "(empty: all); match the curation's templates.")
    families: list[str] = Field(default=[], description="Curriculum families trained on: one in-family suite each "
                                                        "(replaces the needle-template suites).")
    heldout_families: list[str] = Field(default=[], description="Curriculum families never trained on: one "
                                                                "out-of-family suite each (transfer).")
    foreign_n: int = Field(default=140, description="Short-context questions in formats the training never uses "
                                                    "(suite foreign@0, asked with C_s only: retention that can see "
                                                    "damage); 0: none.")


class CurationConfig(dg.Config):
    source: str = Field(default="synthetic", description="'synthetic' (built-in needle generator), 'curriculum' "
                                                         "(the built-in task families), 'inbox' (the data inbox "
                                                         "folder), or a JSONL/Parquet file or folder.")
    size: int = run_config_field("data.train_size")
    context_tokens: int = run_config_field("data.context_tokens")
    seed: int = run_config_field("data.seed")
    templates: list[str] = Field(default=[], description="Synthetic only: training templates (empty: all).")
    n_distractors: list[int] = run_config_field("data.n_distractors")
    ngram: int = Field(default=8, description="Decontamination: shared word n-gram length with eval data.")
    max_tokens: int | None = Field(default=None, description="Set aside examples whose C_L is longer (in any case "
                                                             "those longer than the model's window).")
    families: dict[str, float] = Field(default={}, description="Curriculum only: the mixture, family -> weight "
                                                               "(empty: every family, equal weights).")
    haystacks: dict[str, float] = Field(default={}, description="Curriculum only: haystack kind -> weight "
                                                                "(noise, prose, records; empty: equal).")
    lengths: list[int] = Field(default=[], description="Curriculum only: context lengths, equal shares "
                                                       "(empty: [context_tokens]).")
    length_order: str = Field(default="mixed", description="Curriculum only: 'mixed' or 'ascending' (short first).")


def _curriculum_args(config: CurationConfig) -> dict[str, Any]:
    from opsdl_core.config import ConfigError, CurriculumConfig

    try:  # the same validation as a run config's data.curriculum
        c = CurriculumConfig(**{k: v for k, v in (("families", config.families), ("haystacks", config.haystacks),
                                                 ("lengths", config.lengths or None)) if v},
                             length_order=config.length_order)
    except (ConfigError, TypeError) as err:
        raise dg.Failure(f"curated_prompts config: {err}") from None
    return {"families": c.families, "haystacks": c.haystacks, "lengths": c.lengths, "length_order": c.length_order,
            "prose": c.prose}


def md_table(rows: list[dict[str, Any]], cols: list[str], width: int = 80) -> str:
    def cell(v: Any) -> str:
        s = f"{v:.3f}" if isinstance(v, float) else str(v)
        s = s.replace("|", "\\|").replace("\n", " ")
        return s if len(s) <= width else s[: width - 1] + "…"

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def example_rows(examples: list[Example], k: int = 3) -> list[dict[str, Any]]:
    return [{"id": e.id, "question": e.question, "answer": e.answer, "C_s": e.short_context,
             "C_L": e.long_context[:120]} for e in examples[:k]]


def read_examples(path: str | Path) -> list[Example]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(**r) for r in rows]


@dg.asset(group_name=GROUP, kinds={"python", "duckdb"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          description="Held-out synthetic evaluation suites: unseen templates (transfer) and fresh keys of the "
                      "training templates (in-family), at each context length.")
def eval_sets(context: dg.AssetExecutionContext, config: EvalSetsConfig, opsdl: OpsdlResource) -> dict[str, Any]:
    count = opsdl.count_tokens()
    suites = eval_suites(count_tokens=count, lengths=config.lengths, n=config.n, seed=config.seed,
                         in_template_n=config.in_template_n, n_distractors=tuple(config.n_distractors),
                         train_templates=config.templates or None, families=config.families,
                         heldout_families=config.heldout_families, foreign_n=config.foreign_n)
    out_dir = opsdl.artifacts("eval_sets")
    store = opsdl.store()
    result: dict[str, Any] = {"suites": {}}
    for name, examples in suites.items():
        digest = dataset_digest(examples)
        path = write_jsonl(examples, out_dir / f"{name}-{digest}.jsonl")
        length = int(name.rsplit("@", 1)[1])
        store.log_dataset(digest, name=name, kind="eval", path=str(path), n_rows=len(examples),
                          metadata={"context_length": length, "seed": config.seed})
        result["suites"][name] = {"path": str(path), "digest": digest, "n": len(examples), "context_length": length}
    context.add_output_metadata({
        "suites": dg.MetadataValue.md(md_table([{"suite": k, **v} for k, v in result["suites"].items()],
                                               ["suite", "n", "context_length", "digest", "path"])),
        "n_questions": sum(v["n"] for v in result["suites"].values()),
        "sample_rows": dg.MetadataValue.md(md_table(example_rows(next(iter(suites.values()))),
                                                    ["id", "question", "answer", "C_s"])),
    })
    return result


@dg.multi_asset(
    group_name=GROUP, can_subset=False, op_tags=HEAVY, pool=CPU_POOL,
    outs={
        "curated_prompts": dg.AssetOut(kinds={"python"}, code_version=CODE_VERSION, owners=OWNERS,
                                       description="Training prompts: loaded or generated, deduplicated by content "
                                                   "hash, decontaminated against the evaluation suites, bucketed "
                                                   "by token length."),
        "quarantined_rows": dg.AssetOut(kinds={"python"}, code_version=CODE_VERSION, owners=OWNERS,
                                        description="Rows set aside during curation, each with its source, row, "
                                                    "field and reason."),
    },
    ins={"eval_sets": dg.AssetIn("eval_sets")},
)
def curated_prompts(context: dg.AssetExecutionContext, config: CurationConfig, opsdl: OpsdlResource,
                    eval_sets: dict[str, Any]):
    eval_examples = [ex for s in eval_sets["suites"].values() for ex in read_examples(s["path"])]
    source = str(opsdl.inbox) if config.source == "inbox" else config.source
    if not is_generated(source) and not Path(source).exists():
        raise dg.Failure(f"curation source {source!r} does not exist; expected 'synthetic', 'curriculum', 'inbox', "
                         "or a JSONL/Parquet file or folder")
    tokenizer = opsdl.tokenizer()
    limits = [v for v in (config.max_tokens, model_window(tokenizer)) if v]
    res = curate(source, count_tokens=token_counter(tokenizer), size=config.size, context_tokens=config.context_tokens,
                 seed=config.seed, templates=config.templates or None, n_distractors=tuple(config.n_distractors),
                 eval_examples=eval_examples, ngram=config.ngram, max_tokens=min(limits) if limits else None,
                 curriculum=_curriculum_args(config) if config.source == "curriculum" else None)
    if not res.examples:
        reasons = "; ".join(f"{r.location}: {r.reason}" for r in res.quarantined[:3])
        raise dg.Failure(f"no usable training prompts from {source!r}" + (f" (e.g. {reasons})" if reasons else ""))
    out_dir = opsdl.artifacts("curated_prompts")
    path = write_jsonl(res.examples, out_dir / f"prompts-{res.digest}.jsonl")
    q_path = write_rejected_jsonl(res.quarantined, opsdl.artifacts("quarantined_rows") / f"quarantine-{res.digest}.jsonl")
    q_digest = content_hash(q_path)[:16]
    store = opsdl.store()
    store.log_dataset(res.digest, name="curated_prompts", kind="prompts", path=str(path), n_rows=len(res.examples),
                      metadata={**res.summary(), "source": source, "eval_digests": sorted(
                          s["digest"] for s in eval_sets["suites"].values())})
    store.log_dataset(q_digest, name="quarantined_rows", kind="quarantine", path=str(q_path),
                      n_rows=len(res.quarantined), metadata={"source": source})
    store.log_edges([(("dataset", s["digest"]), ("dataset", res.digest), "decontaminated_against")
                     for s in eval_sets["suites"].values()])
    hist = res.histogram
    prompts = {"path": str(path), "digest": res.digest, "n": len(res.examples), "source": source,
               "summary": res.summary(), "eval_digests": [s["digest"] for s in eval_sets["suites"].values()]}
    yield dg.Output(prompts, output_name="curated_prompts", metadata={
        "n_examples": len(res.examples), "n_loaded": res.n_loaded, "n_duplicates": res.n_duplicates,
        "n_contaminated": res.n_contaminated, "n_quarantined": len(res.quarantined),
        "digest": res.digest, "path": dg.MetadataValue.path(str(path)),
        "token_length_histogram": dg.MetadataValue.md(md_table([{"bucket": k, "count": v} for k, v in hist.items()],
                                                               ["bucket", "count"])),
        "sample_rows": dg.MetadataValue.md(md_table(example_rows(res.examples), ["id", "question", "answer", "C_s"])),
    })
    reasons = [{"source": Path(r.source).name, "row": r.row, "line": "" if r.line is None else r.line,
                "field": r.field, "reason": r.reason} for r in res.quarantined[:20]]
    yield dg.Output({"path": str(q_path), "n": len(res.quarantined), "digest": q_digest},
                    output_name="quarantined_rows", metadata={
                        "n_quarantined": len(res.quarantined), "path": dg.MetadataValue.path(str(q_path)),
                        "reasons": dg.MetadataValue.md(md_table(reasons, QUARANTINE_COLUMNS, 120)
                                                       if reasons else "nothing set aside")})
