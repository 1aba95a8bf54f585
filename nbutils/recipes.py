"""Every method of notebooks 02-05 by name, built and trained outside its notebook: the recipe sweep on the
validation subject (``scripts/sweep.py``), repeated training seeds and the portrait (notebook 09).

The notebooks build each method in their own cells, to show it; this module calls the same constructors with the
same options, so a run made here is the notebook's method, not a copy of it.

- ``OPTIONS``: the options a method takes besides its ``TrainConfig`` (LoRA's rank, DreamBooth's prior weight, the
  combinations' token learning rate), with their defaults;
- ``build``: ``Built`` = the ``Method`` on a freshly loaded pipeline, the training pairs in its words, the phrase
  its prompts name the subject by, and its evaluation hooks (P+'s conditioning, SVDiff's cached weights);
- ``train_recipe``: one training of a method with a recipe on a prepared subject, evaluated at its checkpoints on
  an ``EvalSetup`` grid, into a run folder;
- ``default_recipe``: a method's default training recipe per tier: on the toy tier its sweep's choice;
- ``sweep_rows``, ``choose_recipe``, ``write_table``, ``read_sweep`` and ``sweep_figure``: a sweep's table (one row per recipe and
  checkpoint), the rule that picks its recipe, the committed table (``figures/sweeps/<method>.csv``) and its plot. With a constant learning rate and seeded batches, the checkpoint at step k of a longer run is the
  run of k steps, so the checkpoints sweep the step count for free.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from matplotlib.figure import Figure
from PIL import Image

from nbutils.compare import METHODS
from nbutils.metrics import EvalSuite
from nbutils.runs import Run, repo_path
from nbutils.study import CheckpointEvaluator, EvalSetup, SubjectData, train_and_log
from nbutils.train import Method, TrainConfig

PLACEHOLDER = "<sks>"
"""The new token of the methods that add one (TI, P+, DreamBooth + TI, pivotal tuning), as notebooks 02-05."""
CLASS_PHRASE = "a person"
NEW_TOKEN = ("textual_inversion", "pplus", "dreambooth_ti", "pivotal_tuning")
"""The methods whose captions and prompts name the subject by ``PLACEHOLDER`` instead of the dataset's word."""
OPTIONS: dict[str, dict[str, float | int]] = {
    "textual_inversion": {},
    "pplus": {},
    "lora": {"rank": 4},
    "svdiff": {},
    "dreambooth": {"prior_loss_weight": 1.0},
    "dreambooth_no_prior": {},
    "dreambooth_ti": {"prior_loss_weight": 1.0, "token_lr": 5e-4},
    "pivotal_tuning": {"rank": 4, "token_lr": 5e-4},
}
"""``{method: {option: default}}``: what each method takes besides its ``TrainConfig`` (the notebooks' defaults)."""


@dataclass
class Built:
    """A method ready to train. ``method``: the ``Method`` on its own pipeline; ``pairs``: the training pairs in
    its words; ``phrase``: how its prompts name the subject (``"<sks> person"``, ``"sks person"``); ``embed``: the
    evaluator's conditioning hook (P+; else ``None``); ``callback``: the evaluator wrapped for this method (SVDiff
    computes each shifted weight once per sampling pass); ``options``: the options it was built with."""

    method: Method
    pairs: list[tuple[Image.Image, str]]
    phrase: str
    embed: Callable | None
    callback: Callable | None
    options: dict


def check_options(name: str, options: dict) -> dict:
    """``OPTIONS[name]`` updated with ``options``; ``ValueError`` naming the choices for an unknown method or
    option."""
    if name not in OPTIONS:
        raise ValueError(f"Unknown method {name!r}; choose from {', '.join(METHODS)}.")
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(f"{name} takes no option {unknown}; its options: {sorted(OPTIONS[name]) or 'none'}.")
    return {**OPTIONS[name], **options}


def build(
    name: str, model_ref: str, subject: SubjectData, *, seed: int = 0, class_images=None, **options
) -> Built:
    """``name`` (a key of ``nbutils.compare.METHODS``) on a freshly loaded float32 pipeline of ``model_ref``.

    ``class_images``: DreamBooth's prior (``nbutils.class_images.ensure_class_images``), needed by ``dreambooth``
    and ``dreambooth_ti`` with a prior weight above 0; ``options``: see ``OPTIONS``.
    """
    from nbutils.combos import DreamBoothTI, PivotalTuning
    from nbutils.dreambooth import DreamBooth
    from nbutils.lora import LoRA
    from nbutils.models import load_pipeline
    from nbutils.pplus import PPlus, pplus_prompt_embeds
    from nbutils.svdiff import SVDiff
    from nbutils.text import with_placeholder
    from nbutils.textual_inversion import TextualInversion

    opts = check_options(name, options)
    prior = float(opts.get("prior_loss_weight", 0.0))
    if name in ("dreambooth", "dreambooth_ti") and prior > 0 and class_images is None:
        raise ValueError(f"{name} with prior_loss_weight {prior} needs class_images (ensure_class_images).")
    pipe = load_pipeline(model_ref, dtype=torch.float32)
    embed = callback = None
    if name == "textual_inversion":
        method = TextualInversion(pipe, PLACEHOLDER)
    elif name == "pplus":
        method = PPlus(pipe, PLACEHOLDER)
        embed = lambda m, prompts: pplus_prompt_embeds(m.pipe, m.concept(), prompts)  # noqa: E731
    elif name == "lora":
        method = LoRA(pipe, rank=int(opts["rank"]), seed=seed)
    elif name == "svdiff":
        method = SVDiff(pipe)
    elif name in ("dreambooth", "dreambooth_no_prior"):
        method = DreamBooth(pipe, class_images if prior > 0 else None, identifier=subject.token,
                            prior_loss_weight=prior)
    elif name == "dreambooth_ti":
        method = DreamBoothTI(pipe, class_images if prior > 0 else None, placeholder=PLACEHOLDER,
                              token_lr=float(opts["token_lr"]), prior_loss_weight=prior)
    else:
        method = PivotalTuning(pipe, placeholder=PLACEHOLDER, rank=int(opts["rank"]),
                               token_lr=float(opts["token_lr"]), seed=seed)
    if name == "svdiff":
        from torch.nn.utils import parametrize

        def callback(evaluator):
            def evaluate(step, m, run):
                with parametrize.cached():
                    evaluator(step, m, run)
            return evaluate
    new_token = name in NEW_TOKEN
    pairs = with_placeholder(subject.pairs, subject.token, PLACEHOLDER) if new_token else list(subject.pairs)
    phrase = f"{PLACEHOLDER if new_token else subject.token} person"
    return Built(method, pairs, phrase, embed, callback, opts)


def train_recipe(
    name: str, model_ref: str, subject: SubjectData, setup: EvalSetup, suite: EvalSuite, cfg: TrainConfig,
    run: Run, *, class_images=None, baseline: dict | None = None, **options
) -> tuple[Method, CheckpointEvaluator, dict]:
    """Train ``name`` with ``cfg`` and ``options`` on ``subject`` into ``run``, scored on ``setup`` at every
    checkpoint (series ``"eval"``; step 0, the base model with ``CLASS_PHRASE``, is logged from ``baseline`` when
    given, else sampled). Returns the trained method, the evaluator (``scores`` per step) and the costs
    (``log_resources``)."""
    built = build(name, model_ref, subject, seed=cfg.seed, class_images=class_images, **options)
    evaluator = CheckpointEvaluator(setup, subject, suite, built.phrase, class_phrase=CLASS_PHRASE,
                                    embed=built.embed)
    if baseline is None:
        evaluator.evaluate(built.method.pipe, run, 0, subject_phrase=CLASS_PHRASE)
    else:
        run.log_series("eval", 0, subject_phrase=CLASS_PHRASE, **baseline)
        evaluator.scores[0] = baseline
    wrapped = built.callback(evaluator) if built.callback else None
    _, costs = train_and_log(built.method, built.pairs, cfg, run, evaluator, callback=wrapped, **built.options)
    return built.method, evaluator, costs


def final_scores(evaluator: CheckpointEvaluator, keys: Sequence[str]) -> dict:
    """The last checkpoint's ``keys`` of ``evaluator.scores``."""
    return {k: evaluator.scores[max(evaluator.scores)].get(k) for k in keys}


SWEEP_KEYS = ("identity", "clip_t", "clip_i", "success_rate")
"""The scores a sweep's table keeps per checkpoint (``None`` where the evaluation has no such key)."""
CLIP_T_TOLERANCE = 0.05
"""How much CLIP-T a chosen recipe may lose against the base model (issue #14's bar: CLIP-T >= base - 0.05)."""


def sweep_rows(runs: Sequence[Run], baseline: dict) -> list[dict]:
    """One row per finished sweep run and evaluated checkpoint (step > 0): ``lr``, ``batch``, the run's options
    (every option of its method, defaults included),
    ``steps``, ``SWEEP_KEYS``, ``train_s`` (the run's training seconds pro rata to ``steps``), ``base_identity``
    and ``base_clip_t`` (``baseline``'s), ``run`` (folder name); oldest run first."""
    rows = []
    for run in runs:
        if not run.finished:
            continue
        params, total = run.config["params"], run.metrics.get("train_s")
        for point in run.metrics.get("series", {}).get("eval", []):
            if point["step"] == 0:
                continue
            options = {**OPTIONS.get(params["method"], {}), **params["options"]}  # defaults named: comparable
            rows.append({"lr": params["train"]["lr"], "batch": params["train"]["batch_size"], **options,
                         "steps": point["step"], **{k: point.get(k) for k in SWEEP_KEYS},
                         "train_s": None if total is None else round(total * point["step"] / params["train"]["steps"],
                                                                     1),
                         "base_identity": baseline["identity"], "base_clip_t": baseline["clip_t"], "run": run.name})
    if not rows:
        raise ValueError("No finished sweep run with evaluated checkpoints.")
    return rows


def choose_recipe(rows: Sequence[dict], baseline: dict | None = None) -> dict:
    """The row with the highest identity among those whose CLIP-T is at least the base model's minus
    ``CLIP_T_TOLERANCE`` (every row when none is), fewer steps breaking ties; the row, with ``"rule"`` saying
    which set it came from. ``baseline``: the base model's scores (``None``: the rows' ``base_clip_t``)."""
    floor = (rows[0]["base_clip_t"] if baseline is None else baseline["clip_t"]) - CLIP_T_TOLERANCE
    editable = [r for r in rows if r["clip_t"] is not None and r["clip_t"] >= floor]
    pool = editable or list(rows)
    best = max(pool, key=lambda r: (r["identity"], -r["steps"]))
    rule = (f"highest identity with CLIP-T >= {floor:.3f} (base - {CLIP_T_TOLERANCE})" if editable else
            f"no recipe kept CLIP-T >= {floor:.3f}: highest identity of all")
    return {**best, "rule": rule}


SWEEPS = "figures/sweeps"
"""Where ``scripts/sweep.py`` writes each method's table (``<method>.csv``), committed with the study."""


def read_sweep(method: str, folder: str | Path = SWEEPS) -> list[dict]:
    """The rows of ``folder/<method>.csv`` (numbers as numbers, empty cells as ``None``); ``FileNotFoundError``
    naming the command that writes it."""
    path = repo_path(folder) / f"{method}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"No sweep table {path}: run scripts/sweep.py --method {method} (see its --help).")

    def value(text: str):
        if text == "":
            return None
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    with path.open(encoding="utf-8", newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_table(rows: Sequence[dict], path: str | Path) -> Path:
    """``rows`` as CSV at ``path``, written atomically (header: the first row's keys; ``None`` and missing keys are
    empty cells, which ``read_sweep`` reads back as ``None``). Returns the path."""
    import io

    from nbutils.runs import atomic_write

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = repo_path(path)
    atomic_write(path, buf.getvalue().encode("utf-8"))
    return path


def recipe_label(row: dict) -> str:
    """``'lr 0.001, rank 4'``: a row's learning rate and options (what tells its recipe from the others)."""
    extra = [k for k in row if k not in ("lr", "batch", "steps", "train_s", "run", "rule", "base_identity",
                                         "base_clip_t", *SWEEP_KEYS)]
    return ", ".join([f"lr {row['lr']:g}", *(f"{k.replace('_', ' ')} {row[k]:g}" for k in extra)])


def describe_choice(chosen: dict) -> str:
    """One sentence: the chosen recipe, its scores on the validation subject and the rule that chose it."""
    return (f"Chosen on the validation subject: {recipe_label(chosen)}, {chosen['steps']} steps of batch "
            f"{chosen['batch']} (identity {chosen['identity']:.3f} vs the base model's {chosen['base_identity']:.3f}, "
            f"CLIP-T {chosen['clip_t']:.3f} vs {chosen['base_clip_t']:.3f}): {chosen['rule']}.")


def sweep_figure(rows: Sequence[dict], chosen: dict, title: str) -> Figure:
    """Identity (left) and CLIP-T (right) against the step count, one line per recipe (``recipe_label``), the base
    model and the CLIP-T floor dashed, the ``chosen`` row starred."""
    from nbutils.viz import new_figure

    fig = new_figure((10, 3.8))
    axes = fig.subplots(1, 2)
    recipes: dict[str, list[dict]] = {}
    for row in rows:
        recipes.setdefault(recipe_label(row), []).append(row)
    base = rows[0]
    for ax, key, name, floor in ((axes[0], "identity", "identity (cosine)", base["base_identity"]),
                                 (axes[1], "clip_t", "CLIP-T (cosine)", base["base_clip_t"])):
        for label, points in recipes.items():
            points = sorted(points, key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in points], [r[key] for r in points], marker="o", label=label)
        ax.axhline(floor, color="grey", ls="--", lw=1, label="base model")
        if key == "clip_t":
            ax.axhline(floor - CLIP_T_TOLERANCE, color="tab:red", ls=":", lw=1,
                       label=f"CLIP-T floor (base - {CLIP_T_TOLERANCE})")
        ax.scatter([chosen["steps"]], [chosen[key]], marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                   label="chosen")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return fig


CONFIG_MODULE = {"textual_inversion": "textual_inversion", "pplus": "pplus", "lora": "lora", "svdiff": "svdiff",
                 "dreambooth": "dreambooth", "dreambooth_no_prior": "dreambooth", "dreambooth_ti": "dreambooth",
                 "pivotal_tuning": "lora"}
"""The ``nbutils`` module whose ``default_config`` holds a method's recipe on the tiers without a sweep."""


def default_recipe(name: str, tier: str, quick: bool = False, folder: str | Path = SWEEPS) -> tuple[TrainConfig, dict]:
    """``(TrainConfig, options)``: ``name``'s default recipe on ``tier``. On the toy tier the committed sweep's
    choice (``choose_recipe(read_sweep(name))``: learning rate, batch, steps and options such as LoRA's rank),
    evaluated every quarter of the steps but at most every 50; elsewhere ``default_config(tier)`` of its module
    (``CONFIG_MODULE``) and no options. ``quick``: a tenth of the steps, as ``nbutils.train.config_for_tier``."""
    import importlib

    from nbutils.train import config_for_tier

    check_options(name, {})
    module = importlib.import_module(f"nbutils.{CONFIG_MODULE[name]}")
    if tier != "toy":
        return module.default_config(tier, quick), {}
    chosen = choose_recipe(read_sweep(name, folder))
    steps = int(chosen["steps"])
    preset = replace(module.default_config(tier), lr=float(chosen["lr"]), batch_size=int(chosen["batch"]),
                     steps=steps, checkpoint_every=min(steps, max(50, steps // 4)))
    return config_for_tier(tier, quick, {tier: preset}), {k: chosen[k] for k in OPTIONS[name] if k in chosen}
