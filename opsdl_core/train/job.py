"""Train a model with OPSDL, as its own process: load, evaluate, train, evaluate, record.

    python -m opsdl_core.train --config configs/demo.yaml            # the trainer alone (no Dagster)
    python -m opsdl_core.train --config my.yaml --set train.steps=10 --set loss.kind=jsd
    opsdl-train --config my.yaml --no-eval                            # console script

``run`` loads the model (the embedded default SmolLM2-135M-Instruct unless the config names another),
builds the data, evaluates the held-out split with the long context and with C_s only, trains with
:class:`opsdl_core.train.recipe.OPSDLTrainer` (resuming from the last checkpoint in ``train.run_dir`` if
there is one), evaluates again, saves ``run_dir/final`` and writes ``run_dir/results.json``; ``main`` then
records the run and its scores in the lineage store. It prints one line per step with the loss, the
student–teacher KL and the time of each phase.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads busy-wait by default; on a small shared CPU that stalls steps badly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from ..config import RunConfig  # noqa: E402
from ..config_schema import parse_overrides  # noqa: E402
from ..run_dir import RunDir  # noqa: E402


def run(cfg: RunConfig, *, evaluate: bool = True, resume: bool = True, log: Callable[[str], None] = print,
        model_and_tokenizer: tuple[Any, Any] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole job; returns (and writes to ``run_dir/results.json``) the figures it measured.
    ``on_step(metrics)`` is called after every training step."""
    import torch
    from accelerate import PartialState

    from ..data.prepare import prepare_data
    from ..evaluation.accuracy import EvalJob, evaluate_jobs
    from ..evaluation.passes import eval_passes
    from ..models.load import load_model_and_tokenizer, load_tokenizer, resolve_model
    from .checkpoint import atomic_write_text
    from .recipe import OPSDLTrainer

    t0 = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    lineage: dict[str, Any] = {}
    # every prompt leaves room in the model's window for the longest answer it is sampled or asked for
    answer_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    if model_and_tokenizer is None:
        resolved = resolve_model(cfg.model.name, cache_dir=cfg.model.cache_dir)
        log(f"[opsdl] model {cfg.model.name} -> {resolved.kind} {resolved.path}")
        # the data first, with the tokenizer alone: a row too long for the model is set aside before
        # the weights take any memory
        data = prepare_data(cfg.data, load_tokenizer(resolved, trust_remote_code=cfg.model.trust_remote_code),
                            answer_tokens=answer_tokens)
        model, tokenizer = load_model_and_tokenizer(resolved, dtype=getattr(torch, cfg.model.dtype),
                                                    trust_remote_code=cfg.model.trust_remote_code,
                                                    cache_dir=cfg.model.cache_dir,
                                                    attn_implementation=cfg.model.attn_implementation)
        lineage.update(model=cfg.model.name, model_path=str(resolved.path), model_hash=resolved.content_hash)
    else:
        model, tokenizer = model_and_tokenizer
        data = prepare_data(cfg.data, tokenizer, answer_tokens=answer_tokens)
    lineage["data_digest"] = data.digest
    lens = [len(p.student_ids) for p in data.train]
    log(f"[opsdl] data: {len(data.train)} train / {len(data.heldout)} held-out examples, "
        f"{len(data.rejected)} set aside; student prompts {min(lens)}-{max(lens)} tokens; digest {data.digest}")
    for r in data.rejected[:5]:
        log(f"[opsdl]   set aside: {r.location} field {r.field!r}: {r.reason}")

    results: dict[str, Any] = {"config_hash": cfg.hash(), **lineage}
    # under accelerate launch: the process that evaluates and writes (the state the trainer joins: CPU
    # processes when there is no GPU)
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    do_eval = evaluate and cfg.eval.enabled and data.heldout and main

    suites = [("", data.heldout, "heldout")] + ([("in_template_", data.in_template, "in_template")]
                                                if data.in_template else [])
    passes = eval_passes(suites, role=lambda suite: suite[2])

    def _eval(tag: str, m: Any) -> None:  # every pass in one go (one batch order, one engine)
        jobs = [EvalJob(i, items, context) for i, ((_, items, _), context) in enumerate(passes)]
        scored = evaluate_jobs(m, tokenizer, jobs, max_new_tokens=cfg.eval.max_new_tokens,
                               batch_size=cfg.eval.batch_size,
                               progress=lambda done, n: log(f"[opsdl]   eval {tag}: {done}/{n}"))
        for i, ((prefix, items, _), context) in enumerate(passes):
            name, r = f"{prefix}{context}", scored[i]
            results[f"{tag}_{name}_accuracy"] = r.accuracy
            results[f"{tag}_{name}_eval"] = r.summary()
            results.setdefault("scores", {}).setdefault(tag, []).append({  # rows for the lineage store
                "task": "in_template" if prefix else "heldout", "context": context,
                "context_length": round(r.mean_prompt_tokens) if context == "long" else 0, "metric": "accuracy",
                "value": r.accuracy, "n": r.n, "dataset_digest": suite_digest(items), "harness": "opsdl",
                "answers": r.answer_rows(items)})
            log(f"[opsdl] eval {tag:6s} {name:>16s}-context accuracy {r.accuracy:.3f} "
                f"(n={r.n}, ~{r.mean_prompt_tokens:.0f} prompt tokens, {r.seconds:.0f}s)")

    if do_eval and cfg.eval.before:
        _eval("before", model)
    trainer = OPSDLTrainer(cfg, model, tokenizer, data, log=log, lineage=lineage,
                           model_dir=lineage.get("model_path")).setup(resume=resume)
    try:
        result = trainer.train(on_step=on_step)
    finally:
        trainer.rollout.release()  # a vLLM engine's process and memory; the trainer's own model stays
    results.update(steps=result.steps_done, resumed_from=result.resumed_from, train_seconds=round(result.seconds, 1),
                   nonfinite_steps=trainer.nonfinite.total)
    if result.metrics:
        keys = ("generate_s", "teacher_s", "student_s", "optim_s", "sync_s", "step_s")
        results["mean_phase_seconds"] = {k: round(sum(m[k] for m in result.metrics) / len(result.metrics), 3)
                                         for k in keys}
    final = trainer.save_final()  # merges a LoRA adapter into the weights: faster to evaluate
    if do_eval:
        _eval("after", trainer.unwrapped)
    results.update(final_dir=str(final), total_seconds=round(time.perf_counter() - t0, 1))
    if main:
        atomic_write_text(RunDir(cfg.train.run_dir).results, json.dumps(results, indent=1, sort_keys=True))
    if do_eval:
        log("[opsdl] held-out accuracy                       before   after")
        held = "held-out templates, " if cfg.data.source == "synthetic" else "held-out examples, "
        names = [(f"{p}{c}", f"{'training templates, ' if p else held}{c} context") for (p, _, _), c in passes]
        for key, label in names:
            before = results.get(f"before_{key}_accuracy", float("nan"))
            log(f"[opsdl]   {label:40s} {before:.3f}    {results[f'after_{key}_accuracy']:.3f}")
    log(f"[opsdl] done in {results['total_seconds']:.0f}s; model in {final}")
    return results


def suite_digest(items: list[Any]) -> str:
    """The identity of an evaluation suite: a digest of its examples' content, in order."""
    import hashlib

    return hashlib.sha256("".join(p.example.content_hash() for p in items).encode()).hexdigest()[:16]


def record_lineage(results: dict[str, Any], run_dir: str | Path, *, db: str | Path | None = None,
                   experiment: str = "default") -> dict[str, Any]:
    """The finished run in the lineage store: the run, its config, metrics and checkpoints
    (``ingest_training_run``), and its held-out scores (before: the base model's checkpoint id, after:
    the final model's) with every answer, so ``opsdl train`` ends with its scores queryable in SQL."""
    from ..lineage.store import LineageStore, ingest_training_run

    store = LineageStore(db)
    ids = ingest_training_run(store, run_dir, experiment=experiment)
    final = ids["final"].get("merged") or ids["final"].get("adapter")
    checkpoints = {"before": f"base:{results['model_hash']}" if results.get("model_hash") else None, "after": final}
    n = 0
    for tag, rows in (results.get("scores") or {}).items():
        if not checkpoints.get(tag):
            continue
        for r in rows:
            store.log_dataset(r["dataset_digest"], name=r["task"], kind="eval", n_rows=r["n"])
        n += store.log_eval_scores(ids["run_id"], checkpoints[tag], rows)
    return {**ids, "scores": n, "db": str(store.path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opsdl-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="YAML file with the run's sections (model, data, train, ...)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one field (repeatable)")
    ap.add_argument("--no-eval", action="store_true", help="skip the before/after held-out evaluation")
    ap.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in run_dir")
    ap.add_argument("--db", default=None, help="lineage DuckDB file the run and its scores go to (default: "
                                               "$OPSDL_LINEAGE_DB or $OPSDL_HOME/lineage.duckdb)")
    ap.add_argument("--experiment", default="default", help="the run's experiment name in the lineage store")
    ap.add_argument("--no-lineage", action="store_true", help="do not record the run in the lineage store")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    cfg = RunConfig.from_yaml(args.config, overrides) if args.config else RunConfig.from_dict({}, overrides)
    results = run(cfg, evaluate=not args.no_eval, resume=not args.no_resume, log=lambda s: print(s, flush=True))
    from accelerate import PartialState

    if not args.no_lineage and PartialState().is_main_process:
        rec = record_lineage(results, cfg.train.run_dir, db=args.db, experiment=args.experiment)
        print(f"[opsdl] lineage: run {rec['run_id']}, {len(rec['checkpoints']) + len(rec['final'])} checkpoints and "
              f"{rec['scores']} scores in {rec['db']} (opsdl lineage sql \"SELECT * FROM v_scores\")", flush=True)
    return 0
