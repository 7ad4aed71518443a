"""The four retention benchmarks: where lm-eval defines each, the data set it reads, and the
checks that a user's local file is in that data set's own column format.

No lm-eval import: lm-eval's task folder is located on disk (``lm_eval_tasks_dir``), and
``tests/test_retention.py`` checks every fact written here against lm-eval's own configs.

A local file is read exactly as the generated lm-eval task reads it (``datasets.load_dataset``
with the same builder and keyword arguments, :func:`loader_kwargs`), so the checks see the types
lm-eval will see. Usage::

    from evals.retention.benchmarks import validate_file
    n_rows = validate_file("arc_challenge", "data/arc_challenge_test.jsonl")  # or RetentionDataError
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "REQUIRED_COLUMNS",
    "Benchmark",
    "RetentionDataError",
    "builtin_yaml",
    "file_format",
    "lm_eval_tasks_dir",
    "load_rows",
    "loader_kwargs",
    "mmlu_subjects",
    "validate_file",
]

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class RetentionDataError(ValueError):
    """A local benchmark file is missing, unreadable, or not in the data set's column format."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # lm-eval's task (or group) name
    hub: str  # lm-eval's dataset_path
    hub_config: str | None  # lm-eval's dataset_name (mmlu: one per subject, see mmlu_subjects)
    lm_eval_yaml: str  # lm-eval's task config, relative to lm_eval/tasks
    columns: str  # the data set's column format, for messages
    splits: tuple[str, ...]  # splits lm-eval's task reads from the hub data set
    metrics: tuple[str, ...]  # what lm-eval's task reports
    check_row: Callable[[dict[str, Any]], list[tuple[str, str]]]  # row -> [(field, problem)]


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _str_list(v: Any, min_len: int = 2) -> bool:
    return isinstance(v, list) and len(v) >= min_len and all(isinstance(x, str) for x in v)


def _check_arc(row: dict[str, Any]) -> list[tuple[str, str]]:
    bad = []
    if not (_is_str(row.get("question")) and row["question"].strip()):
        bad.append(("question", "expected a non-empty string"))
    ch = row.get("choices")
    if not isinstance(ch, dict):
        return bad + [("choices", f"expected a struct {{text: [str], label: [str]}}, got {type(ch).__name__}")]
    for sub in ("text", "label"):
        if sub not in ch:
            bad.append((f"choices.{sub}", "missing; expected a struct {text: [str], label: [str]}"))
        elif not _str_list(ch[sub]):
            bad.append((f"choices.{sub}", f"expected a list of at least 2 strings, got {ch[sub]!r}"))
    if bad:
        return bad
    if len(ch["text"]) != len(ch["label"]):
        bad.append(("choices", f"{len(ch['text'])} texts but {len(ch['label'])} labels; expected equal lengths"))
    if not _is_str(row.get("answerKey")) or row["answerKey"] not in ch["label"]:
        bad.append(("answerKey", f"{row.get('answerKey')!r} is not one of choices.label {ch['label']}"))
    return bad


def _check_hellaswag(row: dict[str, Any]) -> list[tuple[str, str]]:
    bad = [(f, "expected a string") for f in ("activity_label", "ctx_a", "ctx_b") if not _is_str(row.get(f))]
    endings = row.get("endings")
    if not _str_list(endings):
        return bad + [("endings", f"expected a list of at least 2 strings, got {endings!r}")]
    label = row.get("label")
    ok = (isinstance(label, int) and not isinstance(label, bool)) or (_is_str(label) and label.isdigit())
    if not ok or not 0 <= int(label) < len(endings):
        bad.append(("label", (f"{label!r} is not an index into the {len(endings)} endings (expected '0'.."
                              f"'{len(endings) - 1}'; unlabeled test rows cannot be scored)")))
    return bad


def _check_winogrande(row: dict[str, Any]) -> list[tuple[str, str]]:
    bad = [(f, "expected a string") for f in ("option1", "option2") if not _is_str(row.get(f))]
    if not _is_str(row.get("sentence")) or "_" not in row["sentence"]:
        bad.append(("sentence", f"expected a string with one '_' blank, got {row.get('sentence')!r}"))
    if row.get("answer") not in ("1", "2"):
        bad.append(("answer", (f"{row.get('answer')!r}: expected the string '1' or '2' (unlabeled test rows "
                               "cannot be scored)")))
    return bad


def _check_mmlu(row: dict[str, Any]) -> list[tuple[str, str]]:
    bad = [(f, "expected a non-empty string") for f in ("question", "subject")
           if not (_is_str(row.get(f)) and row[f].strip())]
    if not _str_list(row.get("choices"), 4) or len(row["choices"]) != 4:
        bad.append(("choices", f"expected a list of exactly 4 strings, got {row.get('choices')!r}"))
    ans = row.get("answer")
    if not (isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans <= 3):
        bad.append(("answer", f"{ans!r}: expected an integer 0-3 (the index of the right choice)"))
    return bad


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mmlu", "cais/mmlu", None, "mmlu/default/_default_template_yaml",
              "cais/mmlu ('all'): question (str), subject (str), choices (list of 4 str), answer (int 0-3)",
              ("test", "dev"), ("acc",), _check_mmlu),
    Benchmark("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "arc/arc_challenge.yaml",
              "allenai/ai2_arc ARC-Challenge: id, question (str), choices {text: [str], label: [str]}, "
              "answerKey (one of choices.label)", ("train", "validation", "test"), ("acc", "acc_norm"), _check_arc),
    Benchmark("hellaswag", "Rowan/hellaswag", None, "hellaswag/hellaswag.yaml",
              "Rowan/hellaswag: ind, activity_label (str), ctx_a (str), ctx_b (str), ctx, endings ([str]), "
              "source_id, split, split_type, label ('0'-'3')", ("train", "validation"), ("acc", "acc_norm"),
              _check_hellaswag),
    Benchmark("winogrande", "allenai/winogrande", "winogrande_xl", "winogrande/default.yaml",
              "allenai/winogrande winogrande_xl: sentence (str with a '_' blank), option1 (str), option2 (str), "
              "answer ('1' or '2')", ("train", "validation"), ("acc",), _check_winogrande),
)}

# The top-level columns lm-eval's config (and process_docs) reads; the rest of the format is optional.
REQUIRED_COLUMNS = {
    "mmlu": ("question", "subject", "choices", "answer"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
}


def lm_eval_tasks_dir() -> Path:
    """lm-eval's ``tasks`` folder, found without importing lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm-evaluation-harness is not installed (pip install lm-eval)")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def builtin_yaml(bench: str) -> Path:
    path = lm_eval_tasks_dir() / BENCHMARKS[bench].lm_eval_yaml
    if not path.is_file():
        raise FileNotFoundError(f"{bench}: lm-eval's task config {path} is missing; expected lm-eval 0.4.x")
    return path


def mmlu_subjects() -> list[str]:
    """The 57 subjects of lm-eval's ``mmlu`` group (one ``mmlu/default/mmlu_<subject>.yaml`` each)."""
    import yaml

    out = []
    for p in sorted((lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml")):
        out.append(yaml.safe_load(p.read_text(encoding="utf-8"))["dataset_name"])
    return out


def file_format(path: str | Path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise RetentionDataError(f"{path}: unsupported file type {Path(path).suffix!r}; expected one of "
                                 f"{sorted(FORMATS)}")
    return fmt


def loader_kwargs(bench: str, fmt: str) -> dict[str, Any]:
    """Extra ``datasets.load_dataset`` keywords for the format. CSV: every cell of the benchmark's
    columns stays a string (pandas would turn winogrande's ``answer`` "1" into an int and an option
    such as "None" into a missing value)."""
    if fmt != "csv":
        return {}
    return {"keep_default_na": False, "converters": {c: str for c in REQUIRED_COLUMNS[bench]}}


def load_rows(bench: str, path: str | Path):
    """The file as the generated task reads it: a ``datasets.Dataset`` (split ``test``)."""
    import datasets

    fmt = file_format(path)
    try:
        return datasets.load_dataset(fmt, data_files={"test": str(path)}, **loader_kwargs(bench, fmt))["test"]
    except Exception as e:
        raise RetentionDataError(f"{bench}: cannot read {path} as {fmt}: {type(e).__name__}: {e}; expected a "
                                 f"{fmt} file with the columns of {BENCHMARKS[bench].columns}") from e


def validate_file(bench: str, path: str | Path) -> int:
    """Check that ``path`` holds ``bench``'s data in the data set's own column format; returns the row
    count. Raises :class:`RetentionDataError` naming the file, the benchmark, the field and what was
    expected (the first bad row's problems, and how many rows are bad)."""
    if bench not in BENCHMARKS:
        raise RetentionDataError(f"unknown benchmark {bench!r}; expected one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[bench]
    path = Path(path)
    if not path.is_file():
        raise RetentionDataError(f"{bench}: file {path} does not exist; expected a .jsonl/.parquet/.csv file with "
                                 f"the columns of {spec.columns}")
    ds = load_rows(bench, path)
    missing = [c for c in REQUIRED_COLUMNS[bench] if c not in ds.column_names]
    if missing:
        raise RetentionDataError(f"{bench}: {path} is missing column(s) {missing}; expected the columns of "
                                 f"{spec.columns} (found: {ds.column_names})")
    if len(ds) == 0:
        raise RetentionDataError(f"{bench}: {path} has no rows; expected at least one row of {spec.columns}")
    first, n_bad = None, 0
    for i, row in enumerate(ds):
        problems = spec.check_row(row)
        if problems:
            n_bad += 1
            first = first or (i, problems)
    if first:
        i, problems = first
        what = "; ".join(f"field {f!r}: {p}" for f, p in problems)
        raise RetentionDataError(f"{bench}: {path} row {i}: {what} ({n_bad} of {len(ds)} rows have problems); "
                                 f"expected the columns of {spec.columns}")
    return len(ds)
