"""OPSDLTrainer: the on-policy loop (rollout from the current weights → teacher scores → student update), one
step for OPSDL, Long-SFT and DPO (the process entry: ``job.py``).

One step (per micro-batch of prompts, ``grad_accum`` micro-batches per optimizer step)::

    y ~ π_θ(· | x_L)                         rollout engine, current weights, seeded per step
    lpT = log π_T(y | x_S)                   teacher: same network, teacher weights, no grad
    lpS = log π_θ(y | x_L)                   student, with grad; logits only at response positions
    loss = compute_loss(kind, ...)            pointwise reverse KL by default (losses.py)
    backward; clip; AdamW step; schedule; EMA teacher update; engine.update_weights(step)

With ``loss.short_anchor = w > 0`` (the retention guard) the step also samples from x_S and adds
``w * compute_loss(kind, ...)`` with student AND teacher on x_S: the short-context answers are held at
the (base or EMA) teacher's while the long-context ones move.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import RunConfig
from ..data.prepare import Prepared, PreparedData, step_prompts
from ..data.prompts import pad_token_id, stop_token_ids
from ..models import checkpointing
from ..models.rollout import RolloutEngine, SamplingParams, TransformersRollout, merge_lora_into, sampler_weights
from ..models.scoring import prefill, score_responses
from ..run_dir import RunDir
from . import checkpoint as ckpt
from . import sharding
from .baselines import baseline_loss, load_or_build_baseline_data
from .final import write_final
from .lora import apply_lora, lr_lambda
from .losses import compute_loss, needs_full_logits
from .records import BaselineBatch, Distilled, LossTerm, TrainResult
from .step_log import NonFiniteGuard, add_metrics, format_step, hash_seed, micro_metrics, pad_like
from .teacher import TeacherWeights, check_teacher_sharding


class OPSDLTrainer:
    """OPSDL, Long-SFT and DPO on one loop: ``setup()`` (named ``_setup_*`` steps) → ``train()`` (one
    ``train_step`` for every method) → ``save_final()``.

    Features: LoRA or full fine-tuning; the live, frozen-base or EMA teacher (``teacher.TeacherWeights``);
    every loss kind of ``losses.compute_loss`` and the retention guard; the transformers or vLLM rollout with
    the sampler/trainer log-prob check; the prompt encoded once per step where that is exact; the
    token-level mean over the global batch (micro-batches and processes); exact resume from verified
    checkpoints; non-finite steps skipped.

    Raises: ``RuntimeError`` when a checkpoint was written by another config or the sampler's log-probs
    differ from the trainer's by more than ``rollout.max_logprob_diff``; ``FloatingPointError`` after
    ``train.max_nonfinite_steps`` non-finite steps in a row.
    """

    def __init__(self, cfg: RunConfig, model: Any, tokenizer: Any, data: PreparedData, *,
                 rollout: RolloutEngine | None = None, log: Callable[[str], None] = print,
                 lineage: dict[str, Any] | None = None, model_dir: str | None = None):
        self.cfg, self.tokenizer, self.data, self.log = cfg, tokenizer, data, log
        self.base_model = model
        self.model_dir = model_dir  # the model's folder, where the vLLM engine starts from
        self.rollout = rollout
        self.lineage = dict(lineage or {})
        self.run_dir = Path(cfg.train.run_dir)
        self.files = RunDir(self.run_dir)
        self.metrics: list[dict[str, Any]] = []
        self.step, self.resumed_from = 0, None
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)

    # -- setup ---------------------------------------------------------------------------
    def setup(self, *, resume: bool = True) -> "OPSDLTrainer":
        """Named steps, in order: the device and seeds; the sampler's copy of the weights (before LoRA
        wraps the model); the model, optimizer and schedule; the teacher; the rollout engine; the run
        folder; the baselines' data; then resume from the newest good checkpoint (``resume=False``: start
        at step 0) and trim the run folder to that step's state."""
        self._setup_accelerator()
        engine_dir, sampler_model = self._setup_sampler_weights()
        params = self._setup_model_and_optimizer()
        self._setup_teacher()
        self._setup_rollout(engine_dir, sampler_model)
        self.log(f"[opsdl] trainable parameters: {sum(p.numel() for p in params):,} "
                 f"({'LoRA r=%d' % self.cfg.lora.r if self.cfg.lora.enabled else 'full'}); "
                 f"teacher={self.cfg.train.teacher}; loss={self.cfg.loss.kind}; config {self.cfg.hash()}; "
                 f"{self.accelerator.num_processes} process(es), {self.accelerator.distributed_type.value}")
        self._setup_run_dir()
        self._setup_baseline_data()
        self._resume(resume)
        return self

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                                       gradient_accumulation_steps=cfg.train.grad_accum)
        kind = str(self.accelerator.distributed_type).split(".")[-1]
        asked = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"]
        if asked and kind not in asked:  # accelerate has neither on CPU processes: it runs DDP instead
            self._warn(f"the launch asked for {asked[0]} but accelerate runs {kind} here (no GPU: accelerate shards "
                       "nothing on CPU processes); every process holds all the weights")
        # before any weight is touched: a teacher or a checkpointing that cannot work on sharded weights is refused
        check_teacher_sharding(cfg.train.teacher, lora=cfg.lora.enabled, distributed_type=kind)
        sharding.check_fsdp_plugin(getattr(self.accelerator.state, "fsdp_plugin", None) if kind == "FSDP" else None)
        torch.manual_seed(cfg.train.seed)

    def _setup_sampler_weights(self) -> tuple[Any, Any]:
        """Before LoRA wraps the model: the folder a vLLM engine starts from (the plain weights), or a
        LoRA-free copy for the transformers sampler, synced each step (``rollout.merged_sampler``)."""
        cfg, engine_dir, sampler_model = self.cfg, None, None
        self._use_vllm = self.rollout is None and cfg.rollout.backend == "vllm"
        if self._use_vllm:
            from ..models.rollout_vllm import engine_model_dir

            engine_dir = engine_model_dir(cfg, self.base_model, self.tokenizer, self.model_dir, self.run_dir)
        merged = cfg.rollout.merged_sampler_on(self.accelerator.device.type)
        if self.rollout is None and not self._use_vllm and cfg.lora.enabled and merged:
            sampler_model = copy.deepcopy(self.base_model).eval().requires_grad_(False)
        return engine_dir, sampler_model

    def _setup_model_and_optimizer(self) -> list[torch.nn.Parameter]:
        cfg = self.cfg
        if cfg.train.gradient_checkpointing:  # before LoRA wraps it (the sampler copy is made before: eval only)
            checkpointing.enable(self.base_model)
        model = apply_lora(self.base_model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      weight_decay=cfg.optim.weight_decay)
        # the schedule is not prepared: accelerate steps a prepared one once per process (N x too fast under
        # N ranks); this one steps once per optimizer step (``_optimizer_step``), whatever the process count
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.pad_id = pad_token_id(self.tokenizer)
        return params

    def _setup_teacher(self) -> None:
        cfg = self.cfg
        self.teacher = TeacherWeights(self.unwrapped, cfg.train.teacher, lora=cfg.lora.enabled,
                                      ema_decay=cfg.train.ema_decay)
        if cfg.loss.control == "other_context":
            from ..data.prepare import other_context_prompts

            self._other_context_ids = other_context_prompts(self.data.train, self.tokenizer)

    def _setup_rollout(self, engine_dir: Any, sampler_model: Any) -> None:
        cfg = self.cfg
        ours = self.rollout is None  # not an engine the caller passed in
        if sampler_model is not None:  # where the trained model went (the GPU), or it samples on the CPU
            sampler_model.to(self.accelerator.device)
        # an engine with its own copy of the weights gets all of them, or (sync 'lora') the adapter only
        self._full_sync = self._use_vllm and cfg.rollout.vllm.sync == "weights"
        if self._use_vllm:
            from ..models.rollout_vllm import VLLMRollout

            self.rollout = VLLMRollout(engine_dir, cfg.rollout.vllm, dtype=cfg.model.dtype, seed=cfg.train.seed,
                                       log=self.log, lora_rank=cfg.lora.r if cfg.lora.enabled else None)
            self.sync_weights()  # the engine starts from the trainer's weights, whatever the folder held
        if self.rollout is None:
            self.rollout = TransformersRollout(sampler_model if sampler_model is not None else self.unwrapped,
                                               pad_id=self.pad_id, decode_threads=cfg.rollout.decode_threads)
        self._merged_sampler = sampler_model is not None
        self._shared_prefill = bool(
            cfg.rollout.shared_prefill and ours and not self._use_vllm and cfg.train.grad_accum == 1
            and cfg.train.mixed_precision == "no" and self.accelerator.num_processes == 1
            and (not cfg.lora.enabled or cfg.lora.dropout == 0)
            and not getattr(self.unwrapped.config, "attention_dropout", 0.0))
        self.sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       max_new_tokens=cfg.rollout.max_new_tokens,
                                       stop_token_ids=stop_token_ids(self.tokenizer, self.unwrapped.config))

    def _setup_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            self.cfg.to_yaml(self.files.config)
            ckpt.atomic_write_text(self.files.info, json.dumps(
                {"config_hash": self.cfg.hash(), "data_digest": self.data.digest, **self.lineage}, indent=1,
                sort_keys=True))
        self.accelerator.wait_for_everyone()

    def _setup_baseline_data(self) -> None:
        """Long-SFT / DPO: targets and pairs from the initial weights, before any resume."""
        cfg = self.cfg
        self.baseline: dict[int, dict[str, Any]] | None = None
        if cfg.method.kind == "opsdl":
            return
        t = time.perf_counter()
        self.baseline = load_or_build_baseline_data(
            cfg, self.run_dir, model=self.unwrapped, tokenizer=self.tokenizer, data=self.data,
            rollout=self.rollout, sampling=self.sampling, pad_id=self.pad_id,
            processes=self.accelerator.num_processes)
        right = [r["target_correct"] for r in self.baseline.values() if "target_correct" in r]
        self.log(f"[opsdl] {cfg.method.kind} data: {len(self.baseline)} prompts, targets right "
                 f"{sum(right)}/{len(right)} ({time.perf_counter() - t:.1f}s)")

    def _resume(self, resume: bool) -> None:
        """Restore the newest checkpoint that verifies (damaged newer ones are skipped, each with a
        warning), or stay at step 0; then the run folder keeps that step's state and nothing later
        (``checkpoint.trim_run_dir``: metrics of lost steps, later checkpoints, a stale log)."""
        found = ckpt.newest_good_checkpoint(self.run_dir, warn=self._warn) if resume else None
        if found is not None:
            self._restore(found)
        if self.accelerator.is_main_process:
            ckpt.trim_run_dir(self.run_dir, self.step, log=self.log, warn=self._warn,
                              verified=found.path if found else None)
        self.accelerator.wait_for_everyone()
        self.metrics = self.files.metric_records()

    def _restore(self, found: ckpt.Checkpoint) -> None:
        state = found.state
        if state.get("config_hash") != self.cfg.hash():
            raise RuntimeError(f"{found.path} was written by config {state.get('config_hash')}, this run's config is "
                               f"{self.cfg.hash()}: use a new train.run_dir or the same config")
        ckpt.restore(found, model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler)
        self.teacher.load_state_dict(found.teacher)  # an EMA or frozen copy must be there; none otherwise
        self.step = self.resumed_from = found.step
        self.nonfinite.load(state)
        self.sync_weights()
        self.log(f"[opsdl] resumed from {found.path} (step {self.step})")

    def _warn(self, message: str) -> None:
        """A warning in the trainer's log and as a Python warning (``TrainingWarning``)."""
        self.log(f"[opsdl] WARNING: {message}")
        warnings.warn(message, ckpt.TrainingWarning, stacklevel=2)

    # -- the loop ------------------------------------------------------------------------
    def train(self, *, stop_after: int | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Run until ``train.steps`` (or ``stop_after`` steps total, to simulate an interruption).
        ``on_step(metrics)`` is called after every step (e.g. to stream metrics to an orchestrator)."""
        t0 = time.perf_counter()
        last = self.cfg.train.steps if stop_after is None else min(stop_after, self.cfg.train.steps)
        while self.step < last:
            m = self.train_step()
            self.metrics.append(m)
            if self.accelerator.is_main_process:
                ckpt.append_jsonl(self.files.metrics, m)
            if self.step % self.cfg.train.log_every == 0 or self.step == last or m["skipped_nonfinite"]:
                self.log(format_step(m, self.cfg.train.steps))
            if on_step is not None:
                on_step(m)
            self.nonfinite.check(self.step)
            if self.step % self.cfg.train.save_every == 0 or self.step == self.cfg.train.steps:
                self.save_checkpoint()
        return TrainResult(self.step, self.resumed_from, self.metrics, time.perf_counter() - t0)

    def _batch_indices(self, micro: int) -> list[int]:
        """This process's prompts for ``micro`` (``step_prompts``: one process is rank 0 of 1)."""
        return step_prompts(len(self.data.train), self.cfg.train, step=self.step, micro=micro,
                            ranks=self.accelerator.num_processes, rank=self.accelerator.process_index)

    def _teacher_prompts(self, micro: int) -> list[list[int]]:
        """The teacher's prompts for this micro-batch: chat(C_s ⊕ Q), or a control's (``loss.control``):
        the student's own long prompt, or another example's C_s with this question."""
        idx, control = self._batch_indices(micro), self.cfg.loss.control
        if control == "long_prompt":
            return [self.data.train[i].student_ids for i in idx]
        if control == "other_context":
            return [self._other_context_ids[i] for i in idx]
        return [self.data.train[i].teacher_ids for i in idx]

    def _optimizer_step(self, sums: dict[str, float], timings: dict[str, float], finite_loss: bool) -> None:
        """Clip and step AdamW and the schedule (accelerate makes AdamW's step a no-op until the step's last
        micro-batch; the schedule steps there only). There, a non-finite loss (``finite_loss``: every micro-batch's so far) or gradient
        norm skips the update: the gradients are dropped and the weights and AdamW's state stay as they
        were, while the schedule, the step counter, the prompt order and the EMA advance as in any step
        (a skipped step is a step with a zero update: a resumed run takes the same path)."""
        acc, t = self.accelerator, time.perf_counter()
        update = True
        if acc.sync_gradients:
            # the norm of every step (no clipping: max_norm inf leaves the gradients as they are)
            norm = sharding.grad_norm_value(acc.clip_grad_norm_(self.model.parameters(),
                                                                self.cfg.optim.max_grad_norm or math.inf))
            sums["grad_norm"] = norm
            # fp16: the GradScaler skips an overflowing update itself (and lowers its scale): only the loss counts
            update = finite_loss and (math.isfinite(norm) or acc.scaler is not None)
            sums["skipped_nonfinite"] = float(not update)
        if update or acc.scaler is not None:  # the scaler must see the step to skip it
            self.optimizer.step()
        if acc.sync_gradients:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        timings["optim_s"] += time.perf_counter() - t

    def _finish_step(self, sums: dict[str, float], timings: dict[str, float], t_step: float) -> dict[str, Any]:
        skipped = bool(sums.pop("skipped_nonfinite", 0.0))
        self.nonfinite.record(skipped)
        t = time.perf_counter()
        self.teacher.update()
        self.step += 1
        self.sync_weights()
        timings["sync_s"] += time.perf_counter() - t
        timings["step_s"] = time.perf_counter() - t_step
        n = self.cfg.train.grad_accum
        m = {k: (v / n if k not in ("grad_norm", "tokens", "samples") else v) for k, v in sums.items()}
        m.update(step=self.step, lr=self.scheduler.get_last_lr()[0], weight_version=self.rollout.weight_version,
                 prompts_seen=self.step * n * self.cfg.train.prompts_per_step * self.accelerator.num_processes,
                 skipped_nonfinite=int(skipped), nonfinite_steps=self.nonfinite.total,
                 **{k: round(v, 4) for k, v in timings.items()})
        if skipped:
            self._warn(f"step {self.step}: non-finite loss or gradient norm (loss {m.get('loss')}, grad norm "
                       f"{m.get('grad_norm')}): update skipped ({self.nonfinite.run} in a row, "
                       f"train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps})")
        return m

    def train_step(self) -> dict[str, Any]:
        """One optimizer step, the same loop for every method. First every micro-batch's inputs
        (``_micro_batch``: OPSDL's samples and their teacher scores, the weights unchanged within the step;
        Long-SFT's and DPO's stored targets), then per micro-batch its loss terms (``_loss_terms``), each
        backward weighted by the micro-batch's share of the term's total over the step and over every
        process (response tokens for OPSDL, its retention guard and Long-SFT: the token-level mean of the
        global batch, however it is split into micro-batches and ranks; pairs for DPO), then clip, AdamW
        and the schedule, and the step's metrics."""
        cfg, acc = self.cfg, self.accelerator
        timings = dict(generate_s=0.0, teacher_s=0.0, student_s=0.0, optim_s=0.0, sync_s=0.0)
        sums: dict[str, float] = {}
        t_step = time.perf_counter()
        parts = [self._micro_batch(micro, timings) for micro in range(cfg.train.grad_accum)]
        totals = self._global_sizes(parts)
        finite = True
        for part in parts:
            self.model.train()
            with acc.accumulate(self.model):  # accelerate divides each backward by grad_accum: undone here
                for term in self._loss_terms(part, timings):
                    t = time.perf_counter()
                    share = term.size * cfg.train.grad_accum * acc.num_processes / totals[term.name]
                    acc.backward(term.loss * share if term.weight == 1.0 else term.weight * term.loss * share)
                    timings["student_s"] += time.perf_counter() - t
                    finite = finite and math.isfinite(float(term.loss.detach()))
                self._optimizer_step(sums, timings, finite)
            add_metrics(sums, part.metrics)
        return self._finish_step(sums, timings, t_step)

    def _global_sizes(self, parts: list[Any]) -> dict[str, int]:
        """Each loss term's size summed over the step's micro-batches and over every process."""
        totals: dict[str, int] = {}
        for part in parts:
            for name, size in part.sizes().items():
                totals[name] = totals.get(name, 0) + size
        if self.accelerator.num_processes > 1:
            names = sorted(totals)
            summed = self.accelerator.reduce(torch.tensor([totals[n] for n in names], dtype=torch.long,
                                                          device=self.accelerator.device), reduction="sum")
            totals = {n: int(v) for n, v in zip(names, summed.tolist())}
        return totals

    def _micro_batch(self, micro: int, timings: dict[str, float]) -> Distilled | BaselineBatch:
        """A micro-batch's inputs. OPSDL: its samples from the student's prompts and the teacher's scores
        of them (and, with the retention guard, the same on the short prompts); Long-SFT / DPO: the prompts'
        targets (and rejected answers) built from the initial weights in ``setup``."""
        cfg, idx = self.cfg, self._batch_indices(micro)
        batch = [self.data.train[i] for i in idx]
        if cfg.method.kind != "opsdl":
            return BaselineBatch(batch=batch, rows=[self.baseline[i] for i in idx], kind=cfg.method.kind)
        # the micro-batch's place in the global step (micro-batch, then rank): its samples are the same
        # however the step's prompts are split over micro-batches and processes
        where = micro * self.accelerator.num_processes + self.accelerator.process_index
        part = self._sample([p.student_ids for p in batch], self._teacher_prompts(micro),
                            hash_seed(cfg.train.seed, self.step, where), timings, batch=batch,
                            shared_prefill=self._shared_prefill)
        if cfg.loss.short_anchor > 0:  # retention guard: the same loss on the short prompt, own samples
            short = [p.teacher_ids for p in batch]
            part.anchor = self._sample(short, short, hash_seed(cfg.train.seed, self.step, where, "short"),
                                       timings, batch=batch)
        return part

    def _loss_terms(self, part: Distilled | BaselineBatch, timings: dict[str, float]) -> Iterator[LossTerm]:
        """The micro-batch's loss terms, each computed only after the previous one's backward (its graph is
        freed first); ``part.metrics`` is set once the last is done."""
        cfg = self.cfg
        if isinstance(part, BaselineBatch):
            yield self._baseline_loss(part, timings)
            return
        self._student_loss(part, timings, control=cfg.loss.control)
        yield LossTerm("distill", part.loss.loss, part.n_tokens)
        extra = {}
        if part.anchor:
            self._student_loss(part.anchor, timings)
            yield LossTerm("short_anchor", part.anchor.loss.loss, part.anchor.n_tokens, weight=cfg.loss.short_anchor)
            extra["short_anchor_loss"] = float(part.anchor.loss.loss.detach())
        part.metrics = {**micro_metrics(part, self.tokenizer, step=self.step,
                                        max_logprob_diff=cfg.rollout.max_logprob_diff), **extra}

    def _baseline_loss(self, part: BaselineBatch, timings: dict[str, float]) -> LossTerm:
        t = time.perf_counter()
        term = baseline_loss(self.model, part, self.cfg.method, pad_id=self.pad_id, autocast=self.accelerator.autocast)
        timings["student_s"] += time.perf_counter() - t
        return term

    def _sample(self, student_prompts: list[list[int]], teacher_prompts: list[list[int]], seed: int,
                timings: dict[str, float], *, batch: list[Prepared], shared_prefill: bool = False) -> "Distilled":
        """Sample from the student's prompts with the current weights and score the same token ids
        under the teacher's prompts (teacher weights, eval mode, no grad). ``shared_prefill``: the student
        encodes its prompts here, with gradient; the rollout decodes from that prefill and the student's
        scoring runs on it (``rollout.shared_prefill``)."""
        cfg = self.cfg
        t = time.perf_counter()
        n, pre = cfg.rollout.samples_per_prompt, None
        if shared_prefill:  # only our own TransformersRollout takes a prefill
            self.model.train()
            with self.accelerator.autocast():
                pre = prefill(self.model, student_prompts, pad_id=self.pad_id)
            ro = self.rollout.generate(student_prompts, n=n, params=self.sampling, seed=seed, prefilled=pre)
        else:
            ro = self.rollout.generate(student_prompts, n=n, params=self.sampling, seed=seed)
        timings["generate_s"] += time.perf_counter() - t
        t = time.perf_counter()
        with self.teacher.scoring():
            tch = score_responses(self.unwrapped, prompts=teacher_prompts, responses=ro.response_ids,
                                  prompt_index=ro.prompt_index, pad_id=self.pad_id,
                                  return_logits=needs_full_logits(cfg.loss.kind), temperature=cfg.loss.temperature)
        timings["teacher_s"] += time.perf_counter() - t
        return Distilled(batch=batch, student_prompts=student_prompts, rollout=ro, teacher=tch, prefilled=pre)

    def _student_loss(self, part: "Distilled", timings: dict[str, float], control: str = "none") -> None:
        """The student's scores of ``part``'s samples under its prompt (with grad) and the loss.
        ``control == "constant_advantage"``: the loss sees A_t = -loss.control_advantage at every
        sampled token instead of the teacher's gap (the teacher is still scored: the metrics show the
        real gap)."""
        cfg, ro, tch = self.cfg, part.rollout, part.teacher
        t = time.perf_counter()
        with self.accelerator.autocast():
            stu = score_responses(self.model, prompts=part.student_prompts, responses=ro.response_ids,
                                  prompt_index=ro.prompt_index, pad_id=self.pad_id,
                                  return_logits=needs_full_logits(cfg.loss.kind), temperature=cfg.loss.temperature,
                                  prefilled=part.prefilled)
        part.prefilled = None  # its cache now holds the answers too
        part.sampler_logprobs = pad_like(ro.sampler_logprobs, stu.logprobs)  # [B, R], the student's layout
        teacher_lp = tch.logprobs
        if control == "constant_advantage":  # lpT - lpS = -c exactly, whatever the teacher says
            teacher_lp = stu.logprobs.detach() - cfg.loss.control_advantage
        part.student = stu
        part.loss = compute_loss(cfg.loss.kind, mask=stu.mask, student_logprobs=stu.logprobs,
                                 teacher_logprobs=teacher_lp, student_logits=stu.logits, teacher_logits=tch.logits,
                                 sampler_logprobs=part.sampler_logprobs if cfg.loss.is_ratio_clip is not None else None,
                                 advantage_clip=cfg.loss.advantage_clip, is_ratio_clip=cfg.loss.is_ratio_clip,
                                 jsd_beta=cfg.loss.jsd_beta, topk=cfg.loss.topk)
        timings["student_s"] += time.perf_counter() - t

    def sync_weights(self) -> None:
        """Hand the rollout engine the weights of the current step (and bump its version)."""
        state = None
        if self._use_vllm and not self._full_sync:
            return self.rollout.push_adapter(self.step, self.unwrapped)
        with sharding.full_weights(self.model):  # every rank, whole tensors (FSDP); as they are otherwise
            if self._full_sync:
                state = sampler_weights(self.unwrapped)
            elif self._merged_sampler:  # the sampler is our own plain copy: merged straight into its weights
                merge_lora_into(self.unwrapped, self.rollout.model)
        self.rollout.update_weights(self.step, state)

    # -- saving --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        t = time.perf_counter()
        self.accelerator.wait_for_everyone()
        path = None
        weights = sharding.trainable_state(self.model)  # gathered by every rank under FSDP
        optimizer_state = sharding.optimizer_state(self.model, self.optimizer)
        if self.accelerator.is_main_process:
            path = ckpt.save_checkpoint(self.run_dir, self.step, weights=weights, optimizer_state=optimizer_state,
                                        scheduler=self.scheduler, teacher_state=self.teacher.state_dict(),
                                        keep=self.cfg.train.keep_checkpoints,
                                        state={"config_hash": self.cfg.hash(), "cursor": self.step *
                                               self.cfg.train.grad_accum * self.cfg.train.prompts_per_step,
                                               **self.nonfinite.state()})
            self.log(f"[opsdl] checkpoint {path.name} ({time.perf_counter() - t:.1f}s)")
        return path

    def save_final(self, *, merged: bool = True) -> Path:
        """Write ``run_dir/final``: the adapter (LoRA) and a merged, standard transformers folder (built in
        ``.tmp-final``, then renamed; refused if a weight is not finite). Under several processes the main
        one writes it while the others wait; sharded weights (FSDP) are gathered by every rank first, and
        the merge is then written to the files only (the model keeps its adapter)."""
        adapter_state = model_state = None
        if sharding.is_sharded(self.model):  # every rank gathers; the main one writes the whole tensors
            adapter_state = sharding.full_state(self.model)
            with sharding.full_weights(self.model):  # the gather is collective, the copy the writer's own
                model_state = sharding.cpu_copy(sampler_weights(self.unwrapped)) if self.accelerator.is_main_process \
                    else None
        ckpt.refuse_nonfinite(f"final model at step {self.step}",
                              trainable=sharding.trainable_state(self.model, adapter_state))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.unwrapped = write_final(self.run_dir, self.unwrapped, self.tokenizer, merged=merged,
                                         lora=self.cfg.lora.enabled, adapter_state=adapter_state,
                                         model_state=model_state, lineage={
                                             "config_hash": self.cfg.hash(), "data_digest": self.data.digest,
                                             "steps": self.step, **self.lineage})
        self.accelerator.wait_for_everyone()
        return self.files.final
