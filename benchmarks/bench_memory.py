"""Benchmark the student's step against the context length, with and without gradient checkpointing.

    .venv/bin/python benchmarks/bench_memory.py                                  # embedded default: 1K, 2K, 4K, 8K
    .venv/bin/python benchmarks/bench_memory.py --model tiny --lengths 8192 16384 32768 65536

Each (length, checkpointing) runs in a fresh process: the student's part of an on-policy step as the trainer
runs it with ``rollout.shared_prefill`` — the long prompt encoded once with gradient (``prefill``),
``--samples`` answers of ``--response-tokens`` tokens scored on that cache (``score_responses``), the
point-wise loss, the backward — with LoRA r=16 on every linear layer, or ``--full`` fine-tuning. Printed per
length: the peak resident memory above the level just before the step (a thread samples ``/proc/self/statm``
every 2 ms), the seconds, and checkpointed / plain for both; the log-probs of the two must agree. A child
whose resident memory passes ``--max-rss-gib`` is stopped and reported as not fitting. ``--model tiny``: a
random-init model of SmolLM2-135M's layer shapes with ``--layers`` layers (4 by default: the memory per layer is
the real one's, the time is not; 30: the real model's depth with a longer position range, for the contexts past
its 8,192-token window).

The last lines fit the process's peak resident memory = a + b * tokens to each variant's rows (least
squares; the model and the data included) and print the context
at which each would reach ``--budget-gib`` (by default this machine's total memory less 2 GiB): an
extrapolation from the measured rows, said as such.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import PeakRSS, run_capped  # noqa: E402


def _model(args):
    from opsdl_core.models.load import load_model_and_tokenizer

    if args.model != "tiny":
        return load_model_and_tokenizer(args.model)
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from opsdl_core.models.attention import use_gqa_attention
    from opsdl_core.models.linear import use_cpu_linear
    from opsdl_core.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(_real_dir())
    config.num_hidden_layers = args.layers
    config.max_position_embeddings = max(config.max_position_embeddings, 2 * max(args.lengths))
    tok.model_max_length = config.max_position_embeddings  # the window the data path checks prompts against
    tok.name_or_path = ""  # (not the real folder's config.json, whose window is 8,192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    use_gqa_attention(model)
    use_cpu_linear(model)
    return model, tok


_TEMPLATE_ROOM = 160  # the chat template, the question and the tokenizer's rounding around a context's tokens


def _real_dir() -> str:
    from opsdl_core.models.load import resolve_model

    return resolve_model("smollm2-135m-instruct").path


def child(args) -> dict:
    import gc

    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import model_window, prepare_data
    from opsdl_core.models import checkpointing
    from opsdl_core.models.scoring import prefill, score_responses
    from opsdl_core.train.lora import apply_lora
    from opsdl_core.train.losses import pointwise_reverse_kl_loss

    torch.set_num_threads(args.threads)
    model, tok = _model(args)
    # a context the model's window holds with its answers (8K asked of an 8,192-position model: a little less)
    window = model_window(tok)
    context = args.length if window is None else min(args.length, window - args.response_tokens - _TEMPLATE_ROOM)
    cfg = RunConfig.from_dict({"data": {"train_size": 1, "heldout_size": 0, "context_tokens": context}})
    if args.checkpointing:
        checkpointing.enable(model)
    if not args.full:
        model = apply_lora(model, RunConfig.from_dict({"lora": {"r": 16, "alpha": 32}}))
    model.train()
    item = prepare_data(cfg.data, tok, answer_tokens=args.response_tokens).train[0]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(10, 1000, (args.response_tokens,), generator=g).tolist() for _ in range(args.samples)]
    teacher = torch.zeros(args.samples, args.response_tokens)
    with torch.no_grad():
        check = score_responses(model, prompts=[item.student_ids], responses=responses,
                                prompt_index=[0] * args.samples, pad_id=tok.pad_token_id).logprobs
    gc.collect()
    t = time.perf_counter()
    with PeakRSS() as mem:
        pre = prefill(model, [item.student_ids], pad_id=tok.pad_token_id)
        s = score_responses(model, prompts=[item.student_ids], responses=responses, prompt_index=[0] * args.samples,
                            pad_id=tok.pad_token_id, prefilled=pre)
        pointwise_reverse_kl_loss(student_logprobs=s.logprobs, teacher_logprobs=teacher, mask=s.mask).loss.backward()
    seconds = time.perf_counter() - t
    return {"length": len(item.student_ids), "peak_mib": (mem.peak - mem.start) / 2**20, "seconds": seconds,
            "process_peak_mib": mem.peak / 2**20,
            "logprob_sum": float(check.sum()), "grad_logprob_sum": float(s.logprobs.detach().sum())}


def fit(rows: list[tuple[int, float]]) -> tuple[float, float] | None:
    if len(rows) < 2:
        return None
    n = len(rows)
    mx = sum(x for x, _ in rows) / n
    my = sum(y for _, y in rows) / n
    sxx = sum((x - mx) ** 2 for x, _ in rows)
    b = sum((x - mx) * (y - my) for x, y in rows) / sxx
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model spec, or 'tiny'")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--response-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--layers", type=int, default=4, help="--model tiny: decoder layers (30: the real model's depth)")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ap.add_argument("--max-rss-gib", type=float, default=total - 2)
    ap.add_argument("--budget-gib", type=float, default=total - 2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    depth = f" ({args.layers} layers)" if args.model == "tiny" else ""
    print(f"# model={args.model}{depth} {'full fine-tuning' if args.full else 'LoRA r=16'} samples={args.samples} "
          f"response_tokens={args.response_tokens} threads={args.threads} "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; stop at {args.max_rss_gib:.1f} GiB resident\n")
    print("| context tokens | plain peak MiB | plain s | checkpointed peak MiB | checkpointed s | memory ratio | "
          "time ratio | same log-probs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    measured: dict[bool, list[tuple[int, float]]] = {False: [], True: []}
    for length in args.lengths:
        res = {}
        for ck in (False, True):
            cmd = [sys.executable, __file__, "--child", "--length", str(length), "--model", args.model,
                   "--samples", str(args.samples), "--response-tokens", str(args.response_tokens),
                   "--threads", str(args.threads), "--layers", str(args.layers), "--lengths", *map(str, args.lengths)]
            cmd += ["--checkpointing"] if ck else []
            cmd += ["--full"] if args.full else []
            res[ck] = run_capped(cmd, args.max_rss_gib)
            if res[ck] is not None:
                measured[ck].append((res[ck]["length"], res[ck]["process_peak_mib"]))
        a, b = res[False], res[True]

        def cell(r, key, fmt):
            return fmt.format(r[key]) if r is not None else "did not fit"

        tokens = (a or b or {"length": length})["length"]
        ratio_m = f"{b['peak_mib'] / a['peak_mib']:.2f}" if a and b else "-"
        ratio_t = f"{b['seconds'] / a['seconds']:.2f}" if a and b else "-"
        same = (abs(a["grad_logprob_sum"] - b["grad_logprob_sum"]) < 1e-3 * max(1.0, abs(a["grad_logprob_sum"]))
                if a and b else "-")
        print(f"| {tokens} | {cell(a, 'peak_mib', '{:.0f}')} | {cell(a, 'seconds', '{:.1f}')} | "
              f"{cell(b, 'peak_mib', '{:.0f}')} | {cell(b, 'seconds', '{:.1f}')} | {ratio_m} | {ratio_t} | {same} |",
              flush=True)
    print()
    for ck, rows in measured.items():
        f = fit(rows)
        name = "checkpointed" if ck else "plain"
        if f is None:
            print(f"{name}: fewer than two rows, no fit")
            continue
        a0, b0 = f
        reach = (args.budget_gib * 1024 - a0) / b0 if b0 > 0 else float("inf")
        print(f"{name}: the process's peak ≈ {a0:.0f} MiB + {b0 * 1024:.0f} MiB per 1K tokens (fit to {len(rows)} rows); "
              f"{args.budget_gib:.1f} GiB reached at ≈ {reach:,.0f} tokens (extrapolated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
