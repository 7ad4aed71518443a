"""Typed, validated configuration for every stage of an OPSDL run.

One dataclass per stage, checked in ``__post_init__`` (bad values raise ``ConfigError``
naming the field and what was expected), composed into ``RunConfig``, loadable from YAML
or a nested dict with unknown keys rejected, and hashed stably so every output can record
the exact configuration that produced it::

    cfg = RunConfig.from_yaml("configs/demo.yaml", overrides={"train": {"steps": 10}})
    cfg.hash()          # 16 hex chars; changes iff a result-affecting field changes
    cfg.to_dict()       # plain JSON-able dict (round-trips through from_dict)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

EMBEDDED_DEFAULT_MODEL = "smollm2-135m-instruct"
# A field with this metadata cannot change what a run computes (where it writes, how many threads,
# how often it logs or saves, engine memory); ``RunConfig.hash`` leaves it out. The one rule of the hash.
NOT_HASHED = types.MappingProxyType({"hash": False})
# Bumped when that rule changes: every run's hash changes with it (a run folder of an earlier schema
# is not resumed; an experiment retrains it).
HASH_SCHEMA = 2

LOSS_KINDS = ("pointwise", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl")
# controls of the distillation signal (``loss.control``): where does a gain come from?
#   none                the method: the teacher reads C_s + Q
#   long_prompt         no information: the teacher reads the student's long prompt (C_L + Q)
#   other_context       wrong information: the teacher reads ANOTHER training example's C_s + this Q
#   constant_advantage  no teacher: A_t = -loss.control_advantage on every sampled token (pointwise)
CONTROL_KINDS = ("none", "long_prompt", "other_context", "constant_advantage")
TEACHER_KINDS = ("live", "base", "ema")
TEACHER_CONTEXT_STRATEGIES = ("oracle", "window", "bm25")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, field_name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: expected {expected}, got {got!r}")


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    name: str = EMBEDDED_DEFAULT_MODEL  # embedded default, a local folder, or a hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # never on unless the user opts in
    # "sdpa": torch SDPA, grouped-query attention without copying K/V (opsdl_core.models.attention);
    # "sdpa_stock": transformers' own SDPA function; or any name transformers accepts ("eager", ...)
    attn_implementation: str = "sdpa"
    cache_dir: Optional[str] = field(default=None, metadata=NOT_HASHED)  # where the embedded default is converted; default ~/.cache/opsdl

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "a model name, folder or hub id", self.name)


CURRICULUM_FAMILIES = ("kv_lookup", "record_lookup", "prose_attribute", "event_date", "multi_hop", "comparison",
                       "counting")  # opsdl_core.data.tasks.curriculum.FAMILIES (kept in step by a test)
HAYSTACK_KINDS = ("noise", "prose", "records")


@dataclass
class CurriculumConfig:
    """The built-in curriculum (``data.source: curriculum``; ``opsdl_core.data.tasks.curriculum``)."""

    # the mixture: family -> weight (examples split by largest remainder); default: all, equal
    families: dict[str, float] = field(default_factory=lambda: {f: 1.0 for f in CURRICULUM_FAMILIES})
    haystacks: dict[str, float] = field(default_factory=lambda: {"noise": 1.0, "prose": 1.0, "records": 1.0})
    lengths: Optional[list[int]] = None  # context lengths (equal shares per family); default [data.context_tokens]
    # ascending: short contexts first (with train.prompt_order: sequential, trained in that order)
    length_order: Literal["mixed", "ascending"] = "mixed"
    prose: str = "python-reference"  # natural-prose haystack: built in, or "folder:<path>" of .txt files
    # distractor facts per training example, [min, max]; default data.n_distractors (which the
    # evaluation suites keep): fewer makes easier training prompts, whose rollouts are right more often
    distractors: Optional[list[int]] = None

    def __post_init__(self) -> None:
        _check(self.distractors is None or (len(self.distractors) == 2 and 0 <= self.distractors[0]
                                            <= self.distractors[1]),
               "data.curriculum.distractors", "null or [min, max] with 0 <= min <= max", self.distractors)
        for name, weights, known in (("families", self.families, CURRICULUM_FAMILIES),
                                     ("haystacks", self.haystacks, HAYSTACK_KINDS)):
            bad = [k for k in weights if k not in known]
            _check(not bad, f"data.curriculum.{name}", f"names among {list(known)}", bad)
            _check(all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0, f"data.curriculum.{name}",
                   "weights >= 0 with a positive sum", weights)
        _check(self.lengths is None or (bool(self.lengths) and all(n >= 64 for n in self.lengths)),
               "data.curriculum.lengths", "null or a non-empty list of token counts >= 64", self.lengths)

    def active_families(self) -> list[str]:
        return [f for f, w in self.families.items() if w > 0]


@dataclass
class DataConfig:
    """Where training and held-out examples come from, and how the teacher context is built."""

    source: str = "synthetic"  # "synthetic" or a path (JSONL / Parquet / datasets folder / folder of files)
    heldout_source: Optional[str] = None  # for file sources: held-out file(s); synthetic uses held-out templates
    train_size: int = 256
    heldout_size: int = 50
    # synthetic only: also evaluate on fresh keys and seeds written with the *training* templates,
    # which separates "learned the skill on these templates" from "transfers to unseen templates"
    in_template_size: int = 0
    # synthetic only: names of the training templates to use (default: all of them); the
    # in-template suite uses the same ones
    templates: Optional[list[str]] = None
    context_tokens: int = 1024  # target length of C_L (synthetic), in the model's tokens
    short_budget_tokens: int = 256  # max tokens of the teacher context C_s
    n_distractors: tuple[int, int] = (4, 12)
    seed: int = 0
    teacher_context: Literal["oracle", "window", "bm25"] = "oracle"
    window_tokens: int = 128
    bm25_chunk_tokens: int = 64
    bm25_top_k: int = 3
    field_map: Optional[dict[str, str]] = None
    curriculum: Optional[CurriculumConfig] = None  # source "curriculum": its mixture (default: every family)

    def __post_init__(self) -> None:
        if isinstance(self.curriculum, dict):
            self.curriculum = _build(CurriculumConfig, self.curriculum, "data.curriculum")
        if self.source == "curriculum" and self.curriculum is None:
            self.curriculum = CurriculumConfig()
        _check(self.train_size > 0, "data.train_size", "a positive integer", self.train_size)
        _check(self.heldout_size >= 0, "data.heldout_size", "an integer >= 0", self.heldout_size)
        _check(self.in_template_size >= 0, "data.in_template_size", "an integer >= 0", self.in_template_size)
        _check(self.context_tokens >= 32, "data.context_tokens", "an integer >= 32", self.context_tokens)
        _check(self.short_budget_tokens > 0, "data.short_budget_tokens", "a positive integer", self.short_budget_tokens)
        lo, hi = self.n_distractors
        _check(0 <= lo <= hi, "data.n_distractors", "[min, max] with 0 <= min <= max", self.n_distractors)
        _check(self.teacher_context in TEACHER_CONTEXT_STRATEGIES, "data.teacher_context",
               f"one of {TEACHER_CONTEXT_STRATEGIES}", self.teacher_context)


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``rollout.backend: vllm``; ``opsdl_core.models.rollout_vllm``)."""

    max_model_len: int = field(default=4096, metadata=NOT_HASHED)  # prompt + answer, in tokens
    dtype: Optional[str] = None  # default: model.dtype (the trainer's, so log-probs match)
    kv_cache_gib: float = field(default=1.0, metadata=NOT_HASHED)  # KV cache size: CPU RAM on the CPU build, per GPU on GPUs; 0: use gpu_memory_utilization
    gpu_memory_utilization: float = field(default=0.3, metadata=NOT_HASHED)  # GPUs only, when kv_cache_gib is 0
    enable_prefix_caching: bool = True
    enforce_eager: bool = True  # no torch.compile / CUDA graphs: starts in seconds
    in_process: bool = field(default=False, metadata=NOT_HASHED)  # the engine in the trainer's process (weights handed over in memory)
    tensor_parallel_size: int = 1
    model_dir: Optional[str] = field(default=None, metadata=NOT_HASHED)  # the folder the engine starts from (default: the model's own folder)
    # tokens one engine step may compute (a prompt is never split over steps); null: max(8192, max_model_len)
    max_num_batched_tokens: Optional[int] = field(default=None, metadata=NOT_HASHED)
    # CPU build: cores the engine's threads use; null: every core this process may run on (vLLM's own
    # default keeps one core per worker for its scheduler). VLLM_CPU_OMP_THREADS_BIND, if set, wins.
    cpu_threads: Optional[int] = field(default=None, metadata=NOT_HASHED)

    def __post_init__(self) -> None:
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= self.max_model_len,
               "rollout.vllm.max_num_batched_tokens", f"null or an integer >= max_model_len ({self.max_model_len}): "
               "a prompt is prefilled in one engine step", self.max_num_batched_tokens)
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "rollout.vllm.cpu_threads", "null or an integer >= 1",
               self.cpu_threads)
        _check(self.max_model_len >= 16, "rollout.vllm.max_model_len", "an integer >= 16", self.max_model_len)
        _check(self.kv_cache_gib >= 0, "rollout.vllm.kv_cache_gib", "a number >= 0", self.kv_cache_gib)
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "a float in (0, 1]",
               self.gpu_memory_utilization)
        _check(self.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "an integer >= 1",
               self.tensor_parallel_size)


@dataclass
class RolloutConfig:
    """On-policy sampling from the current weights."""

    backend: Literal["transformers", "vllm"] = "transformers"
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    # LoRA runs: sample from a separate copy of the model with the adapter merged into its
    # weights, re-synced after every step (decoding without the adapter's extra matmuls is
    # faster); false samples from the trainer's own LoRA model.
    merged_sampler: bool = True
    # Health check of the weight sync: mean |log p_trainer − log p_sampler| over the sampled tokens
    # above this stops the run (stale or corrupted sampler weights); null disables the check.
    max_logprob_diff: Optional[float] = 0.1
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        _check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "an integer >= 1", self.samples_per_prompt)
        _check(self.temperature > 0, "rollout.temperature", "a float > 0 (training samples on-policy)", self.temperature)
        _check(0 < self.top_p <= 1, "rollout.top_p", "a float in (0, 1]", self.top_p)
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", self.max_new_tokens)


@dataclass
class LossConfig:
    """The distillation objective (see ``opsdl_core.train.losses``)."""

    kind: Literal["pointwise", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl"] = "pointwise"
    advantage_clip: Optional[float] = None  # clamp A_t to [-c, c] (pointwise)
    is_ratio_clip: Optional[float] = None  # importance ratio exp(lpS - lp_sampler), truncated here; null: off
    jsd_beta: float = 0.5
    topk: int = 20
    temperature: float = 1.0
    # Retention guard: weight of the same loss on the SHORT prompt (student and teacher both read
    # C_s + Q; the student samples from it). With a base/ema teacher it holds the model's short-context
    # answers at the teacher's; 0 (default) leaves it out.
    short_anchor: float = 0.0
    # a control experiment instead of the method (CONTROL_KINDS above; docs/results/ablation.md)
    control: Literal["none", "long_prompt", "other_context", "constant_advantage"] = "none"
    control_advantage: float = 1.0  # constant_advantage: A_t = -c on every sampled token

    def __post_init__(self) -> None:
        _check(self.kind in LOSS_KINDS, "loss.kind", f"one of {LOSS_KINDS}", self.kind)
        _check(self.control in CONTROL_KINDS, "loss.control", f"one of {CONTROL_KINDS}", self.control)
        _check(self.control_advantage > 0, "loss.control_advantage", "a float > 0", self.control_advantage)
        _check(self.control != "constant_advantage" or self.kind == "pointwise", "loss.control",
               "'constant_advantage' with loss.kind 'pointwise' (the other kinds have no per-token advantage to "
               f"replace; got kind {self.kind!r})", self.control)
        _check(self.advantage_clip is None or self.advantage_clip > 0, "loss.advantage_clip", "null or > 0",
               self.advantage_clip)
        _check(self.is_ratio_clip is None or self.is_ratio_clip >= 1, "loss.is_ratio_clip", "null or >= 1",
               self.is_ratio_clip)
        _check(0 < self.jsd_beta < 1, "loss.jsd_beta", "a float in (0, 1)", self.jsd_beta)
        _check(self.topk >= 1, "loss.topk", "an integer >= 1", self.topk)
        _check(self.temperature > 0, "loss.temperature", "a float > 0", self.temperature)
        _check(self.short_anchor >= 0, "loss.short_anchor", "a float >= 0", self.short_anchor)


@dataclass
class LoRAConfig:
    """LoRA adapters (PEFT); ``enabled: false`` trains all weights."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", "an integer >= 1", self.r)
        _check(0 <= self.dropout < 1, "lora.dropout", "a float in [0, 1)", self.dropout)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "a float > 0", self.lr)
        _check(self.schedule in ("constant", "linear", "cosine"), "optim.schedule",
               "one of ('constant', 'linear', 'cosine')", self.schedule)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)


@dataclass
class TrainConfig:
    """The on-policy loop."""

    run_dir: str = field(default="runs/demo", metadata=NOT_HASHED)
    steps: int = 40  # optimizer steps
    prompts_per_step: int = 1  # prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    teacher: Literal["live", "base", "ema"] = "base"
    ema_decay: float = 0.95
    seed: int = 0
    save_every: int = field(default=10, metadata=NOT_HASHED)
    keep_checkpoints: int = field(default=2, metadata=NOT_HASHED)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_threads: Optional[int] = field(default=None, metadata=NOT_HASHED)  # torch intra-op threads; None: leave torch's default
    log_every: int = field(default=1, metadata=NOT_HASHED)
    # "shuffle": a seeded permutation of the prompts per epoch; "sequential": the data's own order
    # (a length curriculum, data.curriculum.length_order: ascending)
    prompt_order: Literal["shuffle", "sequential"] = "shuffle"

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", "an integer >= 1", self.steps)
        _check(self.prompts_per_step >= 1, "train.prompts_per_step", "an integer >= 1", self.prompts_per_step)
        _check(self.grad_accum >= 1, "train.grad_accum", "an integer >= 1", self.grad_accum)
        _check(self.teacher in TEACHER_KINDS, "train.teacher", f"one of {TEACHER_KINDS}", self.teacher)
        _check(0 < self.ema_decay < 1, "train.ema_decay", "a float in (0, 1)", self.ema_decay)
        _check(self.save_every >= 1, "train.save_every", "an integer >= 1", self.save_every)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "an integer >= 1", self.keep_checkpoints)


@dataclass
class EvalConfig:
    """Greedy accuracy on the held-out split, with the long context and with C_s only."""

    enabled: bool = True
    before: bool = field(default=True, metadata=NOT_HASHED)  # also evaluate the base model before training (skip it to save time)
    max_new_tokens: int = 24
    batch_size: int = field(default=8, metadata=NOT_HASHED)

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        _check(self.batch_size >= 1, "eval.batch_size", "an integer >= 1", self.batch_size)


METHOD_KINDS = ("opsdl", "sft", "dpo")


@dataclass
class MethodConfig:
    """What trains the long-context behaviour: OPSDL (default) or a baseline on the same prompts.

    ``sft``: cross-entropy of a target answer given the long prompt. ``dpo``: DPO in the LongPO form
    (chosen = answer from C_s, rejected = the model's greedy answer from C_L, reference = the
    frozen initial model reading the short prompt). ``target``: the chosen/target answer is the
    initial model's own greedy answer from C_s (``self_short``, label-free) or the data's
    ``answer`` field (``reference``). Targets, pairs and reference log-probs are computed once,
    before the first step, with the initial weights."""

    kind: Literal["opsdl", "sft", "dpo"] = "opsdl"
    target: Literal["self_short", "reference"] = "self_short"
    beta: float = 0.1  # dpo: inverse temperature of the implicit reward
    nll_weight: float = 0.0  # dpo: weight of the chosen answer's per-token NLL (LongPO / RPO)

    def __post_init__(self) -> None:
        _check(self.kind in METHOD_KINDS, "method.kind", f"one of {METHOD_KINDS}", self.kind)
        _check(self.target in ("self_short", "reference"), "method.target", "'self_short' or 'reference'",
               self.target)
        _check(self.beta > 0, "method.beta", "a float > 0", self.beta)
        _check(self.nll_weight >= 0, "method.nll_weight", "a float >= 0", self.nll_weight)


@dataclass
class RunConfig:
    """Everything an OPSDL training run needs; the file given to ``python -m opsdl_core.train``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        if self.loss.control != "none" and self.method.kind != "opsdl":
            raise ConfigError(f"loss.control: {self.loss.control!r} is a control of OPSDL's teacher signal; "
                              f"method.kind {self.method.kind!r} has no teacher (use control 'none')")
        if self.loss.short_anchor > 0 and self.train.teacher == "live":
            raise ConfigError("loss.short_anchor: the retention guard needs train.teacher 'base' or 'ema' (with a "
                              "live teacher the student and the teacher are the same model on the same short "
                              f"prompt, so the term is zero); got short_anchor={self.loss.short_anchor} with "
                              "teacher 'live'")

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> "RunConfig":
        merged = _deep_merge(data or {}, overrides or {})
        return _build(cls, merged, "")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "RunConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
        return cls.from_dict(data, overrides)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def hash(self) -> str:
        """Stable 16-hex digest of the fields that can change what a run computes (every field but
        those marked ``NOT_HASHED``), with the hash schema, as sorted-key canonical JSON."""
        d = {"hash_schema": HASH_SCHEMA, **_hashed_fields(self)}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hashed_fields(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _hashed_fields(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("hash", True)}
    if isinstance(obj, (list, tuple)):
        return [_hashed_fields(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _hashed_fields(v) for k, v in obj.items()}
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "loss.kind=jsd"]`` -> nested dict; values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected SECTION.FIELD=VALUE")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls: type, data: Any, path: str) -> Any:
    where = path or "config"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {errors}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        seq = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1] if args else Any, v, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value
