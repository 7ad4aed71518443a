"""The experiment's evaluation (``opsdl_core.experiment``): its suites (needle templates or
curriculum families per context length), greedy accuracy on them, RULER through lm-eval, sampled-
answer gap snapshots, and scoring a model trained elsewhere on the same suites."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .plan import Experiment, ExperimentSettings, curriculum_families

__all__ = ["Suite", "build_suites", "evaluate_model", "ruler_rows",
           "gap_snapshot", "evaluate_external", "suite_passes", "FOREIGN"]

Log = Callable[[str], None]
FOREIGN = "foreign"  # the family of the foreign-format retention suite (opsdl_core.data.tasks.foreign), C_s only


@dataclass
class Suite:
    name: str  # e.g. in_family@1024
    family: str  # in_family | transfer
    length: int
    items: list  # Prepared
    digest: str


def _suite(family: str, length: int, raw: list, tokenizer: Any, prep_cfg: Any) -> Suite:
    """Prepare a suite's examples (oracle C_s prompts); any example without a usable C_s is an error."""
    from ..data.prepare import prepare_examples

    items, bad = prepare_examples(raw, tokenizer, prep_cfg)
    if bad:
        raise ValueError(f"suite {family}@{length}: {bad[0].reason}")
    h = hashlib.sha256("".join(p.example.content_hash() for p in items).encode()).hexdigest()[:16]
    return Suite(f"{family}@{length}", family, length, items, h)


def build_suites(exp: Experiment, tokenizer: Any) -> list[Suite]:
    from ..config import DataConfig
    from ..data.prepare import token_counter, training_templates
    from ..data.seeds import stream_seed
    from ..data.sources import draw

    d, s = exp.run.data, exp.settings
    kw = dict(split="heldout", count_tokens=token_counter(tokenizer), n_distractors=tuple(d.n_distractors))
    prep_cfg = DataConfig(teacher_context="oracle", short_budget_tokens=d.short_budget_tokens)
    if d.source == "curriculum":  # one suite per family and length: held-out names, every template
        plan = [(f, L, s.eval_n if f in s.heldout_families else (s.in_family_n or s.eval_n),
                 dict(source="curriculum", family=f, haystack=s.eval_haystack, templates="all",
                      curriculum={"prose": d.curriculum.prose}, seed=stream_seed(d.seed, "heldout", length=L)))
                for f in curriculum_families(exp) for L in s.lengths]
    else:  # the training templates with fresh keys, and (``transfer``) templates never trained on
        families = [("in_family", training_templates(d), "heldout")] + (
            [("transfer", None, "transfer")] if s.transfer else [])
        plan = [(family, L, s.eval_n, dict(source="synthetic", templates=templates,
                                           seed=stream_seed(d.seed, stream, length=L)))
                for family, templates, stream in families for L in s.lengths]
    suites = [_suite(f, L, draw(lengths=[L], n=n, **how, **kw).examples, tokenizer, prep_cfg)
              for f, L, n, how in plan]
    return suites + foreign_suite(exp, tokenizer)


def foreign_suite(exp: Experiment, tokenizer: Any) -> list[Suite]:
    """The foreign-format retention suite (``experiment.foreign_n`` questions; none at 0)."""
    from ..config import DataConfig
    from ..data.tasks.foreign import generate_foreign

    n = exp.settings.foreign_n
    if not n:
        return []
    prep_cfg = DataConfig(teacher_context="oracle", short_budget_tokens=exp.run.data.short_budget_tokens)
    return [_suite(FOREIGN, 0, generate_foreign(n, seed=exp.run.data.seed), tokenizer, prep_cfg)]


def on_eval_device(model: Any) -> Any:
    """The model on the GPU when there is one (as the trainer's Accelerator places it), else as it is:
    greedy generation follows the model's device."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


def suite_passes(suites: list[Suite], *, short: bool = True) -> list[tuple[Suite, str]]:
    """The (suite, context) passes of an evaluation (``opsdl_core.evaluation.passes``): every suite
    with the long context, and (``short``) with C_s only on each family's longest suite; the
    foreign-format suite (``family == "foreign"``) with C_s only, and only when ``short``."""
    from ..evaluation.passes import eval_passes

    return eval_passes(suites, role=lambda x: "retention" if x.family == FOREIGN else "heldout",
                       family=lambda x: x.family, length=lambda x: x.length, short=short)


def evaluate_model(model: Any, tokenizer: Any, suites: list[Suite], s: ExperimentSettings, *,
                   short: bool = True, task_names: dict[str, list[str]] | None = None,
                   model_dir: str | None = None, passes: list[tuple[Suite, str]] | None = None) -> list[dict[str, Any]]:
    """Greedy accuracy on the passes of :func:`suite_passes` (or the given ``passes``). ``task_names``:
    the task label(s) each family's rows get (``in_family:counting``, ...; default: the family). All
    questions are generated together (``experiment.eval_backend``; vLLM needs ``model_dir``)."""
    from ..evaluation.accuracy import EvalJob, evaluate_jobs

    passes = suite_passes(suites, short=short) if passes is None else passes
    jobs = [EvalJob((i, ctx), suite.items, ctx) for i, (suite, ctx) in enumerate(passes)]
    results = evaluate_jobs(model, tokenizer, jobs, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                            backend=s.eval_backend if model_dir else "transformers", model_dir=model_dir)
    rows = []
    for (i, ctx), r in results.items():
        suite = passes[i][0]
        answers = r.answer_rows(suite.items)  # per question: the report's paired counts, error kinds, lineage
        for task in (task_names or {}).get(suite.family, [suite.family]):
            rows.append({"task": task, "context": ctx, "context_length": suite.length if ctx == "long" else 0,
                         "metric": "accuracy", "value": r.accuracy, "n": r.n, "dataset_digest": suite.digest,
                         "harness": "opsdl", "seconds": round(r.seconds, 1), "answers": answers})
    return rows


def ruler_rows(model_dir: str, exp: Experiment, out: Path, label: str) -> list[dict[str, Any]]:
    """``experiment.ruler_tasks`` through lm-eval (evals/ruler) on a model folder: rows labelled
    ``ruler:<task>`` per context length."""
    s = exp.settings
    if not s.ruler_tasks:
        return []
    import os

    from ..data.essays import lm_eval_essay_tasks
    from ..evaluation.lm_eval import LmEvalSpec, results_file
    from ..evaluation.lm_eval import run as run_lm_eval
    from ..evaluation.lm_eval import score_rows

    metadata: dict[str, Any] = {"max_seq_lengths": list(s.ruler_lengths or s.lengths), "num_samples": s.ruler_n}
    if lm_eval_essay_tasks(s.ruler_tasks) and not os.environ.get("OPSDL_RULER_ESSAYS"):
        from ..data.essays import ensure_essays

        metadata["essays_path"] = str(ensure_essays())
    spec = LmEvalSpec(model=str(model_dir), tasks=tuple(s.ruler_tasks), batch_size=s.batch_size,
                      metadata=metadata, num_threads=exp.run.train.num_threads, dtype=exp.run.model.dtype)
    folder = out / "ruler" / label
    run_lm_eval(spec, folder, log_path=folder / "lm_eval.log")
    rows = []
    for r in score_rows(results_file(folder)):
        if r["context_length"] and not r["is_group"]:
            rows.append({"task": f"ruler:{r['task'].removeprefix('opsdl_ruler_')}", "context": "long",
                         "context_length": r["context_length"], "metric": "accuracy", "value": r["value"],
                         "n": r["n"], "dataset_digest": r["dataset_digest"], "harness": r["harness"]})
    return rows


def gap_snapshot(model: Any, tokenizer: Any, suite: Suite, exp: Experiment) -> list[dict[str, Any]]:
    """Sampled answers (the training rollout's temperature) to the first ``diagnostic_prompts``
    of ``suite``, each token's log-prob under the long prompt (student) and under the short one
    (the same model reading C_s only): where along the answer the two part."""
    from ..evaluation.snapshot import rollout_snapshot

    k = exp.settings.diagnostic_prompts
    if not k:
        return []
    rows = rollout_snapshot(model, tokenizer, suite.items[:k], n=exp.settings.diagnostic_samples,
                            temperature=exp.run.rollout.temperature, top_p=exp.run.rollout.top_p,
                            max_new_tokens=exp.run.rollout.max_new_tokens, seed=0)
    return [{k2: v for k2, v in r.items() if k2 != "response_ids"} for r in rows]


def evaluate_external(exp: Experiment, model_dir: str, label: str, *, families: list[str] | None = None,
                      lengths: list[int] | None = None, log: Log = print, store: Any = None) -> list[dict[str, Any]]:
    """Score a model trained elsewhere (e.g. on self-instruct data) on this experiment's suites (or
    the named families / lengths of them), long context, beside the base model's scores on the
    same suites when the experiment has them. Rows go to the lineage store under ``label``."""
    import torch

    from ..lineage.store import LineageStore, content_hash
    from ..models.load import load_model_and_tokenizer, resolve_model
    from .report import answer_map, paired_counts

    s = exp.settings
    if exp.run.train.num_threads:
        torch.set_num_threads(exp.run.train.num_threads)
    model, tok = load_model_and_tokenizer(str(model_dir))
    model = on_eval_device(model)
    model.eval()
    suites = [x for x in build_suites(exp, tok) if (not families or x.family in families)
              and (not lengths or x.length in lengths)]
    if not suites:
        raise ValueError(f"no suite of experiment {s.name!r} matches families={families} lengths={lengths}")
    rows = evaluate_model(model, tok, suites, s, short=False, model_dir=str(model_dir))
    base: dict[tuple[str, int], float] = {}
    base_answers: dict[tuple[str, int], dict[str, bool]] = {}
    digests = {x.digest for x in suites}
    cache = exp.out_dir / "evals" / "base.json"  # the base model's scores on the same suites
    for cache in [cache] if cache.exists() else []:
        for r in json.loads(cache.read_text())["rows"]:
            if r["context"] == "long" and r["dataset_digest"] in digests:
                key = (r["task"].split(":")[-1], int(r["context_length"]))
                base[key] = r["value"]
                if r.get("answers"):
                    base_answers[key] = answer_map(r)
    store = store or LineageStore(s.db)
    ckpt = f"external:{content_hash(Path(model_dir))}" if Path(model_dir).is_dir() else f"external:{model_dir}"
    run_id = f"exp-{s.name}-{label}"
    store.log_run(run_id, experiment=s.name, kind="eval", params={"method": label, "model_dir": str(model_dir)},
                  base_model=exp.run.model.name, base_model_hash=resolve_model(exp.run.model.name).content_hash)
    store.log_eval_scores(run_id, ckpt, [{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    for r in rows:
        key = (r["task"], int(r["context_length"]))
        r["base"] = base.get(key)
        paired = ""
        if key in base_answers:  # the same questions: which ones changed
            r["gained"], r["lost"], r["paired"] = paired_counts(answer_map(r), base_answers[key])
            paired = f", gained {r['gained']}, lost {r['lost']} of {r['paired']} paired"
        wrong = [a["error"] for a in r["answers"] if not a["correct"]]
        log(f"[experiment] {label}: {r['task']}@{r['context_length']} {r['value']:.3f} (base "
            f"{'—' if r['base'] is None else format(r['base'], '.3f')}{paired}, n={r['n']}; wrong: "
            f"{wrong.count('distractor')} name a distractor's value, {wrong.count('other')} other)")
    return rows
