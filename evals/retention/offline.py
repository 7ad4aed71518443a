"""Which retention benchmarks lm-eval can run offline from the ``datasets`` cache.

For each benchmark, every data set lm-eval's own task reads (``cais/mmlu``: its 57 subject
configs) is loaded with the hub switched off; it is available when all load and have the splits
lm-eval's task reads. Only "not in the cache" errors count as unavailable; anything else (a
corrupt cache, a bug) is raised. Available benchmarks then run under their lm-eval names::

    python -m evals.retention.offline            # prints the table and the lm-eval command
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lm_eval --model hf --model_args pretrained=MODEL \\
        --tasks mmlu,arc_challenge,hellaswag,winogrande --output_path OUT

Unavailable ones can run from local files instead: ``python -m evals.retention.write_tasks``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .benchmarks import BENCHMARKS, mmlu_subjects

__all__ = ["Availability", "dataset_refs", "main", "offline_availability"]

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class Availability:
    benchmark: str
    available: bool
    detail: str  # what was found, or which data set / split is missing


def dataset_refs(bench: str) -> list[tuple[str, str | None]]:
    """The hub data sets (path, config) lm-eval's ``bench`` task reads."""
    spec = BENCHMARKS[bench]
    if bench == "mmlu":
        return [(spec.hub, s) for s in mmlu_subjects()]
    return [(spec.hub, spec.hub_config)]


def _not_cached(e: Exception) -> bool:
    """The errors ``datasets`` raises offline for data that is not in the cache: no module for the
    data set (ConnectionError "Couldn't reach ... on the Hub"), or the data set without this config."""
    from datasets.exceptions import DatasetNotFoundError

    if isinstance(e, (ConnectionError, DatasetNotFoundError)):
        return True
    return isinstance(e, ValueError) and str(e).startswith("Couldn't find cache for")


def _check(bench: str, cache_dir: str | None) -> Availability:
    import datasets

    refs = dataset_refs(bench)
    for path, name in refs:
        label = path + (f" ({name})" if name else "")
        try:
            ds = datasets.load_dataset(path, name, cache_dir=cache_dir)
        except Exception as e:
            if _not_cached(e):
                return Availability(bench, False, f"{label} is not in the datasets cache ({type(e).__name__}: "
                                                  f"{str(e).splitlines()[0]})")
            raise
        missing = [s for s in BENCHMARKS[bench].splits if s not in ds]
        if missing:
            return Availability(bench, False, f"{label} is cached without the split(s) {missing} lm-eval's task "
                                              f"reads (cached: {sorted(ds)})")
    return Availability(bench, True, f"{len(refs)} data set(s) cached")


def offline_availability(benchmarks: Sequence[str] | None = None, *,
                         cache_dir: str | None = None) -> dict[str, Availability]:
    """``{benchmark: Availability}`` for ``benchmarks`` (default: all four). Checks in this process when
    ``datasets`` is already in offline mode, else in a child process started with
    ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` (``datasets`` reads those once, at import)."""
    benches = list(benchmarks or BENCHMARKS)
    unknown = [b for b in benches if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; expected names among {list(BENCHMARKS)}")
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return {b: _check(b, cache_dir) for b in benches}
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, **_OFFLINE_ENV, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "evals.retention.offline", "--json", "--benchmarks", *benches]
    if cache_dir:
        cmd += ["--cache_dir", str(cache_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"offline check failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return {b: Availability(**a) for b, a in json.loads(proc.stdout.splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--cache_dir", default=None, help="datasets cache (default: HF_DATASETS_CACHE)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    for k, v in _OFFLINE_ENV.items():  # before datasets is imported
        os.environ.setdefault(k, v)
    res = offline_availability(args.benchmarks, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps({b: asdict(a) for b, a in res.items()}))
        return 0
    for b, a in res.items():
        print(f"{b:14s} {'available' if a.available else 'missing':10s} {a.detail}")
    ok = [b for b, a in res.items() if a.available]
    if ok:
        print(f"\nHF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lm_eval --model hf --model_args pretrained=MODEL "
              f"--tasks {','.join(ok)} --output_path OUT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
