"""Image grid, curve plot, bar chart, a run's curves and score table, figure saving and publishing, the slider."""
from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from nbutils import runs
from nbutils.runs import new_run
from nbutils.viz import (bar_chart, image_grid, image_slider, loss_figure, plot_curve, png_bytes, publish,
                         publishes, running_mean, save_figure, score_table, scores_figure, series_points)


def solid(value):
    return Image.new("RGB", (8, 8), (value, value, value))


def test_image_grid_places_images_and_labels():
    fig = image_grid([[solid(0), solid(50), solid(100)], [solid(150), solid(200), solid(250)]],
                     row_labels=["seed 0", "seed 1"], col_labels=["a", "b", "c"], title="Samples", cell=1.0)
    axes = fig.axes
    assert len(axes) == 6 and tuple(fig.get_size_inches()) == (3.0, 2.4)
    assert [ax.get_ylabel() for ax in axes] == ["seed 0", "", "", "seed 1", "", ""]
    assert [ax.get_title() for ax in axes] == ["a", "b", "c", "", "", ""]
    assert fig._suptitle.get_text() == "Samples"
    assert [int(ax.images[0].get_array()[0, 0, 0]) for ax in axes] == [0, 50, 100, 150, 200, 250]
    assert plt.get_fignums() == []  # closed: the notebook shows it once, as the cell's value


def test_image_grid_flat_list_with_ncols_leaves_blank_cells():
    fig = image_grid([solid(10), solid(20), solid(30)], ncols=2)
    assert len(fig.axes) == 4
    assert [len(ax.images) for ax in fig.axes] == [1, 1, 1, 0]
    assert len(image_grid([solid(1), solid(2)]).axes) == 2  # default: one row


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        image_grid([[solid(0)], [solid(1)]], row_labels=["only one"])
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])
    with pytest.raises(TypeError, match="row 0, column 1 is a ndarray"):
        image_grid([[solid(0), np.zeros((8, 8, 3))]])
    with pytest.raises(ValueError, match="ncols only applies"):
        image_grid([[solid(0)]], ncols=2)


def test_plot_curve_draws_each_series():
    fig = plot_curve({"loss": [(0, 1.0), (10, 0.5)], "val": [(0, 1.2), (10, 0.7)]}, "Loss (seed 0)", "step", "MSE")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["loss", "val"]
    assert list(ax.lines[1].get_xdata()) == [0, 10] and list(ax.lines[1].get_ydata()) == [1.2, 0.7]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Loss (seed 0)", "step", "MSE")
    with pytest.raises(ValueError, match="at least one series"):
        plot_curve({"loss": []}, "t", "x", "y")


def test_bar_chart_groups_bars_by_series_and_skips_missing_values():
    fig = bar_chart({"base": {"drift": 0.4, "nearest": 0.9}, "trained": {"drift": 0.7, "nearest": None}},
                    "Failure modes (seed 0)", "model", "cosine", lines={"photos vs photos": 0.95})
    ax = fig.axes[0]
    heights = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert heights == {"drift": [0.4, 0.7], "nearest": [0.9]}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "trained"]
    bar = ax.containers[0][1]  # series 1 of 2 in group 1: left of the group's centre
    assert bar.get_x() + bar.get_width() / 2 == pytest.approx(0.8) and bar.get_width() == pytest.approx(0.4)
    assert [line.get_label() for line in ax.lines] == ["photos vs photos"] and ax.lines[0].get_ydata()[0] == 0.95
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Failure modes (seed 0)", "model", "cosine")
    assert "0.700" in [t.get_text() for t in ax.texts]
    with pytest.raises(ValueError, match="at least one value"):
        bar_chart({"base": {}}, "t", "x", "y")


def test_save_figure_writes_a_png_atomically(tmp_path):
    fig = image_grid([solid(0), solid(255)], cell=1.0)
    path = save_figure(fig, tmp_path / "figures" / "grid.png", dpi=50)
    assert path == tmp_path / "figures" / "grid.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (100, 50)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match="ending in .png"):
        save_figure(fig, tmp_path / "grid.jpg")


def test_png_bytes_round_trips_the_pixels():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    data = png_bytes(image)
    assert data.startswith(b"\x89PNG") and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))


def test_image_slider_redraws_the_image_when_the_slider_moves():
    import ipywidgets as widgets

    drawn = []

    def draw(value):
        drawn.append(value)
        return solid(int(value * 100))

    slider = widgets.FloatSlider(value=1.0, min=0.0, max=2.0)
    box = image_slider(draw, slider)
    assert box.children[0] is slider and drawn == [1.0]
    view = box.children[1]
    assert view.value == png_bytes(solid(100))
    slider.value = 0.5
    assert drawn == [1.0, 0.5] and view.value == png_bytes(solid(50))


def test_series_points_running_mean_and_a_runs_curves(tmp_run_dir):
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    for step, value in [(20, 0.5), (0, 0.2), (10, None), (30, 0.45)]:
        run.log_series("eval", step, identity=value, clip_t=0.6)
    for step in (1, 2, 3):
        run.log_series("loss", step, loss=2.0 * step - 1)
    assert series_points(run, "identity") == [(0, 0.2), (20, 0.5), (30, 0.45)]
    assert series_points(run, "loss", series="loss") == [(1, 1.0), (2, 3.0), (3, 5.0)]
    assert running_mean([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [(1, 1.0), (2, 2.0), (3, 4.0)]
    lines = loss_figure(run, "Loss (seed 0)", window=2).axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[1.0, 3.0, 5.0], [1.0, 2.0, 4.0]]
    ax = scores_figure(run, "Scores (seed 0)", keys=("identity", "clip_t")).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["identity", "CLIP-T"]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 20, 30] and ax.get_title() == "Scores (seed 0)"


def test_score_table():
    table = score_table({"base": {"identity": 0.31234, "clip_t": None}, "TI": {"identity": 0.7, "clip_t": 0.25}},
                        keys=("identity", "clip_t"))
    assert table.splitlines() == ["| score | base | TI |", "|---|---|---|", "| identity | 0.3123 | 0.7 |",
                                  "| clip_t | n/a | 0.25 |"]
    assert [row.split(" |")[0] for row in score_table({"a": {}}).splitlines()[2:]] == [
        "| identity", "| clip_t", "| clip_i", "| detection_rate"]


def test_publish_writes_only_a_full_run_of_a_trained_model_into_the_repos_figures(tmp_run_dir, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(runs, "REPO_ROOT", tmp_path / "repo")
    fig = image_grid([solid(0)])
    for params, published in [({"QUICK": False, "tier": "toy"}, True), ({"QUICK": False}, True),
                              ({"QUICK": True, "tier": "toy"}, False), ({"QUICK": False, "tier": "tiny"}, False),
                              ({}, False)]:
        run = new_run("02_x", params, out_dir=tmp_run_dir)
        assert publishes(run) is published
        folder = tmp_path / "repo" if published else run.path
        assert publish(fig, run, "grid.png") == folder / "figures" / "grid.png"
        assert Image.open(folder / "figures" / "grid.png").format == "PNG"
