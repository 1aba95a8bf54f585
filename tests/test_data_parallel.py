"""Data-parallel training (scripts/train_data_parallel.py, nbutils.train with an Accelerator): two CPU processes
(gloo) under ``accelerate launch`` keep identical weights and equal one process with twice the accumulation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nbutils.augment import DEFAULT_TEMPLATES, AugmentConfig, write_prepared_dataset
from nbutils.photos import Photo
from nbutils.runs import REPO_ROOT, list_runs
from nbutils.toyworld import TOY_SUBJECT, portraits, render

SCRIPT = REPO_ROOT / "scripts" / "train_data_parallel.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    photos = [Photo(render(p, 32), Path(f"photo{i}.png")) for i, p in enumerate(portraits(0, 3, identity=TOY_SUBJECT))]
    return write_prepared_dataset(photos, tmp_path_factory.mktemp("dp") / "dataset", "sks", DEFAULT_TEMPLATES,
                                  AugmentConfig(n_per_image=0), seed=0)


def launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else \
        [sys.executable]
    return subprocess.run(prefix + [str(SCRIPT), "--model", "tiny", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def checkpoint_tensors(store: Path) -> dict[str, torch.Tensor]:
    [run] = list_runs(store)
    assert run.finished
    [folder] = (run.path / "artifacts" / "checkpoints").iterdir()
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_two_processes_keep_identical_weights_and_equal_one_process_with_twice_the_accumulation(dataset, tmp_path):
    two = launch(["--dataset", str(dataset), "--store", str(tmp_path / "two"), "--steps", "2"], processes=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert "on 2 process(es)" in two.stdout and "weights identical on every process" in two.stdout
    one = launch(["--dataset", str(dataset), "--store", str(tmp_path / "one"), "--steps", "2",
                  "--gradient-accumulation", "2"], processes=1)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-4000:]
    a, b = checkpoint_tensors(tmp_path / "two"), checkpoint_tensors(tmp_path / "one")
    assert a.keys() == b.keys() and any(k.startswith("dreambooth") for k in a)
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_recipe_with_prior_preservation_is_refused_with_the_reason(dataset, tmp_path):
    done = launch(["--method", "dreambooth", "--dataset", str(dataset), "--store", str(tmp_path)], processes=1)
    assert done.returncode != 0 and "prior preservation, which needs class images" in done.stderr
