"""Benchmark the CPU's two ways of computing the model's linear layers, alone and inside a rollout: the BLAS behind
``F.linear`` (MKL in PyTorch's x86 wheel) against oneDNN (what ``CpuLinear`` computes, ``opsdl_core.models.linear``).

    .venv/bin/python benchmarks/bench_linear.py                 # the embedded default's shapes, 2 threads
    .venv/bin/python benchmarks/bench_linear.py --threads 1 --rounds 3

Part 1, a decode step's few rows: for each weight shape of the model (the attention and MLP projections, the LM
head) and each row count, forward only, cycling through enough copies of the weight to exceed the CPU caches (as
a decode step reads each weight once from memory): ``F.linear(x, W)``, ``torch.mm(W, xᵀ)ᵀ`` (the form the project
used before oneDNN), oneDNN on the plain weight and on the packed one (``CpuLinear`` without gradient, up to 32
rows): milliseconds and the weight-read bandwidth each reaches. A memory read bandwidth measured in the same run
is the ceiling.

Part 2, the prompt's rows (``--prompt-tokens``): the forward product and the backward's input gradient
(``g W``) and weight gradient (``gᵀ x``), by ``torch.mm``/``F.linear`` and by oneDNN: GFLOP/s, and the
[2048, 2048] weight on the same rows for reference.

Part 3: the rollout the trainer runs (1 prompt of ``--prompt-tokens`` tokens, ``--n`` samples packed,
``--new-tokens`` tokens, temperature 0.7), decoded from one prefill, on the model with ``nn.Linear`` and with
``CpuLinear``, A B A B over ``--rounds`` rounds in this process: prefill seconds, milliseconds per decode step
and the ratios; whether the sampled tokens are the same (they can differ where two tokens' probabilities are
within float32 rounding of each other).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def read_bandwidth(torch) -> float:
    big = torch.randn(128 * 1024 * 1024 // 4)
    big.sum()
    t = time.perf_counter()
    for _ in range(5):
        big.sum()
    return big.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


def part1(torch, shapes, rows_list, rounds: int) -> None:
    import torch.nn.functional as F

    from opsdl_core.models.linear import CpuLinear

    dnn = torch.ops.mkldnn._linear_pointwise
    print(f"memory read bandwidth (sum over 128 MiB): {read_bandwidth(torch):.1f} GB/s\n")
    print("| weight [out, in] | rows | F.linear ms | GB/s | W @ xᵀ ms | GB/s | oneDNN ms | GB/s | oneDNN packed ms "
          "| GB/s | packed / F.linear |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for out_f, in_f in shapes:
        copies = max(2, int(256e6 / (out_f * in_f * 4)))
        ws = [torch.randn(out_f, in_f) for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, CpuLinear.packed_rows) for w in ws]
        gb = out_f * in_f * 4 / 1e9
        for rows in rows_list:
            x = torch.randn(rows, in_f)
            forms = {"linear": lambda w, p: F.linear(x, w), "wx": lambda w, p: torch.mm(w, x.t()).t().contiguous(),
                     "dnn": lambda w, p: dnn(x, w, None, "none", [], ""),
                     "packed": lambda w, p: dnn(x, p, None, "none", [], "")}
            res: dict[str, list[float]] = {k: [] for k in forms}
            for _ in range(rounds):
                for name, form in forms.items():
                    t = time.perf_counter()
                    for w, p in zip(ws, packed):
                        form(w, p)
                    res[name].append((time.perf_counter() - t) / copies)
            best = {k: min(v) for k, v in res.items()}
            cells = " | ".join(f"{best[k] * 1e3:.3f} | {gb / best[k]:.1f}" for k in forms)
            print(f"| [{out_f}, {in_f}] | {rows} | {cells} | {best['packed'] / best['linear']:.2f} |")


def part2(torch, shapes, rows: int, rounds: int) -> None:
    import torch.nn.functional as F

    dnn = torch.ops.mkldnn._linear_pointwise
    print(f"\n{rows} rows (the prompt), GFLOP/s, best of {rounds} rounds:\n")
    print("| weight [out, in] | forward BLAS | oneDNN | input gradient BLAS | oneDNN | weight gradient BLAS | oneDNN |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for out_f, in_f in shapes + [(2048, 2048)]:
        w, x, g = torch.randn(out_f, in_f), torch.randn(rows, in_f), torch.randn(rows, out_f)
        forms = [lambda: F.linear(x, w), lambda: dnn(x, w, None, "none", [], ""), lambda: g @ w,
                 lambda: dnn(g, w.t(), None, "none", [], ""), lambda: g.t() @ x,
                 lambda: dnn(g.t(), x.t(), None, "none", [], "")]
        best = [float("inf")] * len(forms)
        for _ in range(rounds):
            for i, form in enumerate(forms):
                form()
                t = time.perf_counter()
                form()
                best[i] = min(best[i], time.perf_counter() - t)
        flops = 2 * rows * out_f * in_f
        print(f"| [{out_f}, {in_f}] | " + " | ".join(f"{flops / s / 1e9:.0f}" for s in best) + " |")


def part3(torch, model, args) -> None:
    from torch import nn

    from opsdl_core.models.linear import CpuLinear
    from opsdl_core.models.rollout import SamplingParams, TransformersRollout
    from opsdl_core.models.scoring import prefill

    prompt = torch.randint(100, model.config.vocab_size - 100, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.7, max_new_tokens=args.new_tokens)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    engine = TransformersRollout(model, pad_id=0)
    times: dict[str, list[float]] = {"nn.Linear": [], "CpuLinear": []}
    pre_s: dict[str, list[float]] = {"nn.Linear": [], "CpuLinear": []}
    tokens: dict[str, list] = {}
    with torch.no_grad():
        for r in range(args.rounds + 1):  # the first round warms up (and packs the weights)
            for name, cls in (("nn.Linear", nn.Linear), ("CpuLinear", CpuLinear)):
                for m in layers:
                    m.__class__ = cls
                t = time.perf_counter()
                pre = prefill(model, [prompt], pad_id=0)
                prefill_s = time.perf_counter() - t
                t = time.perf_counter()
                out = engine.generate([prompt], n=args.n, params=params, seed=r, prefilled=pre)
                if r:
                    pre_s[name].append(prefill_s)
                    times[name].append((time.perf_counter() - t) / max(len(ids) for ids in out.response_ids))
                    tokens[f"{name}{r}"] = out.response_ids
    same = sum(tokens[f"nn.Linear{r}"] == tokens[f"CpuLinear{r}"] for r in range(1, args.rounds + 1))
    a, b = statistics.median(times["nn.Linear"]), statistics.median(times["CpuLinear"])
    pa, pb = statistics.median(pre_s["nn.Linear"]), statistics.median(pre_s["CpuLinear"])
    print(f"\nrollout: 1 prompt x {args.prompt_tokens} tokens, n={args.n} packed, {args.new_tokens} new tokens")
    print(f"| linear layers | prefill s | ms per decode step (median of {args.rounds}) |")
    print("|---|---:|---:|")
    print(f"| nn.Linear (F.linear) | {pa:.2f} | {a * 1e3:.0f} |")
    print(f"| CpuLinear (oneDNN) | {pb:.2f} | {b * 1e3:.0f} |")
    print(f"CpuLinear / nn.Linear: prefill {pb / pa:.2f}, decode step {b / a:.2f}; the same sampled tokens in "
          f"{same} of {args.rounds} rounds")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 96])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--prompt-tokens", type=int, default=1076)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    import torch

    from opsdl_core.models.load import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model)
    c = model.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(c.hidden_size, c.hidden_size), (kv, c.hidden_size), (c.intermediate_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.vocab_size, c.hidden_size)]
    print(f"model {args.model}; torch threads {args.threads}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}\n")
    if 1 in args.parts:
        part1(torch, shapes, args.rows, args.rounds)
    if 2 in args.parts:
        part2(torch, shapes[:-1], args.prompt_tokens, max(args.rounds, 2))
    if 3 in args.parts:
        part3(torch, model, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
