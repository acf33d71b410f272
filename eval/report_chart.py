"""PNG charts with matplotlib (the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in display pixels."""

# Directions tried around a point, in order: right, up-right, up, up-left, left, down-left, down, down-right.
_DIRECTIONS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))


def _overlap(a: Box, b: Box) -> float:
    """Area of the intersection of two boxes (0 when they only touch or are apart)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(points: list[tuple[float, float]], sizes: list[tuple[float, float]], *, marker: float = 6.0,
                 obstacles: list[Box] = (), bounds: Box | None = None, gap: float = 3.0, step: float = 10.0,
                 rings: int = 12) -> list[Box]:
    """A box for each label (size (w, h)) near its point, greedily in display coordinates: offsets
    in 8 directions at growing distances are tried, and the first box that overlaps no earlier
    label, no marker (a square of half-side `marker` around every point), no other obstacle and
    stays within bounds is kept. Where none fits, the candidate with the least overlap is kept (out
    of bounds counting as overlap). Labels are placed in the order given."""
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    fixed = [*markers, *obstacles]
    placed: list[Box] = []
    for (px, py), (w, h) in zip(points, sizes):
        best, best_cost = None, float("inf")
        for ring in range(rings):
            d = marker + gap + ring * step
            for ux, uy in _DIRECTIONS:
                cx = px + ux * (d + w / 2)
                cy = py + uy * (d + h / 2)
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                cost = sum(_overlap(box, o) for o in placed) * 10 + sum(_overlap(box, o) for o in fixed)
                if bounds is not None:
                    inside = _overlap(box, bounds)
                    cost += w * h - inside
                if cost <= 1e-6:
                    best = box
                    break
                if cost < best_cost:
                    best, best_cost = box, cost
            else:
                continue
            break
        placed.append(best)
    return placed


def compare_chart(report: dict[str, Any], path: Path) -> dict[str, Any]:
    """F1 (with its interval bars) against cost per 1,000 questions, one marker style per family,
    one label per approach placed where it overlaps no other label, marker, bar or the legend.
    Returns the label boxes and marker centres in the saved image's pixels (y up), by approach."""
    from matplotlib.text import Text

    from domainlm.eval.stats import SCRATCH, family, per_1k

    plt = _plt()
    style = {"base": ("o", "C0", "existing base model"), SCRATCH: ("^", "C3", "trained from scratch")}
    dev = "GPU" if report.get("device") == "cuda" else "CPU"
    pct = round(100 * report.get("confidence", 0.95))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    pts: dict[str, tuple[float, float, float, float]] = {}
    for name, r in report["approaches"].items():
        x = per_1k(r)
        if x is None or r.get("f1") is None:
            continue
        lo, hi = (r.get("intervals") or {}).get("f1") or (r["f1"], r["f1"])
        pts[name] = (x, r["f1"], lo, hi)
    fams = sorted({family(n) for n in pts}, key=lambda f: f != "base")
    for f in fams:
        names = [n for n in pts if family(n) == f]
        xs, ys = [pts[n][0] for n in names], [pts[n][1] for n in names]
        yerr = [[max(0.0, pts[n][1] - pts[n][2]) for n in names], [max(0.0, pts[n][3] - pts[n][1]) for n in names]]
        marker, color, label = style[f]
        ax.errorbar(xs, ys, yerr=yerr, fmt=marker, color=color, ecolor=color, elinewidth=1, capsize=3, markersize=7,
                    label=label if len(fams) > 1 else None)
    xs = [p[0] for p in pts.values()]
    ax.margins(x=0.2)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    elif xs:
        ax.set_xlim(left=0)
    top = max([p[3] for p in pts.values()] + [0.1])
    ax.set_ylim(0, min(1.05, top + 0.15))
    ax.set_xlabel(f"cost ({dev}-seconds per 1,000 questions)")
    ax.set_ylabel(f"F1 (bars: {pct}% interval)")
    ax.grid(alpha=0.3)
    ax.set_title(f"approaches on {report['questions']} held-out questions")
    legend = ax.legend(loc="upper left", fontsize=9) if len(fams) > 1 else None
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    names = list(pts)
    disp = {n: tuple(ax.transData.transform((pts[n][0], pts[n][1]))) for n in names}
    obstacles = []
    for n in names:
        (px, ylo), (_, yhi) = ax.transData.transform([(pts[n][0], pts[n][2]), (pts[n][0], pts[n][3])])
        obstacles.append((px - 5, ylo - 1, px + 5, yhi + 1))   # the interval bar with its caps
    if legend is not None:
        obstacles.append(tuple(legend.get_window_extent(renderer).extents))
    sizes = []
    for n in names:
        t = ax.text(0, 0, n, fontsize=9)
        bb = t.get_window_extent(renderer)
        sizes.append((bb.width + 2, bb.height + 2))
        t.remove()
    boxes = place_labels([disp[n] for n in names], sizes, marker=6.0, obstacles=obstacles,
                         bounds=tuple(ax.get_window_extent(renderer).extents))
    to_pt = 72.0 / fig.dpi
    labels = {}
    for n, box in zip(names, boxes):
        px, py = disp[n]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        near = max(abs(cx - px) - (box[2] - box[0]) / 2, abs(cy - py) - (box[3] - box[1]) / 2) <= 12
        labels[n] = ax.annotate(n, (pts[n][0], pts[n][1]), xytext=((cx - px) * to_pt, (cy - py) * to_pt),
                                textcoords="offset points", ha="center", va="center", fontsize=9,
                                arrowprops=None if near else {"arrowstyle": "-", "color": "0.55", "lw": 0.6,
                                                              "shrinkA": 1, "shrinkB": 5})
    fig.canvas.draw()
    placed = {n: tuple(float(v) for v in Text.get_window_extent(a, renderer).extents) for n, a in labels.items()}
    disp = {n: (float(x), float(y)) for n, (x, y) in disp.items()}
    fig.savefig(path)
    plt.close(fig)
    return {"labels": placed, "points": disp, "marker": 6.0}


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
