"""Benchmark one OPSDL training step: memory of response-only logits vs a full-context LM head,
and the time share of each phase of the on-policy step.

    .venv/bin/python benchmarks/bench_step.py                       # embedded default, 1K and 2K
    .venv/bin/python benchmarks/bench_step.py --lengths 1024 --threads 1

Part 1 runs the student's forward + loss + backward (LoRA, 4 sampled answers of 32 tokens)
in a fresh subprocess per (length, method) and reports the peak resident memory above the
level just before the step (a thread samples /proc/self/statm every 2 ms), and its time:

* ``opsdl``: ``opsdl_core.models.scoring.score_responses``: the prompt is encoded once and shared by the
  samples, and the LM head runs only at the response positions;
* ``full-head``: what a hand-written loop does: each sample is ``prompt + answer``, one forward
  pass with the LM head over every position (``[n, T, vocab]`` logits, float32 log-softmax),
  then the response positions are gathered.

Both compute the same per-token log-probs (checked). Part 2 runs three real trainer steps and
prints the mean time of each phase (rollout, teacher scoring, student forward/backward,
optimizer, weight sync) and its share of the step.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a background thread; ``peak - start`` after the block."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def one_step(args) -> dict:
    """Child process: one student forward+backward with ``args.method`` at ``args.length``."""
    import torch
    import torch.nn.functional as F

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.models.load import load_model_and_tokenizer
    from opsdl_core.models.scoring import right_pad, score_responses
    from opsdl_core.train.lora import apply_lora
    from opsdl_core.train.losses import pointwise_reverse_kl_loss

    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_dict({"model": {"name": args.model},
                               "data": {"train_size": 1, "heldout_size": 0, "context_tokens": args.length}})
    model, tok = load_model_and_tokenizer(args.model)
    model = apply_lora(model, cfg)
    model.train()
    item = prepare_data(cfg.data, tok).train[0]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(10, 1000, (args.response_tokens,), generator=g).tolist() for _ in range(args.samples)]
    teacher = torch.zeros(args.samples, args.response_tokens)

    def ours():
        s = score_responses(model, prompts=[item.student_ids], responses=responses, prompt_index=[0] * args.samples,
                            pad_id=tok.pad_token_id)
        return s.logprobs, s.mask

    def full_head():
        P = len(item.student_ids)
        ids = torch.tensor([item.student_ids + r for r in responses])  # [n, P + R]
        logits = model(input_ids=ids).logits.float()  # [n, P + R, V]: the full-context LM head
        logp = F.log_softmax(logits, dim=-1)
        y, mask = right_pad(responses, tok.pad_token_id)
        lp = logp[:, P - 1 : P - 1 + y.shape[1]].gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return lp, mask

    fn = ours if args.method == "opsdl" else full_head
    with torch.no_grad():
        check = fn()[0]  # also warms up the kernels
    import gc

    gc.collect()
    t = time.perf_counter()
    with PeakRSS() as mem:
        lp, mask = fn()
        pointwise_reverse_kl_loss(student_logprobs=lp, teacher_logprobs=teacher, mask=mask).loss.backward()
    seconds = time.perf_counter() - t
    return {"method": args.method, "length": len(item.student_ids), "peak_mib": (mem.peak - mem.start) / 2**20,
            "seconds": seconds, "logprob_sum": float(check.sum())}


def run_capped(cmd: list[str], max_gib: float, env: dict | None = None) -> dict | None:
    """Run a child; kill it (and return None) if its resident memory passes ``max_gib``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    page = os.sysconf("SC_PAGE_SIZE")
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                rss = int(f.read().split()[1]) * page
        except (FileNotFoundError, ProcessLookupError):
            break
        if rss > max_gib * 2**30:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(cmd)}")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def phases(args) -> dict:
    import torch

    from opsdl_core.config import RunConfig
    from opsdl_core.data.prepare import prepare_data
    from opsdl_core.models.load import load_model_and_tokenizer
    from opsdl_core.train.recipe import OPSDLTrainer

    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg = RunConfig.from_dict({
            "model": {"name": args.model},
            "data": {"train_size": 8, "heldout_size": 0, "context_tokens": args.lengths[0]},
            "rollout": {"samples_per_prompt": args.samples, "max_new_tokens": args.response_tokens},
            "train": {"run_dir": d, "steps": 3, "save_every": 100}})
        model, tok = load_model_and_tokenizer(args.model)
        tr = OPSDLTrainer(cfg, model, tok, prepare_data(cfg.data, tok), log=lambda s: None).setup(resume=False)
        ms = [tr.train_step() for _ in range(3)]
    keys = ["generate_s", "teacher_s", "student_s", "optim_s", "sync_s"]
    mean = {k: sum(m[k] for m in ms) / len(ms) for k in keys + ["step_s", "response_len"]}
    return mean


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--response-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rss-gib", type=float, default=16.0,
                    help="stop a child whose resident memory passes this (the full-head peer at 2K needs ~2x 1K's)")
    ap.add_argument("--child", choices=["opsdl", "full-head"], help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.method = args.child
        print("RESULT " + json.dumps(one_step(args)))
        return 0

    print(f"# model={args.model} samples={args.samples} response_tokens={args.response_tokens} "
          f"threads={args.threads} OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print("\n## student forward+backward, one step (LoRA r=16): peak memory above the pre-step level")
    print(f"{'context':>8} {'method':>10} {'peak MiB':>9} {'seconds':>8}")
    rows = {}
    for length in args.lengths:
        for method in ("opsdl", "full-head"):
            cmd = [sys.executable, __file__, "--child", method, "--length", str(length), "--model", args.model,
                   "--samples", str(args.samples), "--response-tokens", str(args.response_tokens),
                   "--threads", str(args.threads)]
            r = run_capped(cmd, args.max_rss_gib)
            if r is None:
                print(f"{length:>8} {method:>10} {'>' + str(args.max_rss_gib) + ' GiB':>9} {'stopped':>8}  "
                      f"(resident memory passed --max-rss-gib; the machine would start swapping or kill it)")
                continue
            rows[(length, method)] = r
            print(f"{r['length']:>8} {method:>10} {r['peak_mib']:>9.0f} {r['seconds']:>8.2f}")
        if (length, "full-head") not in rows:
            continue
        a, b = rows[(length, "opsdl")], rows[(length, "full-head")]
        same = abs(a["logprob_sum"] - b["logprob_sum"]) < 1e-2 * max(1.0, abs(b["logprob_sum"]))
        print(f"{'':>8} {'ratio':>10} {b['peak_mib'] / max(a['peak_mib'], 1e-9):>8.1f}x "
              f"{b['seconds'] / a['seconds']:>7.1f}x  (full-head / opsdl; same log-probs: {same})")

    print(f"\n## thread settings: the same student step at {args.lengths[0]} tokens, fresh process each")
    print(f"{'threads':>8} {'OMP_WAIT_POLICY':>16} {'other busy process':>19} {'seconds':>8}")
    for threads, policy, busy in ((1, "PASSIVE", False), (2, "PASSIVE", False), (2, "ACTIVE", False),
                                  (1, "PASSIVE", True), (2, "PASSIVE", True), (2, "ACTIVE", True)):
        cmd = [sys.executable, __file__, "--child", "opsdl", "--length", str(args.lengths[0]), "--model", args.model,
               "--samples", str(args.samples), "--response-tokens", str(args.response_tokens),
               "--threads", str(threads)]
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        # a competing single-threaded CPU-bound process (stops by itself after 10 minutes at most)
        other = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<600: pass"]) \
            if busy else None
        try:
            r = run_capped(cmd, args.max_rss_gib, env)
        finally:
            if other is not None:
                other.kill()
                other.wait()
        print(f"{threads:>8} {policy:>16} {'yes' if busy else 'no':>19} {r['seconds']:>8.2f}")

    print(f"\n## phases of a real on-policy step at {args.lengths[0]} tokens (mean of 3 steps)")
    m = phases(args)
    for k in ("generate_s", "teacher_s", "student_s", "optim_s", "sync_s"):
        print(f"{k[:-2]:>10} {m[k]:7.2f}s {100 * m[k] / m['step_s']:5.1f}%")
    print(f"{'step':>10} {m['step_s']:7.2f}s  (mean sampled answer: {m['response_len']:.1f} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
