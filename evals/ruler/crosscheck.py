"""Cross-check our offline RULER tasks against lm-evaluation-harness's own RULER implementation.

    python -m evals.ruler.crosscheck --model FOLDER --lengths 256 512 1024 2048 --n 25 \
        --out var/evals/crosscheck [--ours RESULTS_DIR]

For each task lm-eval can generate offline (the six synthetic ones: its essay tasks download Paul
Graham essays, its QA tasks download SQuAD/HotpotQA) and each length, this runs the peer through
the real ``lm_eval`` CLI on the same model, with the chat template, greedy, ``--limit n``, one
length per run, all tasks together (lm-eval always builds 500 samples per length and ``--limit`` takes the first
``n``). lm-eval's task YAMLs list only lengths of 4,096 and above, so each one is included from
the installed package under the name ``lmeval_ruler_<task>`` with a metric for the requested
length; nothing else in it is changed. Our side is read from ``--ours`` (an ``lm_eval
--log_samples`` output folder of the ``opsdl_ruler`` group; its first ``n`` samples per length
are exactly the samples an ``n``-sample run generates, because ours are seeded per index) or run
here. Finished cells are kept, so running the command again resumes (or only re-compares).
The table puts both side by side with the mean prompt length in tokens of each (the prompt the
model was given, chat template and answer prefix included, in the model's tokenizer), which is
where the two implementations differ most (lm-eval fits the haystack once, on its first sample,
in steps of 5 units below 4K; ours fits each sample by bisection).

lm-eval's generators retry without bound when a task does not fit the length (its ``vt`` adds a
~440-token in-context example, so below ~1K tokens it never returns; its ``cwe`` likewise), so
each task's data set is first built alone in a child process with a time limit
(``probe_peer``); a task that raises or does not return is reported as such for that length
instead of hanging the run.

lm-eval's RULER needs ``wonderwords`` and ``nltk`` (both dependencies of opsdl); nltk's
``punkt_tab`` download fails offline and is only used by the essay tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from evals.ruler.generate import TASKS

ROOT = Path(__file__).resolve().parents[2]


def _lm_eval_ruler_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "ruler"


def write_peer_tasks(folder: Path, length: int) -> list[str]:
    """lm-eval's own RULER task YAMLs, included unchanged, renamed, with a metric for ``length``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in TASKS:
        src = _lm_eval_ruler_dir() / f"{task}.yaml"
        if not src.is_file():
            raise FileNotFoundError(f"lm-eval's RULER task file {src} is missing; expected lm-eval >= 0.4.9")
        name = f"lmeval_ruler_{task}"
        (folder / f"{name}.yaml").write_text(
            f"include: {src}\ntask: {name}\ntag: []\nmetric_list:\n"
            f"  - metric: \"{length}\"\n    aggregation: mean\n    higher_is_better: true\n")
        names.append(name)
    return names


PEER_FUNCTIONS = {"niah_single_1": "niah_utils.niah_single_1", "niah_multikey_2": "niah_utils.niah_multikey_2",
                  "niah_multikey_3": "niah_utils.niah_multikey_3", "vt": "vt_utils.get_vt_dataset",
                  "cwe": "cwe_utils.get_cw_dataset", "fwe": "fwe_utils.fwe_download"}  # as lm-eval's YAMLs name them

_PROBE = r"""
import importlib, json, os, sys, threading
model, length, out, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
functions = json.loads(sys.argv[5])
result = {}
def build(task, function):
    try:
        ds = function(pretrained=model, max_seq_lengths=[length])["test"]
        empty = sum(1 for r in ds if not r["outputs"])
        if empty:  # lm-eval's string_match_all divides by the number of references
            raise ValueError(f"{empty} of {len(ds)} samples have no reference answer (lm-eval's scorer "
                             f"would divide by zero)")
        result[task] = {"n": len(ds), "max_prompt_tokens": max(int(r["length"]) for r in ds)}
    except BaseException as e:  # reported per task, the others go on
        result[task] = {"error": f"{type(e).__name__}: {e}"[:300]}
for task, ref in functions.items():
    mod, fn = ref.rsplit(".", 1)  # imported outside the time limit (nltk tries its download at import)
    t = threading.Thread(target=build, args=(task, getattr(importlib.import_module("lm_eval.tasks.ruler." + mod), fn)),
                         daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        result[task] = {"error": f"lm-eval's generator did not return within {timeout:.0f} s (its retry loop "
                                 f"has no bound when the task does not fit {length} tokens)"}
        break  # the stuck thread keeps the interpreter busy: the rest are probed in a fresh process
with open(out, "w") as fh:
    json.dump(result, fh)
os._exit(0)
"""


def probe_peer(model: str, length: int, tasks: list[str], *, timeout: float = 120.0,
               work: Path) -> dict[str, dict[str, Any]]:
    """Build each of lm-eval's RULER data sets for ``length`` in a child process (its generators
    print a line per retry and can loop forever); ``{task: {"n", "max_prompt_tokens"} | {"error"}}``."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result: dict[str, dict[str, Any]] = {}
    while len(result) < len(tasks):
        todo = [t for t in tasks if t not in result]
        out = work / f"probe_{length}.json"
        out.unlink(missing_ok=True)
        try:
            subprocess.run([sys.executable, "-c", _PROBE, model, str(length), str(out), str(timeout),
                            json.dumps({t: PEER_FUNCTIONS[t] for t in todo})], env=env, cwd=work,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                           timeout=timeout * len(todo) + 120)
        except subprocess.TimeoutExpired:
            pass
        got = json.loads(out.read_text()) if out.exists() else {}
        if not got:  # the child died before reporting: blame the first task left
            got = {todo[0]: {"error": "the probe process died before reporting"}}
        result.update(got)
    return result


def _run_lm_eval(model: str, include: Path, tasks: list[str], metadata: dict, out: Path, *, limit: int | None,
                 log: Path, batch_size: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--device", "cpu", "--include_path", str(include), "--tasks", ",".join(tasks),
           "--metadata", json.dumps(metadata), "--batch_size", str(batch_size), "--apply_chat_template",
           "--log_samples", "--output_path", str(out)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as fh:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)


def read_samples(folder: Path) -> dict[str, list[dict]]:
    """``{task: [sample, ...]}`` from the ``lm_eval --log_samples`` files under ``folder`` (several
    runs may hold one task at different lengths; a sample logged twice counts once, the newest)."""
    by_task: dict[str, dict[tuple[int, int], dict]] = {}
    for f in sorted(folder.rglob("samples_*.jsonl"), key=lambda p: p.name):  # timestamp suffix: oldest first
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        for line in f.read_text().splitlines():
            if line.strip():
                s = json.loads(line)
                by_task.setdefault(task, {})[(int(s["doc"]["max_length"]), int(s["doc_id"]))] = s
    return {t: list(v.values()) for t, v in by_task.items()}


def _prompt(sample: dict) -> str:
    """The prompt lm-eval gave the model (chat template and answer prefix included)."""
    args = sample["arguments"]
    return args["gen_args_0"]["arg_0"] if isinstance(args, dict) else args[0][0]


def cell(samples: list[dict], length: int, n: int, *, tokens_field: str = "n_tokens",
         count: Callable[[str], int] | None = None) -> dict[str, Any] | None:
    """Accuracy (RULER's string_match_all, as each task computed it), its standard error and the
    mean prompt tokens of the first ``n`` samples of ``length``: with ``count``, the tokens of the
    prompt the model was given (the same measure for both implementations); else the doc's
    ``tokens_field`` (lm-eval's ``length`` adds the task's generation budget to the prompt)."""
    rows = sorted((s for s in samples if int(s["doc"]["max_length"]) == length), key=lambda s: s["doc_id"])[:n]
    if not rows:
        return None
    scores = [float(s[str(length)]) for s in rows]
    mean = sum(scores) / len(scores)
    var = sum((x - mean) ** 2 for x in scores) / (len(scores) - 1) if len(scores) > 1 else 0.0
    tokens = [count(_prompt(s)) if count else int(s["doc"][tokens_field]) for s in rows]
    return {"acc": mean, "stderr": math.sqrt(var / len(scores)), "n": len(scores),
            "prompt_tokens": sum(tokens) / len(tokens)}


def compare(ours: dict[str, list[dict]], peer: dict[tuple[str, int], dict | str], lengths: list[int],
            n: int, count: Callable[[str], int] | None = None) -> list[dict[str, Any]]:
    table = []
    for task in TASKS:
        for length in lengths:
            o = cell(ours.get(f"opsdl_ruler_{task}", []), length, n, tokens_field="n_tokens", count=count)
            p = peer.get((task, length))
            row: dict[str, Any] = {"task": task, "length": length, "ours": o}
            row["peer"] = p if isinstance(p, dict) else None
            row["peer_error"] = p if isinstance(p, str) else None
            if o and row["peer"]:
                row["diff"] = o["acc"] - row["peer"]["acc"]
                row["z"] = row["diff"] / math.hypot(o["stderr"], row["peer"]["stderr"]) if (
                    o["stderr"] or row["peer"]["stderr"]) else 0.0
            table.append(row)
    return table


def to_markdown(table: list[dict[str, Any]]) -> str:
    def fmt(c: dict | None) -> str:
        return "—" if c is None else f"{c['acc']:.2f} ± {c['stderr']:.2f} (n={c['n']}, {c['prompt_tokens']:.0f} tok)"

    lines = ["| task | length | opsdl_ruler | lm-eval ruler | Δ (ours − peer) |", "|---|---:|---|---|---:|"]
    for r in table:
        peer = fmt(r["peer"]) if r["peer"] else (f"error: {r['peer_error']}" if r["peer_error"] else "—")
        diff = f"{r['diff']:+.2f}" if "diff" in r else "—"
        lines.append(f"| {r['task']} | {r['length']} | {fmt(r['ours'])} | {peer} | {diff} |")
    return "\n".join(lines) + "\n"


def _last_error(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errs = [x for x in lines if "Error" in x or "error" in x]
    return (errs or lines or ["no output"])[-1].strip()[:200]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (or a hub id the cache holds)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--n", type=int, default=25, help="samples per task and length")
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "evals" / "crosscheck")
    ap.add_argument("--ours", type=Path, help="an lm_eval --log_samples folder of opsdl_ruler (else run here)")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval --batch_size of both sides (greedy outputs "
                    "do not depend on it)")
    ap.add_argument("--probe-timeout", type=float, default=120.0, help="seconds one lm-eval RULER data set may "
                    "take to build")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    peer: dict[tuple[str, int], dict | str] = {}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        include = out / "peer_tasks" / str(length)
        all_names = dict(zip(TASKS, write_peer_tasks(include, length)))
        probe_file = out / "peer" / f"probe_{length}.json"
        if probe_file.exists():
            probe = json.loads(probe_file.read_text())
        else:
            print(f"[crosscheck] building lm-eval's RULER data sets at {length} (probe)", flush=True)
            probe = probe_peer(args.model, length, list(TASKS), timeout=args.probe_timeout, work=out / "peer")
            probe_file.write_text(json.dumps(probe, indent=1))
        for task in TASKS:
            if "error" in probe[task]:
                peer[(task, length)] = f"lm-eval cannot build it: {probe[task]['error']}"
        names = [all_names[t] for t in TASKS if "error" not in probe[t]]
        if not names:
            continue
        # the tasks that build, in one lm-eval run per length (its RULER import alone takes ~30 s);
        # finished cells are kept, so running the command again resumes
        together = out / "peer" / f"all_{length}"
        samples = read_samples(together) if together.is_dir() else {}
        if not all(len(samples.get(nm, [])) >= args.n for nm in names):
            print(f"[crosscheck] lm-eval's RULER tasks at {length} (n={args.n}): {', '.join(names)}", flush=True)
            proc = _run_lm_eval(args.model, include, names, {"max_seq_lengths": [length]}, together, limit=args.n,
                                log=out / "logs" / f"peer_all_{length}.log", batch_size=args.batch_size)
            if proc.returncode != 0:
                raise SystemExit(f"lm-eval's RULER at {length} failed: {_last_error(out / 'logs' / f'peer_all_{length}.log')}")
            samples = read_samples(together)
        for task in TASKS:
            name = all_names[task]
            if name in names:
                peer[(task, length)] = cell(samples.get(name, []), length, args.n, count=count) \
                    or "no samples"

    if args.ours is None:
        args.ours = out / "ours"
        print(f"[crosscheck] opsdl_ruler at {args.lengths} (n={args.n})", flush=True)
        proc = _run_lm_eval(args.model, ROOT / "evals" / "ruler" / "tasks", ["opsdl_ruler"],
                            {"max_seq_lengths": args.lengths, "num_samples": args.n}, args.ours, limit=None,
                            log=out / "logs" / "ours.log", batch_size=args.batch_size)
        if proc.returncode != 0:
            raise SystemExit(f"opsdl_ruler failed: {_last_error(out / 'logs' / 'ours.log')}")
    table = compare(read_samples(args.ours), peer, args.lengths, args.n, count=count)
    (out / "crosscheck.json").write_text(json.dumps(table, indent=1))
    md = to_markdown(table)
    (out / "crosscheck.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
