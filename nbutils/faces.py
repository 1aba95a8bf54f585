"""Offline face detection and alignment with dlib, and the public-domain demo subject.

Detection is dlib's built-in HOG detector; landmarks come from the 5-point model that the
``face_recognition_models`` package ships (two corners per eye and the base of the nose). Alignment is a
similarity transform (rotation, uniform scale, shift) that puts both eye centres level at a fixed place in a
square crop; pixels beyond the photo's border are mirrored in, never painted black.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from skimage import data as skdata
from skimage import transform

from nbutils.photos import Photo, Rejected

Framing = Literal["face", "head"]
FRAMINGS: dict[str, tuple[float, float]] = {"face": (4.0, 0.42), "head": (7.0, 0.36)}
"""Crop side in eye distances, and the eyes' height as a fraction of the side from the top."""
DETECT_SIDE = 640
"""Photos are scaled to at most this many pixels on the long side for detection (then upsampled once)."""
MIN_SCORE = 0.3
"""Detections scoring below this are ignored (dlib finds a 'face' in the astronaut's mission patch at 0.12)."""


@dataclass(frozen=True)
class FaceBox:
    """A detected face in photo pixel coordinates.

    ``box`` is ``(left, top, right, bottom)``; ``landmarks`` the 5 ``(x, y)`` points of dlib's 5-point model
    (one eye's two corners, the other eye's two corners, the base of the nose); ``score`` the detector's
    confidence (higher is surer, 0 is its default threshold).
    """

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def eyes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Centres of the eye on the image's left and the eye on the image's right, ``(x, y)`` each."""
        pts = np.asarray(self.landmarks, dtype=np.float64)
        a, b = pts[0:2].mean(axis=0), pts[2:4].mean(axis=0)
        left, right = sorted(((float(a[0]), float(a[1])), (float(b[0]), float(b[1]))))
        return left, right

    @property
    def eye_angle(self) -> float:
        """Angle of the line through the eye centres, in degrees (0 = level, positive = right eye lower)."""
        (x0, y0), (x1, y1) = self.eyes
        return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))


@dataclass(frozen=True)
class FaceOutcome:
    """What happened to one photo: the faces found, and the aligned crop or the reason it was rejected."""

    photo: Photo
    faces: tuple[FaceBox, ...]
    crop: Image.Image | None
    reason: str = ""


@dataclass
class FaceReport:
    """Per-photo outcomes of ``crop_subjects``, in input order."""

    outcomes: list[FaceOutcome] = field(default_factory=list)

    @property
    def kept(self) -> list[Photo]:
        """The kept photos, their ``image`` replaced by the square crop (source and caption unchanged)."""
        return [replace(o.photo, image=o.crop) for o in self.outcomes if o.crop is not None]

    @property
    def rejected(self) -> list[Rejected]:
        return [Rejected(o.photo.source, o.reason) for o in self.outcomes if o.crop is None]


def face_model_path(name: str) -> Path:
    """Path of a model file shipped by ``face_recognition_models``, found without importing the package.

    (Its ``__init__`` imports ``pkg_resources``, which new setuptools no longer has.) ``name`` is e.g.
    ``"shape_predictor_5_face_landmarks.dat"`` or ``"dlib_face_recognition_resnet_model_v1.dat"``.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face models missing: run `pip install face-recognition-models==0.3.0` "
                                  "(or `make venv`)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    path = folder / name
    if not path.is_file():
        available = ", ".join(sorted(p.name for p in folder.glob("*.dat")))
        raise FileNotFoundError(f"no face model {name!r} in {folder}; available: {available}")
    return path


@lru_cache(maxsize=1)
def _detector():  # dlib objects are not picklable or hashable arguments; cache the loaded models once
    import dlib

    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _landmarker():
    import dlib

    return dlib.shape_predictor(str(face_model_path("shape_predictor_5_face_landmarks.dat")))


def detect_faces(img: Image.Image, *, min_score: float = MIN_SCORE) -> list[FaceBox]:
    """All faces in an RGB image, best score first; landmarks are fitted on the full-resolution photo."""
    import dlib

    rgb_img = img.convert("RGB")
    rgb = np.asarray(rgb_img)
    k = min(1.0, DETECT_SIDE / max(img.size))
    small = rgb if k == 1 else np.asarray(
        rgb_img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.Resampling.BOX))
    rects, scores, _ = _detector().run(small, 1, 0.0)
    faces = []
    for rect, score in sorted(zip(rects, scores), key=lambda rs: -rs[1]):
        if score < min_score:
            continue
        box = dlib.rectangle(*(round(v / k) for v in (rect.left(), rect.top(), rect.right(), rect.bottom())))
        shape = _landmarker()(rgb, box)
        faces.append(FaceBox((box.left(), box.top(), box.right(), box.bottom()),
                             tuple((float(p.x), float(p.y)) for p in shape.parts()), float(score)))
    return faces


def align_face(img: Image.Image, face: FaceBox, size: int, framing: Framing = "face") -> Image.Image:
    """A ``size x size`` RGB crop with the eyes level, framed as ``"face"`` (close-up) or ``"head"`` (head and
    shoulders)."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {tuple(FRAMINGS)}, got {framing!r}")
    side_in_eyes, eye_height = FRAMINGS[framing]
    (lx, ly), (rx, ry) = face.eyes
    src = np.array([[lx, ly], [rx, ry]])
    reduce = int(side_in_eyes * np.hypot(rx - lx, ry - ly) / size)  # pre-shrink so the warp never skips pixels
    rgb = img.convert("RGB")
    if reduce >= 2:
        rgb, src = rgb.reduce(reduce), src / reduce
    half = size / side_in_eyes / 2  # half the eye distance, in crop pixels
    dst = np.array([[size / 2 - half, eye_height * size], [size / 2 + half, eye_height * size]])
    crop_to_photo = transform.SimilarityTransform.from_estimate(dst, src)
    if not crop_to_photo:
        raise ValueError(f"cannot align: the two eye centres coincide ({face.eyes}); use another photo")
    out = transform.warp(np.asarray(rgb), crop_to_photo, output_shape=(size, size), order=3, mode="symmetric",
                         preserve_range=True)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """The largest centred square of ``img``, resized to ``size x size`` RGB (no face detection)."""
    return ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.LANCZOS)


def crop_subjects(photos: Sequence[Photo], size: int, framing: Framing = "face", detect: bool = True) -> FaceReport:
    """Square crops of the one person in each photo, or a reason per photo why not.

    With ``detect=False`` (drawn subjects such as the toy world, where a face detector finds nothing) every photo
    is centre-cropped instead. Raises ``ValueError`` when no photo is kept.
    """
    report = FaceReport()
    for photo in photos:
        if not detect:
            report.outcomes.append(FaceOutcome(photo, (), centre_crop(photo.image, size)))
            continue
        faces = tuple(detect_faces(photo.image))
        if len(faces) == 1:
            report.outcomes.append(FaceOutcome(photo, faces, align_face(photo.image, faces[0], size, framing)))
        elif not faces:
            report.outcomes.append(FaceOutcome(photo, faces, None, "no face found - use a photo where your face "
                                                                   "is clearly visible, facing the camera"))
        else:
            report.outcomes.append(FaceOutcome(photo, faces, None, f"{len(faces)} faces found - use a photo with "
                                                                   "only you in it, or crop it"))
    if not report.kept:
        reasons = "".join(f"\n  {r.source.name}: {r.reason}" for r in report.rejected)
        raise ValueError(f"no photo has exactly one detectable face:{reasons}\nWhat to do: add clear, front-facing "
                         "photos of only you; for drawn subjects set DETECT_FACES = False to centre-crop instead")
    return report


def draw_faces(img: Image.Image, faces: Sequence[FaceBox]) -> Image.Image:
    """A copy of ``img`` with each face box (green) and its 5 landmarks (red) drawn on it."""
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, max(img.size) // 200)
    for face in faces:
        draw.rectangle(face.box, outline=(0, 220, 0), width=width)
        for x, y in face.landmarks:
            draw.ellipse([x - width, y - width, x + width, y + width], fill=(230, 0, 0))
    return out


def demo_subject_photos() -> list[Image.Image]:
    """The real tier's one-photo demo subject: scikit-image's public-domain astronaut (Eileen Collins), 512x512 RGB."""
    return [Image.fromarray(skdata.astronaut())]
