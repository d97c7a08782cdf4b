"""The report's figures: confusion matrices, training curves, reliability diagram, for a multi-label run
the label co-occurrence, and for a regression run predicted against true values and the residuals
(matplotlib, Agg).

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no global figure registry, no
interactive backend, nothing to close, safe in a server or a test process. Each builder returns the
Figure so tests can read the plotted numbers back from its Axes; `save_png` writes it.

Class names come from the data: they are drawn as plain text (never parsed as mathtext or LaTeX, so a
`$` in a label is a dollar sign), and a confusion figure stays a bounded size whatever the class count.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from llmclf.errors import LlmclfError
from llmclf.reports.console import one_line
from llmclf.runfolder import RunFolder

DPI = 110
MAX_SIDE = 20.0  # inches: at 0.7 in a class, 300 classes would be a 23,000-pixel square (~2 GB)
ANNOTATE_MAX = 60  # above this many classes, cell values and class names would be unreadable: left out
TICK_CHARS = 30  # a longer class name is cut on the axes (the tables have it whole)
LITERAL = {"parse_math": False, "usetex": False}  # text properties: draw the string as it is
FEW_POINTS = 3  # validations up to this many are marked with their values (too few for a curve)
FONT = 12  # points: the text of every figure; at 110 dpi 18 px, still 9 px with the image shown half size


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: PNG output without any GUI backend
    return fig


@dataclass(frozen=True)
class Png:
    """A figure written into the run folder: its file, the bytes written (the HTML inlines them), its
    size in pixels and the height of its smallest text in pixels (how small it may be shown)."""

    path: Path
    data: bytes
    width: int = 0
    height: int = 0
    text_px: float = 0.0

    @property
    def name(self) -> str:
        return self.path.name


def smallest_text_px(fig: Figure) -> float:
    """The font size, in pixels of the PNG, of the smallest text drawn (tick labels included)."""
    sizes = [
        t.get_fontsize()
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_figure() is not None
    ]
    return min(sizes, default=0.0) * DPI / 72


def save_png(fig: Figure, run: RunFolder, name: str) -> Png:
    """The figure as PNG file `name` of the run folder (written atomically, never through a link)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    path = run.write_with(name, lambda tmp: tmp.write_bytes(data))
    return Png(path, data, width, height, round(smallest_text_px(fig), 1))


# ------------------------------------------------------------------------------------ confusion matrix
def row_normalise(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (recall on the diagonal); an empty row stays zeros."""
    matrix = np.asarray(matrix, dtype=float)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def tick_label(label: str) -> str:
    """A class name as drawn on an axis: one line, controls visible, cut at TICK_CHARS."""
    text = one_line(str(label))
    return text if len(text) <= TICK_CHARS else text[: TICK_CHARS - 1] + "…"


def confusion_size(k: int, names: list[str], size: float, rotation: int) -> tuple[float, float]:
    """(width, height) in inches: 0.7 in a class (at least 2.6 in all, at most MAX_SIDE), plus the
    class names' room (left, and below where they are turned 45 degrees), the colour bar and titles."""
    grid = min(MAX_SIDE, max(2.6, 0.7 * k))
    names_in = max(map(len, names), default=0) * 0.6 * size / 72  # a character is ~0.6 em wide
    below = 0.75 * names_in if rotation else 0.3
    return min(MAX_SIDE + 2, grid + names_in + 2.0), min(MAX_SIDE + 2, grid + below + 1.2)


def confusion_figure(matrix: list[list[int]], labels: list[str], *, normalise: bool, title: str) -> Figure:
    """Heat map with the value in each cell: raw counts, or row-normalised fractions.

    At most MAX_SIDE inches a side; above ANNOTATE_MAX classes without cell values and class names."""
    k = len(labels)
    counts = np.asarray(matrix, dtype=float)
    if counts.shape != (k, k):
        raise LlmclfError(
            f"The confusion matrix has shape {counts.shape} for {k} labels: the run's metrics.json does "
            "not match its labels. Evaluate or train the run again."
        )
    values = row_normalise(counts) if normalise else counts
    vmax = 1.0 if normalise else max(1.0, float(np.nanmax(values, initial=0.0)))
    axes = ("predicted", "true")
    return heatmap(values, labels, vmax=vmax, digits=2 if normalise else 0, title=title, axes=axes)


def heatmap(
    values: np.ndarray,
    labels: list[str],
    *,
    vmax: float,
    digits: int,
    title: str,
    axes: tuple[str, str],
    noun: str = "classes",
) -> Figure:
    """A k x k heat map of `values` with the value in each cell (`digits` decimals), `labels` on both
    axes and `axes` = (x title, y title); above ANNOTATE_MAX labels without cell values and names."""
    k = len(labels)
    size = FONT if k <= 30 else 7  # points: cells of 30 classes still hold 12-point values
    names = [tick_label(label) for label in labels] if k <= ANNOTATE_MAX else []
    rotation = 45 if max(map(len, names), default=0) > 6 else 0
    fig = new_figure(*confusion_size(k, names, size, rotation))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.ax.tick_params(labelsize=size if names else FONT)
    ax.set_xlabel(axes[0], fontsize=FONT)
    ax.set_ylabel(axes[1], fontsize=FONT)
    if k > ANNOTATE_MAX:
        ax.set_title(f"{title}\n{k} {noun}: no cell values or names", fontsize=FONT, **LITERAL)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    ax.set_title(title, fontsize=FONT, **LITERAL)
    ax.set_xticks(range(k), labels=names, rotation=rotation, ha="right", **LITERAL)
    ax.set_yticks(range(k), labels=names, **LITERAL)
    ax.tick_params(labelsize=size)
    for i in range(k):
        for j in range(k):
            value = values[i, j]
            # white text on dark cells, so every number stays readable
            colour = "white" if value > 0.6 * vmax else "black"
            ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", color=colour, fontsize=size)
    return fig


def cooccurrence_figure(
    matrix: np.ndarray, labels: list[str], title: str, vmax: float | None = None
) -> Figure:
    """How many texts carry both labels of each pair (a multi-label run), the diagonal each label's own
    count: a symmetric heat map with the count in each cell, sized like a confusion matrix; `vmax` (the
    darkest count) shared by two such maps shown side by side, so that their shades compare."""
    values = np.asarray(matrix, dtype=float)
    if values.shape != (len(labels), len(labels)):
        raise LlmclfError(
            f"The co-occurrence matrix has shape {values.shape} for {len(labels)} labels: the run's files "
            "do not match its labels.json. Evaluate or train the run again."
        )
    vmax = max(1.0, float(np.nanmax(values, initial=0.0)) if vmax is None else vmax)
    return heatmap(values, labels, vmax=vmax, digits=0, title=title, axes=("label", "label"), noun="labels")


# ------------------------------------------------------------------------------------ training curves
@dataclass
class Curves:
    """Series read from the Trainer's log_history, each as (steps, values)."""

    train_loss: tuple[list[int], list[float]]
    val_loss: tuple[list[int], list[float]]
    val_accuracy: tuple[list[int], list[float]]
    val_balanced_accuracy: tuple[list[int], list[float]]
    val_pearson: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))  # regression
    val_spearman: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))
    val_micro_f1: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))  # multi-label
    val_macro_f1: tuple[list[int], list[float]] = field(default_factory=lambda: ([], []))


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def curves_from_log(log_history: list[dict]) -> Curves:
    """Training loss from the periodic log entries; validation loss/accuracy from the eval entries."""

    def series(key: str) -> tuple[list[int], list[float]]:
        # a value that is no finite number (a Pearson r of constant predictions is null) is no point
        rows = [(int(e["step"]), float(e[key])) for e in log_history if "step" in e and _finite(e.get(key))]
        return [s for s, _ in rows], [v for _, v in rows]

    return Curves(
        train_loss=series("loss"),
        val_loss=series("eval_loss"),
        val_accuracy=series("eval_accuracy"),
        val_balanced_accuracy=series("eval_balanced_accuracy"),
        val_pearson=series("eval_pearson"),
        val_spearman=series("eval_spearman"),
        val_micro_f1=series("eval_micro_f1"),
        val_macro_f1=series("eval_macro_f1"),
    )


def _style(ax: Any, title: str, ylabel: str, xlabel: str = "") -> None:
    ax.set_title(title, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.grid(alpha=0.3)


def _mark_values(ax: Any, steps: list[int], values: list[float], *, top: float | None = None) -> None:
    """Each point's value written beside it (below it where it sits near `top`, the axis's upper end)."""
    for step, value in zip(steps, values):
        below = top is not None and value > 0.85 * top
        ax.annotate(
            f"{value:.3f}",
            (step, value),
            textcoords="offset points",
            xytext=(0, -20 if below else 10),
            ha="center",
            fontsize=FONT,
        )


def training_figure(log_history: list[dict], *, regression: bool = False, multilabel: bool = False) -> Figure:
    """Top: training and validation loss over steps. Bottom: validation accuracy over steps; for a
    multi-label run the validation micro and macro F1 (each label decided at probability 0.5); for a
    regression run the validation Pearson and Spearman correlations where the log has them (without
    them, the loss alone: the validation MSE a regression run logs is its validation loss again).

    Both span the run's steps from 0, so a single validation (one epoch) is a marked point at the step
    where it ran, not a point alone on an axis from step 19 to 21; up to FEW_POINTS validations are
    drawn as larger markers with their values written beside them."""
    curves = curves_from_log(log_history)
    lower = not regression or bool(curves.val_pearson[0] or curves.val_spearman[0])
    fig = new_figure(6.0, 6.6 if lower else 3.6)
    # without a lower panel the loss axis is also the one that gets the steps' range
    loss_ax, low_ax = fig.subplots(2, 1, sharex=True) if lower else (fig.add_subplot(),) * 2
    few = 0 < len(curves.val_loss[0]) <= FEW_POINTS
    size = 9 if few else 6
    if curves.train_loss[0]:
        loss_ax.plot(*curves.train_loss, marker=".", label="training loss")
    if curves.val_loss[0]:
        loss_ax.plot(*curves.val_loss, marker="o", markersize=size, label="validation loss")
        if few:
            _mark_values(loss_ax, *curves.val_loss)
            loss_ax.margins(y=0.2)  # room above the highest point for its value
    _style(loss_ax, "Loss", "loss", "" if lower else "step")
    if loss_ax.lines:
        loss_ax.legend(fontsize=FONT)
    low: list[int] = []
    if regression and lower:
        low = _correlation_panel(low_ax, curves, few, size)
    elif multilabel:
        low = _f1_panel(low_ax, curves, few, size)
    elif lower:
        low = _accuracy_panel(low_ax, curves, few, size)
    steps = curves.train_loss[0] + curves.val_loss[0] + low
    if steps:
        low_ax.set_xlim(0, max(steps) * 1.06 + 0.5)  # shared with the loss axis
    low_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _accuracy_panel(ax: Any, curves: Curves, few: bool, size: float) -> list[int]:
    """Validation accuracy and balanced accuracy; returns the steps drawn."""
    series = (curves.val_accuracy, curves.val_balanced_accuracy)
    names = ("validation accuracy", "validation balanced acc.")
    _validation_pair(ax, series, names, few, size)
    _style(ax, "Validation accuracy", "accuracy", "step")
    return curves.val_accuracy[0]


def _f1_panel(ax: Any, curves: Curves, few: bool, size: float) -> list[int]:
    """Validation micro and macro F1 of a multi-label run; returns the steps drawn."""
    series = (curves.val_micro_f1, curves.val_macro_f1)
    _validation_pair(ax, series, ("validation micro F1", "validation macro F1"), few, size)
    _style(ax, "Validation F1", "F1", "step")
    return curves.val_micro_f1[0] + curves.val_macro_f1[0]


def _validation_pair(ax: Any, series: tuple, names: tuple[str, str], few: bool, size: float) -> None:
    """Two validation scores in [0, 1] over the steps, the first marked with its values when there are
    few; a note where nothing was validated."""
    (first, second) = series
    if not (first[0] or second[0]):
        ax.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax.transAxes)
        return
    ax.plot(*first, marker="o", markersize=size, label=names[0])
    ax.plot(*second, marker="s", markersize=size * 0.7, linestyle="--", label=names[1])
    ax.set_ylim(0.0, 1.05)
    if few:
        _mark_values(ax, *first, top=1.0)
    ax.legend(loc="lower right", fontsize=FONT)


def _correlation_panel(ax: Any, curves: Curves, few: bool, size: float) -> list[int]:
    """Validation Pearson and Spearman correlations of a regression run; returns the steps drawn."""
    if curves.val_pearson[0]:
        ax.plot(*curves.val_pearson, marker="o", markersize=size, label="validation Pearson")
        if few:
            _mark_values(ax, *curves.val_pearson, top=1.0)
    if curves.val_spearman[0]:
        ax.plot(
            *curves.val_spearman,
            marker="s",
            markersize=size * 0.7,
            linestyle="--",
            label="validation Spearman",
        )
    values = curves.val_pearson[1] + curves.val_spearman[1]
    ax.set_ylim(min(0.0, min(values) - 0.05), 1.05)  # a correlation may be negative early on
    ax.legend(loc="lower right", fontsize=FONT)
    _style(ax, "Validation correlation", "correlation", "step")
    return curves.val_pearson[0] + curves.val_spearman[0]


# ------------------------------------------------------------------------------------ regression
def regression_points(ax: Any, x: np.ndarray, y: np.ndarray) -> None:
    """The test texts as points, fainter where there are many (so that dense regions still show)."""
    alpha = 0.8 if len(x) <= 200 else 0.4 if len(x) <= 2000 else 0.15
    ax.scatter(x, y, s=14 if len(x) <= 2000 else 6, alpha=alpha, color="tab:blue", edgecolors="none")


def predicted_figure(true: np.ndarray, predicted: np.ndarray) -> Figure:
    """Predicted against true value for each test text, with the line y = x where they would agree.

    The axes share one range (the values' own, padded), so that distance from the line reads alike
    along both."""
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    fig = new_figure(5.2, 5.0)
    ax = fig.add_subplot()
    regression_points(ax, true, predicted)
    both = np.concatenate([true, predicted])
    low, high = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    pad = (high - low) * 0.05 or 0.5  # all values equal: still a visible range around them
    low, high = low - pad, high + pad
    ax.plot([low, high], [low, high], linestyle="--", color="gray", label="predicted = true")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="upper left", fontsize=FONT)
    _style(ax, "Predicted vs true (test, after training)", "predicted", "true")
    return fig


def residual_figure(true: np.ndarray, predicted: np.ndarray) -> Figure:
    """Residual (predicted - true) against the true value: a slope shows the model pulling its
    predictions towards the mean (too high for low values, too low for high ones), a spread widening
    with the value shows errors growing with it."""
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    fig = new_figure(5.2, 5.0)
    ax = fig.add_subplot()
    residuals = predicted - true
    regression_points(ax, true, residuals)
    ax.axhline(0.0, linestyle="--", color="gray", label="no error")
    largest = float(np.abs(residuals).max()) if len(residuals) else 0.0
    ax.set_ylim(-(largest * 1.1 or 0.5), largest * 1.1 or 0.5)  # symmetric: over and under read alike
    ax.legend(loc="upper right", fontsize=FONT)
    _style(ax, "Residuals (test, after training)", "predicted - true", "true")
    return fig


# ------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """Equal-width confidence bins (lo, hi]: mean confidence, accuracy and count per bin, and the ECE."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray
    ece: float


def calibration(probs: np.ndarray, true_ids: np.ndarray, n_bins: int = 10) -> Calibration:
    """Reliability of the top-class probability: ECE = sum over bins of (n_b / N) * |acc_b - conf_b|."""
    probs = np.asarray(probs, dtype=float)
    true_ids = np.asarray(true_ids)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == true_ids).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 goes to bin 0
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(float)
    safe = np.maximum(counts, 1.0)
    mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / safe
    accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / safe
    n = max(len(conf), 1)
    ece = float(np.sum(counts / n * np.abs(accuracy - mean_conf)))
    return Calibration(edges, mean_conf, accuracy, counts, ece)


def reliability_figure(cal: Calibration) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration; counts below."""
    fig = new_figure(5.2, 5.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = np.diff(cal.edges)
    used = cal.counts > 0
    top.bar(
        cal.edges[:-1][used],
        cal.accuracy[used],
        width=width[used],
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy in bin",
    )
    top.plot(cal.confidence[used], cal.confidence[used], "o", color="tab:red", label="mean confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability (test, after training): ECE = {cal.ece:.3f}")
    top.legend(loc="upper left", fontsize=10)
    top.grid(alpha=0.3)
    bottom.bar(cal.edges[:-1], cal.counts, width=width, align="edge", edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("texts")
    return fig
