"""``opsdl``: the command line.

    opsdl train --config configs/demo.yaml [--set SECTION.FIELD=VALUE ...]
    opsdl eval run --model DIR --tasks opsdl_ruler --metadata '{"max_seq_lengths": [512]}' --out DIR --ingest
    opsdl eval ingest LM_EVAL_OUTPUT_DIR --checkpoint-id base:HASH   # record an lm-eval run's scores
    opsdl lineage sql "SELECT * FROM v_checkpoint_provenance"      [--db var/lineage.duckdb] [--json]
    opsdl lineage tables                                            # tables and views with row counts
    opsdl lineage ingest runs/demo [--experiment NAME]              # record a finished training run
    opsdl data curriculum|self-instruct|prose-docs ...             # training data files (opsdl data --help)
    opsdl config reference > docs/configuration.md                 # every run-config field, default and help
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence


def _format_table(cols: list[str], rows: list[tuple], max_width: int = 60) -> str:
    def cell(v: Any) -> str:
        s = "NULL" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    body = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in body]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _lineage(args: argparse.Namespace) -> int:
    import duckdb

    from .lineage.store import LineageLockTimeout, LineageStore, default_db_path, ingest_training_run

    db = args.db or default_db_path()
    if args.cmd in ("sql", "tables"):  # reads: the file opened read-only, DuckDB's external access off
        from pathlib import Path

        if not Path(db).exists():
            print(f"opsdl lineage: no lineage database at {db} (run the pipeline first, or pass --db)", file=sys.stderr)
            return 2
        store = LineageStore(db, read_only=True)
        if args.cmd == "tables":
            cols, rows = store.query("SELECT table_name, table_type FROM information_schema.tables "
                                     "WHERE table_schema = 'main' ORDER BY table_type, table_name")
            out = [(name, kind, store.count(name) if kind == "BASE TABLE" else None) for name, kind in rows]
            print(_format_table(["name", "type", "rows"], out))
            return 0
        try:
            cols, rows = store.query(args.query)
        except (duckdb.Error, LineageLockTimeout) as e:  # duckdb's own message names the table/column at fault
            print(f"opsdl lineage sql: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=1))
        else:
            print(_format_table(cols, rows))
        return 0
    store = LineageStore(db)
    if args.cmd == "ingest":
        res = ingest_training_run(store, args.run_dir, experiment=args.experiment)
        print(json.dumps(res, indent=1, default=str))
        return 0
    raise AssertionError(args.cmd)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="opsdl", description="OPSDL: on-policy self-distillation for long context")
    sub = ap.add_subparsers(dest="group", required=True)
    tr = sub.add_parser("train", help="train with OPSDL (same flags as python -m opsdl_core.train)", add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    ev = sub.add_parser("eval", help="lm-eval on a model, scores to the lineage store (python -m opsdl_core.evaluation.lm_eval)",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    da = sub.add_parser("data", help="write curriculum or self-instruct training data (opsdl_core.data.cli)",
                        add_help=False)
    da.add_argument("rest", nargs=argparse.REMAINDER)
    co = sub.add_parser("config", help="the run configuration")
    csub = co.add_subparsers(dest="cmd", required=True)
    csub.add_parser("reference", help="print every run-config field with its type, default and help (Markdown)")
    li = sub.add_parser("lineage", help="query or fill the DuckDB lineage store")
    li.add_argument("--db", default=None, help="database file (default: $OPSDL_LINEAGE_DB or $OPSDL_HOME/lineage.duckdb)")
    lsub = li.add_subparsers(dest="cmd", required=True)
    q = lsub.add_parser("sql", help="run read-only SQL and print the result")
    q.add_argument("query")
    q.add_argument("--json", action="store_true", help="print rows as JSON objects")
    lsub.add_parser("tables", help="list tables and views with their row counts")
    ing = lsub.add_parser("ingest", help="record a finished training run folder")
    ing.add_argument("run_dir")
    ing.add_argument("--experiment", default="default")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval", "data"):  # their own parsers (and --help) take every argument after it
        args = argparse.Namespace(group=argv[0], rest=argv[1:])
    else:
        args = ap.parse_args(argv)
    if args.group == "train":
        from .train.job import main as train_main

        return int(train_main(args.rest) or 0)
    if args.group == "eval":  # the evaluation suites live beside opsdl_core, in evals/
        from .evaluation.lm_eval import main as eval_main

        return int(eval_main(args.rest) or 0)
    if args.group == "data":
        from .data.cli import main as data_main

        return int(data_main(args.rest) or 0)
    if args.group == "config":
        from .config_reference import reference_markdown

        print(reference_markdown(), end="")
        return 0
    return _lineage(args)


if __name__ == "__main__":
    sys.exit(main())
