"""What every method notebook repeats, written once: its data, its evaluation grid, its costs and its comparisons.

A method notebook (02 textual inversion, 03 P+, ...) keeps its own key idea in view (what trains, how the concept
reaches the UNet) and calls this module for the rest:

- ``load_subject_dataset``: notebook 01's prepared dataset (the latest ``01_dataset`` run in ``OUT_DIR``): the
  training pairs and the subject's unaugmented photos, the references of every identity score, and, for a drawn
  toy subject, its true identity (the toy tier's success rate and FID references);
- ``eval_setup`` + ``CheckpointEvaluator``: one fixed grid of prompts x seeds, sampled and scored with
  ``nbutils.metrics.evaluate_images`` before training (the base model) and at every checkpoint, each point logged
  as ``run.log_series("eval", step, ...)``; the same grid in every method notebook, so their curves compare;
- ``resume_or_new_run``: the run folder a notebook writes into: its interrupted run with the same parameters and
  code, continued (``RESUME="auto"``), or a new one;
- ``log_resources``: training time (evaluation excluded), peak memory and artifact size into the run;
  ``train_and_log``: one training with its evaluator, its costs logged;
- ``same_pixels``, ``cost_summary``, ``log_final_scores``: the checks and reports every method notebook ends
  with (the saved file draws the trained pipeline's pixels in a fresh one; what training cost; the final scores
  against the base model), written out by hand in notebook 02 and called from here by the others;
- ``notebook_parameters``: a notebook's parameters, read from its tagged ``parameters`` cell, for its run's config;
- ``reference_run``, ``reference_runs``, ``first_step_reaching``: finding and comparing another notebook's results
  (their curves and tables are ``nbutils.viz``'s).
"""
from __future__ import annotations

import ast
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from matplotlib.figure import Figure
from PIL import Image

from nbutils.augment import load_prepared_dataset
from nbutils.metrics import EvalSuite, evaluate_images
from nbutils.models import model_tier, tier_defaults
from nbutils.photos import is_drawn_subject, subject_folder
from nbutils.prompts import PROMPT_SETS
from nbutils.resources import Usage, dir_size_bytes, track
from nbutils.runs import (REPO_ROOT, Run, code_version, find_resumable_run, latest_run, list_runs, load_run,
                          new_run, read_png_metadata, repo_path)
from nbutils.sampling import generate
from nbutils.toyworld import SUBJECTS, Identity
from nbutils.train import Method, TrainConfig, TrainResult, list_checkpoints, resume_problem, train
from nbutils.viz import SCORE_KEYS, image_grid

RUN_01_FIRST = "run notebooks/01_dataset.ipynb first (or make study)"
EVAL_PROMPTS = ("studio", "beach", "pop_art")
"""The ``PROMPT_SETS`` names every checkpoint is scored on: the plain portrait, a new scene, a new style."""

Embed = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
"""prompts -> ``(prompt_embeds, negative_prompt_embeds)``, each (B, S, D): conditioning a method builds itself."""


# --------------------------------------------------------------------------------------------------- data
@dataclass
class SubjectData:
    """Notebook 01's prepared dataset.

    ``pairs``: every (RGB image, caption) training pair, the captions naming the subject as ``token`` (``"sks"``);
    ``references``: the images written without augmentation (notebook 01: one per kept photo), what identity and
    CLIP-I compare with; ``path``: the dataset folder; ``seed``: the augmentation seed of the notebook 01 run that
    wrote it (``None`` for a folder outside a run); ``identity``: the subject's true toy-world identity when the
    photos are a drawn toy subject (``subject_identity``), ``None`` otherwise (real photos, the real tier, a folder
    outside a run).
    """

    path: Path
    pairs: list[tuple[Image.Image, str]]
    references: list[Image.Image]
    token: str
    seed: int | None = None
    identity: Identity | None = None


def subject_identity(params: dict) -> Identity | None:
    """The true toy-world identity of the subject a notebook 01 run prepared, from its ``params``.

    The subject folder is the run's resolved ``subject`` (an absolute path), else its ``SUBJECT_DIR`` resolved
    again (``nbutils.photos.subject_folder``); the identity is that folder's ``subject.json`` ``"identity"`` (the
    drawn subjects', ``data/subjects/toy`` and ``toy-val``), else ``toyworld.SUBJECTS`` by folder name. ``None``
    when it cannot be known: a run of the real tier, real photos, no such folder.
    """
    tier = params.get("tier")
    if tier == "real":
        return None
    candidates = [params.get("subject")]
    if params.get("SUBJECT_DIR") and tier in ("toy", "tiny", None):
        candidates.append(subject_folder(params["SUBJECT_DIR"], tier or "toy"))
    for folder in (Path(c) for c in candidates if c and c != "demo"):
        meta = folder / "subject.json"
        traits = json.loads(meta.read_text(encoding="utf-8")).get("identity") if meta.is_file() else None
        if traits:
            return Identity(**traits)
        if is_drawn_subject(folder) and folder.name in SUBJECTS:
            return SUBJECTS[folder.name]
    return None


def load_subject_dataset(
    dataset: str | Path = "auto", out_dir: str | Path = "runs", *, resolution: int | None = None,
    token: str | None = None,
) -> SubjectData:
    """The prepared dataset ``dataset`` (a folder), or with ``"auto"`` that of the latest ``01_dataset`` run in
    ``out_dir``.

    ``token``: the word the captions use for the subject; ``None`` reads it from the notebook 01 run the dataset
    belongs to (its ``TOKEN`` parameter), else ``"sks"``. The subject's true identity comes from the same run
    (``subject_identity``). ``resolution`` (pixels): raise ``ValueError`` if the
    images are smaller than the training resolution (notebook 01 ran for another model tier).
    """
    if str(dataset) == "auto":
        run = latest_run("01_dataset", out_dir)
        if run is None:
            raise FileNotFoundError(f"No prepared dataset in {repo_path(out_dir)}: {RUN_01_FIRST}, with the same "
                                    "OUT_DIR.")
        path = run.path / "artifacts" / "dataset"
    else:
        path = repo_path(dataset)
    pairs = load_prepared_dataset(path)  # raises with the fix when the folder is no prepared dataset
    rows = [json.loads(line) for line in (path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    references = [image for (image, _), row in zip(pairs, rows) if not row.get("augmentation")]
    run_dir = path.parent.parent
    params = load_run(run_dir).config["params"] if (run_dir / "config.json").is_file() else {}
    side = min(min(image.size) for image, _ in pairs)
    if resolution is not None and side < resolution:
        raise ValueError(f"The prepared images in {path} are {side} px but this model trains at {resolution} px: "
                         f"{RUN_01_FIRST} with the same MODEL.")
    return SubjectData(path, pairs, references, token or params.get("TOKEN", "sks"), params.get("SEED"),
                       subject_identity(params))


def with_overrides(cfg: TrainConfig, **values) -> TrainConfig:
    """``cfg`` with every value that is not ``None`` replaced (a notebook's ``STEPS=None`` keeps the default)."""
    return replace(cfg, **{k: v for k, v in values.items() if v is not None})


RUN_ONLY = ("OUT_DIR", "DRIVE", "RESUME")
"""Parameters that say where and how a notebook runs, not what it computes: left out of a run's config, so that a
run resumes and compares whatever folder it is read from."""


def notebook_parameters(notebook: str, namespace: Mapping[str, Any], *, leave_out: Collection[str] = RUN_ONLY,
                        **extra) -> dict:
    """A run's config in one call: the values in ``namespace`` (the notebook's ``globals()``) of every name that
    the tagged ``parameters`` cell of ``notebooks/<notebook>.ipynb`` assigns, in the cell's order, as they are
    now (after papermill's injected values and the setup cell's resolving, e.g. ``QUICK = resolve_quick(QUICK)``),
    without ``leave_out``, then ``extra`` (values the setup computed: ``model_ref``, ``train``, ``eval``, ...).
    ``ValueError`` if the notebook has no tagged ``parameters`` cell."""
    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{path} has no cell tagged 'parameters' (papermill's parameters cell).")
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    targets = [t for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    names = dict.fromkeys(t.id for t in targets if isinstance(t, ast.Name) and t.id not in leave_out)
    return {**{name: namespace[name] for name in names}, **extra}


def resume_or_new_run(
    notebook: str, params: dict, *, out_dir: str | Path, method: str, code: Sequence[str],
    resume: str | Path = "auto",
) -> Run:
    """The run folder a method notebook trains into, the decision printed in one line.

    ``resume`` (the notebook's ``RESUME``): ``"auto"`` continues the newest run of ``notebook``/``method`` in
    ``out_dir`` if it has the same ``params``, was trained by the same code (``code``: the method's ``nbutils``
    modules, fingerprinted by ``nbutils.runs.code_version``), did not finish and its newest checkpoint is complete
    (``nbutils.train.resume_problem``); else, saying why, a new run. ``"never"``: a new run. A run folder: that
    run (``ValueError`` if it cannot be resumed). Nothing is deleted: a run that is not resumed stays as it was.
    """
    version = code_version(code)
    found = find_resumable_run(out_dir, notebook, params, code_version=version, method=method, resume=resume)
    reason, run = found.reason, found.run
    if run is not None:
        problem = resume_problem(run)
        if problem:
            if str(resume) not in ("auto", "never"):
                raise ValueError(f"RESUME={str(resume)!r} cannot be resumed: {problem}.")
            reason, run = f"not resuming {run.path}: {problem}; starting a new run (nothing deleted)", None
        else:
            done = list_checkpoints(run)
            reason += f", from its checkpoint of step {done[-1].name.removeprefix('step-')}" if done else \
                ", which had not saved a checkpoint yet: training starts at step 1 in it"
    if run is None:
        run = new_run(notebook, params, out_dir=out_dir, method=method, code_version=version)
    print(f"{method}: {reason}")
    return run


# --------------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalSetup:
    """What every checkpoint of every method is scored on.

    ``names``/``templates``: the prompts (``PROMPT_SETS`` names, templates with ``{S}``); ``seeds``: one image per
    seed for every prompt; ``steps``/``guidance_scale``/``batch_size``: the sampler; ``model``: the resolved model
    reference; ``dataset``: the prepared dataset folder whose photos are the references.
    """

    names: tuple[str, ...]
    templates: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    batch_size: int
    model: str
    dataset: str

    def prompts(self, subject_phrase: str) -> list[str]:
        """The prompts with ``subject_phrase`` (``"<sks> person"``, ``"a person"``) in place of ``{S}``."""
        return [t.replace("{S}", subject_phrase) for t in self.templates]

    def as_dict(self) -> dict:
        """JSON-ready, for a run's config (``reference_run`` compares it)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def eval_setup(
    model_ref: str, dataset: str | Path, *, seed: int, quick: bool, n_samples: int | None = None,
    steps: int | None = None, guidance_scale: float | None = None, names: Sequence[str] = EVAL_PROMPTS,
) -> EvalSetup:
    """The evaluation grid for ``model_ref``'s tier: prompts ``names``, seeds ``seed * 100_000 + k`` for
    ``k < n_samples``; ``None`` takes the tier's default (``nbutils.models.tier_defaults``)."""
    tier = model_tier(model_ref)
    defaults = tier_defaults(tier, quick)
    table = {p.name: p.template for p in PROMPT_SETS[tier if tier == "real" else "toy"]}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"Unknown evaluation prompts {unknown}; choose from {sorted(table)} (nbutils.prompts).")
    n = n_samples or defaults.num_samples
    return EvalSetup(tuple(names), tuple(table[name] for name in names), tuple(seed * 100_000 + k for k in range(n)),
                     steps or defaults.inference_steps, guidance_scale or defaults.guidance_scale,
                     defaults.batch_size, str(model_ref), str(dataset))


def sample_prompts(
    pipe: StableDiffusionPipeline, setup: EvalSetup, subject_phrase: str, *, embed: Embed | None = None,
    **pipe_kwargs,
) -> dict[str, list[Image.Image]]:
    """``{prompt: one image per seed}`` for ``setup.prompts(subject_phrase)``; ``embed`` turns a prompt into its
    conditioning (e.g. P+'s per-layer embeddings), ``None`` passes the prompt to the pipeline as it is.
    ``pipe_kwargs`` go to every pipeline call (e.g. IP-Adapter's ``ip_adapter_image_embeds``)."""
    out = {}
    for prompt in setup.prompts(subject_phrase):
        kwargs = dict(steps=setup.steps, guidance_scale=setup.guidance_scale, batch_size=setup.batch_size,
                      progress=False, **pipe_kwargs)
        if embed is None:
            out[prompt] = generate(pipe, prompt, setup.seeds, **kwargs)
        else:
            positive, negative = embed([prompt])
            out[prompt] = generate(pipe, None, setup.seeds, prompt_embeds=positive,
                                   negative_prompt_embeds=negative, **kwargs)
    return out


class CheckpointEvaluator:
    """Samples ``setup``'s grid and scores it; a ``train`` callback (``train(..., callbacks=[evaluator])``).

    ``subject_phrase``: how prompts name the learned subject (``"<sks> person"``); ``class_phrase``: what CLIP-T
    compares against instead (``"a person"``), also the base model's phrase for the baseline. ``embed(method,
    prompts)``: the method's own conditioning (P+), ``None`` for plain prompts. After each evaluation
    ``scores[step]`` holds ``evaluate_images``' result, ``grid[step]`` the first seed's image of every prompt,
    ``images`` the latest evaluation's images (``{prompt: one image per seed}``, for further measures such as
    ``nbutils.metrics.nearest_training_similarity``) and ``seconds`` the time spent in evaluations run as a
    training callback (not direct ``evaluate`` calls such as the baseline's), to subtract from training wall time.
    ``subject.identity`` is passed on as ``evaluate_images``' ``truth`` (the toy tier's success rate and FID
    references).

    In a resumed run the points recorded before the interruption are kept, not sampled again: ``evaluate`` reads
    the ``"eval"`` points of ``metrics.json`` whose first-seed images are saved into ``scores`` and ``grid``, and
    returns a recorded point of its step and phrase as it is. After such a recorded
    point, ``images`` is sampled again on first use, from the pipeline as it is at that time (the same images if
    nothing trained in between: sampling is seeded).
    """

    def __init__(
        self, setup: EvalSetup, subject: SubjectData, suite: EvalSuite, subject_phrase: str, *,
        class_phrase: str = "a person", embed: Callable[[Method, Sequence[str]], tuple] | None = None,
    ):
        self.setup, self.subject, self.suite = setup, subject, suite
        self.subject_phrase, self.class_phrase, self.embed = subject_phrase, class_phrase, embed
        self.scores: dict[int, dict] = {}
        self.grid: dict[int, list[Image.Image]] = {}
        self._images: dict[str, list[Image.Image]] = {}
        self._resample: Callable[[], dict] | None = None
        self.seconds = 0.0

    @property
    def images(self) -> dict[str, list[Image.Image]]:
        """The latest evaluation's images, ``{prompt: one image per seed}`` (see the class docstring)."""
        if self._resample is not None:
            self._images, self._resample = self._resample(), None
        return self._images

    def _recorded(self, run: Run) -> dict[int, tuple[str, dict, list[Image.Image]]]:
        """``{step: (subject_phrase, scores, first-seed images)}`` of the ``"eval"`` points ``run`` holds whose
        images are all saved."""
        found = {}
        for point in run.metrics.get("series", {}).get("eval", []):
            paths = [run.path / "images" / f"step-{point['step']}-{name}.png" for name in self.setup.names]
            if all(p.is_file() for p in paths):
                scores = {k: v for k, v in point.items() if k not in ("step", "subject_phrase")}
                images = [Image.open(p).convert("RGB") for p in paths]
                found[point["step"]] = (point.get("subject_phrase"), scores, images)
        return found

    def evaluate(
        self, pipe: StableDiffusionPipeline, run: Run, step: int, *, subject_phrase: str | None = None,
        embed: Embed | None = None, pipe_kwargs: dict | None = None,
    ) -> dict:
        """Sample, score and log one point: series ``"eval"`` at ``step`` (with its ``subject_phrase``), the first
        seed's images saved as ``images/step-<step>-<prompt name>.png``. Returns the scores; a point ``run``
        already holds for this step and phrase (a resumed run's) is returned as recorded, without sampling.
        ``pipe_kwargs``: extra arguments of every pipeline call (``sample_prompts``)."""
        pipe_kwargs = pipe_kwargs or {}
        phrase = subject_phrase or self.subject_phrase
        recorded = self._recorded(run)
        for s, (_, scores, grid) in recorded.items():  # a resumed run's earlier checkpoints
            self.scores.setdefault(s, scores)
            self.grid.setdefault(s, grid)
        if step in recorded and recorded[step][0] == phrase:
            self.scores[step], self.grid[step] = recorded[step][1], recorded[step][2]
            self._resample = lambda: sample_prompts(pipe, self.setup, phrase, embed=embed, **pipe_kwargs)
            return self.scores[step]
        images = sample_prompts(pipe, self.setup, phrase, embed=embed, **pipe_kwargs)
        scores = evaluate_images(images, self.subject.references, self.suite, subject_phrase=phrase,
                                 class_phrase=self.class_phrase, seed=self.setup.seeds[0],
                                 truth=self.subject.identity)
        self.scores[step], self.grid[step] = scores, [imgs[0] for imgs in images.values()]
        self._images, self._resample = images, None
        for name, (prompt, imgs) in zip(self.setup.names, images.items()):
            run.save_image(imgs[0], f"step-{step}-{name}", prompt=prompt, seed=self.setup.seeds[0], step=step)
        run.log_series("eval", step, subject_phrase=phrase, **scores)
        return scores

    def __call__(self, step: int, method: Method, run: Run) -> None:
        start = time.perf_counter()
        embed = None if self.embed is None else (lambda prompts: self.embed(method, prompts))
        self.evaluate(method.pipe, run, step, embed=embed)
        self.seconds += time.perf_counter() - start

    def grid_figure(self, title: str) -> Figure:
        """Rows: the evaluated steps (step 0: the base model with ``class_phrase``); columns: the prompts."""
        steps = sorted(self.grid)
        labels = [f"step {s}" + (f"\n({self.class_phrase})" if s == 0 else "") for s in steps]
        return image_grid([self.grid[s] for s in steps], row_labels=labels,
                          col_labels=[name.replace("_", " ") for name in self.setup.names],
                          title=title, cell=1.6)


def copy_eval_point(source: Run, target: Run, step: int) -> dict:
    """Log ``source``'s ``"eval"`` point of ``step`` into ``target`` too, with its saved first-seed images
    (``images/step-<step>-*.png``, provenance re-stamped with ``target``'s config), and return the point: the
    baseline that several runs of one notebook share, sampled once. ``KeyError`` if ``source`` has no such point."""
    point = next((p for p in source.metrics.get("series", {}).get("eval", []) if p["step"] == step), None)
    if point is None:
        raise KeyError(f"{source.path} holds no 'eval' point at step {step}")
    for path in sorted((source.path / "images").glob(f"step-{step}-*.png")):
        meta = read_png_metadata(path)
        with Image.open(path) as image:
            target.save_image(image.convert("RGB"), path.stem, prompt=meta.get("prompt", ""), seed=meta.get("seed"),
                              step=step)
    target.log_series("eval", step, **{k: v for k, v in point.items() if k != "step"})
    return point


# --------------------------------------------------------------------------------------------------- costs
def log_resources(run: Run, usage: Usage, artifact: str | Path, *, excluded_s: float = 0.0, earlier_s: float = 0.0,
                  **extra) -> dict:
    """Log what training cost into ``run``'s metrics and return it.

    ``train_s``: ``usage.wall_s`` minus ``excluded_s`` (the evaluator's ``seconds``) plus ``earlier_s`` (the
    training time a resumed run had spent before its checkpoint; the memory figures are this session's),
    ``eval_s``, ``peak_rss_mb``,
    ``added_rss_mb`` (peak minus start), ``peak_cuda_mb`` (``None`` without CUDA), ``artifact_bytes`` (size of
    ``artifact``, a file or folder) and ``extra`` (e.g. ``steps``, ``trainable_params``).
    """
    values = {"train_s": round(usage.wall_s - excluded_s + earlier_s, 1), "eval_s": round(excluded_s, 1),
              "peak_rss_mb": round(usage.peak_rss_mb, 1),
              "added_rss_mb": round(usage.peak_rss_mb - usage.start_rss_mb, 1),
              "peak_cuda_mb": None if usage.peak_cuda_mb is None else round(usage.peak_cuda_mb, 1),
              "artifact_bytes": dir_size_bytes(artifact), **extra}
    run.log_metrics(**values)
    return values


def train_and_log(
    method: Method, dataset: Sequence[tuple[Image.Image, str]], cfg: TrainConfig, run: Run,
    evaluator: CheckpointEvaluator, callback: Callable | None = None, **extra,
) -> tuple[TrainResult, dict]:
    """``train`` into ``run`` with ``evaluator`` as its callback, measured by ``track``, then ``log_resources`` with
    the evaluator's time during training excluded, the final checkpoint's weights file as the artifact, ``steps``,
    ``trainable_params`` (every number the optimizer updates) and ``extra``; a resumed run adds the training time
    recorded before its checkpoint and logs ``resumed_from_step``. Returns (``train``'s result, the logged costs).

    ``callback``: what ``train`` calls instead of ``evaluator`` when the evaluator must run inside a context (such
    as ``parametrize.cached()``); it must call ``evaluator``, whose time is the one excluded."""
    before = evaluator.seconds
    with track() as usage:
        result = train(method, dataset, cfg, run, callbacks=[callback or evaluator])
    trainable = sum(p.numel() for p in method.trainable_parameters())
    if result.start_step:
        extra["resumed_from_step"] = result.start_step
    costs = log_resources(run, usage, result.checkpoint / method.weights_name, excluded_s=evaluator.seconds - before,
                          earlier_s=result.earlier_s, steps=cfg.steps, trainable_params=trainable, **extra)
    return result, costs


# ------------------------------------------------------------------------------------------------ checks and reports
def same_pixels(
    pipes: Mapping[str, StableDiffusionPipeline], setup: EvalSetup, subject_phrase: str, seed: int, run: Run, *,
    embeds: Mapping[str, Embed] | None = None, context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Image.Image, Figure]:
    """The check every method notebook ends with: its saved file draws exactly the trained pipeline's image in a
    fresh copy of the base model.

    ``pipes``: ``{column label: pipeline}``, the trained pipeline first, then the fresh one(s) with the saved file
    loaded. Each draws the last evaluation prompt (``setup.prompts(subject_phrase)[-1]``) from ``seed`` with the
    grid's sampler; ``embeds``: ``{label: the method's own conditioning}`` for a method that builds it (P+),
    inside ``context()`` (e.g. ``parametrize.cached``). ``AssertionError`` unless every image has the same pixels;
    the last is saved into ``run`` as ``images/fresh-pipeline.png``. Returns that image and the images side by side.
    """
    prompt = setup.prompts(subject_phrase)[-1]
    sampler = dict(steps=setup.steps, guidance_scale=setup.guidance_scale, progress=False)
    images = {}
    with context():
        for name, pipe in pipes.items():
            embed = (embeds or {}).get(name)
            if embed is None:
                images[name] = generate(pipe, prompt, [seed], **sampler)[0]
            else:
                positive, negative = embed([prompt])
                images[name] = generate(pipe, None, [seed], prompt_embeds=positive,
                                        negative_prompt_embeds=negative, **sampler)[0]
    first, *others = (np.asarray(image) for image in images.values())
    differ = [name for name, other in zip(list(images)[1:], others) if not np.array_equal(first, other)]
    if differ:
        raise AssertionError(f"{', '.join(differ)} drew another image than {next(iter(images))}")
    image = list(images.values())[-1]
    run.save_image(image, "fresh-pipeline", prompt=prompt, seed=seed)
    return image, image_grid(list(images.values()), col_labels=list(images), cell=2.2,
                             title=f"'{prompt}' (seed {seed}): identical pixels")


def cost_summary(costs: dict, evaluator: CheckpointEvaluator | None = None, artifact: str | Path | None = None,
                 ) -> str:
    """What a training cost, in one or two lines: ``costs`` as ``log_resources`` logged them (``steps``,
    ``train_s``, ``eval_s``, ``artifact_bytes``), the evaluator's checkpoints and the ``artifact`` file."""
    steps, seconds = costs["steps"], costs["train_s"]
    text = f"{steps} steps in {seconds:.{1 if seconds < 10 else 0}f} s ({seconds / max(steps, 1):.2f} s/step)"
    if evaluator is not None:
        text += f" + {costs['eval_s']:.0f} s of evaluation at steps {sorted(evaluator.scores)[1:]}"
    if artifact is not None:
        text += f"\nlearned file: {artifact} ({costs['artifact_bytes']:,} bytes)"
    return text


def log_final_scores(run: Run, baseline: dict, final: dict, what: str, seeds: int) -> bool:
    """Log the final checkpoint against the base model into ``run`` (``baseline`` and ``final``: their
    ``SCORE_KEYS``; ``identity_gain``; ``beats_baseline``), print one line on it (``what``: the method's name,
    ``seeds``: images per prompt) and return whether its identity beats the base model's."""
    beats = final["identity"] > baseline["identity"]
    run.log_metrics(baseline={k: baseline[k] for k in SCORE_KEYS}, final={k: final[k] for k in SCORE_KEYS},
                    identity_gain=final["identity"] - baseline["identity"], beats_baseline=beats)
    print(f"identity {baseline['identity']:.3f} -> {final['identity']:.3f}: {what} "
          f"{'beats' if beats else 'does NOT beat'} the base model ({seeds} seeds per prompt)")
    return beats


# --------------------------------------------------------------------------------------------------- comparing
def _training_seed(run: Run) -> int | None:
    """The seed ``run`` trained with: its training config's ``seed``, else its ``SEED`` parameter."""
    params = run.config["params"]
    return (params.get("train") or {}).get("seed", params.get("SEED"))


def reference_run(notebook: str, out_dir: str | Path, setup: EvalSetup, *, seed: int,
                  method: str | None = None) -> Run:
    """The latest finished run of ``notebook`` (of ``method``, for a notebook that trains several) in ``out_dir``
    that was scored on the same ``setup`` (its config's ``params["eval"]``) and trained with the same ``seed``, so
    that its curves compare with this notebook's: a newer run of another seed or grid (a parallel seed run, a
    QUICK run) is passed over. ``FileNotFoundError`` without any run of ``notebook``; ``ValueError``, naming what
    differs in the newest, when none fits."""
    runs = list_runs(out_dir, notebook=notebook, method=method)
    which = f" with method {method!r}" if method else ""
    if not runs:
        raise FileNotFoundError(f"No run of notebooks/{notebook}.ipynb{which} in {repo_path(out_dir)}: run it first "
                                "with the same OUT_DIR (or make study).")
    ours = setup.as_dict()

    def differ(run: Run) -> list[str]:
        theirs = run.config["params"].get("eval", {})
        return sorted(k for k in ours if theirs.get(k) != ours[k]) + (["seed"] if _training_seed(run) != seed else [])

    fitting = [r for r in runs if not differ(r)]
    finished = [r for r in fitting if r.finished]
    if finished:
        return finished[-1]
    if fitting:
        raise ValueError(f"{fitting[-1].path} did not finish (the notebook did not reach its end): run "
                         f"notebooks/{notebook}.ipynb again with this notebook's MODEL, SEED and QUICK.")
    raise ValueError(f"No run of notebooks/{notebook}.ipynb{which} fits: the newest, {runs[-1].path}, was trained or "
                     f"evaluated differently ({', '.join(differ(runs[-1]))} differ): run it with this notebook's "
                     "MODEL, SEED, QUICK and N_SAMPLES.")


def reference_runs(
    wanted: dict[str, tuple[str, str | None]], out_dir: str | Path, setup: EvalSetup, *, seed: int,
) -> tuple[dict[str, Run], list[str]]:
    """Optional comparisons: for each ``{label: (notebook, method)}`` the run ``reference_run`` finds (finished,
    on ``setup``, trained with ``seed``), if there is one. Returns ``({label: run}, notes)``, one note per label left
    out, saying why and how to add it."""
    found, notes = {}, []
    for name, (notebook, method) in wanted.items():
        try:
            found[name] = reference_run(notebook, out_dir, setup, seed=seed, method=method)
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"{name} left out: {err}")
    return found, notes


def first_step_reaching(points: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step whose value is at least ``target``; ``None`` if none is."""
    return next((step for step, value in sorted(points) if value >= target), None)
