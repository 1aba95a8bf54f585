"""DreamBooth (Ruiz et al. 2022): fine-tune the whole UNet on the subject's photos, with prior preservation.

The captions name the subject with a rare word, the *identifier* (``"a photo of sks person"``; notebook 01's
captions already hold ``sks``). Fine-tuning every UNet weight on a handful of photos learns the subject quickly, but
the model also forgets its class: soon every "person" looks like the subject (*language drift*), and the photos'
own backgrounds and poses come back whatever the prompt asks (*overfitting to the training context*). Prior
preservation counters the drift: the *base* model first draws images of the class prompt ("a photo of a person"),
and every step adds their denoising loss,

    loss = mse(instance batch) + prior_loss_weight * mse(class batch),

so the model keeps drawing the class as it did before. The paper uses ``prior_loss_weight = 1``.

- ``ensure_class_images`` generates the class images once per (model, prompt, resolution, seed, steps, guidance)
  into a cache folder with a ``manifest.json`` and reuses them afterwards; ``class_latents`` caches their VAE
  latents next to them.
- ``DreamBooth`` is the method for ``nbutils.train``: it trains the UNet (and optionally the text encoder) in
  float32; its class batches come from ``make_batch`` with a seed derived from the run's, so resuming is exact.
- ``save_pipeline`` writes the result as a diffusers pipeline folder, atomically.
- ``language_drift`` and ``nearest_training_similarity`` measure the two failure modes above.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from nbutils.models import TINY_MODEL_DIR
from nbutils.runs import atomic_write, atomic_write_json
from nbutils.sampling import generate
from nbutils.text import encode_captions
from nbutils.train import Batch, Method, TrainConfig, config_for_tier, diffusion_loss, encode_latents, make_batch
from nbutils.viz import png_bytes

if TYPE_CHECKING:  # the metrics stack (torchmetrics, dlib, CLIP) is imported where it is used: ~1 s, +44 MiB
    from nbutils.metrics import IdentityEmbedder

CLASS_PROMPT = "a photo of a person"
# The project's cache folder ($PORTRAIT_STUDIO_CACHE, default ~/.cache/portrait-studio), as for the tiny model.
CLASS_CACHE = TINY_MODEL_DIR.parent / "class-images"
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
WEIGHTS_NAME = "dreambooth.safetensors"
CLASS_STREAM = 2  # seeds the class-batch stream apart from the instance batches' (see class_batch_config)

OptimizerChoice = Literal["adamw", "adamw8bit", "adamw8bit-if-available"]
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) has kernels (of the devices used here)


# --------------------------------------------------------------------------------------------------- class images
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


# --------------------------------------------------------------------------------------------------- the method
def adamw_class(choice: OptimizerChoice) -> type[torch.optim.Optimizer]:
    """``torch.optim.AdamW`` or bitsandbytes' ``AdamW8bit`` (moments in 8 bits: on SD1.5's UNet about 1.7 GB
    instead of 6.9 GB).

    ``"adamw8bit"`` raises ``ImportError`` with the fix if bitsandbytes cannot be imported;
    ``"adamw8bit-if-available"`` then falls back to AdamW with a warning.
    """
    if choice not in ("adamw", "adamw8bit", "adamw8bit-if-available"):
        raise ValueError(f"optimizer must be 'adamw', 'adamw8bit' or 'adamw8bit-if-available', not {choice!r}.")
    if choice == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except (ImportError, RuntimeError) as err:
        if choice == "adamw8bit":
            raise ImportError(
                f"8-bit Adam needs bitsandbytes, which cannot be imported here ({err}). Install it on a CUDA machine "
                "(pip install bitsandbytes), or pass optimizer='adamw8bit-if-available' to fall back to AdamW, "
                "or optimizer='adamw'."
            ) from err
        warnings.warn(f"bitsandbytes cannot be imported ({err}): training with torch AdamW instead of 8-bit Adam.",
                      stacklevel=3)
        return torch.optim.AdamW
    return bitsandbytes.optim.AdamW8bit


def make_adamw(optimizer_class: type[torch.optim.Optimizer], param_groups: list[dict], lr: float,
               weight_decay: float) -> torch.optim.Optimizer:
    """``optimizer_class(param_groups, lr=lr, weight_decay=weight_decay)``; torch's AdamW with its fused kernel
    (``fused=True``) when every parameter is on the CPU or a CUDA GPU: one kernel per step instead of one per tensor
    and operation (the toy UNet's 326 tensors: 4 ms instead of 18 ms a step on one CPU thread), the same update up
    to float rounding."""
    fused = optimizer_class is torch.optim.AdamW and all(
        p.device.type in FUSED_ADAMW_DEVICES for group in param_groups for p in group["params"])
    return optimizer_class(param_groups, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def class_batch_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the seed of the class-image stream: class batches are ``make_batch(class latents, ...,
    class_batch_config(cfg), step, micro, T)``, a pure function of the run's seed, the step and the micro-batch,
    with noise and order independent of the instance batches'."""
    return replace(cfg, seed=int(np.random.SeedSequence([cfg.seed, CLASS_STREAM]).generate_state(1)[0]))


class DreamBooth(Method):
    """DreamBooth as a ``nbutils.train`` method: every UNet weight trains (and the text encoder's, with
    ``train_text_encoder``), with prior preservation on ``class_images`` weighted by ``prior_loss_weight``.

    ``identifier``: the word the captions name the subject with; a caption without it raises ``ValueError``.
    ``prior_loss_weight=0`` is plain fine-tuning (no class images needed). The trained modules must be float32
    (load with ``load_pipeline(MODEL, dtype=torch.float32)``); on CUDA the loop's autocast computes in bf16/fp16.
    ``gradient_checkpointing`` recomputes the UNet blocks' activations in the backward pass (less memory, one
    more forward pass per step).
    ``optimizer``: see ``adamw_class``. Checkpoints hold the trained weights (``unet.*``, ``text_encoder.*``):
    about 4 bytes per parameter, 13 MB on the toy model, 3.4 GB on SD1.5 (plus twice that for AdamW's moments).
    """

    name = "dreambooth"
    weights_name = WEIGHTS_NAME

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        class_images: ClassImages | None = None,
        *,
        identifier: str = "sks",
        prior_loss_weight: float = 1.0,
        train_text_encoder: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerChoice = "adamw",
    ):
        super().__init__(pipe)
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be 0 or more, got {prior_loss_weight}.")
        if prior_loss_weight > 0 and (class_images is None or not class_images.images):
            raise ValueError("Prior preservation needs class images: pass class_images=ensure_class_images(pipe, ...) "
                             "(before training), or prior_loss_weight=0 for plain fine-tuning.")
        self.class_images = class_images
        self.identifier = identifier
        self._identifier = re.compile(rf"(?<![\w<]){re.escape(identifier)}(?![\w>])")
        self.prior_loss_weight = float(prior_loss_weight)
        self.optimizer_class = adamw_class(optimizer)
        self.trained = {"unet": pipe.unet} | ({"text_encoder": pipe.text_encoder} if train_text_encoder else {})
        for part, module in self.trained.items():
            dtypes = {p.dtype for p in module.parameters()}
            if dtypes != {torch.float32}:
                raise ValueError(
                    f"DreamBooth trains the {part}'s weights, which are {sorted(map(str, dtypes))}: they must be "
                    "float32 (small updates vanish in 16 bits). Load with load_pipeline(MODEL, dtype=torch.float32); "
                    "on a GPU the training loop's autocast still computes in bf16/fp16."
                )
            module.requires_grad_(True)
        if gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                pipe.text_encoder.gradient_checkpointing_enable()
        self._cache: dict[str, torch.Tensor] | None = None if train_text_encoder else {}
        self.class_latents: torch.Tensor | None = None
        self.class_cfg: TrainConfig | None = None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained.values() for p in module.parameters()]

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        """Optimizer parameter groups; one group at ``cfg.lr`` here (``nbutils.combos`` adds the token's)."""
        return [{"params": self.trainable_parameters()}]

    def make_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        return make_adamw(self.optimizer_class, self.param_groups(cfg), cfg.lr, cfg.weight_decay)

    def prepare(self, cfg: TrainConfig) -> None:
        """Encode (or load the cached) class latents at ``cfg.resolution`` and fix the class-batch seed."""
        if self.prior_loss_weight > 0:
            self.class_latents = class_latents(self.pipe, self.class_images, cfg.resolution)
            self.class_cfg = class_batch_config(cfg)

    def check_captions(self, captions: Sequence[str]) -> None:
        """``ValueError`` naming the first caption without the identifier (as a whole word)."""
        for caption in captions:
            if not self._identifier.search(caption):
                raise ValueError(
                    f"The caption {caption!r} does not name the subject with {self.identifier!r}: prepare the "
                    "dataset with notebook 01 (its captions hold 'sks'), or pass identifier=<your captions' word>."
                )

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D): the text encoder's last hidden state, as the pipeline computes it at inference (each
        distinct caption encoded once and cached while the text encoder is frozen)."""
        return encode_captions(self.pipe, captions, self._cache)

    def class_batch(self, batch: Batch) -> Batch:
        """The class micro-batch that goes with instance ``batch``: as many class latents, the class prompt."""
        if self.class_latents is None:
            raise RuntimeError("No class latents: call prepare(cfg) first (train does).")
        captions = [self.class_images.prompt] * len(self.class_latents)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        return make_batch(self.class_latents, captions, self.class_cfg, batch.step, batch.micro, num_timesteps)

    def instance_loss(self, batch: Batch) -> torch.Tensor:
        """The denoising loss on the subject's photos (float32 scalar)."""
        self.check_captions(batch.captions)
        return diffusion_loss(self.pipe.unet, self.noise_scheduler, batch, self.encode_prompts(batch.captions))

    def loss(self, batch: Batch) -> torch.Tensor:
        """``instance_loss(batch) + prior_loss_weight * (denoising loss on class_batch(batch))``; the class prompt
        holds no subject word, so the plain text encoder encodes it (also when a subclass encodes captions
        otherwise).

        With prior preservation the UNet runs once, on the instance and class batches concatenated (2B samples:
        about 25 % cheaper than two calls of B on the toy model, as diffusers' train_dreambooth does), and each
        half's squared errors are averaged on their own; equal to the two-call sum up to float rounding.
        """
        if self.prior_loss_weight == 0:
            return self.instance_loss(batch)
        self.check_captions(batch.captions)
        prior = self.class_batch(batch)
        both = Batch(torch.cat([batch.latents, prior.latents]), batch.captions + prior.captions,
                     torch.cat([batch.noise, prior.noise]), torch.cat([batch.timesteps, prior.timesteps]),
                     batch.step, batch.micro)
        cond = torch.cat([self.encode_prompts(batch.captions), encode_captions(self.pipe, prior.captions, self._cache)])
        errors = diffusion_loss(self.pipe.unet, self.noise_scheduler, both, cond, reduction="none")
        n = len(batch.captions)
        return errors[:n].mean() + self.prior_loss_weight * errors[n:].mean()

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """``{"unet.<name>": tensor, ...}`` (and ``"text_encoder.<name>"`` when it trains)."""
        return {f"{part}.{k}": v for part, module in self.trained.items() for k, v in module.state_dict().items()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        for part, module in self.trained.items():
            weights = {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
            if not weights:
                held = sorted({k.split(".")[0] for k in state})
                raise ValueError(f"The checkpoint holds no {part} weights (it holds {held}): build the method with "
                                 "the options it was trained with (train_text_encoder).")
            module.load_state_dict(weights)


# --------------------------------------------------------------------------------------------------- saving
def write_folder(folder: str | Path, write: Callable[[Path], None], size_bytes: int, *, replace: bool = False) -> Path:
    """Create ``folder`` by calling ``write(tmp)`` on a temporary sibling folder that is renamed to ``folder`` once
    ``write`` returns, so ``folder`` is either complete or absent. Returns ``folder``.

    On an ``OSError`` (a full disk) the temporary folder is removed and the error re-raised, same ``errno``, with
    the space needed (``size_bytes``, an estimate). ``FileExistsError`` if ``folder`` exists, unless ``replace``:
    then the old folder is swapped out only once the new one is complete, and removed (a resumed or re-run
    notebook rewrites its own run's artifact this way).
    """
    folder = Path(folder)
    if folder.exists() and not replace:
        raise FileExistsError(f"{folder} already exists: save into a new folder (e.g. a new run's artifacts).")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = folder.parent / f".{folder.name}.replaced"
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a saved model is an ordinary readable folder
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if old.exists():
                os.rename(old, folder)  # the old folder stays whole when the swap fails
            raise
    except OSError as err:
        cause = "the disk is full" if err.errno == errno.ENOSPC else f"{type(err).__name__}: {err}"
        raise OSError(err.errno, f"Saving to {folder} failed ({cause}); nothing was left there. It needs about "
                                 f"{size_bytes / 1e9:.2f} GB: free space or pick another folder.") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | Path, *, replace: bool = False) -> Path:
    """Save ``pipe`` as a diffusers pipeline folder (safetensors) that ``StableDiffusionPipeline.from_pretrained``
    and ``load_pipeline`` read, atomically (``write_folder``; ``replace``: swap out an existing folder once the
    new one is complete). Returns ``folder``."""
    size = sum(p.numel() * p.element_size() for m in pipe.components.values()
               if isinstance(m, torch.nn.Module) for p in m.parameters())
    return write_folder(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), size,
                        replace=replace)


# --------------------------------------------------------------------------------------------------- measuring
def language_drift(
    pipe: StableDiffusionPipeline,
    subject_photos: Sequence[Image.Image],
    embedder: IdentityEmbedder,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    class_prompt: str = CLASS_PROMPT,
) -> tuple[dict, list[Image.Image]]:
    """Language drift: how much the bare class prompt now draws the subject.

    Images of ``class_prompt`` (no identifier), one per seed, scored by ``identity_similarity`` against the
    subject's photos. The base model draws random people (low identity); a fine-tuned model that drifted draws
    the subject for "a person" too (identity near that of the subject prompts). Compare the base model, DreamBooth
    without prior preservation and with it, on the same seeds. Returns (``identity_similarity``'s dict, images).
    """
    from nbutils.metrics import identity_similarity

    images = generate(pipe, class_prompt, seeds, steps=steps, guidance_scale=guidance_scale)
    return identity_similarity(images, subject_photos, embedder), images


def nearest_training_similarity(
    generated: Sequence[Image.Image],
    training: Sequence[Image.Image],
    embed: Callable[[Sequence[Image.Image]], torch.Tensor] | None,
) -> dict:
    """Overfitting to the training context, as similarity to the nearest training image.

    Each generated image (made for a recontextualisation prompt: a new place, outfit or style) is embedded with
    ``embed`` (images -> (N, D) features, e.g. ``suite.image_features`` or the toy feature network via
    ``nbutils.metrics.network_outputs``; ``None``, where no embedder could be loaded: NaN scores, with a warning)
    and compared, by cosine similarity, with every training photo; its score
    is the highest one. A model that memorised its photos reproduces their background and pose whatever the prompt,
    so its mean score rises towards 1. For scale, ``training_baseline`` is the same score of each training photo
    against the *other* training photos (NaN with fewer than two).

    Returns ``{"nearest_similarity" (mean), "per_image" (N floats), "nearest_index" (N ints into training),
    "training_baseline"}``.
    """
    if not generated or not training:
        raise ValueError(f"Need generated and training images, got {len(generated)} and {len(training)}.")
    if embed is None:
        warnings.warn("No image embedder could be loaded (CLIP or DINO; offline?): the nearest-training "
                      "similarity is NaN. Download one of them once with network access to measure it.", stacklevel=2)
        nan = float("nan")
        return {"nearest_similarity": nan, "per_image": [nan] * len(generated), "nearest_index": [-1] * len(generated),
                "training_baseline": nan}
    gen = F.normalize(embed(generated).float(), dim=-1)
    ref = F.normalize(embed(training).float(), dim=-1)
    best, index = (gen @ ref.T).max(dim=1)
    baseline = float("nan")
    if len(ref) > 1:
        self_sim = (ref @ ref.T).fill_diagonal_(-float("inf"))
        baseline = self_sim.max(dim=1).values.mean().item()
    return {"nearest_similarity": best.mean().item(), "per_image": best.tolist(), "nearest_index": index.tolist(),
            "training_baseline": baseline}


# --------------------------------------------------------------------------------------------------- defaults
CLASS_IMAGE_COUNT = {"real": 200, "toy": 64, "tiny": 4}


def class_image_count(tier: str, quick: bool = False) -> int:
    """Class images per tier (real: 200, the paper's order of magnitude; toy: 64; tiny: 4); ``quick``: a quarter
    (at least 2)."""
    if tier not in CLASS_IMAGE_COUNT:
        raise ValueError(f"Unknown model tier {tier!r}: use 'real', 'toy' or 'tiny' (see model_tier).")
    n = CLASS_IMAGE_COUNT[tier]
    return max(2, n // 4) if quick else n


def default_config(tier: str, quick: bool = False) -> TrainConfig:
    """Training defaults per model tier (``"real"``, ``"toy"``, ``"tiny"``); ``quick`` shortens the run.

    real: the paper's SD recipe as in diffusers' train_dreambooth example: SD1.5 at 512 px, lr 5e-6, batch 1,
    800 steps, constant schedule; a checkpoint (about 10 GB with AdamW's moments) every 400 steps.
    toy: a starting point the notebook tunes: 300 steps of batch 8 at lr 2e-4, 64 px. Each step runs the UNet on
    the instance and the class batch: on a busy shared 2-core CPU a step took about 3.5 s (17 minutes for 300
    steps; ``quick`` runs a tenth). tiny: a handful of steps for tests.
    """
    return config_for_tier(tier, quick, {
        "real": TrainConfig(steps=800, batch_size=1, lr=5e-6, checkpoint_every=400),
        "toy": TrainConfig(steps=300, batch_size=8, lr=2e-4, checkpoint_every=100),
        "tiny": TrainConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2),
    })
