"""Every method by name (nbutils.recipes) on the tiny random pipeline, the sweep's table and its choice rule, and
scripts/sweep.py end to end (a cut sweep resumes without training again)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbutils.class_images import ensure_class_images
from nbutils.compare import METHODS
from nbutils.metrics import suite_for_tier
from nbutils.models import build_tiny_pipeline
from nbutils.recipes import CLIP_T_TOLERANCE, OPTIONS, build, check_options, choose_recipe, sweep_rows, train_recipe
from nbutils.runs import list_runs, new_run
from nbutils.study import SubjectData, eval_setup
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    pairs = [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(portraits(0, 3, identity=TOY_SUBJECT))]
    return SubjectData(tmp_path_factory.mktemp("data"), pairs, [image for image, _ in pairs], "sks")


@pytest.fixture(scope="module")
def class_images(tmp_path_factory):
    return ensure_class_images(build_tiny_pipeline(0), 4, steps=2, guidance_scale=4.0, model="tiny",
                               cache_dir=tmp_path_factory.mktemp("cls"))


def test_options_cover_every_method_and_unknown_ones_are_refused():
    assert set(OPTIONS) == set(METHODS)
    assert check_options("lora", {"rank": 16}) == {"rank": 16}
    with pytest.raises(ValueError, match="choose from"):
        check_options("lora_xl", {})
    with pytest.raises(ValueError, match="takes no option"):
        check_options("textual_inversion", {"rank": 4})


def test_dreambooth_with_a_prior_needs_class_images(subject):
    with pytest.raises(ValueError, match="class_images"):
        build("dreambooth", "tiny", subject)
    assert build("dreambooth", "tiny", subject, prior_loss_weight=0.0).method.prior_loss_weight == 0.0


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_by_name_and_logs_its_checkpoints(name, subject, class_images, tmp_path):
    setup = eval_setup("tiny", subject.path, seed=0, quick=True, n_samples=2)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, resolution=32, checkpoint_every=2)
    run = new_run("sweep", {"method": name}, out_dir=tmp_path, method=name)
    built = build(name, "tiny", subject, class_images=class_images)
    uses_token = name in ("textual_inversion", "pplus", "dreambooth_ti", "pivotal_tuning")
    assert built.phrase == ("<sks> person" if uses_token else "sks person")
    assert all(("<sks>" in c) == uses_token for _, c in built.pairs)
    before = [p.detach().clone() for p in built.method.trainable_parameters()]
    del built
    method, evaluator, costs = train_recipe(name, "tiny", subject, setup, suite_for_tier("tiny"), cfg, run,
                                            class_images=class_images)
    assert sorted(evaluator.scores) == [0, 2]
    assert [p["step"] for p in run.metrics["series"]["eval"]] == [0, 2]
    assert costs["steps"] == 2 and costs["trainable_params"] == sum(p.numel() for p in before)
    after = [p.detach() for p in method.trainable_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the same start, then trained


def _row(identity, clip_t, steps, lr=1e-3):
    return {"lr": lr, "steps": steps, "identity": identity, "clip_t": clip_t}


def test_the_choice_keeps_editability_then_identity_then_fewer_steps():
    base = {"identity": 0.3, "clip_t": 0.60}
    rows = [_row(0.95, 0.50, 400), _row(0.80, 0.58, 400), _row(0.80, 0.59, 200), _row(0.70, 0.62, 100)]
    chosen = choose_recipe(rows, base)
    assert (chosen["identity"], chosen["steps"]) == (0.80, 200)  # 0.95 lost more than CLIP_T_TOLERANCE
    assert "highest identity with CLIP-T" in chosen["rule"]
    lost = choose_recipe([_row(0.9, 0.60 - CLIP_T_TOLERANCE - 0.01, 100)], base)
    assert lost["identity"] == 0.9 and lost["rule"].startswith("no recipe kept")


def test_sweep_rows_read_every_checkpoint_of_finished_runs(tmp_path):
    base = {"identity": 0.1, "clip_t": 0.5}
    for finished in (True, False):
        run = new_run("sweep", {"method": "lora", "options": {} if finished else {"rank": 8},
                                "train": {"lr": 1e-3, "batch_size": 4, "steps": 4}}, out_dir=tmp_path)
        for step in (0, 2, 4):
            run.log_series("eval", step, identity=0.1 * step, clip_t=0.5)
        run.log_metrics(train_s=8.0)
        if finished:
            run.finish()
    rows = sweep_rows(list_runs(tmp_path), base)
    assert [(r["steps"], r["identity"], r["train_s"], r["rank"]) for r in rows] == [(2, 0.2, 4.0, 4),
                                                                                   (4, 0.4, 8.0, 4)]
    with pytest.raises(ValueError, match="No finished"):
        sweep_rows([], base)


def test_sweep_script_trains_each_recipe_once_and_writes_its_table(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), "--method", "lora", "--lr", "1e-2",
           "--steps", "2", "--every", "1", "--samples", "2", "--batch", "2", "--model", "tiny", "--option",
           "rank=1,2", "--out", str(tmp_path / "store"), "--table", str(tmp_path / "{method}.csv")]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("training into") == 2
    lines = (tmp_path / "lora.csv").read_text().splitlines()
    assert lines[0].startswith("lr,batch,rank,steps,identity,clip_t") and len(lines) == 1 + 2 * 2
    assert "chosen:" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0 and "training into" not in again.stdout and again.stdout.count("done in") == 2
    assert len(list_runs(tmp_path / "store" / "lora", notebook="sweep")) == 2


def test_a_committed_sweep_table_reads_back_and_plots_with_its_choice(tmp_path):
    from nbutils.recipes import describe_choice, read_sweep, sweep_figure

    (tmp_path / "lora.csv").write_text("lr,batch,rank,steps,identity,clip_t,clip_i,success_rate,train_s,"
                                       "base_identity,base_clip_t,run\n"
                                       "0.001,4,4,100,0.5,0.6,0.3,,10.0,0.3,0.62,a\n"
                                       "0.001,4,4,200,0.7,0.5,0.3,0.1,20.0,0.3,0.62,a\n"
                                       "0.003,4,4,100,0.6,0.58,0.3,0.0,10.0,0.3,0.62,b\n")
    rows = read_sweep("lora", tmp_path)
    assert rows[0]["rank"] == 4 and rows[0]["success_rate"] is None and rows[1]["lr"] == 0.001
    chosen = choose_recipe(rows)
    assert (chosen["lr"], chosen["steps"]) == (0.003, 100)  # 0.7 lost CLIP-T 0.12 > the tolerance
    assert describe_choice(chosen).startswith("Chosen on the validation subject: lr 0.003, rank 4, 100 steps")
    fig = sweep_figure(rows, chosen, "t")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2 + 1  # two recipes and the base model
    with pytest.raises(FileNotFoundError, match="scripts/sweep.py --method svdiff"):
        read_sweep("svdiff", tmp_path)


def test_default_recipe_is_the_sweeps_choice_on_the_toy_tier_and_the_module_default_elsewhere(tmp_path):
    from nbutils.lora import default_config as lora_config
    from nbutils.recipes import default_recipe

    (tmp_path / "pivotal_tuning.csv").write_text(
        "lr,batch,rank,steps,identity,clip_t,clip_i,success_rate,train_s,base_identity,base_clip_t,run\n"
        "0.002,4,16,300,0.7,0.6,0.3,0.2,30.0,0.3,0.62,a\n0.002,4,16,400,0.6,0.6,0.3,0.2,40.0,0.3,0.62,a\n")
    cfg, options = default_recipe("pivotal_tuning", "toy", folder=tmp_path)
    assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.checkpoint_every, cfg.resolution) == (0.002, 4, 300, 75, 64)
    assert options == {"rank": 16}
    quick, _ = default_recipe("pivotal_tuning", "toy", quick=True, folder=tmp_path)
    assert (quick.steps, quick.checkpoint_every) == (30, 15)
    assert default_recipe("pivotal_tuning", "real", folder=tmp_path) == (lora_config("real"), {})
    with pytest.raises(FileNotFoundError, match="sweep.py --method lora"):
        default_recipe("lora", "toy", folder=tmp_path)
