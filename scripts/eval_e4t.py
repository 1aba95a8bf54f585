"""Measure E4T on a toy subject: personalise from ONE photo in a few steps, score it as the method notebooks do.

    python scripts/eval_e4t.py                                   # the toy subject, the default recipe
    python scripts/eval_e4t.py --lrs 3e-4,1e-3 --steps 5,15      # the committed figures/e4t_results.csv
    python scripts/eval_e4t.py --subject data/subjects/toy-val --lrs 1e-4,3e-4,1e-3 --steps 5,10,15 \
        --csv figures/sweeps/e4t_sweep_toy_val.csv               # choose the recipe on the validation subject

Rows: the base model ("a person"), the pretrained encoder alone (0 tuning steps: the subject word computed from the
photo, the domain's weight offsets) and each (learning rate, steps) personalisation, every one scored on
``nbutils.study.eval_setup``'s grid (3 prompts x 16 seeds by default, seed 0) with the toy suite: identity with
its 95 % bootstrap interval, CLIP-T, CLIP-I, success rate, and the tuning wall time (``train_and_log``'s
``train_s``: latents, features, steps and the checkpoint; sampling excluded). Each personalisation's result is
saved with ``E4TPersonalise.save_personalised`` and loaded into a fresh pipeline, which must draw the same pixels.
Seeded throughout: the same arguments give the same table.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbutils.domain import caption  # noqa: E402
from nbutils.e4t import PLACEHOLDER, E4TPersonalise, default_config, load_personalised  # noqa: E402
from nbutils.metrics import suite_for_tier, trait_read_rates  # noqa: E402
from nbutils.models import TOY_MODEL_DIR, load_pipeline  # noqa: E402
from nbutils.runs import new_run, repo_path  # noqa: E402
from nbutils.sampling import generate  # noqa: E402
from nbutils.study import CheckpointEvaluator, SubjectData, eval_setup, train_and_log  # noqa: E402
from nbutils.toyworld import IDENTITY_FIELDS, Identity, Portrait  # noqa: E402

SUBJECT_PHRASE = f"{PLACEHOLDER} person"
CLASS_PHRASE = "a person"
COLUMNS = ["method", "subject", "photos", "lr", "steps", "n_images", "identity", "identity_lo", "identity_hi",
           "detection_rate", "success_rate", "clip_t", "clip_t_lo", "clip_t_hi", "clip_i", "tune_s",
           "artifact_bytes", *[f"read_{f}" for f in IDENTITY_FIELDS]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", default="data/subjects/toy")
    p.add_argument("--photo", default="01.png", help="the one photo E4T personalises from")
    p.add_argument("--pretrained", default="data/models/toy-encoders/e4t")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the toy default)")
    p.add_argument("--steps", default=None, help="comma-separated tuning steps (default: the toy default)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--n-samples", type=int, default=None, help="seeds per prompt (default: the tier's, 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-base", action="store_true", help="skip the base model row")
    p.add_argument("--runs", default="runs")
    p.add_argument("--csv", default="figures/e4t_results.csv")
    return p.parse_args()


def load_subject(folder: Path, photo: str) -> tuple[SubjectData, tuple[Image.Image, str]]:
    """The subject's references (every photo, unaugmented, as notebook 01 keeps a drawn subject's), its true
    identity, and the one training pair: ``photo`` with its domain-style caption (style, expression, scene from
    ``subject.json``, the person named ``SUBJECT_PHRASE``)."""
    meta = json.loads((folder / "subject.json").read_text())
    identity = Identity(**meta["identity"])
    names = sorted(p.name for p in folder.glob("*.png"))
    references = [Image.open(folder / n).convert("RGB") for n in names]
    info = meta["photos"][names.index(photo)]
    portrait = Portrait(identity, expression=info["expression"], scene=info["scene"], style=info["style"])
    pair = (Image.open(folder / photo).convert("RGB"), caption(portrait, SUBJECT_PHRASE))
    data = SubjectData(folder, [pair], references, PLACEHOLDER, identity=identity)
    return data, pair


def trait_rates(images: dict[str, list[Image.Image]], suite, truth: Identity) -> dict[str, float]:
    """``metrics.trait_read_rates`` of every image of ``images``, keyed as this table's columns (f"read_{f}")."""
    rates = trait_read_rates(suite.attributes([im for ims in images.values() for im in ims]), truth)
    return {f"read_{f}": v for f, v in rates.items()}


def row(name: str, subject: Path, scores: dict, **extra) -> dict:
    lo, hi = scores.get("identity_ci") or (None, None)
    clo, chi = scores.get("clip_t_ci") or (None, None)
    out = {"method": name, "subject": subject.name, "n_images": len(scores.get("identity_per_image") or []),
           "identity": scores["identity"], "identity_lo": lo, "identity_hi": hi,
           "detection_rate": scores.get("detection_rate"), "success_rate": scores.get("success_rate"),
           "clip_t": scores.get("clip_t"), "clip_t_lo": clo, "clip_t_hi": chi, "clip_i": scores.get("clip_i"),
           **extra}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, flush=True)
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    folder = repo_path(args.subject)
    subject, pair = load_subject(folder, args.photo)
    defaults = default_config("toy")
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [defaults.lr]
    steps_list = [int(x) for x in args.steps.split(",")] if args.steps else [defaults.steps]
    model = str(TOY_MODEL_DIR)
    setup = eval_setup(model, folder, seed=args.seed, quick=False, n_samples=args.n_samples)
    suite = suite_for_tier("toy")
    params = dict(vars(args), eval=setup.as_dict())
    rows = []
    began = time.perf_counter()

    if not args.no_base:
        base = load_pipeline(model, device="cpu")
        base.set_progress_bar_config(disable=True)
        run = new_run("eval_e4t", params, out_dir=args.runs, method="base")
        evaluator = CheckpointEvaluator(setup, subject, suite, CLASS_PHRASE)
        scores = evaluator.evaluate(base, run, 0)
        rows.append(row("base model", folder, scores, photos=0, steps=0,
                        **trait_rates(evaluator.images, suite, subject.identity)))
        del base

    encoder_alone_done = False
    for lr in lrs:
        for steps in steps_list:
            pipe = load_pipeline(model, device="cpu")
            pipe.set_progress_bar_config(disable=True)
            method = E4TPersonalise(pipe, repo_path(args.pretrained), pair[0])
            run = new_run("eval_e4t", {**params, "lr": lr, "tune_steps": steps}, out_dir=args.runs, method="e4t")
            evaluator = CheckpointEvaluator(setup, subject, suite, SUBJECT_PHRASE, class_phrase=CLASS_PHRASE)
            if not encoder_alone_done:  # step 0: the pretrained encoder and weight offsets, no tuning
                scores = evaluator.evaluate(pipe, run, 0)
                rows.append(row("E4T encoder alone", folder, scores, photos=1, steps=0, tune_s=0.0,
                                **trait_rates(evaluator.images, suite, subject.identity)))
                encoder_alone_done = True
            if steps == 0:  # only the encoder alone
                continue
            cfg = replace(defaults, lr=lr, steps=steps, seed=args.seed, batch_size=args.batch or defaults.batch_size)
            result, costs = train_and_log(method, [pair], cfg, run, evaluator)
            ti_file, lora_file = method.save_personalised(result.checkpoint)
            size = ti_file.stat().st_size + lora_file.stat().st_size
            rows.append(row("E4T", folder, evaluator.scores[steps], photos=1, lr=lr, steps=steps,
                            tune_s=costs["train_s"], artifact_bytes=size,
                            **trait_rates(evaluator.images, suite, subject.identity)))
            # the saved files in a fresh pipeline draw the same pixels
            fresh = load_pipeline(model, device="cpu")
            fresh.set_progress_bar_config(disable=True)
            load_personalised(fresh, result.checkpoint)
            prompt = setup.prompts(SUBJECT_PHRASE)[0]
            kw = dict(steps=setup.steps, guidance_scale=setup.guidance_scale, progress=False)
            same = np.array_equal(np.asarray(generate(pipe, prompt, [args.seed], **kw)[0]),
                                  np.asarray(generate(fresh, prompt, [args.seed], **kw)[0]))
            if not same:
                raise AssertionError(f"the saved E4T files in {result.checkpoint} draw other pixels")
            del pipe, fresh, method

    out = repo_path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out} ({len(rows)} rows) in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
