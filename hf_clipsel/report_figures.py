"""The report's figures: score distributions, alignment against diversity, rows kept per class.

Figures are bare matplotlib ``Figure`` objects rendered by Agg, never pyplot: nothing opens a window and the
caller's backend (a notebook's) is left alone. Every figure has a fixed width and a height that depends only on
the number of ratios, so its size in pixels is known in advance (the HTML page reserves the space before the
image loads). The file names are stable: the dataset card links to them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .core.names import REPORT_FIGURES as FIGURES  # the names live with the output layout: the card needs them too
from .report_data import RunScores

DPI = 100
WIDTH_INCHES = 12.0

SCORE_DISTRIBUTIONS, ALIGNMENT_VS_DIVERSITY, KEPT_PER_CLASS = FIGURES
SCATTER_COLUMNS = 3
MAX_SCATTER_POINTS = 20_000
MAX_CLASSES_AS_BARS = 30  # beyond this, names on the axis become unreadable: plot sorted shares instead
ALIGNMENT_LABEL = "semantic alignment (SAS, cosine to its label's prompt)\nhigher = image matches its label better"
DIVERSITY_LABEL = "sample diversity (SDS, distance to same-class neighbours)\nhigher = rarer in its class"


def figure_height_pixels(name: str, num_ratios: int) -> int:
    """Height of a figure in pixels (its width is always ``WIDTH_INCHES * DPI``)."""
    return round(_height_inches(name, num_ratios) * DPI)


def _height_inches(name: str, num_ratios: int) -> float:
    if name == ALIGNMENT_VS_DIVERSITY:
        return 1.0 + 3.9 * math.ceil(max(num_ratios, 1) / SCATTER_COLUMNS)
    return {SCORE_DISTRIBUTIONS: 5.0, KEPT_PER_CLASS: 5.0}[name]


def ratio_colours(ratios: list[float]) -> dict[float, tuple]:
    """One colour per ratio, the same in every figure: darker for a smaller (stricter) ratio."""
    cmap = colormaps["viridis"]
    positions = np.linspace(0.15, 0.8, len(ratios)) if len(ratios) > 1 else [0.4]
    return {ratio: cmap(p) for ratio, p in zip(ratios, positions)}


def _new_figure(name: str, num_ratios: int, **subplots):
    figsize = (WIDTH_INCHES, _height_inches(name, num_ratios))
    # A bare Figure, not pyplot: it renders with Agg and leaves the caller's backend (a notebook's) alone.
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    return figure, figure.subplots(**subplots)


def _save(figure, directory: Path, name: str) -> Path:
    path = directory / name
    figure.savefig(path, dpi=DPI)  # no bbox_inches="tight": it would change the size in pixels
    return path


def plot_score_distributions(scores: RunScores, directory: Path) -> Path:
    """Histograms of SAS and SDS over usable rows, with the rows each ratio keeps drawn over them."""
    figure, axes = _new_figure(SCORE_DISTRIBUTIONS, len(scores.ratios), ncols=2)
    usable = scores.usable
    colours = ratio_colours(scores.ratios)
    panels = [
        (axes[0], scores.semantic_alignment, scores.semantic_alignment_normalized, ALIGNMENT_LABEL),
        (axes[1], scores.sample_diversity, scores.sample_diversity_normalized, DIVERSITY_LABEL),
    ]
    for axis, raw, normalized, label in panels:
        values = raw[usable]
        bins = np.histogram_bin_edges(values, bins=40) if values.size else 10
        axis.hist(values, bins=bins, color="0.82", label=f"all usable rows ({values.size:,})")
        for ratio, mask in scores.selected.items():
            kept = raw[usable & mask]
            axis.hist(kept, bins=bins, histtype="step", linewidth=1.8, color=colours[ratio])
            axis.plot([], [], color=colours[ratio], label=f"kept at ratio {ratio:g} ({kept.size:,})")
        axis.set_xlabel(label)
        axis.set_ylabel("rows")
        _add_normalized_axis(axis, values, normalized[usable])
    # Below the panels: inside, it would hide the low-alignment tail, the rows a reader looks for.
    figure.legend(
        handles=axes[0].get_legend_handles_labels()[0],
        loc="outside lower center",
        ncols=min(len(scores.ratios) + 1, 5),
        frameon=False,
    )
    figure.suptitle("Score distributions of the usable rows, and of the rows each ratio keeps")
    return _save(figure, directory, SCORE_DISTRIBUTIONS)


def _add_normalized_axis(axis, raw: np.ndarray, normalized: np.ndarray) -> None:
    """A top axis in min-max normalised units: the reward is computed on those."""
    if raw.size < 2 or raw.max() <= raw.min():
        return
    low, span = float(raw.min()), float(raw.max() - raw.min())
    top = axis.secondary_xaxis("top", functions=(lambda x: (x - low) / span, lambda n: low + n * span))
    top.set_xlabel("min-max normalised (0 = lowest usable row, 1 = highest)", fontsize="small")


def plot_alignment_vs_diversity(scores: RunScores, directory: Path, alphas: dict[float, float] | None) -> Path:
    """SAS against SDS, one panel per ratio, kept rows coloured; with the cut line of the reward when it is exact.

    ``alphas`` (ratio -> alpha) is given only when the subset is exactly the top-k rewards (method `exact` without
    class quotas): then every kept row lies on the upper-right side of the line of equal reward through the last
    kept row, and drawing it shows why each row was kept or dropped.
    """
    num_rows = math.ceil(len(scores.ratios) / SCATTER_COLUMNS)
    figure, axes = _new_figure(ALIGNMENT_VS_DIVERSITY, len(scores.ratios), nrows=num_rows, ncols=SCATTER_COLUMNS)
    axes = np.atleast_1d(axes).ravel()
    usable = scores.usable
    shown = _scatter_sample(usable)
    x, y = scores.semantic_alignment, scores.sample_diversity
    colours = ratio_colours(scores.ratios)
    for index, (axis, (ratio, mask)) in enumerate(zip(axes, scores.selected.items())):
        kept, dropped = usable & mask, usable & ~mask
        axis.scatter(x[dropped & shown], y[dropped & shown], s=6, color="0.7", linewidths=0, rasterized=True)
        axis.scatter(x[kept & shown], y[kept & shown], s=6, color=colours[ratio], linewidths=0, rasterized=True)
        if alphas is not None and kept.any():
            _draw_reward_cut(axis, scores, ratio, alphas[ratio])
        axis.set_title(f"ratio {ratio:g}: kept {kept.sum():,}, dropped {dropped.sum():,}", fontsize="medium")
        axis.set_xlabel(ALIGNMENT_LABEL, fontsize="small")
        if index % SCATTER_COLUMNS == 0:
            axis.set_ylabel(DIVERSITY_LABEL, fontsize="small")
    for axis in axes[len(scores.ratios) :]:
        axis.set_visible(False)  # fixed panel width: one ratio looks the same as three
    # One legend for all panels, below them: inside a panel it hides points.
    handles = [Line2D([], [], color="0.7", marker="o", linestyle="", label="dropped")]
    handles += [
        Line2D([], [], color=colours[r], marker="o", linestyle="", label=f"kept at ratio {r:g}") for r in scores.ratios
    ]
    if alphas is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label="equal reward through the last row kept"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
    drawn = f", {shown.sum():,} of them drawn at random" if shown.sum() < usable.sum() else ""
    figure.suptitle(f"Which rows each ratio keeps: alignment against diversity ({usable.sum():,} usable rows{drawn})")
    return _save(figure, directory, ALIGNMENT_VS_DIVERSITY)


def _scatter_sample(usable: np.ndarray) -> np.ndarray:
    """The usable rows to draw: all, or a fixed random MAX_SCATTER_POINTS of them (a million points is a blot)."""
    if usable.sum() <= MAX_SCATTER_POINTS:
        return usable
    rows = np.random.default_rng(0).choice(np.nonzero(usable)[0], size=MAX_SCATTER_POINTS, replace=False)
    shown = np.zeros_like(usable)
    shown[rows] = True
    return shown


def _draw_reward_cut(axis, scores: RunScores, ratio: float, alpha: float) -> None:
    """The line of equal reward through the lowest kept reward, mapped from normalised to raw score units.

    reward = SAS~ / mean(SAS~) + alpha * SDS~ / mean(SDS~), so at reward t: SAS~ = mean(SAS~) * (t - alpha *
    SDS~ / mean(SDS~)). Skipped when a score is constant (its normalisation, and so the line, is undefined).
    """
    usable = scores.usable
    sas, sds = scores.semantic_alignment[usable], scores.sample_diversity[usable]
    sas_n, sds_n = scores.semantic_alignment_normalized[usable], scores.sample_diversity_normalized[usable]
    if sas.max() <= sas.min() or sds.max() <= sds.min() or sas_n.mean() == 0 or sds_n.mean() == 0:
        return
    cut = float(scores.reward[ratio][usable & scores.selected[ratio]].min())
    diversity_n = np.linspace(0.0, 1.0, 50)
    alignment_n = sas_n.mean() * (cut - alpha * diversity_n / sds_n.mean())
    axis.plot(
        sas.min() + alignment_n * (sas.max() - sas.min()),
        sds.min() + diversity_n * (sds.max() - sds.min()),
        linestyle="--",
        color="black",
        linewidth=1,
    )
    axis.set_xlim(sas.min() - 0.05 * (sas.max() - sas.min()), sas.max() + 0.05 * (sas.max() - sas.min()))


def plot_kept_per_class(scores: RunScores, directory: Path) -> Path:
    """Rows kept per class at each ratio: grouped bars over the class size, or sorted shares for many classes."""
    figure, axis = _new_figure(KEPT_PER_CLASS, len(scores.ratios))
    usable = scores.usable
    num_classes = len(scores.class_names)
    totals = np.bincount(scores.label[usable], minlength=num_classes)
    kept = {r: np.bincount(scores.label[usable & m], minlength=num_classes) for r, m in scores.selected.items()}
    colours = ratio_colours(scores.ratios)
    if num_classes <= MAX_CLASSES_AS_BARS:
        positions = np.arange(num_classes)
        axis.bar(positions, totals, width=0.9, color="0.88", label="usable rows in the class")
        width = 0.8 / max(len(kept), 1)
        for index, (ratio, counts) in enumerate(kept.items()):
            offset = (index - (len(kept) - 1) / 2) * width
            axis.bar(positions + offset, counts, width=width, color=colours[ratio], label=f"kept at ratio {ratio:g}")
        axis.set_xticks(positions, scores.class_names, rotation=30 if num_classes > 10 else 0, ha="right")
        axis.set_ylabel("rows")
        axis.set_xlabel("class (given label)")
        figure.suptitle("Rows kept per class at each ratio, over the usable rows of the class (grey)")
    else:
        share_axis = np.arange(1, num_classes + 1)
        for ratio, counts in kept.items():
            share = np.sort(counts / np.maximum(totals, 1))[::-1]
            axis.plot(share_axis, share, color=colours[ratio], label=f"kept at ratio {ratio:g}")
            axis.axhline(ratio, color=colours[ratio], linestyle=":", linewidth=1)
        axis.set_xlabel(f"classes, sorted by the share kept ({num_classes} classes; the table lists them by name)")
        axis.set_ylabel("share of the class's usable rows kept")
        figure.suptitle("Share of each class kept at each ratio (dotted: the ratio itself, i.e. an even share)")
    figure.legend(loc="outside lower center", ncols=len(kept) + 1, frameon=False)  # clear of the tallest bars
    return _save(figure, directory, KEPT_PER_CLASS)


def write_figures(scores: RunScores, directory: Path, alphas: dict[float, float] | None) -> list[Path]:
    """Write every figure of :data:`FIGURES` into ``directory``."""
    return [
        plot_score_distributions(scores, directory),
        plot_alignment_vs_diversity(scores, directory, alphas),
        plot_kept_per_class(scores, directory),
    ]
