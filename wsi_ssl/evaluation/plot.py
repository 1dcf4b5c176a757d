"""Bar chart of an evaluation: one panel per task/method/metric, one bar per encoder,
bootstrap intervals as error bars (a task too small for intervals says so in its panels)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from wsi_ssl.evaluation.report import ResultRow
from wsi_ssl.storage.atomic import atomic_write_with

__all__ = ["plot_results"]


def _gap(top: float | None, bottom: float | None) -> float:
    """An error-bar length (nan without an interval bound: no bar drawn, not a point)."""
    return math.nan if top is None or bottom is None else max(0.0, top - bottom)


def plot_results(
    rows: Sequence[ResultRow],
    encoders: Sequence[str],
    out: str | Path,
    no_intervals: Mapping[str, str] | None = None,
) -> Path:
    """Write the chart of ``rows`` as PNG to ``out`` (temp file + rename); ``no_intervals``:
    task name -> why it has no intervals (written in its panels instead of error bars)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str, str], dict[str, ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.task, row.method, row.metric), {})[row.encoder] = row
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, layout="constrained"
    )
    colours = [plt.get_cmap("tab10")(i) for i in range(10)]
    for ax, ((task, method, metric), g) in zip(axes.flat, groups.items(), strict=False):
        labels = [e for e in encoders if e in g]
        values = [g[e].value for e in labels]
        lows = [_gap(g[e].value, g[e].ci_low) for e in labels]
        highs = [_gap(g[e].ci_high, g[e].value) for e in labels]
        ax.bar(
            range(len(labels)),
            values,
            yerr=[lows, highs],
            capsize=4,
            color=[colours[encoders.index(e) % len(colours)] for e in labels],
        )
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{task}\n{method}: {metric}", fontsize=9)
        why = (no_intervals or {}).get(task)
        if why is not None:
            text = textwrap.fill(f"no interval ({why})", 44)
            box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "grey"}
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, bbox=box,
                    transform=ax.transAxes)  # fmt: skip
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return out
