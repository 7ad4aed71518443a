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
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Optional

from .config import METHOD_KINDS, ConfigError, RunConfig, _build, _check, _deep_merge, parse_overrides
from .experiment_suites import (Suite, build_suites, classify_errors, curriculum_families, evaluate_external,
                                evaluate_model, gap_snapshot, on_eval_device, ruler_rows, suite_passes)

__all__ = ["ExperimentSettings", "Experiment", "load_experiment", "run_experiment", "plan_runs", "evaluate_external"]

Log = Callable[[str], None]
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,63}")
# the train fields a variant may change (the seed, run folder, prompt order and steps stay the experiment's)
_VARIANT_TRAIN = frozenset({"teacher", "ema_decay", "grad_accum", "prompts_per_step", "mixed_precision"})


@dataclass
class ExperimentSettings:
    """The experiment's own settings (section ``experiment`` of its YAML file)."""

    name: str = "headline"
    out_dir: str = "var/experiments/headline"
    # each entry a method kind (opsdl, sft, dpo) or the name of one of ``variants``
    methods: list[str] = field(default_factory=lambda: ["opsdl", "sft", "dpo"])
    # named settings compared like methods (an ablation): name -> overrides of the ``run`` section,
    # e.g. {topk100: {loss: {kind: topk_reverse_kl, topk: 100}}, lr3e-4: {optim: {lr: 3.0e-4}}};
    # ``method.kind`` is opsdl unless the overrides set it. Every variant of a seed sees the same
    # prompts in the same order (the data section cannot be overridden).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 1536])  # evaluation context tokens
    eval_n: int = 30  # questions per suite and length
    transfer: bool = True  # also evaluate templates never trained on
    eval_every: int = 0  # evaluate intermediate checkpoints every k steps (sample efficiency); 0: final only
    curve_length: Optional[int] = None  # intermediate checkpoints: in-family at this length only (default: longest)
    max_new_tokens: int = 32
    batch_size: int = 8
    # greedy evaluation of the base and final models: "auto" (vLLM when installed), "vllm", "transformers";
    # intermediate checkpoints (no model folder) always use transformers
    eval_backend: str = "auto"
    # diagnostics: sampled answers of the base and every final model on the first prompts of the
    # curve-length suite, each token scored with the long and with the short prompt (0: none)
    diagnostic_prompts: int = 4
    diagnostic_samples: int = 2
    db: Optional[str] = None  # lineage DuckDB file (default: $OPSDL_LINEAGE_DB or $OPSDL_HOME/lineage.duckdb)
    # transfer (run.data.source: curriculum): families never trained on. "split": one training per
    # seed and method without all of them; "leave_one_out": one per held-out family (trained on every
    # other family of the mixture). Every model is evaluated on its in-family and out-of-family suites.
    heldout_families: list[str] = field(default_factory=list)
    protocol: str = "split"
    eval_haystack: str = "noise"  # haystack of the curriculum evaluation suites
    in_family_n: Optional[int] = None  # questions per trained family and length (default: eval_n)
    # short-context retention in formats the training never uses (opsdl_core.foreign), C_s only; 0: off
    foreign_n: int = 140
    # RULER tasks (lm-eval, evals/ruler) run on the base and every final model, e.g.
    # [opsdl_ruler_vt, opsdl_ruler_niah_single_1]; at ruler_lengths (default: lengths), ruler_n each
    ruler_tasks: list[str] = field(default_factory=list)
    ruler_n: int = 10
    ruler_lengths: Optional[list[int]] = None

    def __post_init__(self) -> None:
        _check(bool(self.methods) and all(m in METHOD_KINDS or m in self.variants for m in self.methods),
               "experiment.methods", f"a non-empty list of {METHOD_KINDS} or names of experiment.variants "
               f"{sorted(self.variants)}", self.methods)
        for name, over in self.variants.items():
            _check(VARIANT_NAME.fullmatch(name) is not None and name not in METHOD_KINDS and name != "base",
                   f"experiment.variants.{name}", "a name of letters, digits and . _ = + - (not a method kind "
                   "or 'base')", name)
            train = (over.get("train") or {}) if isinstance(over, dict) else None
            _check(isinstance(train, dict) and "data" not in over and set(train) <= _VARIANT_TRAIN,
                   f"experiment.variants.{name}", "overrides of the run section without 'data' (every variant "
                   f"trains on the same prompts) and without train fields other than {sorted(_VARIANT_TRAIN)}",
                   over)
        _check(len(set(self.methods)) == len(self.methods), "experiment.methods", "no repeats", self.methods)
        _check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "experiment.seeds",
               "a non-empty list of distinct integers", self.seeds)
        _check(bool(self.lengths) and all(n >= 64 for n in self.lengths), "experiment.lengths",
               "a non-empty list of token counts >= 64", self.lengths)
        _check(self.eval_n >= 1, "experiment.eval_n", "an integer >= 1", self.eval_n)
        _check(self.eval_every >= 0, "experiment.eval_every", "an integer >= 0", self.eval_every)
        _check(self.curve_length is None or self.curve_length in self.lengths, "experiment.curve_length",
               f"null or one of experiment.lengths {self.lengths}", self.curve_length)
        _check(self.protocol in ("split", "leave_one_out"), "experiment.protocol", "'split' or 'leave_one_out'",
               self.protocol)
        from .config import CURRICULUM_FAMILIES, HAYSTACK_KINDS

        bad = [f for f in self.heldout_families if f not in CURRICULUM_FAMILIES]
        _check(not bad, "experiment.heldout_families", f"names among {list(CURRICULUM_FAMILIES)}", bad)
        _check(self.eval_haystack in HAYSTACK_KINDS, "experiment.eval_haystack", f"one of {HAYSTACK_KINDS}",
               self.eval_haystack)
        from .evaluate import EVAL_BACKENDS

        _check(self.eval_backend in EVAL_BACKENDS, "experiment.eval_backend", f"one of {EVAL_BACKENDS}",
               self.eval_backend)
        _check(self.ruler_n >= 1, "experiment.ruler_n", "an integer >= 1", self.ruler_n)
        _check(self.foreign_n >= 0, "experiment.foreign_n", "an integer >= 0", self.foreign_n)
        _check(self.in_family_n is None or self.in_family_n >= 1, "experiment.in_family_n", "null or an integer >= 1",
               self.in_family_n)

    @property
    def curve_at(self) -> int:
        return self.curve_length or max(self.lengths)


@dataclass
class Experiment:
    settings: ExperimentSettings
    run: RunConfig  # the shared training settings; each run sets method.kind, train.seed, train.run_dir

    @property
    def out_dir(self) -> Path:
        return Path(self.settings.out_dir)


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> Experiment:
    """Read ``path`` (sections ``experiment`` and ``run``) with ``--set`` style overrides
    (``experiment.seeds=[0]``, ``run.train.steps=10``)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"experiment config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    data = _deep_merge(data, parse_overrides(list(overrides)))
    unknown = set(data) - {"experiment", "run"}
    if unknown:
        raise ConfigError(f"experiment config: unknown section(s) {sorted(unknown)}; expected 'experiment' and 'run'")
    settings = _build(ExperimentSettings, data.get("experiment") or {}, "experiment")
    return Experiment(settings, RunConfig.from_dict(data.get("run") or {}))


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    method: str
    seed: int
    cfg: RunConfig
    heldout: tuple[str, ...] = ()  # curriculum families this run never trains on

    @property
    def label(self) -> str:
        return f"{self.method}-seed{self.seed}" + (f"-without-{'+'.join(self.heldout)}" if self.heldout else "")

    @property
    def trained_families(self) -> list[str]:
        c = self.cfg.data.curriculum
        return c.active_families() if c is not None else []


def folds(exp: Experiment) -> list[tuple[str, ...]]:
    """The families each training leaves out: none (no curriculum or nothing held out), all of
    ``heldout_families`` at once ("split"), or each one in turn ("leave_one_out")."""
    s = exp.settings
    if exp.run.data.source != "curriculum" or not s.heldout_families:
        return [()]
    if s.protocol == "leave_one_out":
        return [(f,) for f in s.heldout_families]
    return [tuple(s.heldout_families)]


def plan_runs(exp: Experiment) -> list[PlannedRun]:
    """One training run per (fold, seed, method), seeds outermost within a fold; same data and
    prompt order per seed and fold. A fold's held-out families get weight 0 in its mixture."""
    s, base = exp.settings, exp.run.to_dict()
    out = []
    for fold in folds(exp):
        for seed in s.seeds:
            for method in s.methods:
                run = PlannedRun(method, seed, exp.run, fold)
                variant = copy.deepcopy(s.variants.get(method) or {})
                over: dict[str, Any] = _deep_merge(
                    {"method": {"kind": method if method in METHOD_KINDS else "opsdl"}}, variant)
                over = _deep_merge(over, {"train": {"seed": seed, "run_dir": str(exp.out_dir / "runs" / run.label)}})
                if fold:
                    mix = dict(exp.run.data.curriculum.families)
                    over["data"] = {"curriculum": {"families": {f: (0.0 if f in fold else w) for f, w in mix.items()}}}
                    if not any(w > 0 for f, w in mix.items() if f not in fold):
                        raise ConfigError(f"experiment.heldout_families {list(fold)}: no family left to train on "
                                          f"(mixture {mix})")
                if s.eval_every:
                    over["train"].update(save_every=s.eval_every,
                                         keep_checkpoints=exp.run.train.steps // s.eval_every + 1)
                try:
                    cfg = RunConfig.from_dict(_deep_merge(base, over))
                except ConfigError as e:
                    if method not in s.variants:
                        raise
                    raise ConfigError(f"experiment.variants.{method}: {e}") from None
                out.append(PlannedRun(method, seed, cfg, fold))
    return out


def prompts_seen(cfg: RunConfig, step: int) -> int:
    return step * cfg.train.prompts_per_step * cfg.train.grad_accum


# -- evaluation suites: opsdl_core.experiment_suites ----------------------------------------------
def task_labels(exp: Experiment, run: PlannedRun | None) -> dict[str, list[str]] | None:
    """Curriculum families as in-family or out-of-family tasks: for a trained model by its fold;
    for the base model every label any fold gives the family (its score is the baseline of each)."""
    if exp.run.data.source != "curriculum":
        return None
    out: dict[str, list[str]] = {}
    runs = [run] if run is not None else [r for r in plan_runs(exp) if r.seed == exp.settings.seeds[0]
                                          and r.method == exp.settings.methods[0]]
    for r in runs:
        for f in curriculum_families(exp):
            label = "out_of_family" if f in r.heldout else ("in_family" if f in r.trained_families else None)
            if label and f"{label}:{f}" not in out.setdefault(f, []):
                out[f].append(f"{label}:{f}")
    return {f: v for f, v in out.items() if v}


def checkpoint_model(base: Any, cfg: RunConfig, ckpt_dir: Path) -> Any:
    """The model of an intermediate checkpoint: a copy of ``base`` with the checkpoint's trainable
    weights (LoRA adapters merged in)."""
    from .checkpoint import load_trainable
    from .trainer import apply_lora

    model = apply_lora(copy.deepcopy(base), cfg)
    load_trainable(Path(ckpt_dir), model)
    return model.merge_and_unload() if cfg.lora.enabled else model


# -- running -----------------------------------------------------------------------------------
def _train(run: PlannedRun, exp: Experiment, log: Log) -> dict[str, Any]:
    """``python -m opsdl_core.train`` for one planned run (skipped when its results exist)."""
    rd = Path(run.cfg.train.run_dir)
    done = rd / "results.json"
    prior = json.loads(done.read_text()) if done.exists() else {}
    if prior.get("config_hash") == run.cfg.hash():
        log(f"[experiment] {run.label}: trained already ({rd})")
        return prior
    rd.mkdir(parents=True, exist_ok=True)
    cfg_path = exp.out_dir / "configs" / f"{run.label}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    run.cfg.to_yaml(cfg_path)
    log(f"[experiment] {run.label}: training ({run.cfg.train.steps} steps) -> {rd}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH", "")) if p)}
    t0 = time.time()
    with open(rd / "train.log", "a") as fh:
        proc = subprocess.run([sys.executable, "-m", "opsdl_core.train", "--config", str(cfg_path), "--no-eval"],
                              stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = (rd / "train.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"training {run.label} failed (exit {proc.returncode}, {rd / 'train.log'}):\n"
                           + "\n".join(tail))
    results = json.loads(done.read_text())
    log(f"[experiment] {run.label}: trained in {time.time() - t0:.0f}s")
    return results


def run_experiment(exp: Experiment, *, log: Log = print, store: Any = None) -> dict[str, Any]:
    """Run (or resume) the whole experiment; returns the summary written to ``comparison.json``."""
    import torch

    from .lineage import LineageStore, content_hash, ingest_training_run
    from .models import load_model_and_tokenizer, resolve_model

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
        elif classify_errors(rec["rows"], suites):  # stored before answers had error kinds
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
        rd = Path(run.cfg.train.run_dir)
        ids = ingest_training_run(store, rd, experiment=s.name)
        common = {"method": run.method, "seed": run.seed, "train_run_id": ids["run_id"],
                  "train_config_hash": run.cfg.hash(), "train_data_digest": results.get("data_digest"),
                  **({"heldout_families": list(run.heldout)} if run.heldout else {})}
        labels = task_labels(exp, run)
        if s.eval_every:
            for rec in _checkpoint_log(rd):
                step, path = int(rec["step"]), rd / "checkpoints" / rec["path"]
                if step >= run.cfg.train.steps or not path.exists():
                    continue  # the final model stands for the last step
                evaluate(f"{run.label}-step{step}", content_hash(path),
                         {**common, "step": step, "prompts_seen": prompts_seen(run.cfg, step)},
                         lambda p=path, c=run.cfg: checkpoint_model(base, c, p), suites=curve_suites, labels=labels,
                         final=False)
        steps = int(results.get("steps") or run.cfg.train.steps)
        final_dir = rd / "final" / "model"
        evaluate(run.label, ids["final"].get("merged") or content_hash(final_dir),
                 {**common, "step": steps, "prompts_seen": prompts_seen(run.cfg, steps)},
                 lambda d=final_dir: load_model_and_tokenizer(str(d))[0], labels=labels, model_dir=str(final_dir))
        trained.append({"method": run.method, "seed": run.seed, "heldout": list(run.heldout),
                        "train_seconds": results.get("train_seconds"),
                        "seconds_at_step": _seconds_at_step(rd), "steps": steps, "prompts": prompts_seen(run.cfg, steps), "train_run_id": ids["run_id"]})
    from .experiment_report import summarize, write_comparison

    summary = summarize(evals, trained, s)
    summary.update(experiment=s.name, base_model=exp.run.model.name, base_checkpoint_id=base_id,
                   suites={x.name: x.digest for x in suites}, wall_seconds=round(time.time() - t0, 1))
    write_comparison(summary, out)
    log(f"[experiment] done in {summary['wall_seconds']:.0f}s: {out / 'comparison.md'}")
    return summary


def _load_eval_record(folder: Path, label: str, ckpt_id: str) -> dict[str, Any]:
    """The stored evaluation of ``label`` if it is of checkpoint ``ckpt_id`` (else an empty record);
    a record of the earlier layout (one file per suite set, ``label-<digest>.json``) is taken over."""
    path = folder / f"{label}.json"
    candidates = [path] if path.exists() else sorted(folder.glob(f"{glob_escape(label)}-*.json"))
    for c in candidates:
        rec = json.loads(c.read_text())
        if rec.get("checkpoint_id") == ckpt_id and isinstance(rec.get("rows"), list):
            rec.setdefault("snapshot", [])
            return rec
    return {"checkpoint_id": ckpt_id, "rows": [], "snapshot": []}


def _save_eval_record(folder: Path, label: str, rec: dict[str, Any]) -> None:
    from .checkpoint import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{label}.json", json.dumps(rec, indent=1))


def _seconds_at_step(run_dir: Path) -> dict[int, float]:
    """Training seconds spent up to the end of each step (the sum of the steps' ``step_s`` in
    ``metrics.jsonl``: rollout, scoring, backward and optimizer; not model loading or checkpoint
    writes), for the sample-efficiency curve at equal wall-clock. The last record of a step wins (a
    resumed run repeats none, but a damaged log might)."""
    from .checkpoint import read_jsonl

    per_step: dict[int, float] = {}
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        if isinstance(m.get("step"), int) and isinstance(m.get("step_s"), (int, float)):
            per_step[m["step"]] = float(m["step_s"])
    out, total = {}, 0.0
    for step in sorted(per_step):
        total += per_step[step]
        out[step] = round(total, 1)
    return out


def _checkpoint_log(run_dir: Path) -> list[dict[str, Any]]:
    from .checkpoint import read_jsonl

    path = run_dir / "checkpoints.jsonl"
    return read_jsonl(path) if path.exists() else []


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
    from .experiment_report import comparison_markdown

    print(comparison_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
