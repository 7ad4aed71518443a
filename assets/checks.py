"""Asset checks that gate the pipeline (blocking: a failure stops what depends on the asset)."""


import math
from typing import Any

import dagster as dg
from pydantic import Field

from opsdl_core.data.curation import FOREIGN_SUITE, ngrams
from opsdl_core.data.short_context import TeacherContextError, check_teacher_context, stored_teacher_context
from opsdl_core.run_dir import RunDir

from .curation import read_examples
from .evaluation import evaluation
from .resources import OpsdlResource
from .teacher import teacher_contexts
from .training import opsdl_model


@dg.asset_check(asset=teacher_contexts, blocking=True,
                description="Every C_s is made of spans of its C_L (text equal to the joined spans) and fits "
                            "the token budget.")
def c_s_in_c_l_within_budget(opsdl: OpsdlResource, teacher_contexts: dict[str, Any]) -> dg.AssetCheckResult:
    count = opsdl.count_tokens()
    bad: list[str] = []
    examples = read_examples(teacher_contexts["path"])
    for ex in examples:
        try:
            stored = stored_teacher_context(ex)
            if stored is None:
                bad.append(f"{ex.id}: no teacher_context")
                continue
            check_teacher_context(stored[0], ex.long_context, max_tokens=stored[1]["budget"], count_tokens=count)
        except TeacherContextError as e:
            bad.append(f"{ex.id}: {e}")
    return dg.AssetCheckResult(passed=not bad, metadata={"n_checked": len(examples), "n_failed": len(bad),
                                                         "failures": "\n".join(bad[:10]) or "none"})


@dg.asset_check(asset="curated_prompts", blocking=True, description="No two training prompts share a content hash.")
def no_duplicate_prompts(curated_prompts: dict[str, Any]) -> dg.AssetCheckResult:
    examples = read_examples(curated_prompts["path"])
    hashes = [e.content_hash() for e in examples]
    dups = len(hashes) - len(set(hashes))
    return dg.AssetCheckResult(passed=dups == 0, metadata={"n_checked": len(hashes), "n_duplicates": dups})


@dg.asset_check(asset="curated_prompts", blocking=True, additional_ins={"eval_sets": dg.AssetIn("eval_sets")},
                description="No training prompt overlaps the evaluation suites (identical content, or a shared "
                            "8-word n-gram of C_s + Q).")
def no_eval_overlap(curated_prompts: dict[str, Any], eval_sets: dict[str, Any]) -> dg.AssetCheckResult:
    grams: set = set()
    hashes: set[str] = set()
    for s in eval_sets["suites"].values():
        for ex in read_examples(s["path"]):
            grams |= ngrams(f"{ex.short_context} {ex.question}", 8)
            hashes.add(ex.content_hash())
    overlapping = [ex.id for ex in read_examples(curated_prompts["path"])
                   if ex.content_hash() in hashes or ngrams(f"{ex.short_context} {ex.question}", 8) & grams]
    return dg.AssetCheckResult(passed=not overlapping, metadata={"n_overlapping": len(overlapping),
                                                                 "examples": ", ".join(overlapping[:10]) or "none"})


@dg.asset_check(asset=opsdl_model, blocking=True, description="Every logged training loss and KL is finite.")
def training_loss_finite(opsdl_model: dict[str, Any]) -> dg.AssetCheckResult:
    rows = RunDir(opsdl_model["run_dir"]).metric_records()
    bad = [r["step"] for r in rows if not all(math.isfinite(r.get(k, 0.0)) for k in ("loss", "kl_estimate"))]
    return dg.AssetCheckResult(passed=bool(rows) and not bad,
                               metadata={"steps": len(rows), "non_finite_steps": str(bad[:20]) or "none"})


class RetentionConfig(dg.Config):
    margin: float = Field(default=0.10, description="Largest allowed drop of short-context accuracy "
                                                    "(OPSDL vs base, absolute).")
    per_suite: bool = Field(default=False, description="Hold every short-context suite to the margin (true) or "
                                                       "their question-weighted mean (false: several small "
                                                       "suites, one per curriculum family, are each too noisy).")


def within_margin(delta: float, margin: float) -> bool:
    """``delta >= -margin`` for accuracy differences, exact at the margin: 0.70 - 0.80 is
    -0.10000000000000009 in floating point, which must not fail a 0.10 margin."""
    return round(delta, 9) >= -margin


def retention_verdict(rows: list[dict[str, Any]], margin: float, per_suite: bool = False) -> dict[str, Any]:
    """Short-context rows (``suite``, ``n``, ``delta``) -> passed, the pooled (question-weighted) delta
    and the worst suite. ``per_suite`` judges the worst suite, otherwise the pooled delta of the
    template suites; the foreign-format suite (formats the training never uses, where damage shows)
    is always judged on its own as well."""
    short = [r for r in rows if r["context"] == "short"]
    if not short:
        return {"passed": False, "n_suites": 0, "pooled_delta": float("nan"),
                "worst_suite": "none (no short-context suite)", "worst_delta": float("nan")}
    worst = min(short, key=lambda r: r["delta"])
    templated = [r for r in short if r["suite"] != FOREIGN_SUITE] or short
    pooled = sum(r["n"] * r["delta"] for r in templated) / sum(r["n"] for r in templated)
    judged = [worst["delta"] if per_suite else pooled]
    foreign = next((r for r in short if r["suite"] == FOREIGN_SUITE), None)
    out = {"n_suites": len(short), "pooled_delta": pooled, "worst_suite": worst["suite"], "worst_delta": worst["delta"]}
    if foreign is not None:
        judged.append(foreign["delta"])
        out["foreign_delta"] = foreign["delta"]
    return {"passed": all(within_margin(d, margin) for d in judged), **out}


@dg.asset_check(asset=evaluation, blocking=True,
                description="Short-context (C_s only) accuracy of the OPSDL model is not below the base model's "
                            "by more than the margin: the template suites pooled (or each suite), and the "
                            "foreign-format suite on its own.")
def short_context_retention(config: RetentionConfig, evaluation: dict[str, Any]) -> dg.AssetCheckResult:
    v = retention_verdict(evaluation["rows"], config.margin, config.per_suite)
    passed = v.pop("passed")
    return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"margin": config.margin, "per_suite": config.per_suite, **v})


ALL_CHECKS = [c_s_in_c_l_within_budget, no_duplicate_prompts, no_eval_overlap, training_loss_finite,
              short_context_retention]
