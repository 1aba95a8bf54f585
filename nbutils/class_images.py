"""The class-image cache of DreamBooth's prior preservation: images of the class prompt drawn once by the base model.

- ``ensure_class_images`` generates the class images once per (model, prompt, resolution, seed, steps, guidance)
  into a cache folder with a ``manifest.json`` and reuses them afterwards; ``class_latents`` caches their VAE
  latents next to them.
- ``class_image_count``: how many class images each model tier uses.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from nbutils.models import TINY_MODEL_DIR
from nbutils.prompts import CLASS_PROMPT
from nbutils.runs import atomic_write, atomic_write_json
from nbutils.sampling import generate
from nbutils.train import encode_latents
from nbutils.viz import png_bytes

# The project's cache folder ($PORTRAIT_STUDIO_CACHE, default ~/.cache/portrait-studio), as for the tiny model.
CLASS_CACHE = TINY_MODEL_DIR.parent / "class-images"
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLASS_IMAGE_COUNT = {"real": 200, "toy": 64, "tiny": 4}


@dataclass(frozen=True)
class ClassImageKey:
    """What the class images depend on; its hash names their cache folder.

    ``model``: the model reference, with a local folder's weight files' sizes and times appended (a retrained
    model gets new class images); ``resolution``: image side in pixels; ``steps`` and ``guidance_scale``: sampling.
    """

    model: str
    prompt: str
    resolution: int
    seed: int
    steps: int
    guidance_scale: float

    def folder_name(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ClassImages:
    """Class images for prior preservation: ``images`` (RGB PIL) read from ``folder``, their file names ``files``,
    all drawn for ``prompt``. ``fingerprint``: sha256 of the file names and bytes (it keys the latent cache)."""

    folder: Path
    prompt: str
    files: list[str]
    images: list[Image.Image]
    fingerprint: str


def model_identity(model: str) -> str:
    """``model`` itself for a hub id; for a local folder its absolute path plus a hash of its ``*.safetensors``
    files' relative paths, sizes and modification times, so a retrained model in the same folder differs."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    files = sorted(folder.rglob("*.safetensors"))
    stamp = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{folder.resolve()}@{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]}"


def image_seed(seed: int, index: int) -> int:
    """The sampling seed of class image ``index`` in the cache for ``seed`` (independent streams per index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _read_image(path: Path) -> tuple[Image.Image, bytes]:
    """An image file as RGB PIL plus its bytes; ``OSError``/``SyntaxError``/``ValueError`` if it is corrupt."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB"), data


def ensure_class_images(
    pipe: StableDiffusionPipeline,
    n: int,
    *,
    steps: int,
    guidance_scale: float,
    prompt: str = CLASS_PROMPT,
    seed: int = 0,
    resolution: int | None = None,
    model: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
) -> ClassImages:
    """``n`` class images of ``prompt`` drawn by ``pipe``, generated once and cached; call it *before* training.

    The cache folder is ``cache_dir/<hash of ClassImageKey>/`` (default ``CLASS_CACHE``) with ``manifest.json``
    (the key, and the seed of every generated file; image ``i`` is ``{i:05d}.png`` from ``image_seed(seed, i)``).
    Every image file in the folder counts, so photos of other people may be added by hand; the first ``n`` by name
    are used. Only what is missing is generated: a later call with the same key and ``n`` generates nothing, a
    larger ``n`` generates the rest. Bad files:

    - a generated file that became unreadable is generated again (same seed, same image);
    - any other unreadable file is skipped, with a warning that names it (it is never modified or deleted);
    - an image of another size is used, centre-cropped and resized when encoded, with a warning that names it.

    ``resolution`` defaults to the pipeline's native size; ``model`` (the reference ``pipe`` was loaded from, part
    of the key) defaults to ``pipe.name_or_path``. Files are written atomically, and the manifest after each batch
    of ``batch_size`` images, so an interrupted call keeps what it finished.
    """
    if n < 1:
        raise ValueError(f"n (the number of class images) must be at least 1, got {n}.")
    model = model or pipe.name_or_path
    if not model:
        raise ValueError("This pipeline does not say which model it is (it was built in code): pass model='<name>'.")
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    key = ClassImageKey(model_identity(str(model)), prompt, int(resolution), int(seed), int(steps),
                        float(guidance_scale))
    folder = Path(cache_dir or CLASS_CACHE).expanduser() / key.folder_name()
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    generated: dict[str, int] = manifest.get("images", {})
    next_index = manifest.get("next_index", 0)

    loaded: dict[str, tuple[Image.Image, bytes]] = {}
    redo, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            loaded[path.name] = _read_image(path)
        except (OSError, SyntaxError, ValueError):
            (redo if path.name in generated else skipped).append(path.name)
    generated = {name: s for name, s in generated.items() if name in loaded or name in redo}  # deleted: dropped
    if skipped:
        warnings.warn(f"Skipped {len(skipped)} unreadable class image(s) in {folder}: {skipped}. "
                      "Delete or replace them; the missing ones are generated.", stacklevel=2)
    todo = [(name, generated[name]) for name in redo]
    for _ in range(max(0, n - len(loaded) - len(redo))):
        todo.append((f"{next_index:05d}.png", image_seed(seed, next_index)))
        next_index += 1

    chunks = range(0, len(todo), batch_size)
    for start in tqdm(chunks, desc="class images", disable=len(chunks) < 2):
        chunk = todo[start : start + batch_size]
        images = generate(pipe, prompt, [s for _, s in chunk], steps=steps, guidance_scale=guidance_scale,
                          batch_size=batch_size, height=resolution, width=resolution, progress=False)
        for (name, s), image in zip(chunk, images):
            data = png_bytes(image)
            atomic_write(folder / name, data)
            loaded[name] = (image.convert("RGB"), data)
            generated[name] = s
        done = max([manifest.get("next_index", 0)] + [int(Path(name).stem) + 1 for name in generated])
        atomic_write_json(manifest_path, {"key": asdict(key), "next_index": done, "images": generated})

    files = sorted(loaded)[:n]
    odd = [name for name in files if loaded[name][0].size != (resolution, resolution)]
    if odd:
        warnings.warn(f"{len(odd)} class image(s) in {folder} are not {resolution}x{resolution} px: {odd}. "
                      "They are centre-cropped and resized for training.", stacklevel=2)
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(loaded[name][1]).digest())
    return ClassImages(folder, prompt, files, [loaded[name][0] for name in files], digest.hexdigest())


def class_latents(pipe: StableDiffusionPipeline, class_images: ClassImages, resolution: int) -> torch.Tensor:
    """Scaled VAE latents of the class images, (N, 4, resolution/f, resolution/f) float32 on ``pipe.device``.

    Cached in ``latents-<resolution>.safetensors`` in the class-image folder (the latents of that folder's model);
    recomputed when the images changed (their ``fingerprint`` differs) or the file is unreadable.
    """
    path = class_images.folder / f"latents-{resolution}.safetensors"
    if path.is_file():
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == class_images.fingerprint:
                    return f.get_tensor("latents").to(pipe.device)
        except (OSError, SafetensorError):
            pass  # a damaged cache file: encode again and replace it
    # contiguous like the tensor read from the cache: another memory layout changes the UNet's rounding, and a
    # resumed run (which reads the cache) would then drift from the run that encoded the latents
    latents = encode_latents(pipe, class_images.images, resolution).contiguous()
    meta = {"fingerprint": class_images.fingerprint, "files": json.dumps(class_images.files)}
    atomic_write(path, save({"latents": latents.cpu().contiguous()}, metadata=meta))
    return latents


def class_image_count(tier: str, quick: bool = False) -> int:
    """Class images per tier (real: 200, the paper's order of magnitude; toy: 64; tiny: 4); ``quick``: a quarter
    (at least 2)."""
    if tier not in CLASS_IMAGE_COUNT:
        raise ValueError(f"Unknown model tier {tier!r}: use 'real', 'toy' or 'tiny' (see model_tier).")
    n = CLASS_IMAGE_COUNT[tier]
    return max(2, n // 4) if quick else n
