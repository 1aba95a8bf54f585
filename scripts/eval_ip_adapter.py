"""Score the toy IP-Adapter's aggregations on the study's grid: base model vs single / max / mean / self-attention.

    python scripts/eval_ip_adapter.py            # about 10 minutes at 1 thread on a quiet CPU

The subject is ``data/subjects/toy`` (its five photos are both the IP-Adapter's references and the identity
references; ``subject.json`` holds the identity truth for the success rate and FID). The grid is
``nbutils.study.eval_setup(toy, seed=0, quick=False)``: 3 prompts x 16 seeds, 25 DDIM steps, guidance 4, the prompts
naming the person only as ``"a person"`` (the image carries who). The adapter is loaded from
``data/models/toy-encoders/ip-adapter`` with diffusers' ``pipe.load_ip_adapter``; each variant's aggregated
embedding goes in as ``ip_adapter_image_embeds`` (zero negative). Every variant runs at each lambda of
``--scales`` (1.0 and 0.5). One row per variant and lambda goes to ``--table`` (``figures/ip_adapter_aggregation.csv``:
the scores of ``evaluate_images`` with their 95 % intervals, identity per prompt, and per identity trait the share
of images in which the attribute net reads the subject's value), the first seed of every prompt to ``--figure``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nbutils import ip_adapter as ipa  # noqa: E402
from nbutils.metrics import evaluate_images, suite_for_tier, trait_read_rates  # noqa: E402
from nbutils.models import load_pipeline, model_tier, resolve_model  # noqa: E402
from nbutils.recipes import CLASS_PHRASE, write_table  # noqa: E402
from nbutils.study import eval_setup, sample_prompts  # noqa: E402
from nbutils.toyworld import Identity  # noqa: E402
from nbutils.viz import image_grid, save_figure  # noqa: E402

SUBJECT = REPO / "data" / "subjects" / "toy"
ADAPTER = REPO / "data" / "models" / "toy-encoders" / "ip-adapter"


def subject_photos(folder: Path) -> tuple[list[Image.Image], Identity]:
    """The subject's photos (``*.png``, sorted) as RGB images, and its true identity from ``subject.json``."""
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    return photos, Identity(**json.loads((folder / "subject.json").read_text())["identity"])


def trait_rates(images: dict[str, list[Image.Image]], suite, truth: Identity) -> dict[str, float]:
    """``metrics.trait_read_rates`` of every image of ``images``, keyed as this table's columns (f"trait[{f}]")."""
    rates = trait_read_rates(suite.attributes([im for ims in images.values() for im in ims]), truth)
    return {f"trait[{f}]": v for f, v in rates.items()}


def row(variant: str, scale: float | None, scores: dict, seconds: float, traits: dict) -> dict:
    """One table row: the scores of ``evaluate_images`` with its 95 % intervals split into columns, then the
    trait read-out rates."""
    ci = scores["identity_ci"] or [None, None]
    ct = scores["clip_t_ci"] or [None, None]
    out = {"variant": variant, "scale": scale, "identity": scores["identity"], "identity_ci_low": ci[0],
           "identity_ci_high": ci[1], "clip_t": scores["clip_t"], "clip_t_ci_low": ct[0], "clip_t_ci_high": ct[1],
           "clip_i": scores["clip_i"], "detection_rate": scores["detection_rate"],
           "success_rate": scores["success_rate"], "fid": scores["fid"], "kid_mean": scores["kid_mean"],
           "is_mean": scores["is_mean"]}
    for prompt, per in scores["per_prompt"].items():
        out[f"identity[{prompt}]"] = per["identity"]
    out.update(traits)
    out["seconds"] = round(seconds, 1)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=ADAPTER)
    ap.add_argument("--subject", type=Path, default=SUBJECT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scales", default="1.0,0.5", help="comma-separated lambdas, each run for every variant")
    ap.add_argument("--variants", default=",".join(ipa.AGGREGATIONS))
    ap.add_argument("--n-samples", type=int, default=None, help="seeds per prompt (default: the tier's, 16)")
    ap.add_argument("--table", type=Path, default=REPO / "figures" / "ip_adapter_aggregation.csv")
    ap.add_argument("--figure", type=Path, default=REPO / "figures" / "ip_adapter_aggregation.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    ref = resolve_model("toy")
    setup = eval_setup(ref, args.subject, seed=args.seed, quick=False, n_samples=args.n_samples)
    suite = suite_for_tier(model_tier(ref))
    photos, truth = subject_photos(args.subject)

    def score(images):
        return evaluate_images(images, photos, suite, subject_phrase=CLASS_PHRASE, seed=setup.seeds[0], truth=truth)

    rows, grids = [], {}
    t = time.perf_counter()
    base_images = sample_prompts(load_pipeline(ref), setup, CLASS_PHRASE)
    rows.append(row("base model", None, score(base_images), time.perf_counter() - t,
                    trait_rates(base_images, suite, truth)))
    grids["base model"] = [imgs[0] for imgs in base_images.values()]
    print(rows[-1], flush=True)

    pipe = load_pipeline(ref)
    ipa.load_ip_adapter(pipe, args.adapter, scale=1.0)
    embeds = ipa.ImageEncoder.toy()(photos)  # (5, 64)
    pool = ipa.load_aggregator(args.adapter, embeds.shape[1])
    with torch.no_grad():
        aggregated = {how: ipa.aggregate(embeds, how, pool) for how in args.variants.split(",")}

    def run(how: str, scale: float) -> None:
        t = time.perf_counter()
        pipe.set_ip_adapter_scale(scale)
        images = sample_prompts(pipe, setup, CLASS_PHRASE,
                                ip_adapter_image_embeds=ipa.image_prompt_embeds(aggregated[how]))
        rows.append(row(how, scale, score(images), time.perf_counter() - t, trait_rates(images, suite, truth)))
        grids[f"{how}\nlambda {scale:g}"] = [imgs[0] for imgs in images.values()]
        print(rows[-1], flush=True)
        write_table(rows, args.table)

    for scale in (float(s) for s in args.scales.split(",")):
        for how in aggregated:
            run(how, scale)
    write_table(rows, args.table)
    fig = image_grid(list(grids.values()), row_labels=list(grids), col_labels=list(setup.names),
                     title=f"IP-Adapter, toy subject's 5 photos\naggregated (seed {setup.seeds[0]})",
                     cell=1.3)
    save_figure(fig, args.figure)
    print(f"wrote {args.table} and {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
