"""The results store: exclusive run folders, config content, atomic writes, PNG provenance, metrics, listing."""
from __future__ import annotations

import json
import platform
import re
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbutils import runs
from nbutils.runs import (
    REPO_ROOT,
    atomic_write,
    atomic_write_json,
    environment_info,
    latest_run,
    list_runs,
    load_run,
    new_run,
    read_png_metadata,
    repo_path,
)


@pytest.fixture
def fixed_time(monkeypatch):
    """Every run folder gets the same timestamp, as if all were created within one second."""
    monkeypatch.setattr(runs, "timestamp", lambda: "20250101-120000")


def test_repo_path_resolves_relative_against_repo_root(tmp_path):
    assert REPO_ROOT == Path(runs.__file__).resolve().parent.parent
    assert repo_path("runs/x") == REPO_ROOT / "runs" / "x"
    assert repo_path(tmp_path) == tmp_path


def test_runs_in_the_same_second_get_their_own_folders(tmp_run_dir, fixed_time):
    first = new_run("02_textual_inversion", {"SEED": 0}, out_dir=tmp_run_dir)
    second = new_run("02_textual_inversion", {"SEED": 0}, out_dir=tmp_run_dir)
    third = new_run("02_textual_inversion", {"SEED": 0}, out_dir=tmp_run_dir)
    assert [r.name for r in (first, second, third)] == [
        "02_textual_inversion-20250101-120000",
        "02_textual_inversion-20250101-120000-1",
        "02_textual_inversion-20250101-120000-2",
    ]
    assert sorted(p.name for p in tmp_run_dir.iterdir()) == sorted(r.name for r in (first, second, third))


def test_config_holds_notebook_method_params_time_and_environment(tmp_run_dir):
    before = datetime.now().astimezone()
    params = {"QUICK": True, "OUT_DIR": tmp_run_dir, "steps": [1, 2]}
    run = new_run("04_lora", params, out_dir=tmp_run_dir, method="lora")
    on_disk = json.loads((run.path / "config.json").read_text())
    assert on_disk == run.config
    assert on_disk["notebook"] == run.notebook == "04_lora"
    assert on_disk["method"] == run.method == "lora"
    assert on_disk["params"] == {"QUICK": True, "OUT_DIR": str(tmp_run_dir), "steps": [1, 2]}
    assert before <= datetime.fromisoformat(on_disk["created"]) <= datetime.now().astimezone()
    env = on_disk["environment"]
    assert env["python"] == platform.python_version()
    assert set(env["packages"]) == {"torch", "diffusers", "transformers", "peft", "torchmetrics"}
    import torch

    assert torch.__version__.startswith(env["packages"]["torch"])
    assert env["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    assert (env["git_dirty"] is None) == (env["git_commit"] is None)


def test_environment_info_records_git_commit_and_dirty_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "REPO_ROOT", tmp_path)
    info = environment_info()  # not a git checkout
    assert info["git_commit"] is None and info["git_dirty"] is None

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    info = environment_info()
    assert info["git_commit"] == git("rev-parse", "HEAD") and info["git_dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert environment_info()["git_dirty"] is True


def test_unserialisable_param_is_rejected_naming_the_key(tmp_run_dir):
    with pytest.raises(TypeError, match=r"params\['pipe'\].*object"):
        new_run("01_dataset", {"SEED": 1, "pipe": object()}, out_dir=tmp_run_dir)
    assert list(tmp_run_dir.iterdir()) == []
    with pytest.raises(ValueError, match="plain file name"):
        new_run("../escape", {}, out_dir=tmp_run_dir)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # fails mid-write: the old file must survive intact
    assert target.read_bytes() == b"new content"
    atomic_write_json(tmp_path / "sub" / "x.json", {"a": Path("/p"), "b": (1, 2)})
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": "/p", "b": [1, 2]}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["data.bin", "x.json"]


def test_png_metadata_round_trip(tmp_run_dir):
    run = new_run("05_dreambooth", {"MODEL": "/models/toy-sd", "SEED": 3}, out_dir=tmp_run_dir, method="dreambooth")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = run.save_image(
        Image.fromarray(pixels), "sample-0", prompt="123", seed=7, step=np.int64(400), scores={"clip": 0.25}
    )
    assert path == run.path / "images" / "sample-0.png"
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(img), pixels)
    meta = read_png_metadata(path)
    assert meta == {
        "prompt": "123",  # plain text stays text even when it looks like JSON
        "method": "dreambooth",
        "model": "/models/toy-sd",
        "seed": 7,
        "config": run.config,
        "step": 400,
        "scores": {"clip": 0.25},
    }
    with pytest.raises(ValueError, match="reserved"):
        run.save_image(Image.fromarray(pixels), "x", config="mine")
    with pytest.raises(ValueError, match="plain file name"):
        run.save_image(Image.fromarray(pixels), "../x")


def test_metrics_merge_and_series_append(tmp_run_dir):
    run = new_run("02_textual_inversion", {}, out_dir=tmp_run_dir)
    assert run.metrics == {}
    assert run.log_metrics(identity=0.5, clip_t=np.float32(0.25)) == {"identity": 0.5, "clip_t": 0.25}
    run.log_series("loss", 0, loss=1.5)
    run.log_series("loss", 1, loss=1.25, lr=1e-3)
    run.log_series("checkpoints", 100, identity=0.4)
    merged = run.log_metrics(identity=0.75)
    expected = {
        "identity": 0.75,
        "clip_t": 0.25,
        "series": {
            "loss": [{"step": 0, "loss": 1.5}, {"step": 1, "loss": 1.25, "lr": 1e-3}],
            "checkpoints": [{"step": 100, "identity": 0.4}],
        },
    }
    assert merged == expected
    assert json.loads((run.path / "metrics.json").read_text()) == expected == load_run(run.path).metrics
    with pytest.raises(ValueError, match="log_series"):
        run.log_metrics(series=[])
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "metrics.json"]


def test_artifact_path_creates_parents_and_stays_inside(tmp_run_dir):
    run = new_run("03_pplus", {}, out_dir=tmp_run_dir)
    path = run.artifact_path("checkpoints", "step-10", "embeds.safetensors")
    assert path == run.path / "artifacts" / "checkpoints" / "step-10" / "embeds.safetensors"
    assert path.parent.is_dir() and not path.exists()
    with pytest.raises(ValueError, match=r"\.\."):
        run.artifact_path("..", "outside.txt")


def test_list_and_latest_follow_creation_time_not_names(tmp_run_dir, monkeypatch):
    stamps = iter(["20250103-000000", "20250102-000000", "20250101-000000"])  # names sort backwards
    monkeypatch.setattr(runs, "timestamp", lambda: next(stamps))
    a1 = new_run("02_ti", {}, out_dir=tmp_run_dir, method="ti")
    b1 = new_run("03_pplus", {}, out_dir=tmp_run_dir, method="pplus")
    a2 = new_run("02_ti", {}, out_dir=tmp_run_dir, method="ti")
    assert [r.name for r in list_runs(tmp_run_dir)] == [a1.name, b1.name, a2.name]
    assert [r.name for r in list_runs(tmp_run_dir, notebook="02_ti")] == [a1.name, a2.name]
    assert [r.name for r in list_runs(tmp_run_dir, method="pplus")] == [b1.name]
    assert latest_run("02_ti", tmp_run_dir).path == a2.path
    assert latest_run("08_evaluation", tmp_run_dir) is None
    assert list_runs(tmp_run_dir / "missing") == []


def test_list_runs_finds_runs_inside_study_folders(tmp_run_dir):
    study = tmp_run_dir / "20250101-120000"
    study.mkdir()
    (study / "01_dataset.ipynb").write_text("{}")
    inside = new_run("01_dataset", {}, out_dir=study)
    loose = new_run("01_dataset", {}, out_dir=tmp_run_dir)
    assert [r.path for r in list_runs(tmp_run_dir)] == [inside.path, loose.path]
    assert [r.path for r in list_runs(study)] == [inside.path]


def test_bad_run_folders_give_clear_errors_and_are_skipped_with_a_warning(tmp_run_dir):
    good = new_run("01_dataset", {}, out_dir=tmp_run_dir)
    corrupt = tmp_run_dir / "01_dataset-corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    incomplete = tmp_run_dir / "01_dataset-incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text('{"notebook": "01_dataset"}')
    naive = tmp_run_dir / "01_dataset-naive-time"
    naive.mkdir()
    (naive / "config.json").write_text('{"notebook": "01_dataset", "params": {}, "created": "2025-01-01T12:00:00"}')
    empty = tmp_run_dir / "stray-folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="corrupt"):
        load_run(corrupt)
    with pytest.raises(ValueError, match="lacks"):
        load_run(incomplete)
    with pytest.raises(ValueError, match="time zone"):
        load_run(naive)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_run(empty)
    with pytest.warns(UserWarning) as caught:
        found = list_runs(tmp_run_dir)
    assert [r.path for r in found] == [good.path]
    warned = " ".join(str(w.message) for w in caught)
    for folder in (corrupt, incomplete, naive, empty):
        assert str(folder) in warned


def test_quick_comes_from_the_parameter_or_else_the_environment(monkeypatch):
    monkeypatch.setenv(runs.QUICK_ENV, "1")
    assert runs.resolve_quick(None) is True
    assert runs.resolve_quick(False) is False
    monkeypatch.setenv(runs.QUICK_ENV, "0")
    assert runs.resolve_quick(None) is False
    assert runs.resolve_quick(True) is True


def test_figures_of_quick_runs_stay_in_the_run_folder(tmp_path):
    run = new_run("00_x", {}, out_dir=tmp_path)
    assert run.figure_path("a.png", publish=True) == REPO_ROOT / "figures" / "a.png"
    assert run.figure_path("a.png", publish=False) == run.path / "figures" / "a.png"
    with pytest.raises(ValueError, match="plain file name"):
        run.figure_path("../a.png", publish=False)
