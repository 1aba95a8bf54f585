"""Evaluation metrics with one interface for every model tier.

* **Identity**: mean cosine similarity of face embeddings, generated x reference. The real tier uses dlib's 128-D
  ResNet face descriptor (``DlibFaceEmbedder``); the toy tier a toy identity embedder with the same protocol
  (``IdentityEmbedder``).
* **CLIP-T / CLIP-I** (DreamBooth's text and image fidelity): mean cosine of CLIP embeddings, reported as raw cosines
  in [-1, 1], *not* in the ``100 * max(cos, 0)`` CLIPScore convention. Any ``CLIPModel`` by hub id or local folder.
* **DINO** (DreamBench's subject fidelity, real tier): mean cosine of self-supervised ViT-S/16 CLS embeddings,
  generated x reference (``DinoScorer``).
* **FID / KID / IS** through torchmetrics with an injected feature network: the toy evaluator's on the toy tier,
  torchmetrics' own Inception on the real tier when torch-fidelity and its weights are there (``load_fid_inception``).
* **Uncertainty**: ``bootstrap_ci``, a percentile bootstrap interval of a mean over images.
* **Success rate** (toy tier): the share of images in which the attribute net reads the subject's true identity
  and the scene and style the prompt asked for (``success_per_image``); with the subject's true identity known,
  FID/KID compare with fresh renders of it (``toy_reference_renders``) instead of the training photos.

* **DreamBooth's failure modes**: ``language_drift`` (the bare class prompt draws the subject) and
  ``nearest_training_similarity`` (overfitting to the training photos' context).

``evaluate_images`` is the one call a method notebook makes per checkpoint; ``suite_for_tier`` builds its models.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import pickle
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import dlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm
from transformers import (AutoImageProcessor, BaseImageProcessor, CLIPModel, CLIPTokenizer, ViTImageProcessorPil,
                          ViTModel)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from nbutils import toyworld
from nbutils.faces import centre_crop, detect_faces, face_model_path
from nbutils.models import ModelUnavailable, Tier, hub_offline
from nbutils.prompts import CLASS_PROMPT, strip_subject, toy_request

if TYPE_CHECKING:  # diffusers is imported where it is used (language_drift)
    from diffusers import StableDiffusionPipeline

REAL_CLIP = "openai/clip-vit-base-patch32"
REAL_DINO = "facebook/dino-vits16"  # DreamBench's DINO metric: the self-supervised ViT-S/16 of Caron et al. 2021
BATCH = 32  # images per forward pass of a CLIP or feature network
NoFaceRule = Literal["zero", "skip"]
BOOTSTRAP_RESAMPLES = 1000  # resamples of bootstrap_ci in evaluate_images
AttributeReader = Callable[[Sequence[Image.Image]], Mapping[str, torch.Tensor]]
"""images -> ``{attribute: (N,) int64}``, the index of each predicted value in ``toyworld``'s value lists
(``toyworld.Portrait.labels``' order): the toy attribute net (``ToyEvaluators.predict``)."""


# --------------------------------------------------------------------------------------------------- identity
class IdentityEmbedder(Protocol):
    """Anything that embeds faces: dlib on the real tier, the toy identity embedder on the toy tier."""

    name: str

    def embed(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) float32 L2-normalised embeddings and (N,) bool 'face found'; rows with no face are zeros."""
        ...


class DlibFaceEmbedder:
    """dlib's face recognition: the 128-D ResNet descriptor of the largest face that ``nbutils.faces`` detects
    (HOG detector, 5-point landmarks) in each image, on the CPU.

    dlib's own rule: two descriptors closer than 0.6 (Euclidean) are the same person (99.38% on LFW). The detector
    finds frontal faces of about 40 px and larger (photos are first scaled to at most 640 px, see ``nbutils.faces``).
    """

    name = "dlib-resnet-v1"
    same_person_distance = 0.6

    def __init__(self) -> None:
        self._resnet = dlib.face_recognition_model_v1(str(face_model_path("dlib_face_recognition_resnet_model_v1.dat")))

    def descriptors(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """dlib's raw (N, 128) float32 descriptors (not unit length) and (N,) bool 'face found'; no face -> zeros."""
        out = torch.zeros(len(images), 128)
        found = torch.zeros(len(images), dtype=torch.bool)
        for i, image in enumerate(tqdm(images, desc="dlib faces", leave=False)):
            faces = detect_faces(image)
            if faces:
                face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
                shape = dlib.full_object_detection(dlib.rectangle(*map(int, face.box)),
                                                   [dlib.point(round(x), round(y)) for x, y in face.landmarks])
                out[i] = torch.tensor(self._resnet.compute_face_descriptor(np.asarray(image.convert("RGB")), shape))
                found[i] = True
        return out, found

    def embed(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 128) float32 unit-length descriptors and (N,) bool 'face found'; rows with no face are zeros."""
        desc, found = self.descriptors(images)
        return F.normalize(desc, dim=1), found

    def face_distance(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> torch.Tensor:
        """(Na, Nb) float32 Euclidean distances of dlib descriptors; NaN where either image has no face.

        ``< self.same_person_distance`` (0.6) is dlib's same-person rule.
        """
        a, found_a = self.descriptors(images_a)
        b, found_b = self.descriptors(images_b)
        dist = torch.cdist(a.double(), b.double()).float()
        dist[~found_a] = float("nan")
        dist[:, ~found_b] = float("nan")
        return dist


def _identity_scores(
    gen: torch.Tensor, gen_found: torch.Tensor, ref: torch.Tensor, ref_found: torch.Tensor, rule: NoFaceRule
) -> dict[str, float | int | str | None]:
    """Identity scores from embeddings: see ``identity_similarity``."""
    if rule not in ("zero", "skip"):
        raise ValueError(f"no_face must be 'zero' or 'skip', not {rule!r}")
    if len(gen) == 0:
        raise ValueError("no generated images to score; generate at least one image per prompt")
    if not ref_found.any():
        raise ValueError(
            f"no face found in any of the {len(ref)} reference photos; use photos where the face is clearly visible, "
            "facing the camera"
        )
    cos = torch.where(gen_found[:, None], gen @ ref[ref_found].T, 0.0)  # (N_gen, N_ref_faces)
    if rule == "zero":
        identity: float | None = cos.mean().item()
    else:
        identity = cos[gen_found].mean().item() if gen_found.any() else None
    return {
        "identity": identity,
        "detection_rate": gen_found.float().mean().item(),
        "n_generated": len(gen),
        "n_faces": int(gen_found.sum()),
        "n_reference_faces": int(ref_found.sum()),
        "rule": rule,
    }


def _identity_per_image(
    gen: torch.Tensor, gen_found: torch.Tensor, ref: torch.Tensor, ref_found: torch.Tensor, rule: NoFaceRule
) -> list[float | None]:
    """Each generated image's mean cosine to the reference faces; an image without a face scores 0.0 (``"zero"``)
    or ``None`` (``"skip"``), so the mean of the values that are not ``None`` is ``_identity_scores``' identity."""
    cos = (gen @ ref[ref_found].T).mean(dim=1).tolist()
    missing = 0.0 if rule == "zero" else None
    return [c if found else missing for c, found in zip(cos, gen_found.tolist())]


def identity_similarity(
    generated: Sequence[Image.Image],
    references: Sequence[Image.Image],
    embedder: IdentityEmbedder,
    *,
    no_face: NoFaceRule = "zero",
) -> dict[str, float | int | str | None]:
    """Mean cosine similarity of face embeddings over all generated x reference pairs.

    Papers differ on generated images where no face is found, so the rule is explicit: ``"zero"`` scores each of
    their pairs 0 (a missing face is a failure of identity; comparable across methods), ``"skip"`` averages over the
    images with a face only (``identity`` is ``None`` if there are none). Reference photos without a face are left
    out; if none has a face this raises ``ValueError``.

    Returns ``{"identity", "detection_rate" (share of generated images with a face), "n_generated", "n_faces",
    "n_reference_faces", "rule"}``.
    """
    gen, gen_found = embedder.embed(generated)
    ref, ref_found = embedder.embed(references)
    return _identity_scores(gen, gen_found, ref, ref_found, no_face)


def psnr_db(images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """Peak signal-to-noise ratio in dB of ``images`` against same-sized ``references`` (8-bit RGB), over all pixels
    of all pairs at once: ``10 log10(1 / MSE)`` with pixel values in [0, 1]."""
    if len(images) != len(references) or not images:
        raise ValueError(f"psnr_db needs pairs: got {len(images)} images and {len(references)} references")
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images]) / 255
    b = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in references]) / 255
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


# --------------------------------------------------------------------------------------------------- CLIP
def _unit_features(images: Sequence[Image.Image], processor, model: nn.Module, device: torch.device,
                   embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``embed`` over ``images`` in batches of ``BATCH``: each batch RGB, through ``processor`` (a transformers image
    processor) to ``model``'s device and dtype; returns (N, D) float32 unit-length rows on the CPU."""
    if not images:
        raise ValueError("no images to embed")
    feats = []
    for start in range(0, len(images), BATCH):
        batch = [image.convert("RGB") for image in images[start : start + BATCH]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        feats.append(embed(pixels.to(device, model.dtype)).float().cpu())
    return F.normalize(torch.cat(feats), dim=-1)


class ClipScorer:
    """CLIP-T and CLIP-I with any ``CLIPModel``, by hub id or local folder (loaded once, kept on ``device``).

    The folder (or hub repo) must hold the model (safetensors), its tokenizer and ``preprocessor_config.json``.
    Images are preprocessed by transformers' PIL backend, the same on every machine. Raises ``ModelUnavailable``
    when the model cannot be loaded, so a caller can report the other metrics.
    """

    def __init__(self, model_ref: str | Path, device: str | torch.device = "cpu") -> None:
        self.name = str(model_ref)
        self.device = torch.device(device)
        try:
            local = {"local_files_only": hub_offline()}
            self.model = CLIPModel.from_pretrained(model_ref, use_safetensors=True, **local).eval().to(self.device)
            self.tokenizer = CLIPTokenizer.from_pretrained(model_ref, **local)
            self.image_processor = AutoImageProcessor.from_pretrained(model_ref, backend="pil", **local)
        except (OSError, ValueError) as err:
            if Path(model_ref).is_dir():
                fix = (f"the folder {self.name!r} is not a complete CLIP folder: re-save it with CLIPModel and "
                       "CLIPProcessor .save_pretrained (safetensors weights, tokenizer, preprocessor_config.json)")
            else:
                fix = (f"CLIP model {self.name!r} is neither a local folder nor in the Hugging Face cache: download "
                       f"it once with network access (`hf download {model_ref}`) or pass a CLIP folder (the toy "
                       "one comes from `make toy-model`)")
            raise ModelUnavailable(f"{fix}.") from err

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, P) float32 unit-length CLIP image embeddings on the CPU (P: the model's projection size)."""
        # transformers 5's get_image_features returns a ModelOutput, not a tensor
        return _unit_features(images, self.image_processor, self.model, self.device,
                              lambda pixels: self.model.get_image_features(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, P) float32 unit-length CLIP text embeddings on the CPU; prompts longer than 77 tokens are cut."""
        if not prompts:
            raise ValueError("no prompts to embed")
        feats = []
        for start in range(0, len(prompts), BATCH):
            tokens = self.tokenizer(list(prompts[start : start + BATCH]), padding=True, truncation=True,
                                    max_length=self.tokenizer.model_max_length, return_tensors="pt")
            out = self.model.get_text_features(**tokens.to(self.device))
            feats.append(out.pooler_output.float().cpu())
        return F.normalize(torch.cat(feats), dim=-1)

    def clip_t(self, images: Sequence[Image.Image], prompts: str | Sequence[str]) -> float:
        """Mean cosine of each image with its prompt (one prompt for all, or one per image).

        Pass prompts *without* the subject token (``nbutils.prompts.strip_subject``).
        """
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt, or one per image")
        unique = sorted(set(prompts))
        text = self.text_features(unique)[[unique.index(p) for p in prompts]]
        return (self.image_features(images) * text).sum(dim=-1).mean().item()

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """Mean cosine of CLIP image embeddings over all generated x reference pairs."""
        return (self.image_features(images) @ self.image_features(references).T).mean().item()


# --------------------------------------------------------------------------------------------------- DINO
class DinoScorer:
    """DreamBench's DINO metric (DreamBooth, Ruiz et al. 2023, section 4.1): the average pairwise cosine similarity
    of the ViT-S/16 DINO embeddings of generated and real images, over all generated x real pairs.

    The embedding is the CLS token of the last layer (after its layer norm: ``last_hidden_state[:, 0]``), 384-D for
    ViT-S/16. DINO is trained without labels to tell images apart, so unlike CLIP-I it separates subjects of one
    class (two people, two dogs) and rewards the subject's own details; 1.0 only for identical embeddings.

    ``model``: any ``ViTModel`` (``from_pretrained`` loads ``facebook/dino-vits16``; tests build one in code);
    ``image_processor``: its preprocessing, by default that checkpoint's (resize to 224 x 224, bilinear, ImageNet
    mean and std), with transformers' PIL backend, the same on every machine.
    """

    def __init__(
        self, model: ViTModel, image_processor: BaseImageProcessor | None = None, *, name: str = "ViT built in code",
        device: str | torch.device = "cpu",
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.image_processor = image_processor or ViTImageProcessorPil(image_mean=IMAGENET_DEFAULT_MEAN,
                                                                       image_std=IMAGENET_DEFAULT_STD)

    @classmethod
    def from_pretrained(cls, model_ref: str | Path = REAL_DINO, device: str | torch.device = "cpu") -> DinoScorer:
        """Load a ``ViTModel`` and its image processor by hub id or local folder, safetensors weights only (a
        pickled ``pytorch_model.bin`` is never read). Raises ``ModelUnavailable`` when they cannot be loaded."""
        try:
            local = {"local_files_only": hub_offline()}
            model = ViTModel.from_pretrained(model_ref, add_pooling_layer=False, use_safetensors=True, **local)
            processor = AutoImageProcessor.from_pretrained(model_ref, backend="pil", **local)
        except (OSError, ValueError) as err:
            if Path(model_ref).is_dir():
                fix = (f"the folder {str(model_ref)!r} is not a complete DINO folder: re-save it with ViTModel and "
                       "its image processor's .save_pretrained (model.safetensors, as pickled weights are never "
                       "loaded, and preprocessor_config.json)")
            elif "safetensors" in str(err):
                fix = (f"the hub repo {str(model_ref)!r} has no safetensors weights, and this project loads no "
                       "pickled ones: pass a folder written by ViTModel.save_pretrained (model.safetensors)")
            else:
                fix = (f"DINO model {str(model_ref)!r} is neither a local folder nor in the Hugging Face cache: "
                       f"download it once with network access (`hf download {model_ref}`) or pass its folder")
            raise ModelUnavailable(f"{fix}.") from err
        return cls(model, processor, name=str(model_ref), device=device)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit-length CLS embeddings on the CPU (D: the ViT's hidden size, 384 for ViT-S/16)."""
        return _unit_features(images, self.image_processor, self.model, self.device,
                              lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])

    def similarity(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """DreamBench's DINO score: the mean cosine over all generated x reference pairs, in [-1, 1]."""
        return (self.image_features(generated) @ self.image_features(references).T).mean().item()


# --------------------------------------------------------------------------------------------------- FID, KID, IS
def _input_size(net: nn.Module, image_size: int | None) -> int:
    size = image_size if image_size is not None else getattr(net, "image_size", None)
    if size is None:
        raise ValueError(f"the input size of {type(net).__name__} is unknown; pass image_size= or give the network "
                         "an `image_size` attribute (pixels)")
    return int(size)


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [0, 1]: each image centre-cropped to a square and resized (Lanczos)."""
    squares = [np.asarray(centre_crop(image, size)) for image in images]
    return torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def network_outputs(net: nn.Module, images: Sequence[Image.Image], image_size: int | None = None) -> torch.Tensor:
    """(N, D) float32 CPU outputs of ``net`` for ``images`` given as (B, 3, S, S) floats in [0, 1] on its device.

    S is ``image_size``, else ``net.image_size``; every image is centre-cropped and resized to S x S first.
    The network is used as given (put it in eval mode).
    """
    size = _input_size(net, image_size)
    tensor = next(itertools.chain(net.parameters(), net.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    outs = [net(batch.to(device)).float().cpu() for batch in images_to_tensor(images, size).split(BATCH)]
    return torch.cat(outs)


class _Given(nn.Module):
    """A pass-through "network": torchmetrics then runs on outputs computed once by ``network_outputs``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of a dummy forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def inception_score(
    images: Sequence[Image.Image], logits_net: nn.Module, *, image_size: int | None = None, seed: int = 0
) -> dict[str, float | None]:
    """Inception Score of ``images`` with ``logits_net`` ((B, 3, S, S) in [0, 1] -> (B, C) logits), in [1, C].

    One split per 10 images (at most 10), so ``is_std`` is ``None`` for fewer than 20 images; the splits are drawn
    from ``seed``. Returns ``{"is_mean", "is_std"}``.
    """
    logits = network_outputs(logits_net, images, image_size)
    splits = max(1, min(10, len(images) // 10))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")  # one split: std is None
        torch.manual_seed(seed)
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits)
        metric.update(logits)
        mean, std = metric.compute()
    return {"is_mean": mean.item(), "is_std": std.item() if splits > 1 else None}


def distribution_metrics(
    real_images: Sequence[Image.Image],
    fake_images: Sequence[Image.Image],
    feature_net: nn.Module,
    logits_net: nn.Module | None = None,
    *,
    image_size: int | None = None,
    seed: int = 0,
) -> dict[str, float | None]:
    """FID and KID between two image sets, and the Inception Score of ``fake_images``, via torchmetrics.

    ``feature_net`` maps (B, 3, S, S) float images in [0, 1] to (B, D) features; ``logits_net`` maps them to (B, C)
    class logits (``None`` -> ``is_mean``/``is_std`` are ``None``; see ``inception_score``). Every image is
    centre-cropped and resized to S = ``image_size``, else the net's ``image_size`` attribute, whatever its own
    resolution. No torch-fidelity is needed: torchmetrics only wants it for its own Inception network. KID uses 100
    random subsets of ``min(50, n)`` images (n: the smaller set), drawn from ``seed``. With a few dozen images these
    are rough, biased estimates: compare them only at equal set sizes.

    Returns ``{"fid", "kid_mean", "kid_std", "is_mean", "is_std"}``.
    """
    if len(real_images) < 2 or len(fake_images) < 2:
        raise ValueError(f"FID and KID need at least 2 images per set, got {len(real_images)} real and "
                         f"{len(fake_images)} generated")
    real = network_outputs(feature_net, real_images, image_size)
    fake = network_outputs(feature_net, fake_images, image_size)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        torch.manual_seed(seed)
        fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subset_size=min(50, len(real), len(fake)))
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        kid_mean, kid_std = kid.compute()
        result: dict[str, float | None] = {"fid": fid.compute().item(), "kid_mean": kid_mean.item(),
                                           "kid_std": kid_std.item(), "is_mean": None, "is_std": None}
    if logits_net is not None:
        result.update(inception_score(fake_images, logits_net, image_size=image_size, seed=seed))
    return result


class InceptionFeatures(nn.Module):
    """torchmetrics' own FID network as a feature net: (B, 3, S, S) float images in [0, 1] -> (B, 2048) float32 pool
    features of torch-fidelity's port of the TensorFlow InceptionV3 that defined FID.

    Pixels go in as the 8-bit values they came from (rounded; torchmetrics' ``normalize=True`` truncates, which can
    turn a 255 into 254); the network resizes them to 299 x 299 itself (bilinear, antialiased). ``image_size`` is
    299, so ``network_outputs`` centre-crops and resizes each image to that first.
    """

    image_size = 299
    num_features = 2048

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception  # uint8 (B, 3, H, W) -> (B, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception((x * 255).round().to(torch.uint8)).float()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Within the block every ``torch.load`` uses torch's restricted unpickler (tensors and containers, no code),
    even where its caller passes ``weights_only=False`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read at each load)."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_fid_inception(device: str | torch.device = "cpu") -> InceptionFeatures:
    """The network of torchmetrics' own ``FrechetInceptionDistance(feature=2048)`` (which KID shares), on ``device``.

    torchmetrics takes it from torch-fidelity (which needs torchvision: Colab has both, ``pip install
    torch-fidelity``), and torch-fidelity downloads its weights once from its GitHub release into torch.hub's
    ``checkpoints`` folder. That file is a pickled state dict, so it is read with torch's weights-only unpickler
    (``_weights_only_loads``): tensors only, never code. ``distribution_metrics`` with this net computes what
    torchmetrics' FID and KID compute on the same 299 px images. Raises ``ModelUnavailable`` when torch-fidelity is
    missing or the weights cannot be downloaded or read.
    """
    try:
        with _weights_only_loads():
            metric = FrechetInceptionDistance(feature=2048)
    except ModuleNotFoundError as err:
        raise ModelUnavailable("torchmetrics' FID Inception comes from torch-fidelity, which is not installed: "
                               "`pip install torch-fidelity` (it needs torchvision, as on Colab).") from err
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something other than tensors
        raise ModelUnavailable(f"torch-fidelity's Inception weights file in {_hub_checkpoints()} holds more than "
                               "tensors, so it was not loaded: delete it and let torch-fidelity download it again "
                               "with network access to github.com.") from err
    except (OSError, RuntimeError) as err:  # no network; a damaged file
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelUnavailable(f"torch-fidelity could not fetch or read its Inception weights ({why}): run once with "
                               f"network access to github.com, which caches them in {_hub_checkpoints()} (delete a "
                               "damaged file there first).") from err
    return InceptionFeatures(metric.inception).to(device)


def _hub_checkpoints() -> Path:
    """The folder where torch.hub, and so torch-fidelity, caches downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# --------------------------------------------------------------------------------------------------- uncertainty
def bootstrap_ci(
    values: Sequence[float], *, seed: int = 0, n_resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> list[float] | None:
    """Percentile bootstrap interval ``[low, high]`` of the mean of ``values`` (e.g. one score per image).

    Draws ``n_resamples`` samples of ``len(values)`` values with replacement (numpy, seeded by ``seed``), takes each
    one's mean and returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of those means: for
    ``level=0.95`` the 2.5 % and 97.5 % points. The interval says how far the mean could move if the same number of
    images were drawn again; it narrows as ``1 / sqrt(n)`` and is ``[v, v]`` when every value is ``v``. ``None``
    for no values. A list, so it goes into JSON as it is.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    picks = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))
    low, high = np.quantile(x[picks].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


# --------------------------------------------------------------------------------------------------- toy truth
def _asked_labels(truth: toyworld.Identity, request: Mapping[str, str]) -> dict[str, int]:
    """The class index of every attribute a success needs: the identity traits (``truth`` with the prompt's
    changes, e.g. red hair), the style, and the scene if the prompt names one."""
    labels = toyworld.with_fields(toyworld.Portrait(truth), **request).labels()
    keep = (*toyworld.IDENTITY_FIELDS, "style", *(["scene"] if "scene" in request else []))
    return {k: labels[k] for k in keep}


def success_per_image(
    predicted: Mapping[str, torch.Tensor], found: torch.Tensor, truth: toyworld.Identity,
    requests: Sequence[Mapping[str, str] | None],
) -> list[bool | None]:
    """Per image: "is it me, where I asked, in the style I asked" (toy tier).

    ``predicted``: the attribute net's ``{attribute: (N,) int64}`` (an ``AttributeReader``); ``found``: (N,) bool,
    a face found (the suite's face detector); ``truth``: the subject's true identity; ``requests``: per image its
    prompt's ``nbutils.prompts.toy_request``. ``True`` where a face is found, every identity trait is read as
    ``truth``'s (with the prompt's own changes, e.g. ``hair_colour`` for "with red long hair") and the style and
    the scene equal the prompt's (any scene when the prompt names none; the expression is not checked);
    ``None`` where the request is ``None`` (not a toy-world prompt).
    """
    out: list[bool | None] = []
    for i, request in enumerate(requests):
        if request is None:
            out.append(None)
            continue
        asked = _asked_labels(truth, request)
        out.append(bool(found[i]) and all(int(predicted[k][i]) == v for k, v in asked.items()))
    return out


def trait_read_rates(predicted: Mapping[str, torch.Tensor], truth: toyworld.Identity) -> dict[str, float]:
    """Per identity trait, the share of images whose attribute-net reading (``predicted``: ``{attribute: (N,)
    int64}``, an ``AttributeReader``'s output) is ``truth``'s value: which parts of who the subject is the images
    carry (a success needs all six), ``{field: share in [0, 1]}`` in ``toyworld.IDENTITY_FIELDS`` order."""
    labels = toyworld.Portrait(truth).labels()
    return {f: float((predicted[f] == labels[f]).float().mean()) for f in toyworld.IDENTITY_FIELDS}


def toy_reference_renders(
    truth: toyworld.Identity, requests: Sequence[Mapping[str, str]], counts: Sequence[int], *, size: int, seed: int
) -> list[Image.Image]:
    """Fresh renders of the subject as the prompts ask, the toy tier's FID/KID reference set.

    ``counts[j]`` renders for ``requests[j]`` (a ``toy_request``), in that order: ``truth`` with the request's
    changes, in its style and scene; a scene the prompt leaves open takes the five ``toyworld.SCENES`` in turn.
    Pose, expression (unless asked) and texture are random, drawn from ``seed``: the same renders for the same
    arguments. RGB images of ``size`` x ``size`` pixels. Every checkpoint of a run asks for the same set, so the
    latest few are kept in memory (drawing 48 takes about 1 s on one CPU core).
    """
    if len(requests) != len(counts):
        raise ValueError(f"{len(requests)} requests but {len(counts)} counts; give one count per request")
    frozen = tuple(tuple(sorted(r.items())) for r in requests)
    return list(_renders(truth, frozen, tuple(counts), size, seed))


@functools.lru_cache(maxsize=4)
def _renders(truth: toyworld.Identity, requests: tuple, counts: tuple[int, ...], size: int,
             seed: int) -> tuple[Image.Image, ...]:
    rng = random.Random(seed)
    out = []
    for request, n in zip(requests, counts):
        for k in range(n):
            changes = {"scene": toyworld.SCENES[k % len(toyworld.SCENES)], **dict(request)}
            out.append(toyworld.render(toyworld.with_fields(toyworld.random_portrait(rng, truth), **changes), size))
    return tuple(out)


def _mean(values: Sequence[float | bool | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


# --------------------------------------------------------------------------------------------------- one call
@dataclass
class EvalSuite:
    """The models that score one tier; a part left ``None`` is reported as ``None`` (with a warning)."""

    identity: IdentityEmbedder
    clip: ClipScorer | None = None
    feature_net: nn.Module | None = None  # (B, 3, S, S) in [0, 1] -> (B, D) features, for FID/KID
    logits_net: nn.Module | None = None  # (B, 3, S, S) in [0, 1] -> (B, C) logits, for IS
    image_size: int | None = None  # S; None: the nets' own `image_size` attribute
    attributes: AttributeReader | None = None  # the toy attribute net, for the success rate (toy tier only)
    dino: DinoScorer | None = None  # DreamBench's DINO (real tier)
    tier: Tier | None = None  # the tier suite_for_tier built it for; "real" always reports DINO, None if missing

    @property
    def reports_dino(self) -> bool:
        """Whether ``evaluate_images`` returns ``dino``/``dino_model``: with a DINO scorer, and on the real tier
        always (``None`` when its model could not be loaded); the toy tier's results keep their keys."""
        return self.dino is not None or self.tier == "real"

    @property
    def image_features(self) -> Callable[[Sequence[Image.Image]], torch.Tensor] | None:
        """An image embedder, images -> (N, D) unit-length features: CLIP's image tower, DINO's where CLIP could
        not be loaded, ``None`` where neither could (the real tier offline)."""
        scorer = self.clip or self.dino
        return scorer.image_features if scorer is not None else None


def suite_for_tier(tier: Tier, device: str | torch.device = "cpu") -> EvalSuite:
    """The evaluation models of a tier.

    ``real``: dlib faces, ``openai/clip-vit-base-patch32`` (CLIP-T, CLIP-I), DreamBench's DINO
    (``facebook/dino-vits16``, ``DinoScorer``) and torchmetrics' own FID Inception as the FID/KID network
    (``load_fid_inception``: needs torch-fidelity and, once, network access to fetch its weights); each one that
    cannot be loaded is ``None``, with a warning that says how to get it, and its scores are ``None``. No IS network.
    ``toy``/``tiny``: the toy evaluators (``nbutils.toy_evaluators``), their attribute net as ``attributes``, and
    the toy CLIP folder; no DINO.
    """
    if tier == "real":
        return EvalSuite(DlibFaceEmbedder(), _optional(lambda: ClipScorer(REAL_CLIP, device), "CLIP-T and CLIP-I"),
                         _optional(lambda: load_fid_inception(device), "FID and KID"),
                         dino=_optional(lambda: DinoScorer.from_pretrained(REAL_DINO, device), "DINO"), tier=tier)
    if tier in ("toy", "tiny"):
        from nbutils.toy_evaluators import SIZE, load_toy_evaluators  # lazy: needs the trained toy evaluators

        toy = load_toy_evaluators()
        return EvalSuite(toy.identity, _optional(lambda: ClipScorer(toy.clip_ref, device), "CLIP-T and CLIP-I"),
                         toy.feature_net, toy.logits_net, SIZE, attributes=toy.predict, tier=tier)
    raise ValueError(f"unknown tier {tier!r}; choose 'real', 'toy' or 'tiny'")


def identity_embedder_for_tier(tier: Tier) -> IdentityEmbedder:
    """Only the identity embedder of ``suite_for_tier(tier)`` (dlib faces, or the toy identity embedder), without
    loading CLIP: for checks that need no other score (e.g. whether an augmentation keeps who it is)."""
    if tier == "real":
        return DlibFaceEmbedder()
    if tier in ("toy", "tiny"):
        from nbutils.toy_evaluators import load_toy_evaluators

        return load_toy_evaluators().identity
    raise ValueError(f"unknown tier {tier!r}; choose 'real', 'toy' or 'tiny'")


_Loaded = TypeVar("_Loaded")


def _optional(load: Callable[[], _Loaded], scores: str) -> _Loaded | None:
    """``load()``, or ``None`` with the warning "<scores> will be None: <why, and the fix>" if it raises
    ``ModelUnavailable``."""
    try:
        return load()
    except ModelUnavailable as err:
        warnings.warn(f"{scores} will be None: {err}", stacklevel=3)
        return None


def evaluate_images(
    generated: Mapping[str, Sequence[Image.Image]],
    references: Sequence[Image.Image],
    suite: EvalSuite,
    *,
    subject_phrase: str,
    class_phrase: str = "a person",
    no_face: NoFaceRule = "zero",
    seed: int = 0,
    truth: toyworld.Identity | None = None,
) -> dict:
    """Every metric of one checkpoint: ``generated`` maps each prompt (with ``subject_phrase`` in it) to its images.

    Identity and CLIP-T are given overall and per prompt (``"per_prompt"``); CLIP-T compares each image with its
    prompt after ``strip_subject(prompt, subject_phrase, class_phrase)``. CLIP-I compares generated with reference
    images. DINO (``suite.reports_dino``: the real tier, or a suite given a ``DinoScorer``) is DreamBench's score
    of generated against reference images (``DinoScorer.similarity``). A metric whose model is missing from
    ``suite`` is ``None``, with a warning. See ``identity_similarity`` for ``no_face``.

    ``truth``: the subject's true toy-world identity (toy tier; ``nbutils.study.SubjectData.identity``), ``None``
    where it cannot be known (real photos, the real tier). With it, and the suite's attribute net, ``success_rate``
    is the share of images that ``success_per_image`` counts (the subject, in the prompt's scene and style), over
    the prompts that ``nbutils.prompts.toy_request`` reads; else ``None``.

    FID/KID compare a reference set (real) with all generated images, IS scores the generated ones. The reference
    set (``fid_references``): ``"renders"`` when ``truth`` is known and every prompt is a toy-world prompt, one
    fresh render of the subject per generated image, in its prompt's scene and style (``toy_reference_renders``,
    drawn from ``seed``), so FID/KID measure how far the images are from the subject drawn as asked;
    else ``"photos"``, the ``references`` (a handful, so FID/KID are rough: compare them only between runs with
    equal set sizes). FID and KID are ``None``, with a warning, when either set has fewer than 2 images.

    Uncertainty: ``identity_ci``/``clip_t_ci`` are 95 % percentile bootstrap intervals (``bootstrap_ci``,
    ``BOOTSTRAP_RESAMPLES`` resamples seeded by ``seed``) of the mean over the generated images, from
    ``identity_per_image`` (each image's mean cosine to the reference faces; no face: 0.0 under ``"zero"``, ``None``
    under ``"skip"``) and ``clip_t_per_image``; ``success_per_image`` holds each image's success (``None``: not a
    toy-world prompt). The per-image lists run over the prompts in ``generated``'s order, images in their order,
    so that images of several runs can be pooled.

    Returns the keys of ``identity_similarity`` plus ``identity_model``, ``clip_model``, ``clip_t``, ``clip_i``,
    ``identity_ci``, ``clip_t_ci`` (``[low, high]`` or ``None``), ``dino_model`` and ``dino`` (only where
    ``suite.reports_dino``; the toy tier's results have neither), ``identity_per_image``, ``clip_t_per_image``
    (lists of floats, ``None`` without CLIP), ``success_rate`` (in [0, 1] or ``None``), ``success_per_image``
    (``None`` without a success rate), ``fid``, ``kid_mean``, ``kid_std``, ``fid_references`` (``None`` without
    FID), ``is_mean``, ``is_std`` and ``per_prompt``: ``{prompt: {"identity", "detection_rate", "clip_t",
    "success_rate"}}``. Everything is JSON-ready.
    """
    prompts = list(generated)
    class_prompts = [strip_subject(p, subject_phrase, class_phrase) for p in prompts]  # fails early on a typo
    images = [image for prompt in prompts for image in generated[prompt]]
    counts = [len(generated[p]) for p in prompts]
    bounds = np.cumsum([0] + counts)
    gen, gen_found = suite.identity.embed(images)
    ref, ref_found = suite.identity.embed(references)
    result: dict = {"identity_model": suite.identity.name, **_identity_scores(gen, gen_found, ref, ref_found, no_face)}
    identity_per_image = _identity_per_image(gen, gen_found, ref, ref_found, no_face)
    result["identity_ci"] = bootstrap_ci([v for v in identity_per_image if v is not None], seed=seed)

    clip_t = None  # (N_generated,) cosine of each image with its stripped prompt
    result.update(clip_model=suite.clip.name if suite.clip else None, clip_t=None, clip_i=None, clip_t_ci=None)
    if suite.clip is None:
        warnings.warn("no CLIP model in the suite: CLIP-T and CLIP-I are None", stacklevel=2)
    else:
        image_feats = suite.clip.image_features(images)
        text_feats = suite.clip.text_features(class_prompts)
        owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.from_numpy(np.diff(bounds)))
        clip_t = (image_feats * text_feats[owner]).sum(dim=-1)
        result["clip_t"] = clip_t.mean().item()
        result["clip_t_ci"] = bootstrap_ci(clip_t.tolist(), seed=seed)
        result["clip_i"] = (image_feats @ suite.clip.image_features(references).T).mean().item()
    if suite.reports_dino and suite.dino is None:
        warnings.warn("no DINO model in the suite: DINO is None", stacklevel=2)
        result.update(dino_model=None, dino=None)
    elif suite.reports_dino:
        result.update(dino_model=suite.dino.name, dino=suite.dino.similarity(images, references))

    requests = [toy_request(p, subject_phrase) for p in prompts]
    success = None  # (N_generated,) bool or None per image
    if truth is not None and suite.attributes is None:
        warnings.warn("no attribute net in the suite: the success rate is None", stacklevel=2)
    elif truth is not None:
        per_image_requests = [r for r, n in zip(requests, counts) for _ in range(n)]
        success = success_per_image(suite.attributes(images), gen_found, truth, per_image_requests)
    result.update(success_rate=None if success is None else _mean(success), success_per_image=success)

    per_prompt = {}
    for p, a, b in zip(prompts, bounds[:-1], bounds[1:]):
        scores = _identity_scores(gen[a:b], gen_found[a:b], ref, ref_found, no_face)
        per_prompt[p] = {"identity": scores["identity"], "detection_rate": scores["detection_rate"],
                         "clip_t": None if clip_t is None else clip_t[a:b].mean().item(),
                         "success_rate": None if success is None else _mean(success[a:b])}

    result.update(fid=None, kid_mean=None, kid_std=None, fid_references=None, is_mean=None, is_std=None)
    if suite.feature_net is None:
        warnings.warn("no feature network in the suite (on the real tier: torchmetrics' Inception did not load, see "
                      "suite_for_tier's warning): FID and KID are None", stacklevel=2)
    else:
        fid_references, kind = references, "photos"
        if truth is not None and all(r is not None for r in requests):
            size = min(images[0].size)
            fid_references = toy_reference_renders(truth, requests, counts, size=size, seed=seed)
            kind = "renders"
        if min(len(fid_references), len(images)) < 2:
            warnings.warn(f"FID and KID need at least 2 images per set, here {len(fid_references)} reference {kind} "
                          f"and {len(images)} generated: they are None", stacklevel=2)
        else:
            result.update(fid_references=kind, **distribution_metrics(fid_references, images, suite.feature_net,
                                                                      image_size=suite.image_size, seed=seed))
    if suite.logits_net is None:
        warnings.warn("no logits network in the suite: the Inception Score is None", stacklevel=2)
    else:
        result.update(inception_score(images, suite.logits_net, image_size=suite.image_size, seed=seed))
    result.update(identity_per_image=identity_per_image,
                  clip_t_per_image=None if clip_t is None else clip_t.tolist(), per_prompt=per_prompt)
    return result


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
    from nbutils.sampling import generate  # diffusers: imported where it is used

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

