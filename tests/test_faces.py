"""Face detection and alignment on the public-domain astronaut photo, and every way a photo can fail."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbutils.faces import (
    FRAMINGS,
    FaceBox,
    align_face,
    centre_crop,
    crop_subjects,
    demo_subject_photos,
    detect_faces,
    draw_faces,
    face_model_path,
)
from nbutils.photos import Photo
from nbutils.toyworld import TOY_SUBJECT, portraits, render


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    (img,) = demo_subject_photos()
    return img


@pytest.fixture(scope="module")
def astronaut_face(astronaut) -> FaceBox:
    (face,) = detect_faces(astronaut)
    return face


def two_people(astronaut: Image.Image) -> Image.Image:
    """The astronaut's head pasted twice side by side."""
    head = astronaut.crop((120, 30, 320, 230))
    canvas = Image.new("RGB", (420, 220), (200, 200, 200))
    canvas.paste(head, (5, 10))
    canvas.paste(head, (215, 10))
    return canvas


def test_demo_subject_is_the_astronaut(astronaut):
    assert astronaut.mode == "RGB" and astronaut.size == (512, 512)


def test_model_files_are_found_without_pkg_resources():
    for name in ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat"):
        path = face_model_path(name)
        assert path.is_file() and path.name == name and path.stat().st_size > 1_000_000
    with pytest.raises(FileNotFoundError, match=r"no face model 'nope.dat'.*available: .*shape_predictor_5"):
        face_model_path("nope.dat")


def test_astronaut_has_exactly_one_face_with_5_landmarks(astronaut_face):
    left, top, right, bottom = astronaut_face.box
    assert 150 < left < right < 300 and 50 < top < bottom < 200  # her face, not the mission patch
    assert len(astronaut_face.landmarks) == 5
    for x, y in astronaut_face.landmarks:
        assert left <= x <= right and top <= y <= bottom
    (lx, ly), (rx, ry) = astronaut_face.eyes
    assert lx < rx and 30 < rx - lx < 60
    assert abs(astronaut_face.eye_angle) < 6  # she holds her head nearly level


def test_large_photo_is_searched_small_but_boxed_at_full_size(astronaut, astronaut_face):
    large = astronaut.resize((1536, 1536), Image.Resampling.BICUBIC)
    (face,) = detect_faces(large)
    np.testing.assert_allclose(face.box, np.array(astronaut_face.box) * 3, atol=30)
    np.testing.assert_allclose(face.eyes, np.array(astronaut_face.eyes) * 3, atol=9)


def test_plain_image_has_no_face():
    assert detect_faces(Image.new("RGB", (300, 300), (90, 120, 150))) == []


def test_two_faces_are_both_found(astronaut):
    faces = detect_faces(two_people(astronaut))
    assert len(faces) == 2
    assert faces[0].box[0] < 210 <= faces[1].box[0] or faces[1].box[0] < 210 <= faces[0].box[0]


@pytest.mark.parametrize("framing, size", [("face", 128), ("head", 96)])
def test_alignment_is_square_with_level_eyes_where_the_framing_puts_them(astronaut, astronaut_face, framing, size):
    crop = align_face(astronaut, astronaut_face, size, framing)
    assert crop.size == (size, size) and crop.mode == "RGB"
    (face,) = detect_faces(crop.resize((256, 256), Image.Resampling.LANCZOS))
    assert abs(face.eye_angle) < 3
    (lx, ly), (rx, ry) = face.eyes
    side_in_eyes, eye_height = FRAMINGS[framing]
    assert abs((ly + ry) / 2 / 256 - eye_height) < 0.04
    assert abs((rx - lx) / 256 - 1 / side_in_eyes) < 0.03
    assert abs((lx + rx) / 2 / 256 - 0.5) < 0.04


def test_alignment_levels_a_tilted_head(astronaut):
    tilted = astronaut.rotate(15, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    (face,) = detect_faces(tilted)
    assert face.eye_angle < -10
    (aligned,) = detect_faces(align_face(tilted, face, 256))
    assert abs(aligned.eye_angle) < 3


def test_alignment_rejects_unknown_framing(astronaut, astronaut_face):
    with pytest.raises(ValueError, match=r"framing must be one of \('face', 'head'\), got 'body'"):
        align_face(astronaut, astronaut_face, 64, "body")  # type: ignore[arg-type]


def test_crop_subjects_reports_each_photo(astronaut):
    photos = [Photo(astronaut, Path("me.jpg"), "a photo of {token} person"),
              Photo(Image.new("RGB", (300, 300), (90, 120, 150)), Path("wall.jpg")),
              Photo(two_people(astronaut), Path("party.jpg"))]
    report = crop_subjects(photos, 64, "head")
    assert [(o.photo.source.name, len(o.faces), o.crop is not None) for o in report.outcomes] == [
        ("me.jpg", 1, True), ("wall.jpg", 0, False), ("party.jpg", 2, False)]
    (kept,) = report.kept
    assert kept.source == Path("me.jpg") and kept.caption == "a photo of {token} person"
    assert kept.image.size == (64, 64)
    assert {r.source.name: r.reason for r in report.rejected} == {
        "wall.jpg": "no face found - use a photo where your face is clearly visible, facing the camera",
        "party.jpg": "2 faces found - use a photo with only you in it, or crop it",
    }


def test_crop_subjects_without_any_face_says_what_to_do():
    with pytest.raises(ValueError, match=r"(?s)no photo has exactly one detectable face:\n  wall.png: no face found"
                                         r".*set DETECT_FACES = False"):
        crop_subjects([Photo(Image.new("RGB", (300, 300)), Path("wall.png"))], 64)


def test_detect_false_centre_crops_drawn_subjects():
    drawn = [render(p, 64) for p in portraits(0, 3, identity=TOY_SUBJECT)]
    wide = Image.new("RGB", (120, 64), (255, 0, 0))
    wide.paste(drawn[0], (28, 0))
    photos = [Photo(img, Path(f"toy{i}.png")) for i, img in enumerate([*drawn, wide])]
    report = crop_subjects(photos, 48, detect=False)
    assert report.rejected == [] and all(o.faces == () for o in report.outcomes)
    assert [p.image.size for p in report.kept] == [(48, 48)] * 4
    cut = np.asarray(report.kept[3].image, dtype=np.float64)
    assert np.abs(cut - np.asarray(centre_crop(drawn[0], 48), dtype=np.float64)).mean() < 2  # red sides cut off
    assert not np.any((cut[..., 0] > 240) & (cut[..., 1] < 15) & (cut[..., 2] < 15))


def test_draw_faces_marks_a_copy(astronaut, astronaut_face):
    before = np.asarray(astronaut).copy()
    marked = draw_faces(astronaut, [astronaut_face])
    assert marked.size == astronaut.size
    assert np.array_equal(np.asarray(astronaut), before)
    left, top, _, _ = astronaut_face.box
    assert marked.getpixel((int(left), int(top) + 10)) == (0, 220, 0)
