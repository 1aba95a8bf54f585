"""Load and check the student's photos: decode, orient, convert to RGB, size-check and de-duplicate.

The input folder is only ever read (each file is read into memory as bytes, then decoded), never written.
Every photo that cannot be used is kept in the report with a reason that says what to do about it.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from nbutils.runs import REPO_ROOT

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
"""File types read as photos (compared case-insensitively)."""
DEFAULT_MAX_PIXELS = 2048 * 2048
"""Working size: larger photos are downsized to at most this many pixels as soon as they are read."""
PUT_PHOTOS_HINT = (
    "put 3-20 photos of yourself (jpg/png/webp, at least {min_side} px on the shorter side, "
    "one person per photo) in data/me/ and run this notebook again"
)
TOY_SUBJECT_DIR = REPO_ROOT / "data" / "subjects" / "toy"
"""The drawn toy-world subject (5 PNGs) that the toy and tiny tiers use when the student has no photos."""
TOY_SUBJECTS_DIR = TOY_SUBJECT_DIR.parent
"""Every drawn toy-world subject: ``toy`` and the validation subject ``toy-val`` (``toyworld.SUBJECTS``)."""
_HASH_SIDE = 16
_NEAR_HASH_BITS = 18  # dHash bits (of 256) two near-duplicates may differ in (a resized JPEG copy: ~12)
_NEAR_MEAN_DIFF = 8.0  # and mean absolute difference of their 16x16 RGB thumbnails, in 0-255 levels


@dataclass(frozen=True)
class Photo:
    """One usable photo.

    ``image`` is RGB, 8 bit, upright, at most ``max_pixels`` pixels. ``source`` is the file it came from and
    ``caption`` the text of its optional ``<photo>.txt`` caption file (``None`` when there is none).
    """

    image: Image.Image
    source: Path
    caption: str | None = None


@dataclass(frozen=True)
class Rejected:
    """A file that is not used, and why (the reason says what to do)."""

    source: Path
    reason: str


@dataclass
class PhotoReport:
    """What ``load_photos`` kept, the photos it rejected, and the other files it skipped, in file-name order."""

    kept: list[Photo] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: list[Rejected] = field(default_factory=list)

    def table(self) -> list[dict[str, str]]:
        """One row per file: ``{"file", "status", "size", "reason"}``, for display."""
        rows = [{"file": p.source.name, "status": "kept", "size": "x".join(map(str, p.image.size)), "reason": ""}
                for p in self.kept]
        rows += [{"file": r.source.name, "status": status, "size": "", "reason": r.reason}
                 for status, entries in (("rejected", self.rejected), ("skipped", self.skipped)) for r in entries]
        return sorted(rows, key=lambda r: r["file"].lower())


def is_photo_file(path: Path) -> bool:
    """True for a visible file with a photo suffix (``.jpg``, ``.JPEG``, ``.png``, ``.webp``, ...)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in PHOTO_SUFFIXES


def subject_folder(subject_dir: str | Path, tier: str, *, root: Path = REPO_ROOT) -> Path | None:
    """The folder of subject photos to use; ``None`` means the built-in demo photo (real tier, no own photos).

    ``subject_dir="auto"`` picks ``root/data/me`` when it holds any photo, else ``root/data/subjects/toy`` on
    the ``"toy"`` and ``"tiny"`` tiers and ``None`` on the ``"real"`` tier. Any other value is a folder, taken
    relative to ``root`` unless absolute.
    """
    if subject_dir != "auto":
        path = Path(subject_dir).expanduser()
        return path if path.is_absolute() else root / path
    me = root / "data" / "me"
    if me.is_dir() and any(is_photo_file(p) for p in me.iterdir()):
        return me
    if tier in ("toy", "tiny"):
        return root / TOY_SUBJECT_DIR.relative_to(REPO_ROOT)
    if tier == "real":
        return None
    raise ValueError(f"unknown model tier {tier!r}; expected 'real', 'toy' or 'tiny'")


def is_drawn_subject(folder: Path | None) -> bool:
    """Whether ``folder`` holds one of the drawn toy-world subjects (``data/subjects/<name>``), not photos: a face
    detector finds no face in them, and their star mark is one-sided (a mirror image moves it to the other cheek)."""
    return folder is not None and folder.resolve().parent == TOY_SUBJECTS_DIR.resolve()


def toy_tier_note(folder: Path | None, tier: str) -> str | None:
    """What to say before training on real photos with a CPU model: on the ``"toy"`` and ``"tiny"`` tiers, for a
    folder that is not a drawn toy subject (``is_drawn_subject``), a plain warning that the model draws cartoons and
    cannot learn a real face, with the two ways on; ``None`` otherwise (the drawn subjects, the real tier)."""
    if tier not in ("toy", "tiny") or folder is None or is_drawn_subject(folder):
        return None
    return (f"{folder} holds real photos, but the {tier} model draws 64 px cartoons of its toy world and cannot "
            "learn a real face: training on them would run, yet its pictures would not look like you. "
            "Two ways on: (1) the demo subject that this model can learn: SUBJECT_DIR / PHOTOS = "
            "'data/subjects/toy' (or move data/me away), or (2) Stable Diffusion 1.5 on a GPU: MODEL='sd15' on a "
            "CUDA machine, or open the notebook in Colab with its badge and choose a GPU runtime.")


def load_photos(folder: str | Path, *, min_side: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> PhotoReport:
    """Read every photo in ``folder`` (not its subfolders) and check it; the folder is never modified.

    Files are taken in case-insensitive name order. Photo files that fail a check are ``rejected``; other files
    and folders are ``skipped``, with a reason each. A ``<photo>.txt`` next to a photo is its caption (neither);
    hidden files (``.DS_Store``) are ignored. Raises ``FileNotFoundError`` for a missing folder
    and ``ValueError`` when no photo is usable.
    """
    folder = Path(folder)
    if not folder.exists():
        hint = PUT_PHOTOS_HINT.format(min_side=min_side)
        raise FileNotFoundError(f"photo folder {folder} does not exist: create it, then {hint}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: {PUT_PHOTOS_HINT.format(min_side=min_side)}")
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name.lower())
    photo_stems = {p.stem for p in entries if is_photo_file(p)}
    decoded: list[tuple[Path, Image.Image | None, str | None, str]] = []
    skipped = []
    for path in entries:
        if path.suffix.lower() == ".txt" and path.stem in photo_stems:
            continue  # a caption file, read with its photo
        if path.is_dir():
            skipped.append(Rejected(path, f"a folder, not a photo: put the photos directly in {folder}"))
        elif path.suffix.lower() not in PHOTO_SUFFIXES:
            kind = path.suffix or "no extension"
            skipped.append(Rejected(path, f"not a photo ({kind}): only jpg, jpeg, png and webp files are read"))
        else:
            image, reason = read_photo(path, min_side=min_side, max_pixels=max_pixels)
            decoded.append((path, image, _read_caption(path), reason))
    report = _check(decoded)
    report.skipped = skipped
    if not report.kept:
        _raise_nothing_usable(str(folder), report, min_side)
    return report


def photos_from_images(images: Sequence[Image.Image], names: Sequence[str], *, min_side: int = 256,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> PhotoReport:
    """The same checks as ``load_photos`` for in-memory images (e.g. the demo subject); ``names`` label them."""
    if len(images) != len(names):
        raise ValueError(f"got {len(images)} images but {len(names)} names; give one name per image")
    decoded = []
    for image, name in zip(images, names):
        checked, reason = _prepare(image, min_side, max_pixels)
        decoded.append((Path(name), checked, None, reason))
    report = _check(decoded)
    if not report.kept:
        _raise_nothing_usable("the given images", report, min_side)
    return report


def read_photo(path: Path, *, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image | None, str]:
    """One image file through ``load_photos``'s checks, the file only read: ``(image, "")`` with ``image`` upright
    8-bit RGB of at most ``max_pixels`` pixels, or ``(None, reason)`` where the reason says what to do."""
    return _decode(Path(path).read_bytes(), min_side, max_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16-bit grey scaled (65535 -> 255)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(data: bytes, min_side: int, max_pixels: int) -> tuple[Image.Image | None, str]:
    """Decode photo bytes fully (a truncated file is an error), downsizing JPEGs while decoding."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; set it back to False so broken photos "
                           "are caught")
    try:
        img = Image.open(io.BytesIO(data))
        if min(img.size) >= min_side and img.width * img.height > max_pixels:
            k = math.sqrt(max_pixels / (img.width * img.height))
            img.draft(None, (int(img.width * k), int(img.height * k)))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
        img.load()
    except Image.DecompressionBombError as err:
        return None, f"too many pixels to open safely ({err}): resize it below 20,000 x 20,000 px"
    except (OSError, SyntaxError, ValueError) as err:
        return None, f"cannot be read as an image ({err}): re-export it as jpg or png"
    return _prepare(img, min_side, max_pixels)


def _prepare(img: Image.Image, min_side: int, max_pixels: int) -> tuple[Image.Image | None, str]:
    """Upright 8-bit RGB at most ``max_pixels`` pixels, or ``None`` and the reason it is too small."""
    img = ImageOps.exif_transpose(img)
    if min(img.size) < min_side:
        w, h = img.size
        return None, f"too small ({w}x{h} px): use photos at least {min_side} px on the shorter side"
    img = to_rgb(img)
    if img.width * img.height > max_pixels:
        k = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * k)), max(1, int(img.height * k))), Image.Resampling.LANCZOS)
    return img, ""


def _read_caption(photo: Path) -> str | None:
    caption_file = photo.with_suffix(".txt")
    return caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None


def _fingerprint(img: Image.Image) -> tuple[str, np.ndarray, np.ndarray]:
    """(sha256 of the pixels, 256-bit difference hash, 16x16 RGB thumbnail as float32)."""
    thumb = np.asarray(img.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX), dtype=np.float32)
    grey = np.asarray(img.convert("L").resize((_HASH_SIDE + 1, _HASH_SIDE), Image.Resampling.BOX), dtype=np.int16)
    return hashlib.sha256(img.tobytes()).hexdigest(), (grey[:, 1:] > grey[:, :-1]).ravel(), thumb


def _check(decoded: list[tuple[Path, Image.Image | None, str | None, str]]) -> PhotoReport:
    """Split decoded photos into kept and rejected; of duplicates, the first one (in order) is kept."""
    report = PhotoReport()
    seen: list[tuple[Path, tuple[str, np.ndarray, np.ndarray]]] = []
    for path, image, caption, reason in decoded:
        if image is None:
            report.rejected.append(Rejected(path, reason))
            continue
        fp = _fingerprint(image)
        twin = next((src for src, other in seen if _same_picture(fp, other)), None)
        if twin is not None:
            report.rejected.append(Rejected(path, f"duplicate of {twin.name}: keep one copy of each photo"))
            continue
        seen.append((path, fp))
        report.kept.append(Photo(image, path, caption))
    return report


def _same_picture(a: tuple[str, np.ndarray, np.ndarray], b: tuple[str, np.ndarray, np.ndarray]) -> bool:
    if a[0] == b[0]:
        return True
    bits_apart = int(np.count_nonzero(a[1] != b[1]))
    return bits_apart <= _NEAR_HASH_BITS and float(np.abs(a[2] - b[2]).mean()) <= _NEAR_MEAN_DIFF


def _raise_nothing_usable(where: str, report: PhotoReport, min_side: int) -> None:
    unusable = sorted(report.rejected + report.skipped, key=lambda r: r.source.name.lower())
    problems = "".join(f"\n  {r.source.name}: {r.reason}" for r in unusable)
    found = f"{where} has no photos"
    if unusable:
        found = f"none of the {len(unusable)} files in {where} is usable:{problems}"
    raise ValueError(f"{found}\nWhat to do: {PUT_PHOTOS_HINT.format(min_side=min_side)}")
