"""The end-to-end portrait (notebook 09, ``make portrait``): the plumbing between the study's own pieces.

Photos -> notebook 01's helpers (``nbutils.photos``, ``nbutils.faces``, ``nbutils.augment``) -> a method's
artifact, reused from the results store when one matches (``nbutils.personalised``) or trained by name with the
notebooks' own constructors (``nbutils.recipes.train_recipe``) -> a scene prompt -> a stylisation route
(``ROUTES``) -> a handful of candidates scored for identity, scene and style -> the chosen portrait, saved with
its recipe in its PNG text chunks (``nbutils.runs.Run.save_image``).

- ``check_inputs``: every input checked before anything trains (photos, method, route, scene, style, style
  image); a bad one raises ``PortraitInputError`` saying what to do;
- ``parse_scene_style``: the scene and style as prompts with ``{S}`` where the subject goes (the subject's word
  added when the scene lacks it);
- ``scene_captions``: the drawn toy subjects' captions name their scene (notebook 00's capacity-check recipe);
- ``dataset_fingerprint``, ``find_trained`` (``not_reused``: why not), ``pareto_choice``, ``named_run``: which
  artifact to draw with;
- ``fast_recipe``: the documented default when the store holds none (DreamBooth without prior preservation);
  ``recipe_for``, ``training_code``, ``class_images_for``, ``save_loadable``: training any other method here;
- ``make_candidates``, ``score_candidates``, ``choose``, ``contact_sheet``: candidates to the chosen portrait.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure
from PIL import Image

from nbutils.compare import METHODS, comparison_rows, label, pareto_front, scatter_points, select_runs
from nbutils.faces import FaceReport, crop_subjects, demo_subject_photos
from nbutils.photos import (Photo, PhotoReport, is_drawn_subject, load_photos, photos_from_images, subject_folder,
                            toy_tier_note)
from nbutils.runs import Run, differing_keys, list_runs, repo_path, to_jsonable
from nbutils.toyworld import SCENE_PHRASES, SCENES, STYLE_PHRASES, STYLES
from nbutils.train import TrainConfig, list_checkpoints
from nbutils.viz import image_grid

ROUTES = ("prompt", "img2img", "nst")
"""Stylisation routes: the style asked for in the prompt; img2img (SDEdit) of a photo-style portrait under the
styled prompt; neural style transfer of a photo-style portrait towards a style image."""
DEFAULT_METHOD = "dreambooth_no_prior"
"""The method trained when the store holds no evaluated run of this subject: on the toy tier it is notebook 00's
capacity check (every UNet weight, no prior preservation, 400 steps of batch 4 at lr 1e-3: identity 0.88 there)."""
TRAIN_NOTEBOOK = "09_portrait_training"
"""The run folders the portrait trains into (``config["method"]`` stays empty, so notebook 08 does not compare
them with the method notebooks' runs; the method is ``params["METHOD"]``)."""
TRAINING_CODE: dict[str, tuple[str, ...]] = {
    "textual_inversion": ("textual_inversion",),
    "pplus": ("pplus", "textual_inversion"),
    "lora": ("lora", "svdiff", "textual_inversion"),
    "svdiff": ("lora", "svdiff", "textual_inversion"),
    **dict.fromkeys(("dreambooth", "dreambooth_no_prior", "dreambooth_ti", "pivotal_tuning"),
                    ("dreambooth", "class_images", "combos", "lora", "textual_inversion")),
}
"""``{method: nbutils modules}``: the code each method notebook fingerprints (its ``resume_or_new_run(code=...)``);
the portrait adds ``recipes``, which builds the method (``training_code``)."""


class PortraitInputError(ValueError):
    """An input the portrait cannot use; the message says what to do. Raised before any training."""


def stage(index: int, total: int, text: str) -> None:
    """One progress line, ``[portrait 2/7] text``: ``scripts/make_portrait.py`` shows exactly these lines."""
    print(f"[portrait {index}/{total}] {text}", flush=True)


# --------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class SceneStyle:
    """What to draw. ``template``: the prompt of the ``prompt`` route, ``{S}`` where the subject phrase goes;
    ``photo_template``: the same scene as a photo (the start image of img2img and NST); ``scene``/``style``: the
    toy world's values the attribute net checks (``None`` on the real tier, where CLIP scores ``scene_text`` and
    ``style_text``); ``notes``: what was changed in the input, one sentence each."""

    template: str
    photo_template: str
    scene: str | None
    style: str | None
    scene_text: str
    style_text: str
    notes: tuple[str, ...] = ()

    def prompt(self, subject_phrase: str, *, photo: bool = False) -> str:
        """The prompt with ``subject_phrase`` (``"sks person"``) in place of ``{S}``."""
        return (self.photo_template if photo else self.template).replace("{S}", subject_phrase)


def _find_value(text: str, values: dict[str, str]) -> str | None:
    """The key of ``values`` whose name or phrase occurs in ``text`` (word-bounded, case-insensitive)."""
    lowered = text.lower()
    for key, phrase in values.items():
        for word in (phrase, key):
            if re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", lowered):
                return key
    return None


def parse_scene_style(scene: str, style: str, *, tier: str, token: str = "sks") -> SceneStyle:
    """``SCENE`` and ``STYLE`` as prompts for ``tier``.

    Toy and tiny tiers: the scene must name one of the toy world's scenes (``"beach"``, ``"on the beach"`` or a
    whole prompt such as ``"a photo of sks person on the beach"``) and the style one of its styles
    (``"watercolor"``); the prompt is built in the toy captions' word order, ``"a watercolor painting of {S}, on
    the beach"``. Real tier: the scene is free text; without the subject's word ``token`` it becomes ``"a photo of
    {S}, <scene>"`` (a note says so), with it the first ``"<token> person"`` (or ``<token>``) becomes ``{S}``; the
    style is appended (``"..., in the style of <style>"``). ``PortraitInputError`` lists the choices otherwise.
    """
    scene, style = (scene or "").strip(), (style or "").strip()
    notes = []
    if not scene:
        raise PortraitInputError("SCENE is empty: say where the subject is, e.g. SCENE='on the beach'.")
    named = re.search(rf"(?<![\w<]){re.escape(token)}(?![\w>])", scene) is not None
    if not named:
        notes.append(f"SCENE {scene!r} does not name the subject's word {token!r}; the portrait adds it "
                     f"(write e.g. 'a photo of {token} person {scene}' to place it yourself).")
    if tier in ("toy", "tiny"):
        found = _find_value(scene, SCENE_PHRASES)
        if found is None:
            raise PortraitInputError(f"SCENE {scene!r} names none of the toy world's scenes; the toy model draws only "
                                     f"{', '.join(repr(p) for p in SCENE_PHRASES.values())} (or MODEL='sd15' on a "
                                     "GPU for any scene).")
        wanted = _find_value(style, STYLE_PHRASES) if style else "photo"
        if wanted is None:
            raise PortraitInputError(f"STYLE {style!r} is none of the toy world's styles: choose one of "
                                     f"{', '.join(repr(s) for s in STYLES)} (or MODEL='sd15' on a GPU for any style).")
        if named:
            notes.append(f"On the toy tier the prompt is rebuilt in its captions' word order from the scene found in "
                         f"SCENE ({found!r}).")
        template = f"{STYLE_PHRASES[wanted]} of {{S}}, {SCENE_PHRASES[found]}"
        photo = f"{STYLE_PHRASES['photo']} of {{S}}, {SCENE_PHRASES[found]}"
        return SceneStyle(template, photo, found, wanted, SCENE_PHRASES[found], STYLE_PHRASES[wanted], tuple(notes))
    if named:
        photo = re.sub(rf"(?<![\w<]){re.escape(token)}(?: person)?(?![\w>])", "{S}", scene, count=1)
    else:
        photo = f"a photo of {{S}}, {scene}"
    template = f"{photo}, in the style of {style}" if style else photo
    scene_text = photo.replace("{S}", "a person")
    return SceneStyle(template, photo, None, None, scene_text, style or "a photo", tuple(notes))


def check_method(method: str) -> str:
    """``METHOD`` checked: ``"auto"``, a method of notebooks 02-05 (``nbutils.compare.METHODS``) or a run folder;
    ``PortraitInputError`` listing the choices otherwise."""
    if method == "auto" or method in METHODS or (repo_path(method) / "config.json").is_file():
        return method
    raise PortraitInputError(f"METHOD={method!r} is unknown: use 'auto' (the best trade-off of the evaluation, else "
                             f"{DEFAULT_METHOD}), one of {', '.join(METHODS)}, or a method run's folder.")


def check_route(route: str, *, tier: str, style_image: str | None) -> str:
    """``ROUTE`` checked (``ROUTES``); NST on the real tier needs a ``STYLE_IMAGE``."""
    if route not in ROUTES:
        raise PortraitInputError(f"ROUTE={route!r} is unknown: use one of {', '.join(ROUTES)}.")
    if route == "nst" and tier == "real" and not style_image:
        raise PortraitInputError("ROUTE='nst' on SD1.5 needs a reference painting: set STYLE_IMAGE to an image file "
                                 "(jpg, png or webp), or use ROUTE='prompt' or 'img2img'.")
    return route


@dataclass
class Inputs:
    """The checked inputs: ``subject_dir`` (``None``: the real tier's built-in demo photo), the photo ``report``,
    the ``faces`` crops at the model's resolution, what to draw (``request``), the checked ``style_image`` and
    ``notes`` to print (the tier warning first)."""

    subject_dir: Path | None
    report: PhotoReport
    faces: FaceReport
    request: SceneStyle
    style_image: Image.Image | None
    notes: list[str] = field(default_factory=list)


def check_inputs(
    photos: str, scene: str, style: str, method: str, route: str, *, tier: str, resolution: int,
    style_image: str | None = None, token: str = "sks", allow_toy_photos: bool = False,
) -> Inputs:
    """Every input checked before anything trains, with notebook 01's own helpers for the photos (``load_photos``,
    ``crop_subjects``; faces are detected in photos, the drawn subjects centre-cropped).

    ``photos``: ``"auto"`` (``data/me`` when it holds photos, else the tier's demo subject) or a folder;
    ``resolution``: the model's image side in px. On the toy tier with real photos, ``allow_toy_photos=False``
    stops with ``toy_tier_note``'s message (the toy model cannot learn a real face); ``True`` goes on with it as the
    first note. Raises ``PortraitInputError`` with what to do for each bad input.
    """
    from nbutils.style_transfer import load_style_image  # lazy: only a style image needs it

    check_method(method)
    check_route(route, tier=tier, style_image=style_image)
    request = parse_scene_style(scene, style, tier=tier, token=token)
    checked_style = None
    if style_image:
        try:
            checked_style = load_style_image(repo_path(style_image))
        except (FileNotFoundError, ValueError) as err:
            raise PortraitInputError(f"STYLE_IMAGE: {err}") from None
    subject_dir = subject_folder(photos, tier)
    min_side = min(256, resolution)
    try:
        if subject_dir is None:
            report = photos_from_images(demo_subject_photos(), ["astronaut (scikit-image demo).png"],
                                        min_side=min_side)
        else:
            report = load_photos(subject_dir, min_side=min_side)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        raise PortraitInputError(f"PHOTOS={photos!r}: {err}") from None
    notes = []
    note = toy_tier_note(subject_dir, tier)
    if note:
        if not allow_toy_photos:
            raise PortraitInputError(f"{note} (To train on them anyway: ALLOW_TOY_PHOTOS=True, or make portrait "
                                     "ALLOW_TOY_PHOTOS=1.)")
        notes.append(note)
    try:
        faces = crop_subjects(report.kept, resolution, "face", detect=not is_drawn_subject(subject_dir))
    except ValueError as err:
        raise PortraitInputError(f"PHOTOS={photos!r}: {err}") from None
    return Inputs(subject_dir, report, faces, request, checked_style, notes + list(request.notes))


def scene_captions(photos: Sequence[Photo], subject_dir: Path | None, token: str) -> list[Photo]:
    """``photos`` with the caption ``"a photo of <token> person, <scene phrase>"`` where the folder's
    ``subject.json`` (the drawn toy subjects') says the photo's scene, so the word binds to the person and not to
    the backgrounds (notebook 00's capacity check); other photos keep their own caption or none (templates)."""
    meta = (subject_dir / "subject.json") if subject_dir is not None else None
    if meta is None or not meta.is_file():
        return list(photos)
    shots = json.loads(meta.read_text(encoding="utf-8"))["photos"]
    by_name = {f"{i + 1:02d}.png": shot["scene"] for i, shot in enumerate(shots)}
    return [replace(p, caption=f"a photo of {{token}} person, {SCENE_PHRASES[by_name[p.source.name]]}")
            if p.source.name in by_name and p.caption is None else p for p in photos]


# --------------------------------------------------------------------------------------------------- artifacts
def dataset_fingerprint(images: Sequence[Image.Image], captions: Sequence[str] = ()) -> str:
    """SHA-256 (16 hex digits) of the images' RGB pixels and sizes (and ``captions``): the same photos prepared
    the same way give the same fingerprint, whichever run folder holds them."""
    digest = hashlib.sha256()
    for image in images:
        rgb = image.convert("RGB")
        digest.update(f"{rgb.size}".encode() + rgb.tobytes())
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def fast_recipe(tier: str, quick: bool) -> TrainConfig:
    """``DEFAULT_METHOD``'s training recipe per tier. Toy: notebook 00's capacity check (400 steps of batch 4 at lr
    1e-3, 64 px; ``quick``: 40 steps). Tiny: 4 steps. Real: ``nbutils.dreambooth.default_config("real")`` (800
    steps of batch 1 at 5e-6, 512 px)."""
    from nbutils.dreambooth import default_config

    if tier == "toy":
        return TrainConfig(steps=40 if quick else 400, batch_size=4, lr=1e-3, resolution=64)
    if tier == "tiny":
        return TrainConfig(steps=4, batch_size=2, lr=1e-3, resolution=32)
    return replace(default_config("real", quick), checkpoint_every=0)


def recipe_for(method: str, tier: str, quick: bool) -> TrainConfig:
    """The recipe this notebook trains ``method`` with: ``fast_recipe`` for ``DEFAULT_METHOD``, else the tier's
    default of the method's module (``default_config(tier, quick)`` of ``textual_inversion``, ``pplus``, ``lora``,
    ``svdiff``, ``dreambooth`` for the three DreamBooth methods, ``lora`` for pivotal tuning) with one checkpoint,
    at the end (``checkpoint_every=0``): the portrait scores and draws only the trained model."""
    import importlib

    from nbutils.recipes import CONFIG_MODULE

    if method not in METHODS:
        raise PortraitInputError(f"METHOD={method!r} is unknown: use one of {', '.join(METHODS)}.")
    if method == DEFAULT_METHOD:
        return fast_recipe(tier, quick)
    module = importlib.import_module(f"nbutils.{CONFIG_MODULE[method]}")
    return replace(module.default_config(tier, quick), checkpoint_every=0)


def training_code(method: str) -> list[str]:
    """The ``nbutils`` modules whose source fingerprints (``nbutils.runs.code_version``) a portrait training of
    ``method``: the method notebook's own (``TRAINING_CODE``) plus ``recipes``; an edit of any of them trains
    again instead of reusing."""
    return [*TRAINING_CODE[method], "recipes"]


def class_images_for(method: str, model_ref: str, setup, *, quick: bool, seed: int, cache_dir=None):
    """DreamBooth's prior for ``method``: ``nbutils.class_images.ensure_class_images`` with the tier's
    ``class_image_count`` drawn by the base model on ``setup``'s sampler (notebook 05's call, so its cache is
    shared), for ``dreambooth`` and ``dreambooth_ti`` (their prior weight is 1); ``None`` for the other methods.
    ``model_ref``: a resolved reference (``nbutils.models.resolve_model``); ``cache_dir``: ``None`` is
    ``nbutils.class_images.CLASS_CACHE``."""
    if method not in ("dreambooth", "dreambooth_ti"):
        return None
    from nbutils.class_images import class_image_count, ensure_class_images
    from nbutils.models import load_pipeline, model_tier

    return ensure_class_images(load_pipeline(model_ref, dtype=torch.float32),
                               class_image_count(model_tier(model_ref), quick), steps=setup.steps,
                               guidance_scale=setup.guidance_scale, seed=seed, model=model_ref,
                               cache_dir=cache_dir)


def save_loadable(method: str, trained, run: Run) -> None:
    """What ``nbutils.personalised.load_personalised`` reads besides the last checkpoint: pivotal tuning's
    ``artifacts/pivotal`` folder (``nbutils.combos.save_pivotal``, as notebook 05 writes it); nothing for the
    other methods."""
    if method == "pivotal_tuning":
        from nbutils.combos import save_pivotal

        save_pivotal(trained, run.artifact_path("pivotal"))


def _references_fingerprint(run: Run) -> str | None:
    """The fingerprint of the unaugmented photos of the dataset ``run`` was evaluated on (``None``: unreadable)."""
    from nbutils.study import load_subject_dataset

    dataset = (run.config["params"].get("eval") or {}).get("dataset")
    try:
        return dataset_fingerprint(load_subject_dataset(dataset).references) if dataset else None
    except (FileNotFoundError, ValueError, KeyError):
        return None


def find_trained(out_dir: str | Path, params: dict) -> Run | None:
    """The newest finished run of ``TRAIN_NOTEBOOK`` under ``out_dir`` (study folders included) whose parameters
    hold every item of ``params`` (method, model, dataset fingerprint, recipe, code version) and that holds a
    checkpoint. Its other parameters (the evaluation grid, which names the folder it was evaluated on) may differ."""
    ours = to_jsonable(dict(params), "params")
    for run in reversed(list_runs(out_dir, notebook=TRAIN_NOTEBOOK)):
        theirs = {k: run.config["params"].get(k) for k in ours}
        if run.finished and not differing_keys(ours, theirs) and list_checkpoints(run):
            return run
    return None


def not_reused(out_dir: str | Path, params: dict) -> str | None:
    """Why ``find_trained`` found nothing although a finished training differs from ``params`` only in its
    ``code_version`` (an edit of one of the method's modules since, ``training_code``): a note naming it, else
    ``None``."""
    if "code_version" not in params or find_trained(out_dir, params) is not None:
        return None
    older = find_trained(out_dir, {k: v for k, v in params.items() if k != "code_version"})
    if older is None:
        return None
    return (f"not reusing {older.path}: same method, photos and recipe, but trained by another version of the "
            f"method's code ({older.config['params'].get('code_version')}, now {params['code_version']}); "
            "training again.")


def as_method_run(run: Run, method: str) -> Run:
    """``run`` as ``nbutils.personalised.load_personalised`` reads it: its config's method set to ``method`` (in
    memory; nothing is written)."""
    return Run(run.path, {**run.config, "method": method})


def pareto_choice(
    out_dir: str | Path, fingerprint: str, *, model: str, quick: bool, seed: int
) -> tuple[str | None, Run | None, list[str]]:
    """The best trade-off of the evaluation among the finished method runs of this subject (notebook 08's
    selection, ``select_runs``, restricted to runs whose photos have ``fingerprint``): of the Pareto front of
    identity against CLIP-T, the run with the highest identity + CLIP-T (both cosines). Returns ``(method, run,
    notes)``, ``(None, None, notes)`` when there is none."""
    selection = select_runs(out_dir, model=model, quick=quick, seed=seed, expected=(), methods=METHODS)
    notes = list(selection.notes)
    same = {m: r for m, r in selection.runs.items() if _references_fingerprint(r) == fingerprint}
    if len(same) < len(selection.runs):
        notes.append(f"Left out {len(selection.runs) - len(same)} method run(s) trained on other photos.")
    selection.runs = same
    selection.metrics = {m: v for m, v in selection.metrics.items() if m in same}
    points, more = scatter_points([r for r in comparison_rows(selection) if r["method"] != "base model"])
    notes += more
    if not points:
        return None, None, notes
    front = pareto_front(points)
    by_label = {label(m): m for m in same}
    best = max(front, key=lambda n: sum(points[n]))
    notes.append(f"Pareto front (identity against CLIP-T) of {len(points)} evaluated run(s): "
                 + ", ".join(f"{n} (identity {points[n][1]:.3f}, CLIP-T {points[n][0]:.3f})" for n in front)
                 + f"; the best trade-off (highest identity + CLIP-T) is {best}.")
    return by_label[best], same[by_label[best]], notes


def named_run(out_dir: str | Path, method: str, fingerprint: str, *, model: str, quick: bool,
              seed: int) -> Run | None:
    """The latest finished run of ``method`` (notebooks 02-05) with this model, ``QUICK`` and ``SEED`` whose photos
    have ``fingerprint``; ``None`` if there is none."""
    selection = select_runs(out_dir, model=model, quick=quick, seed=seed, expected=(), methods=METHODS)
    run = selection.runs.get(method)
    return run if run is not None and _references_fingerprint(run) == fingerprint else None


def choose_source(
    out_dir: str | Path, method: str, fingerprint: str, *, model: str, quick: bool, seed: int
) -> tuple[str, Run | None, list[str]]:
    """``(method, run to reuse or None, notes)`` for ``METHOD``: ``"auto"`` is ``pareto_choice``, else
    ``DEFAULT_METHOD`` to train (a note says so); a method name is ``named_run``, else ``None``: the notebook
    trains it (a note says with which recipe, and that an earlier portrait training of it is reused); a run folder
    is that run."""
    if method == "auto":
        chosen, run, notes = pareto_choice(out_dir, fingerprint, model=model, quick=quick, seed=seed)
        if run is None:
            notes.append(f"No evaluated method run of these photos in {out_dir}: the default, "
                         f"{label(DEFAULT_METHOD)}.")
            return DEFAULT_METHOD, None, notes
        return chosen, run, notes
    if method in METHODS:
        run = named_run(out_dir, method, fingerprint, model=model, quick=quick, seed=seed)
        if run is not None:
            return method, run, []
        recipe = ("notebook 00's capacity-check recipe" if method == DEFAULT_METHOD else
                  f"its tier's default recipe (notebook {METHODS[method][1]}'s starting point)")
        return method, None, [f"No finished {label(method)} run of these photos in {out_dir} (notebook "
                              f"{METHODS[method][1]}): it is trained here with {recipe}, unless an earlier "
                              "portrait trained it the same way."]
    from nbutils.runs import load_run

    run = load_run(method)
    return run.method or run.config["params"].get("METHOD", ""), run, [f"METHOD names the run {run.path}."]


# --------------------------------------------------------------------------------------------------- candidates
def toy_style_reference(style: str, seed: int = 1000) -> Image.Image:
    """A toy-world render in ``style`` (a stranger, in the studio, 64 px): NST's style image on the toy tier."""
    from nbutils.toyworld import portraits, render, with_fields

    return render(with_fields(next(portraits(seed, 1)), style=style, scene="studio"), 64)


def nst_inputs(route: str, inputs: Inputs, toy_evaluators=None, *, seed: int = 0):
    """``(style image, feature stack)`` for the NST route (``(None, None)`` for the others): the checked
    ``STYLE_IMAGE`` or, on the toy tier, ``toy_style_reference(STYLE)``; the toy attribute net's convolutions on
    the toy tier (``toy_evaluators`` given), else VGG-19 (ImageNet weights when ``VGG19_FILE`` is there, else
    seeded random weights, which also capture texture)."""
    if route != "nst":
        return None, None
    from nbutils.style_transfer import VGG19_FILE, toy_attribute_stack, vgg19_features, vgg19_stack

    style = inputs.style_image or toy_style_reference(inputs.request.style or "photo")
    if toy_evaluators is not None:
        return style, toy_attribute_stack(toy_evaluators.net)
    weights = VGG19_FILE if VGG19_FILE.is_file() else None
    return style, vgg19_stack(vgg19_features(weights, seed=seed), "VGG-19" + ("" if weights else " (random)"))


def make_candidates(
    pipe, subject_phrase: str, request: SceneStyle, route: str, seeds: Sequence[int], *, steps: int,
    guidance_scale: float, embed=None, strength: float = 0.6, style_image: Image.Image | None = None,
    nst_stack=None, nst_steps: int = 40, batch_size: int = 8,
) -> tuple[list[Image.Image], list[Image.Image], dict]:
    """One candidate per seed by ``route``; returns ``(candidates, start images, recipe)``.

    ``prompt``: ``request.prompt(subject_phrase)`` drawn by ``nbutils.sampling.generate``. ``img2img``: the
    photo-style prompt drawn first (the start images), then SDEdit at ``strength`` under the styled prompt with
    the same seed (``nbutils.personalised.img2img``). ``nst``: the photo-style images painted towards
    ``style_image`` with Adam for ``nst_steps`` steps on ``nst_stack`` (``nbutils.style_transfer.stylise_batch``).
    ``recipe``: the route's parameters, for the PNG text chunks. Images are at the pipeline's resolution.
    """
    from nbutils.personalised import img2img
    from nbutils.sampling import generate

    def draw(prompt: str) -> list[Image.Image]:
        kwargs = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, progress=False)
        if embed is None:
            return generate(pipe, prompt, list(seeds), **kwargs)
        positive, negative = embed([prompt])
        return generate(pipe, None, list(seeds), prompt_embeds=positive, negative_prompt_embeds=negative, **kwargs)

    recipe = {"route": route, "sampling_steps": steps, "guidance_scale": guidance_scale}
    if route == "prompt":
        recipe["prompt"] = request.prompt(subject_phrase)
        images = draw(recipe["prompt"])
        return images, images, recipe
    recipe["start_prompt"] = request.prompt(subject_phrase, photo=True)
    starts = draw(recipe["start_prompt"])
    if route == "img2img":
        from diffusers import StableDiffusionImg2ImgPipeline

        i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
        i2i.set_progress_bar_config(disable=True)
        recipe.update(prompt=request.prompt(subject_phrase), strength=strength)
        images = [img2img(i2i, start, [s], strength=strength, steps=steps, guidance_scale=guidance_scale,
                          prompt=recipe["prompt"], embed=embed)[0] for start, s in zip(starts, seeds)]
        return images, starts, recipe
    from nbutils.style_transfer import stylise_batch

    images, history = stylise_batch(starts, [style_image], nst_stack, steps=nst_steps, optimizer="adam",
                                    progress=False)
    recipe.update(nst_features=nst_stack.name, nst_steps=nst_steps, nst_optimizer="adam",
                  nst_final_loss=history["total"][-1])
    return images, starts, recipe


def score_candidates(
    images: Sequence[Image.Image], references: Sequence[Image.Image], request: SceneStyle, suite, *,
    toy_evaluators=None,
) -> list[dict]:
    """Per candidate: ``identity`` (``nbutils.metrics.identity_similarity`` against the subject's photos; 0 when
    no face is found), and the scene and style match. Toy tier (``toy_evaluators`` given): ``scene``/``style``, the
    attribute net's predicted values, and ``scene_ok``/``style_ok`` (equal to the request's). Real tier: CLIP
    cosines ``scene_cos``/``style_cos`` of the image with ``request.scene_text`` and ``request.style_text``."""
    from nbutils.metrics import identity_similarity

    rows = [{"identity": identity_similarity([im], references, suite.identity)["identity"]} for im in images]
    if toy_evaluators is not None:
        predicted = toy_evaluators.predict(list(images))
        for row, scene, style in zip(rows, predicted["scene"].tolist(), predicted["style"].tolist()):
            row.update(scene=SCENES[scene], style=STYLES[style], scene_ok=SCENES[scene] == request.scene,
                       style_ok=STYLES[style] == request.style)
    elif suite.clip is not None:
        feats = suite.clip.image_features(list(images))
        texts = suite.clip.text_features([request.scene_text, request.style_text])
        for row, (scene, style) in zip(rows, (feats @ texts.T).tolist()):
            row.update(scene_cos=scene, style_cos=style)
    return rows


def choose(scores: Sequence[dict]) -> int:
    """The index of the portrait: on the toy tier the candidate with the most of scene and style right, then the
    highest identity; on the real tier the highest identity + scene cosine + style cosine."""
    def key(i: int) -> tuple:
        row = scores[i]
        if "scene_ok" in row:
            return row["scene_ok"] + row["style_ok"], row["identity"]
        return (row["identity"] + row.get("scene_cos", 0.0) + row.get("style_cos", 0.0),)

    return max(range(len(scores)), key=key)


def score_label(row: dict) -> str:
    """A candidate's scores in one short line, for the contact sheet."""
    if "scene_ok" in row:
        return (f"id {row['identity']:.2f}\n{row['scene']} {'✓' if row['scene_ok'] else '✗'} "
                f"{row['style']} {'✓' if row['style_ok'] else '✗'}")
    return f"id {row['identity']:.2f}\nscene {row.get('scene_cos', float('nan')):.2f} " \
           f"style {row.get('style_cos', float('nan')):.2f}"


def contact_sheet(photos: Sequence[Image.Image], starts: Sequence[Image.Image], candidates: Sequence[Image.Image],
                  scores: Sequence[dict], chosen: int, seeds: Sequence[int], title: str) -> Figure:
    """Rows: the subject's photos; the start images (img2img, NST; omitted for the prompt route); the candidates,
    each labelled with its seed and scores; the chosen portrait, large."""
    rows, labels = [list(photos)], ["photos"]
    if starts is not candidates:
        rows.append(list(starts))
        labels.append("start images")
    rows.append(list(candidates))
    labels.append("candidates")
    rows.append([candidates[chosen]])
    labels.append(f"chosen\nseed {seeds[chosen]}")
    fig = image_grid(rows, row_labels=labels, title=title, cell=1.4)
    axes = fig.axes
    ncols = max(len(r) for r in rows)
    first = (len(rows) - 2) * ncols  # the candidates' row
    for k, (row, seed) in enumerate(zip(scores, seeds)):
        axes[first + k].set_title(f"seed {seed}\n{score_label(row)}", fontsize=7)
    return fig


def portrait_summary(row: dict, evaluation_identity: float | None, request: SceneStyle) -> dict[str, object]:
    """The done-when's three checks of the chosen portrait: its identity against the method's evaluation identity
    minus 0.05, and its scene and style as asked (toy attribute net; CLIP cosines on the real tier)."""
    floor = None if evaluation_identity is None else evaluation_identity - 0.05
    out: dict[str, object] = {"identity": row["identity"], "evaluation_identity": evaluation_identity,
                              "identity_floor": floor,
                              "identity_ok": None if floor is None else bool(row["identity"] >= floor)}
    if "scene_ok" in row:
        out.update(scene_asked=request.scene, scene_seen=row["scene"], scene_ok=row["scene_ok"],
                   style_asked=request.style, style_seen=row["style"], style_ok=row["style_ok"])
    else:
        out.update(scene_cos=row.get("scene_cos"), style_cos=row.get("style_cos"))
    return out


def result_line(summary: dict, seconds: float) -> str:
    """The one line ``make portrait`` ends with: identity (and its floor), scene and style seen, time in s."""
    floor = summary.get("identity_floor")
    line = f"[portrait] identity {summary['identity']:.3f}" + (f" (floor {floor:.3f})" if floor is not None else "")
    if "scene_seen" in summary:
        line += (f", scene {summary['scene_seen']} (asked {summary['scene_asked']}), style {summary['style_seen']} "
                 f"(asked {summary['style_asked']})")
    else:
        line += f", scene cosine {summary.get('scene_cos')}, style cosine {summary.get('style_cos')}"
    return line + f"; {seconds:.0f} s in all"

