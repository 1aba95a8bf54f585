"""Figures and tables every notebook uses: one labelled image grid, one curve plot, one bar chart, a run's loss
and score curves, a Markdown score table, saving a figure as a PNG and publishing a run's figure; and one
interactive view, an image redrawn from a slider.

Each helper returns a closed ``matplotlib`` ``Figure``: pyplot keeps no reference to it and the notebook backend
does not draw it by itself, so a notebook shows it by leaving it as a cell's last value (or ``display(fig)``),
exactly once, and saves it with ``publish`` (a run's figure) or ``save_figure`` (any path).
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from nbutils.runs import PUBLISH_ENV, Run, atomic_write, repo_path

SCORE_KEYS = ("identity", "clip_t", "clip_i", "detection_rate")
"""The scores of a results table: toy or dlib identity, CLIP-T and CLIP-I cosines, share of images with a face."""


def new_figure(size: tuple[float, float]) -> Figure:
    """A pyplot figure of ``size`` (width, height) in inches, closed at once (Jupyter's inline backend still
    renders it as a cell's value)."""
    fig = plt.figure(figsize=size, layout="constrained")
    plt.close(fig)
    return fig


def _rows(images: Sequence, ncols: int | None) -> list[list[Image.Image | None]]:
    if not images:
        raise ValueError("image_grid needs at least one image.")
    if all(isinstance(im, Image.Image) for im in images):
        ncols = ncols or len(images)
        rows = [list(images[i : i + ncols]) for i in range(0, len(images), ncols)]
    elif ncols is not None:
        raise ValueError("ncols only applies to a flat list of images; a list of rows already fixes the columns.")
    else:
        rows = [list(row) for row in images]
    width = max(len(row) for row in rows)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            if not isinstance(im, Image.Image):
                raise TypeError(f"image_grid: row {r}, column {c} is a {type(im).__name__}, not a PIL image.")
    return [row + [None] * (width - len(row)) for row in rows]


def image_grid(
    images: Sequence[Sequence[Image.Image]] | Sequence[Image.Image],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell: float = 2.0,
    *,
    ncols: int | None = None,
) -> Figure:
    """A grid of images, ``rows x cols`` cells of ``cell`` inches, with row labels (left), column labels (top)
    and a title.

    ``images`` is a list of rows (shorter rows leave blank cells) or a flat list of images, cut into rows of
    ``ncols`` (default: one row). Label counts must match the number of rows and columns.
    """
    rows = _rows(images, ncols)
    n_rows, n_cols = len(rows), len(rows[0])
    for labels, n, what in ((row_labels, n_rows, "row"), (col_labels, n_cols, "column")):
        if labels is not None and len(labels) != n:
            raise ValueError(f"image_grid got {len(labels)} {what} labels for {n} {what}s.")
    fig = new_figure((n_cols * cell, n_rows * cell + (0.4 if title else 0)))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if im is not None:
                ax.imshow(im)
            if row_labels is not None and c == 0:
                ax.set_ylabel(row_labels[r])
            if col_labels is not None and r == 0:
                ax.set_title(col_labels[c])
    if title:
        fig.suptitle(title)
    return fig


def plot_curve(
    series: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str
) -> Figure:
    """Line plot of one or more curves: ``series`` maps a legend name to ``(step, value)`` points."""
    if not series or not any(series.values()):
        raise ValueError("plot_curve needs at least one series with points, e.g. {'loss': [(0, 1.2), (1, 0.9)]}.")
    fig = new_figure((6, 4))
    ax = fig.subplots()
    for name, points in series.items():
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def bar_chart(
    groups: dict[str, dict[str, float | None]], title: str, xlabel: str, ylabel: str,
    lines: dict[str, float] | None = None,
) -> Figure:
    """Grouped bars: one group per ``groups`` key along the x axis, one bar per inner key (the same colour in
    every group, named in the legend), each value written above its bar; a ``None`` value leaves its bar out.
    ``lines``: ``{label: y}`` dashed horizontal reference lines (e.g. a baseline)."""
    series = list(dict.fromkeys(key for values in groups.values() for key in values))
    if not series:
        raise ValueError("bar_chart needs at least one value, e.g. {'base model': {'identity': 0.4}}.")
    width = 0.8 / len(series)
    fig = new_figure((max(6.0, 1.3 * len(groups) * max(1, len(series) / 2)), 4.2))
    ax = fig.subplots()
    for k, name in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, values in enumerate(groups.values())
              if values.get(name) is not None]
        ys = [values[name] for values in groups.values() if values.get(name) is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    for k, (name, y) in enumerate((lines or {}).items()):
        ax.axhline(y, color=f"C{len(series) + k}", ls="--", lw=1, label=name)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as a PNG file (no metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_slider(draw: Callable[[float], Image.Image], slider):
    """An ipywidgets view: ``slider`` (e.g. a ``FloatSlider``) above the image ``draw(slider.value)``, redrawn
    whenever the slider's value changes. The image is an ``ipywidgets.Image`` rather than ``interact``'s output
    area, whose captured output hung papermill in about half of our batch runs. Returns the ``VBox``."""
    import ipywidgets as widgets  # lazy: only interactive notebooks need it

    view = widgets.Image(value=png_bytes(draw(slider.value)), format="png")
    slider.observe(lambda change: setattr(view, "value", png_bytes(draw(change["new"]))), names="value")
    return widgets.VBox([slider, view])


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` as a PNG at ``path`` (relative paths from the repo root), atomically; returns the path."""
    path = repo_path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; give a path ending in .png, not {path.name!r}.")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, buf.getvalue())
    return path


def publishes(run: Run) -> bool:
    """Whether ``run``'s figures go to the repo's ``figures/`` (the README shows them): only a full run (its
    params' ``QUICK`` is ``False``) of a trained model (its ``tier`` is not ``"tiny"``), unless ``$PUBLISH_ENV`` is
    ``"0"``; quick and test runs keep theirs in the run folder."""
    params = run.config["params"]
    return (params.get("QUICK") is False and params.get("tier") != "tiny"
            and os.environ.get(PUBLISH_ENV, "1") != "0")


def publish(fig: Figure, run: Run, name: str) -> Path:
    """Save ``fig`` as ``name`` (a ``.png`` file name) where ``run`` puts its figures: the repo's ``figures/`` when
    ``publishes(run)``, else the run's own ``figures/`` (``Run.figure_path``). Returns the path."""
    return save_figure(fig, run.figure_path(name, publish=publishes(run)))


# --------------------------------------------------------------------------------------------------- a run's results
def series_points(run: Run, key: str, series: str = "eval") -> list[tuple[int, float]]:
    """``(step, value)`` of ``key`` in ``run``'s series ``series``, in step order, points without it left out."""
    points = run.metrics.get("series", {}).get(series, [])
    return sorted((p["step"], p[key]) for p in points if p.get(key) is not None)


def running_mean(points: Sequence[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """The mean of each point and the ``window - 1`` before it (fewer at the start): a noisy loss, smoothed."""
    values = np.cumsum([0.0] + [v for _, v in points])
    return [(s, (values[i + 1] - values[max(0, i + 1 - window)]) / min(i + 1, window))
            for i, (s, _) in enumerate(points)]


def loss_figure(run: Run, title: str, window: int = 25) -> Figure:
    """The training loss of ``run`` per step and its running mean over ``window`` steps."""
    loss = series_points(run, "loss", series="loss")
    return plot_curve({"loss per step": loss, f"mean of the last {window} steps": running_mean(loss, window)},
                      title=title, xlabel="optimizer step", ylabel="MSE of the noise prediction")


def scores_figure(run: Run, title: str, keys: Sequence[str] = ("identity", "clip_t", "clip_i")) -> Figure:
    """``run``'s evaluation scores ``keys`` (cosines) per evaluated step; step 0 is the base model."""
    labels = {"identity": "identity", "clip_t": "CLIP-T", "clip_i": "CLIP-I"}
    return plot_curve({labels.get(k, k): series_points(run, k) for k in keys}, title=title,
                      xlabel="optimizer step", ylabel="mean cosine similarity")


def score_table(columns: dict[str, dict], keys: Sequence[str] = SCORE_KEYS) -> str:
    """A Markdown table: one row per score in ``keys``, one column per ``{name: scores}`` item (4 significant
    digits; ``n/a`` for a missing score)."""
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| score | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(cell(c.get(key)) for c in columns.values()) + " |" for key in keys]
    return "\n".join(lines)
