"""Benchmark the two ways of computing a linear layer on a few rows on this CPU, alone and inside a rollout.

    .venv/bin/python benchmarks/bench_linear.py                 # the embedded default's shapes, 2 threads
    .venv/bin/python benchmarks/bench_linear.py --threads 1 --rounds 3

Part 1: for each weight shape of the model (the attention and MLP projections, the LM head) and each row
count, ``F.linear(x, W)`` (``x @ Wᵀ``) against ``torch.mm(W, xᵀ)ᵀ`` (what ``FewRowsLinear`` computes for
2..32 rows), forward only, cycling through enough copies of the weight to exceed the CPU caches (as a
decode step reads each weight once from memory): milliseconds, the weight-read bandwidth each reaches, the
ratio. A memory read bandwidth measured in the same run is the ceiling.

Part 2: the rollout the trainer runs (1 prompt of ``--prompt-tokens`` tokens, ``--n`` samples packed,
``--new-tokens`` tokens, temperature 0.7), decoded from one prefill, on the model with ``nn.Linear`` and with
``FewRowsLinear``, A B A B over ``--rounds`` rounds in this process: seconds per decode step and the ratio;
the sampled tokens must be the same.
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

    print(f"memory read bandwidth (sum over 128 MiB): {read_bandwidth(torch):.1f} GB/s\n")
    print("| weight [out, in] | rows | F.linear ms | GB/s | W @ xᵀ ms | GB/s | W @ xᵀ / F.linear |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for out_f, in_f in shapes:
        copies = max(2, int(256e6 / (out_f * in_f * 4)))
        ws = [torch.randn(out_f, in_f) for _ in range(copies)]
        gb = out_f * in_f * 4 / 1e9
        for rows in rows_list:
            x = torch.randn(rows, in_f)
            res: dict[str, list[float]] = {"linear": [], "wx": []}
            for _ in range(rounds):
                for name in ("linear", "wx"):
                    t = time.perf_counter()
                    for w in ws:
                        F.linear(x, w) if name == "linear" else torch.mm(w, x.t()).t().contiguous()
                    res[name].append((time.perf_counter() - t) / copies)
            lin, wx = min(res["linear"]), min(res["wx"])
            print(f"| [{out_f}, {in_f}] | {rows} | {lin * 1e3:.3f} | {gb / lin:.1f} | {wx * 1e3:.3f} | {gb / wx:.1f} "
                  f"| {wx / lin:.2f} |")


def part2(torch, model, args) -> None:
    from torch import nn

    from opsdl_core.models.linear import FewRowsLinear
    from opsdl_core.models.rollout import SamplingParams, TransformersRollout
    from opsdl_core.models.scoring import prefill

    prompt = torch.randint(100, model.config.vocab_size - 100, (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.7, max_new_tokens=args.new_tokens)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    engine = TransformersRollout(model, pad_id=0)
    times: dict[str, list[float]] = {"nn.Linear": [], "FewRowsLinear": []}
    tokens: dict[str, list] = {}
    with torch.no_grad():
        pre_s = []
        for r in range(args.rounds):
            for name, cls in (("nn.Linear", nn.Linear), ("FewRowsLinear", FewRowsLinear)):
                for m in layers:
                    m.__class__ = cls
                t = time.perf_counter()
                pre = prefill(model, [prompt], pad_id=0)
                pre_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                out = engine.generate([prompt], n=args.n, params=params, seed=r, prefilled=pre)
                steps = max(len(ids) for ids in out.response_ids)
                times[name].append((time.perf_counter() - t) / steps)
                tokens.setdefault(f"{name}{r}", out.response_ids)
    same = all(tokens[f"nn.Linear{r}"] == tokens[f"FewRowsLinear{r}"] for r in range(args.rounds))
    a, b = statistics.median(times["nn.Linear"]), statistics.median(times["FewRowsLinear"])
    print(f"\nrollout: 1 prompt x {args.prompt_tokens} tokens, n={args.n} packed, {args.new_tokens} new tokens; "
          f"prefill {statistics.median(pre_s):.2f} s (median)")
    print("| linear layers | ms per decode step (median of %d) |" % args.rounds)
    print("|---|---:|")
    print(f"| nn.Linear (F.linear) | {a * 1e3:.0f} |")
    print(f"| FewRowsLinear | {b * 1e3:.0f} |")
    print(f"FewRowsLinear / nn.Linear: {b / a:.2f}; the same sampled tokens: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 96])
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
    part1(torch, shapes, args.rows, args.rounds)
    part2(torch, model, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
