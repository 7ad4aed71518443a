"""The evaluation's vLLM engine in its own process against in the caller's process: start time
and the same greedy answers, in fresh processes, A B A B interleaved.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_engine_start.py            # 2 rounds
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_engine_start.py --rounds 3 --prompts 16

Each run is a fresh interpreter (the in-process setting cannot be undone inside one) that starts
the engine on the embedded default (``VLLMConfig(in_process=...)``, as ``opsdl_core.evaluation.accuracy``
does for greedy evaluation), answers ``--prompts`` fresh-key needle questions of ~1,024 tokens and
prints its start seconds, its total seconds and a digest of the answer token ids. The summary
prints the medians, their ratio, and whether every run gave the same answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one(in_process: bool, n_prompts: int) -> dict:
    from opsdl_core.config import DataConfig, VLLMConfig
    from opsdl_core.data.prepare import prepare_examples, token_counter
    from opsdl_core.data.tasks.needle import TRAIN_TEMPLATES, generate_examples
    from opsdl_core.models.load import load_tokenizer, resolve_model
    from opsdl_core.models.rollout import SamplingParams
    from opsdl_core.models.rollout_vllm import VLLMRollout

    t0 = time.perf_counter()
    folder = str(resolve_model("smollm2-135m-instruct").path)
    tok = load_tokenizer(folder)
    raw = generate_examples(n=n_prompts, split="heldout", templates=TRAIN_TEMPLATES[:1], target_tokens=1024,
                            count_tokens=token_counter(tok), seed=7)
    items, _ = prepare_examples(raw, tok, DataConfig(teacher_context="oracle"))
    prompts = [p.student_ids for p in items]
    t_start = time.perf_counter()
    engine = VLLMRollout(folder, VLLMConfig(max_model_len=1280, kv_cache_gib=2.0, in_process=in_process),
                         dtype="float32", greedy_only=True)
    start_s = time.perf_counter() - t_start
    out = engine.generate(prompts, n=1, params=SamplingParams(temperature=0.0, max_new_tokens=32,
                                                              stop_token_ids=(tok.eos_token_id,)), seed=0)
    engine.release()
    digest = hashlib.sha256(json.dumps(out.response_ids).encode()).hexdigest()[:16]
    return {"in_process": in_process, "start_s": round(start_s, 1), "total_s": round(time.perf_counter() - t0, 1),
            "answers": digest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--one", choices=["own", "in"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(args.one == "in", args.prompts)), flush=True)
        return 0
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    runs = []
    for r in range(args.rounds):
        for mode in ("own", "in"):  # A B A B
            proc = subprocess.run([sys.executable, __file__, "--one", mode, "--prompts", str(args.prompts)],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run {mode} failed (exit {proc.returncode})")
            rec = json.loads(line[7:])
            runs.append(rec)
            print(f"round {r + 1} {mode:>3}: engine start {rec['start_s']:5.1f} s, whole run {rec['total_s']:5.1f} s, "
                  f"answers {rec['answers']}", flush=True)
    med = {m: statistics.median(x["start_s"] for x in runs if x["in_process"] == (m == "in")) for m in ("own", "in")}
    same = len({x["answers"] for x in runs}) == 1
    print(f"median engine start: own process {med['own']:.1f} s, in process {med['in']:.1f} s "
          f"(in / own = {med['in'] / med['own']:.2f}); the same answers in every run: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
