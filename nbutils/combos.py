"""Combined methods: a new word (Textual Inversion) learned together with the model's weights.

Both combinations add a placeholder token (``<sks>``, starting from "person"'s embedding, as
``nbutils.textual_inversion``) whose embedding rows train at their own learning rate ``token_lr``, in a second
optimizer parameter group, while the model's weights train at ``cfg.lr``:

- ``DreamBoothTI``: DreamBooth (the whole UNet, with prior preservation) plus the token's rows. The subject then has
  a word of its own instead of borrowing the rare word "sks" and its old meaning. Save the result with
  ``nbutils.dreambooth.save_pipeline``: the tokenizer and text encoder carry the new token.
- ``PivotalTuning``: LoRA adapters on the UNet (``nbutils.lora``) plus the token's rows, as in diffusers' advanced
  DreamBooth-LoRA script (after Roich et al.'s pivotal tuning: the new word is the pivot the model adapts around).
  ``save_pivotal`` writes diffusers' two standard files, so ``pipe.load_lora_weights(folder)`` and
  ``pipe.load_textual_inversion(folder)`` (or ``load_pivotal``) rebuild the trained model on a fresh pipeline.

Captions must hold the placeholder: ``with_placeholder(dataset, "sks", "<sks>")`` rewrites notebook 01's captions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save

from nbutils import lora, textual_inversion
from nbutils.class_images import ClassImages
from nbutils.dreambooth import DreamBooth
from nbutils.lora import LoRA, load_lora
from nbutils.runs import atomic_write, write_folder
from nbutils.textual_inversion import TextualInversion, load_textual_inversion
from nbutils.train import Method, OptimizerChoice, TrainConfig

TOKEN_LR = 5e-4  # diffusers' textual_inversion example's per-image rate: a starting point, tune it in the notebook


def _checked_token_lr(token_lr: float) -> float:
    if token_lr < 0:
        raise ValueError(f"token_lr must be 0 or more, got {token_lr}; {TOKEN_LR} is a starting point.")
    return float(token_lr)


def _token_group(ti: TextualInversion, token_lr: float) -> dict:
    """The optimizer parameter group of the placeholder's rows."""
    return {"params": [ti.embeds], "lr": token_lr}


class DreamBoothTI(DreamBooth):
    """DreamBooth whose subject word is a new token: the UNet trains at ``cfg.lr``, the token's rows
    (``ti.embeds``, (N, D)) at ``token_lr``; nothing else trains (the text encoder is frozen apart from those rows).

    ``class_images``, ``prior_loss_weight``, ``gradient_checkpointing``, ``optimizer``: as ``DreamBooth``;
    ``placeholder``, ``init_word``, ``num_vectors``: as ``TextualInversion``. Checkpoints hold ``unet.*`` and
    ``{placeholder: (N, D)}``.
    """

    name = "dreambooth_ti"

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        class_images: ClassImages | None = None,
        *,
        placeholder: str = "<sks>",
        init_word: str = "person",
        num_vectors: int = 1,
        token_lr: float = TOKEN_LR,
        prior_loss_weight: float = 1.0,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerChoice = "adamw",
    ):
        self.token_lr = _checked_token_lr(token_lr)
        self.ti = TextualInversion(pipe, placeholder, init_word, num_vectors)  # adds the token before the freeze
        super().__init__(pipe, class_images, identifier=placeholder, prior_loss_weight=prior_loss_weight,
                         gradient_checkpointing=gradient_checkpointing, optimizer=optimizer)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*super().trainable_parameters(), self.ti.embeds]

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        return [{"params": super().trainable_parameters()}, _token_group(self.ti, self.token_lr)]

    def check_captions(self, captions: Sequence[str]) -> None:
        """Nothing here: ``encode_prompts`` (Textual Inversion's) checks each caption holds the placeholder."""

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) with the placeholder read from ``ti.embeds`` (differentiable), see ``TextualInversion``."""
        return self.ti.encode_prompts(captions)

    def after_step(self) -> None:
        self.ti.after_step()

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict_to_save(), **self.ti.state_dict_to_save()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saved(state)
        self.ti.load_saved(state)


class PivotalTuning(Method):
    """LoRA on the UNet plus a new token: the adapters train at ``cfg.lr``, the token's rows (``ti.embeds``) at
    ``token_lr``; every base weight stays as it was.

    ``placeholder``, ``init_word``, ``num_vectors``: as ``TextualInversion``; ``rank``, ``alpha``, ``seed``: as
    ``LoRA`` (UNet adapters only: the text encoder learns through the token's rows). Checkpoints hold the diffusers
    LoRA tensors and ``{placeholder: (N, D)}`` in one file; ``save_pivotal`` splits them into diffusers' two files.
    """

    name = "pivotal_tuning"
    weights_name = "pivotal_tuning.safetensors"

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        *,
        placeholder: str = "<sks>",
        init_word: str = "person",
        num_vectors: int = 1,
        rank: int = 4,
        alpha: float | None = None,
        token_lr: float = TOKEN_LR,
        seed: int = 0,
    ):
        super().__init__(pipe)
        self.token_lr = _checked_token_lr(token_lr)
        self.ti = TextualInversion(pipe, placeholder, init_word, num_vectors)
        self.lora = LoRA(pipe, rank, alpha, seed=seed)  # after the token: its freeze would not touch the adapters

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.lora.trainable_parameters(), self.ti.embeds]

    def make_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        groups = [{"params": self.lora.trainable_parameters()}, _token_group(self.ti, self.token_lr)]
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) with the placeholder read from ``ti.embeds`` (differentiable), see ``TextualInversion``."""
        return self.ti.encode_prompts(captions)

    def after_step(self) -> None:
        self.ti.after_step()

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        return {**self.lora.state_dict_to_save(), **self.ti.state_dict_to_save()}

    def save_metadata(self) -> dict[str, str]:
        return self.lora.save_metadata()

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        self.lora.load_saved({k: v for k, v in state.items() if k != self.ti.placeholder})
        self.ti.load_saved(state)


def save_pivotal(method: PivotalTuning, folder: str | Path, *, replace: bool = False) -> Path:
    """Write the trained adapters and token as diffusers' two files into the new folder ``folder``, atomically
    (``nbutils.runs.write_folder``, ``replace`` as there): ``pytorch_lora_weights.safetensors``
    (``pipe.load_lora_weights``) and ``learned_embeds.safetensors`` (``pipe.load_textual_inversion``).
    Returns ``folder``."""
    adapters = {k: v.detach().float().contiguous().cpu() for k, v in method.lora.state_dict_to_save().items()}
    token = {k: v.detach().float().contiguous().cpu() for k, v in method.ti.state_dict_to_save().items()}
    files = {lora.WEIGHTS_NAME: save(adapters, metadata=method.lora.save_metadata()),
             textual_inversion.WEIGHTS_NAME: save(token)}

    def write(tmp: Path) -> None:
        for name, data in files.items():
            atomic_write(tmp / name, data)

    return write_folder(folder, write, sum(len(data) for data in files.values()), replace=replace)


def load_pivotal(pipe: StableDiffusionPipeline, folder: str | Path) -> None:
    """Apply a ``save_pivotal`` folder to ``pipe`` with diffusers' loaders (the token first, then the LoRA,
    each checked by ``load_textual_inversion`` / ``load_lora``). Prompts then use the placeholder."""
    load_textual_inversion(pipe, folder)
    load_lora(pipe, folder)
