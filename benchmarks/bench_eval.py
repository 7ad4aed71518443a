"""Benchmark greedy evaluation: opsdl's two backends against raw vLLM and plain transformers ``generate``
on the same prompts, with the prefill-FLOP limit from a matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_eval.py                       # 32 questions at ~1,075 tokens, 2 rounds
    .venv/bin/python benchmarks/bench_eval.py --questions 48 --rounds 1 --contenders opsdl-vllm raw-vllm

The questions are the main job's (the synthetic access-code suite at ``--context-tokens``, chat
template, greedy, ``--new-tokens`` at most, stopping at the end of the turn). Contenders, run in
interleaved rounds (A B C D, A B C D) in this one process so that a busy machine slows all alike:

  opsdl-vllm  ``opsdl_core.evaluate.evaluate_jobs(backend="vllm")``: one engine, every question at once
  opsdl-hf    ``evaluate_jobs(backend="transformers")``: the KV-cache decoder, batches of ``--batch-size``
  raw-vllm    ``vllm.LLM(model).generate(prompts)`` with vLLM's own defaults (its CPU thread binding too)
  hf-generate ``model.generate`` on left-padded batches of ``--batch-size`` (stock attention)

Printed per contender: seconds per question (engine start apart for the vLLM ones), the ratio to
opsdl-vllm, whether its answers equal opsdl-hf's, and the ratio of its time to the FLOP limit:
(prefill + decode FLOPs of the questions) / (the fp32 matmul peak on ``--threads`` threads, 2048^3).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

CONTENDERS = ("opsdl-vllm", "opsdl-hf", "raw-vllm", "hf-generate")


def matmul_peak(threads: int, dtype: str = "float32") -> float:
    """FLOP/s of a 2048^3 matmul, best of 5 (after 2 warm-up calls)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    b = torch.randn(2048, 2048, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def question_flops(config, prompt_len: int, new_tokens: int) -> float:
    """Forward FLOPs of one greedy answer: 2 * (matmul weights) per token for the layers, attention
    scores and values (causal: ~T^2/2 per layer for the prompt), the LM head at generated positions only."""
    h, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    d = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    per_token = 2 * L * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter)
    head = 2 * h * config.vocab_size
    T = prompt_len
    attn_prefill = 2 * 2 * L * heads * d * T * T / 2
    attn_decode = 2 * 2 * L * heads * d * (T + new_tokens / 2) * new_tokens
    return per_token * (T + new_tokens) + attn_prefill + attn_decode + head * new_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = ap.parse_args()

    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.evaluate import EvalJob, evaluate_jobs
    from opsdl_core.models import load_model_and_tokenizer, resolve_model
    from opsdl_core.prepare import prepare_data
    from opsdl_core.prompts import stop_token_ids

    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model, tok = load_model_and_tokenizer(resolved)
    cfg = RunConfig.from_dict({"model": {"name": args.model}, "data": {
        "train_size": 1, "heldout_size": 0, "in_template_size": args.questions, "context_tokens": args.context_tokens,
        "templates": ["access_code"], "seed": 11}})
    items = prepare_data(cfg.data, tok).in_template
    prompts = [p.student_ids for p in items]
    jobs = [EvalJob("q", items, "long")]
    mean_len = statistics.mean(map(len, prompts))
    stops = list(stop_token_ids(tok, model.config))
    peak = matmul_peak(args.threads)
    print(f"model {args.model} ({resolved.path}); {len(prompts)} questions, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens (mean {mean_len:.0f}); <= {args.new_tokens} new tokens, greedy; "
          f"torch threads {args.threads}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s")

    answers: dict[str, list[list[int]]] = {}
    times: dict[str, list[float]] = {c: [] for c in args.contenders}
    starts: dict[str, list[float]] = {c: [] for c in args.contenders}
    new_tokens: dict[str, int] = {}

    def run(name: str) -> None:
        t = time.perf_counter()
        start = 0.0
        if name in ("opsdl-vllm", "opsdl-hf"):
            log_lines: list[str] = []
            r = evaluate_jobs(model if name == "opsdl-hf" else None, tok, jobs, max_new_tokens=args.new_tokens,
                              batch_size=args.batch_size, backend="vllm" if name == "opsdl-vllm" else "transformers",
                              model_dir=resolved.path, kv_cache_gib=args.kv_cache_gib, log=log_lines.append)
            out = [tok.encode(o, add_special_tokens=False) for o in r["q"].outputs]
            for line in log_lines:
                if "started in" in line:
                    start = float(line.split("started in ")[1].split("s ")[0])
        elif name == "raw-vllm":
            import vllm

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(args.kv_cache_gib)))
            t0 = time.perf_counter()
            llm = vllm.LLM(model=resolved.path, dtype="float32", max_model_len=max(map(len, prompts)) + args.new_tokens
                           + 64, enforce_eager=True, seed=0)
            start = time.perf_counter() - t0
            sp = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, stop_token_ids=stops)
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            out = [list(o.outputs[0].token_ids) for o in res]
            llm.llm_engine.engine_core.shutdown()
            del llm
        else:  # hf-generate: stock attention, transformers' generate
            from transformers import AutoModelForCausalLM

            stock = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32).eval()
            out = [[] for _ in prompts]
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            with torch.no_grad():
                for s in range(0, len(order), args.batch_size):
                    idx = order[s: s + args.batch_size]
                    L = max(len(prompts[i]) for i in idx)
                    ids = torch.full((len(idx), L), tok.pad_token_id)
                    att = torch.zeros((len(idx), L), dtype=torch.long)
                    for j, i in enumerate(idx):
                        ids[j, L - len(prompts[i]):] = torch.tensor(prompts[i])
                        att[j, L - len(prompts[i]):] = 1
                    g = stock.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new_tokens,
                                       do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
                    for j, i in enumerate(idx):
                        seq = g[j, L:].tolist()
                        cut = next((k + 1 for k, x in enumerate(seq) if x in stops), len(seq))
                        out[i] = seq[:cut]
        total = time.perf_counter() - t
        times[name].append(total - start)
        starts[name].append(start)
        answers[name] = [[x for x in a if x not in stops] for a in out]
        new_tokens[name] = sum(len(a) for a in out)
        print(f"  round: {name:12s} {total - start:7.1f} s generating (+{start:.1f} s engine start)", flush=True)

    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}")
        for name in args.contenders:
            run(name)

    gen = statistics.mean(new_tokens.values()) / len(prompts)
    limit = sum(question_flops(model.config, len(p), gen) for p in prompts) / peak
    print(f"FLOP limit at that peak: {limit:.1f} s ({limit / len(prompts):.2f} s per question; "
          f"~{gen:.1f} new tokens per answer)")
    ref_name = "opsdl-vllm" if "opsdl-vllm" in times else args.contenders[0]
    ref = statistics.median(times[ref_name])
    print(f"| contender | s / question (median of {args.rounds}) | engine start s | / {ref_name} | / FLOP limit "
          f"| answers = opsdl-hf |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.contenders:
        med = statistics.median(times[name])
        same = "—" if "opsdl-hf" not in answers else \
            f"{sum(a == b for a, b in zip(answers[name], answers['opsdl-hf']))}/{len(prompts)}"
        print(f"| {name} | {med / len(prompts):.2f} | {statistics.mean(starts[name]):.1f} | {med / ref:.2f} | "
              f"{med / limit:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
