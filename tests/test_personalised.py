"""The personalised model of a run, loaded back by its method's loader on the tiny tier: the same pixels as the
trained pipeline for every method; choosing the run (best identity, by method, by folder) and the errors that
name the notebook to run; img2img's strength and seeds."""
from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionImg2ImgPipeline

from nbutils.combos import DreamBoothTI, PivotalTuning, save_pivotal
from nbutils.dreambooth import DreamBooth
from nbutils.lora import LoRA
from nbutils.models import load_pipeline, resolve_model
from nbutils.personalised import choose_run, final_identity, img2img, load_personalised
from nbutils.pplus import PPlus, pplus_prompt_embeds
from nbutils.runs import Run, new_run
from nbutils.sampling import generate
from nbutils.svdiff import SVDiff
from nbutils.text import with_placeholder
from nbutils.textual_inversion import TextualInversion
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, train

SAMPLER = dict(steps=2, guidance_scale=4.0, progress=False)
BUILD = {  # method -> (constructor on a fresh tiny pipeline, the subject phrase of its prompts)
    "textual_inversion": (lambda pipe: TextualInversion(pipe, "<sks>"), "<sks> person"),
    "pplus": (lambda pipe: PPlus(pipe, "<sks>"), "<sks> person"),
    "lora": (lambda pipe: LoRA(pipe, rank=2, seed=0), "sks person"),
    "svdiff": (lambda pipe: SVDiff(pipe), "sks person"),
    "dreambooth": (lambda pipe: DreamBooth(pipe, prior_loss_weight=0.0), "sks person"),
    "dreambooth_ti": (lambda pipe: DreamBoothTI(pipe, placeholder="<sks>", prior_loss_weight=0.0), "<sks> person"),
    "pivotal_tuning": (lambda pipe: PivotalTuning(pipe, placeholder="<sks>", rank=2, seed=0), "<sks> person"),
}


@pytest.fixture(scope="module")
def pairs():
    return [(render(p, 32), "a photo of sks person") for p in portraits(1, 2, identity=TOY_SUBJECT)]


def fake_run(out_dir, method: str, identity: float | None, *, quick: bool = True, finished: bool = True) -> Run:
    """A method run as notebooks 02-05 leave it: params with model_ref, QUICK and SEED, an eval series, costs."""
    run = new_run(f"nb-{method}", dict(QUICK=quick, SEED=0, model_ref="/models/tiny"), out_dir=out_dir,
                  method=method)
    run.log_series("eval", 0, subject_phrase="a person", identity=0.1)
    run.log_series("eval", 4, subject_phrase="sks person", identity=identity)
    if finished:
        run.log_metrics(train_s=1.0)
    return run


@pytest.mark.parametrize("method", list(BUILD))
def test_each_method_loads_back_and_draws_the_trained_pixels(tmp_run_dir, pairs, method):
    build, phrase = BUILD[method]
    trained = build(load_pipeline("tiny"))
    data = with_placeholder(pairs, "sks", "<sks>") if phrase.startswith("<sks>") else pairs
    run = new_run("t", dict(model_ref=resolve_model("tiny")), out_dir=tmp_run_dir, method=method)
    train(trained, data, TrainConfig(steps=2, batch_size=2, lr=5e-2, resolution=32), run)
    if method == "pivotal_tuning":
        save_pivotal(trained, run.artifact_path("pivotal"))
    run.log_series("eval", 2, subject_phrase=phrase, identity=0.5)

    pipe, subject_phrase, embed = load_personalised(run)
    prompt = f"a pop art poster of {subject_phrase}"
    assert subject_phrase == phrase and (embed is not None) == (method == "pplus")
    if embed is None:
        ours = generate(pipe, prompt, [3], **SAMPLER)[0]
        theirs = generate(trained.pipe, prompt, [3], **SAMPLER)[0]
    else:
        ours = generate(pipe, None, [3], **dict(zip(("prompt_embeds", "negative_prompt_embeds"), embed([prompt]))),
                        **SAMPLER)[0]
        trained_embeds = pplus_prompt_embeds(trained.pipe, trained.concept(), [prompt])
        theirs = generate(trained.pipe, None, [3], **dict(zip(("prompt_embeds", "negative_prompt_embeds"),
                                                              trained_embeds)), **SAMPLER)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    base = generate(load_pipeline("tiny"), prompt.replace(subject_phrase, "a person"), [3], **SAMPLER)[0]
    assert not np.array_equal(np.asarray(ours), np.asarray(base))
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_run_without_checkpoint_names_its_notebook(tmp_run_dir):
    run = fake_run(tmp_run_dir, "lora", 0.5)
    with pytest.raises(FileNotFoundError, match=r"holds no complete checkpoint: run notebooks/04"):
        load_personalised(run)
    with pytest.raises(ValueError, match="is a run of 'no method'"):
        load_personalised(new_run("x", {}, out_dir=tmp_run_dir))


def test_best_is_the_highest_final_identity_of_the_finished_runs(tmp_run_dir):
    fake_run(tmp_run_dir, "textual_inversion", 0.42)
    lora = fake_run(tmp_run_dir, "lora", 0.61)
    fake_run(tmp_run_dir, "dreambooth", 0.90, finished=False)  # still training: left out
    fake_run(tmp_run_dir, "svdiff", 0.95, quick=False)  # another QUICK: left out
    run, notes = choose_run(tmp_run_dir, "best", quick=True, seed=0)
    assert run.path == lora.path and final_identity(run) == 0.61
    assert any("Chose" in n and "textual_inversion 0.420, lora 0.610" in n for n in notes)
    assert choose_run(tmp_run_dir, "textual_inversion", quick=True, seed=0)[0].method == "textual_inversion"
    assert choose_run(tmp_run_dir, str(lora.path))[0].path == lora.path
    with pytest.raises(FileNotFoundError, match=r"no finished svdiff run .* run notebooks/04"):
        choose_run(tmp_run_dir, "svdiff", quick=True, seed=0)


def test_an_empty_store_names_the_method_notebooks(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No finished method run .*02_textual_inversion, 03_pplus, "
                                                r"04_lora_svdiff or 05_dreambooth"):
        choose_run(tmp_path / "nowhere", "best")


def test_img2img_strength_and_seeds(tiny_pipe):
    pipe = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    start = render(next(portraits(0, 1, identity=TOY_SUBJECT)), 32)
    kwargs = dict(steps=4, guidance_scale=4.0, prompt="a pop art poster of a person")
    first = img2img(pipe, start, [0, 1, 2], strength=0.5, batch_size=2, **kwargs)
    again = img2img(pipe, start, [2], strength=0.5, **kwargs)
    assert [im.size for im in first] == [(32, 32)] * 3
    assert np.array_equal(np.asarray(first[2]), np.asarray(again[0]))  # a seed's noise does not depend on the batch
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    other = img2img(pipe, start, [0], strength=1.0, **kwargs)[0]
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other))  # the strength is passed on
