"""Which NST route reaches the toy styles and keeps the subject? (issue #15; notebook 07, section 4)

Each variant (a feature network, a colour mode, layers, weights, steps) paints the same toy portraits into the
four toy styles, the references rendered as notebook 07 renders them (another person, studio, seed 1000 + i). Two
judges that no variant optimises against: the toy attribute net's style head (the style classifier; share of
images in the reference's style) and the toy identity embedder (mean cosine with the subject's reference photos;
the drop is the input portraits' identity minus the stylised ones'). The toy attribute net itself is not a
candidate here: its convolutions fool their own style head (notebook 07's measurement).

Portraits: ``--portraits render`` draws the toy subject in the "photo" style (studio, random pose; cheap, for
pilots); ``--portraits personalised`` samples the best finished run of ``--out-dir`` with the "studio" prompt, as
notebook 07 does (``choose_run``/``load_personalised``, ``eval_setup``/``sample_prompts``).

    python scripts/nst_networks.py --n 4 --variants vgg-random clip vgg-random-luminance      # a pilot
    python scripts/nst_networks.py --n 16 --portraits personalised --out-dir runs/v3 --variants vgg-random-luminance

``--diagnose`` asks whether the random VGG-19's Gram matrices see the toy styles at all: for rendered portraits,
the mean ``gram_distance`` to the reference of the photo, of the same portrait truly rendered in the style, and of
its NST output (notebook 07's route; and in grey, of the "luminance-matched" route), and the style classifier on
the true renders with the photo's chrominance (``with_luminance``: can a luminance-only route pass at all?).

Seeded and single-threaded: the same arguments give the same table. Writes ``figures/style_nst_networks.csv``
(one row per variant and style, and an "all" row per variant; rows of other portraits, sizes or variants already
there are kept) and prints it.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from nbutils.metrics import identity_similarity
from nbutils.runs import REPO_ROOT
from nbutils.style_transfer import clip_vision_stack, stylise_batch, vae_encoder_stack, vgg19_features, vgg19_stack
from nbutils.toyworld import STYLES, TOY_SUBJECT, portraits, render, with_fields

ART = [s for s in STYLES if s != "photo"]
OUT = REPO_ROOT / "figures" / "style_nst_networks.csv"

# network, then stylise_batch options; steps and Adam (lr 0.05) unless said; "style_set": K paints with the mean
# Gram of K renders of the style on other people (the first is notebook 07's reference), not one reference
VARIANTS = {
    "vgg-random": ("vgg19-random", {}),  # notebook 07's route: relu4_2, the paper's 5 style layers, 1e6
    "vgg-random-lummatched": ("vgg19-random", {"colour": "luminance-matched"}),
    "vgg-random-match": ("vgg19-random", {"colour": "match"}),
    "vgg-random-lummatched-1e8": ("vgg19-random", {"colour": "luminance-matched", "style_weight": 1e8}),
    "vgg-random-lummatched-1e8-set16": ("vgg19-random", {"colour": "luminance-matched", "style_weight": 1e8,
                                                         "style_set": 16}),
    "vgg-random-lummatched-relu3_2-1e8": ("vgg19-random", {"colour": "luminance-matched", "style_weight": 1e8,
                                                          "content_layer": "relu3_2"}),
    "vgg-random-match-relu3_2": ("vgg19-random", {"colour": "match", "content_layer": "relu3_2"}),
    "vgg-random-luminance": ("vgg19-random", {"colour": "luminance", "style_weight": 1e8}),
    "vgg-random-luminance-1e6": ("vgg19-random", {"colour": "luminance"}),
    "vgg-random-luminance-80": ("vgg19-random", {"colour": "luminance", "style_weight": 1e8, "steps": 80}),
    "vgg-random-luminance-3layers": ("vgg19-random", {"colour": "luminance", "style_weight": 1e8,
                                                      "style_layers": ("relu1_1", "relu2_1", "relu3_1")}),
    "vgg-random-luminance-set16": ("vgg19-random", {"colour": "luminance", "style_weight": 1e8, "style_set": 16}),
    "vgg-random-luminance-lbfgs": ("vgg19-random", {"colour": "luminance", "style_weight": 1e8,
                                                    "optimizer": "lbfgs"}),
    "clip": ("toy-clip", {}),
    "clip-lummatched": ("toy-clip", {"colour": "luminance-matched"}),
    "clip-match": ("toy-clip", {"colour": "match"}),
    "vae": ("toy-vae", {}),
    "vae-lummatched": ("toy-vae", {"colour": "luminance-matched"}),
}


def build(network: str, seed: int):
    if network == "vgg19-random":
        return vgg19_stack(vgg19_features(None, seed=seed), f"VGG-19 (random, seed {seed})")
    if network == "toy-clip":
        from transformers import CLIPModel

        from nbutils.toy_evaluators import TOY_CLIP_DIR

        return clip_vision_stack(CLIPModel.from_pretrained(TOY_CLIP_DIR, use_safetensors=True).vision_model.eval())
    if network == "toy-vae":
        from diffusers import AutoencoderKL

        from nbutils.models import TOY_MODEL_DIR

        return vae_encoder_stack(AutoencoderKL.from_pretrained(TOY_MODEL_DIR, subfolder="vae").eval())
    raise ValueError(network)


def references(k: int = 1) -> dict[str, list]:
    """Notebook 07's toy references, each style on another person in the studio (``portraits(1000 + i, 1)``),
    and with ``k > 1`` the next ``k - 1`` people of that draw in the same style: a style set."""
    return {s: [render(with_fields(p, style=s, scene="studio"), 64) for p in portraits(1000 + i, k)]
            for i, s in enumerate(STYLES) if s != "photo"}


def input_portraits(kind: str, n: int, seed: int, out_dir: str):
    """``n`` portraits of the toy subject, a description of where they come from, and the subject's photos."""
    from nbutils.study import eval_setup, load_subject_dataset, sample_prompts

    if kind == "render":
        images = [render(with_fields(p, style="photo", scene="studio"), 64)
                  for p in portraits(seed, n, identity=TOY_SUBJECT)]
        subject = load_subject_dataset("auto", out_dir=out_dir)
        return images, f"toy-world renders of TOY_SUBJECT (photo, studio, portraits({seed}, {n}))", subject
    from nbutils.personalised import choose_run, load_personalised

    source, notes = choose_run(out_dir, "best", model="auto", quick=False, seed=seed)
    for note in notes:
        print("note:", note)
    pipe, phrase, embed = load_personalised(source)
    ref = source.config["params"]["model_ref"]
    subject = load_subject_dataset(source.config["params"]["eval"]["dataset"])
    setup = eval_setup(ref, subject.path, seed=seed, quick=False, n_samples=n, names=["studio"])
    (images,) = sample_prompts(pipe, setup, phrase, embed=embed).values()  # {prompt: one image per seed}
    return list(images), f"{source.method} samples ({source.name}, 'studio' prompt, {n} seeds)", subject


def diagnose(n: int, seed: int, judges) -> None:
    """See ``--diagnose`` in the module docstring; prints one line per style."""
    from nbutils.style_transfer import _to_image, gram_distance, luminance, to_tensor, with_luminance

    stack = build("vgg19-random", seed)
    drawn = list(portraits(seed, n, identity=TOY_SUBJECT))
    photos = [render(with_fields(p, style="photo", scene="studio"), 64) for p in drawn]
    grey = lambda images: [im.convert("L").convert("RGB") for im in images]  # noqa: E731
    for style, (reference,) in references().items():
        true = [render(with_fields(p, style=style, scene="studio"), 64) for p in drawn]
        nst, _ = stylise_batch(photos, [reference], stack, steps=40, optimizer="adam", progress=False)
        lum, _ = stylise_batch(photos, [reference], stack, steps=40, optimizer="adam", colour="luminance-matched",
                               style_weight=1e8, progress=False)
        kept = [_to_image(with_luminance(to_tensor(p), luminance(to_tensor(t)))) for p, t in zip(photos, true)]
        d = lambda images, ref: float(np.mean(gram_distance(stack, images, ref)))  # noqa: E731
        passed = (judges.predict(kept)["style"] == STYLES.index(style)).float().mean().item()
        print(f"{style:10s} Gram distance to the reference, RGB: photo {d(photos, reference):.2e}, true style "
              f"{d(true, reference):.2e}, NST {d(nst, reference):.2e}; grey: photo "
              f"{d(grey(photos), grey([reference])[0]):.2e}, true style {d(grey(true), grey([reference])[0]):.2e}, "
              f"matched-luminance NST {d(grey(lum), grey([reference])[0]):.2e}; true style with the photo's "
              f"chrominance in style {passed:.0%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--n", type=int, default=4, help="portraits per style")
    parser.add_argument("--portraits", choices=("render", "personalised"), default="render")
    parser.add_argument("--out-dir", default="runs/v3", help="results store (subject dataset, personalised runs)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", type=Path, default=OUT)
    parser.add_argument("--diagnose", action="store_true", help="the Gram diagnostic instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    from nbutils.toy_evaluators import load_toy_evaluators

    judges = load_toy_evaluators()
    if args.diagnose:
        return diagnose(args.n, args.seed, judges)
    images, where, subject = input_portraits(args.portraits, args.n, args.seed, args.out_dir)
    identity_in = identity_similarity(images, subject.references, judges.identity)["identity"]
    print(f"portraits: {where}; their identity {identity_in:.3f}; "
          f"style classifier on them: {[STYLES[i] for i in judges.predict(images)['style'].tolist()]}")
    rows, stacks = [], {}
    for name in args.variants:
        network, options = VARIANTS[name]
        stack = stacks.setdefault(network, build(network, args.seed))
        options = {"steps": args.steps, "optimizer": "adam", "seed": args.seed, "progress": False, **options}
        refs = references(options.pop("style_set", 1))
        per_style = []
        for style in ART:
            start = time.perf_counter()
            out, _ = stylise_batch(images, [refs[style]], stack, **options)  # one style (set) for all
            seconds = (time.perf_counter() - start) / len(images)
            in_style = (judges.predict(out)["style"] == STYLES.index(style)).float().mean().item()
            identity = identity_similarity(out, subject.references, judges.identity)["identity"]
            per_style.append(dict(portraits=args.portraits, n=len(images), network=stack.name, variant=name,
                                  style=style, in_style=in_style, identity_in=identity_in, identity=identity,
                                  identity_drop=identity_in - identity, s_per_image=seconds,
                                  passes=in_style >= 0.8 and identity_in - identity <= 0.15))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in per_style[-1].items()}, flush=True)
        rows += per_style
        mean = {k: float(np.mean([r[k] for r in per_style])) for k in ("in_style", "identity", "identity_drop",
                                                                       "s_per_image")}
        rows.append({**per_style[0], "style": "all", **mean, "passes": all(r["passes"] for r in per_style)})
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    written = [{k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()} for row in rows]
    key = lambda row: (row["portraits"], str(row["n"]), row["variant"])  # noqa: E731
    if args.csv.is_file():  # rows of other portraits, sizes and variants stay; these replace their own
        with open(args.csv, newline="") as file:
            new = {key(row) for row in written}
            written = [row for row in csv.DictReader(file) if key(row) not in new] + written
    with open(args.csv, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(written)
    print(f"portraits: {where}\n" + "\n".join(
        f"{r['variant']:24s} {r['style']:10s} in style {r['in_style']:.0%}  identity {r['identity']:.3f} "
        f"(drop {r['identity_drop']:+.3f})  {r['s_per_image']:.2f} s/image  {'PASS' if r['passes'] else 'miss'}"
        for r in rows))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
