"""Evaluation metrics: dlib identity, CLIP-T/CLIP-I on a tiny random CLIP, FID/KID/IS, prompts, one-call evaluation."""
from __future__ import annotations

import json
import random
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from nbutils import metrics
from nbutils.clip_bpe import clip_tokenizer
from nbutils.models import ModelUnavailable
from nbutils.sampling import generate
from nbutils.metrics import (
    ClipScorer,
    DlibFaceEmbedder,
    EvalSuite,
    bootstrap_ci,
    distribution_metrics,
    evaluate_images,
    identity_similarity,
    images_to_tensor,
    inception_score,
    language_drift,
    nearest_training_similarity,
    success_per_image,
    toy_reference_renders,
)
from nbutils.prompts import CATEGORIES, CLASS_PROMPT, PROMPT_SETS, strip_subject, toy_request
from nbutils.toy_evaluators import DETECTOR_FILE, EVALUATOR_DIR
from nbutils.toyworld import (SCENES, TOY_SUBJECT, TOY_VAL_SUBJECT, Identity, Portrait, caption_variants, portraits,
                              random_portrait, render, with_fields)

SEED = 0


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dlib_faces() -> DlibFaceEmbedder:
    return DlibFaceEmbedder()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random CLIPModel folder with SD1.5's real tokenizer and a 32 px image processor."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(SEED)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> ClipScorer:
    return ClipScorer(tiny_clip_dir)


class ColourLayout(nn.Module):
    """A deterministic feature net: the mean colour of a 4 x 4 grid, (B, 3, 16, 16) -> (B, 48)."""

    image_size = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


class ColourClassifier(nn.Module):
    """Logits for 'mostly red / green / blue': (B, 3, 8, 8) -> (B, 3), near one-hot for pure colours."""

    image_size = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * x.mean(dim=(2, 3))


class ColourEmbedder:
    """A stand-in identity embedder (the protocol the toy one follows): mean colour; a black image has no face."""

    name = "mean-colour"

    def embed(self, images):
        x = images_to_tensor(images, 8).mean(dim=(2, 3))
        found = x.sum(dim=1) > 0.05
        return torch.where(found[:, None], F.normalize(x, dim=1), 0.0), found


def toy_images(seed: int, n: int, size: int = 32, **changes) -> list[Image.Image]:
    return [render(with_fields(p, **changes), size) for p in portraits(seed, n)]


# --------------------------------------------------------------------------------------------------- identity (dlib)
def test_same_photo_twice_is_identity_one(dlib_faces, astronaut):
    scores = identity_similarity([astronaut], [astronaut], dlib_faces)
    assert scores["identity"] == pytest.approx(1.0, abs=1e-5)
    assert scores["detection_rate"] == 1.0 and scores["n_faces"] == 1 and scores["n_reference_faces"] == 1
    assert dlib_faces.face_distance([astronaut], [astronaut]).item() == pytest.approx(0.0, abs=1e-5)


def test_flipped_cropped_recoloured_copy_is_the_same_person(dlib_faces, astronaut):
    copy = ImageOps.mirror(astronaut).crop((60, 0, 460, 400))
    copy = ImageEnhance.Brightness(ImageEnhance.Color(copy).enhance(0.3)).enhance(1.2)
    distance = dlib_faces.face_distance([astronaut], [copy]).item()
    assert 0.0 < distance < dlib_faces.same_person_distance
    assert identity_similarity([copy], [astronaut], dlib_faces)["identity"] > 0.9


def test_no_face_rule_zero_and_skip(dlib_faces, astronaut, cat):
    embeddings, found = dlib_faces.embed([astronaut, cat])
    assert found.tolist() == [True, False]
    assert embeddings[0].norm().item() == pytest.approx(1.0, abs=1e-5) and embeddings[1].abs().sum() == 0
    only_cat = identity_similarity([cat], [astronaut], dlib_faces, no_face="skip")
    assert only_cat["identity"] is None and only_cat["detection_rate"] == 0.0 and only_cat["n_faces"] == 0
    zero = identity_similarity([astronaut, cat], [astronaut], dlib_faces, no_face="zero")
    skip = identity_similarity([astronaut, cat], [astronaut], dlib_faces, no_face="skip")
    assert zero["identity"] == pytest.approx(0.5, abs=1e-5) and zero["rule"] == "zero"
    assert skip["identity"] == pytest.approx(1.0, abs=1e-5) and skip["detection_rate"] == 0.5
    assert torch.isnan(dlib_faces.face_distance([astronaut], [cat])).all()


def test_identity_bad_input_is_a_clear_error(dlib_faces, astronaut, cat):
    with pytest.raises(ValueError, match="no face found in any of the 1 reference photos"):
        identity_similarity([astronaut], [cat], dlib_faces)
    with pytest.raises(ValueError, match="'zero' or 'skip'"):
        identity_similarity([astronaut], [astronaut], dlib_faces, no_face="ignore")


# --------------------------------------------------------------------------------------------------- CLIP
def test_clip_scores_are_cosines(clip):
    images = toy_images(SEED, 3)
    feats = clip.image_features(images)
    assert feats.shape == (3, 16) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    assert clip.clip_i(images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)
    cross = clip.clip_i(images[:1], images[1:])
    assert -1.0 <= cross < 1.0 - 1e-4
    assert cross == pytest.approx((feats[0] @ feats[1:].T).mean().item(), abs=1e-6)


def test_clip_text_path(clip):
    texts = clip.text_features(["a photo of a person", "a photo of a person", "a pencil sketch of a cat"])
    assert texts.shape == (3, 16)
    assert torch.allclose(texts[0], texts[1]) and not torch.allclose(texts[0], texts[2], atol=1e-3)
    assert clip.text_features(["a person " * 100]).shape == (1, 16)  # cut at 77 tokens, not an error
    images = toy_images(SEED, 2)
    prompts = ["a photo of a person", "a pencil sketch of a cat"]
    expected = (clip.image_features(images) * texts[[0, 2]]).sum(dim=1).mean().item()
    assert clip.clip_t(images, prompts) == pytest.approx(expected, abs=1e-6)
    assert -1.0 <= clip.clip_t(images, "a photo of a person") <= 1.0
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip.clip_t(images, prompts + prompts[:1])


def test_clip_unavailable_is_a_clear_error(offline, monkeypatch, tmp_path):
    with pytest.raises(ModelUnavailable, match=r"hf download portrait-studio-tests/no-such-clip"):
        ClipScorer("portrait-studio-tests/no-such-clip")
    with pytest.raises(ModelUnavailable, match="re-save it"):
        ClipScorer(tmp_path)


# --------------------------------------------------------------------------------------------------- FID, KID, IS
def test_fid_kid_same_set_zero_different_sets_positive():
    portraits_a = toy_images(1, 24)
    night = toy_images(2, 24, scene="night", style="pixel art")
    same = distribution_metrics(portraits_a, portraits_a, ColourLayout())
    other = distribution_metrics(portraits_a, night, ColourLayout())
    assert set(same) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}
    assert abs(same["fid"]) < 1e-6 < 0.1 < other["fid"]
    assert abs(same["kid_mean"]) < 0.1 * other["kid_mean"]  # unbiased MMD of a set with itself: -O(1/n)
    assert other["kid_std"] >= 0.0 and same["is_mean"] is None and same["is_std"] is None


def test_mismatched_resolutions_are_resized_to_the_net_input():
    small = toy_images(1, 12, size=32)
    large = [im.resize((64, 64), Image.Resampling.BICUBIC) for im in small]
    wide = [ImageOps.expand(im, border=(8, 0, 8, 0)) for im in small]  # 48 x 32: the centre crop is the original
    target = images_to_tensor(small, 16)
    assert images_to_tensor(wide, 16).shape == target.shape == (12, 3, 16, 16)
    for other in (wide, large):
        assert (images_to_tensor(other, 16) - target).abs().mean() < 0.01
    resized = distribution_metrics(small, large, ColourLayout())["fid"]
    different = distribution_metrics(small, toy_images(2, 12, size=64, scene="night"), ColourLayout())["fid"]
    assert resized < 0.05 * different
    with pytest.raises(ValueError, match="image_size"):
        distribution_metrics(small, large, nn.Flatten())
    with pytest.raises(ValueError, match="at least 2 images"):
        distribution_metrics(small[:1], large, ColourLayout())


def test_inception_score_range():
    pure = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)) for _ in range(5)]
    three = inception_score(pure, ColourClassifier())
    assert three["is_mean"] == pytest.approx(3.0, abs=1e-3) and three["is_std"] is None  # 15 images: one split
    one_class = inception_score(pure[:5] * 4, ColourClassifier())
    assert one_class["is_mean"] == pytest.approx(1.0, abs=1e-3) and one_class["is_std"] is not None
    portraits_a, portraits_b = toy_images(1, 12), toy_images(2, 24)
    mixed = distribution_metrics(portraits_a, portraits_b, ColourLayout(), ColourClassifier())
    assert 1.0 <= mixed["is_mean"] <= 3.0 and mixed["is_std"] >= 0.0
    assert mixed == distribution_metrics(portraits_a, portraits_b, ColourLayout(), ColourClassifier())  # seeded


# --------------------------------------------------------------------------------------------------- uncertainty
def test_bootstrap_ci_contains_the_mean_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(SEED)
    small, large = rng.normal(0.5, 0.1, 20), rng.normal(0.5, 0.1, 2000)
    for values in (small, large):
        low, high = bootstrap_ci(values, seed=3)
        assert low < np.mean(values) < high
    width = {n: np.diff(bootstrap_ci(v, seed=3))[0] for n, v in ((20, small), (2000, large))}
    assert width[2000] < 0.2 * width[20]  # ~ 1 / sqrt(n): 10x narrower
    assert 2 * 1.96 * 0.1 / np.sqrt(20) * 0.6 < width[20] < 2 * 1.96 * 0.1 / np.sqrt(20) * 1.4  # the normal width
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(list(small), seed=3) != bootstrap_ci(small, seed=4)
    assert bootstrap_ci([0.25] * 7) == [0.25, 0.25] and bootstrap_ci([0.25]) == [0.25, 0.25]
    assert bootstrap_ci([]) is None
    assert np.diff(bootstrap_ci(small, level=0.5))[0] < np.diff(bootstrap_ci(small, level=0.99))[0]
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(small, level=95)


# --------------------------------------------------------------------------------------------------- one call
def test_evaluate_images_matches_the_single_metrics(clip):
    subject = "sks person"
    generated = {
        "a photo of sks person, on the beach": toy_images(3, 4, scene="beach"),
        "a pencil sketch of sks person": toy_images(4, 3, style="sketch") + [Image.new("RGB", (32, 32))],
    }
    references = toy_images(5, 4)
    suite = EvalSuite(ColourEmbedder(), clip, ColourLayout(), ColourClassifier())
    result = evaluate_images(generated, references, suite, subject_phrase=subject)
    everything = [im for ims in generated.values() for im in ims]
    single = identity_similarity(everything, references, ColourEmbedder())
    assert {k: result[k] for k in single} == single and result["detection_rate"] == 7 / 8
    assert result["identity_model"] == "mean-colour" and result["clip_model"] == clip.name
    assert result["clip_i"] == pytest.approx(clip.clip_i(everything, references), abs=1e-6)
    for prompt, images in generated.items():
        per = result["per_prompt"][prompt]
        assert per["clip_t"] == pytest.approx(clip.clip_t(images, strip_subject(prompt, subject)), abs=1e-6)
        assert per["identity"] == identity_similarity(images, references, ColourEmbedder())["identity"]
    per_prompt_t = [per["clip_t"] for per in result["per_prompt"].values()]
    assert result["clip_t"] == pytest.approx(np.mean(per_prompt_t), abs=1e-6)  # 4 images per prompt
    expected = distribution_metrics(references, everything, ColourLayout(), ColourClassifier())
    assert {k: result[k] for k in expected} == expected
    assert result["fid_references"] == "photos" and result["success_rate"] is None  # no truth given


@pytest.mark.filterwarnings("ignore:no (CLIP model|feature network|logits network):UserWarning")
def test_evaluate_images_per_image_scores_and_intervals(clip):
    """The per-image lists average to the reported means (both no-face rules), the intervals hold them, and the
    result survives a JSON round trip unchanged."""
    subject = "sks person"
    generated = {"a photo of sks person, on the beach": toy_images(3, 5, scene="beach"),
                 "a pencil sketch of sks person": toy_images(4, 4, style="sketch") + [Image.new("RGB", (32, 32))]}
    suite = EvalSuite(ColourEmbedder(), clip, ColourLayout(), ColourClassifier())
    for rule in ("zero", "skip"):
        result = evaluate_images(generated, toy_images(5, 4), suite, subject_phrase=subject, no_face=rule, seed=7)
        per_image = result["identity_per_image"]
        assert len(per_image) == len(result["clip_t_per_image"]) == 10
        assert per_image[-1] == (0.0 if rule == "zero" else None)  # the black image: no face
        known = [v for v in per_image if v is not None]
        assert np.mean(known) == pytest.approx(result["identity"], abs=1e-6)
        assert np.mean(per_image[:5]) == pytest.approx(result["per_prompt"]["a photo of sks person, on the beach"]
                                                       ["identity"], abs=1e-6)
        assert np.mean(result["clip_t_per_image"]) == pytest.approx(result["clip_t"], abs=1e-6)
        assert result["identity_ci"] == bootstrap_ci(known, seed=7)
        assert result["clip_t_ci"] == bootstrap_ci(result["clip_t_per_image"], seed=7)
        for key in ("identity", "clip_t"):
            low, high = result[f"{key}_ci"]
            assert low <= result[key] <= high and low < high
        assert json.loads(json.dumps(result, allow_nan=False)) == result
    no_clip = evaluate_images(generated, toy_images(5, 4), EvalSuite(ColourEmbedder()), subject_phrase=subject)
    assert no_clip["clip_t_ci"] is None and no_clip["clip_t_per_image"] is None


def test_evaluate_images_reports_missing_parts_as_none():
    generated = {"a photo of sks person": toy_images(3, 3)}
    with pytest.warns(UserWarning) as warned:
        result = evaluate_images(generated, toy_images(5, 3), EvalSuite(ColourEmbedder()), subject_phrase="sks person")
    messages = " | ".join(str(w.message) for w in warned)
    for missing in ("CLIP-T and CLIP-I are None", "FID and KID are None", "the Inception Score is None"):
        assert missing in messages
    assert result["identity"] > 0.5 and result["per_prompt"]["a photo of sks person"]["clip_t"] is None
    assert all(result[k] is None for k in ("clip_t", "clip_i", "fid", "kid_mean", "kid_std", "is_mean", "is_std"))
    with pytest.raises(ValueError, match="is not in the prompt"):  # checked even without a CLIP model
        evaluate_images(generated, toy_images(5, 3), EvalSuite(ColourEmbedder()), subject_phrase="<sks>")


def test_real_suite_offline_keeps_dlib_and_drops_clip_dino_and_fid_with_one_warning_each(offline, monkeypatch):
    monkeypatch.setattr(metrics, "REAL_CLIP", "portrait-studio-tests/no-such-clip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        suite = metrics.suite_for_tier("real")
    said = sorted(str(w.message).split(":")[0] for w in caught)
    assert said == ["CLIP-T and CLIP-I will be None", "DINO will be None", "FID and KID will be None"], said
    assert isinstance(suite.identity, DlibFaceEmbedder) and suite.clip is None and suite.feature_net is None
    assert suite.dino is None
    with pytest.raises(ValueError, match="unknown tier"):
        metrics.suite_for_tier("huge")


def test_toy_suite_end_to_end(monkeypatch, tiny_clip_dir):
    """suite_for_tier("toy") with the toy evaluator classes (random weights: the trained ones may not exist yet)."""
    import nbutils.toy_evaluators as toy

    torch.manual_seed(SEED)
    net, detector = toy.ToyAttributeNet(width=8).eval(), toy.ToyFaceDetector(width=4).eval()
    torch.nn.init.constant_(detector.body[-1].bias, 100.0)  # an untrained detector that finds a face everywhere
    untrained = toy.ToyEvaluators(net, toy.ToyIdentityEmbedder(net, detector), toy.FeatureNet(net),
                                  toy.StyleLogitsNet(net), str(tiny_clip_dir))
    monkeypatch.setattr(toy, "load_toy_evaluators", lambda: untrained)
    suite = metrics.suite_for_tier("toy")
    assert suite.image_size == toy.SIZE and suite.clip.name == str(tiny_clip_dir)
    assert suite.image_features == suite.clip.image_features  # CLIP first, where it loads
    generated = {p.fill("sks person"): toy_images(i, 3, size=64) for i, p in enumerate(PROMPT_SETS["toy"][:2])}
    result = evaluate_images(generated, toy_images(9, 4, size=64), suite, subject_phrase="sks person")
    assert result["identity_model"] == "toy-identity" and result["detection_rate"] == 1.0
    assert 0.0 <= result["identity"] <= 1.0 + 1e-6 and -1.0 <= result["clip_t"] <= 1.0
    assert result["fid"] > 0.0 and 1.0 <= result["is_mean"] <= toy.LABEL_SIZES["style"]


# --------------------------------------------------------------------------------------------------- toy truth
needs_evaluators = pytest.mark.skipif(not (EVALUATOR_DIR / DETECTOR_FILE).exists(),
                                      reason="toy evaluators not trained yet (make toy-evaluators)")
EVAL_NAMES = ("studio", "beach", "pop_art")  # nbutils.study.EVAL_PROMPTS
STRANGER = Identity(face="round", skin="dark", hair_colour="blonde", hair_style="afro", accessory="sunglasses")


@pytest.fixture(scope="module")
def toy_suite() -> EvalSuite:
    """The trained toy evaluators without CLIP (not needed here, and slow to load)."""
    from nbutils.toy_evaluators import SIZE, load_toy_evaluators

    toy = load_toy_evaluators()
    return EvalSuite(toy.identity, None, toy.feature_net, toy.logits_net, SIZE, attributes=toy.predict)


def asked_renders(identity: Identity, seed: int, n: int = 16, **override) -> dict[str, list[Image.Image]]:
    """``n`` renders of ``identity`` per evaluation prompt, each in the prompt's scene and style (or ``override``)."""
    prompts = [next(p for p in PROMPT_SETS["toy"] if p.name == name).fill("sks person") for name in EVAL_NAMES]
    requests = [{**toy_request(p, "sks person"), **override} for p in prompts]
    images = toy_reference_renders(identity, requests, [n] * len(prompts), size=64, seed=seed)
    return {p: images[k * n:(k + 1) * n] for k, p in enumerate(prompts)}


def test_toy_reference_renders_draw_what_is_asked_seeded():
    requests = [{"style": "photo", "scene": "beach"}, {"style": "pop art"}, {"style": "photo", "hair_colour": "red"}]
    images = toy_reference_renders(TOY_SUBJECT, requests, [2, 5, 1], size=32, seed=1)
    assert len(images) == 8 and {im.size for im in images} == {(32, 32)}
    again = toy_reference_renders(TOY_SUBJECT, requests, [2, 5, 1], size=32, seed=1)
    assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in again]
    other = toy_reference_renders(TOY_SUBJECT, requests, [2, 5, 1], size=32, seed=2)
    assert np.asarray(images[0]).tolist() != np.asarray(other[0]).tolist()
    # what each one shows: the same picture as the portrait drawn with those fields by hand
    rng = random.Random(1)
    expected = []
    for request, n in zip(requests, [2, 5, 1]):
        for k in range(n):
            p = with_fields(random_portrait(rng, TOY_SUBJECT), **{"scene": SCENES[k % 5], **request})
            expected.append(render(p, 32))
    assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in expected]
    with pytest.raises(ValueError, match="one count per request"):
        toy_reference_renders(TOY_SUBJECT, requests, [2], size=32, seed=1)


def test_success_per_image_needs_every_trait_the_scene_and_the_style():
    truth = Portrait(TOY_SUBJECT, scene="beach", style="photo").labels()
    n = 6
    predicted = {k: torch.full((n,), v) for k, v in truth.items()}
    predicted["hair_colour"][1] = 0  # black hair: not the subject
    predicted["scene"][2] = SCENES.index("night")  # not on the beach
    predicted["style"][3] = 4  # pop art: not a photo
    predicted["expression"][4] = 0  # the expression is not checked
    found = torch.tensor([True, True, True, True, True, False])  # no face: no success
    beach = {"style": "photo", "scene": "beach"}
    assert success_per_image(predicted, found, TOY_SUBJECT, [beach] * n) == [True, False, False, False, True, False]
    anywhere = {"style": "photo"}  # no scene asked: any scene is right
    assert success_per_image(predicted, found, TOY_SUBJECT, [anywhere] * 3 + [None] * 3) == [True, False, True,
                                                                                              None, None, None]
    red = {"style": "photo", "hair_colour": "red"}  # the prompt changes a trait: the changed one is the truth
    assert success_per_image(predicted, found, TOY_SUBJECT, [red] * 2) == [False, False]
    predicted["hair_colour"][:] = 2  # red
    assert success_per_image(predicted, found, TOY_SUBJECT, [red] * 2) == [True, True]


@needs_evaluators
def test_success_rate_on_toy_renders(toy_suite):
    """Renders of the subject as asked score ~1; of a stranger, of the other subject, or in another style ~0; in
    another scene ~0 where the prompt names a scene (studio, beach), ~1 where it names none (pop art)."""
    photos = toy_images(5, 5, size=64)
    cases = {"subject": asked_renders(TOY_SUBJECT, 11), "toy-val": asked_renders(TOY_VAL_SUBJECT, 12),
             "stranger": asked_renders(STRANGER, 13), "watercolor": asked_renders(TOY_SUBJECT, 14, style="watercolor"),
             "night": asked_renders(TOY_SUBJECT, 15, scene="night")}
    results = {}
    with pytest.warns(UserWarning, match="no CLIP model"):
        for name, generated in cases.items():
            results[name] = evaluate_images(generated, photos, toy_suite, subject_phrase="sks person",
                                            truth=TOY_SUBJECT)
    for result in results.values():
        assert len(result["success_per_image"]) == 48
        assert result["success_rate"] == pytest.approx(np.mean(result["success_per_image"]))
    rates = {name: r["success_rate"] for name, r in results.items()}
    assert rates["subject"] >= 0.9 and max(rates["toy-val"], rates["stranger"], rates["watercolor"]) <= 0.1, rates
    night = [v["success_rate"] for v in results["night"]["per_prompt"].values()]  # studio, beach, pop art
    assert night[0] <= 0.1 and night[1] <= 0.1 and night[2] >= 0.9, night
    subject = results["subject"]
    assert all(v["success_rate"] >= 0.9 for v in subject["per_prompt"].values())
    assert json.loads(json.dumps(subject, allow_nan=False)) == subject


@needs_evaluators
def test_toy_fid_compares_with_renders_of_the_subject_as_asked(toy_suite):
    """With the truth known, FID/KID use fresh renders of the subject in the prompts' scenes and styles: renders of
    the subject are close to them, renders of a stranger far. Without it, the photos, as before."""
    photos = toy_images(5, 5, size=64)
    own_images = asked_renders(TOY_SUBJECT, 11)
    with pytest.warns(UserWarning, match="no CLIP model"):
        own = evaluate_images(own_images, photos, toy_suite, subject_phrase="sks person", truth=TOY_SUBJECT, seed=3)
        stranger = evaluate_images(asked_renders(STRANGER, 13), photos, toy_suite, subject_phrase="sks person",
                                   truth=TOY_SUBJECT, seed=3)
        untold = evaluate_images(own_images, photos, toy_suite, subject_phrase="sks person", seed=3)
        mixed = evaluate_images({**asked_renders(TOY_SUBJECT, 11, n=4), "a photo of sks person at sea": photos},
                                photos, toy_suite, subject_phrase="sks person", truth=TOY_SUBJECT)
    assert own["fid_references"] == stranger["fid_references"] == "renders"
    assert own["fid"] < 0.1 * stranger["fid"] and own["kid_mean"] < 0.1 * stranger["kid_mean"]
    generated = [im for ims in own_images.values() for im in ims]
    requests = [toy_request(p, "sks person") for p in own_images]
    renders = toy_reference_renders(TOY_SUBJECT, requests, [16] * 3, size=64, seed=3)
    net, size = toy_suite.feature_net, toy_suite.image_size
    expected = distribution_metrics(renders, generated, net, image_size=size, seed=3)
    assert own["fid"] == expected["fid"] and own["kid_mean"] == expected["kid_mean"]
    assert untold["fid_references"] == "photos" and untold["success_rate"] is None
    assert untold["fid"] == distribution_metrics(photos, generated, net, image_size=size, seed=3)["fid"]
    # a prompt the toy world cannot read: no success for it, and the photos stay the FID references
    assert mixed["fid_references"] == "photos"
    assert mixed["per_prompt"]["a photo of sks person at sea"]["success_rate"] is None
    assert mixed["success_rate"] == pytest.approx(np.mean(mixed["success_per_image"][:12]))


@pytest.mark.filterwarnings("ignore:no (CLIP model|feature network|logits network):UserWarning")
def test_truth_without_an_attribute_net_warns_and_gives_none():
    generated = {"a photo of sks person, in a studio": toy_images(3, 3)}
    with pytest.warns(UserWarning, match="no attribute net in the suite"):
        result = evaluate_images(generated, toy_images(5, 3), EvalSuite(ColourEmbedder()),
                                 subject_phrase="sks person", truth=TOY_SUBJECT)
    assert result["success_rate"] is None and result["success_per_image"] is None
    assert result["per_prompt"]["a photo of sks person, in a studio"]["success_rate"] is None


# --------------------------------------------------------------------------------------------------- prompts
def test_strip_subject():
    assert strip_subject("a photo of sks person on the beach", "sks person") == "a photo of a person on the beach"
    assert strip_subject("A sks person, smiling", "sks person") == "a person, smiling"
    assert strip_subject("<sks> and <sks>", "<sks>", class_phrase="a man") == "a man and a man"
    for prompt, phrase in (("a photo of sks persons", "sks person"), ("a photo", "sks"), ("a photo", " ")):
        with pytest.raises(ValueError, match="is not in the prompt"):
            strip_subject(prompt, phrase)


def test_prompt_sets():
    real, toy = PROMPT_SETS["real"], PROMPT_SETS["toy"]
    for prompts in (real, toy):
        assert len({p.name for p in prompts}) == len(prompts)
        assert {p.category for p in prompts} == set(CATEGORIES)
        assert all(p.template.count("{S}") == 1 for p in prompts)
        assert all(strip_subject(p.fill("sks person"), "sks person").count("a person") == 1 for p in prompts)
    assert {p.name for p in toy} < {p.name for p in real}
    assert real[0].fill("sks person") == "a photo of sks person on the beach"


def test_toy_request_reads_every_toy_prompt():
    requests = {p.name: toy_request(p.template) for p in PROMPT_SETS["toy"]}
    assert all(r is not None and "style" in r for r in requests.values())
    assert requests["beach"] == {"style": "photo", "scene": "beach"}
    assert requests["pop_art"] == {"style": "pop art"} and requests["pixel_art"] == {"style": "pixel art"}
    assert requests["sunglasses"] == {"style": "photo", "accessory": "sunglasses"}
    assert requests["red_hair"] == {"style": "photo", "hair_colour": "red", "hair_style": "long"}
    assert requests["smiling"] == {"style": "photo", "expression": "smiling"}
    assert toy_request("a photo of <sks> person, on the beach", "<sks> person") == requests["beach"]
    assert toy_request("a photo of a person, in a studio", "a person") == requests["studio"]  # the baseline
    assert toy_request("a watercolor painting of {S}, in a forest") == {"style": "watercolor", "scene": "forest"}
    shared = {p.name for p in PROMPT_SETS["real"] if toy_request(p.template) is not None}
    assert shared == {"pencil_sketch", "pixel_art", "watercolor", "pop_art"}  # the same words on both tiers
    for prompt in ("a photo of {S}, on the moon", "a photo of {S}, on the beach, at night", "a photo of {S} at sea",
                   "a photo of {S} with green long hair", "an oil painting of {S}"):
        assert toy_request(prompt) is None, prompt
    assert toy_request("a photo of sks person, in a studio", "<sks> person") is None  # the phrase is not in it


def test_toy_prompts_use_only_toy_caption_words():
    rng = random.Random(SEED)
    captions = [p.caption() for p in portraits(SEED, 3000, held_out=True)]
    captions += [caption_variants(p, rng) for p in portraits(SEED, 300, identity=TOY_SUBJECT)]
    vocabulary = set(re.findall(r"[a-z]+", " ".join(captions)))

    def words(template: str) -> set[str]:
        return set(re.findall(r"[a-z]+", template.replace("{S}", "").lower()))

    for prompt in PROMPT_SETS["toy"]:
        assert words(prompt.template) <= vocabulary, (prompt.name, words(prompt.template) - vocabulary)
    van_gogh = next(p for p in PROMPT_SETS["real"] if p.name == "van_gogh")
    assert not words(van_gogh.template) <= vocabulary  # the check can fail


def test_psnr_is_ten_log10_of_one_over_the_mse():
    black, grey = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (51, 51, 51))  # 51/255 = 0.2
    assert metrics.psnr_db([grey], [black]) == pytest.approx(10 * np.log10(1 / 0.04))
    with pytest.raises(ValueError, match="pairs"):
        metrics.psnr_db([grey], [])


def test_trait_read_rates_count_each_trait_read_as_the_truth():
    from nbutils.metrics import trait_read_rates
    from nbutils.toyworld import IDENTITY_FIELDS, TOY_SUBJECT, Portrait

    labels = Portrait(TOY_SUBJECT).labels()
    predicted = {f: torch.tensor([labels[f]] * 4) for f in IDENTITY_FIELDS}
    predicted["face"] = torch.tensor([labels["face"], labels["face"] + 1, labels["face"] + 1, labels["face"] + 1])
    predicted["mark"] = torch.tensor([1 - labels["mark"]] * 4)
    rates = trait_read_rates(predicted, TOY_SUBJECT)
    assert list(rates) == list(IDENTITY_FIELDS)
    assert rates["face"] == 0.25 and rates["mark"] == 0.0 and rates["skin"] == rates["hair_colour"] == 1.0


# --------------------------------------------------------------------------------------------------- drift, copying
GEN = dict(steps=2, guidance_scale=4.0)  # sampling on the tiny tier


@pytest.fixture(scope="module")
def dataset():
    people = portraits(0, 3, identity=TOY_SUBJECT)
    return [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(people)]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


class PixelEmbedder:
    """A stand-in identity embedder: centred 16 px pixels, every image 'has a face'."""

    name = "pixels"

    def embed(self, images):
        flat = images_to_tensor(images, 16).flatten(1)
        centred = torch.nn.functional.normalize(flat - flat.mean(1, keepdim=True), dim=1)
        return centred, torch.ones(len(images), dtype=torch.bool)


def centred_pixels(images) -> torch.Tensor:
    return PixelEmbedder().embed(images)[0]


def test_language_drift_scores_class_prompt_samples_against_the_subject(tiny_pipe, dataset):
    subject = [im for im, _ in dataset]
    scores, images = language_drift(tiny_pipe, subject, PixelEmbedder(), [3, 4], **GEN)
    assert len(images) == 2 and scores["n_generated"] == 2 and scores["n_reference_faces"] == 3
    assert np.array_equal(pixels(images), pixels(generate(tiny_pipe, CLASS_PROMPT, [3, 4], **GEN)))
    assert scores["identity"] < 0.5  # random noise images do not look like the subject
    itself, _ = language_drift(tiny_pipe, images[:1], PixelEmbedder(), [3], **GEN)
    assert itself["identity"] == pytest.approx(1.0, abs=1e-5)  # a sample that *is* the reference scores 1


def test_nearest_training_similarity_finds_copies_of_training_photos(dataset):
    training = [im for im, _ in dataset]
    new = render(next(portraits(7, 1)), 32)
    result = nearest_training_similarity([training[1], new], training, centred_pixels)
    assert result["nearest_index"][0] == 1 and result["per_image"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["per_image"][1] < 0.99
    assert result["nearest_similarity"] == pytest.approx(sum(result["per_image"]) / 2)
    feats = centred_pixels(training)
    sims = feats @ feats.T
    expected = [max(sims[i, j].item() for j in range(3) if j != i) for i in range(3)]
    assert result["training_baseline"] == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert np.isnan(nearest_training_similarity([new], training[:1], centred_pixels)["training_baseline"])
    with pytest.raises(ValueError, match="Need generated and training images"):
        nearest_training_similarity([], training, centred_pixels)
    with pytest.warns(UserWarning, match="No image embedder could be loaded"):
        offline = nearest_training_similarity([training[1], new], training, None)  # the real tier offline
    assert np.isnan(offline["nearest_similarity"]) and np.isnan(offline["training_baseline"])
    assert len(offline["per_image"]) == 2 and offline["nearest_index"] == [-1, -1]

