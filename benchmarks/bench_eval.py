"""Benchmark greedy evaluation: opsdl's two backends against raw vLLM and plain transformers ``generate``
on the same prompts, with the prefill-FLOP limit from a matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_eval.py                       # 32 questions at ~1,075 tokens, 2 rounds
    .venv/bin/python benchmarks/bench_eval.py --questions 48 --rounds 1 --contenders opsdl-vllm raw-vllm

The questions are the main job's (the synthetic access-code suite at ``--context-tokens``, chat
template, greedy, ``--new-tokens`` at most, stopping at the end of the turn). Each contender runs in a fresh
process of its own (an in-process vLLM engine binds the process's threads to cores for good, which would
hand its binding to whatever ran after it), answers ``--warmup`` questions untimed first, then all of them
timed; the processes run in interleaved rounds (A B C D, A B C D) so that a busy machine slows all alike:

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
(prefill + decode FLOPs of the questions) / (the fp32 matmul peak on ``--threads`` threads, 2048^3), and to the
kernel bound: the same with the prompts' attention at the rate PyTorch's fused causal attention kernel is
measured to run it (``flops.attention_rate``), which on the CPUs measured is a fraction of the matmul peak.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

CONTENDERS = ("opsdl-vllm", "opsdl-hf", "raw-vllm", "hf-generate", "opsdl-vllm-bf16", "opsdl-hf-stock",
              "opsdl-hf-blas")


def _questions(args, tok):
    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data

    cfg = RunConfig.from_dict({"model": {"name": args.model}, "data": {
        "train_size": 1, "heldout_size": 0, "in_template_size": args.questions, "context_tokens": args.context_tokens,
        "templates": ["access_code"], "seed": 11}})
    return prepare_data(cfg.data, tok).in_template


def child(args) -> dict:
    """Contender ``args.child`` in this (fresh) process: the warm-up, then one timed run over every question."""
    import torch

    from opsdl_core.data.prompts import stop_token_ids
    from opsdl_core.evaluation.accuracy import EvalJob, evaluate_jobs
    from opsdl_core.models.load import load_model_and_tokenizer, resolve_model

    name = args.child
    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    kind = {"opsdl-hf-stock": {"attn_implementation": "sdpa_stock"}, "opsdl-hf-blas": {"cpu_linear": False}}
    if name.startswith("opsdl-hf"):  # the engines and hf-generate load their own weights
        model, tok = load_model_and_tokenizer(resolved, **kind.get(name, {}))
        config = model.config
    else:
        from transformers import AutoConfig, AutoTokenizer

        model, tok, config = None, AutoTokenizer.from_pretrained(resolved.path), AutoConfig.from_pretrained(resolved.path)
    items = _questions(args, tok)
    prompts = [p.student_ids for p in items]
    stops = list(stop_token_ids(tok, config))

    def run(k: int) -> tuple[float, float, list[list[int]]]:
        """The first ``k`` questions: (seconds generating, seconds starting an engine, answers)."""
        qs = prompts[:k]
        t = time.perf_counter()
        start = 0.0
        if name.startswith("opsdl-"):
            log_lines: list[str] = []
            engine = name.startswith("opsdl-vllm")
            r = evaluate_jobs(model, tok, [EvalJob("q", items[:k], "long")],
                              max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                              backend="vllm" if engine else "transformers", model_dir=resolved.path,
                              kv_cache_gib=args.kv_cache_gib, log=log_lines.append,
                              engine_dtype="bfloat16" if name.endswith("bf16") else None)
            out = [tok.encode(o, add_special_tokens=False) for o in r["q"].outputs]
            for line in log_lines:
                if "started in" in line:
                    start = float(line.split("started in ")[1].split("s ")[0])
        elif name == "raw-vllm":
            import vllm

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(args.kv_cache_gib)))
            t0 = time.perf_counter()
            llm = vllm.LLM(model=resolved.path, dtype="float32", max_model_len=max(map(len, qs)) + args.new_tokens
                           + 64, enforce_eager=True, seed=0)
            start = time.perf_counter() - t0
            sp = vllm.SamplingParams(temperature=0.0, max_tokens=args.new_tokens, stop_token_ids=stops)
            res = llm.generate([{"prompt_token_ids": p} for p in qs], sp, use_tqdm=False)
            out = [list(o.outputs[0].token_ids) for o in res]
            llm.llm_engine.engine_core.shutdown()
            del llm
        else:  # hf-generate: stock attention, transformers' generate
            from transformers import AutoModelForCausalLM

            stock = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32).eval()
            out = [[] for _ in qs]
            order = sorted(range(len(qs)), key=lambda i: len(qs[i]))
            with torch.no_grad():
                for s in range(0, len(order), args.batch_size):
                    idx = order[s: s + args.batch_size]
                    L = max(len(qs[i]) for i in idx)
                    ids = torch.full((len(idx), L), tok.pad_token_id)
                    att = torch.zeros((len(idx), L), dtype=torch.long)
                    for j, i in enumerate(idx):
                        ids[j, L - len(qs[i]):] = torch.tensor(qs[i])
                        att[j, L - len(qs[i]):] = 1
                    g = stock.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new_tokens,
                                       do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
                    for j, i in enumerate(idx):
                        seq = g[j, L:].tolist()
                        cut = next((k + 1 for k, x in enumerate(seq) if x in stops), len(seq))
                        out[i] = seq[:cut]
        return time.perf_counter() - t - start, start, out

    warm = run(min(args.warmup, len(prompts)))[0] if args.warmup > 0 else 0.0
    seconds, start, out = run(len(prompts))
    return {"seconds": seconds, "start": start, "warmup": warm, "new_tokens": sum(len(a) for a in out),
            "answers": [[x for x in a if x not in stops] for a in out]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4,
                    help="questions each contender's process answers, untimed, before its timed run (0: none): the "
                         "first run in a cold process was 35-55 s slower than the same work later")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS[:4]), choices=CONTENDERS)
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0

    from flops import attention_flops, attention_rate, matmul_peak, question_flops
    from processes import run_child
    from transformers import AutoConfig, AutoTokenizer

    from opsdl_core.models.load import resolve_model

    resolved = resolve_model(args.model)
    tok, config = AutoTokenizer.from_pretrained(resolved.path), AutoConfig.from_pretrained(resolved.path)
    prompts = [p.student_ids for p in _questions(args, tok)]
    mean_len = statistics.mean(map(len, prompts))
    peak = matmul_peak(args.threads)
    peak_bf16 = matmul_peak(args.threads, "bfloat16")
    print(f"model {args.model} ({resolved.path}); {len(prompts)} questions, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens (mean {mean_len:.0f}); <= {args.new_tokens} new tokens, greedy; "
          f"torch threads {args.threads}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; a fresh process per "
          f"contender and round, {args.warmup} questions of warm-up in each")
    print(f"matmul peak (2048^3, {args.threads} threads): fp32 {peak / 1e9:.0f} GFLOP/s, bf16 {peak_bf16 / 1e9:.0f} GFLOP/s")

    answers: dict[str, list[list[int]]] = {}
    times: dict[str, list[float]] = {c: [] for c in args.contenders}
    starts: dict[str, list[float]] = {c: [] for c in args.contenders}
    new_tokens: dict[str, int] = {}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}")
        for name in args.contenders:
            res = run_child(__file__, name, args)
            if res is None:
                return 1
            times[name].append(res["seconds"])
            starts[name].append(res["start"])
            answers[name], new_tokens[name] = res["answers"], res["new_tokens"]
            print(f"  {name:16s} {res['seconds']:7.1f} s generating (+{res['start']:.1f} s engine start; warm-up "
                  f"{res['warmup']:.1f} s)", flush=True)

    gen = statistics.mean(new_tokens.values()) / len(prompts)
    flops = sum(question_flops(config, len(p), gen) for p in prompts)
    limit, limit_bf16 = flops / peak, flops / peak_bf16
    print(f"FLOPs {flops / 1e12:.2f} T (~{gen:.1f} new tokens per answer); limit at the fp32 peak {limit:.1f} s "
          f"({limit / len(prompts):.2f} s per question), at the bf16 peak {limit_bf16:.1f} s")
    # what the kernels allow: the prompts' attention at the fused attention kernel's own measured rate
    attn = sum(attention_flops(config, len(p), 0) for p in prompts)
    rate = attention_rate(config, round(mean_len), args.threads)
    bound = (flops - attn) / peak + attn / rate
    print(f"the prompts' attention: {attn / 1e12:.2f} T of the FLOPs; PyTorch's fused causal attention runs it at "
          f"{rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%} of the matmul peak): with it, the rest at the peak, "
          f"{bound / len(prompts):.2f} s per question ({bound / limit:.2f}x the FLOP limit)")
    ref_name = "opsdl-vllm" if "opsdl-vllm" in times else args.contenders[0]
    ref = statistics.median(times[ref_name])
    print(f"| contender | s / question (median of {args.rounds}) | engine start s | / {ref_name} | / FLOP limit "
          f"| / kernel bound | answers = opsdl-hf |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.contenders:
        med = statistics.median(times[name])
        same = "—" if "opsdl-hf" not in answers else \
            f"{sum(a == b for a, b in zip(answers[name], answers['opsdl-hf']))}/{len(prompts)}"
        lim = limit_bf16 if name.endswith("bf16") else limit
        kb = "—" if name.endswith("bf16") else f"{med / bound:.2f}"
        print(f"| {name} | {med / len(prompts):.2f} | {statistics.mean(starts[name]):.1f} | {med / ref:.2f} | "
              f"{med / lim:.2f} | {kb} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
