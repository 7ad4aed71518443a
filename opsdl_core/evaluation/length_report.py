"""Tables and plots of lm-eval scores per context length, one line per model.

    python -m opsdl_core.evaluation.length_report --db var/lineage.duckdb --task opsdl_ruler --out var/artifacts/ruler
        [--checkpoint base:HASH=base --checkpoint HASH=opsdl ...]

reads ``eval_scores`` rows (written by ``opsdl_core.evaluation.lm_eval.ingest``) and writes ``ruler.md`` (a
table per model: tasks × lengths) and ``ruler.png`` (the group's score against context length).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .plots import pyplot, save_figure

__all__ = ["length_table", "length_curve_png", "scores_by_model"]


def scores_by_model(rows: Iterable[dict[str, Any]], labels: dict[str, str] | None = None
                    ) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """``{model label: {task: {length: row}}}`` from score rows with checkpoint_id (or model),
    task, context_length and value; only per-length rows (context_length > 0)."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if not r.get("context_length"):
            continue
        key = r.get("model") or r["checkpoint_id"]
        out[(labels or {}).get(key, key)][r["task"]][int(r["context_length"])] = r
    return out


def length_table(by_task: dict[str, dict[int, dict[str, Any]]], *, group: str | None = None) -> str:
    """Markdown: one row per task (the group first), one column per length, value ± stderr (n)."""
    lengths = sorted({x for per in by_task.values() for x in per})
    tasks = sorted(by_task, key=lambda t: (t != group, t))
    lines = ["| task | " + " | ".join(str(x) for x in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for t in tasks:
        cells = []
        for x in lengths:
            r = by_task[t].get(x)
            if r is None:
                cells.append("—")
                continue
            se = f" ± {r['stderr']:.2f}" if r.get("stderr") is not None else ""
            n = f" (n={r['n']})" if r.get("n") else ""
            cells.append(f"{r['value']:.2f}{se}{n}")
        name = f"**{t}**" if t == group else t
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def length_curve_png(series: dict[str, dict[int, tuple[float, float | None]]], path: Path, *,
                     title: str = "accuracy against context length") -> Path:
    """``series``: ``{model label: {length: (value, stderr or None)}}``; one line per model, error
    bars where a stderr is known, lengths on a log2 axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for label, points in series.items():
        xs = sorted(points)
        ys = [points[x][0] for x in xs]
        errs = [points[x][1] or 0.0 for x in xs]
        ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, lw=1.5, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    lengths = sorted({x for p in series.values() for x in p})
    ax.set_xticks(lengths, [str(x) for x in lengths])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (model tokens)", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=90)


def write_report(rows: Sequence[dict[str, Any]], out: Path, *, group: str, labels: dict[str, str] | None = None,
                 name: str = "ruler") -> tuple[Path, Path]:
    by_model = scores_by_model(rows, labels)
    if not by_model:
        raise ValueError(f"no per-length scores for {group}; expected rows with context_length > 0")
    md = [f"# {group}: score per context length", ""]
    for label, by_task in by_model.items():
        md += [f"## {label}", "", length_table(by_task, group=group), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(md))
    series = {label: {x: (r["value"], r.get("stderr")) for x, r in by_task.get(group, {}).items()}
              for label, by_task in by_model.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:  # the group was not run (single tasks): one line per model and task
        series = {f"{label} {task}": {x: (r["value"], r.get("stderr")) for x, r in per.items()}
                  for label, by_task in by_model.items() for task, per in by_task.items()}
    png = length_curve_png(series, out / f"{name}.png", title=f"{group}")
    return out / f"{name}.md", png


def main(argv: Sequence[str] | None = None) -> int:
    from ..lineage.store import LineageStore

    ap = argparse.ArgumentParser(prog="python -m opsdl_core.evaluation.length_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path)
    ap.add_argument("--task", default="opsdl_ruler", help="the group (or task) whose curve is plotted")
    ap.add_argument("--checkpoint", action="append", default=[], help="CHECKPOINT_ID=LABEL (default: all)")
    ap.add_argument("--out", type=Path, default=Path("var/artifacts/ruler"))
    args = ap.parse_args(argv)
    labels = dict(c.split("=", 1) for c in args.checkpoint)
    where = f"WHERE checkpoint_id IN ({','.join('?' * len(labels))})" if labels else ""
    cols, rows = LineageStore(args.db).query(
        "SELECT checkpoint_id, task, context_length, value, stderr, n FROM eval_scores "
        f"{where} AND task LIKE ? ORDER BY checkpoint_id" if where else
        "SELECT checkpoint_id, task, context_length, value, stderr, n FROM eval_scores WHERE task LIKE ?",
        [*labels, f"{args.task}%"])
    md, png = write_report([dict(zip(cols, r)) for r in rows], args.out, group=args.task, labels=labels or None)
    print(md.read_text())
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
