"""The training-curves PNG written beside metrics.json: train loss, eval loss and the selection metric by step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def write_curves(path: Path, metrics: dict[str, Any]) -> Path:
    """Plot metrics.json's trainLoss and validation rows; non-finite points are left out, not fatal."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in pods or CI
    from matplotlib import pyplot as plt

    def finite(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]

    validation = metrics.get("validation") or []
    selected = metrics.get("metric") or "eval_loss"
    extra = selected if selected != "eval_loss" and any(selected in r for r in validation) else None
    figure, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 6.5, 4), squeeze=False)
    loss_axes = axes[0][0]
    loss_axes.plot(*finite(metrics.get("trainLoss") or [], "loss"), label="train loss", linewidth=1)
    loss_axes.plot(*finite(validation, "eval_loss"), "o-", label="eval loss")
    loss_axes.set(xlabel="step", ylabel="loss", title="loss")
    loss_axes.grid(alpha=0.3)
    if extra:
        axes[0][1].plot(*finite(validation, extra), "o-", color="tab:green", label=extra)
        axes[0][1].set(xlabel="step", ylabel=extra, title=f"{extra} (selects the best model)")
        axes[0][1].grid(alpha=0.3)
    best = metrics.get("bestStep")
    for ax in axes[0]:
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label="best step")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
