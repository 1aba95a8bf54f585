"""`make lab`: JupyterLab is in the venv at the pinned version, and the target opens notebooks/ with it and the
project's kernel. The target itself is never run here (it serves until stopped): `make -n` prints its command."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv that runs the tests: the one `make lab` uses


def pinned(name: str, file: str) -> str:
    """The version ``file`` pins ``name`` to (``name==X``)."""
    return re.search(rf"^\s*(?:- )?{name}==(\S+)$", (ROOT / file).read_text(), re.M).group(1)


def test_jupyterlab_is_pinned_alike_in_requirements_lock_and_conda_file():
    version = pinned("jupyterlab", "requirements.in")
    assert pinned("jupyterlab", "requirements.lock") == version == pinned("jupyterlab", "environment.yml")


def test_the_venvs_jupyter_lab_is_the_pinned_version():
    out = subprocess.run([str(VENV_BIN / "jupyter"), "lab", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == pinned("jupyterlab", "requirements.in")


def test_make_lab_opens_the_notebooks_with_the_venvs_jupyter_and_the_project_kernel():
    venv = VENV_BIN.parent
    out = subprocess.run(["make", "-n", "--no-print-directory", "lab", f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # under make test: no "Leaving directory"
    assert out.returncode == 0, out.stderr
    register, start = out.stdout.strip().splitlines()[-2:]
    assert register.startswith(f"{venv}/bin/python -m ipykernel install --user --name portrait-studio ")
    command = start.split()
    assert command[:2] == [f"{venv}/bin/jupyter", "lab"]
    assert "--ServerApp.root_dir=notebooks" in command
    assert "--MappingKernelManager.default_kernel_name=portrait-studio" in command
    assert ("--allow-root" in command) == (subprocess.check_output(["id", "-u"], text=True).strip() == "0")
