"""DreamBooth (Ruiz et al. 2022): fine-tune the whole UNet on the subject's photos, with prior preservation.

The captions name the subject with a rare word, the *identifier* (``"a photo of sks person"``; notebook 01's
captions already hold ``sks``). Fine-tuning every UNet weight on a handful of photos learns the subject quickly, but
the model also forgets its class: soon every "person" looks like the subject (*language drift*), and the photos'
own backgrounds and poses come back whatever the prompt asks (*overfitting to the training context*). Prior
preservation counters the drift: the *base* model first draws images of the class prompt ("a photo of a person"),
and every step adds their denoising loss,

    loss = mse(instance batch) + prior_loss_weight * mse(class batch),

so the model keeps drawing the class as it did before. The paper uses ``prior_loss_weight = 1``.

- ``DreamBooth`` is the method for ``nbutils.train``: it trains the UNet (and optionally the text encoder) in
  float32; its class batches come from ``make_batch`` with a seed derived from the run's, so resuming is exact.
  The class images come from ``nbutils.class_images``.
- ``save_pipeline`` writes the result as a diffusers pipeline folder, atomically.
- ``default_config``: the training defaults per model tier.

``nbutils.metrics.language_drift`` and ``nbutils.metrics.nearest_training_similarity`` measure the two failure
modes above.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from nbutils.class_images import ClassImages, class_latents
from nbutils.runs import write_folder
from nbutils.text import encode_captions
from nbutils.train import (Batch, Method, OptimizerChoice, TrainConfig, adamw_class, config_for_tier, diffusion_loss,
                           make_adamw, make_batch)

WEIGHTS_NAME = "dreambooth.safetensors"
CLASS_STREAM = 2  # seeds the class-batch stream apart from the instance batches' (see class_batch_config)


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
    ``optimizer``: see ``nbutils.train.adamw_class``. Checkpoints hold the trained weights (``unet.*``,
    ``text_encoder.*``): about 4 bytes per parameter, 13 MB on the toy model, 3.4 GB on SD1.5 (plus twice that for
    AdamW's moments).
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


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | Path, *, replace: bool = False) -> Path:
    """Save ``pipe`` as a diffusers pipeline folder (safetensors) that ``StableDiffusionPipeline.from_pretrained``
    and ``load_pipeline`` read, atomically (``write_folder``; ``replace``: swap out an existing folder once the
    new one is complete). Returns ``folder``."""
    size = sum(p.numel() * p.element_size() for m in pipe.components.values()
               if isinstance(m, torch.nn.Module) for p in m.parameters())
    return write_folder(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), size,
                        replace=replace)




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
