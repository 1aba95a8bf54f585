"""The method notebooks' shared plumbing: notebook 01's dataset, the evaluation grid and callback, costs, comparisons."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from PIL import Image

from nbutils import study
from nbutils.augment import AugmentConfig, write_prepared_dataset
from nbutils.metrics import EvalSuite, evaluate_images, images_to_tensor
from nbutils.models import build_tiny_pipeline, ensure_tiny_pipeline, tier_defaults
from nbutils.photos import TOY_SUBJECT_DIR, Photo
from nbutils.resources import Usage
from nbutils.runs import new_run, read_png_metadata
from nbutils.study import (
    CheckpointEvaluator,
    eval_setup,
    first_step_reaching,
    load_subject_dataset,
    log_resources,
    reference_run,
    reference_runs,
    sample_prompts,
    subject_identity,
    train_and_log,
    with_overrides,
)
from nbutils.text import with_placeholder
from nbutils.textual_inversion import TextualInversion
from nbutils.toyworld import TOY_SUBJECT, TOY_VAL_SUBJECT, Portrait, portraits, render
from nbutils.train import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:no (CLIP model|feature network|logits network):UserWarning")


class MeanColour:
    """A deterministic stand-in identity embedder: the mean colour of each image (every image has a 'face')."""

    name = "mean-colour"

    def embed(self, images):
        x = images_to_tensor(images, 8).mean(dim=(2, 3))
        return F.normalize(x, dim=1), torch.ones(len(images), dtype=torch.bool)


def write_01_run(out_dir: Path, token: str, n_photos: int, size: int, seed: int):
    """A notebook-01 run folder holding a prepared dataset of toy-subject renders (1 + 2 copies per photo)."""
    run = new_run("01_dataset", {"TOKEN": token, "SEED": seed}, out_dir=out_dir)
    photos = [Photo(render(p, size), Path(f"{k}.png")) for k, p in
              enumerate(portraits(seed, n_photos, identity=TOY_SUBJECT))]
    write_prepared_dataset(photos, run.artifact_path("dataset"), token, ["a photo of {token} person"],
                           AugmentConfig(n_per_image=2), seed)
    return run, photos


@pytest.fixture(scope="module")
def tiny_ref() -> str:
    return str(ensure_tiny_pipeline())


# --------------------------------------------------------------------------------------------------- data
def test_the_latest_01_run_gives_pairs_references_and_token(tmp_run_dir):
    write_01_run(tmp_run_dir, "old", n_photos=2, size=32, seed=1)
    newest, photos = write_01_run(tmp_run_dir, "zqx", n_photos=3, size=32, seed=2)
    subject = load_subject_dataset("auto", tmp_run_dir, resolution=32)
    assert subject.path == newest.path / "artifacts" / "dataset" and (subject.token, subject.seed) == ("zqx", 2)
    assert len(subject.pairs) == 9 and {c for _, c in subject.pairs} == {"a photo of zqx person"}
    assert [np.asarray(r).tolist() for r in subject.references] == [np.asarray(p.image).tolist() for p in photos]

    by_folder = load_subject_dataset(subject.path, "unused")
    assert by_folder.token == "zqx" and len(by_folder.pairs) == 9


def test_missing_or_mismatched_dataset_is_a_clear_error(tmp_run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run notebooks/01_dataset.ipynb first \(or make study\)"):
        load_subject_dataset("auto", tmp_run_dir)
    write_01_run(tmp_run_dir, "sks", n_photos=1, size=32, seed=0)
    with pytest.raises(ValueError, match="are 32 px but this model trains at 64 px.*same MODEL"):
        load_subject_dataset("auto", tmp_run_dir, resolution=64)
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        load_subject_dataset(tmp_path / "nothing-here", tmp_run_dir)


def test_the_subjects_true_identity_comes_from_its_01_run(tmp_run_dir, tmp_path):
    """A drawn toy subject's identity (subject.json of the folder notebook 01 read); None where it is unknown."""
    assert subject_identity({"SUBJECT_DIR": "data/subjects/toy-val", "tier": "toy"}) == TOY_VAL_SUBJECT
    assert subject_identity({"SUBJECT_DIR": "auto", "tier": "toy", "subject": str(TOY_SUBJECT_DIR)}) == TOY_SUBJECT
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    other = replace(TOY_SUBJECT, hair_colour="red")
    (drawn / "subject.json").write_text(json.dumps({"identity": asdict(other)}))
    assert subject_identity({"SUBJECT_DIR": str(drawn), "tier": "tiny"}) == other
    photos = tmp_path / "me"
    photos.mkdir()
    for params in ({"SUBJECT_DIR": "data/subjects/toy", "tier": "real"},  # the real tier: no attribute net
                   {"SUBJECT_DIR": str(photos), "tier": "toy"},  # real photos: nobody knows their traits
                   {"SUBJECT_DIR": "auto", "tier": "real", "subject": "demo"}, {}):
        assert subject_identity(params) is None, params
    run = new_run("01_dataset", {"TOKEN": "sks", "SEED": 0, "SUBJECT_DIR": "data/subjects/toy-val", "tier": "toy"},
                  out_dir=tmp_run_dir)
    photo = [Photo(render(p, 32), Path("0.png")) for p in portraits(0, 1, identity=TOY_VAL_SUBJECT)]
    write_prepared_dataset(photo, run.artifact_path("dataset"), "sks", ["a photo of {token} person"],
                           AugmentConfig(n_per_image=1), 0)
    assert load_subject_dataset("auto", tmp_run_dir).identity == TOY_VAL_SUBJECT


def test_with_overrides_keeps_defaults_for_none_and_takes_zero():
    cfg = TrainConfig(steps=100, lr=1e-3, checkpoint_every=50)
    out = with_overrides(cfg, steps=None, lr=5e-3, checkpoint_every=0)
    assert (out.steps, out.lr, out.checkpoint_every) == (100, 5e-3, 0)


# --------------------------------------------------------------------------------------------------- evaluation
def test_eval_setup_defaults_prompts_and_record(tiny_ref):
    setup = eval_setup(tiny_ref, "data/x", seed=3, quick=False, names=("studio", "pop_art"))
    defaults = tier_defaults("tiny")
    assert setup.seeds == (300_000, 300_001) and len(setup.seeds) == defaults.num_samples
    assert (setup.steps, setup.guidance_scale, setup.batch_size) == (defaults.inference_steps,
                                                                      defaults.guidance_scale, defaults.batch_size)
    assert setup.prompts("<sks> person") == ["a photo of <sks> person, in a studio", "a pop art poster of <sks> person"]
    assert json.loads(json.dumps(setup.as_dict()))["seeds"] == [300_000, 300_001]
    assert eval_setup(tiny_ref, "data/x", seed=3, quick=True, n_samples=5, steps=7).seeds[-1] == 300_004
    with pytest.raises(ValueError, match="Unknown evaluation prompts \\['van_gogh'\\]"):
        eval_setup(tiny_ref, "data/x", seed=0, quick=False, names=("van_gogh",))  # no toy-world Van Gogh


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    write_01_run(out, "sks", n_photos=2, size=32, seed=0)
    return load_subject_dataset("auto", out)


def test_evaluator_scores_exactly_the_images_it_samples_and_logs_them(tiny_pipe, tiny_ref, subject, tmp_run_dir):
    setup = eval_setup(tiny_ref, subject.path, seed=0, quick=True, names=("studio", "beach"))
    suite = EvalSuite(MeanColour())
    evaluator = CheckpointEvaluator(setup, subject, suite, "<sks> person")
    run = new_run("02_x", {}, out_dir=tmp_run_dir)

    baseline = evaluator.evaluate(tiny_pipe, run, 0, subject_phrase="a person")
    images = sample_prompts(tiny_pipe, setup, "a person")
    expected = evaluate_images(images, subject.references, suite, subject_phrase="a person")
    assert baseline["identity"] == pytest.approx(expected["identity"], abs=1e-6)
    assert list(baseline["per_prompt"]) == setup.prompts("a person")
    assert [np.asarray(i).tolist() for i in evaluator.grid[0]] == [np.asarray(v[0]).tolist() for v in images.values()]
    assert list(evaluator.images) == list(images)  # every image of the latest evaluation, kept for other measures
    assert all([np.asarray(i).tolist() for i in evaluator.images[p]] == [np.asarray(i).tolist() for i in images[p]]
               for p in images)

    assert evaluator.seconds == 0  # the baseline is evaluated before training: not part of its wall time
    evaluator(5, SimpleNamespace(pipe=tiny_pipe), run)  # as a train() callback: the subject phrase
    points = run.metrics["series"]["eval"]
    assert [(p["step"], p["subject_phrase"]) for p in points] == [(0, "a person"), (5, "<sks> person")]
    assert points[0]["identity"] == pytest.approx(baseline["identity"]) and sorted(evaluator.scores) == [0, 5]
    assert list(evaluator.images) == setup.prompts("<sks> person")  # now the latest evaluation's
    meta = read_png_metadata(run.path / "images" / "step-5-beach.png")
    assert meta["prompt"] == "a photo of <sks> person, on the beach" and meta["seed"] == 0 and meta["step"] == 5
    assert evaluator.seconds > 0
    fig = evaluator.grid_figure("grid")
    assert len(fig.axes) == 2 * 2 and fig.axes[0].get_ylabel() == "step 0\n(a person)"


class Oracle:
    """A stand-in attribute net that reads every image as ``portrait`` (and counts its calls)."""

    def __init__(self, portrait):
        self.labels, self.calls = portrait.labels(), 0

    def __call__(self, images):
        self.calls += 1
        return {k: torch.full((len(images),), v) for k, v in self.labels.items()}


def test_evaluator_passes_the_subjects_identity_as_truth(tiny_pipe, tiny_ref, subject, tmp_run_dir):
    """With the subject's identity known, the logged point holds a success rate (here an attribute net that sees
    the subject in a studio photo everywhere: 1 for the studio prompt, 0 for the beach one); without it, None."""
    setup = eval_setup(tiny_ref, subject.path, seed=0, quick=True, names=("studio", "beach"))
    oracle = Oracle(Portrait(TOY_SUBJECT, scene="studio", style="photo"))
    suite = EvalSuite(MeanColour(), attributes=oracle)
    known = replace(subject, identity=TOY_SUBJECT)
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    scores = CheckpointEvaluator(setup, known, suite, "<sks> person").evaluate(tiny_pipe, run, 0,
                                                                                 subject_phrase="a person")
    assert scores["success_rate"] == 0.5 and oracle.calls == 1
    assert [v["success_rate"] for v in scores["per_prompt"].values()] == [1.0, 0.0]
    point = run.metrics["series"]["eval"][0]
    assert point["success_rate"] == 0.5 and point["success_per_image"] == [True] * 2 + [False] * 2
    assert len(point["identity_per_image"]) == 4 and len(point["identity_ci"]) == 2
    assert subject.identity is None  # the fixture's notebook-01 run names no subject folder
    unknown = CheckpointEvaluator(setup, subject, suite, "<sks> person").evaluate(
        tiny_pipe, new_run("02_x", {}, out_dir=tmp_run_dir), 0, subject_phrase="a person")
    assert unknown["success_rate"] is None and oracle.calls == 1


def test_embed_path_gives_the_pipelines_own_images_for_its_own_embeddings(tiny_pipe, tiny_ref, subject,
                                                                         tmp_run_dir):
    setup = eval_setup(tiny_ref, "d", seed=1, quick=True, names=("studio",))

    def embed(prompts):
        return tiny_pipe.encode_prompt(prompts, tiny_pipe.device, 1, True)

    plain = sample_prompts(tiny_pipe, setup, "a person")
    embedded = sample_prompts(tiny_pipe, setup, "a person", embed=embed)
    assert list(plain) == list(embedded)
    for a, b in zip(plain.values(), embedded.values()):
        assert [np.asarray(i).tolist() for i in a] == [np.asarray(i).tolist() for i in b]

    calls = []

    def method_embed(method, prompts):  # what a method such as P+ passes to the evaluator
        calls.append((method.pipe, list(prompts)))
        return embed(prompts)

    evaluator = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "a person", embed=method_embed)
    evaluator(3, SimpleNamespace(pipe=tiny_pipe), new_run("03_x", {}, out_dir=tmp_run_dir))
    assert calls == [(tiny_pipe, setup.prompts("a person"))]
    assert [np.asarray(i).tolist() for i in evaluator.grid[3]] == [np.asarray(v[0]).tolist() for v in plain.values()]


def test_pipe_kwargs_reach_every_pipeline_call_and_change_the_images(tiny_pipe, tiny_ref, subject, tmp_run_dir):
    setup = eval_setup(tiny_ref, "d", seed=1, quick=True, names=("studio", "beach"))
    plain = sample_prompts(tiny_pipe, setup, "a person")
    sharper = sample_prompts(tiny_pipe, setup, "a person", guidance_rescale=0.9)
    assert any(np.asarray(a).tolist() != np.asarray(b).tolist()
               for p in plain for a, b in zip(plain[p], sharper[p]))
    evaluator = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "a person")
    evaluator.evaluate(tiny_pipe, new_run("06_x", {}, out_dir=tmp_run_dir), 1,
                       pipe_kwargs={"guidance_rescale": 0.9})
    assert [np.asarray(i).tolist() for i in evaluator.grid[1]] == [np.asarray(v[0]).tolist()
                                                                    for v in sharper.values()]


def test_copy_eval_point_shares_a_baseline_without_sampling(tiny_pipe, tiny_ref, subject, tmp_run_dir):
    setup = eval_setup(tiny_ref, "d", seed=1, quick=True, names=("studio", "beach"))
    source, target = (new_run("06_x", {"k": k}, out_dir=tmp_run_dir, method=m) for k, m in ((1, "a"), (2, "b")))
    scores = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "a person").evaluate(tiny_pipe, source, 0)
    copied = study.copy_eval_point(source, target, 0)
    assert target.metrics["series"]["eval"] == source.metrics["series"]["eval"] == [copied]
    assert copied["identity"] == scores["identity"]
    for name in setup.names:
        a, b = (Image.open(r.path / "images" / f"step-0-{name}.png") for r in (source, target))
        assert np.asarray(a).tolist() == np.asarray(b).tolist()
        assert read_png_metadata(b.filename)["method"] == "b" and read_png_metadata(b.filename)["step"] == 0
    fresh = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "a person")
    assert fresh.evaluate(None, target, 0) == {k: v for k, v in copied.items() if k not in ("step", "subject_phrase")}
    with pytest.raises(KeyError, match="no 'eval' point at step 5"):
        study.copy_eval_point(source, target, 5)


# --------------------------------------------------------------------------------------------------- costs, comparing
def test_log_resources_subtracts_evaluation_time(tmp_run_dir, tmp_path):
    artifact = tmp_path / "learned.safetensors"
    artifact.write_bytes(b"x" * 1234)
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    usage = Usage(wall_s=10.0, start_rss_mb=100.0, peak_rss_mb=150.5, peak_cuda_mb=None)
    values = log_resources(run, usage, artifact, excluded_s=4.0, steps=40)
    assert values == {"train_s": 6.0, "eval_s": 4.0, "peak_rss_mb": 150.5, "added_rss_mb": 50.5,
                      "peak_cuda_mb": None, "artifact_bytes": 1234, "steps": 40}
    assert {k: run.metrics[k] for k in values} == values


@pytest.mark.parametrize("wrapped", [False, True])
def test_train_and_log_excludes_only_the_evaluation_during_training(tiny_ref, subject, tmp_run_dir, wrapped):
    """Also when ``train`` calls a callback that wraps the evaluator (as notebook 04 does for SVDiff)."""
    pipe = build_tiny_pipeline(seed=0)  # its own: textual inversion adds a token
    method = TextualInversion(pipe, "<sks>", init_word="person")
    setup = eval_setup(tiny_ref, subject.path, seed=0, quick=True, names=("studio",))
    evaluator = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "<sks> person")
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    evaluator.evaluate(pipe, run, 0, subject_phrase="a person")
    before = evaluator.seconds
    dataset = with_placeholder(subject.pairs, subject.token, "<sks>")
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_every=1, resolution=32)
    wrapper_steps = []

    def callback(step, method, run):
        wrapper_steps.append(step)
        evaluator(step, method, run)

    result, costs = train_and_log(method, dataset, cfg, run, evaluator, callback=callback if wrapped else None,
                                  note="x")
    assert wrapper_steps == ([1, 2] if wrapped else [])
    assert sorted(evaluator.scores) == [0, 1, 2] and result.checkpoint.name == "step-2"
    assert costs["eval_s"] == round(evaluator.seconds - before, 1) and costs["train_s"] >= 0
    assert costs["artifact_bytes"] == (result.checkpoint / method.weights_name).stat().st_size
    assert (costs["steps"], costs["trainable_params"], costs["note"]) == (2, method.embeds.numel(), "x")
    assert {k: run.metrics[k] for k in costs} == costs


def test_a_resumed_run_keeps_its_recorded_scores_and_grid_without_sampling_them_again(tiny_ref, subject, tmp_run_dir,
                                                                                     monkeypatch):
    """Training finished but the notebook died before its end: running it again (a new evaluator, the same run)
    samples nothing, returns the recorded scores and grid, and logs the earlier training time and the resume step."""

    setup = eval_setup(tiny_ref, subject.path, seed=0, quick=True, names=("studio",))
    dataset = with_placeholder(subject.pairs, subject.token, "<sks>")
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_every=1, resolution=32)
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    first = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "<sks> person")
    first.evaluate(build_tiny_pipeline(seed=0), run, 0, subject_phrase="a person")
    _, costs = train_and_log(TextualInversion(build_tiny_pipeline(seed=0), "<sks>"), dataset, cfg, run, first)
    logged = run.metrics["series"]

    sampled = []
    monkeypatch.setattr(study, "sample_prompts", lambda *a, **k: sampled.append(a) or {})
    again = CheckpointEvaluator(setup, subject, EvalSuite(MeanColour()), "<sks> person")
    pipe = build_tiny_pipeline(seed=0)
    assert again.evaluate(pipe, run, 0, subject_phrase="a person") == first.scores[0] and not sampled
    result, resumed = train_and_log(TextualInversion(pipe, "<sks>"), dataset, cfg, run, again)
    assert (result.start_step, result.losses, sampled) == (2, [], [])
    assert again.scores == {s: json.loads(json.dumps(v)) for s, v in first.scores.items()}  # JSON round trip
    assert sorted(again.grid) == [0, 1, 2]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for s in again.grid for a, b in
               zip(again.grid[s], first.grid[s]))
    assert run.metrics["series"] == logged  # nothing logged twice, nothing lost
    assert resumed["resumed_from_step"] == 2 and result.earlier_s > 0
    assert resumed["train_s"] >= round(result.earlier_s, 1)  # costs are logged to 0.1 s
    assert "resumed_from_step" not in costs


def finished_run(out_dir, notebook, setup, *, seed, method=None):
    """A finished method run of ``notebook`` trained with ``seed`` and scored on ``setup``."""
    run = new_run(notebook, {"SEED": seed, "train": {"seed": seed}, "eval": setup.as_dict()}, out_dir=out_dir,
                  method=method)
    run.log_metrics(train_s=3.0)
    run.log_series("eval", 0, identity=0.3)
    run.finish()
    return run


def test_reference_run_must_exist_and_share_the_evaluation(tmp_run_dir, tiny_ref):
    setup = eval_setup(tiny_ref, "d", seed=0, quick=True)
    with pytest.raises(FileNotFoundError, match="No run of notebooks/02_textual_inversion.ipynb"):
        reference_run("02_textual_inversion", tmp_run_dir, setup, seed=0)
    same = finished_run(tmp_run_dir, "02_textual_inversion", setup, seed=0)
    assert reference_run("02_textual_inversion", tmp_run_dir, setup, seed=0).path == same.path
    other = eval_setup(tiny_ref, "d", seed=1, quick=True, n_samples=3)
    with pytest.raises(ValueError, match=r"\(seeds, seed differ\).*MODEL, SEED, QUICK and N_SAMPLES"):
        reference_run("02_textual_inversion", tmp_run_dir, other, seed=1)
    unfinished = new_run("02_textual_inversion", {"SEED": 1, "eval": other.as_dict()}, out_dir=tmp_run_dir)
    with pytest.raises(ValueError, match=f"{unfinished.path} did not finish"):
        reference_run("02_textual_inversion", tmp_run_dir, other, seed=1)


def test_reference_run_takes_the_latest_finished_run_of_its_own_grid_and_seed(tmp_run_dir, tiny_ref):
    """Parallel seed runs: P+ of seed 1 compares with TI of seed 1, not with a newer TI of seed 2."""
    grids = {seed: eval_setup(tiny_ref, "d", seed=seed, quick=True) for seed in (1, 2)}
    seed_1 = finished_run(tmp_run_dir, "02_textual_inversion", grids[1], seed=1)
    finished_run(tmp_run_dir, "02_textual_inversion", grids[2], seed=2)
    new_run("02_textual_inversion", {"SEED": 1, "eval": grids[1].as_dict()}, out_dir=tmp_run_dir)  # unfinished
    other_seed = finished_run(tmp_run_dir, "02_textual_inversion", grids[1], seed=3)  # same grid, other training
    assert reference_run("02_textual_inversion", tmp_run_dir, grids[1], seed=1).path == seed_1.path
    assert reference_run("02_textual_inversion", tmp_run_dir, grids[1], seed=3).path == other_seed.path
    with pytest.raises(ValueError, match=f"the newest, {other_seed.path}, .*\\(seeds, seed differ\\)"):
        reference_run("02_textual_inversion", tmp_run_dir, grids[2], seed=1)


def test_reference_run_of_one_method_and_optional_references(tmp_run_dir, tiny_ref):
    setup = eval_setup(tiny_ref, "d", seed=0, quick=True)
    lora = finished_run(tmp_run_dir, "04_lora_svdiff", setup, seed=0, method="lora")
    svdiff = finished_run(tmp_run_dir, "04_lora_svdiff", setup, seed=0, method="svdiff")
    assert reference_run("04_lora_svdiff", tmp_run_dir, setup, seed=0).path == svdiff.path  # the latest of any method
    assert reference_run("04_lora_svdiff", tmp_run_dir, setup, seed=0, method="lora").path == lora.path
    with pytest.raises(FileNotFoundError, match="with method 'pplus'"):
        reference_run("04_lora_svdiff", tmp_run_dir, setup, seed=0, method="pplus")

    new_run("04_lora_svdiff", {"SEED": 0, "eval": setup.as_dict()}, out_dir=tmp_run_dir, method="svdiff")
    finished_run(tmp_run_dir, "05_dreambooth", setup, seed=0, method="dreambooth").metrics_path.unlink()
    new_run("05_dreambooth", {"SEED": 0, "eval": setup.as_dict()}, out_dir=tmp_run_dir, method="dreambooth")
    finished_run(tmp_run_dir, "02_textual_inversion", eval_setup(tiny_ref, "d", seed=1, quick=True), seed=1,
                 method="textual_inversion")
    found, notes = reference_runs({"LoRA": ("04_lora_svdiff", "lora"), "SVDiff": ("04_lora_svdiff", "svdiff"),
                                   "DB": ("05_dreambooth", "dreambooth"), "TI": ("02_textual_inversion", None),
                                   "P+": ("03_pplus", None)}, tmp_run_dir, setup, seed=0)
    assert {name: run.path for name, run in found.items()} == {"LoRA": lora.path, "SVDiff": svdiff.path}
    assert [n.split(" left out: ")[0] for n in notes] == ["DB", "TI", "P+"]
    assert "did not finish" in notes[0] and "(seeds, seed differ)" in notes[1] and "No run of notebooks/03" in notes[2]


def test_first_step_reaching(tmp_run_dir):
    points = [(0, 0.2), (20, 0.5), (30, 0.45)]
    assert first_step_reaching(points, 0.45) == 20 and first_step_reaching(points, 0.9) is None


# ------------------------------------------------------------------------------------------------ checks and reports
def test_notebook_parameters_reads_the_tagged_cell_and_the_current_values():
    namespace = {"MODEL": "toy", "SEED": 3, "OUT_DIR": "elsewhere", "DRIVE": False, "RESUME": "never",
                 "QUICK": True, "DATASET": "auto", "PLACEHOLDER": "<sks>", "INIT_WORD": "person",
                 "NUM_VECTORS": 4, "STEPS": None, "LR": None, "BATCH": None, "CHECKPOINT_EVERY": None,
                 "N_SAMPLES": 2, "ref": "not a parameter"}
    params = study.notebook_parameters("02_textual_inversion", namespace, tier="toy")
    assert list(params) == ["MODEL", "SEED", "QUICK", "DATASET", "PLACEHOLDER", "INIT_WORD", "NUM_VECTORS",
                            "STEPS", "LR", "BATCH", "CHECKPOINT_EVERY", "N_SAMPLES", "tier"]
    assert params["SEED"] == 3 and params["NUM_VECTORS"] == 4 and params["tier"] == "toy"
    assert "OUT_DIR" in study.notebook_parameters("02_textual_inversion", namespace, leave_out=())
    with pytest.raises(KeyError, match="SEED"):
        study.notebook_parameters("02_textual_inversion", {k: v for k, v in namespace.items() if k != "SEED"})


def test_same_pixels_passes_for_a_reloaded_word_and_fails_for_another(tiny_ref, tmp_run_dir):
    setup = eval_setup(tiny_ref, "d", seed=0, quick=True, names=("studio",))
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    pipes = [build_tiny_pipeline(seed=0) for _ in range(2)]
    image, fig = study.same_pixels({"trained": pipes[0], "fresh": pipes[1]}, setup, "a person", 7, run)
    assert np.asarray(image).tolist() == np.asarray(Image.open(run.path / "images" / "fresh-pipeline.png")).tolist()
    assert [ax.get_title() for ax in fig.axes] == ["trained", "fresh"]
    assert "identical pixels" in fig._suptitle.get_text()
    embeds = {"fresh": lambda prompts: [e * 1.5 for e in pipes[1].encode_prompt(prompts, "cpu", 1, True)]}
    with pytest.raises(AssertionError, match="fresh drew another image than trained"):
        study.same_pixels({"trained": pipes[0], "fresh": pipes[1]}, setup, "a person", 7, run, embeds=embeds)


def test_cost_summary_and_final_scores(tmp_run_dir, capsys):
    costs = {"steps": 40, "train_s": 12.0, "eval_s": 3.4, "artifact_bytes": 4096}
    evaluator = SimpleNamespace(scores={20: {}, 0: {}, 40: {}})
    assert study.cost_summary(costs, evaluator, "ck/learned.safetensors") == (
        "40 steps in 12 s (0.30 s/step) + 3 s of evaluation at steps [20, 40]\n"
        "learned file: ck/learned.safetensors (4,096 bytes)")
    assert study.cost_summary({**costs, "train_s": 0.8, "steps": 5}) == "5 steps in 0.8 s (0.16 s/step)"
    run = new_run("02_x", {}, out_dir=tmp_run_dir)
    base = {"identity": 0.3, "clip_t": 0.6, "clip_i": 0.5, "detection_rate": 1.0, "fid": 9.0}
    final = {**base, "identity": 0.7}
    assert study.log_final_scores(run, base, final, "the word", seeds=4)
    assert capsys.readouterr().out == "identity 0.300 -> 0.700: the word beats the base model (4 seeds per prompt)\n"
    logged = run.metrics
    assert logged["final"] == {k: final[k] for k in ("identity", "clip_t", "clip_i", "detection_rate")}
    assert logged["beats_baseline"] and logged["identity_gain"] == pytest.approx(0.4)
    assert not study.log_final_scores(run, final, base, "the word", seeds=4) and not run.metrics["beats_baseline"]
