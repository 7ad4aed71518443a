"""The experiment's comparison (``opsdl_core.experiment``): per-method statistics over seeds, the
markdown table and the plots (accuracy against length, sample efficiency, student–teacher gaps)."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.plots import pyplot, save_figure

if TYPE_CHECKING:
    from .plan import ExperimentSettings

__all__ = ["summarize", "comparison_markdown", "write_comparison", "answer_map", "paired_counts", "paired_summary",
           "sign_test_p", "error_summary"]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(evals: list[dict[str, Any]], trained: list[dict[str, Any]], s: "ExperimentSettings") -> dict[str, Any]:
    """Per method: accuracy by (family, context, length) as mean and spread over seeds of the final
    models; the sample-efficiency curve from the intermediate ones; prompts and training time."""
    final_step = {(t["method"], t["seed"]): t["steps"] for t in trained}
    seconds_at = {(t["method"], t["seed"]): {int(k): v for k, v in (t.get("seconds_at_step") or {}).items()}
                  for t in trained}
    cells: dict[tuple[str, str, str, int], list[float]] = {}
    curve: dict[tuple[str, str, int, int], list[float]] = {}
    curve_seconds: dict[tuple[str, str, int, int], list[float]] = {}
    answers: dict[tuple[str, Any, str, str, int], dict[str, bool]] = {}
    errors: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for e in evals:
        p = e["params"]
        method, seed, step = p["method"], p.get("seed"), int(p.get("step") or 0)
        is_final = method == "base" or final_step.get((method, seed)) == step
        for r in e["rows"]:
            if is_final:
                cells.setdefault((method, r["task"], r["context"], int(r["context_length"])), []).append(r["value"])
                if r.get("answers"):
                    answers[(method, seed, r["task"], r["context"], int(r["context_length"]))] = answer_map(r)
                    _count_errors(errors, (method, r["task"], r["context"], int(r["context_length"])), seed,
                                  r["answers"])
            if r["context"] == "long":
                key = (method, r["task"], int(r["context_length"]), int(p.get("prompts_seen") or 0))
                curve.setdefault(key, []).append(r["value"])
                secs = 0.0 if method == "base" else seconds_at.get((method, seed), {}).get(step)
                if secs is not None:
                    curve_seconds.setdefault(key, []).append(secs)
    methods = ["base"] + list(s.methods)
    table = []
    for m in methods:
        row: dict[str, Any] = {"method": m, "scores": {}}
        for (mm, task, ctx, length), xs in sorted(cells.items()):
            if mm == m:
                mean, sd = _mean_sd(xs)
                row["scores"][f"{task}|{ctx}|{length}"] = {"mean": mean, "sd": sd, "n_seeds": len(xs)}
        runs = [t for t in trained if t["method"] == m]
        if runs:
            row["prompts"] = runs[0]["prompts"]
            row["train_seconds"] = _mean_sd([float(t["train_seconds"] or 0) for t in runs])
        table.append(row)
    curves = {}
    for (m, task, length, seen), xs in sorted(curve.items()):
        secs = curve_seconds.get((m, task, length, seen))
        curves.setdefault(f"{m}|{task}|{length}", []).append({
            "prompts_seen": seen, "mean": statistics.fmean(xs), "sd": _mean_sd(xs)[1], "n": len(xs),
            "train_seconds": round(statistics.fmean(secs), 1) if secs and len(secs) == len(xs) else None})
    base_curves = {k: v for k, v in curves.items() if k.startswith("base|")}
    for key, pts in curves.items():  # every method's curve starts at the base model (0 prompts)
        m, task, length = key.split("|")
        b = base_curves.get(f"base|{task}|{length}")
        if m != "base" and b and pts[0]["prompts_seen"] != 0:
            pts.insert(0, b[0])
    gaps: dict[str, dict[int, list[float]]] = {}
    heat: dict[str, list[list[float]]] = {}
    for e in evals:
        p = e["params"]
        for r in e.get("snapshot") or []:
            gap = [a - b for a, b in zip(r["student_token_logprobs"], r["teacher_token_logprobs"])]
            for pos, g in enumerate(gap):
                gaps.setdefault(p["method"], {}).setdefault(pos, []).append(g)
            if p.get("seed") in (None, s.seeds[0]):
                heat.setdefault(p["method"], []).append(gap)
    gap_by_position = {m: [{"position": pos, "mean_gap": statistics.fmean(v), "n": len(v)}
                           for pos, v in sorted(by.items())] for m, by in gaps.items()}
    out = {"methods": methods, "lengths": list(s.lengths), "seeds": list(s.seeds), "curve_length": s.curve_at,
           "gap_by_position": gap_by_position, "gap_examples": heat,
           "table": table,
           "curves": curves, "trained": trained}
    out["transfer"] = transfer_summary(out)
    out["paired"] = paired_summary(answers)
    out["errors"] = error_summary(errors, methods)
    return out


def _count_errors(acc: dict[tuple[str, str, str, int], dict[str, Any]], key: tuple[str, str, str, int], seed: Any,
                  answers: list[dict[str, Any]]) -> None:
    """Add one evaluation's wrong answers by kind (for the task and its kind); answers stored before
    error kinds existed count as wrong only."""
    wrong = [a for a in answers if not a["correct"]]
    method, task, ctx, length = key
    for k in {key, (method, task.split(":", 1)[0], ctx, length)}:
        c = acc.setdefault(k, {"wrong": 0, "distractor": 0, "other": 0, "seeds": set()})
        c["wrong"] += len(wrong)
        c["distractor"] += sum(a.get("error") == "distractor" for a in wrong)
        c["other"] += sum(a.get("error") == "other" for a in wrong)
        c["seeds"].add(seed)


def error_summary(errors: dict[tuple[str, str, str, int], dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per task (and task kind) and context: each method's wrong answers per model (the mean over
    its seeds), split into those naming a distractor's value (the wrong fact found) and the others
    (no fact of the context: usually an invented value). Training that trades the first for the
    second has taught the model to avoid the wrong fact, not where the right one is."""
    cells = sorted({(t, c, n) for (_, t, c, n) in errors}, key=lambda k: (k[0] not in KINDS, k[0], k[2]))
    out = []
    for t, c, n in cells:
        by = {}
        for m in methods:
            if (e := errors.get((m, t, c, n))) is not None:
                by[m] = {k: e[k] / len(e["seeds"]) for k in ("wrong", "distractor", "other")} | {
                    "seeds": len(e["seeds"])}
        out.append({"tasks": t, "context_length": n if c == "long" else 0, "by_method": by})
    return out


def format_p(p: float) -> str:
    """A p-value for a table: three decimals, and a small one as ``< 0.001`` (never ``0.000``)."""
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def sign_test_p(gained: int, lost: int) -> float:
    """Exact two-sided sign test: the chance of a split at least this uneven between questions
    gained and lost if either were equally likely (the changed questions only, as McNemar's test)."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def answer_map(row: dict[str, Any]) -> dict[str, bool]:
    """``{question id: right?}`` of an evaluation row that carries its answers (else empty)."""
    return {a["id"]: bool(a["correct"]) for a in row.get("answers") or []}


def paired_counts(now: dict[str, bool], before: dict[str, bool]) -> tuple[int, int, int]:
    """Questions right now and wrong before (gained), the reverse (lost), and how many were asked
    of both (pairs); questions only one side answered are left out."""
    both = [(ok, before[q]) for q, ok in now.items() if q in before]
    return (sum(n and not b for n, b in both), sum(b and not n for n, b in both), len(both))


def paired_summary(answers: dict[tuple[str, Any, str, str, int], dict[str, bool]]) -> list[dict[str, Any]]:
    """Per trained method, task kind and context: the questions each final model answers that the
    base model did not (gained) and the reverse (lost), summed over seeds and the kind's tasks, with
    the sign test's p-value. The same questions are asked of both, so this reads a difference of a
    few questions better than two accuracies do."""
    acc: dict[tuple[str, str, int], list[int]] = {}
    for (method, seed, task, ctx, length), got in answers.items():
        base = answers.get(("base", None, task, ctx, length))
        if method == "base" or base is None:
            continue
        kind = task.split(":", 1)[0]
        keys = {(method, task, length), (method, kind, length)}  # the task, and its kind when it has one
        counts = paired_counts(got, base)
        for key in keys:
            acc[key] = [x + y for x, y in zip(acc.get(key, [0, 0, 0]), counts)]
    rows = [{"method": m, "tasks": t, "context_length": n, "gained": g, "lost": lo, "pairs": pairs,
             "p_sign": sign_test_p(g, lo)} for (m, t, n), (g, lo, pairs) in acc.items()]
    return sorted(rows, key=lambda r: (r["method"], r["tasks"] not in KINDS, r["tasks"], r["context_length"]))


KINDS = ("in_family", "out_of_family", "ruler")


def transfer_summary(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per trained method, task kind (in-family, out-of-family, RULER) and context length: mean
    accuracy over the kind's tasks of the base and of the method (each task first averaged over
    seeds), the gain, and on how many tasks the method beats the base; ``context_length`` 0 is
    C_s only (short-context retention)."""
    base = next((r["scores"] for r in summary["table"] if r["method"] == "base"), {})
    rows = []
    for r in summary["table"]:
        if r["method"] == "base":
            continue
        by: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
        for key, cell in r["scores"].items():
            task, ctx, length = key.split("|")
            kind = task.split(":", 1)[0]
            if kind in KINDS and key in base:
                by.setdefault((kind, int(length)), []).append((task, base[key]["mean"], cell["mean"]))
        for (kind, length), xs in sorted(by.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
            b, m = statistics.fmean(x[1] for x in xs), statistics.fmean(x[2] for x in xs)
            rows.append({"method": r["method"], "kind": kind, "context_length": length, "tasks": len(xs),
                         "base": b, "trained": m, "gain": m - b, "tasks_improved": sum(x[2] > x[1] for x in xs)})
    return rows


def _fmt(c: dict[str, Any] | None) -> str:
    if not c:
        return "—"
    return f"{c['mean']:.3f}" + (f" ± {c['sd']:.3f}" if c.get("n_seeds", c.get("n", 1)) > 1 else "")


def _context_cell(r: dict[str, Any]) -> str:
    return f"{r['context_length']}" if r["context_length"] else "C_s only"


def _section(title: str, header: list[str], right: int, rows: list[str], note: str) -> list[str]:
    """A Markdown section: a ``###`` title, a table (the last ``right`` columns right-aligned) and a note."""
    return [f"### {title}", "", "| " + " | ".join(header) + " |",
            "|" + "---|" * (len(header) - right) + "---:|" * right, *rows, "", note, ""]


def transfer_markdown(summary: dict[str, Any]) -> list[str]:
    rows = summary.get("transfer") or []
    if not rows:
        return []
    names = {"in_family": "in-family", "out_of_family": "out-of-family (never trained)", "ruler": "RULER (not trained)"}
    return _section(
        "In-family against out-of-family gains",
        ["method", "tasks", "context", "n tasks", "base", "trained", "gain", "tasks improved"], 6,
        [f"| {r['method']} | {names[r['kind']]} | {_context_cell(r)} | {r['tasks']} | {r['base']:.3f} | "
         f"{r['trained']:.3f} | {r['gain']:+.3f} | {r['tasks_improved']}/{r['tasks']} |" for r in rows],
        "Means over the kind's tasks; each task's trained score is first averaged over seeds "
        "(per-task spreads in the tables below).")


def paired_markdown(summary: dict[str, Any]) -> list[str]:
    rows = summary.get("paired") or []
    if not rows:
        return []
    return _section(
        "Questions gained and lost against the base model (paired)",
        ["method", "tasks", "context", "gained", "lost", "questions × seeds", "sign test p"], 5,
        [f"| {r['method']} | {r['tasks']} | {_context_cell(r)} | {r['gained']} | {r['lost']} | {r['pairs']} | "
         f"{format_p(r['p_sign'])} |" for r in rows],
        "Gained: right after training, wrong before; lost: the reverse; summed over seeds (and "
        "over the tasks of a kind). p: exact two-sided sign test on gained against lost.")


def efficiency_markdown(summary: dict[str, Any]) -> list[str]:
    """The sample-efficiency curves as a table: accuracy of each checkpoint at the curve length by
    prompts seen (equal prompts: the same rows for every method) and by training seconds; then each
    method at equal wall-clock, its last checkpoint within the fastest method's whole training time."""
    length = summary.get("curve_length") or max(summary["lengths"])
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for key, pts in summary["curves"].items():
        m, task, n = key.split("|")
        if int(n) == length and m != "base":
            by_task.setdefault(task, {})[m] = pts
    lines: list[str] = []
    for task, methods in sorted(by_task.items()):
        lines += [f"### Sample efficiency: {task} accuracy at {length} tokens by prompts and by training time", "",
                  "| method | prompts seen | train s | accuracy |", "|---|---:|---:|---:|"]
        for m, pts in methods.items():
            for p in pts:
                secs = "—" if p.get("train_seconds") is None else f"{p['train_seconds']:.0f}"
                lines.append(f"| {m} | {p['prompts_seen']} | {secs} | {_fmt(p)} |")
        totals = {m: pts[-1].get("train_seconds") for m, pts in methods.items()}
        if len(methods) > 1 and all(t is not None for t in totals.values()):
            budget = min(totals.values())
            cells = []
            for m, pts in methods.items():
                within = [p for p in pts if p.get("train_seconds") is not None and p["train_seconds"] <= budget]
                if within:
                    p = within[-1]
                    cells.append(f"{m} {_fmt(p)} ({p['prompts_seen']} prompts)")
            lines += ["", f"At equal wall-clock ({budget:.0f} s of training steps, the fastest method's whole "
                          f"run): " + "; ".join(cells) + "."]
        lines += ["", "Train s: the steps' own time (rollout, scoring, backward, optimizer; mean over seeds), "
                      "not model loading or checkpoint writes; 0 prompts is the base model.", ""]
    return lines


def _error_cell(c: dict[str, float] | None) -> str:
    if not c:
        return "—"

    def f(x: float) -> str:
        return f"{x:.0f}" if x == round(x) else f"{x:.1f}"

    rest = c["wrong"] - c["distractor"] - c["other"]  # answers stored without their kind
    return f"{f(c['wrong'])} ({f(c['distractor'])} / {f(c['other'])}" + (f" / {f(rest)} unclassified)" if rest else ")")


def errors_markdown(summary: dict[str, Any]) -> list[str]:
    rows = summary.get("errors") or []
    methods = [m for m in summary["methods"] if any(m in r["by_method"] for r in rows)]
    if not rows or not methods:
        return []
    return _section(
        "Wrong answers: a distractor's value or something else", ["tasks", "context", *methods], len(methods) + 1,
        [f"| {r['tasks']} | {_context_cell(r)} | " + " | ".join(_error_cell(r["by_method"].get(m)) for m in methods)
         + " |" for r in rows],
        "Wrong answers per model (mean over seeds; summed over the tasks of a kind): in brackets, "
        "those naming a distractor's value (another record's, the count one off, the other option) / "
        "those naming none (mostly values found nowhere in the context).")


def comparison_markdown(summary: dict[str, Any]) -> str:
    lengths = summary["lengths"]
    families = sorted({k.split("|")[0] for r in summary["table"] for k in r["scores"]},
                      key=lambda f: (f != "in_family", f))
    lines = (transfer_markdown(summary) + paired_markdown(summary) + errors_markdown(summary)
             + efficiency_markdown(summary))
    for fam in families:
        title = {"in_family": "training templates, fresh keys (in-family)",
                 "transfer": "templates never trained on (transfer)",
                 "foreign": "short-context questions in formats never trained on (foreign; C_s only)"}.get(fam, fam)
        fam_lengths = sorted({int(k.split("|")[2]) for r in summary["table"] for k in r["scores"]
                              if k.startswith(f"{fam}|long|")}) or ([] if fam == "foreign" else lengths)
        lines += [f"### {'Accuracy' if fam == 'foreign' else 'Long-context accuracy'}: {title}", "",
                  "| " + " | ".join(["method", *(f"{n} tokens" for n in fam_lengths), "C_s only", "prompts",
                                     "train s"]) + " |",
                  "|---|" + "---:|" * (len(fam_lengths) + 3)]
        for r in summary["table"]:
            sc = r["scores"]
            if not any(k.startswith(f"{fam}|") for k in sc):
                continue
            cols = [_fmt(sc.get(f"{fam}|long|{n}")) for n in fam_lengths] + [_fmt(sc.get(f"{fam}|short|0"))]
            ts = r.get("train_seconds")
            cols += [str(r.get("prompts", 0)), f"{ts[0]:.0f}" if ts else "—"]
            lines.append(f"| {r['method']} | " + " | ".join(cols) + " |")
        lines.append("")
    lines.append(f"Mean ± standard deviation over seeds {summary['seeds']} (final models; greedy answers).")
    return "\n".join(lines) + "\n"


def _kind_means(summary: dict[str, Any], lengths: list[int]) -> None:
    """Add ``in_family`` / ``out_of_family`` cells to each method's scores: the mean over its tasks of
    that kind (per seed-averaged task), for the accuracy-vs-length panels."""
    for r in summary["table"]:
        for kind in ("in_family", "out_of_family"):
            for n in lengths:
                xs = [c for k, c in r["scores"].items() if k.startswith(kind + ":") and k.endswith(f"|long|{n}")]
                if xs:
                    r["scores"][f"{kind}|long|{n}"] = {"mean": statistics.fmean(c["mean"] for c in xs),
                                                       "sd": statistics.fmean(c["sd"] for c in xs),
                                                       "n_seeds": xs[0]["n_seeds"]}


def _line(ax: Any, pts: list[tuple[int, dict[str, Any]]], label: str) -> None:
    """One method's means with its spread over seeds as error bars."""
    if pts:
        ax.errorbar([x for x, _ in pts], [c["mean"] for _, c in pts], yerr=[c["sd"] for _, c in pts], marker="o",
                    capsize=3, label=label, ls="--" if label == "base" else "-")


def _axes(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.02, 1.02)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_comparison(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    plt = pyplot()

    paths = {"json": out / "comparison.json", "md": out / "comparison.md",
             "length_png": out / "accuracy_vs_length.png", "efficiency_png": out / "sample_efficiency.png"}
    paths["json"].write_text(json.dumps(summary, indent=1))
    paths["md"].write_text(comparison_markdown(summary))
    lengths = summary["lengths"]
    fams = sorted({k.split("|")[0] for r in summary["table"] for k in r["scores"]}, key=lambda f: f != "in_family")
    if any(":" in f for f in fams):  # curriculum: one panel per task kind, not per family
        fams = [f for f in fams if ":" not in f] + [f for f in ("in_family", "out_of_family")
                                                    if any(t.startswith(f + ":") for t in fams)]
        summary = {**summary, "table": copy.deepcopy(summary["table"])}  # the plot's own copy
        _kind_means(summary, lengths)
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for r in summary["table"]:
            pts = [(n, r["scores"].get(f"{fam}|long|{n}")) for n in lengths]
            _line(ax, [(n, c) for n, c in pts if c], r["method"])
        _axes(ax, f"{fam}: long-context accuracy", "context length (tokens)")
    save_figure(fig, paths["length_png"])
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.4))
    length = summary.get("curve_length") or max(lengths)
    for key, pts in summary["curves"].items():
        m, fam, n = key.split("|")
        if fam == "in_family" and int(n) == length and m != "base":
            _line(ax, [(p["prompts_seen"], p) for p in pts], m)
            _line(ax_t, [(p["train_seconds"], p) for p in pts if p.get("train_seconds") is not None], m)
    _axes(ax, f"sample efficiency: in-family accuracy at {length} tokens", "training prompts seen")
    _axes(ax_t, f"in-family accuracy at {length} tokens by training time", "training seconds (steps only)")
    save_figure(fig, paths["efficiency_png"])
    if summary.get("gap_by_position"):
        paths["gap_png"] = out / "gap_by_position.png"
        paths["heatmap_png"] = out / "gap_heatmap.png"
        _gap_plots(summary, paths["gap_png"], paths["heatmap_png"])
    return paths


def _gap_plots(summary: dict[str, Any], line_path: Path, heat_path: Path) -> None:
    """Mean student − teacher log-prob by answer position, one line per model; and the per-token
    gaps of a few sampled answers, one panel per model (rows: samples, columns: positions)."""
    import numpy as np

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for m in summary["methods"]:
        pts = summary["gap_by_position"].get(m)
        if pts:
            ax.plot([p["position"] for p in pts], [p["mean_gap"] for p in pts], marker=".",
                    ls="--" if m == "base" else "-", label=m)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_title("student − teacher log-prob by answer position", fontsize=10)
    ax.set_xlabel("answer token position")
    ax.set_ylabel("mean gap (nats)")
    ax.legend(fontsize=8)
    save_figure(fig, line_path)
    models = [m for m in summary["methods"] if summary["gap_examples"].get(m)]
    width = max(len(g) for m in models for g in summary["gap_examples"][m])
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, min(2 + 0.3 * width, 14)), 1.2 + 0.9 * len(models)),
                             squeeze=False)
    fig.suptitle("student − teacher log-prob per answer token (blue: the student is surer, red: the teacher)",
                 fontsize=9)
    for ax, m in zip(axes[:, 0], models):
        rows = summary["gap_examples"][m]
        grid = np.full((len(rows), width), np.nan)
        for i, g in enumerate(rows):
            grid[i, : len(g)] = g
        im = ax.imshow(grid, aspect="auto", cmap="RdBu", vmin=-4, vmax=4, interpolation="nearest")
        ax.set_ylabel(m, fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("answer token position")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, label="gap (nats)")
    save_figure(fig, heat_path, tight=False)
