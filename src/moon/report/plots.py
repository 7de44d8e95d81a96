"""The report's plots: matplotlib figures drawn off-screen (Agg) and embedded as PNG.

Figures are built from `matplotlib.figure.Figure` directly, never through pyplot, so no
window backend or global figure state is involved. Each figure has a fixed pixel size
(`size * DPI`), which the <img> tag states.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

logging.getLogger("matplotlib").setLevel(logging.ERROR)  # e.g. the one-off font-cache notice: not for --quiet runs

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from moon.report.html import img  # noqa: E402

DPI = 100
WIDE = (11.0, 3.4)  # training curves: loss, learning rate, throughput side by side
SQUARE = (5.5, 3.6)  # one recall plot

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x, y)


def embed(figure: Figure, alt: str) -> str:
    """The figure as an embedded PNG <img> of exactly its pixel size."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    width, height = (round(side * DPI) for side in figure.get_size_inches())
    return img(buffer.getvalue(), "image/png", width, height, alt, "plot")


def training_curves(title: str, losses: Series, lr: Series, throughput: Series, unit: str) -> str:
    """Loss (overall and per task), learning rate and throughput against the step."""
    figure = Figure(figsize=WIDE, layout="constrained")
    loss_ax, lr_ax, rate_ax = figure.subplots(1, 3, width_ratios=[2.2, 1, 1])
    _lines(loss_ax, losses, emphasise="loss")
    loss_ax.set(title=f"{title}: loss", xlabel="step", ylabel="loss")
    if len(losses) > 1:
        figure.legend(*loss_ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    _lines(lr_ax, lr)
    lr_ax.set(title="learning rate", xlabel="step")
    lr_ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))
    _lines(rate_ax, throughput)
    rate_ax.set(title=f"throughput ({unit})", xlabel="step")
    rate_ax.set_ylim(bottom=0)
    return embed(figure, f"{title} training curves")


def recall_curves(title: str, curves: Mapping[str, tuple[list[int], list[float], list[tuple[float, float]]]]) -> str:
    """recall@K against K (log scale), one line per model, its 95% interval shaded."""
    figure = Figure(figsize=SQUARE, layout="constrained")
    ax = figure.subplots()
    ks = sorted({k for x, _, _ in curves.values() for k in x})
    for label, (x, y, ci) in curves.items():
        (line,) = ax.plot(x, y, marker="o", label=label)
        ax.fill_between(x, [lo for lo, _ in ci], [hi for _, hi in ci], color=line.get_color(), alpha=0.12)
    if len(ks) > 1:
        ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(title=title, xlabel="K", ylabel="recall@K", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return embed(figure, title)


def per_dim(title: str, metric: str, series: Series) -> str:
    """A metric against the Matryoshka dimension (log 2 scale), one line per model."""
    figure = Figure(figsize=SQUARE, layout="constrained")
    ax = figure.subplots()
    dims = sorted({d for x, _ in series.values() for d in x})
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
    if len(dims) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.minorticks_off()
    ax.set(title=title, xlabel="dimension", ylabel=metric, ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return embed(figure, title)


def _lines(ax, series: Series, emphasise: str | None = None) -> None:
    for label, (x, y) in series.items():
        bold = label == emphasise
        ax.plot(x, y, label=label, linewidth=2.2 if bold else 1.0, color="black" if bold else None)
    ax.grid(alpha=0.3)


def segment_lifts(title: str, lifts: Mapping[str, Mapping[str, float]]) -> str:
    """Horizontal bars: one group per segment, one bar per model, the lift in AUC over the base."""
    segments = list(next(iter(lifts.values())))
    figure = Figure(figsize=(7.0, 0.32 * len(segments) * max(len(lifts), 1) + 1.2), layout="constrained")
    ax = figure.subplots()
    height = 0.8 / max(len(lifts), 1)
    for i, (label, by_segment) in enumerate(lifts.items()):
        ax.barh([s + i * height for s in range(len(segments))], [by_segment.get(name, 0.0) for name in segments],
                height=height, label=label)
    ax.set_yticks([s + 0.4 - height / 2 for s in range(len(segments))], segments)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(title=title, xlabel="ΔAUC")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, axis="x")
    return embed(figure, title)


def exchange_rate(title: str, metric: str, points: Sequence[tuple[str, float, float, float]], rate: float,
                  band: tuple[float, float], per: float) -> str:
    """ΔAUC against an intermediate metric, one labelled point per version (the bar: ±1 seed std),
    the Theil-Sen line through the medians and its bootstrap band of slopes."""
    figure = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = figure.subplots()
    labels, xs, ys, spread = zip(*points)
    ax.errorbar(xs, ys, yerr=spread, fmt="o", markersize=4, capsize=2)
    for label, x, y in zip(labels, xs, ys):
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    grid = [min(xs), max(xs)]
    centre_x, centre_y = float(np.median(xs)), float(np.median(ys))
    for slope, style in ((rate, "-"), (band[0], ":"), (band[1], ":")):
        if np.isfinite(slope):
            ax.plot(grid, [centre_y + slope / per * (x - centre_x) for x in grid], style, color="tab:red", linewidth=1)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(title=title, xlabel=metric, ylabel="ΔAUC of CUBE over DIN")
    ax.grid(alpha=0.3)
    return embed(figure, title)


def scaling_curve(title: str, xlabel: str, ylabel: str, points: Sequence[tuple[float, float]],
                  curve: Callable[[np.ndarray], np.ndarray] | None, curve_label: str | None, held_out: float | None,
                  reference: float | None) -> str:
    """The points (every seed), the fitted curve, the held-out largest x, and a reference line."""
    figure = Figure(figsize=(4.6, 3.4), layout="constrained")
    ax = figure.subplots()
    xs, ys = zip(*points)
    ax.plot(xs, ys, "o", markersize=4, label="measured")
    if curve is not None:
        grid = np.geomspace(min(xs), max(xs), 50)
        ax.plot(grid, curve(grid), "-", color="tab:red", linewidth=1, label=curve_label)
    if held_out is not None:
        ax.plot([max(xs)], [held_out], "x", color="tab:red", markersize=8, label="predicted without it")
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="reference")
    ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return embed(figure, title)
