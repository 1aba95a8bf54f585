"""Shared unit-test setup: few threads and the shared fixtures (the repo's root conftest.py sets QUICK and
HF_HUB_OFFLINE for every test, notebooks included).

torch uses one thread: the tiny models gain nothing from more, and on a busy shared CPU two threads made a 2-step
tiny generation 10-50x slower (measured: 0.2 s with one thread, 2-15 s with two).
"""
from __future__ import annotations

import huggingface_hub.constants
import pytest
import skimage.data
import torch
from PIL import Image

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


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    """The public-domain astronaut photo of scikit-image: a real face (dlib finds it)."""
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    """scikit-image's cat photo: no human face."""
    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode (huggingface_hub reads HF_HUB_OFFLINE once, at import, so patch the constant too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
