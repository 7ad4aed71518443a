"""The headline experiment: OPSDL against Long-SFT and DPO on the same prompts, per context length.

    python -m opsdl_core.experiment --config configs/experiment.yaml
    python -m opsdl_core.experiment --config configs/experiment.yaml \\
        --set experiment.seeds=[0] --set run.train.steps=10          # any field of either section

What it does (every stage resumes: a finished training or evaluation is not redone)::

    suites   in-family (the training templates, fresh keys) and transfer (templates never trained
             on) at each length in ``experiment.lengths``, long context; both with C_s only
             (short-context retention); generated once, identified by their content digest
    base     evaluated on every suite
    train    for seed in seeds, for method in methods: ``python -m opsdl_core.train`` in its own
             process, the run config = ``run`` with ``method.kind`` and ``train.seed`` set: every
             method of a seed sees the same prompts in the same order
    evaluate every final model, and every ``eval_every`` steps the intermediate checkpoints
             (base + the checkpoint's trainable weights), on the same suites
    compare  ``out_dir/comparison.{md,json}``, ``accuracy_vs_length.png`` (one line per method,
             spread over seeds), ``sample_efficiency.png`` (accuracy against prompts seen)
    diagnose sampled answers of the base and every final model, each token scored with the long
             and with the short prompt: ``gap_by_position.png`` (mean gap by answer position, one
             line per method) and ``gap_heatmap.png`` (a few answers token by token); the tokens
             and log-probs are in ``rollout_samples`` (views ``v_token_gaps``, ``v_gap_by_position``)
    lineage  every training run and checkpoint, and every score with its method, seed, step,
             checkpoint hash and suite digest (view ``v_method_scores``)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from ..run_dir import RunDir
from .plan import (Experiment, Log, PlannedRun, curriculum_families, load_experiment, plan_runs, prompts_seen,
                   task_labels)
from .suites import (Suite, build_suites, evaluate_external, evaluate_model, gap_snapshot, on_eval_device, ruler_rows,
                     suite_passes)

__all__ = ["run_experiment", "evaluate_external", "main"]


def checkpoint_model(base: Any, cfg: RunConfig, ckpt_dir: Path) -> Any:
    """The model of an intermediate checkpoint: a copy of ``base`` with the checkpoint's trainable
    weights (LoRA adapters merged in)."""
    from ..train.checkpoint import load_trainable
    from ..train.lora import apply_lora

    model = apply_lora(copy.deepcopy(base), cfg)
    load_trainable(Path(ckpt_dir), model)
    return model.merge_and_unload() if cfg.lora.enabled else model


# -- running -----------------------------------------------------------------------------------
def _train(run: PlannedRun, exp: Experiment, log: Log) -> dict[str, Any]:
    """``python -m opsdl_core.train`` for one planned run (skipped when its results exist)."""
    files = RunDir(run.cfg.train.run_dir)
    rd, done = files.root, files.results
    prior = json.loads(done.read_text()) if done.exists() else {}
    if prior.get("config_hash") == run.cfg.hash():
        log(f"[experiment] {run.label}: trained already ({rd})")
        return prior
    rd.mkdir(parents=True, exist_ok=True)
    cfg_path = exp.out_dir / "configs" / f"{run.label}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    run.cfg.to_yaml(cfg_path)
    log(f"[experiment] {run.label}: training ({run.cfg.train.steps} steps) -> {rd}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                                   os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.time()
    with open(files.train_log, "a") as fh:  # the experiment records the run in its own lineage store
        proc = subprocess.run([sys.executable, "-m", "opsdl_core.train", "--config", str(cfg_path), "--no-eval",
                               "--no-lineage"],
                              stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = files.train_log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"training {run.label} failed (exit {proc.returncode}, {files.train_log}):\n"
                           + "\n".join(tail))
    results = json.loads(done.read_text())
    log(f"[experiment] {run.label}: trained in {time.time() - t0:.0f}s")
    return results


def run_experiment(exp: Experiment, *, log: Log = print, store: Any = None) -> dict[str, Any]:
    """Run (or resume) the whole experiment; returns the summary written to ``comparison.json``."""
    import torch

    from ..lineage.store import LineageStore, content_hash, ingest_training_run
    from ..models.load import load_model_and_tokenizer, resolve_model

    s, t0 = exp.settings, time.time()
    out = exp.out_dir
    out.mkdir(parents=True, exist_ok=True)
    store = store or LineageStore(s.db)
    store.log_experiment(s.name, "OPSDL against Long-SFT and DPO on the same prompts, per context length")
    if exp.run.train.num_threads:
        torch.set_num_threads(exp.run.train.num_threads)
    resolved = resolve_model(exp.run.model.name, cache_dir=exp.run.model.cache_dir)
    base, tok = load_model_and_tokenizer(resolved, dtype=getattr(torch, exp.run.model.dtype),
                                         trust_remote_code=exp.run.model.trust_remote_code,
                                         cache_dir=exp.run.model.cache_dir)
    base_id = f"base:{resolved.content_hash}"
    suites = build_suites(exp, tok)
    for x in suites:
        store.log_dataset(x.digest, name=x.name, kind="eval", n_rows=len(x.items),
                          metadata={"family": x.family, "context_length": x.length, "experiment": s.name})
    suites_digest = hashlib.sha256("".join(x.digest for x in suites).encode()).hexdigest()[:12]
    evals: list[dict[str, Any]] = []

    curve_suites = [x for x in suites if x.family == "in_family" and x.length == s.curve_at]
    if exp.run.data.source == "curriculum":  # transfer over training: the held-out families' suites
        held = set(s.heldout_families) or set(curriculum_families(exp))
        curve_suites = [x for x in suites if x.family in held and x.length == s.curve_at]

    def evaluate(label: str, ckpt_id: str, params: dict[str, Any], get_model: Callable[[], Any],
                 suites: list[Suite] = suites, labels: dict[str, list[str]] | None = None,
                 model_dir: str | None = None, final: bool = True) -> None:
        """``final``: the base and final models (every suite, C_s passes, RULER, the gap snapshot);
        intermediate checkpoints get the long-context curve suite only. One record per model: the
        suite passes it lacks (a suite added to the experiment later, e.g. the foreign-format one)
        are evaluated and added; what it has is kept."""
        rec = _load_eval_record(out / "evals", label, ckpt_id)
        done = {(r["dataset_digest"], r["context"]) for r in rec["rows"] if r.get("harness") == "opsdl"}
        missing = [job for job in suite_passes(suites, short=final) if (job[0].digest, job[1]) not in done]
        want_ruler = final and bool(model_dir) and bool(s.ruler_tasks) and not any(
            r["task"].startswith("ruler:") for r in rec["rows"])
        want_snapshot = final and s.diagnostic_prompts > 0 and not rec["snapshot"]
        if missing or want_ruler or want_snapshot:
            log(f"[experiment] evaluating {label}" + (
                f" on {', '.join(f'{x.name}/{ctx}' for x, ctx in missing)}" if done and missing else ""))
            t = time.time()
            model = on_eval_device(get_model())
            model.eval()
            if missing:
                rec["rows"] += evaluate_model(model, tok, [x for x, _ in missing], s, passes=missing,
                                              task_names=labels, model_dir=model_dir)
            if want_ruler:
                rec["rows"] += ruler_rows(model_dir, exp, out, label)
            if want_snapshot:
                rec["snapshot"] = gap_snapshot(model, tok, curve_suites[0], exp)
            rec.update(params=params, seconds=round(rec.get("seconds", 0.0) + time.time() - t, 1))
            _save_eval_record(out / "evals", label, rec)
        wanted = {x.digest for x in suites}  # rows of suites the experiment no longer has stay out of its report
        rec = {**rec, "rows": [r for r in rec["rows"] if r["dataset_digest"] in wanted or r["task"].startswith("ruler:")]}
        run_id = f"exp-{s.name}-{label}-{suites_digest}"
        store.log_run(run_id, experiment=s.name, kind="eval", params={**params, "suites": suites_digest},
                      duration_s=rec["seconds"], base_model=exp.run.model.name, base_model_hash=resolved.content_hash)
        store.log_eval_scores(run_id, ckpt_id, [{k: v for k, v in r.items() if k != "seconds"} for r in rec["rows"]])
        if rec["snapshot"]:
            store.log_rollout_samples(run_id, [{**r, "step": int(params.get("step") or 0),
                                                "dataset_digest": curve_suites[0].digest} for r in rec["snapshot"]])
        evals.append({"label": label, "eval_run_id": run_id, **rec})
        acc = ", ".join(f"{r['task']}@{r['context_length'] or 'C_s'} {r['value']:.2f}" for r in rec["rows"])
        log(f"[experiment] {label}: {acc}")

    evaluate("base", base_id, {"method": "base", "seed": None, "step": 0, "prompts_seen": 0}, lambda: base,
             labels=task_labels(exp, None), model_dir=str(resolved.path))
    trained = []
    for run in plan_runs(exp):
        results = _train(run, exp, log)
        files = RunDir(run.cfg.train.run_dir)
        ids = ingest_training_run(store, files.root, experiment=s.name)
        common = {"method": run.method, "seed": run.seed, "train_run_id": ids["run_id"],
                  "train_config_hash": run.cfg.hash(), "train_data_digest": results.get("data_digest"),
                  **({"heldout_families": list(run.heldout)} if run.heldout else {})}
        labels = task_labels(exp, run)
        if s.eval_every:
            for rec in files.checkpoint_records():
                step, path = int(rec["step"]), rec["dir"]
                if step >= run.cfg.train.steps or not path.exists():
                    continue  # the final model stands for the last step
                evaluate(f"{run.label}-step{step}", content_hash(path),
                         {**common, "step": step, "prompts_seen": prompts_seen(run.cfg, step)},
                         lambda p=path, c=run.cfg: checkpoint_model(base, c, p), suites=curve_suites, labels=labels,
                         final=False)
        steps = int(results.get("steps") or run.cfg.train.steps)
        final_dir = files.final_model
        evaluate(run.label, ids["final"].get("merged") or content_hash(final_dir),
                 {**common, "step": steps, "prompts_seen": prompts_seen(run.cfg, steps)},
                 lambda d=final_dir: load_model_and_tokenizer(str(d))[0], labels=labels, model_dir=str(final_dir))
        trained.append({"method": run.method, "seed": run.seed, "heldout": list(run.heldout),
                        "train_seconds": results.get("train_seconds"),
                        "seconds_at_step": files.seconds_at_step(), "steps": steps,
                        "prompts": prompts_seen(run.cfg, steps), "train_run_id": ids["run_id"]})
    from .report import summarize, write_comparison

    summary = summarize(evals, trained, s)
    summary.update(experiment=s.name, base_model=exp.run.model.name, base_checkpoint_id=base_id,
                   suites={x.name: x.digest for x in suites}, wall_seconds=round(time.time() - t0, 1))
    write_comparison(summary, out)
    log(f"[experiment] done in {summary['wall_seconds']:.0f}s: {out / 'comparison.md'}")
    return summary


def _load_eval_record(folder: Path, label: str, ckpt_id: str) -> dict[str, Any]:
    """The stored evaluation of ``label`` if it is of checkpoint ``ckpt_id`` (else an empty record)."""
    path = folder / f"{label}.json"
    rec = json.loads(path.read_text()) if path.exists() else {}
    if rec.get("checkpoint_id") == ckpt_id and isinstance(rec.get("rows"), list):
        return {"snapshot": [], **rec}
    return {"checkpoint_id": ckpt_id, "rows": [], "snapshot": []}


def _save_eval_record(folder: Path, label: str, rec: dict[str, Any]) -> None:
    from ..train.checkpoint import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{label}.json", json.dumps(rec, indent=1))


def main(argv: list[str] | None = None) -> int:
    import argparse

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ap = argparse.ArgumentParser(prog="python -m opsdl_core.experiment", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="YAML with sections 'experiment' and 'run'")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a field: experiment.seeds=[0], run.train.steps=10 (repeatable)")
    ap.add_argument("--evaluate-model", metavar="DIR", help="only score this model folder on the experiment's "
                    "suites (beside the base model's scores), e.g. a model trained on self-instruct data")
    ap.add_argument("--label", default="external", help="name of --evaluate-model's scores in the lineage store")
    ap.add_argument("--families", help="with --evaluate-model: comma-separated families (default: all)")
    ap.add_argument("--lengths", help="with --evaluate-model: comma-separated lengths (default: all)")
    args = ap.parse_args(argv)
    exp = load_experiment(args.config, args.set)
    if args.evaluate_model:
        evaluate_external(exp, args.evaluate_model, args.label,
                          families=args.families.split(",") if args.families else None,
                          lengths=[int(x) for x in args.lengths.split(",")] if args.lengths else None,
                          log=lambda m: print(m, flush=True))
        return 0
    summary = run_experiment(exp, log=lambda m: print(m, flush=True))
    from .report import comparison_markdown

    print(comparison_markdown(summary))
    return 0
