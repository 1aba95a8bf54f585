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
