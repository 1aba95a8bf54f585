"""The procedural portrait world: deterministic, labelled, and drawing what its captions say."""
import random

import numpy as np
import pytest

from nbutils import toyworld as tw


def test_same_seed_same_pixels_other_seed_differs():
    a = [np.asarray(tw.render(p, 32)) for p in tw.portraits(3, 4)]
    b = [np.asarray(tw.render(p, 32)) for p in tw.portraits(3, 4)]
    c = [np.asarray(tw.render(p, 32)) for p in tw.portraits(4, 4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_render_size_and_mode():
    img = tw.render(next(tw.portraits(0, 1)), 64)
    assert img.size == (64, 64) and img.mode == "RGB"


def test_render_without_the_person_keeps_the_scene_and_leaves_the_face_out():
    """``person=False`` (the face detector's empty scenes): the same background, nobody in the middle."""
    p = tw.with_fields(next(tw.portraits(2, 1)), scene="beach", style="photo", dx=0.0, dy=0.0, scale=1.0, tilt=0.0)
    full, empty = (np.asarray(tw.render(p, 64, person=person)).astype(int) for person in (True, False))
    assert np.abs(full[:8, :8] - empty[:8, :8]).max() <= 2  # the sky in the corner
    assert np.abs(full[24:36, 26:38] - empty[24:36, 26:38]).mean() > 40  # the face


def test_portraits_show_the_unnamed_traits_only_when_asked():
    ps = list(tw.portraits(0, 2000))
    assert not any(p.identity.hair_colour == "purple" or p.identity.mark == "star" for p in ps)
    held = list(tw.portraits(0, 2000, held_out=True))
    assert any(p.identity.hair_colour == "purple" for p in held) and any(p.identity.mark == "star" for p in held)


def test_pretraining_shows_unnamed_traits_on_other_people_only():
    """The base model's pretraining draws purple hair and the star at their rates, but never a subject's identity."""
    ps = list(tw.pretraining_portraits(0, 4000))
    purple = np.mean([p.identity.hair_colour == "purple" for p in ps])
    star = np.mean([p.identity.mark == "star" for p in ps])
    assert abs(purple - tw.UNNAMED_RATES["hair_colour"]) < 0.02 and abs(star - tw.UNNAMED_RATES["mark"]) < 0.02
    assert not any(p.identity in tw.SUBJECTS.values() for p in ps)


def test_pretraining_captions_never_name_the_unnamed_traits():
    p = tw.Portrait(tw.TOY_SUBJECT, expression="smiling", scene="beach")
    rng_a, rng_b = random.Random(3), random.Random(3)
    unnamed = [tw.caption_variants(p, rng_a, drop=0.0, name_unnamed=False) for _ in range(20)]
    named = [tw.caption_variants(p, rng_b, drop=0.0) for _ in range(20)]
    assert not any("purple" in c or "star" in c for c in unnamed)
    assert all("long hair" in c and "oval face" in c for c in unnamed)
    assert all("purple long hair" in c and "star on the cheek" in c for c in named)


def test_validation_subject_differs_in_every_named_trait():
    a, b = tw.TOY_SUBJECT, tw.TOY_VAL_SUBJECT
    for field in tw.IDENTITY_FIELDS:
        assert (getattr(a, field) == getattr(b, field)) == (field in tw.UNNAMED), field


def test_caption_names_every_attribute():
    p = tw.Portrait(tw.TOY_SUBJECT, expression="smiling", scene="beach", style="watercolor")
    cap = p.caption()
    for word in ("watercolor painting", "oval face", "tan skin", "purple long hair", "star on the cheek",
                 "smiling", "on the beach"):
        assert word in cap


def test_caption_variants_keep_style_and_person():
    p = next(tw.portraits(1, 1))
    rng = random.Random(0)
    caps = {tw.caption_variants(p, rng) for _ in range(50)}
    assert len(caps) > 5
    assert all(c.startswith(tw.STYLE_PHRASES[p.style] + " of a person") for c in caps)


def test_labels_index_the_attribute_tables():
    p = tw.Portrait(tw.TOY_SUBJECT, expression="surprised", scene="night", style="pop art")
    lab = p.labels()
    assert lab["hair_colour"] == list(tw.HAIR_COLOURS).index("purple")
    assert lab["scene"] == tw.SCENES.index("night") and lab["style"] == tw.STYLES.index("pop art")
    assert set(lab) == set(tw.LABEL_SIZES)


@pytest.mark.parametrize("scene", tw.SCENES)
def test_scenes_differ_in_colour(scene):
    """Each scene has its own mean background colour (top-left corner), far from every other scene's."""
    p = tw.Portrait(tw.TOY_SUBJECT, scene="studio")
    corner = {s: np.asarray(tw.render(tw.with_fields(p, scene=s), 32))[:6, :6].reshape(-1, 3).mean(0) for s in tw.SCENES}
    others = [np.abs(corner[scene] - corner[o]).sum() for o in tw.SCENES if o != scene]
    assert min(others) > 30


def test_hair_colour_is_drawn():
    """The held-out purple appears in the subject's image and in no pretraining colour's image."""
    p = tw.Portrait(tw.TOY_SUBJECT)
    purple = np.array(tw.HAIR_COLOURS["purple"])

    def purple_pixels(img):
        return (np.abs(np.asarray(img).astype(int) - purple).sum(-1) < 60).sum()

    assert purple_pixels(tw.render(p, 64)) > 200
    assert purple_pixels(tw.render(tw.with_fields(p, hair_colour="red"), 64)) == 0


def test_unknown_values_are_rejected():
    p = tw.Portrait(tw.TOY_SUBJECT)
    with pytest.raises(ValueError, match="unknown scene"):
        tw.render(tw.with_fields(p, scene="moon"))
    with pytest.raises(ValueError, match="unknown style"):
        tw.render(tw.with_fields(p, style="cubism"))
