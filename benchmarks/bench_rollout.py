"""Benchmark the rollout backends: vLLM (the CPU build here, the GPU build in production) against
the transformers backend, on the same prompts, n samples per prompt, and the cost of one weight sync.

    .venv/bin/python benchmarks/bench_rollout.py                        # embedded default, 1K and 2K, n=4
    .venv/bin/python benchmarks/bench_rollout.py --lengths 1024 --prompts 4 --threads 2

For each prompt length: ``--prompts`` long-context prompts of the training data (synthetic needle
tasks at that many tokens), ``n`` answers each at temperature 1, ``--new-tokens`` tokens per answer
(no stop token, so both backends generate exactly the same number of tokens). One untimed warm-up
call per backend, then ``--repeats`` timed calls; printed: generated tokens per second (prefill
included: that is what a rollout costs), the ratio vLLM / transformers, and how far the two
backends' per-token log-probs of the vLLM samples are apart (the trainer's health check value).

Weight sync: the trainer's full weights (LoRA merged) pushed into the engine, in the engine's own
process (through a safetensors file in /dev/shm, the default) and, with ``--in-process``, into an
engine in this process (tensors handed over); then ``rollout.vllm.sync: lora``, the adapter alone (written
by PEFT, loaded as a vLLM LoRA adapter), on an engine started with LoRA support (its rollouts are timed
too: the adapter runs beside the base weights at every step). The first generation after a sync is timed too
(the prefix cache was reset).

``--decode-threads``: the transformers backend's decode steps alone (the prompts prefilled once, on every
thread) on the process's ``--threads`` against one thread, interleaved, per ``--shapes`` (prompts x samples):
what ``rollout.decode_threads`` decides. No vLLM engine is started. ``--busy``: with a competing CPU-bound
process; run it with ``GOMP_SPINCOUNT=10000`` in the environment to see what a bounded spin of the OpenMP
workers does (the header prints the setting).

    .venv/bin/python benchmarks/bench_rollout.py --decode-threads --lengths 1024 --shapes 1x4 2x4 8x1 8x4
    GOMP_SPINCOUNT=10000 .venv/bin/python benchmarks/bench_rollout.py --decode-threads --lengths 1024 --busy

``--decode-threads --compile``: instead, the decode eager against the model's forward under
``torch.compile(dynamic=True)`` (inductor's CPU code), on the same prefilled prompts at ``--threads``: the
compile's seconds, ms per decode step of each call (eager, compiled, eager again), and whether the samples agree.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per call")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers backend")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--syncs", type=int, default=3, help="timed weight syncs per engine mode")
    ap.add_argument("--in-process", action="store_true", help="also time an engine in this process")
    ap.add_argument("--decode-threads", action="store_true",
                    help="only time the transformers decode on --threads against one thread (no vLLM)")
    ap.add_argument("--shapes", nargs="+", default=["1x4", "2x4", "8x1", "8x4"],
                    help="with --decode-threads: PROMPTSxSAMPLES per call")
    ap.add_argument("--compile", action="store_true",
                    help="with --decode-threads: eager decode against torch.compile(model.forward, dynamic=True)")
    ap.add_argument("--busy", action="store_true",
                    help="with --decode-threads: a competing single-threaded CPU-bound process runs meanwhile")
    args = ap.parse_args()

    import torch

    from opsdl_core.config import RunConfig, VLLMConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.models.load import load_model_and_tokenizer, resolve_model
    from opsdl_core.models.rollout import SamplingParams, TransformersRollout, sampler_weights
    from opsdl_core.models.rollout_vllm import VLLMRollout
    from opsdl_core.models.scoring import score_responses
    from opsdl_core.train.lora import apply_lora

    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model, tok = load_model_and_tokenizer(resolved)
    model.eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=())
    prompts = {}
    for length in args.lengths:
        cfg = RunConfig.from_dict({"data": {"train_size": args.prompts, "heldout_size": 0, "context_tokens": length}})
        prompts[length] = [p.student_ids for p in prepare_data(cfg.data, tok).train]
    if args.decode_threads:
        return decode_threads_table(args, model, tok, prompts)

    def timed(engine, ps, seed):
        t = time.perf_counter()
        out = engine.generate(ps, n=args.n, params=params, seed=seed)
        dt = time.perf_counter() - t
        return out, sum(len(r) for r in out.response_ids) / dt, dt

    hf = TransformersRollout(model, pad_id=tok.pad_token_id)
    max_len = max(max(len(p) for p in ps) for ps in prompts.values()) + args.new_tokens + 16
    t = time.perf_counter()
    eng = VLLMRollout(resolved.path, VLLMConfig(max_model_len=max_len, kv_cache_gib=args.kv_cache_gib))
    start_s = time.perf_counter() - t
    print(f"model {args.model}; {args.prompts} prompts x n={args.n} x {args.new_tokens} new tokens; "
          f"torch threads {args.threads}; vLLM engine started in {start_s:.1f}s\n")
    print("| prompt tokens | transformers tok/s | vLLM tok/s | vLLM / transformers | max |logprob diff| |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for length, ps in prompts.items():
        res = {}
        for name, engine in (("transformers", hf), ("vllm", eng)):
            timed(engine, ps, seed=0)  # warm-up
            runs = [timed(engine, ps, seed=1 + r) for r in range(args.repeats)]
            res[name] = (statistics.median(r[1] for r in runs), runs[-1][0])
        out = res["vllm"][1]
        with torch.no_grad():
            ref = score_responses(model, prompts=ps, responses=out.response_ids, prompt_index=out.prompt_index,
                                  pad_id=tok.pad_token_id)
        diff = max(abs(ref.logprobs[b, i].item() - lp) for b, lps in enumerate(out.sampler_logprobs)
                   for i, lp in enumerate(lps))
        mean_len = sum(map(len, ps)) / len(ps)
        ratio = res["vllm"][0] / res["transformers"][0]
        rows.append((mean_len, res["transformers"][0], res["vllm"][0], ratio, diff))
        print(f"| {mean_len:.0f} | {res['transformers'][0]:.1f} | {res['vllm'][0]:.1f} | {ratio:.2f}x | {diff:.1e} |",
              flush=True)

    # weight sync: a LoRA step's worth of change, full weights pushed
    lora_model = apply_lora(model, RunConfig.from_dict({"lora": {"r": 16, "alpha": 32}}))
    with torch.no_grad():
        for n_, p in lora_model.named_parameters():
            if "lora_B" in n_:
                p.normal_(0, 1e-3)
    state = sampler_weights(lora_model)
    mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    ps = prompts[args.lengths[0]]

    def sync_times(engine):
        times, first = [], []
        for i in range(args.syncs):
            t = time.perf_counter()
            engine.update_weights(i + 1, state)
            times.append(time.perf_counter() - t)
            first.append(timed(engine, ps, seed=100 + i)[2])
        return statistics.median(times), statistics.median(first)

    print(f"\nweight sync: {len(state)} tensors, {mb:.0f} MiB (all weights, LoRA merged)\n")
    print("| engine | sync s | first rollout after sync s | rollout without sync s |")
    print("|---|---:|---:|---:|")
    base_gen = statistics.median(timed(eng, ps, seed=200 + i)[2] for i in range(args.repeats))
    s, f = sync_times(eng)
    print(f"| own process (file in /dev/shm) | {s:.2f} | {f:.2f} | {base_gen:.2f} |", flush=True)
    eng.release()
    # rollout.vllm.sync: lora: only the adapter, served as a vLLM LoRA adapter on the base weights
    import tempfile
    from pathlib import Path

    eng = VLLMRollout(resolved.path, VLLMConfig(max_model_len=max_len, kv_cache_gib=args.kv_cache_gib, sync="lora"),
                      lora_rank=16)
    with tempfile.TemporaryDirectory() as d:
        lora_model.save_pretrained(d)
        adapter_mib = sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20
    eng.push_adapter(0, lora_model)
    timed(eng, ps, seed=0)
    lora_gen = statistics.median(timed(eng, ps, seed=200 + i)[2] for i in range(args.repeats))
    times, first = [], []
    for i in range(args.syncs):
        t = time.perf_counter()
        eng.push_adapter(i + 1, lora_model)  # the adapter written by save_pretrained, then loaded
        times.append(time.perf_counter() - t)
        first.append(timed(eng, ps, seed=100 + i)[2])
    print(f"| own process, adapter only (sync: lora; {adapter_mib:.1f} MiB on disk) | {statistics.median(times):.2f} | "
          f"{statistics.median(first):.2f} | {lora_gen:.2f} |", flush=True)
    eng.release()
    if args.in_process:
        eng = VLLMRollout(resolved.path, VLLMConfig(max_model_len=max_len, kv_cache_gib=args.kv_cache_gib,
                                                    in_process=True))
        timed(eng, ps, seed=0)
        base_gen = statistics.median(timed(eng, ps, seed=200 + i)[2] for i in range(args.repeats))
        s, f = sync_times(eng)
        print(f"| this process (tensors handed over) | {s:.2f} | {f:.2f} | {base_gen:.2f} |", flush=True)
        eng.release()
    return 0


def decode_threads_table(args, model, tok, prompts) -> int:
    """ms per decode step at ``--threads`` and at one thread, same prefilled prompts, same seeds, interleaved."""
    import subprocess
    import sys

    from opsdl_core.models.rollout import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=())
    print(f"model {args.model}; {args.new_tokens} new tokens; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '(unset)')}; competing busy process: "
          f"{'yes' if args.busy else 'no'}; ms per decode step, "
          f"{'each call' if args.compile else f'best of {args.repeats}, interleaved'}\n")
    # a competing single-threaded CPU-bound process (stops by itself after 20 minutes at most)
    other = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1200: pass"],
                             env={"PATH": os.environ.get("PATH", "")}) if args.busy else None
    try:
        (_compiled_rows if args.compile else _decode_rows)(args, model, tok, prompts, params)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return 0


def _prefilled_shapes(args, model, tok, prompts):
    """Per ``--lengths`` x ``--shapes``: (length, P, n, the P prompts, their prefill on ``--threads``); a shape
    needing more prompts than were prepared gets them prepared (the same seeded data, more rows)."""
    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.models.scoring import prefill_grouped

    for length in args.lengths:
        for shape in args.shapes:
            P, n = (int(x) for x in shape.lower().split("x"))
            if len(prompts[length]) < P:
                cfg = RunConfig.from_dict({"data": {"train_size": P, "heldout_size": 0, "context_tokens": length}})
                prompts[length] = [p.student_ids for p in prepare_data(cfg.data, tok).train]
            ps = prompts[length][:P]
            torch.set_num_threads(args.threads)
            with torch.no_grad():
                pre = prefill_grouped(model, ps, pad_id=tok.pad_token_id)
            yield length, P, n, ps, pre


def _timed_decode(args, model, tok, ps, pre, n, params, seed):
    """One decode of ``n`` samples per prompt from the prefill ``pre`` on the process's current threads (the
    rollout's own thread switch off): (ms per decode step, the samples)."""
    from opsdl_core.models.rollout import TransformersRollout

    engine = TransformersRollout(model, pad_id=tok.pad_token_id, max_batch_size=len(ps) * n, decode_threads=0)
    t = time.perf_counter()
    out = engine.generate(ps, n=n, params=params, seed=seed, prefilled=pre)
    return (time.perf_counter() - t) / max(args.new_tokens - 1, 1) * 1e3, out


def _decode_rows(args, model, tok, prompts, params) -> None:
    import torch

    print(f"| prompt tokens | prompts x samples | {args.threads} threads | 1 thread | 1 / {args.threads} |")
    print("|---:|---|---:|---:|---:|")
    for _, P, n, ps, pre in _prefilled_shapes(args, model, tok, prompts):
        times: dict[int, list[float]] = {args.threads: [], 1: []}
        for r in range(args.repeats + 1):  # the first round warms up
            for threads in (args.threads, 1):  # the whole decode on that many threads, whatever the width
                torch.set_num_threads(threads)
                ms = _timed_decode(args, model, tok, ps, pre, n, params, r)[0]
                torch.set_num_threads(args.threads)
                if r:
                    times[threads].append(ms)
        a, b = min(times[args.threads]), min(times[1])
        print(f"| {sum(map(len, ps)) / P:.0f} | {P}x{n} | {a:.0f} | {b:.0f} | {b / a:.2f} |", flush=True)


def _compiled_rows(args, model, tok, prompts, params) -> None:
    import torch

    for length, P, n, ps, pre in _prefilled_shapes(args, model, tok, prompts):
        def run(seed):
            return _timed_decode(args, model, tok, ps, pre, n, params, seed)

        eager = [run(r)[0] for r in range(args.repeats + 1)][1:]  # the first warms up
        ref = run(99)[1]
        forward = model.forward
        model.forward = torch.compile(forward, dynamic=True)
        try:
            t = time.perf_counter()
            run(0)
            compile_s = time.perf_counter() - t
            compiled = [run(r)[0] for r in range(args.repeats)]
            same = run(99)[1]
        finally:
            model.forward = forward
        after = [run(r)[0] for r in range(args.repeats)]
        lp = max((abs(a - b) for x, y in zip(ref.sampler_logprobs, same.sampler_logprobs) for a, b in zip(x, y)),
                 default=0.0)
        print(f"{length} tokens, {P}x{n}, {args.threads} threads: compile + first decode {compile_s:.1f} s; ms per "
              f"decode step eager {[round(x) for x in eager]}, compiled {[round(x) for x in compiled]}, eager "
              f"again {[round(x) for x in after]}; the same samples: {ref.response_ids == same.response_ids} "
              f"(log-probs within {lp:.1e})", flush=True)

if __name__ == "__main__":
    raise SystemExit(main())
