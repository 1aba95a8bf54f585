"""Do notebook 01's augmentations help? Train the same methods on the subject prepared without augmentation, with
each augmentation alone and with all of them, and score them on one grid.

    python scripts/ablate_augmentations.py --methods textual_inversion,lora --out runs/ablation

Each variant is notebook 01 itself, run by papermill with its augmentation switches (``COLOUR_JITTER``,
``SCALE_CROP``, ``ROTATION``; ``N_PER_IMAGE=0`` for none) into ``OUT/<variant>``; each method then trains on it with
its default recipe (``nbutils.recipes.default_recipe``, the same seed, scored once at the end on 3 prompts x
``--samples`` seeds). Per variant and method: identity, CLIP-T, success rate and the nearest-training-photo
similarity of the new-scene and new-style images (``nbutils.metrics.nearest_training_similarity``, copying).
Writes ``--table`` (CSV) and ``--figure`` (PNG); a variant already prepared in ``OUT`` is reused.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nbutils.runs import new_run  # noqa: E402

VARIANTS = {
    "none": {"N_PER_IMAGE": 0},
    "colour jitter": {"SCALE_CROP": False, "ROTATION": False},
    "scale crop": {"COLOUR_JITTER": False, "ROTATION": False},
    "rotation": {"COLOUR_JITTER": False, "SCALE_CROP": False},
    "all": {},
}
"""Notebook 01 parameters of each variant (the others at notebook 01's defaults: all on, 4 copies per photo)."""
KEYS = ("identity", "clip_t", "success_rate", "nearest_similarity")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="textual_inversion,lora")
    p.add_argument("--samples", type=int, default=8, help="seeds per evaluation prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="toy")
    p.add_argument("--subject", default="data/subjects/toy")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--table", default="figures/augmentation_ablation.csv")
    p.add_argument("--figure", default="figures/augmentation_ablation.png")
    return p.parse_args(argv)


def prepared(variant: str, out: Path, args) -> Path:
    """The store of ``variant``: notebook 01 run once into it with the variant's switches."""
    from scripts.run_study import prepare_once

    return prepare_once(out / variant.replace(" ", "_"), {"SUBJECT_DIR": str(REPO / args.subject), "MODEL": args.model,
                                                           "QUICK": False, "SEED": args.seed, **VARIANTS[variant]})


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from nbutils.metrics import nearest_training_similarity, suite_for_tier
    from nbutils.models import model_tier, resolve_model
    from nbutils.recipes import default_recipe, train_recipe, write_table
    from nbutils.study import eval_setup, load_subject_dataset

    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    ref = resolve_model(args.model)
    tier = model_tier(ref)
    suite = suite_for_tier(tier)
    rows, baseline = [], None
    for variant in VARIANTS:
        store = prepared(variant, out, args)
        subject = load_subject_dataset("auto", store)
        setup = eval_setup(ref, subject.path, seed=args.seed, quick=False, n_samples=args.samples)
        for method in args.methods.split(","):
            cfg, options = default_recipe(method, tier)
            cfg = replace(cfg, seed=args.seed, checkpoint_every=cfg.steps)
            run = new_run("ablation", {"variant": variant, "method": method, "train": vars(cfg)}, out_dir=store,
                          method=method)
            print(f"{variant:14s} {method}: {len(subject.pairs)} training images, {cfg.steps} steps", flush=True)
            _, evaluator, costs = train_recipe(method, ref, subject, setup, suite, cfg, run, baseline=baseline,
                                               **options)
            baseline = evaluator.scores[0]
            final = evaluator.scores[cfg.steps]
            new_context = [im for name, ims in zip(setup.names, evaluator.images.values()) if name != "studio"
                           for im in ims]
            copying = nearest_training_similarity(new_context, subject.references, suite.clip.image_features)
            run.finish()
            rows.append({"variant": variant, "method": method, "images": len(subject.pairs), "steps": cfg.steps,
                         **{k: final.get(k) for k in KEYS[:3]}, "nearest_similarity": copying["nearest_similarity"],
                         "base_identity": baseline["identity"], "base_clip_t": baseline["clip_t"],
                         "train_s": costs["train_s"]})
            print("   " + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in KEYS), flush=True)
    table = write_table(rows, args.table)
    figure(rows, REPO / args.figure)
    print(f"table: {table}\nfigure: {REPO / args.figure}")
    return 0


def figure(rows: list[dict], path: Path):
    """Four panels (``KEYS``), one group of bars per variant, one bar per method; saved to ``path`` and returned."""
    from nbutils.viz import new_figure, save_figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = new_figure((12, 3.4))
    for ax, key in zip(fig.subplots(1, len(KEYS)), KEYS):
        for k, method in enumerate(methods):
            values = [next(r[key] for r in rows if r["variant"] == v and r["method"] == method) or 0 for v in VARIANTS]
            ax.bar([i + 0.4 * k for i in range(len(VARIANTS))], values, width=0.4, label=method)
        ax.set_xticks([i + 0.2 for i in range(len(VARIANTS))], list(VARIANTS), rotation=30, fontsize=8)
        ax.set_title(key.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("Notebook 01's augmentations, one at a time (toy subject, seed 0, 3 prompts x 8 seeds)")
    save_figure(fig, path)
    return fig


if __name__ == "__main__":
    sys.exit(main())
