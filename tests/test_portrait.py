"""nbutils.portrait and `make portrait` (notebook 09): inputs checked before training, prompts, artifact reuse,
candidate choice, and one end-to-end `make portrait` on the tiny tier in QUICK mode."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

import pytest
from PIL import Image
from skimage import data as skdata

from nbutils import portrait as pt
from nbutils.photos import TOY_SUBJECT_DIR, load_photos, toy_tier_note
from nbutils.runs import REPO_ROOT, list_runs, new_run, read_png_metadata


# --------------------------------------------------------------------------------------------------- prompts
def test_toy_scene_and_style_become_a_prompt_in_caption_order_and_the_missing_subject_is_added():
    request = pt.parse_scene_style("on the beach", "watercolor", tier="toy")
    assert request.template == "a watercolor painting of {S}, on the beach"
    assert request.prompt("sks person", photo=True) == "a photo of sks person, on the beach"
    assert (request.scene, request.style) == ("beach", "watercolor")
    assert any("does not name the subject's word 'sks'" in n for n in request.notes)
    named = pt.parse_scene_style("a photo of sks person at night", "pop art", tier="toy")
    assert named.template == "a pop art poster of {S}, at night"
    assert not any("does not name" in n for n in named.notes)


def test_real_tier_scene_is_free_text_with_the_subject_put_in():
    added = pt.parse_scene_style("on a sailing boat", "Van Gogh", tier="real")
    assert added.template == "a photo of {S}, on a sailing boat, in the style of Van Gogh"
    named = pt.parse_scene_style("sks person reading in a cafe", "", tier="real")
    assert named.photo_template == "{S} reading in a cafe" and named.scene_text == "a person reading in a cafe"


@pytest.mark.parametrize("scene, style, says", [
    ("on the moon", "watercolor", "names none of the toy world's scenes"),
    ("in a forest", "oil painting", "is none of the toy world's styles"),
    ("", "watercolor", "SCENE is empty"),
])
def test_a_scene_or_style_the_toy_model_cannot_draw_is_refused_with_the_choices(scene, style, says):
    with pytest.raises(pt.PortraitInputError, match=says):
        pt.parse_scene_style(scene, style, tier="toy")


def test_unknown_method_or_route_and_nst_without_a_painting_on_sd15_are_refused():
    with pytest.raises(pt.PortraitInputError, match="METHOD='nope' is unknown"):
        pt.check_method("nope")
    assert pt.check_method("auto") == "auto" and pt.check_method("lora") == "lora"
    with pytest.raises(pt.PortraitInputError, match="ROUTE='oil' is unknown"):
        pt.check_route("oil", tier="toy", style_image=None)
    with pytest.raises(pt.PortraitInputError, match="needs a reference painting"):
        pt.check_route("nst", tier="real", style_image=None)
    assert pt.check_route("nst", tier="toy", style_image=None) == "nst"


# --------------------------------------------------------------------------------------------------- inputs
def test_inputs_are_checked_with_notebook_01s_helpers(tmp_path):
    inputs = pt.check_inputs("auto", "in a forest", "sketch", "auto", "prompt", tier="toy", resolution=64)
    assert inputs.subject_dir == TOY_SUBJECT_DIR and len(inputs.faces.kept) == 5
    assert all(p.image.size == (64, 64) for p in inputs.faces.kept)
    tiny_style = tmp_path / "style.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tiny_style)
    with pytest.raises(pt.PortraitInputError, match="STYLE_IMAGE: style image style.png"):
        pt.check_inputs("auto", "in a forest", "sketch", "auto", "nst", tier="toy", resolution=64,
                        style_image=str(tiny_style))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pt.PortraitInputError, match="(?s)has no photos.*What to do"):
        pt.check_inputs(str(tmp_path / "empty"), "in a forest", "sketch", "auto", "prompt", tier="toy", resolution=64)


def test_real_photos_on_the_toy_tier_stop_with_the_two_ways_on_unless_allowed(tmp_path):
    me = tmp_path / "me"
    me.mkdir()
    Image.fromarray(skdata.astronaut()).save(me / "me.png")
    assert toy_tier_note(TOY_SUBJECT_DIR, "toy") is None and toy_tier_note(me, "real") is None
    note = toy_tier_note(me, "toy")
    assert "cannot learn a real face" in note and "data/subjects/toy" in note and "MODEL='sd15'" in note
    with pytest.raises(pt.PortraitInputError, match="cannot learn a real face"):
        pt.check_inputs(str(me), "in a forest", "sketch", "auto", "prompt", tier="toy", resolution=64)
    allowed = pt.check_inputs(str(me), "in a forest", "sketch", "auto", "prompt", tier="toy", resolution=64,
                              allow_toy_photos=True)
    assert allowed.notes[0] == note and len(allowed.faces.kept) == 1  # dlib found the astronaut's face


def test_drawn_subject_captions_name_each_photos_scene():
    photos = load_photos(TOY_SUBJECT_DIR, min_side=64).kept
    scenes = [s["scene"] for s in json.loads((TOY_SUBJECT_DIR / "subject.json").read_text())["photos"]]
    captions = [p.caption for p in pt.scene_captions(photos, TOY_SUBJECT_DIR, "sks")]
    assert captions[1] == "a photo of {token} person, on the beach" and scenes[1] == "beach"
    assert pt.scene_captions(photos, None, "sks") == photos


# --------------------------------------------------------------------------------------------------- artifacts
def test_fingerprint_follows_pixels_and_captions():
    a, b = Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (8, 8), (1, 2, 3))
    assert pt.dataset_fingerprint([a]) == pt.dataset_fingerprint([b])
    b.putpixel((0, 0), (1, 2, 4))
    assert pt.dataset_fingerprint([a]) != pt.dataset_fingerprint([b])
    assert pt.dataset_fingerprint([a], ["x"]) != pt.dataset_fingerprint([a], ["y"])


def test_find_trained_reuses_only_a_finished_run_with_the_same_recipe_and_a_checkpoint(tmp_run_dir):
    params = {"METHOD": "dreambooth_no_prior", "dataset": "abc", "cfg": {"steps": 4}}
    run = new_run(pt.TRAIN_NOTEBOOK, {**params, "eval": {"dataset": "/elsewhere"}}, out_dir=tmp_run_dir)
    assert pt.find_trained(tmp_run_dir, params) is None  # not finished
    run.finish()
    assert pt.find_trained(tmp_run_dir, params) is None  # no checkpoint
    (run.path / "artifacts" / "checkpoints" / "step-4").mkdir(parents=True)
    (run.path / "artifacts" / "checkpoints" / "step-4" / "state.json").write_text("{}")
    assert pt.find_trained(tmp_run_dir, params).path == run.path
    assert pt.find_trained(tmp_run_dir, {**params, "cfg": {"steps": 5}}) is None
    assert pt.as_method_run(run, "dreambooth_no_prior").method == "dreambooth_no_prior" and run.method == ""
    assert pt.not_reused(tmp_run_dir, params) is None  # reused: nothing to explain
    older = new_run(pt.TRAIN_NOTEBOOK, {**params, "code_version": "old"}, out_dir=tmp_run_dir)
    (older.path / "artifacts" / "checkpoints" / "step-4").mkdir(parents=True)
    (older.path / "artifacts" / "checkpoints" / "step-4" / "state.json").write_text("{}")
    older.finish()
    assert pt.not_reused(tmp_run_dir, {**params, "code_version": "old"}) is None
    edited = {**params, "code_version": "new"}
    assert pt.find_trained(tmp_run_dir, edited) is None  # an edit of the method's code trains again ...
    assert f"not reusing {older.path}" in pt.not_reused(tmp_run_dir, edited)  # ... and says why
    assert "another version of the method's code (old, now new)" in pt.not_reused(tmp_run_dir, edited)


def test_each_method_trains_with_its_modules_default_recipe_and_the_default_with_the_fast_one():
    from nbutils import dreambooth, lora, textual_inversion
    from nbutils.compare import METHODS

    assert pt.recipe_for("dreambooth_no_prior", "toy", False) == pt.fast_recipe("toy", False)
    assert pt.fast_recipe("toy", False).steps == 400
    lora_toy = pt.recipe_for("lora", "toy", False)
    assert (lora_toy.steps, lora_toy.batch_size, lora_toy.lr) == (300, 8, 1e-3) and lora_toy.checkpoint_every == 0
    assert pt.recipe_for("pivotal_tuning", "toy", False) == lora_toy
    assert pt.recipe_for("dreambooth_ti", "tiny", True) == replace(dreambooth.default_config("tiny", True),
                                                                   checkpoint_every=0)
    assert pt.recipe_for("textual_inversion", "real", False).steps == textual_inversion.default_config("real").steps
    assert lora.default_config("toy").checkpoint_every == 100  # the notebooks' checkpoints; the portrait's: 1
    for name in METHODS:
        assert pt.recipe_for(name, "tiny", True).steps >= 2 and "recipes" in pt.training_code(name)
    assert pt.training_code("lora") == ["lora", "svdiff", "textual_inversion", "recipes"]
    with pytest.raises(pt.PortraitInputError, match="unknown"):
        pt.recipe_for("nope", "toy", False)


def test_a_named_method_without_a_run_is_trained_here_and_only_dreambooth_with_a_prior_gets_class_images(
        tmp_run_dir, tmp_path):
    from nbutils.models import resolve_model
    from nbutils.study import eval_setup

    method, run, notes = pt.choose_source(tmp_run_dir, "svdiff", "abc", model="tiny", quick=True, seed=0)
    assert (method, run) == ("svdiff", None) and "trained here with its tier's default recipe" in notes[0]
    ref = resolve_model("tiny")
    setup = eval_setup(ref, tmp_path, seed=0, quick=True)
    assert pt.class_images_for("lora", ref, setup, quick=True, seed=0, cache_dir=tmp_path) is None
    prior = pt.class_images_for("dreambooth", ref, setup, quick=True, seed=0, cache_dir=tmp_path / "cls")
    assert len(prior.images) == 2 and prior.images[0].size == (32, 32)  # class_image_count("tiny", quick=True)


def test_pareto_choice_on_an_empty_store_says_so(tmp_run_dir):
    method, run, notes = pt.pareto_choice(tmp_run_dir, "abc", model="tiny", quick=True, seed=0)
    assert method is None and run is None and any("No method run" in n for n in notes)


def test_choose_prefers_scene_and_style_right_then_identity():
    rows = [{"identity": 0.99, "scene_ok": False, "style_ok": True},
            {"identity": 0.80, "scene_ok": True, "style_ok": True},
            {"identity": 0.85, "scene_ok": True, "style_ok": True}]
    assert pt.choose(rows) == 2
    assert pt.choose([{"identity": 0.5, "scene_cos": 0.3, "style_cos": 0.2},
                      {"identity": 0.4, "scene_cos": 0.3, "style_cos": 0.2}]) == 0


# --------------------------------------------------------------------------------------------------- make portrait
def _make_portrait(out, *args):
    env = {**os.environ, "PORTRAIT_STUDIO_QUICK": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(["make", "portrait", "QUICK=1", "MODEL=tiny", f"OUT={out}", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_make_portrait_end_to_end_in_quick_mode_and_bad_input_stops_before_training(tmp_path):
    out = tmp_path / "runs"
    made = _make_portrait(out, "SCENE=at night", "STYLE=pop art")
    assert made.returncode == 0, made.stdout + made.stderr
    for k in range(1, 8):
        assert f"[portrait {k}/7]" in made.stdout
    assert "training DreamBooth without prior preservation: 4 steps" in made.stdout
    run = list_runs(out, notebook="09_portrait")[-1]
    assert {"09_portrait.ipynb", "contact_sheet.png", "images", "metrics.json"} <= {p.name for p in run.path.iterdir()}
    meta = read_png_metadata(run.path / "images" / "portrait.png")
    assert meta["method"] == "dreambooth_no_prior" and meta["prompt"] == "a pop art poster of sks person, at night"
    assert meta["seed"] in meta["candidate_seeds"] and meta["recipe"]["route"] == "prompt"
    assert meta["train"]["cfg"]["steps"] == 4 and meta["model_ref"].endswith("tiny-sd")
    summary = run.metrics["portrait"]
    assert {"identity", "evaluation_identity", "scene_seen", "style_seen"} <= set(summary)
    trained = list_runs(out, notebook=pt.TRAIN_NOTEBOOK)
    assert len(trained) == 1 and trained[0].finished

    bad = _make_portrait(out, "METHOD=nope")
    assert bad.returncode == 2 and "stopped before any training: METHOD='nope' is unknown" in bad.stdout
    assert len(list_runs(out, notebook=pt.TRAIN_NOTEBOOK)) == 1


@pytest.mark.parametrize("method, phrase", [("lora", "sks person"), ("textual_inversion", "<sks> person")])
def test_a_named_method_with_an_empty_store_trains_here_and_the_second_portrait_reuses_it(method, phrase,
                                                                                          tmp_path):
    from nbutils.compare import label
    from nbutils.personalised import load_personalised

    out = tmp_path / "runs"
    first = _make_portrait(out, f"METHOD={method}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"training {label(method)}: 2 steps of batch 2" in first.stdout  # its module's tiny QUICK recipe
    trained = list_runs(out, notebook=pt.TRAIN_NOTEBOOK)
    assert len(trained) == 1 and trained[0].finished and trained[0].config["params"]["METHOD"] == method
    loaded = load_personalised(pt.as_method_run(trained[0], method))  # dispatched on the method
    assert loaded.subject_phrase == phrase
    assert ("<sks>" in loaded.pipe.tokenizer.get_vocab()) == (method == "textual_inversion")
    portrait = list_runs(out, notebook="09_portrait")[-1]
    meta = read_png_metadata(portrait.path / "images" / "portrait.png")
    assert meta["method"] == method and meta["prompt"] == f"a watercolor painting of {phrase}, in a forest"
    assert meta["source_run"] == str(trained[0].path) and meta["train"]["cfg"]["steps"] == 2

    again = _make_portrait(out, f"METHOD={method}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"reusing the trained {label(method)} in {trained[0].path}" in again.stdout
    assert "] training" not in again.stdout
    assert len(list_runs(out, notebook=pt.TRAIN_NOTEBOOK)) == 1
    second = list_runs(out, notebook="09_portrait")[-1]
    assert second.path != portrait.path and second.metrics["source_run"] == str(trained[0].path)


@pytest.fixture(scope="module")
def tiny_subject(tmp_path_factory):
    from nbutils.study import SubjectData
    from nbutils.toyworld import TOY_SUBJECT, portraits, render

    pairs = [(render(p, 32), f"a photo of sks person, view {i}")
             for i, p in enumerate(portraits(0, 3, identity=TOY_SUBJECT))]
    return SubjectData(tmp_path_factory.mktemp("data"), pairs, [image for image, _ in pairs], "sks")


@pytest.mark.parametrize("method", ["textual_inversion", "pplus", "lora", "svdiff", "dreambooth",
                                    "dreambooth_no_prior", "dreambooth_ti", "pivotal_tuning"])
def test_every_method_trained_as_the_notebook_does_is_found_again_and_loads_back(method, tiny_subject, tmp_path):
    from nbutils.compare import METHODS
    from nbutils.metrics import suite_for_tier
    from nbutils.models import resolve_model
    from nbutils.personalised import load_personalised
    from nbutils.recipes import train_recipe
    from nbutils.runs import code_version
    from nbutils.study import eval_setup

    assert set(METHODS) == set(pt.TRAINING_CODE)
    ref = resolve_model("tiny")
    cfg = pt.recipe_for(method, "tiny", True)
    params = dict(METHOD=method, model_ref=ref, dataset="abc", cfg=vars(cfg),
                  code_version=code_version(pt.training_code(method)))
    setup = eval_setup(ref, tiny_subject.path, seed=0, quick=True, n_samples=1)
    class_images = pt.class_images_for(method, ref, setup, quick=True, seed=0, cache_dir=tmp_path / "cls")
    assert (class_images is not None) == (method in ("dreambooth", "dreambooth_ti"))
    run = new_run(pt.TRAIN_NOTEBOOK, {**params, "eval": setup.as_dict()}, out_dir=tmp_path / "runs")
    trained, evaluator, _ = train_recipe(method, ref, tiny_subject, setup, suite_for_tier("tiny"), cfg, run,
                                         class_images=class_images)
    pt.save_loadable(method, trained, run)
    run.finish()
    assert sorted(evaluator.scores) == [0, cfg.steps]  # the base model, then the one checkpoint at the end
    assert pt.find_trained(tmp_path / "runs", params).path == run.path
    loaded = load_personalised(pt.as_method_run(run, method))
    uses_token = method in ("textual_inversion", "pplus", "dreambooth_ti", "pivotal_tuning")
    assert loaded.subject_phrase == ("<sks> person" if uses_token else "sks person")
    assert ("<sks>" in loaded.pipe.tokenizer.get_vocab()) == uses_token
    assert (loaded.embed is not None) == (method == "pplus")
