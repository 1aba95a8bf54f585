"""Seeded photo augmentation, captions with the subject's token, and the prepared-dataset folder.

A prepared dataset is the diffusers / Hugging Face ``imagefolder`` layout::

    dataset/
      images/0000.png, 0001.png, ...
      metadata.jsonl     one JSON object a line: file_name, caption, source, augmentation

Each kept photo is written once as it is, then ``n_per_image`` times augmented. The folder appears all at
once (written to a temporary folder beside it, then renamed), so a reader never sees half a dataset.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from skimage import transform
from tqdm.auto import tqdm

from nbutils.photos import Photo
from nbutils.runs import latest_run
from nbutils.viz import image_grid

if TYPE_CHECKING:
    from nbutils.metrics import IdentityEmbedder

DEFAULT_TEMPLATES = (
    "a photo of {token} person",
    "a close-up photo of {token} person",
    "a portrait photo of {token} person",
    "a cropped photo of {token} person",
    "a good photo of {token} person",
)
"""Caption templates; ``{token}`` is replaced by the subject's placeholder token (e.g. ``sks``)."""
RUN_NOTEBOOK_01 = "run notebooks/01_dataset.ipynb first (it prepares the subject's photos)"


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to use and how strong they are; randomness comes from the ``rng`` or seed passed in.

    Strengths: ``brightness``/``contrast``/``saturation`` are the largest relative change (0.15 = factors in
    [0.85, 1.15]); ``min_scale`` the smallest fraction of the side a random crop keeps; ``degrees`` the largest
    rotation either way. ``background`` replaces everything outside a feathered head-and-shoulders ellipse
    (which assumes an aligned, centred crop) by a plain or gradient colour.
    """

    hflip: bool = True
    colour_jitter: bool = True
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    scale_crop: bool = True
    min_scale: float = 0.85
    rotation: bool = True
    degrees: float = 8.0
    background: bool = False
    background_style: Literal["plain", "gradient"] = "gradient"
    n_per_image: int = 2

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (a relative change), got {getattr(self, name)}")
        if not 0.3 <= self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in [0.3, 1] (fraction of the side kept), got {self.min_scale}")
        if not 0.0 <= self.degrees <= 45.0:
            raise ValueError(f"degrees must be in [0, 45], got {self.degrees}")
        if self.background_style not in ("plain", "gradient"):
            raise ValueError(f"background_style must be 'plain' or 'gradient', got {self.background_style!r}")
        if not 0 <= self.n_per_image <= 50:
            raise ValueError(f"n_per_image must be in [0, 50] (augmented copies per photo), got {self.n_per_image}")


@dataclass(frozen=True)
class Augmentation:
    """One drawn set of concrete values; the defaults change nothing.

    ``scale`` is the fraction of the side kept, ``shift`` the crop centre's offset as a fraction of the side
    ``(x, y)``, ``angle`` the rotation in degrees (counter-clockwise), ``background`` the top and bottom RGB colour.
    """

    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    background: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def changes(self) -> dict:
        """The fields that differ from no change, JSON-ready (``{}`` for the unaugmented copy)."""
        mine, none = asdict(self), asdict(Augmentation())
        return {name: value for name, value in mine.items() if value != none[name]}


def sample_augmentation(cfg: AugmentConfig, rng: np.random.Generator) -> Augmentation:
    """Draw one augmentation. The same draws are made whatever the toggles, so switching one augmentation
    off leaves the values of the others unchanged for the same seed."""
    flip = bool(rng.random() < 0.5)
    b, c, s = (1.0 + rng.uniform(-1.0, 1.0, 3) * (cfg.brightness, cfg.contrast, cfg.saturation)).tolist()
    scale = float(rng.uniform(cfg.min_scale, 1.0))
    shift = (rng.uniform(-0.5, 0.5, 2) * (1.0 - scale)).tolist()
    angle = float(rng.uniform(-cfg.degrees, cfg.degrees))
    colours = rng.integers(40, 216, (2, 3)).tolist()  # no near-black or near-white backdrops
    top = tuple(colours[0])
    bottom = top if cfg.background_style == "plain" else tuple(colours[1])
    return Augmentation(
        flip=flip and cfg.hflip,
        brightness=b if cfg.colour_jitter else 1.0,
        contrast=c if cfg.colour_jitter else 1.0,
        saturation=s if cfg.colour_jitter else 1.0,
        scale=scale if cfg.scale_crop else 1.0,
        shift=(shift[0], shift[1]) if cfg.scale_crop else (0.0, 0.0),
        angle=angle if cfg.rotation else 0.0,
        background=(top, bottom) if cfg.background else None,  # type: ignore[arg-type]
    )


def subject_mask(size: int) -> Image.Image:
    """``size x size`` mode-"L" mask, 255 on a head-and-shoulders shape centred as ``align_face`` frames it,
    feathered over about 4% of the side. A fixed shape, not a segmentation: hair or hands outside it are lost."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse([0.2 * size, 0.02 * size, 0.8 * size, 0.82 * size], fill=255)  # head
    draw.ellipse([0.0, 0.72 * size, size, 1.5 * size], fill=255)  # shoulders
    return mask.filter(ImageFilter.GaussianBlur(0.04 * size))


def apply_augmentation(img: Image.Image, aug: Augmentation) -> Image.Image:
    """``img`` (RGB) changed by ``aug``, same size: background, then colour, then rotation/crop, then flip."""
    out = img.convert("RGB")
    w, h = out.size
    if aug.background is not None:
        (r0, g0, b0), (r1, g1, b1) = aug.background
        t = np.linspace(0.0, 1.0, h)[:, None, None]
        grad = (1 - t) * np.array([r0, g0, b0]) + t * np.array([r1, g1, b1])
        backdrop = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).round().astype(np.uint8))
        out = Image.composite(out, backdrop, subject_mask(max(w, h)).resize((w, h)))
    out = ImageEnhance.Brightness(out).enhance(aug.brightness)
    out = ImageEnhance.Contrast(out).enhance(aug.contrast)
    out = ImageEnhance.Color(out).enhance(aug.saturation)
    if aug.scale != 1.0 or aug.angle != 0.0 or aug.shift != (0.0, 0.0):
        out = _rotate_crop(out, aug.scale, aug.shift, aug.angle)
    return ImageOps.mirror(out) if aug.flip else out


def _rotate_crop(img: Image.Image, scale: float, shift: tuple[float, float], angle: float) -> Image.Image:
    """Zoom into a ``scale`` fraction of the side around the shifted centre, rotated by ``angle`` degrees;
    pixels from beyond the border are mirrored in."""
    w, h = img.size
    a = np.radians(angle)
    cx, cy = w / 2, h / 2
    cos, sin = scale * np.cos(a), scale * np.sin(a)
    # output (x, y) -> input (x, y), y pointing down: centre + shift + scale * R(angle) (output - centre)
    matrix = np.array([[cos, -sin, cx + shift[0] * w - cos * cx + sin * cy],
                       [sin, cos, cy + shift[1] * h - sin * cx - cos * cy],
                       [0.0, 0.0, 1.0]])
    out = transform.warp(np.asarray(img), transform.AffineTransform(matrix=matrix), output_shape=(h, w), order=3,
                         mode="symmetric", preserve_range=True)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def augment(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """One random augmentation of ``img`` (RGB, size kept), drawn from ``rng``."""
    return apply_augmentation(img, sample_augmentation(cfg, rng))


def preview_grid(images: Sequence[Image.Image], cfg: AugmentConfig, n: int = 4, *, seed: int = 0,
                 row_labels: Sequence[str] | None = None) -> Figure:
    """A grid: one row per image, the original first, then ``n`` augmented variants drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    rows = [[img, *(augment(img, cfg, rng) for _ in range(n))] for img in images]
    return image_grid(rows, row_labels=row_labels, col_labels=["original", *(f"variant {i + 1}" for i in range(n))],
                      title=f"Augmentations (seed {seed})")


TOGGLES = ("hflip", "colour_jitter", "scale_crop", "rotation", "background")
"""The ``AugmentConfig`` switches, one per augmentation."""


def augmentation_identity(images: Sequence[Image.Image], cfg: AugmentConfig, embedder: IdentityEmbedder, *,
                          n: int = 4, seed: int = 0) -> dict[str, dict[str, float]]:
    """Does each augmentation keep *who* it is? For every augmentation alone (at ``cfg``'s strengths) and for
    ``cfg`` as it is (``"as configured"``): ``n`` copies of each image, and the cosine of each copy's identity
    embedding to its own image's (0 where the embedder finds no face in the copy).

    Returns ``{name: {"mean", "min"}}`` over the ``len(images) * n`` copies.
    """
    ref, _ = embedder.embed(images)
    configs = {name: replace(cfg, **{t: t == name for t in TOGGLES}) for name in TOGGLES}
    out = {}
    for name, trial in (configs | {"as configured": cfg}).items():
        rng = np.random.default_rng(seed)
        copies = [augment(img, trial, rng) for img in images for _ in range(n)]
        emb, found = embedder.embed(copies)
        cos = torch.where(found, (emb * ref.repeat_interleave(n, dim=0)).sum(-1), 0.0)
        out[name] = {"mean": cos.mean().item(), "min": cos.min().item()}
    return out


def _check_token_and_templates(token: str, templates: Sequence[str]) -> None:
    if not token or any(ch.isspace() for ch in token) or "{" in token:
        raise ValueError(f"token must be one word without spaces or braces (e.g. 'sks'), got {token!r}")
    if not templates:
        raise ValueError("give at least one caption template, e.g. 'a photo of {token} person'")
    bad = [t for t in templates if "{token}" not in t]
    if bad:
        raise ValueError(f"every caption template needs '{{token}}' where the subject goes; these lack it: {bad}")


def caption_for(photo: Photo, token: str, templates: Sequence[str], index: int) -> str:
    """The caption of the ``index``-th prepared image of ``photo``.

    The photo's own caption file text wins when it exists (it must contain ``{token}``); otherwise the
    templates are used in turn. ``{token}`` is replaced by ``token``.
    """
    _check_token_and_templates(token, templates)
    if photo.caption is not None:
        if "{token}" not in photo.caption:
            raise ValueError(f"the caption file of {photo.source.name} ({photo.source.with_suffix('.txt').name}) says "
                             f"{photo.caption!r} without '{{token}}': write where you are in it, e.g. "
                             "'a photo of {token} person smiling on a beach'")
        return photo.caption.replace("{token}", token)
    return templates[index % len(templates)].replace("{token}", token)


def dataset_captions(images: Sequence[Photo], token: str, templates: Sequence[str], n_per_image: int) -> list[str]:
    """The caption of every image ``write_prepared_dataset`` writes, in its order (``1 + n_per_image`` per photo)."""
    per_photo = 1 + n_per_image
    return [caption_for(p, token, templates, i * per_photo + k) for i, p in enumerate(images) for k in range(per_photo)]


def write_prepared_dataset(images: Sequence[Photo], out_dir: str | Path, token: str, templates: Sequence[str],
                           cfg: AugmentConfig, seed: int) -> Path:
    """Write each photo once unchanged and ``cfg.n_per_image`` times augmented (seeded) into ``out_dir``.

    ``out_dir`` must not exist yet; it appears complete or not at all. Returns ``out_dir``. Images are saved
    as PNG at their given size; ``metadata.jsonl`` records file_name, caption, source file name and the
    augmentation applied (``{}`` for the unchanged copy).
    """
    out_dir = Path(out_dir)
    if not images:
        raise ValueError(f"no images to write: {RUN_NOTEBOOK_01} and check that it kept at least one photo")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; a prepared dataset is written once into a new folder")
    captions = dataset_captions(images, token, templates, cfg.n_per_image)
    rng = np.random.default_rng(seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        rows = []
        for photo in tqdm(images, desc="writing dataset", unit="photo"):
            for k in range(1 + cfg.n_per_image):
                aug = Augmentation() if k == 0 else sample_augmentation(cfg, rng)
                name = f"images/{len(rows):04d}.png"
                apply_augmentation(photo.image, aug).save(tmp / name)
                rows.append({"file_name": name, "caption": captions[len(rows)], "source": photo.source.name,
                             "augmentation": aug.changes()})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_prepared_dataset(path: str | Path) -> list[tuple[Image.Image, str]]:
    """``(RGB image, caption)`` pairs of a prepared dataset folder, in file order."""
    path = Path(path)
    meta = path / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"no prepared dataset at {path} (no metadata.jsonl): {RUN_NOTEBOOK_01}")
    rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"the prepared dataset at {path} is empty: {RUN_NOTEBOOK_01}")
    pairs = []
    for row in rows:
        file = (path / row["file_name"]).resolve()
        if path.resolve() not in file.parents or not file.is_file():
            raise FileNotFoundError(f"{meta} lists {row['file_name']!r}, which is not a file inside {path}: "
                                    f"{RUN_NOTEBOOK_01}")
        with Image.open(file) as img:
            pairs.append((img.convert("RGB"), row["caption"]))
    return pairs


def find_prepared_dataset(out_dir: str | Path = "runs") -> Path:
    """The dataset folder of the latest run of notebook 01 under ``out_dir``."""
    run = latest_run("01_dataset", out_dir)
    if run is None:
        raise FileNotFoundError(f"no run of notebook 01 in {out_dir}: {RUN_NOTEBOOK_01}")
    return run.artifact_path("dataset")
