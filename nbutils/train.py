"""One training loop that every personalisation method plugs into.

A method (Textual Inversion, P+, LoRA, DreamBooth, ...) is a ``Method`` subclass: it names the parameters that
train, turns captions into the UNet's text conditioning and saves/loads its learned weights. ``train`` does the
rest, the same way for every method and every model tier:

- the VAE is frozen, so each training image is encoded once, ``latent_dist.mean * scaling_factor``, and cached;
- every random draw (batch order, noise, timesteps) comes from a ``torch.Generator`` seeded by
  ``(cfg.seed, step)``, so a run is reproducible and a resumed run continues exactly where it stopped;
- AdamW (``Method.make_optimizer``; ``adamw_class`` and ``make_adamw`` for 8-bit or fused AdamW) with a
  ``diffusers`` learning-rate schedule, gradient accumulation, gradient clipping, autocast on CUDA;
- the loss is logged every step into the run's ``metrics.json`` (series ``"loss"``);
- checkpoints (``run.artifact_path("checkpoints", "step-<k>")``) hold the method's weights, the optimizer and
  scheduler state (safetensors for tensors, JSON for the rest; nothing is pickled) and are written atomically;
  ``train`` resumes from the newest one in the run folder (``resume_problem`` says whether it can);
- a NaN/inf loss saves the last good weights and raises ``TrainingDiverged``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from nbutils.models import tier_defaults
from nbutils.runs import Run, atomic_write, atomic_write_json

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OptimizerChoice = Literal["adamw", "adamw8bit", "adamw8bit-if-available"]
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) has kernels (of the devices used here)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``checkpoint`` holds the last good weights (``None`` if none exist)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """How to train. ``steps`` counts optimizer updates; each sees ``batch_size * gradient_accumulation`` images.

    ``lr``: AdamW learning rate (already scaled for the batch, see the methods' ``default_config``);
    ``lr_scheduler``: a ``diffusers.optimization.get_scheduler`` name, after ``lr_warmup_steps`` of linear warmup;
    ``checkpoint_every`` / ``sample_every``: save a checkpoint / call the callbacks every N steps (0: only at the
    end; callbacks always run at checkpoints too); ``mixed_precision``: the autocast dtype (``"auto"``: on CUDA
    bf16 where supported, else fp16 with a gradient scaler; none on the CPU); ``max_grad_norm``: clip the
    gradient norm (``None``: no clipping); ``resolution``: training image side in pixels.
    """

    steps: int = 100
    lr: float = 5e-4
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    checkpoint_every: int = 0
    sample_every: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    max_grad_norm: float | None = 1.0
    lr_warmup_steps: int = 0
    lr_scheduler: str = "constant"
    weight_decay: float = 1e-2
    resolution: int = 512

    def __post_init__(self):
        for name in ("steps", "batch_size", "gradient_accumulation", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("checkpoint_every", "sample_every", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be 0 or more, got {getattr(self, name)}.")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(
                f"TrainConfig.mixed_precision must be 'auto', 'no', 'fp16' or 'bf16', not {self.mixed_precision!r}."
            )


def config_for_tier(tier: str, quick: bool, presets: dict[str, TrainConfig]) -> TrainConfig:
    """``presets[tier]`` at the tier's image resolution (``nbutils.models.tier_defaults``); ``quick`` keeps a
    tenth of the steps (at least 2) with a checkpoint halfway."""
    resolution = tier_defaults(tier).resolution  # raises on an unknown tier
    cfg = replace(presets[tier], resolution=resolution)
    if quick:
        steps = max(2, cfg.steps // 10)
        cfg = replace(cfg, steps=steps, checkpoint_every=max(1, steps // 2))
    return cfg


@dataclass
class Batch:
    """One micro-batch: ``latents`` (B, 4, H/f, W/f) float32 scaled VAE latents (f: the VAE's downsampling, 8 on
    SD1.5), ``captions`` (B strings), ``noise`` like ``latents``, standard normal, ``timesteps`` (B,) int64 in
    ``[0, num_train_timesteps)``; ``step`` (1-based) and ``micro``: where in training it is used (a method that
    draws more data per step, such as DreamBooth's class images, seeds its draw from them)."""

    latents: torch.Tensor
    captions: list[str]
    noise: torch.Tensor
    timesteps: torch.Tensor
    step: int = 0
    micro: int = 0


def diffusion_loss(unet, noise_scheduler: DDPMScheduler, batch: Batch, text_embeddings: torch.Tensor,
                   reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """The standard denoising loss: MSE between the UNet's prediction and its target, a float32 scalar.

    The target is the added noise for ``prediction_type == "epsilon"`` and the velocity
    ``alpha_t * noise - sigma_t * latents`` for ``"v_prediction"``. ``text_embeddings``: (B, S, D) conditioning.
    ``reduction="none"``: the squared errors themselves, (B, 4, h, w) float32, for a caller that weights parts of
    one UNet call differently (DreamBooth's instance and class halves).
    """
    noisy = noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    dtype = next(unet.parameters()).dtype  # the weights' (unet.dtype walks every module: 1.5 ms on the toy with LoRA)
    pred = unet(noisy.to(dtype), batch.timesteps, text_embeddings.to(dtype)).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = batch.noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        raise ValueError(f"Training supports prediction_type 'epsilon' or 'v_prediction', not {kind!r}.")
    return F.mse_loss(pred.float(), target.float(), reduction=reduction)


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


class Method:
    """What a personalisation method tells the loop. Subclasses implement the four methods that raise here.

    ``__init__`` freezes the whole pipeline (``requires_grad=False``, eval mode); a subclass then creates or
    unfreezes only what it trains. ``weights_name`` is the file its weights get inside a checkpoint folder.
    """

    name = "method"
    weights_name = "weights.safetensors"

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False).eval()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The tensors the optimizer updates (float32)."""
        raise NotImplementedError

    def prepare(self, cfg: TrainConfig) -> None:
        """Called by ``train`` once before the first step (also when resuming), e.g. to encode extra training
        images at ``cfg.resolution``."""

    def make_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimizer over ``trainable_parameters()``: AdamW at ``cfg.lr`` and ``cfg.weight_decay``. Override it
        for parameter groups with their own learning rate or another optimizer class."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """The UNet's text conditioning for ``captions``: (B, S, D), differentiable w.r.t. the trainable tensors."""
        raise NotImplementedError

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """The learned tensors, as saved in ``weights_name``."""
        raise NotImplementedError

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        """Put tensors saved by ``state_dict_to_save`` back into the method (and the pipeline)."""
        raise NotImplementedError

    def save_metadata(self) -> dict[str, str]:
        """Text metadata stored in the safetensors header of ``weights_name``."""
        return {}

    def loss(self, batch: Batch) -> torch.Tensor:
        """Loss of one micro-batch (default: ``diffusion_loss`` on ``encode_prompts(batch.captions)``)."""
        return diffusion_loss(self.pipe.unet, self.noise_scheduler, batch, self.encode_prompts(batch.captions))

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to copy learned rows into the pipeline)."""


Callback = Callable[[int, Method, Run], None]


@dataclass
class TrainResult:
    """``losses``: one mean loss per step run by this call, for steps ``start_step + 1 .. final_step``;
    ``checkpoint``: the final checkpoint folder; ``earlier_s``: training seconds (callbacks excluded) that the
    checkpoint this call resumed from had recorded (0 for a run trained in one go), to add to this call's time."""

    losses: list[float]
    start_step: int
    final_step: int
    checkpoint: Path
    earlier_s: float = 0.0


@torch.no_grad()
def encode_latents(
    pipe: StableDiffusionPipeline, images: Sequence[Image.Image], resolution: int, batch_size: int = 8
) -> torch.Tensor:
    """Scaled VAE latents of ``images``: (N, 4, resolution/f, resolution/f) float32 on the pipeline's device,
    f the VAE's downsampling factor (8 on SD1.5).

    Images are centre-cropped to a square and resized to ``resolution`` (``VaeImageProcessor``, values in [-1, 1]);
    the latent is the posterior mean times ``vae.config.scaling_factor``.
    """
    vae = pipe.vae
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode images", leave=False):
        chunk = list(images[i : i + batch_size])
        pixels = pipe.image_processor.preprocess(chunk, resolution, resolution, resize_mode="crop")
        latent = vae.encode(pixels.to(pipe.device, vae.dtype)).latent_dist.mean
        out.append(latent.float() * vae.config.scaling_factor)
    return torch.cat(out)


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from ``key`` (e.g. ``(seed, step)``): independent streams, no state to save."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def make_batch(
    latents: torch.Tensor, captions: Sequence[str], cfg: TrainConfig, step: int, micro: int, num_train_timesteps: int
) -> Batch:
    """The ``micro``-th micro-batch of optimizer step ``step`` (1-based), a pure function of ``cfg.seed`` and both.

    Images are visited in a seeded random order, epoch by epoch; noise and timesteps come from
    ``(seed, step, micro)``. ``latents``: (N, 4, h, w) cached latents, ``captions``: their N captions.
    """
    n, b = len(captions), cfg.batch_size
    first = ((step - 1) * cfg.gradient_accumulation + micro) * b
    idx = [int(torch.randperm(n, generator=_generator(cfg.seed, 0, p // n))[p % n]) for p in range(first, first + b)]
    g = _generator(cfg.seed, 1, step, micro)
    noise = torch.randn((b, *latents.shape[1:]), generator=g)
    timesteps = torch.randint(0, num_train_timesteps, (b,), generator=g)
    device = latents.device
    return Batch(latents[idx], [captions[i] for i in idx], noise.to(device), timesteps.to(device), step, micro)


def _check_dataset(dataset) -> tuple[list[Image.Image], list[str]]:
    pairs = list(dataset)
    if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ValueError(
            "The dataset must be a non-empty list of (PIL image, caption) pairs, e.g. load_prepared_dataset(path)."
        )
    images, captions = zip(*pairs)
    if not all(isinstance(im, Image.Image) for im in images) or not all(isinstance(c, str) and c for c in captions):
        raise ValueError("Each dataset item must be (PIL.Image.Image, non-empty caption str).")
    return list(images), list(captions)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """``"auto"``: bf16 (or fp16 where unsupported) on CUDA, no autocast elsewhere; ``"fp16"``/``"bf16"``: that
    dtype on any device (CPU autocast works too, slowly: useful to test the fp16 gradient-scaler path)."""
    if cfg.mixed_precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]


def list_checkpoints(run: Run) -> list[Path]:
    """Complete checkpoint folders of ``run`` (those holding ``state.json``), oldest step first."""
    folder = run.path / "artifacts" / "checkpoints"
    found = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _flat(state: dict, prefix: str = "") -> dict:
    """One parameter's optimizer state with nested dicts flattened to ``"outer/inner"`` keys."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_checkpoint(run: Run, method: Method, step: int, optimizer, lr_scheduler, scaler, cfg: TrainConfig, *,
                    train_s: float = 0.0) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically: a temporary sibling folder, then one rename.

    Holds ``method.weights_name`` (method tensors + ``save_metadata()``), ``optimizer.safetensors`` (AdamW moments
    as ``"<param index>.<name>"``; 8-bit Adam's quantised moments and their scales too) and ``state.json`` (step,
    param groups, the optimizer's per-parameter numbers that are not tensors, such as 8-bit Adam's step count,
    scheduler and grad-scaler state, config,
    ``train_s``: wall seconds of training up to this step, callbacks excluded, summed over the sessions of a resumed
    run; ``files``: the byte size of each tensor file, which ``checkpoint_problem`` checks). A process killed before
    the rename leaves only a hidden ``.step-<step>.*`` folder, which no reader takes for a checkpoint.
    """
    final = run.artifact_path("checkpoints", f"step-{step}")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        weights = {k: v.detach().float().contiguous().cpu() for k, v in method.state_dict_to_save().items()}
        atomic_write(tmp / method.weights_name, save(weights, metadata=method.save_metadata()))
        opt = optimizer.state_dict()
        per_param = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in _flat(s).items()}
        moments, stored = {}, set()
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensor = value.detach().contiguous().cpu()
                if tensor.untyped_storage().data_ptr() in stored:  # 8-bit Adam shares its quantisation maps
                    tensor = tensor.clone()
                stored.add(tensor.untyped_storage().data_ptr())
                moments[key] = tensor
        atomic_write(tmp / OPTIMIZER_FILE, save(moments))
        files = {name: (tmp / name).stat().st_size for name in (method.weights_name, OPTIMIZER_FILE)}
        state = {"step": step, "method": method.name, "param_groups": opt["param_groups"],
                 "optimizer_scalars": {k: v for k, v in per_param.items() if not torch.is_tensor(v)},
                 "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler.state_dict(), "config": asdict(cfg),
                 "train_s": round(train_s, 3), "files": files}
        atomic_write_json(tmp / STATE_FILE, state)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What makes checkpoint folder ``checkpoint`` unusable, in one phrase, or ``None`` if it is complete:
    ``state.json`` must be valid JSON with its ``step``, and every tensor file it lists (``files``) must exist with
    the recorded size (a truncated or missing file is named)."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        step, files = int(state["step"]), dict(state["files"])
    except FileNotFoundError:
        return f"{checkpoint} has no {STATE_FILE}"
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return f"{checkpoint / STATE_FILE} is corrupt or from an older version ({type(err).__name__}: {err})"
    if checkpoint.name != f"step-{step}":
        return f"{checkpoint / STATE_FILE} says step {step}, not the folder's name"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is truncated or damaged ({path.stat().st_size:,} bytes, written as {size:,})"
    return None


def _remove_unfinished_writes(run: Run) -> None:
    """Delete the hidden ``.step-*`` folders of checkpoint writes that a killed process never renamed (they can be
    as large as a checkpoint, a UNet on DreamBooth); only ``save_checkpoint`` makes them, and never reads them."""
    folder = run.path / "artifacts" / "checkpoints"
    for tmp in sorted(folder.glob(".step-*")) if folder.is_dir() else ():
        print(f"removing {tmp.name}: a checkpoint write that was interrupted before it completed")
        shutil.rmtree(tmp, ignore_errors=True)


def resume_problem(run: Run) -> str | None:
    """Why ``train`` cannot resume ``run`` from its newest checkpoint (``checkpoint_problem``), or ``None`` (no
    checkpoint yet is no problem: training starts at step 1 in that folder)."""
    done = list_checkpoints(run)
    return checkpoint_problem(done[-1]) if done else None


def load_checkpoint(method: Method, checkpoint: str | Path, optimizer=None, lr_scheduler=None, scaler=None) -> int:
    """Load a checkpoint's weights into ``method`` (and the training state into the others given); returns its
    step."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}); pick another step-* folder."
        )
    state = json.loads((checkpoint / STATE_FILE).read_text())
    method.load_saved(load_file(checkpoint / method.weights_name))
    if optimizer is not None:
        moments: dict[int, dict] = {}
        for key, value in (load_file(checkpoint / OPTIMIZER_FILE) | state.get("optimizer_scalars", {})).items():
            index, name = key.split(".", 1)
            *outer, last = name.split("/")
            entry = moments.setdefault(int(index), {})
            for part in outer:  # 8-bit Adam nests its quantisation state one level down
                entry = entry.setdefault(part, {})
            entry[last] = value
        optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["grad_scaler"]:
        scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])


def train(method: Method, dataset: Sequence[tuple[Image.Image, str]], cfg: TrainConfig, run: Run, *,
          callbacks: Sequence[Callback] = (), resume: bool = True, accelerator=None) -> TrainResult:
    """Train ``method`` on ``dataset`` ((PIL image, caption) pairs) for ``cfg.steps`` steps, writing into ``run``.

    If the run folder already holds checkpoints, training continues from the newest one (``resume=True``) and
    ends with the same weights as an uninterrupted run; ``resume=False`` refuses such a folder. Resuming drops the
    series points logged after that checkpoint (those steps run again) and the hidden folders of checkpoint writes
    that never completed, and calls the callbacks once more at the checkpoint's step, since the interrupted process
    may have died inside them: make them skip a step they already recorded, as ``CheckpointEvaluator`` does.
    ``callbacks(step, method, run)`` run every ``cfg.sample_every`` steps and at every checkpoint (for sample grids
    and evaluation). Raises ``TrainingDiverged`` on a NaN/inf loss.

    ``accelerator``: an ``accelerate.Accelerator`` of ``W`` processes (``accelerate launch``) trains data-parallel.
    Process ``r`` takes micro-batches ``r, r + W, ...`` of those a single process with ``gradient_accumulation * W``
    would take; the gradients are summed across processes before each optimizer step, so every process keeps the
    same weights and the run equals that single-process run up to float summation order. Only the main process
    writes into ``run`` (checkpoints, series) and runs the callbacks. ``None``: this process alone.
    """
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    writes = rank == 0
    shards = replace(cfg, gradient_accumulation=cfg.gradient_accumulation * world)  # the single-process run's view
    began, callback_s = time.perf_counter(), 0.0  # training time: this call's, callbacks excluded
    images, captions = _check_dataset(dataset)
    device = method.pipe.device
    latents = encode_latents(method.pipe, images, cfg.resolution)
    method.prepare(cfg)
    params = method.trainable_parameters()
    optimizer = method.make_optimizer(cfg)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    amp_dtype = _autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    done = list_checkpoints(run)
    if done and not resume:
        raise ValueError(f"{run.path} already holds checkpoints: pass resume=True, or train into a new run (new_run).")
    problem = resume_problem(run)
    if problem:
        raise ValueError(f"Cannot resume {run.path}: {problem}. Train into a new run (new_run).")
    start = load_checkpoint(method, done[-1], optimizer, lr_scheduler, scaler) if done else 0
    if start > cfg.steps:
        raise ValueError(f"{run.path} already holds a checkpoint at step {start} > cfg.steps={cfg.steps}: "
                         "raise cfg.steps, or train into a new run (new_run).")
    last_saved = done[-1] if done else None
    earlier_s = float(json.loads((last_saved / STATE_FILE).read_text()).get("train_s", 0.0)) if done else 0.0

    def run_callbacks(step: int) -> None:
        nonlocal callback_s
        if not writes:
            return
        t = time.perf_counter()
        for callback in callbacks:
            callback(step, method, run)
        callback_s += time.perf_counter() - t

    def checkpoint(step: int) -> Path:
        spent = earlier_s + time.perf_counter() - began - callback_s
        return save_checkpoint(run, method, step, optimizer, lr_scheduler, scaler, cfg, train_s=spent)

    if writes:
        run.truncate_series(start)  # a reused folder: what was logged after its checkpoint is trained again
        _remove_unfinished_writes(run)
    if start:
        run_callbacks(start)
    num_timesteps = method.noise_scheduler.config.num_train_timesteps
    losses = []
    for step in tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, desc=method.name):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(cfg.gradient_accumulation):
            batch = make_batch(latents, captions, shards, step, micro * world + rank, num_timesteps)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = method.loss(batch) / shards.gradient_accumulation
            if not torch.isfinite(loss):
                if writes and step > 1 and (last_saved is None or last_saved.name != f"step-{step - 1}"):
                    last_saved = checkpoint(step - 1)
                kept = f"the last good weights are in {last_saved}" if last_saved else "nothing was learned yet"
                raise TrainingDiverged(
                    f"The loss became {loss.item()} at step {step}; {kept}. Lower the learning rate "
                    "(TrainConfig.lr), keep max_grad_norm set, or use mixed_precision='no'.", step, last_saved)
            scaler.scale(loss).backward()
            step_loss += loss.item()
        if world > 1:  # every process steps with the gradient of all processes' micro-batches
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="sum")
            step_loss = accelerator.reduce(torch.tensor(step_loss), reduction="sum").item()
        if cfg.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        method.after_step()
        losses.append(step_loss)
        if writes:
            run.log_series("loss", step, loss=step_loss, lr=lr_scheduler.get_last_lr()[0])
        at_checkpoint = step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if at_checkpoint and writes:
            last_saved = checkpoint(step)
        if at_checkpoint or (cfg.sample_every and step % cfg.sample_every == 0):
            run_callbacks(step)
    return TrainResult(losses, start, cfg.steps, last_saved, earlier_s)
