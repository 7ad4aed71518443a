"""Write lm-eval tasks that run lm-eval's OWN MMLU / ARC-Challenge / HellaSwag / Winogrande
definitions on local files (for machines without the hub).

Each ``opsdl_retention_<bench>.yaml`` ``include:``s lm-eval's task config (prompt, choices,
target, metrics, ``process_docs`` and the ``!function`` helpers resolve in lm-eval's own folder)
and overrides only the data source: ``dataset_path: json|parquet|csv`` with
``dataset_kwargs.data_files`` = the user's file, read as the ``test`` split. The group
``opsdl_retention`` averages ``acc`` over the benchmarks, and ``acc_norm`` over those that report
it (ARC, HellaSwag), each benchmark weighted equally. Files are validated first
(``benchmarks.validate_file``). MMLU is one task over all rows, prompted per row with its
subject's description exactly as lm-eval's ``mmlu_<subject>`` tasks; its accuracy is the same
row-weighted mean as lm-eval's ``mmlu`` group. Zero-shot only: the files carry no few-shot split.

Run::

    python -m evals.retention.write_tasks --out runs/retention_tasks \\
        --mmlu data/mmlu_test.parquet --arc_challenge data/arc_challenge_test.jsonl \\
        --hellaswag data/hellaswag_validation.jsonl --winogrande data/winogrande_xl_validation.jsonl
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lm_eval --model hf --model_args pretrained=MODEL \\
        --include_path runs/retention_tasks --tasks opsdl_retention --output_path runs/retention_results

The YAMLs name lm-eval's config and the data files by absolute path: write them again after
moving either.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .benchmarks import BENCHMARKS, RetentionDataError, builtin_yaml, file_format, loader_kwargs, validate_file

__all__ = ["GROUP", "MARKER", "group_config", "main", "task_config", "task_name", "write_retention_tasks"]

GROUP = "opsdl_retention"
MARKER = "# Written by evals/retention/write_tasks.py"
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"


def task_name(bench: str) -> str:
    return f"{GROUP}_{bench}"


class _Function(str):
    """A ``!function module.name`` reference in the written YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style='"' if "\n" in v else None))


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _builtin_config(path: Path) -> dict[str, Any]:
    """lm-eval's config with its ``include:``s merged (local keys win), ``!function`` left as text."""
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    incs = cfg.pop("include", [])
    merged: dict[str, Any] = {}
    for inc in incs if isinstance(incs, list) else [incs]:
        merged.update(_builtin_config(path.parent / inc))
    return {**merged, **cfg}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def task_config(bench: str, data_file: str | Path) -> dict[str, Any]:
    """The task dict: lm-eval's config by ``include`` plus the local data source."""
    data_file = Path(data_file).resolve()
    fmt = file_format(data_file)
    src = builtin_yaml(bench)
    kwargs: dict[str, Any] = {"data_files": {"test": str(data_file)}}
    for k, v in loader_kwargs(bench, fmt).items():
        kwargs[k] = {c: _Function("builtins.str") for c in v} if k == "converters" else v
    cfg: dict[str, Any] = {
        "task": task_name(bench),
        "include": str(src),
        "tag": [],  # not in lm-eval's own tags (ai2_arc, multiple_choice)
        "dataset_path": fmt,
        "dataset_name": None,
        "dataset_kwargs": kwargs,
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        "fewshot_split": None,
    }
    if bench == "mmlu":  # lm-eval's per-subject description, rendered from each row's subject
        cfg["description"] = MMLU_DESCRIPTION
    version = _builtin_config(src).get("metadata", {}).get("version")
    cfg["metadata"] = {"version": version, "source_task": bench, "data_file": str(data_file),
                       "data_sha256": _sha256(data_file)}
    return cfg


def group_config(benches: list[str]) -> dict[str, Any]:
    metrics = ["acc"] + (["acc_norm"] if any("acc_norm" in BENCHMARKS[b].metrics for b in benches) else [])
    return {
        "group": GROUP,
        "task": [task_name(b) for b in benches],
        "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": False} for m in metrics],
        "metadata": {"version": 1.0},
    }


def _write(path: Path, header: str, cfg: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    body = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    tmp.write_text(f"{MARKER}: {header}\n{body}", encoding="utf-8")
    os.replace(tmp, path)


def write_retention_tasks(files: Mapping[str, str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Validate ``files`` ({benchmark: local file}) and write the task YAMLs and the group into
    ``out_dir``; earlier generated task files for other benchmarks are removed. Returns
    ``{"out_dir", "group", "tasks": {bench: {"task", "yaml", "n_rows", "data_file"}}}``."""
    unknown = sorted(set(files) - set(BENCHMARKS))
    if unknown or not files:
        raise ValueError(f"benchmarks {unknown or '(none)'}: expected one or more of {list(BENCHMARKS)}")
    benches = [b for b in BENCHMARKS if b in files]  # fixed order
    n_rows = {b: validate_file(b, files[b]) for b in benches}  # all files checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"out_dir": str(out.resolve()), "group": GROUP, "tasks": {}}
    for b in benches:
        path = out / f"{task_name(b)}.yaml"
        _write(path, f"lm-eval's own {b} task on a local file.", task_config(b, files[b]))
        result["tasks"][b] = {"task": task_name(b), "yaml": str(path), "n_rows": n_rows[b],
                              "data_file": str(Path(files[b]).resolve())}
    for stale in out.glob(f"{GROUP}_*.yaml"):
        if stale.stem.removeprefix(f"{GROUP}_") not in benches and stale.read_text().startswith(MARKER):
            stale.unlink()
    _write(out / f"{GROUP}.yaml", "mean acc (and acc_norm where reported) over the benchmarks.", group_config(benches))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the task YAMLs (pass it to lm-eval's --include_path)")
    for b, spec in BENCHMARKS.items():
        p.add_argument(f"--{b}", metavar="FILE", help=f"{b}: .jsonl/.parquet/.csv in the format of {spec.columns}")
    args = p.parse_args(argv)
    files = {b: getattr(args, b) for b in BENCHMARKS if getattr(args, b)}
    if not files:
        p.error(f"give at least one of {', '.join('--' + b for b in BENCHMARKS)}")
    try:
        res = write_retention_tasks(files, args.out)
    except RetentionDataError as e:
        p.exit(2, f"error: {e}\n")
    for b, t in res["tasks"].items():
        print(f"{t['task']}: {t['n_rows']} rows from {t['data_file']}")
    print(f"\nHF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lm_eval --model hf --model_args pretrained=MODEL "
          f"--include_path {res['out_dir']} --tasks {GROUP} --output_path OUT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
