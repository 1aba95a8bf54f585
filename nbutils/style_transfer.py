"""Neural style transfer (Gatys, Ecker & Bethge, CVPR 2016): optimise an image's pixels so that its VGG-19 features
match a content image at one layer and the Gram matrices of a style image at several.

The VGG-19 feature stack is torchvision's ``vgg19().features`` layout, written in plain torch, so its published
weights (``vgg19-dcbe5a78.pth``) load into it unchanged. Without them a seeded random network stands in: random
conv nets also capture texture (Ustyuzhaninov et al. 2017; He, Wang & Hopcroft 2016). Any frozen network can
stand in through a ``FeatureStack`` (its layer names, input scaling and default layers): ``vgg19_stack``,
``toy_attribute_stack`` (the toy evaluators' convolutions), ``clip_vision_stack`` (a CLIP ViT's patch tokens, read
as feature maps) and ``vae_encoder_stack`` (a diffusers VAE's encoder). ``stylise_batch`` optimises a batch of
images at once, a style given by one picture or by a set (their mean Gram matrices), optionally keeping the
content's colours (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style Transfer": luminance-only
transfer or colour-matched style images); ``gram_distance`` measures how far an image's style is from a reference.

On the toy tier no route of these reaches all four toy styles (``scripts/nst_networks.py``,
``figures/style_nst_networks.csv``); ``NST_DEFAULTS`` holds the best measured per tier.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from nbutils.photos import DEFAULT_MAX_PIXELS, read_photo, to_rgb
from nbutils.runs import REPO_ROOT

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbe5a78.pth"
VGG19_DIR = REPO_ROOT / "data" / "models" / "vgg19"
"""Where the published VGG-19 weights go (git-ignored, as every other folder under ``data/models/``)."""
VGG19_FILE = VGG19_DIR / "vgg19-dcbe5a78.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))  # (channels, conv layers) of each block, then a pool


def _layer_names() -> list[str]:
    names = []
    for block, (_, convs) in enumerate(_BLOCKS, start=1):
        for i in range(1, convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


VGG19_LAYERS = {name: index for index, name in enumerate(_layer_names())}
"""Conventional layer name -> index in the feature stack: ``conv1_1`` 0, ``relu1_1`` 1, ..., ``pool5`` 36.

Gatys et al. name layers as Caffe does, where ``conv4_2`` holds the rectified response: that is ``relu4_2`` here."""
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
"""The paper's style layers (equally weighted); its content layer is ``relu4_2``."""

NST_DEFAULTS = {
    "real": {"features": "vgg19", "colour": "style", "style_weight": 1e6},
    "toy": {"features": "vgg19-random", "colour": "luminance", "style_weight": 1e8},
}
"""Per model tier (``tiny`` as ``toy``), the NST route notebook 07 starts from: the feature network (its
``NST_FEATURES`` names), ``stylise_batch``'s ``colour`` and ``style_weight`` (content weight 1, 40 Adam steps).
Real: Gatys et al. 2016 with ImageNet VGG-19. Toy: the best route measured by ``scripts/nst_networks.py`` (16
personalised portraits x 4 styles; ``figures/style_nst_networks.csv``): luminance-only transfer with the random
VGG-19, which keeps identity (the toy identity embedder reads the hair and skin colours that the 2016 method
repaints) and reaches pixel art and watercolour, but not sketch or pop art."""


def nst_defaults(tier: str) -> dict[str, object]:
    """``NST_DEFAULTS`` of a model tier (``"real"``, ``"toy"`` or ``"tiny"``), a new dict."""
    if tier not in ("real", "toy", "tiny"):
        raise ValueError(f"unknown tier {tier!r}; choose 'real', 'toy' or 'tiny'")
    return dict(NST_DEFAULTS["real" if tier == "real" else "toy"])


@dataclass(frozen=True)
class FeatureStack:
    """A frozen network that NST reads features from: ``net``'s modules run in order, ``layers`` names module
    indices, images in [0, 1] are normalised with ``mean`` and ``std`` first; ``content_layer`` and
    ``style_layers`` are its defaults for ``stylise``. ``name`` says which network it is in messages and tables.
    ``readout`` turns a module's output into the ``(B, C, H, W)`` feature map the losses read (``None``: it is one;
    a transformer's ``(B, tokens, C)`` hidden states need one)."""

    net: nn.Sequential
    layers: Mapping[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    content_layer: str
    style_layers: tuple[str, ...]
    name: str
    readout: Callable[[torch.Tensor], torch.Tensor] | None = None


def vgg19_stack(net: nn.Sequential, name: str = "VGG-19") -> FeatureStack:
    """``net`` from ``vgg19_features`` as a ``FeatureStack``: ImageNet normalisation, the paper's layers."""
    return FeatureStack(net, VGG19_LAYERS, IMAGENET_MEAN, IMAGENET_STD, "relu4_2", STYLE_LAYERS, name)


def toy_attribute_stack(attribute_net: nn.Module) -> FeatureStack:
    """The convolutions of the toy evaluators' ``ToyAttributeNet`` (``body``: 4 blocks of a stride-2 conv, group
    norm, SiLU, conv, SiLU) as a ``FeatureStack``: layers ``conv{b}_1``, ``norm{b}_1``, ``act{b}_1``, ``conv{b}_2``,
    ``act{b}_2`` for blocks b = 1..4 (64 px in: 32, 16, 8 and 4 px maps), its own [-1, 1] input scaling; content
    ``act3_2``, style ``act1_1`` ... ``act4_1``, as VGG's first activation of each block."""
    blocks = (len(attribute_net.body) - 2) // 5  # the last two modules pool and flatten
    layers = {f"{kind}{b}_{i}": 5 * (b - 1) + k for b in range(1, blocks + 1)
              for k, (kind, i) in enumerate((("conv", 1), ("norm", 1), ("act", 1), ("conv", 2), ("act", 2)))}
    return FeatureStack(attribute_net.body[: 5 * blocks], layers, (0.5,) * 3, (0.5,) * 3, f"act{blocks - 1}_2",
                        tuple(f"act{b}_1" for b in range(1, blocks + 1)), "toy attribute net")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _ClipPatches(nn.Module):
    """``(B, 3, H, W)`` normalised pixels -> ``(B, N, C)`` patch embeddings (CLIP's patch convolution, no bias)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


class _ClipTokens(nn.Module):
    """``(B, N, C)`` patch embeddings -> ``(B, 1 + N, C)``: the class token prepended, position embeddings added,
    CLIP's pre-layernorm applied (``CLIPVisionEmbeddings`` and ``pre_layrnorm``)."""

    def __init__(self, class_embedding: torch.Tensor, position_embedding: nn.Embedding, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.class_embedding, self.position_embedding, self.norm = class_embedding, position_embedding, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return self.norm(torch.cat([cls, x], dim=1) + self.position_embedding.weight[None])


class _WithoutSecondInput(nn.Module):
    """``module(x, None)`` as a one-input module, for ``nn.Sequential``: a ``CLIPEncoderLayer`` without attention mask
    (``(B, 1 + N, C)`` -> same), a diffusers ``ResnetBlock2D`` without timestep embedding (``(B, C, H, W)`` ->
    ``(B, C', H, W)``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, None)


def clip_vision_stack(vision_model: nn.Module, name: str = "toy CLIP image tower") -> FeatureStack:
    """A ``transformers`` CLIP image tower (``CLIPModel.vision_model``, a ``CLIPVisionModel``) as a
    ``FeatureStack``: layers ``patches`` (the patch convolution), ``tokens`` (class and position embeddings, pre-
    layernorm) and ``layer1`` ... ``layerL`` (the encoder layers' outputs), each read as the ``(B, C, g, g)`` map
    of the ``g x g`` patch tokens (the class token is dropped). The images must be the model's ``image_size``
    (64 px for the toy CLIP: 8 px patches, ``g = 8``, ``C = 96``; its position embeddings are fixed to that grid);
    CLIP's own normalisation. Defaults, as VGG's: a deep layer for content (``layer2``), shallow ones for style
    (``patches``, ``layer1``). Shares the model's weights; frozen, eval. On the toy tier its NST paints patch-sized
    noise and reaches no toy style (``scripts/nst_networks.py``, ``figures/style_nst_networks.csv``)."""
    emb = vision_model.embeddings
    modules = [_ClipPatches(emb.patch_embedding),
               _ClipTokens(emb.class_embedding, emb.position_embedding, vision_model.pre_layrnorm),
               *(_WithoutSecondInput(layer) for layer in vision_model.encoder.layers)]
    names = ["patches", "tokens", *(f"layer{i}" for i in range(1, len(modules) - 1))]
    grid = emb.image_size // emb.patch_size

    def patch_map(x: torch.Tensor) -> torch.Tensor:  # (B, [1 +] g*g, C) -> (B, C, g, g): the last g*g tokens
        return x[:, -grid * grid :].transpose(1, 2).reshape(x.shape[0], -1, grid, grid)

    net = nn.Sequential(*modules).requires_grad_(False).eval()
    return FeatureStack(net, {n: i for i, n in enumerate(names)}, CLIP_MEAN, CLIP_STD, "layer2",
                        ("patches", "layer1"), name, patch_map)


def vae_encoder_stack(vae: nn.Module, name: str = "toy VAE encoder") -> FeatureStack:
    """The encoder of a diffusers ``AutoencoderKL`` (the model's own VAE) as a ``FeatureStack``, block by block:
    ``conv_in``, then per down block b = 1, 2, ... ``res{b}`` (its ResNet blocks' output) and ``down{b}`` (its
    downsampler, where it has one), then ``mid``; [-1, 1] input scaling. The toy VAE (``data/models/toy-sd/vae``:
    32, 64, 64 channels, one ResNet per block) maps 64 px to 64, 32, 16 px maps. Defaults, as VGG's: content the
    last block's ``res{B}`` (toy: ``res3``, 16 px), style ``conv_in`` and the other blocks' (toy: ``res1``,
    ``res2``). Shares the VAE's weights; frozen, eval. Trained on the
    toy world's every style, yet on the toy tier its NST paints a checkerboard and reaches no toy style
    (``scripts/nst_networks.py``)."""
    encoder = vae.encoder
    modules, layers = [encoder.conv_in], {"conv_in": 0}
    for b, block in enumerate(encoder.down_blocks, start=1):
        modules += [_WithoutSecondInput(r) for r in block.resnets]
        layers[f"res{b}"] = len(modules) - 1  # the last ResNet block's output
        for down in block.downsamplers or ():
            modules.append(down)
            layers[f"down{b}"] = len(modules) - 1
    modules.append(encoder.mid_block)
    layers["mid"] = len(modules) - 1
    net = nn.Sequential(*modules).requires_grad_(False).eval()
    blocks = len(encoder.down_blocks)
    return FeatureStack(net, layers, (0.5,) * 3, (0.5,) * 3, f"res{blocks}",
                        ("conv_in", *(f"res{b}" for b in range(1, blocks))), name)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` features -> ``(B, C, C)`` Gram matrices ``F F^T / (C * H * W)``, with ``F`` the ``(C, H*W)``
    feature map: the channels' mean product over positions, divided by ``C``, so it does not grow with image size."""
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of one layer's features, both ``(B, C, H, W)``; a scalar tensor."""
    return F.mse_loss(features, target)


def style_loss(features: Mapping[str, torch.Tensor], target_grams: Mapping[str, torch.Tensor],
               weights: Mapping[str, float]) -> torch.Tensor:
    """``sum over layers l in weights of weights[l] * MSE(gram_matrix(features[l]), target_grams[l])``; a scalar.

    ``features[l]`` is ``(B, C, H, W)`` and ``target_grams[l]`` ``(B, C, C)``; other layers of ``features`` are unused.
    """
    return sum(w * F.mse_loss(gram_matrix(features[layer]), target_grams[layer]) for layer, w in weights.items())


def vgg19_features(weights: Path | str | None, *, device: str | torch.device = "cpu", seed: int = 0) -> nn.Sequential:
    """VGG-19's convolutional stack: ``(B, 3, H, W)`` ImageNet-normalised -> ``(B, 512, H/32, W/32)``, frozen, eval.

    Modules 0-36 as torchvision's ``vgg19().features`` (3x3 convs with padding 1, ReLUs, 2x2 max pools; the ReLUs are
    not in-place, so conv outputs can be read), names in ``VGG19_LAYERS``. ``weights`` is a ``.safetensors`` file
    or torchvision's ``vgg19-dcbe5a78.pth`` (read with ``torch.load(weights_only=True)``, which unpickles tensors
    only); of either, the ``features.N.weight`` / ``features.N.bias`` tensors load strictly, the classifier is
    ignored. ``weights=None`` draws seeded random weights instead (Kaiming-normal for ReLU, zero biases).
    On ``device="meta"`` the network has shapes only: nothing is read or drawn. float32.
    """
    with torch.device("meta"):
        net = _vgg19_layout()
    if torch.device(device).type == "meta":
        return net.requires_grad_(False).eval()
    net = net.to_empty(device="cpu")
    if weights is None:
        generator = torch.Generator().manual_seed(seed)
        for conv in (m for m in net if isinstance(m, nn.Conv2d)):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(conv.bias)
    else:
        net.load_state_dict(_read_features(Path(weights)), strict=True)
    return net.to(device).requires_grad_(False).eval()


def _vgg19_layout() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for channels, convs in _BLOCKS:
        for _ in range(convs):
            layers += [nn.Conv2d(in_channels, channels, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _read_features(path: Path) -> dict[str, torch.Tensor]:
    """The ``features.N.*`` tensors of a weights file, keyed ``N.*`` as in ``_vgg19_layout``."""
    if not path.is_file():
        raise FileNotFoundError(f"No VGG-19 weights at {path}: download torchvision's vgg19-dcbe5a78.pth from "
                                f"{VGG19_URL} into {VGG19_DIR}/ (git-ignored) and pass its path, or pass "
                                "weights=None for seeded random weights.")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as file:
            state = {k: file.get_tensor(k) for k in file.keys() if k.startswith("features.")}
    elif path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path.name}: expected a .safetensors file or torchvision's vgg19-dcbe5a78.pth")
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{path} holds no 'features.N.weight' tensors: expected torchvision's VGG-19 state dict "
                         "(vgg19-dcbe5a78.pth) or a safetensors copy of it")
    return features


def _as_stack(net: nn.Sequential | FeatureStack) -> FeatureStack:
    return net if isinstance(net, FeatureStack) else vgg19_stack(net)


def extract(net: nn.Sequential | FeatureStack, image: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Features of ``image`` at the named layers: ``{name: (B, C, H', W')}`` in network order.

    ``net`` is a ``FeatureStack`` or a bare ``vgg19_features`` network (layer names ``VGG19_LAYERS``). ``image`` is
    ``(B, 3, H, W)`` RGB in [0, 1] on the net's device; it is normalised with the stack's mean and std here (VGG:
    ImageNet's). The net runs only as far as the deepest layer asked for.
    """
    stack = _as_stack(net)
    wanted: dict[int, str] = {}
    for name in layers:
        if name not in stack.layers:
            first, *_, last = stack.layers
            raise ValueError(f"unknown {stack.name} layer {name!r}: use one of {first} ... {last} "
                             "(FeatureStack.layers)")
        wanted[stack.layers[name]] = name
    mean = torch.tensor(stack.mean, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    std = torch.tensor(stack.std, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    x = (image - mean) / std
    out = {}
    for index, module in enumerate(stack.net[: max(wanted) + 1]):
        x = module(x)
        if index in wanted:
            out[wanted[index]] = stack.readout(x) if stack.readout else x
    return out


def gram_distance(net: nn.Sequential | FeatureStack, images: Sequence[Image.Image], reference: Image.Image,
                  layers: Sequence[str] | None = None) -> list[float]:
    """Per image, the style loss ``stylise`` minimises with weight 1: the mean over ``layers`` (default: the
    stack's style layers) of the MSE between its Gram matrices and ``reference``'s, the reference resized (aspect
    kept) so its longer side matches the image's. Lower is closer in style; images must share one size."""
    stack = _as_stack(net)
    layers = tuple(layers or stack.style_layers)
    param = next(stack.net.parameters())
    reference = _fit(reference, images[0].size)
    with torch.no_grad():
        feats = extract(stack, torch.cat([to_tensor(im) for im in images]).to(param), layers)
        target = {k: gram_matrix(f) for k, f in extract(stack, to_tensor(reference).to(param), layers).items()}
        weights = {k: 1.0 / len(layers) for k in layers}
        return [style_loss({k: f[b : b + 1] for k, f in feats.items()}, target, weights).item()
                for b in range(len(images))]


def _fit(style: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``style`` resized, aspect kept, so that its longer side matches the longer side of ``size``."""
    k = max(size) / max(style.size)
    return style.resize((max(1, round(style.width * k)), max(1, round(style.height * k))), Image.Resampling.LANCZOS)


COLOURS = ("style", "match", "luminance", "luminance-matched")
"""``stylise_batch``'s colour modes: the style's colours, the style colour-matched to the content, luminance only
(the content's chrominance kept), luminance only with the style's luminance matched to the content's."""


def stylise(
    content: Image.Image,
    style: Image.Image,
    net: nn.Sequential | FeatureStack,
    **options,
) -> tuple[Image.Image, dict[str, list[float]]]:
    """``stylise_batch`` for one image: ``content`` painted in the manner of ``style``; returns the image and its
    loss history (see ``stylise_batch`` for the options)."""
    images, history = stylise_batch([content], [style], net, **options)
    return images[0], history


def stylise_batch(
    contents: Sequence[Image.Image],
    styles: Sequence[Image.Image | Sequence[Image.Image]],
    net: nn.Sequential | FeatureStack,
    *,
    content_layer: str | None = None,
    style_layers: Sequence[str] | None = None,
    content_weight: float = 1.0,
    style_weight: float = 1e6,
    steps: int = 300,
    optimizer: str = "lbfgs",
    lr: float | None = None,
    seed: int = 0,
    init: str = "content",
    colour: str = "style",
    progress: bool = True,
) -> tuple[list[Image.Image], dict[str, list[float]]]:
    """Paint each of ``contents`` in the manner of its style image: the images' pixels are the only parameters.

    ``styles`` holds one style for all or one per content image: a style image, or a list of pictures of one style
    whose Gram matrices are averaged (a style set: what its pictures share, not what one of them shows); the
    content images share one size and are optimised together as one batch. Each image's loss is ``content_weight *
    content_loss`` at ``content_layer`` plus ``style_weight * style_loss`` over ``style_layers`` (equal weights
    summing to 1); the defaults are the stack's (VGG-19: ``relu4_2`` and ``STYLE_LAYERS``). The optimizer minimises
    the sum of the images' losses with ``optimizer`` "lbfgs" (``torch.optim.LBFGS``: one iteration per step with a
    strong-Wolfe line search, 2-3 loss evaluations; ``lr`` default 1.0; its line search is shared by the batch, so a
    batch's images differ a little from one-at-a-time runs) or "adam" (one evaluation per step; ``lr`` default 0.05,
    in pixel units of [0, 1]; per pixel, so the batch changes nothing but float rounding); pixels are clamped to
    [0, 1] after each step. It starts from the content images (``init="content"``) or from uniform noise drawn with
    ``seed`` for the whole batch (``init="noise"``); the same arguments give the same pixels.

    ``colour`` (Gatys et al. 2017, section 5): ``"style"`` lets the image take the style's colours (the 2016 method);
    ``"match"`` first maps each style image's colours to its content image's mean and covariance
    (``match_colours``); ``"luminance"`` transfers luminance only: content and style become grey images of their
    luminance, and each result's luminance replaces its content image's (``with_luminance``), so the content's
    chrominance is kept exactly; ``"luminance-matched"`` also shifts and scales the style's luminance to the
    content's mean and spread first, as the paper does. Their losses are those of the grey images.

    Returns the RGB images at the content size and ``{"content", "style", "total"}``: the weighted losses, mean
    over the batch, after 0, 1, ..., ``steps`` steps (``total = content + style``; the last entry is the returned
    images'). A style image is resized, aspect kept, so its longer side matches the content's. If a loss becomes
    NaN or infinite, it stops with a warning and returns the last images whose losses were finite.
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer={optimizer!r}: use 'lbfgs' or 'adam'")
    if init not in ("content", "noise"):
        raise ValueError(f"init={init!r}: use 'content' or 'noise'")
    if colour not in COLOURS:
        raise ValueError(f"colour={colour!r}: use one of {', '.join(map(repr, COLOURS))}")
    if len(styles) not in (1, len(contents)):
        raise ValueError(f"{len(styles)} styles for {len(contents)} content images: give one, or one each")
    if len({im.size for im in contents}) != 1:
        raise ValueError(f"the content images differ in size ({sorted({im.size for im in contents})}): resize "
                         "them to one size, or stylise them one at a time")
    stack = _as_stack(net)
    content_layer = content_layer or stack.content_layer
    style_layers = tuple(style_layers or stack.style_layers)
    lr = lr if lr is not None else {"lbfgs": 1.0, "adam": 0.05}[optimizer]
    param = next(stack.net.parameters())
    n = len(contents)
    target = torch.cat([to_tensor(im) for im in contents]).to(param)
    style_sets = [torch.cat([to_tensor(_fit(im, contents[0].size)) for im in _as_set(s)]).to(param) for s in styles]
    original = target
    if colour.startswith("luminance"):
        target = luminance(target).expand(-1, 3, -1, -1)
    with torch.no_grad():
        content_target = extract(stack, target, [content_layer])[content_layer]
        per_image = [extract(stack, _keep_colours(style_sets[b % len(style_sets)], original[b : b + 1], colour),
                             style_layers) for b in range(n)]
        grams = {name: torch.stack([gram_matrix(f[name]).mean(0) for f in per_image]) for name in style_layers}
    layer_weights = {name: 1.0 / len(style_layers) for name in style_layers}

    if init == "content":
        start = target.clone()
    else:
        start = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed)).to(param)
    x = start.requires_grad_(True)
    if optimizer == "lbfgs":  # one iteration per step; its line search keeps it stable under the clamping
        opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, max_eval=10, line_search_fn="strong_wolfe")
    else:
        opt = torch.optim.Adam([x], lr=lr)
    evaluations: list[tuple[float, float]] = []

    def measure() -> torch.Tensor:
        """The batch's summed loss, its gradient into ``x.grad``; the mean terms appended to ``evaluations``."""
        opt.zero_grad()
        feats = extract(stack, x, (content_layer, *style_layers))
        c = content_weight * torch.stack([content_loss(feats[content_layer][b : b + 1],
                                                       content_target[b : b + 1]) for b in range(n)])
        s = style_weight * torch.stack([style_loss({k: feats[k][b : b + 1] for k in style_layers},
                                                   {k: grams[k][b : b + 1] for k in style_layers}, layer_weights)
                                        for b in range(n)])
        (c + s).sum().backward()
        evaluations.append((c.mean().item(), s.mean().item()))
        return (c + s).sum()

    history: dict[str, list[float]] = {"content": [], "style": [], "total": []}
    good = x.detach().clone()
    bar = tqdm(total=steps, desc=f"stylise {n} image{'s' if n > 1 else ''}", disable=not progress)
    for step in range(steps + 1):
        images = x.detach().clone()  # the images after `step` steps: the first evaluation below measures them
        if step == steps:
            measure()  # the final images are measured, not moved
        elif optimizer == "lbfgs":
            opt.step(measure)  # measures, then its line search evaluates one or more trial images
        else:
            measure()
            opt.step()
        (c, s), *_ = evaluations
        evaluations.clear()
        if not math.isfinite(c + s):
            _warn_not_finite(step, steps, c + s, lr, content_weight, style_weight)
            break
        good = images
        for key, value in zip(("content", "style", "total"), (c, s, c + s)):
            history[key].append(value)
        with torch.no_grad():
            x.clamp_(0, 1)
        if step < steps:
            bar.update(1)
            bar.set_postfix(loss=f"{c + s:.3g}")
    bar.close()
    if colour.startswith("luminance"):
        good = with_luminance(original, luminance(good))
    return [_to_image(good[b : b + 1]) for b in range(n)], history


def _as_set(style: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    return [style] if isinstance(style, Image.Image) else list(style)


def _keep_colours(styles: torch.Tensor, content: torch.Tensor, colour: str) -> torch.Tensor:
    """``styles`` ``(K, 3, H, W)`` prepared for one ``content`` image ``(1, 3, H', W')`` as ``colour`` says
    (``stylise_batch``): unchanged, colour-matched to it, or grey with its luminance's mean and spread."""
    if colour == "match":
        return match_colours(styles, content.expand(len(styles), -1, -1, -1))
    if colour == "luminance":
        return luminance(styles).expand(-1, 3, -1, -1)
    if colour == "luminance-matched":
        y, y_content = luminance(styles), luminance(content)
        spread = y_content.std() / y.std((1, 2, 3), keepdim=True).clamp_min(1e-6)
        return ((y - y.mean((1, 2, 3), keepdim=True)) * spread + y_content.mean()).clamp(0, 1).expand(-1, 3, -1, -1)
    return styles


def luminance(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 1, H, W)`` luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` (YIQ's Y,
    ITU-R BT.601), in [0, 1]."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def with_luminance(images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``images`` ``(B, 3, H, W)`` with their luminance replaced by ``y`` ``(B, 1, H, W)``, chrominance (YIQ's I
    and Q) kept: YIQ -> RGB adds Y to every channel, so this adds ``y - luminance(images)`` to each; clamped to
    [0, 1]."""
    return (images + y - luminance(images)).clamp(0, 1)


def match_colours(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``source`` ``(B, 3, H, W)`` with its pixels' colours mapped affinely so that their mean and 3 x 3 covariance
    equal ``target``'s ``(B, 3, H', W')``, image by image: ``x -> C_t^(1/2) C_s^(-1/2) (x - m_s) + m_t`` with
    symmetric matrix square roots (the "image analogies" colour transfer of Gatys et al. 2017, section 5.2;
    ``eps`` is added to the covariances' diagonals); clamped to [0, 1]."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)  # (B, 3, P)
        mean = flat.mean(2, keepdim=True)
        centred = flat - mean
        cov = centred @ centred.transpose(1, 2) / flat.shape[2] + eps * torch.eye(3, dtype=x.dtype, device=x.device)
        return mean, cov

    def power(cov: torch.Tensor, p: float) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(cov)
        return vectors @ torch.diag_embed(values.clamp_min(eps) ** p) @ vectors.transpose(1, 2)

    (m_s, c_s), (m_t, c_t) = stats(source), stats(target)
    mapped = power(c_t, 0.5) @ power(c_s, -0.5) @ (source.flatten(2) - m_s) + m_t
    return mapped.reshape(source.shape).clamp(0, 1)


def _warn_not_finite(step: int, steps: int, loss: float, lr: float, content_weight: float,
                     style_weight: float) -> None:
    warnings.warn(f"stylise stopped: the loss of the image after {step} of {steps} steps is {loss}; returning the "
                  f"image after {max(step - 1, 0)} steps, the last with a finite loss. Try a lower lr (now {lr:g}) "
                  f"or lower weights (now content_weight={content_weight:g}, style_weight={style_weight:g}).",
                  RuntimeWarning, stacklevel=3)


def load_style_image(path: str | Path, *, min_side: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A style reference image, checked as photos are (``nbutils.photos.read_photo``); the file is only read.

    Returns it upright, 8-bit RGB (grey, CMYK, palette and 16-bit converted, transparency on white), downsized to
    at most ``max_pixels`` pixels. Raises ``FileNotFoundError`` when there is no such file and ``ValueError``,
    with the reason and what to do, when it is not an image or is under ``min_side`` px on its shorter side.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No style image at {path}: pass the path of an image file (jpg, png, webp)")
    image, reason = read_photo(path, min_side=min_side, max_pixels=max_pixels)
    if image is None:
        raise ValueError(f"style image {path.name}: {reason}")
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``(1, 3, H, W)`` float32 RGB in [0, 1]."""
    pixels = torch.tensor(np.asarray(to_rgb(image)), dtype=torch.float32) / 255
    return pixels.permute(2, 0, 1)[None].contiguous()


def _to_image(x: torch.Tensor) -> Image.Image:
    """``(1, 3, H, W)`` in [0, 1] -> RGB PIL image, ``W x H`` px."""
    pixels = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)
