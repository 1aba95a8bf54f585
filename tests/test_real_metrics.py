"""Real-tier metrics without the hub: DreamBench's DINO on a ViT-S/16 built in code, FID/KID through torchmetrics'
own Inception (a fake in its place: torch-fidelity is not installed here), the notes when either is missing, and the
toy tier's results keeping their keys."""
from __future__ import annotations

import os
import random
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics.image.fid
from PIL import Image, ImageOps
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from transformers import ViTConfig, ViTModel

from nbutils import metrics
from nbutils.metrics import (DinoScorer, DlibFaceEmbedder, EvalSuite, InceptionFeatures, distribution_metrics,
                             evaluate_images, images_to_tensor, load_fid_inception)
from nbutils.models import ModelUnavailable
from nbutils.prompts import PROMPT_SETS
from nbutils.toy_evaluators import DETECTOR_FILE, EVALUATOR_DIR
from nbutils.toyworld import TOY_SUBJECT, random_portrait, render

SEED = 0
TOY_KEYS = ["identity_model", "identity", "detection_rate", "n_generated", "n_faces", "n_reference_faces", "rule",
            "identity_ci", "clip_model", "clip_t", "clip_i", "clip_t_ci", "success_rate", "success_per_image", "fid",
            "kid_mean", "kid_std", "fid_references", "is_mean", "is_std", "identity_per_image", "clip_t_per_image",
            "per_prompt"]
"""``evaluate_images``' keys on the toy tier, in order, as they were before DINO existed (metrics.json, CSVs)."""


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dino() -> DinoScorer:
    """DINO's ViT-S/16 architecture with random weights (``facebook/dino-vits16``'s config), no pooler."""
    torch.manual_seed(SEED)
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=16, image_size=224)
    return DinoScorer(ViTModel(config, add_pooling_layer=False))


def noise_images(n: int, seed: int, *, bright: float, size: int = 48) -> list[Image.Image]:
    """``n`` RGB noise images of ``size`` px, pixel values around ``bright`` (0-255)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(bright, 40, (size, size, 3)), 0, 255).astype(np.uint8))
            for _ in range(n)]


class FakeInception(nn.Module):
    """Stands in for torchmetrics' ``NoTrainInceptionV3`` (same constructor): uint8 (B, 3, H, W) -> (B, 48) mean
    colours of a 4 x 4 grid. Records whether its weights would have been read weights-only."""

    weights_only_load: str | None = None
    num_features = 48

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 antialias: bool = True) -> None:
        super().__init__()
        assert features_list == ["2048"]
        FakeInception.weights_only_load = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        self.scale = nn.Parameter(torch.ones(()))  # gives the net a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 299, 299), (x.dtype, x.shape)
        return F.adaptive_avg_pool2d(x.float() * self.scale, 4).flatten(1)


@pytest.fixture
def fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchmetrics as it is with torch-fidelity installed and its weights cached, with ``FakeInception``."""
    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeInception)


# --------------------------------------------------------------------------------------------------- DINO
def test_dino_embeds_the_cls_token_unit_length(dino, astronaut, cat):
    feats = dino.image_features([astronaut, cat, astronaut])
    assert feats.shape == (3, 384) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    pixels = dino.image_processor(images=[cat], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        cls = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(feats[1], F.normalize(cls, dim=-1)[0], atol=1e-5)
    assert torch.allclose(feats[0], feats[2]) and not torch.allclose(feats[0], feats[1], atol=1e-2)


def test_dino_similarity_is_the_mean_over_all_pairs(dino, astronaut, cat):
    assert dino.similarity([astronaut], [astronaut]) == pytest.approx(1.0, abs=1e-5)
    assert dino.similarity([astronaut, astronaut], [astronaut]) == pytest.approx(1.0, abs=1e-5)  # identical sets
    across = dino.similarity([cat], [astronaut])
    assert across < 0.95  # a different image scores lower, even with random weights
    a, c = dino.image_features([astronaut, cat])
    assert across == pytest.approx(float(a @ c), abs=1e-5)
    mirrored = ImageOps.mirror(astronaut)
    pairs = dino.image_features([astronaut, cat]) @ dino.image_features([astronaut, mirrored]).T  # (2, 2)
    assert dino.similarity([astronaut, cat], [astronaut, mirrored]) == pytest.approx(pairs.mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="no images"):
        dino.image_features([])


def test_dino_loads_a_safetensors_folder_and_refuses_a_pickle(dino, astronaut, cat, tmp_path, monkeypatch):
    saved = tmp_path / "dino"
    dino.model.save_pretrained(saved)
    dino.image_processor.save_pretrained(saved)
    assert (saved / "model.safetensors").is_file()
    loaded = DinoScorer.from_pretrained(saved)
    assert loaded.name == str(saved)
    assert torch.allclose(loaded.image_features([astronaut, cat]), dino.image_features([astronaut, cat]), atol=1e-5)

    pickled = tmp_path / "pickled"
    dino.model.config.save_pretrained(pickled)
    torch.save(dino.model.state_dict(), pickled / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelUnavailable, match="not a complete DINO folder.*pickled weights are never loaded"):
        DinoScorer.from_pretrained(pickled)


def test_dino_hub_repo_without_safetensors_is_a_note(monkeypatch):
    """transformers' own error for a hub repo with only pickled weights (use_safetensors=True) becomes the note."""
    def pickled_only(ref, **kwargs):
        assert kwargs["use_safetensors"] is True
        raise OSError(f"{ref} does not appear to have a file named model.safetensors or model.safetensors.index.json "
                      "and thus cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`.")

    monkeypatch.setattr(ViTModel, "from_pretrained", pickled_only)
    with pytest.raises(ModelUnavailable, match="hub repo 'someone/dino' has no safetensors weights"):
        DinoScorer.from_pretrained("someone/dino")


def test_dino_offline_is_a_note(offline, monkeypatch, tmp_path):
    with pytest.raises(ModelUnavailable, match=r"hf download portrait-studio-tests/no-such-dino"):
        DinoScorer.from_pretrained("portrait-studio-tests/no-such-dino")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="not a complete DINO folder"):
        DinoScorer.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------- FID, KID
def test_inception_without_torch_fidelity_is_a_note(monkeypatch):
    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModelUnavailable, match=r"not installed: `pip install torch-fidelity`"):
        load_fid_inception()


def test_inception_weights_that_cannot_be_fetched_are_a_note(fidelity, monkeypatch):
    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(FakeInception, "__init__", no_network)
    with pytest.raises(ModelUnavailable, match="could not fetch or read its Inception weights.*github.com"):
        load_fid_inception()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the load


class _MakesADirectory:
    """Unpickling this runs code: it makes the directory ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_inception_weights_are_read_weights_only(fidelity, monkeypatch, tmp_path):
    """torch-fidelity reads its weights file with ``torch.load(..., weights_only=False)``: under
    ``load_fid_inception`` a file that would run code is refused instead, and nothing runs."""
    evil, ran = tmp_path / "weights.pth", tmp_path / "code-ran"
    torch.save({"conv.weight": torch.zeros(1), "payload": _MakesADirectory(str(ran))}, evil)

    def read_like_torch_fidelity(self, *args, **kwargs):
        nn.Module.__init__(self)
        torch.load(evil, weights_only=False)

    monkeypatch.setattr(FakeInception, "__init__", read_like_torch_fidelity)
    with pytest.raises(ModelUnavailable, match="holds more than tensors, so it was not loaded: delete it"):
        load_fid_inception()
    assert not ran.exists()
    # the same call outside the guard (on the test's own file) runs the payload: the check above can fail
    torch.load(evil, weights_only=False)
    assert ran.is_dir()


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")
def test_fid_and_kid_through_torchmetrics_inception(fidelity):
    """``distribution_metrics`` with ``load_fid_inception``'s net equals torchmetrics' own FID and KID on the same
    299 px 8-bit images, and KID's subset fits the smaller set."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    net = load_fid_inception()
    assert isinstance(net, InceptionFeatures) and isinstance(net.inception, FakeInception)
    assert FakeInception.weights_only_load == "1"  # the pickled weights file would be read weights-only
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
    real, fake = noise_images(5, 1, bright=150), noise_images(4, 2, bright=90)
    scores = distribution_metrics(real, fake, net, seed=SEED)

    as_uint8 = [(images_to_tensor(images, 299) * 255).round().to(torch.uint8) for images in (real, fake)]
    fid = FrechetInceptionDistance(feature=FakeInception("inception-v3-compat", ["2048"]))
    kid = KernelInceptionDistance(feature=FakeInception("inception-v3-compat", ["2048"]), subset_size=4)
    for metric in (fid, kid):
        metric.update(as_uint8[0], real=True)
        metric.update(as_uint8[1], real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        kid_mean, kid_std = kid.compute()
    assert scores["fid"] == pytest.approx(fid.compute().item(), rel=1e-4) and scores["fid"] > 100
    assert scores["kid_mean"] == pytest.approx(kid_mean.item(), rel=1e-4)
    assert scores["kid_std"] == pytest.approx(kid_std.item(), rel=1e-4, abs=1e-6)
    same = distribution_metrics(real, real, net, seed=SEED)
    assert abs(same["fid"]) < 1e-3 * scores["fid"]  # a set against itself


# --------------------------------------------------------------------------------------------------- the real suite
@pytest.mark.filterwarnings("ignore:no (CLIP model|logits network):UserWarning")
def test_real_suite_scores_dino_fid_and_kid(offline, fidelity, monkeypatch, dino, astronaut, cat):
    monkeypatch.setattr(metrics, "REAL_CLIP", "portrait-studio-tests/no-such-clip")
    monkeypatch.setattr(DinoScorer, "from_pretrained", classmethod(lambda cls, ref, device="cpu": dino))
    with pytest.warns(UserWarning, match="CLIP-T and CLIP-I will be None"):
        suite = metrics.suite_for_tier("real")
    assert suite.dino is dino and isinstance(suite.feature_net, InceptionFeatures) and suite.reports_dino
    assert suite.image_features == dino.image_features  # CLIP missing: DINO embeds images for the failure modes
    generated = {"a photo of sks person": [astronaut, cat], "sks person on the beach": [ImageOps.mirror(cat)] * 2}
    references = [astronaut, ImageOps.mirror(astronaut)]
    with pytest.warns(UserWarning, match="no CLIP model"):
        result = evaluate_images(generated, references, suite, subject_phrase="sks person")
    images = [im for ims in generated.values() for im in ims]
    assert result["dino_model"] == dino.name
    assert result["dino"] == pytest.approx(dino.similarity(images, references), abs=1e-6)
    expected = distribution_metrics(references, images, suite.feature_net)
    assert all(result[k] == expected[k] for k in ("fid", "kid_mean", "kid_std"))
    assert result["fid"] > 0 and result["fid_references"] == "photos" and result["is_mean"] is None
    assert result["identity_model"] == DlibFaceEmbedder.name and result["n_reference_faces"] == 2
    with pytest.warns(UserWarning, match="at least 2 images per set, here 1 reference photos and 4 generated"):
        one_photo = evaluate_images(generated, [astronaut], suite, subject_phrase="sks person")
    assert one_photo["fid"] is None and one_photo["fid_references"] is None and one_photo["dino"] is not None


def test_real_suite_offline_notes_and_none_scores(offline, monkeypatch, astronaut):
    monkeypatch.setattr(metrics, "REAL_CLIP", "portrait-studio-tests/no-such-clip")
    monkeypatch.setattr(metrics, "REAL_DINO", "portrait-studio-tests/no-such-dino")
    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)  # as here, whatever is installed
    with pytest.warns(UserWarning) as warned:
        suite = metrics.suite_for_tier("real")
    notes = [str(w.message) for w in warned]
    assert any(n.startswith("DINO will be None: DINO model 'portrait-studio-tests/no-such-dino' is neither a local "
                            "folder nor in the Hugging Face cache") for n in notes), notes
    assert any(n.startswith("FID and KID will be None: torchmetrics' FID Inception comes from torch-fidelity")
               for n in notes), notes
    assert suite.dino is None and suite.feature_net is None and suite.clip is None and suite.reports_dino
    assert suite.image_features is None
    with pytest.warns(UserWarning) as warned:
        result = evaluate_images({"a photo of sks person": [astronaut] * 2}, [astronaut], suite,
                                 subject_phrase="sks person")
    notes = " | ".join(str(w.message) for w in warned)
    assert "no DINO model in the suite: DINO is None" in notes and "FID and KID are None" in notes
    assert result["dino"] is None and result["dino_model"] is None and result["fid"] is None
    assert result["identity"] == pytest.approx(1.0, abs=1e-5)  # dlib still scores


# --------------------------------------------------------------------------------------------------- the toy tier
@pytest.mark.skipif(not (EVALUATOR_DIR / DETECTOR_FILE).exists(), reason="the toy evaluators are not trained yet "
                    "(make toy-evaluators)")
def test_toy_suite_logs_nothing_new():
    """The toy suite (the trained toy evaluators) returns exactly the keys it returned before DINO; a suite's DINO
    slot adds two keys and changes no other value."""
    suite = metrics.suite_for_tier("toy")
    assert suite.dino is None and not suite.reports_dino and suite.feature_net is not None
    draw = random.Random(SEED)
    generated = {p.fill("sks person"): [render(random_portrait(draw), 64) for _ in range(3)]
                 for p in PROMPT_SETS["toy"][:2]}
    references = [render(random_portrait(draw, TOY_SUBJECT), 64) for _ in range(4)]
    result = evaluate_images(generated, references, suite, subject_phrase="sks person", truth=TOY_SUBJECT)
    assert list(result) == TOY_KEYS and result["fid"] is not None and result["success_rate"] is not None
    with pytest.warns(UserWarning, match="no DINO model in the suite"):
        with_dino_slot = evaluate_images(generated, references, EvalSuite(**{**vars(suite), "tier": "real"}),
                                         subject_phrase="sks person", truth=TOY_SUBJECT)
    assert [k for k in with_dino_slot if k not in TOY_KEYS] == ["dino_model", "dino"]  # the only switch
    assert {k: with_dino_slot[k] for k in TOY_KEYS} == result
