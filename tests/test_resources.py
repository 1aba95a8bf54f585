"""Resource tracking: wall time, peak RSS of a known allocation, folder sizes, parameter counts."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from nbutils.resources import MIB, count_parameters, dir_size_bytes, track


def test_track_measures_a_known_sleep():
    with track() as usage:
        time.sleep(0.3)
    assert 0.3 <= usage.wall_s < 1.0
    assert usage.peak_rss_mb >= usage.start_rss_mb > 0
    if torch.cuda.is_available():
        assert usage.peak_cuda_mb >= 0
    else:
        assert usage.peak_cuda_mb is None


def test_track_sees_a_200_mb_allocation_freed_inside_the_block():
    with track() as usage:
        block = np.ones(200 * MIB // 8)  # 200 MiB of float64, every page written
        time.sleep(0.1)
        del block
    assert usage.peak_rss_mb - usage.start_rss_mb >= 150


def test_track_fills_usage_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with track() as usage:
            time.sleep(0.05)
            raise RuntimeError("boom")
    assert usage.wall_s >= 0.05


def test_dir_size_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b.bin").write_bytes(b"y" * 234)
    (tmp_path / "sub" / "link.bin").symlink_to(tmp_path / "a.bin")
    assert dir_size_bytes(tmp_path / "sub" / "deeper" / "b.bin") == 234
    assert dir_size_bytes(tmp_path) == 1000 + 234 + 1000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dir_size_bytes(tmp_path / "missing")


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 16 + 10 parameters
    model[0].requires_grad_(False)
    assert count_parameters(model) == 10
    assert count_parameters(model, trainable_only=False) == 26
    tied = nn.Sequential(model[1], model[1])
    assert count_parameters(tied) == 10  # a shared module counts once
