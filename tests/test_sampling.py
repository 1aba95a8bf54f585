"""Seeded sampling: a (prompt, seed) pair gives the same image whatever the batch it is drawn in."""
import numpy as np
import pytest

from nbutils.sampling import generate


def test_same_seed_same_image_across_batch_sizes(tiny_pipe):
    seeds = [3, 4, 5]
    a = generate(tiny_pipe, "a photo of a person", seeds, steps=2, guidance_scale=3.0, batch_size=3, progress=False)
    b = generate(tiny_pipe, "a photo of a person", seeds, steps=2, guidance_scale=3.0, batch_size=1, progress=False)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_one_prompt_per_seed_or_a_clear_error(tiny_pipe):
    imgs = generate(tiny_pipe, ["a photo of a person", "a pencil sketch of a person"], [0, 0], steps=2,
                    guidance_scale=3.0, progress=False)
    assert not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))
    with pytest.raises(ValueError, match="one prompt, or one per seed"):
        generate(tiny_pipe, ["a", "b", "c"], [0, 1], steps=2, guidance_scale=3.0)


def test_precomputed_prompt_embeds_give_the_same_images_as_the_prompt(tiny_pipe):
    prompt = "a photo of a person"
    pos, neg = tiny_pipe.encode_prompt(prompt, "cpu", 1, True, "")
    by_text = generate(tiny_pipe, prompt, [1, 2], steps=2, guidance_scale=3.0, progress=False)
    by_embeds = generate(tiny_pipe, None, [1, 2], steps=2, guidance_scale=3.0, prompt_embeds=pos,
                         negative_prompt_embeds=neg, progress=False)
    for x, y in zip(by_text, by_embeds):
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    with pytest.raises(ValueError, match="not both"):
        generate(tiny_pipe, prompt, [1], steps=2, guidance_scale=3.0, prompt_embeds=pos)
