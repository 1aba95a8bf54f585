"""The class-image cache of DreamBooth's prior preservation on the tiny random pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nbutils import class_images
from nbutils.class_images import class_image_count, class_latents, ensure_class_images, image_seed
from nbutils.models import build_tiny_pipeline
from nbutils.prompts import CLASS_PROMPT
from nbutils.sampling import generate
from nbutils.train import encode_latents

GEN = dict(steps=2, guidance_scale=4.0)  # class-image sampling on the tiny tier


def count_generate(monkeypatch) -> list[int]:
    """Replace the sampler ensure_class_images uses by one that records how many images each call draws."""
    drawn: list[int] = []

    def counting(pipe, prompts, seeds, **kwargs):
        drawn.append(len(seeds))
        return generate(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(class_images, "generate", counting)
    return drawn


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_class_images_are_generated_once_reused_and_topped_up(tmp_path, monkeypatch):
    pipe = build_tiny_pipeline(0)
    drawn = count_generate(monkeypatch)
    kwargs = dict(model="tiny", cache_dir=tmp_path, **GEN)
    first = ensure_class_images(pipe, 3, **kwargs)
    assert drawn == [3] and first.files == ["00000.png", "00001.png", "00002.png"]
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["key"]["prompt"] == CLASS_PROMPT and manifest["key"]["resolution"] == 32
    assert manifest["images"] == {f"{i:05d}.png": image_seed(0, i) for i in range(3)}
    direct = generate(pipe, CLASS_PROMPT, [image_seed(0, 1)], **GEN)[0]
    assert np.array_equal(np.asarray(first.images[1]), np.asarray(direct))  # the base model's own sample

    again = ensure_class_images(pipe, 3, **kwargs)
    assert drawn == [3]  # nothing generated the second time
    assert again.fingerprint == first.fingerprint and np.array_equal(pixels(again.images), pixels(first.images))
    more = ensure_class_images(pipe, 5, **kwargs)
    assert drawn == [3, 2] and more.files[:3] == first.files and len(more.images) == 5  # only the rest
    assert ensure_class_images(pipe, 2, **kwargs).files == first.files[:2] and drawn == [3, 2]
    other = ensure_class_images(pipe, 2, **{**kwargs, "seed": 1})
    assert other.folder != first.folder and drawn == [3, 2, 2]

    encoded = []
    monkeypatch.setattr(class_images, "encode_latents", lambda *a, **k: encoded.append(1) or encode_latents(*a, **k))
    latents = class_latents(pipe, first, 32)
    assert latents.shape == (3, 4, 4, 4) and torch.equal(class_latents(pipe, first, 32), latents)
    assert len(encoded) == 1  # the second call read the cached latents
    assert class_latents(pipe, more, 32).shape == (5, 4, 4, 4) and len(encoded) == 2  # other images: encoded again
    with pytest.raises(ValueError, match="pass model="):
        ensure_class_images(pipe, 2, cache_dir=tmp_path, **GEN)


def test_corrupt_and_wrong_sized_class_images(tmp_path, monkeypatch):
    pipe = build_tiny_pipeline(0)
    kwargs = dict(model="tiny", cache_dir=tmp_path, **GEN)
    folder = ensure_class_images(pipe, 3, **kwargs).folder
    original = (folder / "00001.png").read_bytes()
    (folder / "00001.png").write_bytes(original[:60])  # a generated file, truncated
    (folder / "zz-notes.png").write_bytes(b"not an image")  # someone else's broken file
    Image.new("RGB", (20, 12), "red").save(folder / "photo.jpg")  # a hand-added photo of another size
    drawn = count_generate(monkeypatch)

    with pytest.warns(UserWarning) as record:
        result = ensure_class_images(pipe, 4, **kwargs)
    messages = [str(w.message) for w in record]
    assert any("Skipped 1 unreadable" in m and "zz-notes.png" in m for m in messages)
    assert any("not 32x32 px: ['photo.jpg']" in m for m in messages)
    assert drawn == [1]  # only the damaged generated image was drawn again
    assert (folder / "00001.png").read_bytes() == original  # same seed, same image
    assert (folder / "zz-notes.png").read_bytes() == b"not an image"  # never touched
    assert result.files == ["00000.png", "00001.png", "00002.png", "photo.jpg"]
    assert result.images[3].size == (20, 12)
    assert class_latents(pipe, result, 32).shape == (4, 4, 4, 4)  # centre-cropped and resized when encoded

    (folder / "latents-32.safetensors").write_bytes(b"garbage")  # a damaged latent cache is rebuilt
    assert class_latents(pipe, result, 32).shape == (4, 4, 4, 4)
    assert load_file(folder / "latents-32.safetensors")["latents"].shape == (4, 4, 4, 4)



def test_class_image_count_follows_the_tier():
    assert [class_image_count(t) for t in ("real", "toy", "tiny")] == [200, 64, 4]
    assert class_image_count("real", quick=True) == 50
    with pytest.raises(ValueError, match="Unknown model tier"):
        class_image_count("huge")
