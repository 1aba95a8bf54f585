"""Interrupted work resumes where it stopped (issue 17): the run-folder decisions, damaged states, a process killed
inside a checkpoint write, a notebook kernel killed mid-training and a study stopped with Ctrl-C.

The last two execute the real notebooks 01 and 02 with papermill on the tiny tier (about two minutes together).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import torch
from safetensors.torch import load_file

from nbutils.models import build_tiny_pipeline
from nbutils.runs import REPO_ROOT, code_version, drive_out_dir, find_resumable_run, list_runs, load_run, new_run
from nbutils.study import resume_or_new_run
from nbutils.textual_inversion import TextualInversion
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, checkpoint_problem, list_checkpoints, resume_problem, train

spec = importlib.util.spec_from_file_location("run_study", REPO_ROOT / "scripts" / "run_study.py")
run_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_study)

VERSION = code_version(["textual_inversion"])
PARAMS = {"MODEL": "tiny", "SEED": 0, "train": {"steps": 4, "lr": 5e-3}}


# ------------------------------------------------------------------------------------------ decisions, bad states
def test_resume_finds_the_interrupted_run_and_says_why_not_otherwise(tmp_run_dir):
    run = new_run("02_x", PARAMS, out_dir=tmp_run_dir, method="ti", code_version=VERSION)
    new_run("02_x", PARAMS, out_dir=tmp_run_dir, method="other", code_version=VERSION)  # another method: skipped
    study = tmp_run_dir / "20250101-000000"  # a study folder below OUT_DIR is not this OUT_DIR's: not searched
    new_run("02_x", PARAMS, out_dir=study, method="ti", code_version=VERSION)
    found = find_resumable_run(tmp_run_dir, "02_x", PARAMS, code_version=VERSION, method="ti")
    assert found.run.path == run.path and "resuming" in found.reason

    changed = {**PARAMS, "train": {"steps": 8, "lr": 5e-3}}
    found = find_resumable_run(tmp_run_dir, "02_x", changed, code_version=VERSION, method="ti")
    assert found.run is None and "other parameters (train.steps)" in found.reason
    other = new_run("02_x", changed, out_dir=tmp_run_dir, method="ti", code_version=VERSION)  # another experiment
    found = find_resumable_run(tmp_run_dir, "02_x", PARAMS, code_version=VERSION, method="ti")
    assert found.run.path == run.path  # passed over: the newest run with the same parameters is resumed
    assert find_resumable_run(tmp_run_dir, "02_x", changed, code_version=VERSION, method="ti").run.path == other.path
    assert find_resumable_run(tmp_run_dir, "02_x", PARAMS, code_version=VERSION, method="ti", resume="never").run is None
    found = find_resumable_run(tmp_run_dir, "02_x", PARAMS, code_version="0" * 16, method="ti")
    assert found.run is None and "another version of the method code" in found.reason
    with pytest.raises(ValueError, match="parameters differ: train.steps"):  # an explicit path is not replaced
        find_resumable_run(tmp_run_dir, "02_x", changed, code_version=VERSION, method="ti", resume=run.path)
    assert find_resumable_run(tmp_run_dir, "02_x", PARAMS, code_version=VERSION, method="ti",
                              resume=run.path).run.path == run.path

    run.finish()
    found = find_resumable_run(tmp_run_dir, "02_x", PARAMS, code_version=VERSION, method="ti")
    assert found.run is None and "finished" in found.reason and run.finished


def test_corrupt_config_gives_a_message_and_a_new_run_and_deletes_nothing(tmp_run_dir, capsys):
    old = new_run("02_x", PARAMS, out_dir=tmp_run_dir, method="ti", code_version=VERSION)
    (old.path / "config.json").write_text('{"notebook": "02_x", "par')  # torn by hand, not by new_run
    run = resume_or_new_run("02_x", PARAMS, out_dir=tmp_run_dir, method="ti", code=["textual_inversion"])
    assert run.path != old.path and run.config["code_version"] == VERSION
    assert "cannot be read" in capsys.readouterr().out
    assert (old.path / "config.json").read_text() == '{"notebook": "02_x", "par'


def test_code_version_follows_the_source_of_the_modules():
    assert code_version(["textual_inversion"]) == VERSION and len(VERSION) == 16
    assert code_version(["lora"]) != VERSION
    with pytest.raises(FileNotFoundError, match="no module nbutils/nope.py"):
        code_version(["nope"])


def test_series_points_of_a_repeated_step_replace_and_truncate_drops_the_lost_steps(tmp_run_dir):
    run = new_run("t", {}, out_dir=tmp_run_dir)
    for step in (0, 1, 2, 3):
        run.log_series("loss", step, loss=float(step))
    run.log_series("eval", 2, identity=0.5)
    assert run.truncate_series(1) == 3
    run.log_series("loss", 1, loss=10.0)
    assert run.metrics["series"] == {"loss": [{"step": 0, "loss": 0.0}, {"step": 1, "loss": 10.0}], "eval": []}


def test_drive_out_dir_is_a_no_op_unless_asked_and_refuses_off_colab():
    assert drive_out_dir("runs", False) == "runs"
    with pytest.raises(RuntimeError, match="works on Colab only"):
        drive_out_dir("runs", True)


@pytest.fixture(scope="module")
def renders():
    return [(render(p, 32), f"a photo of <sks> person, view {i}") for i, p in enumerate(portraits(0, 3, identity=TOY_SUBJECT))]


def ti_run(out_dir, cfg: TrainConfig):
    """The run a notebook would train ``cfg`` into (``RESUME="auto"``)."""
    params = {"train": {"steps": cfg.steps, "checkpoint_every": cfg.checkpoint_every}}
    return resume_or_new_run("02_x", params, out_dir=out_dir, method="textual_inversion", code=["textual_inversion"])


CFG = TrainConfig(steps=4, batch_size=2, lr=5e-3, resolution=32, checkpoint_every=2)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_checkpoint_gives_a_message_and_a_new_run(tmp_run_dir, renders, damage, capsys):
    cfg = TrainConfig(steps=2, batch_size=2, lr=5e-3, resolution=32, checkpoint_every=1)
    run = ti_run(tmp_run_dir, cfg)
    train(TextualInversion(build_tiny_pipeline(0), "<sks>"), renders, cfg, run)  # step-1, step-2, not finished
    weights = list_checkpoints(run)[-1] / "learned_embeds.safetensors"
    if damage == "missing":
        weights.rename(weights.with_suffix(".moved"))
    else:
        weights.write_bytes(weights.read_bytes()[:-7])
    problem = resume_problem(run)
    assert problem and ("is missing" if damage == "missing" else "is truncated") in problem
    capsys.readouterr()
    again = ti_run(tmp_run_dir, cfg)
    assert again.path != run.path and f"not resuming {run.path}" in capsys.readouterr().out
    assert len(list_checkpoints(run)) == 2  # nothing deleted: the damaged checkpoint is left as it was
    assert (weights.with_suffix(".moved") if damage == "missing" else weights).is_file()
    with pytest.raises(ValueError, match="Cannot resume"):  # train itself refuses it too
        train(TextualInversion(build_tiny_pipeline(0), "<sks>"), renders, cfg, run)


# ------------------------------------------------------------------------------------------ killed in a write
KILL_IN_RENAME = """\
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from nbutils import train as T
from nbutils.models import build_tiny_pipeline
from nbutils.runs import load_run
from nbutils.textual_inversion import TextualInversion
from nbutils.toyworld import TOY_SUBJECT, portraits, render

rename = os.rename
def rename_then_die(src, dst):  # every file of step-4 is written; the process dies before the folder's rename
    if os.path.basename(dst) == "step-4":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst)
T.os.rename = rename_then_die
data = [(render(p, 32), f"a photo of <sks> person, view {{i}}") for i, p in enumerate(portraits(0, 3, identity=TOY_SUBJECT))]
cfg = T.TrainConfig(steps=4, batch_size=2, lr=5e-3, resolution=32, checkpoint_every=2)
T.train(TextualInversion(build_tiny_pipeline(0), "<sks>"), data, cfg, load_run({run!r}))
"""


def test_a_process_killed_inside_a_checkpoint_write_resumes_from_the_previous_checkpoint(tmp_run_dir, renders):
    run = ti_run(tmp_run_dir, CFG)
    script = KILL_IN_RENAME.format(repo=str(REPO_ROOT), run=str(run.path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    [kept] = list_checkpoints(run)
    assert kept.name == "step-2" and checkpoint_problem(kept) is None
    [torn] = (run.path / "artifacts" / "checkpoints").glob(".step-4.*")  # the unrenamed write, complete but unused
    assert sorted(p.name for p in torn.iterdir()) == ["learned_embeds.safetensors", "optimizer.safetensors",
                                                      "state.json"]
    assert max(p["step"] for p in run.metrics["series"]["loss"]) == 4

    resumed = ti_run(tmp_run_dir, CFG)
    assert resumed.path == run.path
    result = train(TextualInversion(build_tiny_pipeline(0), "<sks>"), renders, CFG, resumed)
    assert result.start_step == 2 and not torn.exists()  # the unfinished write is cleaned up, step-4 written anew
    assert [p["step"] for p in load_run(run.path).metrics["series"]["loss"]] == [1, 2, 3, 4]

    whole = new_run("02_y", {}, out_dir=tmp_run_dir)
    train(TextualInversion(build_tiny_pipeline(0), "<sks>"), renders, CFG, whole)
    ours, theirs = (load_file(list_checkpoints(r)[-1] / "learned_embeds.safetensors") for r in (run, whole))
    assert torch.equal(ours["<sks>"], theirs["<sks>"])
    assert load_run(run.path).metrics["series"]["loss"] == whole.metrics["series"]["loss"]


# ------------------------------------------------------------------------------------------ notebooks, for real
def kernels() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "ipykernel_launcher" in " ".join(p.cmdline())]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def outputs(notebook: Path) -> str:
    cells = nbformat.read(notebook, as_version=4).cells
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``make study QUICK=1 MODEL=tiny ONLY=01,02`` (the runner it calls), stopped with Ctrl-C (SIGINT to its
    process group, as a terminal sends it) once notebook 02 saved its first checkpoint, then run again."""
    out = tmp_path_factory.mktemp("study")
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "run_study.py"), "--quick", "1", "--model", "tiny",
           "--only", "01,02", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN:
    # give the runner the terminal's default, as when a person presses Ctrl-C
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: list(out.glob("*/02_textual_inversion-*/artifacts/checkpoints/step-*")), 240,
                 "notebook 02's first checkpoint")
        held = [p for p in psutil.Process(first.pid).children(recursive=True)
                if "ipykernel_launcher" in " ".join(p.cmdline())]
        for kernel in held:  # hold the kernel mid-notebook, so that however busy the CPU the Ctrl-C lands in 02
            kernel.suspend()
        os.killpg(first.pid, signal.SIGINT)
        for kernel in held:
            kernel.resume()
        printed_first = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    [folder] = [p for p in out.iterdir() if p.is_dir()]
    [run] = list_runs(folder, notebook="02_textual_inversion")
    interrupted_at = max(p["step"] for p in run.metrics.get("series", {}).get("loss", [{"step": 0}]))
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return {"out": out, "folder": folder, "first": (first.returncode, printed_first), "interrupted_at": interrupted_at,
            "second": (second.returncode, second.stdout + second.stderr)}


def test_an_interrupted_study_skips_finished_notebooks_and_resumes_the_interrupted_one(study):
    code, printed = study["first"]
    # nbclient may log "Kernel died ..." between the runner's "02_textual_inversion ..." and its verdict
    assert code == 130 and "INTERRUPTED\n" in printed and "Stopped in 02_textual_inversion.ipynb" in printed, \
        printed[-3000:]
    code, printed = study["second"]
    assert code == 0, printed[-3000:]
    folder = study["folder"]
    assert f"Resuming the study in {folder}: 1 of 2 notebooks done" in printed
    assert "[1/2] 01_dataset ... done before, skipped" in printed
    assert "[2/2] 02_textual_inversion ... (again; the interrupted copy is 02_textual_inversion.interrupted-1.ipynb)" \
        in printed and "All 2 notebooks ran" in printed
    assert [p.name for p in study["out"].iterdir()] == [folder.name]  # no second study folder
    assert len(list_runs(folder, notebook="01_dataset")) == 1  # notebook 01 did not run again
    [run] = list_runs(folder, notebook="02_textual_inversion")  # the interrupted run continued, no new one
    assert run.finished and (folder / "02_textual_inversion.interrupted-1.ipynb").is_file()
    said = outputs(folder / "02_textual_inversion.ipynb")
    resumed_from = int(said.split("from its checkpoint of step ")[1].split()[0].rstrip(","))
    assert study["interrupted_at"] - run.config["params"]["train"]["checkpoint_every"] <= resumed_from
    assert run.metrics["resumed_from_step"] == resumed_from
    steps = [p["step"] for p in run.metrics["series"]["loss"]]
    assert steps == list(range(1, run.config["params"]["train"]["steps"] + 1))  # each step once


def test_a_killed_kernel_resumes_from_its_newest_checkpoint_with_the_same_weights_and_scores(study, tmp_path):
    """Notebook 02 (8 steps, a checkpoint every 2): one uninterrupted run; one whose kernel gets SIGKILL once the
    checkpoint of step 4 exists; the same notebook again, which must continue that run from its newest checkpoint,
    losing at most one interval, and end with the first run's weights, losses and scores."""
    [data] = list_runs(study["folder"], notebook="01_dataset")
    params = {"MODEL": "tiny", "QUICK": True, "STEPS": 8, "CHECKPOINT_EVERY": 2, "OUT_DIR": str(tmp_path),
              "DATASET": str(data.path / "artifacts" / "dataset")}
    notebook = REPO_ROOT / "notebooks" / "02_textual_inversion.ipynb"
    run_study.run_notebook(notebook, tmp_path / "whole.ipynb", {**params, "RESUME": "never"})
    [whole] = list_runs(tmp_path)
    assert whole.finished

    failed = []
    thread = threading.Thread(target=lambda: failed.append(_raises(run_study.run_notebook, notebook,
                                                                   tmp_path / "killed.ipynb", params)))
    thread.start()
    wait_for(lambda: [p for p in tmp_path.glob("02_textual_inversion-*/artifacts/checkpoints/step-4")
                      if p.parents[2] != whole.path], 240, "the second run's checkpoint of step 4")
    [kernel] = kernels()
    kernel.send_signal(signal.SIGKILL)
    thread.join(120)
    assert failed and type(failed[0]).__name__ == "DeadKernelError"
    killed = list_runs(tmp_path)[-1]
    assert killed.path != whole.path and not killed.finished
    lost_steps = max(p["step"] for p in killed.metrics["series"]["loss"])
    newest = int(list_checkpoints(killed)[-1].name.removeprefix("step-"))

    run_study.run_notebook(notebook, tmp_path / "resumed.ipynb", params)
    assert [r.path for r in list_runs(tmp_path)] == [whole.path, killed.path]  # continued, no third run
    said = outputs(tmp_path / "resumed.ipynb")
    assert f"resuming {killed.path}" in said and f"from its checkpoint of step {newest}" in said
    assert lost_steps - newest <= 2 and 4 <= newest < 8  # killed mid-training, at most one interval lost
    resumed = load_run(killed.path)
    assert resumed.finished and resumed.metrics["resumed_from_step"] == newest
    ours, theirs = (load_file(list_checkpoints(r)[-1] / "learned_embeds.safetensors") for r in (resumed, whole))
    assert list_checkpoints(resumed)[-1].name == "step-8" and torch.equal(ours["<sks>"], theirs["<sks>"])
    for series in ("loss", "eval"):  # the scores recorded before the kill kept, each step once, all equal
        assert resumed.metrics["series"][series] == whole.metrics["series"][series]
    assert resumed.metrics["final"] == whole.metrics["final"]


def _raises(fn, *args):
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - the test inspects it
        return err
    return None
