"""Model tiers, device and dtype, and loading a Stable Diffusion pipeline: one code path for all three tiers.

- ``real``: Stable Diffusion 1.5 by hub id (``SD15_ID``) or a local copy, on a GPU (512 px).
- ``toy``: the miniature SD-shaped pipeline this project trains on the procedural portrait world, shipped at
  ``data/models/toy-sd/`` (64 px, runs on a CPU).
- ``tiny``: a random-weight pipeline of the same classes (32 px), built in code for fast tests and cached in
  ``TINY_MODEL_DIR`` on first use, so ``MODEL='auto'`` works before the toy model exists.
- ``sd15-random`` (a real-tier model): SD1.5's architecture with random weights at 128 px, cached in
  ``SD15_TEST_DIR``, for ``make test-sd15`` to run the real tier's code paths on a CPU.

Every tier uses SD1.5's exact CLIP tokenizer (``nbutils.clip_bpe``), a ``CLIPTextModel``, a
``UNet2DConditionModel`` with cross-attention, an ``AutoencoderKL`` and SD's noise schedule (scaled-linear betas
0.00085 to 0.012), so notebooks only choose defaults per tier (``tier_defaults``) and never branch on it otherwise.
The VAE's downsampling differs (real and tiny 8x, toy 4x): read it from ``pipe.vae_scale_factor``.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from nbutils.runs import REPO_ROOT, atomic_write_json, repo_path

if TYPE_CHECKING:  # diffusers is imported lazily: it takes seconds
    from diffusers import StableDiffusionPipeline

SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TOY_MODEL_DIR = REPO_ROOT / "data" / "models" / "toy-sd"
CACHE_DIR = Path(os.environ.get("PORTRAIT_STUDIO_CACHE", Path.home() / ".cache" / "portrait-studio"))
TINY_MODEL_DIR = CACHE_DIR / "tiny-sd"
SD15_TEST_SIZE = 128
"""Image side (px) of ``make test-sd15``'s random SD1.5: the real architecture, 16 x 16 latents, CPU-sized."""
SD15_TEST_DIR = CACHE_DIR / f"sd15-random-{SD15_TEST_SIZE}"
RESOLUTION_ENV = "PORTRAIT_STUDIO_RESOLUTION"
"""When set (pixels, a multiple of 8), ``tier_defaults`` prepares and trains at it instead of the tier's size."""

# Written into a saved tiny pipeline; bump TINY_BUILD when build_tiny_pipeline changes so stale caches are rebuilt.
TINY_STAMP = "tiny_pipeline.json"
TINY_BUILD = 1

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Tier = Literal["real", "toy", "tiny"]


class ModelUnavailable(RuntimeError):
    """A model could not be found or downloaded; the message names the fix in one sentence."""


@functools.cache
def hub_offline() -> bool:
    """Whether loaders should read only the local Hugging Face cache (``local_files_only=True``): when
    ``HF_HUB_OFFLINE`` is set, or when the hub's host does not answer within 3 s (checked once per process).
    Offline, a model that is not cached then fails at once instead of after huggingface_hub's five retries per
    file (about 45 s for each model)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """``prefer`` if given (``'cuda'``, ``'cpu'``, ...), else CUDA if available, else Apple's MPS, else the CPU."""
    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Device {prefer!r} was asked for but no CUDA GPU is visible: pass None or 'cpu'.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: str | torch.device) -> torch.dtype:
    """float32 on the CPU; bfloat16 on a CUDA GPU that supports it, else float16 (also on MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def is_pipeline_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved diffusers pipeline (its ``model_index.json``)."""
    return (Path(folder) / "model_index.json").is_file()


def _stamp(seed: int, sd15_size: int | None) -> dict:
    """What ``save_tiny_pipeline`` writes into ``TINY_STAMP``: enough to tell a stale cache."""
    stamp = {"seed": seed, "build": TINY_BUILD}
    return stamp if sd15_size is None else {**stamp, "sd15_shape": True, "image_size": sd15_size}


def _is_cache_current(folder: Path, sd15_size: int | None) -> bool:
    """Whether ``folder`` holds the current build (its stamp) with every model's weights file."""
    stamp = folder / TINY_STAMP
    try:
        current = is_pipeline_folder(folder) and json.loads(stamp.read_text()) == _stamp(0, sd15_size)
    except (OSError, ValueError):
        return False
    return current and all(any((folder / part).glob("*.safetensors")) for part in ("unet", "vae", "text_encoder"))


def _ensure_cached(folder: Path, sd15_size: int | None = None) -> Path:
    """``folder``, holding the random pipeline (seed 0) that ``save_tiny_pipeline`` builds; built on first use
    and rebuilt when it is not the current build or lacks a weights file. Processes that need it at once (two
    ranks of ``accelerate launch``, parallel tests) take turns on a lock file beside it: one builds, the others
    wait and find it built."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not _is_cache_current(folder, sd15_size):
            shutil.rmtree(folder, ignore_errors=True)  # an older build, or damaged
            save_tiny_pipeline(folder, seed=0, sd15_size=sd15_size)
    return folder


def ensure_tiny_pipeline() -> Path:
    """``TINY_MODEL_DIR``, holding the tiny random pipeline (seed 0); built and saved there on first use."""
    return _ensure_cached(TINY_MODEL_DIR)


def ensure_sd15_test_pipeline() -> Path:
    """``SD15_TEST_DIR``, holding SD1.5's architecture with random weights at ``SD15_TEST_SIZE`` px (seed 0,
    float32, 4.3 GB on disk; about a minute to build): the model ``make test-sd15`` runs the notebooks on."""
    return _ensure_cached(SD15_TEST_DIR, SD15_TEST_SIZE)


def resolve_model(model: str = "auto", device: str | torch.device | None = None) -> str:
    """The model reference to load: an absolute folder path or a hub id.

    ``"auto"``: SD1.5 (``SD15_ID``) on a CUDA GPU; otherwise the toy model if ``TOY_MODEL_DIR`` holds a
    ``model_index.json``, else the tiny random pipeline (built on first use). Aliases: ``"sd15"``, ``"toy"``,
    ``"tiny"``, ``"sd15-random"`` (SD1.5's architecture with random weights at 128 px, ``make test-sd15``'s;
    built on first use). A folder (absolute, ``~``, or relative to the repo root) becomes its absolute path; anything
    else shaped like ``owner/name`` is a hub id.
    """
    key = str(model).strip()
    if key == "auto":
        if pick_device(device).type == "cuda":
            return SD15_ID
        if is_pipeline_folder(TOY_MODEL_DIR):
            return str(TOY_MODEL_DIR)
        return str(ensure_tiny_pipeline())
    if key == "sd15":
        return SD15_ID
    if key == "tiny":
        return str(ensure_tiny_pipeline())
    if key == "sd15-random":
        return str(ensure_sd15_test_pipeline())
    if key == "toy":
        if not is_pipeline_folder(TOY_MODEL_DIR):
            raise ModelUnavailable(
                f"The toy model is not in {TOY_MODEL_DIR} yet: train it with `make toy-model`, or use MODEL='auto'."
            )
        return str(TOY_MODEL_DIR)
    folder = repo_path(key)
    if folder.exists() or not _HUB_ID.match(key):
        return str(folder)
    return key


def image_size(folder: str | Path) -> int:
    """Output side in pixels of the pipeline saved in ``folder``: UNet ``sample_size`` x the VAE's downsampling."""
    folder = Path(folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def model_tier(model_ref: str) -> Tier:
    """The tier of a resolved reference: a hub id is ``"real"``; so is a local pipeline folder of Stable
    Diffusion's width (UNet ``cross_attention_dim`` of 768 or more: CLIP ViT-L's) or of 256 px and more, at any
    size (``make test-sd15``'s 128 px random SD1.5 is ``"real"``); a smaller folder is ``"tiny"`` up to 32 px,
    else ``"toy"`` (read from its UNet and VAE configs)."""
    folder = repo_path(model_ref)
    if not is_pipeline_folder(folder):
        return "real"
    size = image_size(folder)
    width = json.loads((folder / "unet" / "config.json").read_text()).get("cross_attention_dim", 0)
    if size >= 256 or (isinstance(width, int) and width >= 768):
        return "real"
    return "tiny" if size <= 32 else "toy"


@dataclass(frozen=True)
class TierDefaults:
    """Per-tier defaults for a notebook's parameters.

    ``resolution``: image side in pixels; ``inference_steps``: denoising steps per image; ``guidance_scale``:
    classifier-free guidance weight; ``batch_size``: images per pipeline call; ``num_samples``: images made per
    prompt for figures and metrics.
    """

    resolution: int
    inference_steps: int
    guidance_scale: float
    batch_size: int
    num_samples: int


_TIER_DEFAULTS = {
    ("real", False): TierDefaults(512, 30, 7.5, 4, 8),
    ("real", True): TierDefaults(512, 10, 7.5, 2, 2),
    ("toy", False): TierDefaults(64, 25, 4.0, 16, 16),
    ("toy", True): TierDefaults(64, 10, 4.0, 8, 4),
    ("tiny", False): TierDefaults(32, 2, 4.0, 2, 2),
    ("tiny", True): TierDefaults(32, 2, 4.0, 2, 2),
}


def tier_defaults(tier: str, quick: bool = False) -> TierDefaults:
    """Defaults for ``tier`` (``"real"``, ``"toy"`` or ``"tiny"``); ``quick`` uses fewer steps and samples.

    ``$PORTRAIT_STUDIO_RESOLUTION`` (``RESOLUTION_ENV``), when set, replaces the resolution: photos are prepared
    and methods train at it (``make test-sd15`` sets 128 for its 128 px SD1.5; SD1.5 at 384 saves memory)."""
    try:
        defaults = _TIER_DEFAULTS[(tier, bool(quick))]
    except KeyError:
        raise ValueError(f"Unknown model tier {tier!r}: use 'real', 'toy' or 'tiny' (see model_tier).") from None
    value = os.environ.get(RESOLUTION_ENV, "").strip()
    if not value:
        return defaults
    if not value.isdigit() or int(value) < 32 or int(value) % 8:
        raise ValueError(f"${RESOLUTION_ENV}={value!r} is not a resolution: set it to pixels, a multiple of 8 "
                         "and at least 32 (e.g. 128), or unset it for the tier's own.")
    return replace(defaults, resolution=int(value))


def _unavailable(ref: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"Model '{ref}' could not be loaded: no network access to the Hugging Face hub and no local copy. "
        f"Download it on a machine with internet (huggingface-cli download {ref}) and pass its folder as MODEL, "
        "or use MODEL='auto' on a CPU for the embedded toy model."
    )


def load_pipeline(
    model: str = "auto", *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> StableDiffusionPipeline:
    """Load a ``StableDiffusionPipeline`` (no safety checker) from ``model`` (see ``resolve_model``) onto
    ``device`` (default ``pick_device()``) in ``dtype`` (default ``pick_dtype(device)``), safetensors only.

    Raises ``ModelUnavailable`` with the fix when a hub id cannot be reached or a folder holds no pipeline.
    The progress bar is off for the tiny tier.
    """
    from diffusers import StableDiffusionPipeline

    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    ref = resolve_model(model, device)
    kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False, use_safetensors=True,
                  local_files_only=not Path(ref).is_absolute() and hub_offline())
    if Path(ref).is_absolute():
        if not is_pipeline_folder(ref):
            raise ModelUnavailable(
                f"Model folder '{ref}' does not exist or holds no model_index.json: pass a folder saved by "
                f"save_pretrained (e.g. from `huggingface-cli download {SD15_ID} --local-dir FOLDER`) as MODEL, "
                "or use MODEL='auto'."
            )
        pipe = StableDiffusionPipeline.from_pretrained(ref, **kwargs)
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(ref, **kwargs)
        except (OSError, ValueError):
            raise _unavailable(ref) from None
    pipe = pipe.to(device)
    if model_tier(ref) == "tiny":
        pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_unet_config() -> dict:
    """Stable Diffusion 1.5's ``UNet2DConditionModel`` config (859.5M parameters, 16 cross-attention layers)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-05,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


_SD15_TEXT_ENCODER = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
_SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)

_TINY_TEXT_ENCODER = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)
_TINY_UNET = dict(
    sample_size=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
_TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=32)


def build_tiny_pipeline(
    seed: int = 0, *, sd15_shape: bool = False, image_size: int = 512, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """A random-weight ``StableDiffusionPipeline`` of SD1.5's classes, the same for the same ``seed``.

    Tiny (default): CLIP text encoder 32 wide x 2 layers (vocabulary 49,408, SD1.5's tokenizer), UNet with
    ``block_out_channels=(32, 64)`` and 6 cross-attention layers, an 8x-downsampling VAE; images are 32 x 32 px
    from ``(B, 4, 4, 4)`` latents. It generates noise, fast, for tests.

    ``sd15_shape=True``: SD1.5's UNet, text encoder (768 x 12 layers) and VAE configurations, 512 px, about
    1.07 billion parameters (4.3 GB in float32): build it on ``device="meta"`` (shapes only, no memory) or a GPU.
    ``image_size`` (px, a multiple of 8): its default output side, which changes no weight (the UNet's
    ``sample_size`` is ``image_size / 8``); 128 px is CPU-sized (``ensure_sd15_test_pipeline``).
    Weights are initialised on the CPU under a forked RNG (the global RNG is untouched), then moved to ``device``;
    on ``"meta"`` they are never initialised.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nbutils.clip_bpe import VOCAB_SIZE, clip_tokenizer
    from nbutils.toy_model import sd15_scheduler

    tokenizer = clip_tokenizer()
    text_cfg = _SD15_TEXT_ENCODER if sd15_shape else _TINY_TEXT_ENCODER
    unet_cfg = {**sd15_unet_config(), "sample_size": image_size // 8} if sd15_shape else _TINY_UNET
    vae_cfg = {**_SD15_VAE, "sample_size": image_size} if sd15_shape else _TINY_VAE
    n_vae_blocks = len(vae_cfg["block_out_channels"])
    device = torch.device(device)
    build_on = device if device.type == "meta" else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), build_on:
        torch.manual_seed(seed)
        # CLIPTextConfig's defaults are SD1.5's: quick_gelu, 77 positions, bos/eos ids 49406/49407.
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, **text_cfg))
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n_vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_vae_blocks,
            latent_channels=4,
            **vae_cfg,
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_scheduler(),  # DDIM over SD1.5's betas, epsilon prediction, as SD1.5 ships
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if device.type == "meta" else pipe.to(device)


def save_tiny_pipeline(path: str | Path, seed: int = 0, *, sd15_size: int | None = None) -> Path:
    """Build the tiny pipeline for ``seed`` (``sd15_size``: SD1.5's architecture at that many px instead) and
    save it to folder ``path`` (safetensors), atomically.

    The pipeline is written to a temporary sibling folder that is then renamed to ``path``, so ``path`` is
    either absent or complete. Raises ``FileExistsError`` if ``path`` already holds files.
    """
    path = repo_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the saved model is an ordinary readable folder
        shape = {} if sd15_size is None else {"sd15_shape": True, "image_size": sd15_size}
        build_tiny_pipeline(seed, **shape).save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / TINY_STAMP, _stamp(seed, sd15_size))
        try:
            os.rename(tmp, path)
        except OSError as err:
            raise FileExistsError(f"{path} already holds files; delete it or choose another folder.") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
