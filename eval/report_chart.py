"""PNG charts with matplotlib (the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def compare_chart(report: dict[str, Any], path: Path) -> None:
    """Exact match against latency and against cost, one labelled point per approach."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for name, r in report["approaches"].items():
        cost = r["cost"]
        unit = "gpu_s_per_1k_questions" if "gpu_s_per_1k_questions" in cost else "cpu_s_per_1k_questions"
        for ax, x in ((axes[0], r["latency"]["p50_s"]), (axes[1], cost[unit])):
            ax.scatter([x], [r["exact_match"]], s=40)
            ax.annotate(name, (x, r["exact_match"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    axes[0].set_xlabel("latency p50 (s per question)")
    dev = "GPU" if report.get("device") == "cuda" else "CPU"
    axes[1].set_xlabel(f"cost ({dev}-seconds per 1,000 questions)")
    for ax in axes:
        ax.set_ylabel("exact match")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"approaches on {report['questions']} held-out questions")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves_chart(series: dict[str, list[tuple[float, float]]], path: Path, *, title: str, ylabel: str,
                 log_y: bool = False) -> None:
    """Lines (step, value) per named series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="o" if len(pts) < 20 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bars_chart(values: dict[str, float], path: Path, *, title: str, xlabel: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, max(2.0, 0.35 * len(values) + 1)), dpi=100)
    names = list(values)
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
