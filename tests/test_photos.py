"""Every kind of bad photo a student may drop into data/me/, each with the message it must get."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from nbutils.photos import (
    DEFAULT_MAX_PIXELS,
    load_photos,
    photos_from_images,
    subject_folder,
    to_rgb,
)
from nbutils.toyworld import TOY_SUBJECT, portraits, render

ORIENTATION = 0x0112


def toy_photos(n: int = 5, size: int = 128) -> list[Image.Image]:
    return [render(p, size) for p in portraits(0, n, identity=TOY_SUBJECT)]


def upright_pattern(w: int = 200, h: int = 300) -> Image.Image:
    """Grey image with a red block at the top left and a blue block at the bottom: no rotation maps it onto itself."""
    img = Image.new("RGB", (w, h), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, w // 2, h // 3))
    img.paste((0, 0, 255), (0, 2 * h // 3, w, h))
    return img


def mean_colour(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(img.crop(box), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_missing_folder_says_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: create it.*put 3-20 photos of yourself"):
        load_photos(tmp_path / "me")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "me").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        load_photos(tmp_path / "me")


def test_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"has no photos\nWhat to do: put 3-20 photos of yourself \(jpg/png/webp"):
        load_photos(tmp_path)


def test_only_unusable_files_lists_each_reason(tmp_path):
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "tiny.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(ValueError) as err:
        load_photos(tmp_path)
    message = str(err.value)
    assert "none of the 2 files" in message
    assert "tiny.png: too small (40x40 px)" in message and "notes.pdf: not a photo (.pdf)" in message
    assert "put 3-20 photos of yourself" in message


def test_non_image_files_are_skipped_and_broken_photos_rejected_with_a_reason(tmp_path):
    toy_photos(1)[0].save(tmp_path / "me.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "README").write_text("hello")
    (tmp_path / "fake.jpg").write_text("this is text, not a JPEG")
    (tmp_path / "album").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    report = load_photos(tmp_path, min_side=64)
    assert [p.source.name for p in report.kept] == ["me.png"]
    assert [r.source.name for r in report.rejected] == ["fake.jpg"]
    assert [r.source.name for r in report.skipped] == ["album", "notes.pdf", "README"]  # hidden files: not listed
    reasons = {r.source.name: r.reason for r in report.rejected + report.skipped}
    assert reasons["notes.pdf"] == "not a photo (.pdf): only jpg, jpeg, png and webp files are read"
    assert reasons["README"] == "not a photo (no extension): only jpg, jpeg, png and webp files are read"
    assert reasons["fake.jpg"].startswith("cannot be read as an image (")
    assert reasons["fake.jpg"].endswith("re-export it as jpg or png")
    assert reasons["album"].startswith("a folder, not a photo")


def test_truncated_jpeg_is_rejected(tmp_path):
    buf = tmp_path / "whole.jpg"
    Image.effect_noise((400, 300), 60).convert("RGB").save(buf, quality=90)
    data = buf.read_bytes()
    buf.unlink()
    (tmp_path / "broken.jpg").write_bytes(data[: len(data) // 2])
    toy_photos(1, 256)[0].save(tmp_path / "good.png")
    report = load_photos(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert [p.source.name for p in report.kept] == ["good.png"]
    (rejected,) = report.rejected
    assert rejected.source.name == "broken.jpg"
    assert "cannot be read as an image" in rejected.reason and "truncated" in rejected.reason


def test_refuses_to_run_with_truncated_loading_switched_on(tmp_path, monkeypatch):
    toy_photos(1, 256)[0].save(tmp_path / "good.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES is True; set it back to False"):
        load_photos(tmp_path)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("RGB", (300, 300), (200, 40, 40)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    (photo,) = load_photos(tmp_path).kept
    assert photo.image.mode == "RGB"
    np.testing.assert_allclose(mean_colour(photo.image, (0, 0, 300, 300)), (200, 40, 40), atol=6)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (300, 300), (0, 0, 0, 0))  # transparent black
    rgba.paste((0, 128, 0, 255), (0, 0, 150, 300))  # opaque green left half
    rgba.save(tmp_path / "cutout.png")
    (photo,) = load_photos(tmp_path).kept
    assert photo.image.mode == "RGB"
    assert photo.image.getpixel((50, 150)) == (0, 128, 0)
    assert photo.image.getpixel((250, 150)) == (255, 255, 255)  # not black


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.repeat(np.linspace(0, 65535, 300).astype(np.uint16)[None, :], 300, axis=0)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    (photo,) = load_photos(tmp_path).kept
    grey = np.asarray(photo.image)[0, :, 0].astype(int)
    assert grey[0] == 0 and grey[-1] == 255
    assert abs(grey[150] - round(levels[0, 150] / 257)) <= 1  # mid-grey stays mid-grey (clipping gives 255)
    assert np.all(np.diff(grey) >= 0) and len(np.unique(grey)) > 200


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1"])
def test_other_modes_become_rgb(tmp_path, mode):
    toy_photos(1, 256)[0].convert(mode).save(tmp_path / "x.png")
    (photo,) = load_photos(tmp_path).kept
    assert photo.image.mode == "RGB" and photo.image.size == (256, 256)


def test_to_rgb_palette_transparency_goes_white():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                                 (3, Image.Transpose.ROTATE_180)])
def test_exif_rotated_photo_comes_out_upright(tmp_path, orientation, stored):
    upright = upright_pattern()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    upright.transpose(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "phone.jpg").size != upright.size or orientation == 3
    (photo,) = load_photos(tmp_path, min_side=100).kept
    assert photo.image.size == (200, 300)
    np.testing.assert_allclose(mean_colour(photo.image, (10, 10, 90, 90)), (255, 0, 0), atol=12)  # red top left
    np.testing.assert_allclose(mean_colour(photo.image, (10, 210, 190, 290)), (0, 0, 255), atol=12)  # blue bottom
    np.testing.assert_allclose(mean_colour(photo.image, (110, 10, 190, 90)), (128, 128, 128), atol=12)


def test_20_megapixel_photo_is_downsized_early(tmp_path):
    Image.new("RGB", (5000, 4000), (90, 140, 200)).save(tmp_path / "huge.jpg", quality=80)
    (photo,) = load_photos(tmp_path).kept
    w, h = photo.image.size
    assert w * h <= DEFAULT_MAX_PIXELS and w * h > 0.9 * DEFAULT_MAX_PIXELS
    assert abs(w / h - 5000 / 4000) < 0.01
    np.testing.assert_allclose(mean_colour(photo.image, (0, 0, w, h)), (90, 140, 200), atol=3)


def test_40_pixel_photo_is_rejected_naming_the_minimum(tmp_path):
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "tiny.png")
    toy_photos(1, 256)[0].save(tmp_path / "ok.png")
    report = load_photos(tmp_path)
    (rejected,) = report.rejected
    assert rejected.reason == "too small (40x40 px): use photos at least 256 px on the shorter side"


def test_duplicates_keep_the_first_and_name_it(tmp_path):
    first, *others = toy_photos(5)
    first.save(tmp_path / "a.png")
    (tmp_path / "b_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    first.resize((100, 100), Image.Resampling.LANCZOS).save(tmp_path / "c_small.jpg", quality=85)
    for i, img in enumerate(others):
        img.save(tmp_path / f"d{i}.png")
    report = load_photos(tmp_path, min_side=64)
    assert [p.source.name for p in report.kept] == ["a.png", "d0.png", "d1.png", "d2.png", "d3.png"]
    assert {r.source.name: r.reason for r in report.rejected} == {
        "b_copy.png": "duplicate of a.png: keep one copy of each photo",
        "c_small.jpg": "duplicate of a.png: keep one copy of each photo",
    }


def test_flat_photos_of_different_colours_are_not_duplicates(tmp_path):
    Image.new("RGB", (256, 256), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (256, 256), (30, 30, 200)).save(tmp_path / "blue.png")
    assert len(load_photos(tmp_path).kept) == 2


def test_suffixes_case_insensitive_and_webp(tmp_path):
    imgs = toy_photos(3)
    imgs[0].save(tmp_path / "IMG_1.JPG", format="JPEG")
    imgs[1].save(tmp_path / "img_2.Jpeg", format="JPEG")
    imgs[2].save(tmp_path / "img_3.webp", lossless=True)
    report = load_photos(tmp_path, min_side=64)
    assert [p.source.name for p in report.kept] == ["IMG_1.JPG", "img_2.Jpeg", "img_3.webp"]
    assert report.rejected == []
    assert np.array_equal(np.asarray(report.kept[2].image), np.asarray(imgs[2]))


def test_caption_files_are_read_not_rejected(tmp_path):
    a, b = toy_photos(2)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a photo of {token} person on a beach\n", encoding="utf-8")
    (tmp_path / "orphan.txt").write_text("no photo of this name")
    report = load_photos(tmp_path, min_side=64)
    assert [(p.source.name, p.caption) for p in report.kept] == [("a.png", "a photo of {token} person on a beach"),
                                                                ("b.png", None)]
    assert report.rejected == [] and [r.source.name for r in report.skipped] == ["orphan.txt"]


def test_report_table_lists_every_file_in_name_order(tmp_path):
    toy_photos(1)[0].save(tmp_path / "B.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    (tmp_path / "c.json").write_text("{}")
    rows = load_photos(tmp_path, min_side=64).table()
    assert [(r["file"], r["status"], r["size"]) for r in rows] == [("a.png", "rejected", ""),
                                                                   ("B.png", "kept", "128x128"),
                                                                   ("c.json", "skipped", "")]


def test_user_files_are_never_modified(tmp_path):
    imgs = toy_photos(3, 256)
    imgs[0].save(tmp_path / "a.png")
    (tmp_path / "a_again.png").write_bytes((tmp_path / "a.png").read_bytes())
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    imgs[1].save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "tiny.png")
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "rotated.jpg").read_bytes()[:500])
    (tmp_path / "a.txt").write_text("{token} at home")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    before = snapshot(tmp_path)
    report = load_photos(tmp_path)
    assert len(report.kept) == 3 and len(report.rejected) == 3 and len(report.skipped) == 1
    assert snapshot(tmp_path) == before  # same names, bytes and modification times: nothing written or added


def test_photos_from_images_runs_the_same_checks():
    big, small = Image.new("RGB", (300, 300), (1, 2, 3)), Image.new("RGB", (40, 40))
    report = photos_from_images([big, small], ["demo.png", "small.png"])
    assert [p.source.name for p in report.kept] == ["demo.png"]
    assert report.rejected[0].reason.startswith("too small (40x40 px)")
    with pytest.raises(ValueError, match="give one name per image"):
        photos_from_images([big], ["a", "b"])
    with pytest.raises(ValueError, match=r"none of the 1 files in the given images is usable:\n  small.png: too small"):
        photos_from_images([small], ["small.png"])


def test_subject_folder_auto_prefers_the_students_photos(tmp_path):
    me = tmp_path / "data" / "me"
    me.mkdir(parents=True)
    (me / "notes.txt").write_text("no photos yet")
    assert subject_folder("auto", "tiny", root=tmp_path) == tmp_path / "data" / "subjects" / "toy"
    assert subject_folder("auto", "toy", root=tmp_path) == tmp_path / "data" / "subjects" / "toy"
    assert subject_folder("auto", "real", root=tmp_path) is None  # the demo photo
    toy_photos(1)[0].save(me / "me.PNG")
    assert subject_folder("auto", "real", root=tmp_path) == me
    assert subject_folder("auto", "toy", root=tmp_path) == me
    assert subject_folder("data/elsewhere", "real", root=tmp_path) == tmp_path / "data" / "elsewhere"
    assert subject_folder(tmp_path / "x", "toy", root=Path("/nonexistent")) == tmp_path / "x"
    with pytest.raises(ValueError, match="expected 'real', 'toy' or 'tiny'"):
        subject_folder("auto", "huge", root=tmp_path / "nothing")
