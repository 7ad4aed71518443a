"""Benchmark greedy evaluation: opsdl's two backends against raw vLLM and plain transformers ``generate``
on the same prompts, with the prefill-FLOP limit from a matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_eval.py                       # 32 questions at ~1,075 tokens, 2 rounds
    .venv/bin/python benchmarks/bench_eval.py --questions 48 --rounds 1 --contenders opsdl-vllm raw-vllm

The questions are the main job's (the synthetic access-code suite at ``--context-tokens``, chat
template, greedy, ``--new-tokens`` at most, stopping at the end of the turn). Contenders, run in
interleaved rounds (A B C D, A B C D) in this one process so that a busy machine slows all alike:

  opsdl-vllm  ``opsdl_core.evaluation.accuracy.evaluate_jobs(backend="vllm")``: one engine, every question at once
  opsdl-hf    ``evaluate_jobs(backend="transformers")``: the KV-cache decoder, batches of ``--batch-size``
  raw-vllm    ``vllm.LLM(model).generate(prompts)`` with vLLM's own defaults (its CPU thread binding too)
  hf-generate ``model.generate`` on left-padded batches of ``--batch-size`` (stock attention)
  opsdl-hf-stock   opsdl-hf with transformers' own SDPA function (K/V expanded per layer: the peer of
              opsdl_core.models.attention's GQA function)
  opsdl-hf-blas    opsdl-hf with ``nn.Linear`` (``F.linear``: MKL on x86) instead of the oneDNN linear layers
  opsdl-vllm-bf16  opsdl-vllm with a bfloat16 engine (AMX / AVX512-BF16 matmuls where the CPU has them);
              its FLOP-limit ratio is against the bf16 matmul peak, and its answers can differ from fp32's

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

CONTENDERS = ("opsdl-vllm", "opsdl-hf", "raw-vllm", "hf-generate", "opsdl-vllm-bf16", "opsdl-hf-stock",
              "opsdl-hf-blas")


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
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS[:4]), choices=CONTENDERS)
    args = ap.parse_args()

    import torch
    from flops import matmul_peak, question_flops

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.data.prompts import stop_token_ids
    from opsdl_core.evaluation.accuracy import EvalJob, evaluate_jobs
    from opsdl_core.models.load import load_model_and_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model, tok = load_model_and_tokenizer(resolved)
    cfg = RunConfig.from_dict({"model": {"name": args.model}, "data": {
        "train_size": 1, "heldout_size": 0, "in_template_size": args.questions, "context_tokens": args.context_tokens,
        "templates": ["access_code"], "seed": 11}})
    items = prepare_data(cfg.data, tok).in_template
    prompts = [p.student_ids for p in items]
    jobs = [EvalJob("q", items, "long")]
    stock_sdpa = load_model_and_tokenizer(resolved, attn_implementation="sdpa_stock")[0] \
        if "opsdl-hf-stock" in args.contenders else None
    blas = load_model_and_tokenizer(resolved, cpu_linear=False)[0] if "opsdl-hf-blas" in args.contenders else None
    mean_len = statistics.mean(map(len, prompts))
    stops = list(stop_token_ids(tok, model.config))
    peak = matmul_peak(args.threads)
    peak_bf16 = matmul_peak(args.threads, "bfloat16")
    print(f"model {args.model} ({resolved.path}); {len(prompts)} questions, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens (mean {mean_len:.0f}); <= {args.new_tokens} new tokens, greedy; "
          f"torch threads {args.threads}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"matmul peak (2048^3, {args.threads} threads): fp32 {peak / 1e9:.0f} GFLOP/s, bf16 {peak_bf16 / 1e9:.0f} GFLOP/s")

    answers: dict[str, list[list[int]]] = {}
    times: dict[str, list[float]] = {c: [] for c in args.contenders}
    starts: dict[str, list[float]] = {c: [] for c in args.contenders}
    new_tokens: dict[str, int] = {}

    def run(name: str) -> None:
        t = time.perf_counter()
        start = 0.0
        if name.startswith("opsdl-"):
            log_lines: list[str] = []
            hf_model = {"opsdl-hf": model, "opsdl-hf-stock": stock_sdpa, "opsdl-hf-blas": blas}.get(name)
            r = evaluate_jobs(hf_model, tok, jobs, max_new_tokens=args.new_tokens,
                              batch_size=args.batch_size, backend="vllm" if hf_model is None else "transformers",
                              model_dir=resolved.path, kv_cache_gib=args.kv_cache_gib, log=log_lines.append,
                              engine_dtype="bfloat16" if name.endswith("bf16") else None)
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
    flops = sum(question_flops(model.config, len(p), gen) for p in prompts)
    limit, limit_bf16 = flops / peak, flops / peak_bf16
    print(f"FLOPs {flops / 1e12:.2f} T (~{gen:.1f} new tokens per answer); limit at the fp32 peak {limit:.1f} s "
          f"({limit / len(prompts):.2f} s per question), at the bf16 peak {limit_bf16:.1f} s")
    ref_name = "opsdl-vllm" if "opsdl-vllm" in times else args.contenders[0]
    ref = statistics.median(times[ref_name])
    print(f"| contender | s / question (median of {args.rounds}) | engine start s | / {ref_name} | / FLOP limit "
          f"| answers = opsdl-hf |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.contenders:
        med = statistics.median(times[name])
        same = "—" if "opsdl-hf" not in answers else \
            f"{sum(a == b for a, b in zip(answers[name], answers['opsdl-hf']))}/{len(prompts)}"
        lim = limit_bf16 if name.endswith("bf16") else limit
        print(f"| {name} | {med / len(prompts):.2f} | {statistics.mean(starts[name]):.1f} | {med / ref:.2f} | "
              f"{med / lim:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
