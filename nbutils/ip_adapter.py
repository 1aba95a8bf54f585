"""IP-Adapter (Ye et al. 2023): an image prompt through decoupled cross-attention, with several reference photos.

Every cross-attention layer (``attn2``) of the frozen UNet keeps its text keys and values ``K = c_t W_k``,
``V = c_t W_v`` and gains image ones, ``K' = c_i W'_k``, ``V' = c_i W'_v``, over a few image tokens ``c_i``:

    Z = Attn(Q, K, V) + lambda * Attn(Q, K', V')

``c_i`` is a small *image projection* of one image embedding (a linear layer to ``NUM_TOKENS`` tokens of the text
width, then LayerNorm). Only the projection and ``W'_k``, ``W'_v`` train (``W'`` start as copies of the layer's
``to_k``/``to_v``, as in the paper); ``lambda = 0`` is the base model exactly.

Everything goes through diffusers' own IP-Adapter machinery, no forked UNet: the projection is diffusers'
``ImageProjection`` inside ``MultiIPAdapterImageProjection`` as ``unet.encoder_hid_proj`` (with
``encoder_hid_dim_type = "ip_image_proj"``), the layers are ``IPAdapterAttnProcessor2_0``, and the saved file is the
published checkpoint format (``image_proj.proj.*``, ``image_proj.norm.*``, ``ip_adapter.<k>.to_k_ip.weight``,
``ip_adapter.<k>.to_v_ip.weight``, ``k = 1, 3, 5, ...``: the processor index of each ``attn2``), so
``pipe.load_ip_adapter(folder, subfolder="", weight_name=WEIGHTS_NAME, image_encoder_folder=None)`` loads it.

Several photos of one person: their embeddings ``(N, D)`` are *aggregated* into one ``(D,)`` before the projection
(``aggregate``): ``"single"`` (the first photo), ``"max"``, ``"mean"`` or ``"attention"`` (``SelfAttentionPool``: a
learned self-attention layer over the N embeddings, then the mean; residual with a zero output layer, so it starts
as mean pooling). Sampling passes the result as ``ip_adapter_image_embeds=[torch.cat([negative, positive])]``,
shape ``(2, 1, D)`` with a zero negative (``image_prompt_embeds``).

Image embeddings: the toy tier uses the toy CLIP's image tower (``ImageEncoder.toy()``: 64-d features of 64 px
images); the real tier the published ``h94/IP-Adapter`` weights and their CLIP image encoder
(``load_published_ip_adapter``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from PIL import Image
from safetensors.torch import load_file, save
from torch import nn

from nbutils.models import ModelUnavailable
from nbutils.runs import REPO_ROOT, atomic_write, repo_path

NUM_TOKENS = 4  # image tokens per reference: what diffusers builds for a published "proj.weight" checkpoint
WEIGHTS_NAME = "ip_adapter.safetensors"
AGGREGATOR_NAME = "aggregator.safetensors"
PUBLISHED_REPO = "h94/IP-Adapter"
PUBLISHED_SUBFOLDER = "models"
PUBLISHED_WEIGHTS = "ip-adapter_sd15.safetensors"
TOY_ADAPTER_DIR = REPO_ROOT / "data" / "models" / "toy-encoders" / "ip-adapter"
"""The toy tier's adapter and pool, pretrained by ``scripts/train_toy_ip_adapter.py`` (``make toy-encoders``)."""
Aggregation = Literal["single", "max", "mean", "attention"]
AGGREGATIONS: tuple[str, ...] = ("single", "max", "mean", "attention")


# --------------------------------------------------------------------------------------------------- install
def cross_attention_processors(unet: UNet2DConditionModel) -> list[str]:
    """Names of ``unet``'s cross-attention processors (``...attn2.processor``), in ``attn_processors`` order."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def published_key_ids(unet: UNet2DConditionModel) -> list[int]:
    """The index ``k`` of ``ip_adapter.<k>.to_k_ip.weight`` for each cross-attention layer, as diffusers'
    ``_convert_ip_adapter_attn_to_diffusers`` reads a published file: 1, then 2 more per layer (1, 3, 5, ...)."""
    return [1 + 2 * i for i in range(len(cross_attention_processors(unet)))]


def _attention_module(unet: UNet2DConditionModel, processor_name: str):
    """The ``Attention`` module a processor name belongs to (``...attn2.processor`` -> ``...attn2``)."""
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def install_ip_adapter(
    unet: UNet2DConditionModel, image_embed_dim: int, *, scale: float = 1.0, num_tokens: int = NUM_TOKENS,
    seed: int = 0,
) -> None:
    """Give ``unet`` a fresh IP-Adapter for ``image_embed_dim``-d image embeddings, the way diffusers'
    ``_load_ip_adapter_weights`` installs a loaded one.

    Each ``attn2`` gets an ``IPAdapterAttnProcessor2_0`` of strength ``scale`` (lambda) whose ``to_k_ip``/``to_v_ip``
    (``(hidden, cross_attention_dim)``, no bias) are copies of the layer's ``to_k``/``to_v``; ``attn1`` keeps plain
    attention. ``unet.encoder_hid_proj`` becomes ``MultiIPAdapterImageProjection([ImageProjection(image_embed_dim,
    cross_attention_dim, num_tokens)])`` (initialised under a forked RNG seeded by ``seed``) and
    ``unet.config.encoder_hid_dim_type`` ``"ip_image_proj"``. The new tensors are float32 and trainable; the UNet's
    own weights are untouched.
    """
    cross_dim = unet.config.cross_attention_dim
    processors = {}
    for name, old in unet.attn_processors.items():
        if not name.endswith("attn2.processor"):
            processors[name] = type(old)() if not isinstance(old, IPAdapterAttnProcessor2_0) else AttnProcessor2_0()
            continue
        attn = _attention_module(unet, name)
        proc = IPAdapterAttnProcessor2_0(attn.to_k.out_features, cross_dim, num_tokens=[num_tokens], scale=scale)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        processors[name] = proc.to(unet.device)
    unet.set_attn_processor(processors)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = ImageProjection(image_embed_dim, cross_dim, num_tokens)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection]).to(unet.device)
    unet.config.encoder_hid_dim_type = "ip_image_proj"  # as diffusers' loader sets it


def ip_processors(unet: UNet2DConditionModel) -> list[IPAdapterAttnProcessor2_0]:
    """The IP-Adapter processors of ``unet``'s cross-attention layers, in order (``ValueError`` if none)."""
    procs = [unet.attn_processors[name] for name in cross_attention_processors(unet)]
    if not procs or not all(hasattr(p, "to_k_ip") for p in procs):
        raise ValueError("This UNet has no IP-Adapter: install_ip_adapter or pipe.load_ip_adapter first.")
    return procs


def ip_adapter_parameters(unet: UNet2DConditionModel) -> list[nn.Parameter]:
    """What IP-Adapter trains: the image projection's tensors, then every layer's ``W'_k``, ``W'_v``."""
    params = list(unet.encoder_hid_proj.parameters())
    for proc in ip_processors(unet):
        params += [proc.to_k_ip[0].weight, proc.to_v_ip[0].weight]
    return params


def set_ip_scale(unet: UNet2DConditionModel, scale: float) -> None:
    """Set lambda in every IP-Adapter layer (``pipe.set_ip_adapter_scale`` does the same on a pipeline)."""
    for proc in ip_processors(unet):
        proc.scale = [float(scale)]


# --------------------------------------------------------------------------------------------------- save / load
def ip_adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter in the published format: ``image_proj.proj.weight`` ``(NUM_TOKENS * C, D)``,
    ``image_proj.proj.bias``, ``image_proj.norm.weight/bias`` ``(C,)`` (C: cross-attention width, D: image
    embedding width) and ``ip_adapter.<k>.to_k_ip.weight`` / ``to_v_ip.weight`` ``(hidden, C)`` per layer
    (``published_key_ids``). Detached float32 CPU copies."""
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    state = {"image_proj.proj.weight": projection.image_embeds.weight, "image_proj.proj.bias":
             projection.image_embeds.bias, "image_proj.norm.weight": projection.norm.weight,
             "image_proj.norm.bias": projection.norm.bias}
    for key, proc in zip(published_key_ids(unet), ip_processors(unet)):
        state[f"ip_adapter.{key}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        state[f"ip_adapter.{key}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def load_ip_adapter_state(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors saved by ``ip_adapter_state_dict`` into an installed adapter (for resuming a training)."""
    with torch.no_grad():
        for key, value in ip_adapter_state_dict(unet).items():
            if state[key].shape != value.shape:
                raise ValueError(f"{key}: saved {tuple(state[key].shape)}, adapter {tuple(value.shape)}")
        projection = unet.encoder_hid_proj.image_projection_layers[0]
        projection.image_embeds.weight.copy_(state["image_proj.proj.weight"])
        projection.image_embeds.bias.copy_(state["image_proj.proj.bias"])
        projection.norm.weight.copy_(state["image_proj.norm.weight"])
        projection.norm.bias.copy_(state["image_proj.norm.bias"])
        for key, proc in zip(published_key_ids(unet), ip_processors(unet)):
            proc.to_k_ip[0].weight.copy_(state[f"ip_adapter.{key}.to_k_ip.weight"])
            proc.to_v_ip[0].weight.copy_(state[f"ip_adapter.{key}.to_v_ip.weight"])


def save_ip_adapter(unet: UNet2DConditionModel, folder: str | Path, *, aggregator: nn.Module | None = None,
                    metadata: dict | None = None) -> Path:
    """Write ``folder/WEIGHTS_NAME`` (published format, ``metadata`` as JSON strings in its header) and, if given,
    the aggregator's tensors as ``folder/AGGREGATOR_NAME``; each written atomically. Returns ``folder``."""
    folder = Path(folder)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(folder / WEIGHTS_NAME, save(ip_adapter_state_dict(unet), metadata={"format": "pt", **header}))
    if aggregator is not None:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in aggregator.state_dict().items()}
        atomic_write(folder / AGGREGATOR_NAME, save(tensors, metadata={"format": "pt"}))
    return folder


def load_ip_adapter(pipe: StableDiffusionPipeline, folder: str | Path, *, scale: float = 1.0) -> None:
    """Load a ``save_ip_adapter`` folder into ``pipe`` with diffusers' own loader
    (``pipe.load_ip_adapter(folder, subfolder="", weight_name=WEIGHTS_NAME, image_encoder_folder=None)``: the
    image embeddings are given as ``ip_adapter_image_embeds``), then set lambda to ``scale``."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}: train it with scripts/train_toy_ip_adapter.py.")
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS_NAME, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)


def load_aggregator(folder: str | Path, dim: int) -> "SelfAttentionPool | None":
    """The ``SelfAttentionPool`` saved in ``folder/AGGREGATOR_NAME`` for ``dim``-d embeddings (eval mode); ``None``
    when ``folder`` holds none (the published SD1.5 adapter comes without one)."""
    file = Path(folder) / AGGREGATOR_NAME
    if not file.is_file():
        return None
    pool = SelfAttentionPool(dim)
    pool.load_state_dict(load_file(file))
    return pool.eval()


def pretrained_source(choice: str | Path, tier: str) -> str | Path:
    """Where a notebook's ``IP_ADAPTER`` parameter points: ``"auto"`` is ``TOY_ADAPTER_DIR`` on the toy tier and the
    published ``PUBLISHED_REPO`` on SD1.5; a folder is taken as it is, anything else as a hub id."""
    if str(choice) != "auto":
        return repo_path(choice) if repo_path(choice).is_dir() else str(choice)
    if tier == "toy":
        return TOY_ADAPTER_DIR
    if tier == "real":
        return PUBLISHED_REPO
    raise ValueError(f"No IP-Adapter is trained for the {tier} tier: set IP_ADAPTER to an adapter folder, or use "
                     "MODEL='toy' (its adapter: make toy-encoders) or SD1.5.")


def attach(pipe: StableDiffusionPipeline, source: str | Path, *, scale: float = 1.0) -> "ImageEncoder":
    """Load the adapter at ``source`` (``pretrained_source``) into ``pipe`` at strength ``scale`` and return the
    image encoder whose embeddings it reads: a ``save_ip_adapter`` folder (``load_ip_adapter``) reads the toy CLIP,
    the published weights (``load_published_ip_adapter``) their own CLIP image encoder."""
    if (Path(source) / WEIGHTS_NAME).is_file():
        load_ip_adapter(pipe, source, scale=scale)
        return ImageEncoder.toy()
    load_published_ip_adapter(pipe, str(source), scale=scale)
    return ImageEncoder.from_pipeline(pipe)


def read_recipe(source: str | Path) -> dict:
    """What the adapter at ``source`` was pretrained on, from its ``training.json``: ``people``, ``photos`` (per
    person), ``seed``, ``steps`` (adapter, then pool) and ``minutes`` (the whole pretraining, data included); for the published
    weights ``{"source": ...}``."""
    file = Path(source) / "training.json"
    if not file.is_file():
        return {"source": f"{source} (published weights)"}
    info = json.loads(file.read_text())
    recipe = info["recipe"]
    return {"people": recipe["people"], "photos": recipe["photos"], "seed": recipe["seed"],
            "steps": f"{recipe['adapter_steps']} + {recipe['pool_steps']} (pool)",
            "minutes": round(info["seconds_this_session"] / 60, 1)}


def load_published_ip_adapter(pipe: StableDiffusionPipeline, source: str = PUBLISHED_REPO, *,
                              scale: float = 1.0) -> None:
    """The published SD1.5 IP-Adapter (``source``: the hub id ``h94/IP-Adapter`` or a local copy of it) and its
    CLIP image encoder (``models/image_encoder``) into ``pipe``; lambda set to ``scale``.

    Raises ``ModelUnavailable`` with the fix in one sentence when the weights are neither reachable nor local.
    """
    try:
        pipe.load_ip_adapter(source, subfolder=PUBLISHED_SUBFOLDER, weight_name=PUBLISHED_WEIGHTS)
    except (OSError, ValueError):
        raise ModelUnavailable(
            f"The IP-Adapter weights '{source}' could not be loaded (no network access to the Hugging Face hub and "
            f"no local copy): on a machine with internet run `huggingface-cli download {PUBLISHED_REPO} "
            f"{PUBLISHED_SUBFOLDER}/{PUBLISHED_WEIGHTS} --include '{PUBLISHED_SUBFOLDER}/image_encoder/*' "
            "--local-dir FOLDER` and pass FOLDER as source."
        ) from None
    pipe.set_ip_adapter_scale(scale)


# --------------------------------------------------------------------------------------------------- image features
@dataclass
class ImageEncoder:
    """A CLIP image tower: PIL images -> ``(N, D)`` float32 image embeddings (the projected CLIP features, not
    normalised, as diffusers' ``encode_image`` gives them). ``model`` is a ``CLIPModel`` or a
    ``CLIPVisionModelWithProjection``; ``processor`` its ``CLIPImageProcessor`` (PIL backend)."""

    model: nn.Module
    processor: object

    @classmethod
    def toy(cls) -> "ImageEncoder":
        """The toy CLIP's image tower (``nbutils.toy_evaluators.TOY_CLIP_DIR``): 64 px input, 64-d features."""
        from transformers import AutoImageProcessor, CLIPModel

        from nbutils.toy_evaluators import TOY_CLIP_DIR

        model = CLIPModel.from_pretrained(TOY_CLIP_DIR, use_safetensors=True).eval().requires_grad_(False)
        return cls(model, AutoImageProcessor.from_pretrained(TOY_CLIP_DIR, backend="pil"))

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline) -> "ImageEncoder":
        """The image encoder and feature extractor that ``load_published_ip_adapter`` put into ``pipe``."""
        if getattr(pipe, "image_encoder", None) is None:
            raise ValueError("The pipeline has no image encoder: load_published_ip_adapter(pipe) first.")
        return cls(pipe.image_encoder, pipe.feature_extractor)

    @property
    def dim(self) -> int:
        """D, the embedding width (64 on the toy tier, 1024 for the published SD1.5 adapter's ViT-H)."""
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.vision_config.projection_dim)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """``(N, D)`` float32 embeddings on the CPU of ``images`` (any size: the processor resizes them)."""
        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(device, self.model.dtype)
            if hasattr(self.model, "get_image_features"):  # CLIPModel (transformers 5: a ModelOutput)
                feats = self.model.get_image_features(pixel_values=pixels).pooler_output
            else:  # CLIPVisionModelWithProjection
                feats = self.model(pixels).image_embeds
            out.append(feats.float().cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------------------------------- aggregation
class SelfAttentionPool(nn.Module):
    """Self-attention over a person's N reference embeddings, then their mean: ``(B, N, D) -> (B, D)``.

    ``y = x + MHA(LN(x))`` (no positional encoding, so the order of the references does not matter), then the mean
    over N. The attention's output layer starts at zero: an untrained pool is exactly mean pooling.
    """

    def __init__(self, dim: int, heads: int = 4, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.norm = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return (x + self.attn(h, h, h, need_weights=False)[0]).mean(dim=1)


def aggregate(embeds: torch.Tensor, how: Aggregation, pool: nn.Module | None = None) -> torch.Tensor:
    """One embedding per person from their references: ``(B, N, D)`` -> ``(B, D)`` (or ``(N, D)`` -> ``(D,)``).

    ``"single"``: the first reference; ``"max"``/``"mean"``: elementwise over N; ``"attention"``: ``pool`` (a
    ``SelfAttentionPool``, required).
    """
    if embeds.ndim == 2:
        return aggregate(embeds[None], how, pool)[0]
    if embeds.ndim != 3 or embeds.shape[1] < 1:
        raise ValueError(f"Give the references' embeddings as (B, N, D) or (N, D), got {tuple(embeds.shape)}.")
    if how == "single":
        return embeds[:, 0]
    if how == "max":
        return embeds.max(dim=1).values
    if how == "mean":
        return embeds.mean(dim=1)
    if how == "attention":
        if pool is None:
            raise ValueError("aggregation 'attention' needs its trained SelfAttentionPool (load_aggregator).")
        return pool(embeds)
    raise ValueError(f"Unknown aggregation {how!r}: choose from {AGGREGATIONS}.")


def image_prompt_embeds(embedding: torch.Tensor) -> list[torch.Tensor]:
    """The pipeline's ``ip_adapter_image_embeds`` for one aggregated ``(D,)`` embedding: ``[(2, 1, D)]``, the
    zero embedding (the unconditional image, what training drops images to) first, then the person's. The
    pipeline splits it for classifier-free guidance and repeats it for every image of a batch."""
    e = embedding.reshape(1, 1, -1).float()
    return [torch.cat([torch.zeros_like(e), e])]


def ip_added_cond(embeds: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The UNet's ``added_cond_kwargs`` for a batch of aggregated embeddings ``(B, D)``: ``{"image_embeds":
    [(B, 1, D)]}`` (one image per item), as the pipeline builds them."""
    return {"image_embeds": [embeds[:, None]]}


class WithImagePrompt(nn.Module):
    """``unet`` called with image embeddings: ``WithImagePrompt(unet, embeds)(sample, t, text)`` is
    ``unet(sample, t, text, added_cond_kwargs=ip_added_cond(embeds))``, so ``nbutils.train.diffusion_loss`` (which
    calls ``unet(noisy, t, text)``) trains an adapter unchanged. ``embeds``: ``(B, D)`` aggregated embeddings."""

    def __init__(self, unet: UNet2DConditionModel, embeds: torch.Tensor):
        super().__init__()
        self.unet, self.embeds = unet, embeds

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        return self.unet(sample, timestep, text, added_cond_kwargs=ip_added_cond(self.embeds.to(self.unet.dtype)))
