"""Small PNG plots for asset metadata (matplotlib, no display)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Sequence

from opsdl_core.evaluation.plots import pyplot, save_figure


def training_curves_png(metrics: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, key, title in zip(axes, ("kl_estimate", "loss", "rollout_accuracy"),
                              ("student-teacher KL (per token)", "loss", "rollout accuracy")):
        ys = [float(m.get(key, float("nan"))) for m in metrics]
        ax.plot(steps, ys, lw=0.8, alpha=0.35, label="per step")
        ax.plot(steps, _rolling_mean(ys, 5), lw=1.6, label="mean of 5")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def _rolling_mean(ys: Sequence[float], k: int) -> list[float]:
    """Mean of the last ``k`` values (fewer at the start); one prompt per step makes raw curves noisy."""
    return [sum(ys[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(ys))]


def accuracy_bars_png(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows``: dicts with suite, context, before, after."""
    plt = pyplot()
    labels = [f"{r['suite']}\n{r['context']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows)), 3))
    ax.bar([i - 0.2 for i in x], [r["before"] for r in rows], width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], [r["after"] for r in rows], width=0.4, label="OPSDL")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def png_markdown(path: Path, alt: str = "plot") -> str:
    """Markdown with the PNG inlined as a data URI (rendered by the Dagster UI)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"
