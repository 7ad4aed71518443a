"""An experiment's plan: its settings (the ``experiment`` section of its YAML), the shared run
config, and the training runs it makes (one per fold, seed and method or variant), each with its
own run folder and the same prompts in the same order for every method of a seed."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import METHOD_KINDS, ConfigError, RunConfig
from ..config_schema import build, check, deep_merge, parse_overrides

__all__ = ["ExperimentSettings", "Experiment", "load_experiment", "PlannedRun", "plan_runs", "folds",
           "curriculum_families", "prompts_seen", "task_labels"]

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
    # short-context retention in formats the training never uses (opsdl_core.data.tasks.foreign), C_s only; 0: off
    foreign_n: int = 140
    # RULER tasks (lm-eval, evals/ruler) run on the base and every final model, e.g.
    # [opsdl_ruler_vt, opsdl_ruler_niah_single_1]; at ruler_lengths (default: lengths), ruler_n each
    ruler_tasks: list[str] = field(default_factory=list)
    ruler_n: int = 10
    ruler_lengths: Optional[list[int]] = None

    def __post_init__(self) -> None:
        # the name is a folder under OPSDL_HOME/artifacts/experiments: no separators, no '..'
        check(isinstance(self.name, str) and VARIANT_NAME.fullmatch(self.name) is not None, "experiment.name",
               "a name of letters, digits and . _ = + - starting with a letter or digit (at most 64)", self.name)
        check(bool(self.methods) and all(m in METHOD_KINDS or m in self.variants for m in self.methods),
               "experiment.methods", f"a non-empty list of {METHOD_KINDS} or names of experiment.variants "
               f"{sorted(self.variants)}", self.methods)
        for name, over in self.variants.items():
            check(VARIANT_NAME.fullmatch(name) is not None and name not in METHOD_KINDS and name != "base",
                   f"experiment.variants.{name}", "a name of letters, digits and . _ = + - (not a method kind "
                   "or 'base')", name)
            train = (over.get("train") or {}) if isinstance(over, dict) else None
            check(isinstance(train, dict) and "data" not in over and set(train) <= _VARIANT_TRAIN,
                   f"experiment.variants.{name}", "overrides of the run section without 'data' (every variant "
                   f"trains on the same prompts) and without train fields other than {sorted(_VARIANT_TRAIN)}",
                   over)
        check(len(set(self.methods)) == len(self.methods), "experiment.methods", "no repeats", self.methods)
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "experiment.seeds",
               "a non-empty list of distinct integers", self.seeds)
        check(bool(self.lengths) and all(n >= 64 for n in self.lengths), "experiment.lengths",
               "a non-empty list of token counts >= 64", self.lengths)
        check(self.eval_n >= 1, "experiment.eval_n", "an integer >= 1", self.eval_n)
        check(self.eval_every >= 0, "experiment.eval_every", "an integer >= 0", self.eval_every)
        check(self.curve_length is None or self.curve_length in self.lengths, "experiment.curve_length",
               f"null or one of experiment.lengths {self.lengths}", self.curve_length)
        check(self.protocol in ("split", "leave_one_out"), "experiment.protocol", "'split' or 'leave_one_out'",
               self.protocol)
        from ..config import CURRICULUM_FAMILIES, HAYSTACK_KINDS

        bad = [f for f in self.heldout_families if f not in CURRICULUM_FAMILIES]
        check(not bad, "experiment.heldout_families", f"names among {list(CURRICULUM_FAMILIES)}", bad)
        check(self.eval_haystack in HAYSTACK_KINDS, "experiment.eval_haystack", f"one of {HAYSTACK_KINDS}",
               self.eval_haystack)
        from ..evaluation.accuracy import EVAL_BACKENDS

        check(self.eval_backend in EVAL_BACKENDS, "experiment.eval_backend", f"one of {EVAL_BACKENDS}",
               self.eval_backend)
        check(self.ruler_n >= 1, "experiment.ruler_n", "an integer >= 1", self.ruler_n)
        check(self.foreign_n >= 0, "experiment.foreign_n", "an integer >= 0", self.foreign_n)
        check(self.in_family_n is None or self.in_family_n >= 1, "experiment.in_family_n", "null or an integer >= 1",
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
    data = deep_merge(data, parse_overrides(list(overrides)))
    unknown = set(data) - {"experiment", "run"}
    if unknown:
        raise ConfigError(f"experiment config: unknown section(s) {sorted(unknown)}; expected 'experiment' and 'run'")
    settings = build(ExperimentSettings, data.get("experiment") or {}, "experiment")
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
                over: dict[str, Any] = deep_merge(
                    {"method": {"kind": method if method in METHOD_KINDS else "opsdl"}}, variant)
                over = deep_merge(over, {"train": {"seed": seed, "run_dir": str(exp.out_dir / "runs" / run.label)}})
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
                    cfg = RunConfig.from_dict(deep_merge(base, over))
                except ConfigError as e:
                    if method not in s.variants:
                        raise
                    raise ConfigError(f"experiment.variants.{method}: {e}") from None
                out.append(PlannedRun(method, seed, cfg, fold))
    return out


def prompts_seen(cfg: RunConfig, step: int) -> int:
    return step * cfg.train.prompts_per_step * cfg.train.grad_accum


# -- evaluation suites: opsdl_core.experiment.suites ----------------------------------------------
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


def curriculum_families(exp: Experiment) -> list[str]:
    """Every family an experiment on the curriculum evaluates: the mixture's and the held-out ones."""
    mix = exp.run.data.curriculum.active_families() if exp.run.data.curriculum else []
    return list(dict.fromkeys(mix + list(exp.settings.heldout_families)))
