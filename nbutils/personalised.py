"""The personalised model a later notebook draws with (notebook 07): one finished method run of the results store,
loaded back into a pipeline by that method's own loader, and seeded img2img (SDEdit) on it.

- ``choose_run``: the run of a method, a run folder, or (``"best"``) the finished run whose last checkpoint scored
  the highest identity, among the runs ``nbutils.compare.select_runs`` finds (those notebook 08 compares);
- ``load_personalised``: ``(pipeline, subject_phrase, embed)`` from a run's last checkpoint, dispatching on its
  method to ``load_textual_inversion``, ``load_pplus``, ``load_lora``, ``load_svdiff``, ``load_pivotal`` or the
  DreamBooth methods' ``load_saved``;
- ``img2img``: one image per seed from a start image at a given strength, through
  ``StableDiffusionImg2ImgPipeline``, with a prompt or a method's own conditioning (P+).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from nbutils.compare import METHODS, select_runs
from nbutils.runs import Run, load_run, repo_path
from nbutils.study import Embed
from nbutils.train import list_checkpoints

RUN_METHODS_FIRST = ("run a method notebook first (02_textual_inversion, 03_pplus, 04_lora_svdiff or "
                     "05_dreambooth, or make study) with the same OUT_DIR, QUICK and SEED")


def final_identity(run: Run) -> float | None:
    """The identity score of ``run``'s last evaluated checkpoint (series ``"eval"``), ``None`` if not logged."""
    points = run.metrics.get("series", {}).get("eval", [])
    return max(points, key=lambda p: p["step"]).get("identity") if points else None


def choose_run(
    out_dir: str | Path, artifact: str = "best", *, model: str = "auto", quick: bool | None = None,
    seed: int | None = None,
) -> tuple[Run, list[str]]:
    """The method run to draw with, and notes on the choice (``select_runs``' and which run won, one sentence each).

    ``artifact``: ``"best"`` (the highest final identity among the latest finished run of each method with this
    ``model``, ``quick`` and ``seed``), a method name (``"dreambooth"``: its latest finished run) or a run folder.
    ``FileNotFoundError`` naming notebooks 02-05 when there is no such run.
    """
    if artifact not in ("best", *METHODS) and repo_path(artifact).is_dir():
        run = load_run(artifact)
        return run, [f"ARTIFACT names {run.path} ({run.method or 'no method'})."]
    selection = select_runs(out_dir, model=model, quick=quick, seed=seed, expected=(), methods=METHODS)
    notes = list(selection.notes)
    if artifact == "best":
        scored = {m: final_identity(r) for m, r in selection.runs.items()}
        scored = {m: v for m, v in scored.items() if v is not None}
        if not scored:
            raise FileNotFoundError(f"No finished method run with identity scores in {repo_path(out_dir)}: "
                                    f"{RUN_METHODS_FIRST}. " + " ".join(notes))
        method = max(scored, key=scored.get)
        notes.append(f"Chose {selection.runs[method].name} ({method}): the highest final identity "
                     f"({scored[method]:.3f}) of {len(scored)} finished run(s): "
                     + ", ".join(f"{m} {v:.3f}" for m, v in scored.items()) + ".")
        return selection.runs[method], notes
    if artifact not in selection.runs:
        notebook = f"notebooks/{METHODS[artifact][1]}" if artifact in METHODS else "its notebook"
        raise FileNotFoundError(f"ARTIFACT={artifact!r}: no finished {artifact} run in {repo_path(out_dir)}, and no "
                                f"such run folder: run {notebook}... with the same OUT_DIR, QUICK and SEED, or "
                                "set ARTIFACT='best'. " + " ".join(notes))
    return selection.runs[artifact], notes


class Personalised(NamedTuple):
    """A pipeline that draws the subject: prompts name it with ``subject_phrase`` (``"sks person"``,
    ``"<sks> person"``); ``embed`` turns prompts into the method's own conditioning (P+), ``None`` for plain
    prompts."""

    pipe: StableDiffusionPipeline
    subject_phrase: str
    embed: Embed | None


def load_personalised(run: Run, *, device: str | torch.device | None = None) -> Personalised:
    """``run``'s last checkpoint applied to a fresh copy of the model it trained (``params["model_ref"]``), by the
    method's own loader; the subject phrase is the one its last evaluation used. Nothing in the run is written.

    ``FileNotFoundError`` naming the method's notebook when the run has no checkpoint (or no pivotal-tuning
    folder), ``ValueError`` for a run of an unknown method.
    """
    from nbutils.models import load_pipeline  # lazy, as everywhere: loading a model is the caller's choice

    method = run.method
    if method not in METHODS:
        raise ValueError(f"{run.path} is a run of {method or 'no method'!r}; load_personalised knows "
                         f"{', '.join(METHODS)}.")
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(f"{run.path} holds no complete checkpoint: run notebooks/{METHODS[method][1]}... "
                                "again to the end (or pick another run with ARTIFACT).")
    checkpoint = checkpoints[-1]
    points = run.metrics.get("series", {}).get("eval", [])
    phrase = max(points, key=lambda p: p["step"])["subject_phrase"] if points else "sks person"
    dreambooth = method.startswith("dreambooth")
    pipe = load_pipeline(run.config["params"]["model_ref"], device=device,
                         dtype=torch.float32 if dreambooth else None)  # DreamBooth's methods load float32 weights
    embed = None
    if method == "textual_inversion":
        from nbutils.textual_inversion import load_textual_inversion

        load_textual_inversion(pipe, checkpoint)
    elif method == "pplus":
        from nbutils.pplus import load_pplus, pplus_prompt_embeds

        concept = load_pplus(pipe, checkpoint)

        def embed(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return pplus_prompt_embeds(pipe, concept, prompts)
    elif method == "lora":
        from nbutils.lora import load_lora

        load_lora(pipe, checkpoint)
    elif method == "svdiff":
        from nbutils.svdiff import load_svdiff

        load_svdiff(pipe, checkpoint)
    elif method == "pivotal_tuning":
        from nbutils.combos import load_pivotal

        folder = run.path / "artifacts" / "pivotal"
        if not folder.is_dir():
            raise FileNotFoundError(f"{run.path} has no artifacts/pivotal folder (save_pivotal): run "
                                    "notebooks/05_dreambooth.ipynb again to the end.")
        load_pivotal(pipe, folder)
    else:  # the DreamBooth methods: their checkpoint holds unet.* weights (and DreamBooth + TI's token rows)
        from nbutils.combos import DreamBoothTI
        from nbutils.dreambooth import WEIGHTS_NAME, DreamBooth

        state = load_file(checkpoint / WEIGHTS_NAME)
        if method == "dreambooth_ti":
            placeholder = next(k for k in state if not k.startswith("unet."))
            DreamBoothTI(pipe, placeholder=placeholder, prior_loss_weight=0.0).load_saved(state)
        else:
            DreamBooth(pipe, prior_loss_weight=0.0).load_saved(state)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # nothing trains here (DreamBooth unfroze the UNet)
        module.requires_grad_(False)
    return Personalised(pipe, phrase, embed)


@torch.no_grad()
def img2img(
    pipe: StableDiffusionImg2ImgPipeline, image: Image.Image, seeds: Sequence[int], *, strength: float, steps: int,
    guidance_scale: float, prompt: str, embed: Embed | None = None, batch_size: int = 16,
) -> list[Image.Image]:
    """SDEdit: ``image`` noised to ``strength`` (0: unchanged, 1: pure noise) and denoised with ``prompt``, one
    image per seed; the noise of seed ``s`` is ``torch.Generator().manual_seed(s)``'s, whatever the batch.

    About ``strength * steps`` denoising steps run. ``embed`` (P+): the prompt's conditioning, built by the method
    instead of the pipeline's text encoder. Returns images at the pipeline's resolution.
    """
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    start = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    out: list[Image.Image] = []
    for first in range(0, len(seeds), batch_size):
        chunk = seeds[first : first + batch_size]
        if embed is None:
            conditioning = {"prompt": [prompt] * len(chunk)}
        else:
            positive, negative = embed([prompt])
            conditioning = {"prompt_embeds": positive.expand(len(chunk), -1, -1),
                            "negative_prompt_embeds": negative.expand(len(chunk), -1, -1)}
        out += pipe(image=[start] * len(chunk), strength=strength, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(int(s)) for s in chunk],
                    **conditioning).images
    return out
