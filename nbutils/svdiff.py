"""SVDiff (Han et al. 2023): fine-tune only the singular values of the model's weight matrices.

Every convolution and linear weight ``W`` of the UNet (optionally also of the text encoder) is viewed as a matrix,
(out, in) or, for a convolution kernel, (out, in * k * k), and decomposed once: ``W = U diag(sigma) V^T``
(``torch.linalg.svd``, ``full_matrices=False``; kept in memory as buffers). Only the spectral shifts ``delta``, one
number per singular value, train; the layer uses

    W' = U diag(ReLU(sigma + delta)) V^T,

computed as ``W + U diag(ReLU(sigma + delta) - sigma) V^T`` (the same matrix, since ``W = U diag(sigma) V^T``), so
that ``delta = 0`` gives back ``W`` bit for bit rather than up to the SVD's rounding. The reparametrisation is a
``torch.nn.utils.parametrize`` parametrisation of each layer's ``weight``: the UNet's own code runs unchanged and
the original weight stays untouched in ``parametrizations.weight.original``.

Size: the shifts of a layer number ``min(out, in * k * k)``. SD1.5's UNet has 282 such layers and 222,696 shifts,
0.89 MB in float32 (277,992 and 1.11 MB with the text encoder): 3.6x fewer numbers than LoRA of rank 4 on the
attention projections, while every layer of the network can change. The paper reports 1.7 MB for Stable Diffusion
with its own choice of layers. Cost: ``U``, ``sigma`` and ``V`` are kept in float32 (4.3 GB on SD1.5, beside the
weights). Each call of a layer takes the cheaper of two equal computations: form ``W'`` (``out * in * r``
multiply-adds at any resolution) or add ``U diag(shift) (V^T x)`` to the base layer's output (``N * r *
(in + out)`` for ``N`` positions, cheap on the wide, low-resolution layers). On SD1.5 at 512 px a training step
(batch 1) then costs 3.2 TFLOP instead of 6.4 (a full fine-tuning step: 2.4; counted by
``torch.utils.flop_counter`` on the meta device, ``tests/test_svdiff.py``); on the toy model it saves 13 % of the
FLOPs and no time (its layers are small enough for the per-call overhead to dominate). For sampling, wrap the
pipeline call in ``torch.nn.utils.parametrize.cached()``: every ``W'`` is then formed once per call. The
decomposition takes seconds on the toy model, but decompose SD1.5 (matrices up to 1280 x 23040) on a GPU: on one
CPU core a single 1280 x 11520 matrix took 30 s.

Learning rate: the shifts need a learning rate about 1000 times that of full fine-tuning (the rule the unofficial
diffusers port, mkshing/svdiff-pytorch, quotes from the paper; the paper's own numbers could not be checked here).
That port trains SD1.5 with 1e-3 for the spectral shifts and 1e-6 only for the 1-D weights of the normalisation
layers, which it shifts as well; those layers are left out here (only convolution and linear weights), so one
learning rate, 1e-3 on SD1.5, serves all shifts. Cut-Mix-Unmix (the paper's
multi-subject augmentation) is not implemented.

Saved as ``svdiff_shifts.safetensors``: one 1-D float32 tensor per layer, named ``unet.<layer>`` /
``text_encoder.<layer>``, and header metadata ``format`` (``"svdiff"``), ``base_model`` (the pipeline's name or
folder), ``base_sha256`` (a hash of the base weights that were decomposed) and ``layers`` (JSON ``{name: [out, in]}``
of the matrices). ``load_svdiff`` applies such a file to a fresh pipeline.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from nbutils.text import encode_captions
from nbutils.train import Method, TrainConfig, config_for_tier

WEIGHTS_NAME = "svdiff_shifts.safetensors"
FORMAT = "svdiff"


def base_weight(module: torch.nn.Module) -> torch.Tensor:
    """The layer's own weight: the original one if it is parametrised (without computing the parametrisation)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def matrix_shape(module: torch.nn.Module) -> tuple[int, int]:
    """The weight as a matrix: (out, in) for a linear layer, (out, in * k * k) for a convolution (meta-safe)."""
    weight = base_weight(module)
    return weight.shape[0], weight[0].numel()


def spectral_layers(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """The ``Linear`` and ``Conv2d`` layers of ``model``, named ``"<prefix>.<module name>"``, in module order."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return {f"{prefix}.{name}": m for name, m in model.named_modules() if isinstance(m, kinds)}


def num_spectral_shifts(model: torch.nn.Module) -> int:
    """How many spectral shifts ``model`` has: the sum of ``min(out, in * k * k)`` over its conv and linear
    weights. Reads shapes only, so it works on the meta device."""
    return sum(min(matrix_shape(m)) for m in spectral_layers(model, "model").values())


def pipeline_layers(pipe: StableDiffusionPipeline, text_encoder: bool) -> dict[str, torch.nn.Module]:
    """The layers SVDiff shifts: the UNet's (``unet.<name>``) and, if ``text_encoder``, the text encoder's."""
    layers = spectral_layers(pipe.unet, "unet")
    if text_encoder:
        layers.update(spectral_layers(pipe.text_encoder, "text_encoder"))
    return layers


def weights_sha256(layers: dict[str, torch.nn.Module]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the layers' base weights (hex): which model and which dtype
    the shifts were learned on. The same weights in another dtype hash differently."""
    digest = hashlib.sha256()
    for name, module in layers.items():
        weight = base_weight(module).detach().contiguous().cpu()
        digest.update(f"{name}:{weight.dtype}:{tuple(weight.shape)};".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shifts_metadata(shapes: dict[str, tuple[int, int]], base_model: str, base_sha256: str) -> dict[str, str]:
    """The safetensors header of a shifts file (see the module docstring); ``shapes``: {layer: (out, in)}."""
    layers = json.dumps({name: list(shape) for name, shape in shapes.items()})
    return {"format": FORMAT, "base_model": base_model, "base_sha256": base_sha256, "layers": layers}


class SpectralShift(torch.nn.Module):
    """A ``parametrize`` parametrisation of one weight ``W`` (out, in[, k, k]) by its spectral shifts.

    Holds ``U`` (out, r), ``S`` (r,) and ``Vh`` (r, in * k * k) float32 buffers of ``W``'s SVD (r = min(out,
    in * k * k); not part of the state dict) and the trainable ``delta`` (r,) float32, zero at the start.
    ``forward(W)`` returns ``W + U diag(ReLU(S + delta) - S) Vh`` in ``W``'s shape and dtype, computed in float32,
    except while ``factored`` is set (by ``add_spectral_shifts``' hooks, for one call of the layer): then ``W``
    itself, the layer adding the change to its output through ``change_of_output`` instead.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().float().reshape(weight.shape[0], -1), full_matrices=False)
        self.register_buffer("U", u, persistent=False)
        self.register_buffer("S", s, persistent=False)
        self.register_buffer("Vh", vh, persistent=False)
        self.delta = torch.nn.Parameter(torch.zeros_like(s))
        self.factored = False

    def shift(self) -> torch.Tensor:
        """``ReLU(S + delta) - S`` (r,) float32: how far each singular value moved."""
        return F.relu(self.S + self.delta) - self.S

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.factored:
            return weight
        with torch.autocast("cpu" if weight.is_meta else weight.device.type, enabled=False):  # meta: FLOP counts
            change = (self.U * self.shift()) @ self.Vh
        return weight + change.view(weight.shape).to(weight.dtype)

    def change_of_output(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the shift adds to ``layer``'s output for its input ``x``, without forming the weight: ``x`` through
        ``Vh`` (a linear map, or a convolution with ``layer``'s kernel size, stride, padding and dilation), times
        the shifts, through ``U`` (a 1 x 1 convolution). In ``x``'s dtype, of the output's shape."""
        vh, u = self.Vh.to(x.dtype), (self.U * self.shift()).to(x.dtype)
        if isinstance(layer, torch.nn.Linear):
            return F.linear(F.linear(x, vh), u)
        kernel = vh.view(len(vh), *base_weight(layer).shape[1:])
        inner = F.conv2d(x, kernel, None, layer.stride, layer.padding, layer.dilation)
        return F.conv2d(inner, u[:, :, None, None])

    def factored_is_cheaper(self, layer: torch.nn.Module, x: torch.Tensor) -> bool:
        """Whether ``change_of_output`` costs fewer multiply-adds than forming the shifted weight, for this call.

        With ``N`` output positions (batch x tokens or pixels), ``r`` shifts and the weight as an (out, in') matrix:
        forming it costs ``out * in' * r`` (with gradients as much again backward, plus ``N * out * in'`` for the
        weight's gradient); the factored path ``N * r * (in' + out)`` (twice with gradients). The factored path
        wins at low resolution and on wide layers, forming the weight at high resolution. Never inside
        ``parametrize.cached()`` (the weight is formed once for many calls) nor for a grouped convolution or one
        padded otherwise than with zeros.
        """
        if parametrize._cache_enabled:
            return False
        if isinstance(layer, torch.nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or x.dim() != 4:
                return False
            positions = x.shape[0] * x.shape[2] * x.shape[3] // (layer.stride[0] * layer.stride[1])
        else:
            positions = x.numel() // x.shape[-1]
        (out, rank), inner = self.U.shape, self.Vh.shape[1]
        grad = torch.is_grad_enabled() and self.delta.requires_grad
        forming = out * inner * rank * (2 if grad else 1) + (positions * out * inner if grad else 0)
        return positions * rank * (inner + out) * (2 if grad else 1) < forming


def _choose_path(layer: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a shifted layer: take the factored path for this call where it is cheaper."""
    shift = layer.parametrizations.weight[0]
    shift.factored = shift.factored_is_cheaper(layer, args[0])


def _add_factored_change(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a shifted layer: on the factored path, add the change to the output and end the path, so
    that ``layer.weight`` read anywhere else is the shifted weight."""
    shift = layer.parametrizations.weight[0]
    if not shift.factored:
        return output
    shift.factored = False
    return output + shift.change_of_output(layer, args[0])


def add_spectral_shifts(layers: dict[str, torch.nn.Module]) -> dict[str, SpectralShift]:
    """Decompose each layer's weight (on its device) and parametrise it by a ``SpectralShift``; returns them by
    layer name. The layers' weights are unchanged until a ``delta`` changes. Each call of a layer takes the cheaper
    of the two equal computations (``SpectralShift.factored_is_cheaper``): the shifted weight, or the base weight
    plus ``change_of_output``."""
    shifted = [name for name, m in layers.items() if parametrize.is_parametrized(m, "weight")]
    if shifted:
        raise ValueError(f"Layer {shifted[0]} already has a parametrised weight (spectral shifts were added before): "
                         "start from a freshly loaded pipeline.")
    shifts = {}
    for name, module in tqdm(layers.items(), desc="SVD of the weights", leave=False):
        shifts[name] = SpectralShift(module.weight)
        parametrize.register_parametrization(module, "weight", shifts[name])
        module.register_forward_pre_hook(_choose_path)
        module.register_forward_hook(_add_factored_change)
    return shifts


def check_shifts_fit(sizes: dict[str, int], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` naming the first difference unless ``state`` holds exactly one 1-D tensor of
    ``sizes[name]`` shifts per layer ``name``."""
    missing, extra = sorted(sizes.keys() - state.keys()), sorted(state.keys() - sizes.keys())
    wrong = [name for name in sizes if name in state and tuple(state[name].shape) != (sizes[name],)]
    if wrong:
        detail = f"layer {wrong[0]} has {tuple(state[wrong[0]].shape)} shifts there but needs ({sizes[wrong[0]]},) here"
    elif missing:
        detail = f"it lacks {len(missing)} of this model's {len(sizes)} layers (e.g. {missing[0]})"
    elif extra:
        detail = f"it has {len(extra)} layers this model lacks (e.g. {extra[0]})"
    else:
        return
    raise ValueError(f"{source} was made for a model of another shape: {detail}. Load the model it was trained on, "
                     "with the same text-encoder setting.")


class SVDiff(Method):
    """SVDiff as a ``nbutils.train`` method: the trainable tensors are the ``delta`` of every shifted layer (float32).

    ``train_text_encoder``: shift the text encoder's linear layers too (otherwise its output for each distinct
    caption is computed once and cached). Construction decomposes every shifted weight on its device (with a
    progress bar).
    """

    name = "svdiff"
    weights_name = WEIGHTS_NAME

    def __init__(self, pipe: StableDiffusionPipeline, *, train_text_encoder: bool = False):
        super().__init__(pipe)
        layers = pipeline_layers(pipe, train_text_encoder)
        self.train_text_encoder = train_text_encoder
        self.shapes = {name: matrix_shape(m) for name, m in layers.items()}
        self.base_model = str(pipe.name_or_path or "")
        self.base_sha256 = weights_sha256(layers)
        self.shifts = add_spectral_shifts(layers)
        self._cache: dict[str, torch.Tensor] = {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [shift.delta for shift in self.shifts.values()]

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D): through the shifted text encoder if it trains, else from the cache."""
        return encode_captions(self.pipe, captions, None if self.train_text_encoder else self._cache)

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """``{layer name: delta (r,)}``."""
        return {name: shift.delta.detach() for name, shift in self.shifts.items()}

    def save_metadata(self) -> dict[str, str]:
        return shifts_metadata(self.shapes, self.base_model, self.base_sha256)

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        check_shifts_fit({name: s.delta.numel() for name, s in self.shifts.items()}, state, "The shifts file")
        with torch.no_grad():
            for name, shift in self.shifts.items():
                shift.delta.copy_(state[name])


def read_svdiff(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shifts ``{layer: delta}`` and the header metadata of a shifts file or a checkpoint folder holding one."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} at {path}: pass a checkpoint folder of an SVDiff run or the file.")
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{file} is not an SVDiff shifts file (its metadata lacks format={FORMAT!r}).")
        return {name: f.get_tensor(name) for name in f.keys()}, metadata


def load_svdiff(pipe: StableDiffusionPipeline, path: str | Path) -> None:
    """Apply the spectral shifts of a shifts file (or checkpoint folder) to ``pipe``, a freshly loaded pipeline.

    The file's layers must match ``pipe``'s (``ValueError`` otherwise, before anything changes); the text encoder is
    shifted if the file has shifts for it. Warns if ``pipe``'s weights differ from the ones the shifts were learned
    on (another model of the same shape, or the same model in another dtype): they then apply, but mean little.
    """
    state, metadata = read_svdiff(path)
    layers = pipeline_layers(pipe, text_encoder=any(name.startswith("text_encoder.") for name in state))
    check_shifts_fit({name: min(matrix_shape(m)) for name, m in layers.items()}, state, str(path))
    if weights_sha256(layers) != metadata.get("base_sha256"):
        warnings.warn(
            f"These spectral shifts were learned on other base weights ({metadata.get('base_model') or 'a model'}, "
            f"sha256 {metadata.get('base_sha256', '?')[:12]}...) than this pipeline's; load that model (in the dtype "
            "it was trained in) for the learned result.", stacklevel=2)
    shifts = add_spectral_shifts(layers)
    with torch.no_grad():
        for name, shift in shifts.items():
            shift.delta.copy_(state[name])


def default_config(tier: str, quick: bool = False) -> TrainConfig:
    """Training defaults per model tier (``"real"``, ``"toy"``, ``"tiny"``); ``quick`` shortens the run.

    real: the unofficial port's single-subject recipe on SD1.5 (lr 1e-3, constant, batch 1, 500 steps, 512 px).
    toy: a starting point, to be tuned in the notebook: 300 steps at batch 8 and lr 5e-3 (a shorter run than on
    SD1.5, so a larger step), about 5 minutes at 64 px on a CPU (measured: 1.1 s a step on one busy CPU thread,
    the weights being recomputed from their SVD at every step). tiny: a handful of steps for tests.
    """
    return config_for_tier(tier, quick, {
        "real": TrainConfig(steps=500, batch_size=1, lr=1e-3, checkpoint_every=100),
        "toy": TrainConfig(steps=300, batch_size=8, lr=5e-3, checkpoint_every=100),
        "tiny": TrainConfig(steps=4, batch_size=2, lr=5e-3, checkpoint_every=2),
    })
