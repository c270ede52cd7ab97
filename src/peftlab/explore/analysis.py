"""Comparing design spaces: empirical distribution functions of error, summaries, plots, report."""

from __future__ import annotations

import statistics
from pathlib import Path


def edf(errors: list[float], grid: list[float] | None = None) -> tuple[list[float], list[float]]:
    """F(e) = (1/n) Σ 1[e_i < e] evaluated at ``grid`` (default: the sorted errors themselves plus ∞)."""
    es = sorted(errors)
    n = len(es)
    grid = grid if grid is not None else es + [float("inf")]
    return grid, [sum(1 for x in es if x < e) / n if n else 0.0 for e in grid]


def summarize(scores: list[float]) -> dict:
    if not scores:
        return {"n": 0}
    return {"n": len(scores), "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
            "median": statistics.median(scores), "best": max(scores), "worst": min(scores)}


def plot_edf(groups: dict[str, list[float]], path: Path, title: str) -> Path | None:
    """EDF of error (100 − score) per candidate; a curve further up-left is a better space."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, scores in groups.items():
        errs = sorted(100 - s for s in scores)
        if not errs:
            continue
        xs = [errs[0]] + errs
        ys = [0.0] + [(i + 1) / len(errs) for i in range(len(errs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(errs)}, mean err {statistics.fmean(errs):.1f})")
    ax.set_xlabel("error = 100 − average dev score")
    ax.set_ylabel("cumulative probability F(e)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
