"""Benchmark one on-policy self-distillation step: opsdl's trainer against TRL's ``SDFTTrainer`` on the
same batch, in fresh processes, interleaved (opsdl, TRL, opsdl, TRL, ...).

    .venv/bin/pip install -c constraints.txt "trl==1.16.0"      # optional: only this benchmark uses TRL
    .venv/bin/python benchmarks/bench_vs_trl.py                  # the main job's shape, 2 rounds of 4 steps

The shape is the main job's: the embedded SmolLM2-135M-Instruct, LoRA r=16 (alpha 32, all linear
layers), 1 prompt x 4 samples at temperature 0.7, ~1,075-token long prompt (access-code needle
among distractor records), <= 24 new tokens, frozen-base teacher reading chat(C_s + Q), the
sampled-token (point-wise reverse-KL) loss, float32, lr 1e-4. TRL's model loads with transformers'
own SDPA attention and ``nn.Linear`` layers, as its users get it (``--trl-attention opsdl`` gives it opsdl's GQA
function and oneDNN linear layers). TRL is set to the same: its defaults
``bf16=True``, ``gradient_checkpointing=True`` and ``max_prompt_length=512`` (which keeps only the
*last* 512 prompt tokens, i.e. cuts the long context) are overridden, and its teacher prompt, which
by its template must contain the student prompt (``{prompt}``), is replaced by a small builder that
gives the teacher chat(C_s + Q) exactly as opsdl does. Each process runs ``--steps`` steps; the first
is a warm-up and the rest are averaged. Printed per phase: seconds (median over rounds), opsdl / TRL,
and the process's peak resident memory (model loading included, the same for both), and the FLOPs
of the step's forward and backward passes against the fp32 matmul peak measured in each process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

PHASES = ("generate_s", "teacher_s", "student_s", "step_s")


def _data(args, tok):
    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data

    cfg = RunConfig.from_dict({"model": {"name": args.model}, "data": {
        "train_size": 16, "heldout_size": 0, "context_tokens": args.context_tokens, "templates": ["access_code"],
        "seed": 5}})
    return cfg, prepare_data(cfg.data, tok)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def child_opsdl(args) -> dict:
    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.models.load import load_model_and_tokenizer
    from opsdl_core.train.recipe import OPSDLTrainer

    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model, cpu_linear=args.linear == "onednn")
    base, data = _data(args, tok)
    with tempfile.TemporaryDirectory() as d:
        merged = {"yes": True, "no": False}.get(args.merged_sampler)  # auto: None, the project's default
        cfg = RunConfig.from_dict({**base.to_dict(),
                                   "rollout": {"samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens,
                                               "temperature": 0.7, "merged_sampler": merged},
                                   "optim": {"lr": 1e-4},
                                   "train": {"run_dir": d, "steps": args.steps, "save_every": 10_000, "teacher": "base",
                                             "seed": 0, "num_threads": args.threads,
                                             "mixed_precision": args.mixed_precision}})
        tr = OPSDLTrainer(cfg, model, tok, data, log=lambda s: None).setup(resume=False)
        ms = [tr.train_step() for _ in range(args.steps)][1:]
    out = {k: statistics.mean(m[k] for m in ms) for k in ("generate_s", "teacher_s", "student_s", "optim_s", "step_s")}
    out["student_s"] += out.pop("optim_s")  # forward + backward + optimizer, as TRL's is measured
    out["response_len"] = statistics.mean(m["response_len"] for m in ms)
    return out


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    from trl.experimental.sdft import sdft_trainer as sdft_module

    from opsdl_core.data.prompts import user_message
    from opsdl_core.models.load import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    # TRL as its users run it: transformers' own SDPA and nn.Linear (--trl-attention opsdl gives it opsdl's GQA
    # function and oneDNN linear layers)
    ours = args.trl_attention == "opsdl"
    model, tok = load_model_and_tokenizer(args.model, attn_implementation="sdpa" if ours else "sdpa_stock",
                                          cpu_linear=ours)
    _, data = _data(args, tok)
    rows = [{"prompt": [{"role": "user", "content": user_message(p.example.long_context, p.example.question)}],
             "privileged_context": user_message(p.teacher_context.text, p.example.question)} for p in data.train]
    # the teacher reads chat(C_s + Q), as opsdl's: TRL's template must contain the student prompt
    check = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(check["input_ids"]) == list(data.train[0].student_ids), "the student prompt differs from opsdl's"

    class ShortContextTeacher(sdft_module.DemonstrationTeacherContextBuilder):
        def _compose_teacher_prompt(self, prompt, privileged_context):
            return [{"role": "user", "content": privileged_context}]

    timings = {k: 0.0 for k in ("generate_s", "teacher_s", "student_fwd_s")}
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            for key in timings:
                timings[key] = 0.0
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append({**timings, "step_s": time.perf_counter() - self.t})

    with tempfile.TemporaryDirectory() as d:
        cfg = SDFTConfig(output_dir=d, per_device_train_batch_size=args.samples, num_generations=args.samples,
                         max_completion_length=args.new_tokens, temperature=0.7, top_p=1.0, top_k=0,
                         distillation_mode="sampled_token", distillation_alpha=1.0, distillation_is_clip=None,
                         teacher_model_kind="base", learning_rate=1e-4, lr_scheduler_type="constant",
                         max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
                         gradient_checkpointing=False, max_prompt_length=None, use_cpu=True, seed=0,
                         shuffle_dataset=False, dataloader_num_workers=0, disable_dropout=True)
        trainer = SDFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"),
                              callbacks=[Clock()])
        trainer.teacher_context_builder = ShortContextTeacher(trainer)
        gen, fwd = trainer._generate, trainer._forward_logits

        def timed_generate(*a, **k):
            t = time.perf_counter()
            try:
                return gen(*a, **k)
            finally:
                timings["generate_s"] += time.perf_counter() - t

        def timed_forward(*a, **k):
            t = time.perf_counter()
            try:
                return fwd(*a, **k)
            finally:
                timings["teacher_s" if not torch.is_grad_enabled() else "student_fwd_s"] += time.perf_counter() - t

        trainer._generate, trainer._forward_logits = timed_generate, timed_forward
        trainer.train()
    ms = steps[1:]
    out = {k: statistics.mean(m[k] for m in ms) for k in ("generate_s", "teacher_s", "step_s")}
    out["student_s"] = out["step_s"] - out["generate_s"] - out["teacher_s"]  # forward + backward + optimizer
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4, help="steps per process; the first is a warm-up")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-attention", choices=["stock", "opsdl"], default="stock",
                    help="TRL's model attention: transformers' SDPA (stock) or opsdl_core.models.attention's")
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                    help="opsdl's train.mixed_precision (TRL stays in float32)")
    ap.add_argument("--linear", choices=["onednn", "blas"], default="onednn",
                    help="opsdl's linear layers: oneDNN (the default) or F.linear (the BLAS: MKL on x86)")
    ap.add_argument("--merged-sampler", choices=["auto", "yes", "no"], default="auto",
                    help="opsdl's rollout.merged_sampler (auto: the project's default, null: off on a CPU)")
    ap.add_argument("--contenders", nargs="+", choices=["opsdl", "trl"], default=["opsdl", "trl"])
    ap.add_argument("--child", choices=["opsdl", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child_opsdl(args) if args.child == "opsdl" else child_trl(args)
        out["peak_gib"] = _peak_gib()
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    try:
        if "trl" in args.contenders:
            import trl  # noqa: F401
    except ImportError:
        print('TRL is not installed: .venv/bin/pip install -c constraints.txt "trl==1.16.0"', file=sys.stderr)
        return 2
    print(f"model {args.model}; 1 prompt x {args.samples} samples, <= {args.new_tokens} new tokens, ~{args.context_tokens}-"
          f"token context; {args.steps} steps per process (first = warm-up); torch threads {args.threads}; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}; "
          f"opsdl's mixed precision: {args.mixed_precision}, linear layers: {args.linear}, merged sampler: "
          f"{args.merged_sampler}")
    from processes import run_child

    res: dict[str, list[dict]] = {name: [] for name in args.contenders}
    for r in range(args.rounds):
        for name in args.contenders:
            out = run_child(__file__, name, args)
            if out is None:
                return 1
            res[name].append(out)
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in res[name][-1].items()), flush=True)
    med = {n: {k: statistics.median(x[k] for x in xs) for k in (*PHASES, "peak_gib")} for n, xs in res.items()}
    from flops import (attention_flops, attention_rate, distill_step_flops, matmul_peak, read_bandwidth, step_limit_s,
                       weight_bytes)
    from transformers import AutoConfig, AutoTokenizer

    from opsdl_core.models.load import resolve_model

    path = resolve_model(args.model).path
    _, data = _data(args, AutoTokenizer.from_pretrained(path))
    p = data.train[0]
    config = AutoConfig.from_pretrained(path)
    if "opsdl" not in res:
        return 0
    response = statistics.median(x["response_len"] for x in res["opsdl"])
    flops = distill_step_flops(config, long_prompt=len(p.student_ids), short_prompt=len(p.teacher_ids),
                               samples=args.samples, response=response)
    peak, bandwidth = matmul_peak(args.threads), read_bandwidth(args.threads)
    bf16_peak = matmul_peak(args.threads, "bfloat16")
    limit = step_limit_s(config, flops=flops, response=response, peak=peak, bandwidth=bandwidth)
    print(f"step FLOPs (opsdl's way: prompt encoded once, by the student; head at answer positions; backward ~1x "
          f"forward): {flops / 1e9:.0f} GFLOP; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s ({args.threads} threads) "
          f"-> {flops / peak:.2f} s; the decode's weight reads ({response - 1:.1f} steps x "
          f"{weight_bytes(config) / 2**20:.0f} MiB at {bandwidth / 1e9:.1f} GB/s read bandwidth) -> "
          f"{limit - flops / peak:.2f} s; limit {limit:.2f} s: opsdl's step at {limit / med['opsdl']['step_s']:.0%} "
          + (f"of it, TRL's at {limit / med['trl']['step_s']:.0%}" if "trl" in med else "of it")
          + f" (bf16 matmul peak {bf16_peak / 1e9:.0f} GFLOP/s)")
    # what the kernels allow: the student's attention over the long prompt (forward and backward, counted 2x its
    # forward in the limit) at the rate PyTorch's fused causal attention kernel runs it, the rest as in the limit
    attn = attention_flops(config, len(p.student_ids), 0)
    rate = attention_rate(config, len(p.student_ids), args.threads, backward=True)
    bound = limit - 2 * attn / peak + 3 * attn / rate
    print(f"the student's attention over the prompt: {2 * attn / 1e9:.0f} GFLOP of the step's count; PyTorch's fused "
          f"causal attention runs its forward and backward at {rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%} of the "
          f"matmul peak; backward = 2x forward): with it, the rest as in the limit, {bound:.2f} s: opsdl's step at "
          f"{bound / med['opsdl']['step_s']:.0%} of that")
    if "trl" not in med:
        for k in (*PHASES, "peak_gib"):
            print(f"opsdl {k} {med['opsdl'][k]:.2f}")
        return 0
    print(f"| phase (median of {args.rounds}) | opsdl | TRL SDFTTrainer | opsdl / TRL |")
    print("|---|---:|---:|---:|")
    names = {"generate_s": "rollout s", "teacher_s": "teacher scoring s",
             "student_s": "student forward + backward + optimizer s", "step_s": "whole step s",
             "peak_gib": "peak RSS GiB (process)"}
    for k in (*PHASES, "peak_gib"):
        print(f"| {names[k]} | {med['opsdl'][k]:.2f} | {med['trl'][k]:.2f} | {med['opsdl'][k] / med['trl'][k]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
