"""Toy-tier evaluators, trained on the portrait world's ground truth (``scripts/train_toy_evaluators.py``).

They stand in for the real tier's measuring instruments with the same interfaces, so evaluation is one code path:

- ``ToyAttributeNet``: a small CNN with one classification head per attribute (identity traits, expression, scene,
  style). Its identity heads give the **identity embedder** (stands in for a face-recognition model); its scene and
  style heads are the scene/style classifiers; its pooled features feed FID/KID and its style logits the Inception
  Score.
- ``ToyFaceDetector``: finds a person in the picture (stands in for a face detector), so that identity is not read
  from an image with nobody in it.
- The **toy CLIP** is a ``transformers.CLIPModel`` folder (``data/models/toy-clip``) loaded like any CLIP.

Images enter as PIL images or ``(N, 3, H, W)`` float tensors in [0, 1]; they are resized to 64 x 64.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from nbutils.toyworld import IDENTITY_FIELDS, LABEL_SIZES

EVALUATOR_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "toy-evaluators"
TOY_CLIP_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "toy-clip"
ATTRIBUTE_FILE = "attribute_net.safetensors"
DETECTOR_FILE = "face_detector.safetensors"
SIZE = 64


def to_batch(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """PIL images (any size) or a float tensor -> ``(N, 3, 64, 64)`` float32 in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        return x if x.shape[-1] == SIZE else F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


class ToyAttributeNet(nn.Module):
    """CNN: ``(N, 3, 64, 64)`` in [0, 1] -> 128-D features -> logits per attribute of ``LABEL_SIZES``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(chans[-1], n) for k, n in LABEL_SIZES.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 64, 64)`` -> ``(N, 128)`` pooled features (FID/KID space)."""
        return self.body((x - 0.5) / 0.5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


class FeatureNet(nn.Module):
    """torchmetrics-compatible feature extractor: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 128)``."""

    def __init__(self, net: ToyAttributeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(to_batch(x))


class StyleLogitsNet(nn.Module):
    """Class logits for the Inception Score: ``(N, 3, H, W)`` in [0, 1] -> ``(N, 5)`` style logits."""

    def __init__(self, net: ToyAttributeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(to_batch(x))["style"]


class ToyFaceDetector(nn.Module):
    """Is there a toy-world person in the picture? ``(N, 3, 64, 64)`` in [0, 1] -> ``(N,)`` logits (> 0: a face).

    It stands in for the real tier's face detector (dlib's), which finds no face in an abstract image, so that the
    identity heads, which read only the colours and shapes of six traits, are never asked about a picture without
    a person. Trained on renders of every identity against pictures in which nobody is drawn
    (``scripts/train_toy_evaluators.py``).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5).squeeze(1)


@dataclass
class ToyIdentityEmbedder:
    """Identity embedding = the identity heads' class probabilities, concatenated and L2-normalised.

    Two images of the same identity score a cosine near 1; differing in one of the six traits costs about 1/6.
    'Face found' is the ``ToyFaceDetector``'s verdict, as a face detector's is on the real tier.
    """

    net: ToyAttributeNet
    detector: ToyFaceDetector
    name: str = "toy-identity"

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)`` float32 L2-normalised embeddings (D = 19) and ``(N,)`` bool 'face found'; no face -> zeros."""
        x = to_batch(images)
        logits = self.net(x)
        probs = F.normalize(torch.cat([logits[k].softmax(-1) for k in IDENTITY_FIELDS], dim=1), dim=1)
        found = self.detector(x) > 0
        return torch.where(found[:, None], probs, 0.0), found


@dataclass
class ToyEvaluators:
    """Everything the evaluation module needs on the toy tier."""

    net: ToyAttributeNet
    identity: ToyIdentityEmbedder
    feature_net: FeatureNet
    logits_net: StyleLogitsNet
    clip_ref: str

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted class index per attribute: ``{name: (N,) int64}``."""
        return {k: v.argmax(-1) for k, v in self.net(to_batch(images)).items()}


def load_toy_evaluators(folder: Path = EVALUATOR_DIR, clip_folder: Path = TOY_CLIP_DIR) -> ToyEvaluators:
    """Load the trained toy evaluators (safetensors); a clear error if they have not been trained yet."""
    net, detector = ToyAttributeNet(), ToyFaceDetector()
    for module, file in [(net, ATTRIBUTE_FILE), (detector, DETECTOR_FILE)]:
        weights = Path(folder) / file
        if not weights.exists():
            raise FileNotFoundError(f"No {file} in {folder}: run `make toy-evaluators` to train the toy evaluators.")
        module.load_state_dict(load_file(weights))
        module.eval().requires_grad_(False)
    return ToyEvaluators(net=net, identity=ToyIdentityEmbedder(net, detector), feature_net=FeatureNet(net).eval(),
                         logits_net=StyleLogitsNet(net).eval(), clip_ref=str(clip_folder))
