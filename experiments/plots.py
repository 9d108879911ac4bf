"""The experiments' plots: matplotlib without a display, one colour per model variant, the
figure writer and the seed band every training curve is drawn with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# One colour per model variant (``variants.VARIANTS``) in every plot.
VARIANT_COLORS = {
    "dense": "tab:gray",
    "top1": "tab:blue",
    "top2": "tab:orange",
    "top_p": "tab:green",
    "top_p_sized": "tab:olive",
    "top2_grouped": "tab:red",
    "top_p_grouped": "tab:purple",
    "top2_budget": "tab:orange",
    "top_p_fixed": "tab:olive",
    "top_p_target": "tab:green",
    "top_p_target_bias": "tab:cyan",
    "top2_bias": "tab:red",
}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    print(f"plot: {path}")
    return path


def band(ax, steps: np.ndarray, curves: np.ndarray, label: str, color=None) -> None:
    """Mean curve over seeds (rows) with a min-max band."""
    curves = np.asarray(curves, np.float64)
    (line,) = ax.plot(steps, curves.mean(axis=0), label=label, color=color)
    if len(curves) > 1:
        ax.fill_between(
            steps, curves.min(axis=0), curves.max(axis=0), alpha=0.2, color=line.get_color()
        )
