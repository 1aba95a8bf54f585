"""LoRA (Hu et al. 2021): learn a low-rank update of the attention projections; the base model stays frozen.

Each targeted ``Linear`` layer ``W`` (out x in) gets two small matrices, ``A`` (r x in, Gaussian at the start) and
``B`` (out x r, zero at the start), and computes ``W x + (alpha / r) * B A x``: training starts from the base model
and learns ``r * (in + out)`` numbers per layer instead of ``in * out``. The layers are peft adapters added through
diffusers' own PEFT integration (``unet.add_adapter(LoraConfig(...))``), by default on the UNet's attention
projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (self- and cross-attention) and optionally on the text
encoder's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``. On SD1.5, rank 4 on the UNet is 797,184 numbers,
3.2 MB in float32.

The weights file is diffusers' LoRA format, ``pytorch_lora_weights.safetensors``: tensors
``unet.<layer>.lora.down.weight`` (A) and ``unet.<layer>.lora.up.weight`` (B) (``text_encoder.<layer>.
lora_linear_layer.down/up.weight``), and the header entry ``lora_adapter_metadata`` with each adapter's
``LoraConfig`` (rank and alpha). So a training checkpoint folder is a LoRA folder: ``pipe.load_lora_weights(folder)``
(or ``load_lora``, which checks the file fits first) reproduces the trained model, and
``pipe(..., cross_attention_kwargs={"scale": s})`` sets its strength (0: the base model).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from nbutils.text import encode_captions
from nbutils.train import Method, TrainConfig, config_for_tier

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

# A diffusers-format LoRA tensor name: "<component>.<layer>.<lora|lora_linear_layer>.<down|up>.weight".
_KEY = re.compile(r"^(unet|text_encoder)\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")


def _short_name(name: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``to_out.0`` (last part, two if the
    last is an index)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def check_lora_targets(model: torch.nn.Module, targets: Sequence[str], rank: int) -> None:
    """Raise ``ValueError`` unless every name in ``targets`` matches a ``Linear`` layer of ``model`` (peft's rule:
    the full name or its last dotted parts) and ``rank`` fits every matched layer (at most ``min(in, out)``)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"The LoRA rank must be a whole number of at least 1, got {rank!r}; 4 is a common choice.")
    if not targets:
        raise ValueError(f"Name at least one layer to adapt, e.g. {UNET_TARGETS} for the UNet.")
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    limits = {}
    for target in targets:
        matched = [name for name in linear if name == target or name.endswith(f".{target}")]
        if not matched:
            examples = sorted({_short_name(name) for name in linear})[:12]
            raise ValueError(
                f"No Linear layer of the {type(model).__name__} is named {target!r}; its Linear layers end in "
                f"e.g. {examples}: pass names like those as targets."
            )
        limits.update({name: min(linear[name].in_features, linear[name].out_features) for name in matched})
    name, limit = min(limits.items(), key=lambda item: item[1])
    if rank > limit:
        layer = linear[name]
        raise ValueError(
            f"LoRA rank {rank} is larger than layer {name} allows ({layer.out_features} x {layer.in_features} "
            f"weight: at most rank {limit}); choose a rank of at most {limit}."
        )


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int = 0) -> None:
    """Add a LoRA adapter (peft, adapter name ``"default"``) of ``rank`` and scale ``alpha / rank`` to the ``Linear``
    layers of ``model`` (a diffusers UNet or a transformers text encoder) named by ``targets``.

    ``A`` is drawn from ``N(0, 1/rank)`` under a forked RNG seeded by ``seed`` (the global RNG is untouched), ``B``
    starts at zero. The base weights are frozen; the adapter's weights train, in float32 whatever the model's dtype.
    Works on the meta device too (shapes only).
    """
    check_lora_targets(model, targets, rank)
    if alpha <= 0:
        raise ValueError(f"The LoRA alpha must be positive, got {alpha}; alpha = rank gives the update scale 1.")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config)
    cast_training_params(model, dtype=torch.float32)


def lora_layers(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Per component name (``"unet"``, ``"text_encoder"``), the LoRA tensors of its ``"default"`` adapter in diffusers'
    naming: ``get_peft_model_state_dict`` then ``convert_state_dict_to_diffusers``. The tensors share storage with
    the live parameters (writing into them writes the adapter)."""
    return {name: convert_state_dict_to_diffusers(get_peft_model_state_dict(m)) for name, m in models.items()}


def adapter_metadata(model: torch.nn.Module) -> dict:
    """The adapter's ``LoraConfig`` as JSON-ready values (sets as sorted lists), as diffusers stores it."""
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def lora_state_dict(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers LoRA file: ``lora_layers`` with each name prefixed by its component (diffusers'
    ``pack_weights``), e.g. ``unet.down_blocks.0...to_q.lora.down.weight`` (rank, in)."""
    packed = {}
    for prefix, layers in lora_layers(models).items():
        packed.update(StableDiffusionPipeline.pack_weights(layers, prefix))
    return packed


def lora_metadata(models: dict[str, torch.nn.Module]) -> dict[str, str]:
    """The safetensors header of a diffusers LoRA file, as ``StableDiffusionPipeline.save_lora_weights`` writes it:
    ``format`` and ``lora_adapter_metadata`` (JSON of each component's ``LoraConfig`` under ``"<component>.<key>"``),
    which ``pipe.load_lora_weights`` reads back to restore rank and alpha."""
    packed = {}
    for prefix, model in models.items():
        packed.update(StableDiffusionPipeline.pack_weights(adapter_metadata(model), prefix))
    return {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def lora_parameter_count(model: torch.nn.Module) -> int:
    """Numbers in ``model``'s LoRA adapter, counted from peft's adapter state dict (works on the meta device)."""
    return sum(t.numel() for t in get_peft_model_state_dict(model).values())


def check_lora_fits(pipe: StableDiffusionPipeline, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming the first misfit unless every tensor of the diffusers LoRA ``state`` (read from
    ``source``) fits ``pipe``: its layer exists, ``down`` (rank, in) matches the layer's input size and ``up``
    (out, rank) its output size."""
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{source} holds {key!r}, which is not a diffusers LoRA tensor name: "
                             "pass a folder or file written by LoRA training (pytorch_lora_weights.safetensors).")
        component, layer, kind = match.groups()
        try:
            weight = getattr(pipe, component).get_submodule(layer).weight
        except AttributeError:
            raise ValueError(f"{source} has LoRA weights for layer {component}.{layer}, which this model lacks: it "
                             "was trained on another model; load the model it was trained on.") from None
        fits = tensor.shape[1:] == weight.shape[1:] if kind == "down" else tensor.shape[0] == weight.shape[0]
        if not fits:
            raise ValueError(
                f"{source} was trained on a model of another shape: its {kind} matrix for layer {component}.{layer} "
                f"is {tuple(tensor.shape)}, but that layer's weight here is {tuple(weight.shape)}. Load the model "
                "the LoRA was trained on."
            )


class LoRA(Method):
    """LoRA as a ``nbutils.train`` method: the trainable tensors are the adapters' ``A`` and ``B`` (float32).

    ``rank``: r of every adapter; ``alpha``: the update is scaled by ``alpha / rank`` (default ``alpha = rank``:
    scale 1, as diffusers' LoRA scripts); ``train_text_encoder``: add adapters to the text encoder too (otherwise its
    output for each distinct caption is computed once and cached); ``unet_targets`` / ``text_encoder_targets``: the
    ``Linear`` layers that get adapters; ``seed``: the initialisation of ``A``.
    """

    name = "lora"
    weights_name = WEIGHTS_NAME

    def __init__(self, pipe: StableDiffusionPipeline, rank: int = 4, alpha: float | None = None, *,
                 train_text_encoder: bool = False, unet_targets: Sequence[str] = UNET_TARGETS,
                 text_encoder_targets: Sequence[str] = TEXT_ENCODER_TARGETS, seed: int = 0):
        super().__init__(pipe)
        alpha = rank if alpha is None else alpha
        self.models: dict[str, torch.nn.Module] = {"unet": pipe.unet}
        if train_text_encoder:
            self.models["text_encoder"] = pipe.text_encoder
        targets = {"unet": unet_targets, "text_encoder": text_encoder_targets}
        for name, model in self.models.items():  # check all before changing any
            check_lora_targets(model, targets[name], rank)
        for offset, (name, model) in enumerate(self.models.items()):
            add_lora(model, rank, alpha, targets[name], seed=seed + offset)
        self.train_text_encoder = train_text_encoder
        self._cache: dict[str, torch.Tensor] = {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for model in self.models.values() for p in model.parameters() if p.requires_grad]

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D): through the text encoder's adapters if it trains, else from the cache."""
        return encode_captions(self.pipe, captions, None if self.train_text_encoder else self._cache)

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """The diffusers LoRA tensors, see ``lora_state_dict``."""
        return lora_state_dict(self.models)

    def save_metadata(self) -> dict[str, str]:
        return lora_metadata(self.models)

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a saved LoRA (same targets, rank and model) into the adapters; ``ValueError`` naming what differs."""
        current = self.state_dict_to_save()
        check_lora_fits(self.pipe, state, "The LoRA file")
        missing, extra = sorted(current.keys() - state.keys()), sorted(state.keys() - current.keys())
        if missing or extra:
            raise ValueError(
                f"The LoRA file does not match this LoRA's layers: {len(missing)} expected tensors are missing "
                f"(e.g. {missing[:2]}) and {len(extra)} are extra (e.g. {extra[:2]}). Use the same targets and "
                "train_text_encoder setting as the run that saved it."
            )
        for key, tensor in current.items():
            if tensor.shape != state[key].shape:
                raise ValueError(f"The LoRA file holds {key} of shape {tuple(state[key].shape)}, this LoRA expects "
                                 f"{tuple(tensor.shape)}: use the rank the run that saved it used.")
        with torch.no_grad():
            for key, tensor in current.items():
                tensor.copy_(state[key])


def load_lora(pipe: StableDiffusionPipeline, path: str | Path, adapter_name: str | None = None) -> None:
    """``pipe.load_lora_weights`` from a checkpoint folder or a ``.safetensors`` file, after checking that the
    LoRA fits ``pipe`` (a clear ``ValueError`` instead of a size-mismatch trace; ``pipe`` is then unchanged).

    Afterwards ``pipe(..., cross_attention_kwargs={"scale": s})`` applies it with strength ``s`` (default 1).
    """
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} at {path}: pass a checkpoint folder of a LoRA run or the file.")
    check_lora_fits(pipe, load_file(file), str(file))
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)


def default_config(tier: str, quick: bool = False) -> TrainConfig:
    """Training defaults per model tier (``"real"``, ``"toy"``, ``"tiny"``); ``quick`` shortens the run.

    real: diffusers' DreamBooth-LoRA example on SD1.5 (rank 4, lr 1e-4, constant, batch 1, 500 steps, 512 px).
    toy: a starting point, to be tuned in the notebook: 300 steps at batch 8 and lr 1e-3, a few minutes at 64 px
    on a CPU (measured: 0.7 s a step on one busy CPU thread). tiny: a handful of steps for tests.
    """
    return config_for_tier(tier, quick, {
        "real": TrainConfig(steps=500, batch_size=1, lr=1e-4, checkpoint_every=100),
        "toy": TrainConfig(steps=300, batch_size=8, lr=1e-3, checkpoint_every=100),
        "tiny": TrainConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2),
    })
