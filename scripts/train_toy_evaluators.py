"""Train the toy evaluators on the portrait world's ground truth and render the toy subject (``make toy-model``).

1. ``data``       render portraits of all identities, the held-out traits included (purple hair, star mark);
2. ``attributes`` train ``ToyAttributeNet`` (identity traits, expression, scene, style), with blur and noise so it
                  also reads the softer images a diffusion model draws;
3. ``detector``   train ``ToyFaceDetector``: those portraits against ``non_portraits`` (pictures with nobody in them);
4. ``clip``       train a small ``transformers.CLIPModel`` contrastively on the captions -> ``data/models/toy-clip``;
5. ``subject``    render each toy subject's 5 training photos (256 px) into ``data/subjects/<name>``
                  (``toyworld.SUBJECTS``: ``toy``, the notebooks' default, and ``toy-val``, for choosing recipes);
6. ``report``     accuracies on fresh renders, and how often the detector finds a face on fresh renders and on fresh
                  non-portraits -> ``data/models/toy-evaluators/accuracy.json``.

Stages 2-4 run only when their output is missing (delete one to retrain it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from nbutils import toyworld
from nbutils.clip_bpe import VOCAB_SIZE, clip_tokenizer
from nbutils.toy_evaluators import (ATTRIBUTE_FILE, DETECTOR_FILE, EVALUATOR_DIR, SIZE, TOY_CLIP_DIR, ToyAttributeNet,
                                    ToyFaceDetector, load_toy_evaluators)
from train_toy import replace_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(os.environ.get("PORTRAIT_STUDIO_CACHE", Path.home() / ".cache" / "portrait-studio")) / "toy-train"
SUBJECTS_DIR = REPO / "data" / "subjects"
SUBJECT_SEEDS = {"toy": 7, "toy-val": 8}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _render(p: toyworld.Portrait) -> np.ndarray:
    return np.asarray(toyworld.render(p, SIZE))


def render_set(seed: int, n: int) -> tuple[np.ndarray, list[toyworld.Portrait]]:
    """``n`` portraits of all identities (held-out traits included): (n, 64, 64, 3) uint8 and their descriptions."""
    ps = list(toyworld.portraits(seed, n, held_out=True))
    with Pool(os.cpu_count()) as pool:
        imgs = list(tqdm(pool.imap(_render, ps, chunksize=64), total=n, desc=f"render seed {seed}"))
    return np.stack(imgs), ps


def _labels(ps: list[toyworld.Portrait]) -> dict[str, torch.Tensor]:
    rows = [p.labels() for p in ps]
    return {k: torch.tensor([r[k] for r in rows]) for k in toyworld.LABEL_SIZES}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur (down-up sampling) and noise on ``(B, 3, 64, 64)`` in [0, 1], like a diffusion model's output."""
    b = len(x)
    blurred = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), size=x.shape[-2:],
                            mode="bilinear")
    pick = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return (x + 0.03 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_attributes(images: np.ndarray, labels: dict[str, torch.Tensor], steps: int, seed: int) -> ToyAttributeNet:
    """Multi-head cross-entropy on all attributes, batch 64, AdamW."""
    def batch_loss(net: ToyAttributeNet, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (64,), generator=g)
        logits = net(_augment(torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255, g))
        return sum(F.cross_entropy(logits[k], labels[k][idx]) for k in logits)

    return _fit(ToyAttributeNet, batch_loss, steps, seed, "attributes")


def _fit(make_net: Callable[[], nn.Module], batch_loss: Callable[[nn.Module, torch.Generator], torch.Tensor],
         steps: int, seed: int, desc: str) -> nn.Module:
    """``steps`` AdamW steps (lr 2e-3, one-cycle schedule, weight decay 1e-4) of ``batch_loss(net, g)`` on a net
    built by ``make_net`` under ``torch.manual_seed(seed)``; ``g``, seeded with ``seed``, draws the batches."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        loss = batch_loss(net, g)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return net.eval()


def _non_portrait(seed: int) -> np.ndarray:
    """One picture with nobody in it, (64, 64, 3) uint8; its kind is ``seed % 3`` (see ``non_portraits``)."""
    rng = random.Random(seed)
    kind = seed % 3
    if kind == 0:
        return np.asarray(toyworld.render(toyworld.random_portrait(rng), SIZE, person=False))
    if kind == 1:
        img = Image.new("RGB", (4 * SIZE, 4 * SIZE), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 6)):
            x, y = rng.uniform(0, 4 * SIZE), rng.uniform(0, 4 * SIZE)
            w, h = rng.uniform(10, 2 * SIZE), rng.uniform(10, 2 * SIZE)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x - w, y - h, x + w, y + h], fill=tuple(rng.randrange(256) for _ in range(3)))
        return np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 8))).resize((SIZE, SIZE)))
    cells = rng.choice([2, 4, 8, 16])
    noise = np.random.default_rng(seed).integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(noise).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def non_portraits(seed: int, n: int) -> np.ndarray:
    """``n`` pictures with nobody in them, ``(n, 64, 64, 3)`` uint8: the toy face detector's negatives.

    A third each: the world's scenes and styles left empty; abstract pictures of one to six random colour shapes;
    smooth random noise.
    """
    seeds = [seed * 1_000_003 + k for k in range(n)]
    with Pool(os.cpu_count()) as pool:
        imgs = list(tqdm(pool.imap(_non_portrait, seeds, chunksize=64), total=n, desc=f"non-portraits seed {seed}"))
    return np.stack(imgs)


def _wash(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``_augment`` plus what a diffusion model's softest drawings do to a portrait, on ``(B, 3, 64, 64)`` in [0, 1]:
    blur by up to 4x down-up sampling, contrast pulled towards the image mean or towards white (to 30 %), and for
    half the images the colour channels permuted (so that no hue, the subject's purple hair included, is a cue)."""
    b = len(x)
    permuted = x[:, torch.randperm(3, generator=g)]
    x = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.5, permuted, x)
    factor = [0.25, 0.5][int(torch.randint(0, 2, (1,), generator=g))]
    soft = F.interpolate(F.interpolate(x, scale_factor=factor, mode="bilinear", antialias=True), size=x.shape[-2:],
                         mode="bilinear")
    x = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.3, soft, x)
    pivot = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.5, x.mean(dim=(1, 2, 3), keepdim=True), 1.0)
    contrast = torch.where(torch.rand(b, 1, 1, 1, generator=g) < 0.5, 0.3 + 0.7 * torch.rand(b, 1, 1, 1, generator=g), 1.0)
    return _augment(pivot + contrast * (x - pivot), g)


def train_detector(portraits: np.ndarray, negatives: np.ndarray, steps: int, seed: int) -> ToyFaceDetector:
    """Binary cross-entropy, batches of 64 portraits + 64 non-portraits, both softened alike by ``_wash`` (so that
    softness is no cue), AdamW."""
    target = torch.cat([torch.ones(64), torch.zeros(64)])

    def batch_loss(net: ToyFaceDetector, g: torch.Generator) -> torch.Tensor:
        pos = portraits[torch.randint(0, len(portraits), (64,), generator=g).numpy()]
        neg = negatives[torch.randint(0, len(negatives), (64,), generator=g).numpy()]
        x = _wash(torch.from_numpy(np.concatenate([pos, neg])).permute(0, 3, 1, 2).float() / 255, g)
        return F.binary_cross_entropy_with_logits(net(x), target)

    return _fit(ToyFaceDetector, batch_loss, steps, seed, "face detector")


def toy_clip_config() -> CLIPConfig:
    """A small CLIP: ViT 64 px / patch 8 / 3 layers / hidden 96, text 2 layers / hidden 64, projection 64."""
    return CLIPConfig(
        text_config={"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 64},
        vision_config={"image_size": SIZE, "patch_size": 8, "hidden_size": 96, "intermediate_size": 384,
                       "num_hidden_layers": 3, "num_attention_heads": 4, "projection_dim": 64},
        projection_dim=64,
    )


def train_clip(images: np.ndarray, ps: list[toyworld.Portrait], steps: int, seed: int) -> CLIPModel:
    """Symmetric InfoNCE over batches of 128 (image, caption) pairs; captions randomly shortened."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    tok = clip_tokenizer()
    model = CLIPModel(toy_clip_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    bar = tqdm(range(steps), desc="clip")
    for _ in bar:
        idx = torch.randint(0, len(images), (128,), generator=g)
        x = _augment(torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255, g)
        caps = [ps[i].caption() if rng.random() < 0.5 else toyworld.caption_variants(ps[i], rng) for i in idx.tolist()]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values=(x - mean) / std, return_loss=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    return model.eval()


def save_clip(model: CLIPModel, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                           image_mean=CLIP_MEAN, image_std=CLIP_STD),
        tokenizer=clip_tokenizer(),
    )
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    replace_dir(tmp, out)


def render_subject(out: Path, seed: int, identity: toyworld.Identity) -> list[toyworld.Portrait]:
    """A subject's 5 training photos: photo style, varied poses, expressions and scenes, 256 px."""
    rng = random.Random(seed)
    shots = []
    for scene in ("studio", "beach", "forest", "city", "night"):
        p = toyworld.random_portrait(rng, identity)
        shots.append(toyworld.with_fields(p, scene=scene, style="photo"))
    out.mkdir(parents=True, exist_ok=True)
    for k, p in enumerate(shots, 1):
        toyworld.render(p, 256).save(out / f"{k:02d}.png")
    meta = {"identity": asdict(identity), "description": identity.describe(),
            "photos": [toyworld.to_dict(p) for p in shots]}
    (out / "subject.json").write_text(json.dumps(meta, indent=2))
    return shots


@torch.no_grad()
def report(seed: int, n: int, evaluators: Path, clip: Path) -> dict:
    """Accuracy of every head and CLIP caption ranking (1 true among 10 captions) on fresh renders."""
    ev = load_toy_evaluators(evaluators, clip)
    images, ps = render_set(seed, n)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    labels = _labels(ps)
    pred = ev.predict(x)
    acc = {k: (pred[k] == labels[k]).float().mean().item() for k in labels}
    empty = torch.from_numpy(non_portraits(seed, n)).permute(0, 3, 1, 2).float() / 255
    faces = {"portraits": ev.identity.embed(x)[1].float().mean().item(),
             "non_portraits": ev.identity.embed(empty)[1].float().mean().item()}
    model = CLIPModel.from_pretrained(clip).eval()
    proc = CLIPProcessor.from_pretrained(clip)
    captions = [p.caption() for p in ps]
    img_emb = F.normalize(model.get_image_features(**proc(images=list(images), return_tensors="pt")).pooler_output, dim=-1)
    text = proc(text=captions, padding="max_length", max_length=77, return_tensors="pt")
    txt_emb = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n):
        others = rng.choice(np.delete(np.arange(n), i), 9, replace=False)
        sims = img_emb[i] @ txt_emb[np.concatenate([[i], others])].T
        hits += int(sims.argmax() == 0)
    return {"n_fresh_renders": n, "seed": seed, "accuracy": acc, "face_found": faces,
            "clip_caption_rank1_of_10": hits / n}


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    """``module``'s state dict as safetensors at ``path``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(module.state_dict(), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--attr-steps", type=int, default=1500)
    ap.add_argument("--detector-steps", type=int, default=1200)
    ap.add_argument("--non-portraits", type=int, default=4000, help="negatives for the face detector")
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--evaluators-out", type=Path, default=EVALUATOR_DIR)
    ap.add_argument("--clip-out", type=Path, default=TOY_CLIP_DIR)
    ap.add_argument("--subjects-out", type=Path, default=SUBJECTS_DIR)
    ap.add_argument("--report-renders", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads; 1 is much faster when other jobs share the cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    weights, detector = args.evaluators_out / ATTRIBUTE_FILE, args.evaluators_out / DETECTOR_FILE
    if not weights.exists() or not detector.exists() or not (args.clip_out / "config.json").exists():
        cache = args.work / "eval-images.npy"
        if not cache.exists():
            images, ps = render_set(args.seed, args.images)
            (args.work / "eval-portraits.json").write_text(json.dumps([toyworld.to_dict(p) for p in ps]))
            np.save(args.work / "eval-images.tmp.npy", images)
            os.replace(args.work / "eval-images.tmp.npy", cache)
        images = np.load(cache)
        ps = list(toyworld.portraits(args.seed, args.images, held_out=True))
        print(f"data: {time.time() - t0:.0f} s", flush=True)
    if not weights.exists():
        _save_weights(train_attributes(images, _labels(ps), args.attr_steps, args.seed), weights)
    print(f"attributes: {time.time() - t0:.0f} s", flush=True)
    if not detector.exists():
        negatives = non_portraits(args.seed, args.non_portraits)
        _save_weights(train_detector(images, negatives, args.detector_steps, args.seed), detector)
    print(f"detector: {time.time() - t0:.0f} s", flush=True)
    if not (args.clip_out / "config.json").exists():
        save_clip(train_clip(images, ps, args.clip_steps, args.seed), args.clip_out)
    print(f"clip: {time.time() - t0:.0f} s", flush=True)
    for name, identity in toyworld.SUBJECTS.items():
        render_subject(args.subjects_out / name, SUBJECT_SEEDS[name], identity)
    result = report(2, args.report_renders, args.evaluators_out, args.clip_out) | {"train_seconds": round(time.time() - t0)}
    (args.evaluators_out / "accuracy.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
