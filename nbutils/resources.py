"""What a method costs: wall time, peak memory, artifact size on disk and parameter counts.

Every method notebook wraps its training in ``track()`` and logs the result (``dataclasses.asdict(usage)``) with
``dir_size_bytes`` of its artifacts and ``count_parameters`` of what it trained into its run folder.
Memory is in MiB (2**20 bytes), time in seconds, sizes in bytes.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import torch
from torch import nn

MIB = 2**20


@dataclass
class Usage:
    """Resources used by one ``track()`` block; filled in when the block ends.

    ``peak_rss_mb`` is the highest resident set size of this process seen during the block (sampled by a background
    thread every ``interval_s``, plus at the start and the end), ``start_rss_mb`` the RSS when it began, so
    ``peak_rss_mb - start_rss_mb`` is what the block added. ``peak_cuda_mb`` is ``torch.cuda.max_memory_allocated``
    after a reset at the start (tensors only, not the CUDA context), ``None`` without CUDA.
    """

    wall_s: float = 0.0
    start_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None


def _rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / MIB


@contextmanager
def track(interval_s: float = 0.005) -> Iterator[Usage]:
    """Measure the wall time and peak memory of the ``with`` block: ``with track() as usage: ...``.

    The yielded ``Usage`` is complete once the block exits (also when it raises). A peak shorter than
    ``interval_s`` seconds can be missed.
    """
    process = psutil.Process()
    usage = Usage(start_rss_mb=_rss_mb(process))
    usage.peak_rss_mb = usage.start_rss_mb
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            usage.peak_rss_mb = max(usage.peak_rss_mb, _rss_mb(process))

    sampler = threading.Thread(target=sample, name="resources.track", daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.wall_s = time.perf_counter() - start
        stop.set()
        sampler.join()
        usage.peak_rss_mb = max(usage.peak_rss_mb, _rss_mb(process))
        if cuda:
            usage.peak_cuda_mb = torch.cuda.max_memory_allocated() / MIB


def dir_size_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path`` (or of ``path`` itself if it is a file).

    A symbolic link to a file counts as its target's size (the Hugging Face cache links snapshots to blobs).
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; pass the folder (or file) the method saved its artifacts to")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``module`` (those with ``requires_grad`` if ``trainable_only``).

    Shared (tied) parameters count once.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
