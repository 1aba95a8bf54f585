"""E4T (Gal et al. 2023, "Encoder-based Domain Tuning for Fast Personalization of Text-to-Image Models"): learn,
once, on a whole domain (faces), how to turn one photo into a word; then personalise in a few steps.

Two stages, one model:

1. **Domain pretraining** (``scripts/train_toy_e4t.py``, on ``nbutils.domain``'s many people). A frozen CLIP image
   tower turns a photo into features ``f`` (``ImageTower``: ``(N, F)``); a small encoder (``E4TEncoder``, an MLP)
   maps them to an *offset* in the text encoder's token-embedding space, and the subject word is the class word
   moved by it::

       v = embedding("person") + scale * encoder(f)        # (D,), D = 768 on SD1.5, 64 on the toy tier

   The prompt names the subject by a placeholder (``<e4t> person``) whose input embedding is ``v``, the way
   textual inversion injects its word (``nbutils.text.encode_with_token_rows``). At the same
   time the UNet's attention projections learn *weight offsets* shared by the whole domain: peft LoRA adapters on
   ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (``nbutils.lora.add_lora``), so they save in diffusers' LoRA format.
   The loss is the denoising loss on *another* photo of the reference's person (``domain.leave_one_out``: the
   encoder cannot copy the scene) plus the paper's two regularisers: an L2 penalty on the offset
   (``offset_l2 * ||scale * encoder(f)||^2``, keeping ``v`` near the class word, where the model's prior holds) and
   one on the weight offsets (``weight_l2 * sum over layers ||(alpha / r) B A||_F^2``).
2. **Personalisation** (``E4TPersonalise``, a ``nbutils.train.Method``): from *one* photo, the encoder and the
   weight offsets are tuned together for 5-15 steps at a low learning rate, with the same loss. The result is saved
   as what the rest of the project already loads (``save_personalised``): the computed subject vector ``v`` as a
   textual-inversion embedding (``learned_embeds.safetensors``, ``pipe.load_textual_inversion``) and the weight
   offsets as a LoRA (``pytorch_lora_weights.safetensors``, ``pipe.load_lora_weights``).

Simplification: the paper's encoder also reads UNet features of the noised image; here it reads only the CLIP
image features (every CLIP layer's class token, the mean patch token and the projected embedding).

Files: the pretrained (and a personalisation checkpoint's) encoder and LoRA are one ``e4t.safetensors``: tensors
``encoder.<name>`` and the diffusers LoRA tensors ``unet.<layer>.lora.down/up.weight``, header ``e4t_config``
(``E4TConfig`` as JSON) and the LoRA metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from nbutils.lora import LoRA, UNET_TARGETS
from nbutils.lora import WEIGHTS_NAME as LORA_WEIGHTS_NAME, load_lora
from nbutils.runs import REPO_ROOT, atomic_write, repo_path
from nbutils.text import add_tokens, check_captions, encode_with_token_rows, single_token_id, tokenize
from nbutils.textual_inversion import WEIGHTS_NAME as TI_WEIGHTS_NAME, load_textual_inversion
from nbutils.train import Batch, Method, TrainConfig, config_for_tier, diffusion_loss, encode_latents

WEIGHTS_NAME = "e4t.safetensors"
CONFIG_KEY = "e4t_config"
PLACEHOLDER = "<e4t>"
TOY_E4T_DIR = REPO_ROOT / "data" / "models" / "toy-encoders" / "e4t"
"""The toy tier's pretrained encoder and weight offsets (``scripts/train_toy_e4t.py``, ``make toy-encoders``)."""


@dataclass
class E4TConfig:
    """The E4T model's shape and regularisers.

    ``clip_dir``: the CLIP folder whose image tower gives the features (frozen); ``hidden``: the encoder's hidden
    width; ``scale``: the factor on the encoder's output (the offset is ``scale * encoder(f)``, in token-embedding
    units; the toy tier's token embeddings are about 0.16 long and two words differ by about 0.3);
    ``offset_l2``: weight of the mean squared offset norm in the loss; ``rank``/``alpha``: the LoRA weight offsets
    (update ``alpha / rank * B A``); ``weight_l2``: weight of the summed squared Frobenius norm of those updates;
    ``class_word``: the single-token word the offset moves; ``uncond_prob``: share of pretraining captions replaced
    by the empty prompt, so the weight offsets keep the unconditional prediction that guidance uses;
    ``latent_branch``: the encoder also reads the reference photo's VAE latent through a small CNN (the paper's
    encoder reads the diffusion model's own features of the image beside CLIP's; this is the cheapest such input,
    and it sees small details, the star mark, that CLIP's pooled features blur).
    """

    clip_dir: str = ""
    hidden: int = 256
    scale: float = 0.1
    offset_l2: float = 1e-2
    rank: int = 4
    alpha: float = 4.0
    weight_l2: float = 1e-2
    class_word: str = "person"
    uncond_prob: float = 0.1
    latent_branch: bool = False


# --------------------------------------------------------------------------------------------------- features
class ImageTower(nn.Module):
    """The frozen image tower of a ``transformers.CLIPModel``: images -> ``(N, F)`` float32 features.

    ``F = (layers + 1) * hidden + projection``: the class token of each transformer layer's output, the mean of
    the last layer's patch tokens, and the projected (CLIP-space) embedding. The toy CLIP: 3 layers of hidden 96,
    projection 64, so ``F = 448``, at 64 px.
    """

    def __init__(self, clip_dir: str | Path):
        super().__init__()
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True)
        self.vision, self.projection = clip.vision_model, clip.visual_projection
        self.requires_grad_(False).eval()
        preprocess = json.loads((Path(clip_dir) / "processor_config.json").read_text())["image_processor"]
        self.register_buffer("mean", torch.tensor(preprocess["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["image_std"]).view(1, 3, 1, 1), persistent=False)
        cfg = clip.config.vision_config
        self.size = cfg.image_size
        self.dim = (cfg.num_hidden_layers + 1) * cfg.hidden_size + clip.config.projection_dim

    @staticmethod
    def to_pixels(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images, or ``(N, 3, H, W)`` uint8 (0-255) or float (0-1) tensors -> ``(N, 3, H, W)`` float in [0, 1]."""
        if isinstance(images, torch.Tensor):
            return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def forward(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """``(N, F)`` features of ``images`` (see ``to_pixels``; resized to the tower's size, CLIP-normalised)."""
        x = self.to_pixels(images).to(self.mean.device)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 1)
        out = self.vision(pixel_values=(x - self.mean) / self.std, output_hidden_states=True)
        cls = [h[:, 0] for h in out.hidden_states[1:]]
        patches = out.hidden_states[-1][:, 1:].mean(dim=1)
        return torch.cat([*cls, patches, self.projection(out.pooler_output)], dim=-1).float()


class E4TEncoder(nn.Module):
    """Features ``(N, F)`` (and optionally the reference's VAE latents ``(N, 4, h, w)``) -> the scaled
    word-embedding offset ``scale * MLP(f)``, ``(N, D)``.

    LayerNorm, two hidden layers of ``hidden`` with GELU, a linear output that starts at zero (so training starts
    from the class word itself, as LoRA's B does). With ``latent_channels`` > 0 a CNN (three 3x3 convolutions, two
    of stride 2, pooled to 4 x 4) reads the latents and its projection is added to the first hidden layer.
    """

    def __init__(self, feature_dim: int, embed_dim: int, hidden: int = 256, scale: float = 0.1,
                 latent_channels: int = 0):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.latent_net = None
        if latent_channels:
            self.latent_net = nn.Sequential(
                nn.Conv2d(latent_channels, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.SiLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4),
                nn.Flatten(), nn.Linear(64 * 16, hidden))

    def forward(self, features: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        h = self.net[1](self.net[0](features))
        if self.latent_net is not None:
            if latents is None:
                raise ValueError("This E4T encoder reads the reference's VAE latents too: pass latents.")
            h = h + self.latent_net(latents.to(h))
        return self.scale * self.net[2:](h)


# --------------------------------------------------------------------------------------------------- text
def encode_with_subject_vectors(pipe: StableDiffusionPipeline, captions: Sequence[str], token_id: int,
                                vectors: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state ``(B, 77, D)`` for ``captions``, the placeholder token ``token_id`` of
    caption ``b`` reading ``vectors[b]`` (``vectors``: ``(B, D)``, or ``(1, D)`` for all), differentiably.

    Caption ``b``'s placeholder reads its own row (``encode_with_token_rows``), so one batch holds many people.
    Captions without the placeholder (the empty prompt) are encoded as they are.
    """
    ids = tokenize(pipe.tokenizer, captions)
    vectors = vectors.expand(len(captions), -1) if len(vectors) == 1 else vectors
    return encode_with_token_rows(pipe.text_encoder, ids, torch.tensor([token_id]), vectors[:, None, :])


# --------------------------------------------------------------------------------------------------- method
def weight_offset_l2(unet: nn.Module) -> torch.Tensor:
    """``sum over adapted layers ||(alpha / r) B A||_F^2``: the squared size of the LoRA weight offsets, a float32
    scalar (0 for a fresh adapter, whose B is zero)."""
    total = torch.zeros(())
    for module in unet.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            total = total + (module.scaling["default"] * delta).float().pow(2).sum()
    return total


class E4T(Method):
    """The E4T model on ``pipe``: the image tower (frozen), the encoder and the LoRA weight offsets (trained).

    Adds the placeholder token (``placeholder``, its row set to the class word's embedding) to ``pipe`` and LoRA
    adapters to its UNet. ``trainable_parameters``: the encoder's and the adapters' (float32). Pretraining calls
    ``domain_loss`` directly (its batches carry the reference's features); ``nbutils.train.train`` is for the
    personalisation subclass.
    """

    name = "e4t"
    weights_name = WEIGHTS_NAME

    def __init__(self, pipe: StableDiffusionPipeline, config: E4TConfig, *, placeholder: str = PLACEHOLDER,
                 tower: ImageTower | None = None, seed: int = 0):
        super().__init__(pipe)
        self.config = config
        self.tower = tower or ImageTower(config.clip_dir)
        weight = pipe.text_encoder.get_input_embeddings().weight
        self.class_embedding = weight[single_token_id(pipe.tokenizer, config.class_word)].detach().float().clone()
        self.placeholder = placeholder
        self.token_id = int(add_tokens(pipe, [placeholder], self.class_embedding[None])[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = E4TEncoder(self.tower.dim, weight.shape[1], config.hidden, config.scale,
                                      pipe.unet.config.in_channels if config.latent_branch else 0)
        self.encoder.to(pipe.device)
        self.lora = LoRA(pipe, config.rank, config.alpha, unet_targets=UNET_TARGETS, seed=seed)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters()) + self.lora.trainable_parameters()

    def subject_vectors(self, features: torch.Tensor, latents: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors, offsets)``, each ``(N, D)``: ``class embedding + offset`` and ``offset = scale * encoder(f)``
        for features ``(N, F)`` (and, with ``latent_branch``, the reference photos' scaled VAE latents)."""
        offsets = self.encoder(features.to(self.class_embedding.device), latents)
        return self.class_embedding + offsets, offsets

    def regulariser(self, offsets: torch.Tensor) -> torch.Tensor:
        """``offset_l2 * mean ||offset||^2 + weight_l2 * weight_offset_l2(unet)``, a float32 scalar."""
        cfg = self.config
        return cfg.offset_l2 * offsets.float().pow(2).sum(-1).mean() + cfg.weight_l2 * weight_offset_l2(self.pipe.unet)

    def domain_loss(self, batch: Batch, features: torch.Tensor, latents: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Denoising loss of ``batch`` (captions naming the subject by the placeholder) conditioned on the subject
        vectors of ``features`` ``(B, F)`` (and ``latents``, ``(B, 4, h, w)``) of the *reference* photos, plus
        ``regulariser``. Returns the loss and its parts ``{"diffusion", "offset_norm", "weight_l2"}`` (floats)."""
        vectors, offsets = self.subject_vectors(features, latents)
        text = encode_with_subject_vectors(self.pipe, batch.captions, self.token_id, vectors)
        diffusion = diffusion_loss(self.pipe.unet, self.noise_scheduler, batch, text)
        loss = diffusion + self.regulariser(offsets)
        parts = {"diffusion": diffusion.item(), "offset_norm": offsets.detach().norm(dim=-1).mean().item(),
                 "weight_l2": weight_offset_l2(self.pipe.unet).item()}
        return loss, parts

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """``encoder.<name>`` tensors and the diffusers LoRA tensors (``nbutils.lora.lora_state_dict``)."""
        encoder = {f"encoder.{k}": v.detach() for k, v in self.encoder.state_dict().items()}
        return {**encoder, **self.lora.state_dict_to_save()}

    def save_metadata(self) -> dict[str, str]:
        return {**self.lora.save_metadata(), CONFIG_KEY: json.dumps(asdict(self.config), sort_keys=True)}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        self.encoder.load_state_dict(encoder)
        self.lora.load_saved({k: v for k, v in state.items() if not k.startswith("encoder.")})
        self.after_step()


def read_config(path: str | Path) -> E4TConfig:
    """The ``E4TConfig`` stored in an ``e4t.safetensors`` header (``path``: the file or its folder)."""
    from safetensors import safe_open

    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    with safe_open(str(file), "pt") as f:
        return E4TConfig(**json.loads(f.metadata()[CONFIG_KEY]))


# --------------------------------------------------------------------------------------------------- personalise
class E4TPersonalise(E4T):
    """E4T's personalisation stage as a ``nbutils.train`` method: from the pretrained encoder and weight offsets in
    ``pretrained`` (a folder or ``e4t.safetensors``), tune both on the subject's photo(s) for a few steps.

    ``image``: the subject's photo (PIL, or ``(3, H, W)`` tensor), whose features are computed once (the tower is
    frozen). Captions name the subject by ``placeholder`` (``"a photo of <e4t> person, ..."``). After every step
    (and at construction) the current subject vector is copied into the placeholder's row of the text encoder, so
    ``pipe(prompt)`` draws the subject: at step 0 this is *the encoder alone*.
    """

    name = "e4t_personalise"

    def __init__(self, pipe: StableDiffusionPipeline, pretrained: str | Path, image: Image.Image | torch.Tensor, *,
                 placeholder: str = PLACEHOLDER, tower: ImageTower | None = None):
        config = read_config(pretrained)
        if not config.clip_dir or not Path(config.clip_dir).is_dir():
            from nbutils.toy_evaluators import TOY_CLIP_DIR

            config.clip_dir = str(TOY_CLIP_DIR)
        super().__init__(pipe, config, placeholder=placeholder, tower=tower)
        path = Path(pretrained)
        E4T.load_saved(self, load_file(path / WEIGHTS_NAME if path.is_dir() else path))
        image = image[None] if isinstance(image, torch.Tensor) and image.dim() == 3 else image
        self.features = self.tower(image if isinstance(image, torch.Tensor) else [image])  # (1, F)
        self.latents = None  # (1, 4, h, w), for an encoder with the latent branch
        if config.latent_branch:
            pil = image if not isinstance(image, torch.Tensor) else Image.fromarray(
                (ImageTower.to_pixels(image)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            self.latents = encode_latents(pipe, [pil], side)
        self.after_step()

    def vector(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vector, offset)`` of the subject, each ``(1, D)``."""
        return self.subject_vectors(self.features, self.latents)

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        check_captions(self.pipe.tokenizer, captions, self.token_id, self.placeholder)
        return encode_with_subject_vectors(self.pipe, captions, self.token_id, self.vector()[0])

    def loss(self, batch: Batch) -> torch.Tensor:
        """The denoising loss plus ``regulariser`` (the offset's and the weight offsets' L2 penalties)."""
        vector, offset = self.vector()
        text = encode_with_subject_vectors(self.pipe, batch.captions, self.token_id, vector)
        return diffusion_loss(self.pipe.unet, self.noise_scheduler, batch, text) + self.regulariser(offset)

    def after_step(self) -> None:
        """Copy the current subject vector into the placeholder's row of the text encoder."""
        if not hasattr(self, "features"):
            return
        weight = self.pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_id] = self.vector()[0][0].to(weight.dtype)

    def save_personalised(self, folder: str | Path) -> tuple[Path, Path]:
        """Write the personalised model into ``folder`` as diffusers loads it: ``learned_embeds.safetensors``
        (``{placeholder: (1, D)}``, the computed subject vector) and ``pytorch_lora_weights.safetensors`` (the
        weight offsets). Returns both paths; ``load_personalised`` reads them into a fresh pipeline."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save

        embeds = {self.placeholder: self.vector()[0].detach().float().cpu().contiguous()}
        atomic_write(folder / TI_WEIGHTS_NAME, save(embeds))
        lora = {k: v.detach().float().cpu().contiguous() for k, v in self.lora.state_dict_to_save().items()}
        atomic_write(folder / LORA_WEIGHTS_NAME, save(lora, metadata=self.lora.save_metadata()))
        return folder / TI_WEIGHTS_NAME, folder / LORA_WEIGHTS_NAME


def load_personalised(pipe: StableDiffusionPipeline, folder: str | Path) -> None:
    """Load a ``save_personalised`` folder into ``pipe``: ``load_textual_inversion`` (the subject word) and
    ``load_lora`` (the weight offsets, via ``pipe.load_lora_weights``)."""
    load_textual_inversion(pipe, folder)
    load_lora(pipe, folder)


def pretrained_folder(choice: str | Path, tier: str) -> Path:
    """Where a notebook's ``E4T_PRETRAINED`` parameter points: ``"auto"`` is ``TOY_E4T_DIR`` on the toy tier, else
    the given folder; ``FileNotFoundError`` saying what to do when it holds no ``WEIGHTS_NAME``."""
    if str(choice) == "auto" and tier != "toy":
        raise FileNotFoundError(
            f"No pretrained E4T for the {tier} tier ships with this study (E4T's domain pretraining needs a face "
            "collection and a GPU): set E4T_PRETRAINED to a folder written by scripts/train_toy_e4t.py for this "
            "model, or use MODEL='toy'.")
    folder = TOY_E4T_DIR if str(choice) == "auto" else repo_path(choice)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}: run `make toy-encoders` (or "
                                "scripts/train_toy_e4t.py --out FOLDER) first.")
    return folder


def read_recipe(folder: str | Path) -> dict:
    """What the E4T in ``folder`` was pretrained on, from its ``training.json``: ``people``, ``photos`` (per
    person), ``seed``, ``steps`` and ``minutes`` (the whole pretraining, domain rendering included)."""
    info = json.loads((Path(folder) / "training.json").read_text())
    recipe = info["recipe"]
    return {"people": recipe["people"], "photos": recipe["photos"], "seed": recipe["seed"], "steps": recipe["steps"],
            "minutes": round(info["seconds"]["whole_pretraining"] / 60, 1)}


def default_config(tier: str, quick: bool = False) -> TrainConfig:
    """Personalisation defaults per tier: E4T's few steps (the paper: 15) at a low learning rate, one photo
    repeated over the batch with fresh noise and timesteps; no intermediate checkpoints.

    toy: 5 steps of batch 8 at lr 3e-4, chosen on the validation subject (``data/subjects/toy-val``, 3 prompts x 16
    seeds, ``figures/sweeps/e4t_sweep_toy_val.csv``): the highest identity of lr 1e-4 / 3e-4 / 1e-3 x 5 / 10 / 15
    steps, 0.536 against 0.370-0.517 for the others and 0.462 for the encoder alone; about 1 s of tuning. real: 15 steps of batch 8 at 1e-5 (the paper's step count; untested here). tiny: 2 steps for tests.
    """
    return config_for_tier(tier, quick, {
        "real": TrainConfig(steps=15, batch_size=8, lr=1e-5, checkpoint_every=0),
        "toy": TrainConfig(steps=5, batch_size=8, lr=3e-4, checkpoint_every=0),
        "tiny": TrainConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_every=0),
    })
