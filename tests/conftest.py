"""Shared unit-test setup: few threads and the shared fixtures (the repo's root conftest.py sets QUICK and
HF_HUB_OFFLINE for every test, notebooks included).

torch uses one thread: the tiny models gain nothing from more, and on a busy shared CPU two threads made a 2-step
tiny generation 10-50x slower (measured: 0.2 s with one thread, 2-15 s with two).
"""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny random ``StableDiffusionPipeline`` (seed 0, CPU, float32, progress bar off), shared by the session.

    Do not change it (no training, no new tokens): tests that do build their own with ``build_tiny_pipeline``.
    """
    from nbutils.models import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tmp_run_dir(tmp_path):
    """An empty results-store folder (``out_dir`` for ``new_run``), fresh for each test."""
    path = tmp_path / "runs"
    path.mkdir()
    return path
