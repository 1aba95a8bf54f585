"""Notebook 08's readers of the results store, on synthetic run folders shaped like the method notebooks' runs."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from nbutils.compare import (
    BASE,
    COLUMNS,
    METHODS,
    comparison_rows,
    curves_figure,
    matrix_figure,
    pareto_figure,
    pareto_front,
    sample_matrix,
    scatter_points,
    select_runs,
    table_markdown,
    write_csv,
)
from nbutils.runs import new_run

TEMPLATES = {"studio": "a photo of {S}, in a studio", "beach": "a photo of {S}, on the beach",
             "pop_art": "a pop art poster of {S}"}
COSTS = {"train_s": 12.5, "eval_s": 3.0, "peak_rss_mb": 700.0, "peak_cuda_mb": None, "artifact_bytes": 352,
         "trainable_params": 64}


def method_run(out_dir, method, *, points=None, finished=True, quick=True, seed=0, model_ref="/models/toy",
               phrase="<sks> person", names=("studio", "beach", "pop_art"), size=16, colour=0, notebook=None):
    """A run as ``nbutils.study`` logs it: an ``eval`` point and the first seed's image of every prompt per step
    (step 0 with "a person"), then the costs if ``finished``. Image ``(step, prompt k)`` is filled with
    ``(colour, k, step % 256)``. ``points``: ``{step: scores}``, default identity 0.3 -> 0.5, CLIP-T 0.2 -> 0.1."""
    points = points or {0: {"identity": 0.3, "clip_t": 0.2}, 10: {"identity": 0.5, "clip_t": 0.1}}
    grid = {"names": list(names), "templates": [TEMPLATES[n] for n in names], "seeds": [seed * 100_000 + k
            for k in range(2)], "steps": 10, "guidance_scale": 4.0, "batch_size": 8, "model": model_ref,
            "dataset": "/d"}
    run = new_run(notebook or f"0x_{method}", {"SEED": seed, "QUICK": quick, "model_ref": model_ref, "eval": grid},
                  out_dir=out_dir, method=method)
    for step, scores in points.items():
        at = "a person" if step == 0 else phrase
        run.log_series("eval", step, subject_phrase=at, **{"detection_rate": 1.0, "fid": 9.0, **scores})
        for k, (name, template) in enumerate(zip(grid["names"], grid["templates"])):
            run.save_image(Image.new("RGB", (size, size), (colour, k, step % 256)), f"step-{step}-{name}",
                           prompt=template.replace("{S}", at), seed=grid["seeds"][0], step=step)
    if finished:
        run.log_metrics(**COSTS, steps=max(points))
    return run


def test_latest_finished_run_of_each_method_is_chosen_and_the_rest_explained(tmp_run_dir):
    new_run("01_dataset", {"SEED": 0, "QUICK": True}, out_dir=tmp_run_dir)  # no method: never compared
    pplus = method_run(tmp_run_dir, "pplus")
    method_run(tmp_run_dir, "textual_inversion")
    ti = method_run(tmp_run_dir, "textual_inversion")
    crashed = new_run("02_textual_inversion", {"SEED": 0, "QUICK": True, "model_ref": "/models/toy"},
                      out_dir=tmp_run_dir, method="textual_inversion")
    running = method_run(tmp_run_dir, "lora", finished=False)
    corrupt = method_run(tmp_run_dir, "pplus")
    corrupt.metrics_path.write_text('{"train_s": 1', encoding="utf-8")  # cut short by hand, not by atomic_write

    sel = select_runs(tmp_run_dir, quick=True, seed=0)

    assert sel.model_ref == "/models/toy"
    assert list(sel.runs) == ["textual_inversion", "pplus"]  # METHODS order, not creation order
    assert sel.runs["textual_inversion"].path == ti.path and sel.runs["pplus"].path == pplus.path
    assert sel.metrics["pplus"]["train_s"] == 12.5
    assert f"Skipped {crashed.name}: it logged no metrics (it crashed or is still running)." in sel.notes
    assert f"Skipped {corrupt.name}: its metrics.json is corrupt." in sel.notes
    assert f"Skipped {running.name}: it logged no training costs yet (it crashed or is still running)." in sel.notes
    missing = [n for n in sel.notes if n.startswith("No finished")]
    assert [n.removeprefix("No finished ").split(" run for ")[0] for n in missing] == [
        "LoRA", "SVDiff", "DreamBooth", "DreamBooth without prior preservation", "DreamBooth + TI",
        "LoRA + TI (pivotal tuning)", "E4T encoder alone (1 photo, no tuning)", "E4T (1 photo)",
        "IP-Adapter (1 photo)", "IP-Adapter + max pool", "IP-Adapter + avg pool", "IP-Adapter + self-attention"]
    assert all("run notebook 05" in n for n in missing[2:6]) and all("run notebook 06" in n for n in missing[6:])


def test_encoder_runs_come_after_the_methods_and_can_be_left_out(tmp_run_dir):
    method_run(tmp_run_dir, "ip_adapter_mean")
    method_run(tmp_run_dir, "zz_other")
    method_run(tmp_run_dir, "e4t")
    method_run(tmp_run_dir, "lora")
    assert list(select_runs(tmp_run_dir).runs) == ["lora", "e4t", "ip_adapter_mean", "zz_other"]
    assert list(select_runs(tmp_run_dir, methods=METHODS).runs) == ["lora"]
    labels = [row["method"] for row in comparison_rows(select_runs(tmp_run_dir))]
    assert labels == [BASE, "LoRA", "E4T (1 photo)", "IP-Adapter + avg pool", "zz_other"]


def test_only_runs_of_one_model_quick_and_seed_are_compared(tmp_run_dir):
    method_run(tmp_run_dir, "pplus", quick=False)
    method_run(tmp_run_dir, "pplus", seed=1)
    old = method_run(tmp_run_dir, "textual_inversion", model_ref="/models/old")
    new = method_run(tmp_run_dir, "textual_inversion", model_ref="/models/new")

    auto = select_runs(tmp_run_dir, quick=True, seed=0)
    assert auto.model_ref == "/models/new" and list(auto.runs) == ["textual_inversion"]
    assert auto.runs["textual_inversion"].path == new.path
    assert "Left out the runs of other models (/models/old); this compares /models/new." in auto.notes
    assert "Left out 2 method run(s) made with another QUICK or SEED." in auto.notes

    chosen = select_runs(tmp_run_dir, model="/models/old", quick=True, seed=0)
    assert chosen.model_ref == "/models/old" and chosen.runs["textual_inversion"].path == old.path
    assert set(select_runs(tmp_run_dir, quick=None, seed=None, model="/models/toy").runs) == {"pplus"}


def test_runs_scored_on_different_grids_are_flagged(tmp_run_dir):
    method_run(tmp_run_dir, "textual_inversion")
    method_run(tmp_run_dir, "pplus", names=("studio", "beach"))
    notes = select_runs(tmp_run_dir, quick=True, seed=0).notes
    assert "The runs were evaluated on different grids (names, templates differ): their scores compare only " \
           "roughly." in notes


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_store_gives_a_note_and_empty_results(tmp_path, make_dir):
    out_dir = tmp_path / "runs"
    if make_dir:
        out_dir.mkdir()
    sel = select_runs(out_dir, quick=True, seed=0)
    assert sel.runs == {} and sel.model_ref is None
    assert sel.notes == [f"No method run with QUICK=True, SEED=0 in {out_dir}: run the method notebooks (02-05) "
                         "first with the same OUT_DIR, QUICK and SEED."]
    rows = comparison_rows(sel)
    assert rows == [] and table_markdown(rows) == "*No runs to compare.*"
    assert scatter_points(rows) == ({}, [])
    matrix = sample_matrix(sel.runs)
    assert matrix.prompts == [] and matrix.cells == {} and matrix.seed is None
    for fig, says in ((pareto_figure({}, "t"), "No run has both scores"),
                      (curves_figure(sel.runs, "identity", "t", "y"), "No run logged 'identity'"),
                      (matrix_figure(matrix, "t"), "No run saved images")):
        assert fig.axes[0].texts[0].get_text().startswith(says)


def test_rows_hold_base_model_and_final_scores_and_round_trip_through_csv(tmp_run_dir, tmp_path):
    method_run(tmp_run_dir, "textual_inversion",
               points={0: {"identity": 0.3, "clip_t": 0.2}, 5: {"identity": 0.4, "clip_t": 0.15},
                       10: {"identity": 0.5, "clip_t": 0.1, "kid_mean": 0.01}})
    sel = select_runs(tmp_run_dir, quick=True, seed=0)
    rows = comparison_rows(sel)
    name = sel.runs["textual_inversion"].name
    unlogged = dict.fromkeys(["success_rate", "dino", "identity_lo", "identity_hi", "identity_sd", "clip_t_lo",
                              "clip_t_hi", "clip_t_sd"])  # no per-image scores, one seed
    assert rows[0] == {"method": BASE, "run": name, "steps": 0, "n_seeds": 1, "identity": 0.3,
                       "detection_rate": 1.0, "clip_t": 0.2, "clip_i": None, "fid": 9.0, "kid_mean": None,
                       "is_mean": None, **unlogged, **dict.fromkeys(["train_s", "peak_rss_mb", "peak_cuda_mb",
                                                                     "artifact_bytes", "trainable_params"])}
    assert rows[1] == {"method": "Textual Inversion", "run": name, "steps": 10, "n_seeds": 1, "identity": 0.5,
                       "detection_rate": 1.0, "clip_t": 0.1, "clip_i": None, "fid": 9.0, "kid_mean": 0.01,
                       "is_mean": None, **unlogged, "train_s": 12.5, "peak_rss_mb": 700.0,
                       "peak_cuda_mb": None, "artifact_bytes": 352, "trainable_params": 64}

    path = write_csv(rows, tmp_path / "out" / "comparison.csv")
    with path.open(encoding="utf-8", newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["method", *(k for k in COLUMNS if k != "dino")]  # no DINO logged: no DINO column
    assert back == [{k: "" if v is None else str(v) for k, v in row.items() if k != "dino"} for row in rows]

    table = table_markdown(rows).splitlines()
    assert table[0] == "| score | base model | Textual Inversion |"
    assert "| identity (cos) ↑ | 0.3 | 0.5 |" in table and "| KID ↓ | n/a | 0.01 |" in table
    assert not any(line.startswith("| DINO") for line in table)
    real = [{**rows[0], "dino": 0.25}, rows[1]]  # the real tier logs DINO: the column appears
    assert "| DINO (cos) ↑ | 0.25 | n/a |" in table_markdown(real).splitlines()
    assert "dino" in next(csv.DictReader(write_csv(real, tmp_path / "real.csv").open(encoding="utf-8")))


def test_a_run_whose_images_show_no_face_is_tabled_but_not_plotted(tmp_run_dir):
    method_run(tmp_run_dir, "pplus", points={0: {"identity": 0.3, "clip_t": 0.2},
                                             10: {"identity": None, "detection_rate": 0.0, "clip_t": 0.25}})
    rows = comparison_rows(select_runs(tmp_run_dir, quick=True, seed=0))
    assert rows[1]["identity"] is None and rows[1]["detection_rate"] == 0.0
    points, notes = scatter_points(rows)
    assert points == {BASE: (0.2, 0.3)}
    assert notes == ["P+ is not plotted: no identity (cos) ↑ logged (faces found in 0% of its images)."]


def test_pareto_front_keeps_the_undominated_points_in_x_order():
    points = {"A": (0.1, 0.9), "B": (0.5, 0.5), "C": (0.4, 0.4), "D": (0.9, 0.1), "E": (0.5, 0.5), "F": (0.1, 0.8)}
    assert pareto_front(points) == ["A", "B", "E", "D"]  # C is below B, F below A; equal points both stay
    assert pareto_front({"only": (0.0, 0.0)}) == ["only"]

    fig = pareto_figure(points, "t")
    ax = fig.axes[0]
    (front,) = ax.get_lines()
    assert list(zip(front.get_xdata(), front.get_ydata())) == [points[n] for n in ["A", "B", "E", "D"]]
    assert sorted(t.get_text() for t in ax.texts) == sorted(points)
    assert ax.get_xlabel().startswith("editability: CLIP-T") and ax.get_title() == "t"


def test_curves_follow_each_runs_eval_series(tmp_run_dir):
    method_run(tmp_run_dir, "textual_inversion")
    method_run(tmp_run_dir, "dreambooth", points={0: {"identity": 0.3}, 4: {"identity": 0.6}, 8: {"identity": 0.7}})
    fig = curves_figure(select_runs(tmp_run_dir, quick=True, seed=0).runs, "identity", "t", "identity")
    lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert lines == {"Textual Inversion": [(0, 0.3), (10, 0.5)], "DreamBooth": [(0, 0.3), (4, 0.6), (8, 0.7)]}


def test_sample_matrix_matches_prompt_and_seed_across_subject_phrases_and_sizes(tmp_run_dir):
    method_run(tmp_run_dir, "textual_inversion", colour=1)
    db = method_run(tmp_run_dir, "dreambooth", phrase="sks person", names=("studio", "pop_art"), size=8, colour=2)
    db.save_image(Image.new("RGB", (8, 8), (9, 9, 9)), "other-seed", prompt="a photo of sks person, on the beach",
                  seed=7, step=10)  # a seed the grid does not use: never matched

    matrix = sample_matrix(select_runs(tmp_run_dir, quick=True, seed=0).runs)

    assert matrix.seed == 0 and matrix.prompts == ["studio", "beach", "pop_art"]
    assert list(matrix.cells) == [BASE, "Textual Inversion", "DreamBooth"]
    colours = {row: [None if im is None else np.asarray(im)[0, 0].tolist() for im in images]
               for row, images in matrix.cells.items()}
    assert colours == {BASE: [[1, 0, 0], [1, 1, 0], [1, 2, 0]],  # step 0 of the first run
                       "Textual Inversion": [[1, 0, 10], [1, 1, 10], [1, 2, 10]],
                       "DreamBooth": [[2, 0, 10], None, [2, 1, 10]]}
    assert {im.size for images in matrix.cells.values() for im in images if im is not None} == {(16, 16)}
    assert "DreamBooth: no image of beach at seed 0." in matrix.notes
    assert "DreamBooth: images of 8x8 px resized to 16x16 px to fit the grid." in matrix.notes

    fig = matrix_figure(matrix, "t")
    assert len(fig.axes) == 9
    assert [ax.get_title() for ax in fig.axes[:3]] == ["studio", "beach", "pop art"]
    assert [fig.axes[k].get_ylabel() for k in (0, 3, 6)] == [BASE, "Textual Inversion", "DreamBooth"]
    assert np.asarray(fig.axes[7].images[0].get_array())[0, 0].tolist() == [200, 200, 200]  # the missing cell


def test_training_seeds_pool_into_mean_spread_and_an_interval_over_every_image(tmp_run_dir):
    from nbutils.compare import interval_bars
    from nbutils.metrics import bootstrap_ci

    per_seed = {0: [0.4, 0.5, 0.6], 1: [0.7, 0.8, 0.9]}
    for seed, values in per_seed.items():
        final = {"identity": float(np.mean(values)), "identity_per_image": values, "clip_t": 0.2 + 0.1 * seed,
                 "clip_t_per_image": [0.2 + 0.1 * seed] * 3, "success_rate": 0.5 * seed}
        method_run(tmp_run_dir, "textual_inversion", seed=seed, points={0: {"identity": 0.3, "clip_t": 0.2},
                                                                        10: final})
    selections = [select_runs(tmp_run_dir, quick=True, seed=s) for s in per_seed]
    base, ti = comparison_rows(selections)
    assert base["method"] == BASE and base["n_seeds"] == 2 and base["identity"] == pytest.approx(0.3)
    assert ti["n_seeds"] == 2 and ti["identity"] == pytest.approx(0.65) and ti["success_rate"] == pytest.approx(0.25)
    assert ti["identity_sd"] == pytest.approx(np.std([0.5, 0.8], ddof=1))
    assert [ti["identity_lo"], ti["identity_hi"]] == bootstrap_ci(per_seed[0] + per_seed[1])
    assert ti["identity_lo"] < ti["identity"] < ti["identity_hi"]
    one = comparison_rows(selections[0])[1]
    assert one["n_seeds"] == 1 and one["identity_sd"] is None and one["identity_lo"] < 0.5 < one["identity_hi"]
    bars = interval_bars([base, ti])
    assert list(bars) == ["Textual Inversion"]  # the base model logged no per-image scores here
    fig = pareto_figure(scatter_points([ti])[0], "t", errors=bars)
    assert len(fig.axes[0].containers) == 1  # one error bar
