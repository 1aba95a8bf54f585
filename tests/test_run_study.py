"""The papermill study runner on two tiny notebooks: order, injected parameters, folder layout, failure report."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import nbformat
import pytest

from nbutils.runs import REPO_ROOT, list_runs

spec = importlib.util.spec_from_file_location("run_study", REPO_ROOT / "scripts" / "run_study.py")
run_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_study)

PARAMETERS = 'QUICK = False\nMODEL = "default-model"\nOUT_DIR = "runs"\nSEED = 0'
REPORT = """\
import json, os, sys
from pathlib import Path
from nbutils.runs import new_run
run = new_run("01_ok", {"QUICK": QUICK, "MODEL": MODEL, "SEED": SEED}, out_dir=OUT_DIR)
Path(OUT_DIR, "seen.json").write_text(json.dumps(
    {"QUICK": QUICK, "MODEL": MODEL, "OUT_DIR": OUT_DIR, "SEED": SEED, "python": sys.executable, "cwd": os.getcwd()}))
"""


def write_notebook(path, *sources, parameters=True):
    cells = [nbformat.v4.new_code_cell(src) for src in sources]
    if parameters:
        cells.insert(0, nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}))
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)


@pytest.fixture
def notebooks(tmp_path, monkeypatch):
    """``01_ok`` (records what it saw), ``02_fail`` (raises in its third cell), a scratch notebook to ignore,
    and a stale ``python3`` kernelspec pointing at a missing interpreter, which the runner must not use."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "01_ok.ipynb", REPORT)
    write_notebook(folder / "02_fail.ipynb", "x = 1", "raise ValueError('boom ' + str(x))")
    write_notebook(folder / "scratch.ipynb", "raise RuntimeError('not part of the study')")
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "stale", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return folder


def test_study_runs_in_order_injects_parameters_and_stops_at_the_failing_cell(notebooks, tmp_path, capsys):
    out = tmp_path / "runs"
    code = run_study.main(["--notebooks", str(notebooks), "--out", str(out), "--quick", "1", "--model", "tiny",
                           "--seed", "5"])
    printed = capsys.readouterr().out
    assert code == 1
    [study] = list(out.iterdir())
    assert study.name[:8].isdigit() and study.name[8] == "-"  # runs/<YYYYmmdd-HHMMSS>/
    assert "[1/2] 01_ok ... ok in" in printed
    failure = "[2/2] 02_fail ... FAILED in cell 3 (In [4]: raise ValueError('boom ' + str(x))): ValueError: boom 1"
    assert failure in printed
    assert "Notebook 02_fail.ipynb failed" in printed and str(study / "02_fail.ipynb") in printed

    seen = json.loads((study / "seen.json").read_text())
    assert seen == {"QUICK": True, "MODEL": "tiny", "OUT_DIR": str(study), "SEED": 5, "python": sys.executable,
                    "cwd": str(notebooks)}
    [run] = list_runs(study)
    assert run.path.parent == study and run.name.startswith("01_ok-")
    assert run.config["params"] == {"QUICK": True, "MODEL": "tiny", "SEED": 5}
    assert sorted(p.name for p in study.iterdir() if p.is_file()) == ["01_ok.ipynb", "02_fail.ipynb", "seen.json",
                                                                      "study.json"]
    assert list(json.loads((study / "study.json").read_text())["done"]) == ["01_ok.ipynb"]  # 02 failed: not done

    executed = nbformat.read(study / "01_ok.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'MODEL = "tiny"' in injected[0].source and "SEED = 5" in injected[0].source
    failed = nbformat.read(study / "02_fail.ipynb", as_version=4)
    [raised] = [c for c in failed.cells if c.cell_type == "code" and c.source.startswith("raise")]
    assert raised.outputs[0]["ename"] == "ValueError"


def test_only_selects_notebooks_and_model_and_seed_are_injected_only_when_given(notebooks, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(run_study, "run_notebook", lambda nb, output, params, **_: calls.append((nb.name, output, params)))
    out = tmp_path / "runs"
    assert run_study.main(["--notebooks", str(notebooks), "--out", str(out), "--only", "2"]) == 0
    [study] = list(out.iterdir())
    params = {"QUICK": False, "OUT_DIR": str(study)}
    assert calls == [("02_fail.ipynb", study / "02_fail.ipynb", params)]
    assert "[1/1] 02_fail ... ok in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no notebook numbered 09"):
        run_study.main(["--notebooks", str(notebooks), "--out", str(out), "--only", "01,09"])
    with pytest.raises(SystemExit, match="No notebooks named like"):
        run_study.main(["--notebooks", str(tmp_path), "--out", str(out)])
    assert len(list(out.iterdir())) == 1  # no study folder for a study that could not start


def test_a_rerun_reuses_the_unfinished_study_of_the_same_options_and_fresh_or_other_options_do_not(
        notebooks, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(run_study, "run_notebook", lambda nb, output, params, **_: calls.append((nb.name, params)))
    out = tmp_path / "runs"
    base = ["--notebooks", str(notebooks), "--out", str(out), "--quick", "1"]
    assert run_study.main(base) == 0
    [study] = list(out.iterdir())
    state = json.loads((study / "study.json").read_text())
    state["done"].pop("02_fail.ipynb")  # as if 02 had been interrupted
    (study / "study.json").write_text(json.dumps(state))
    (study / "02_fail.ipynb").write_text("partial")
    calls.clear()
    assert run_study.main(base) == 0
    printed = capsys.readouterr().out
    assert calls == [("02_fail.ipynb", {"QUICK": True, "OUT_DIR": str(study)})]
    assert "[1/2] 01_ok ... done before, skipped" in printed and "interrupted copy is 02_fail.interrupted-1.ipynb" \
        in printed
    assert (study / "02_fail.interrupted-1.ipynb").read_text() == "partial"  # kept, not overwritten
    assert run_study.main(base) == 0 and len(list(out.iterdir())) == 2  # that study finished: a new one
    assert "finished" in capsys.readouterr().out
    assert run_study.main([*base, "--fresh"]) == 0 and len(list(out.iterdir())) == 3
    state = json.loads((max(out.iterdir()) / "study.json").read_text())
    state["done"] = {}
    (max(out.iterdir()) / "study.json").write_text(json.dumps(state))
    assert run_study.main([*base[:-1], "0"]) == 0 and len(list(out.iterdir())) == 4  # other options: a new one
    assert "other options (quick)" in capsys.readouterr().out


def test_seeds_run_each_training_notebook_once_per_seed_and_hand_the_list_to_the_evaluation(
        tmp_path, capsys, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("01_data", "02_train", "05_train", "08_eval"):
        cell = nbformat.v4.new_code_cell("SEED = 0" + ("\nSEEDS = None" if name == "08_eval" else ""),
                                         metadata={"tags": ["parameters"]})
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), folder / f"{name}.ipynb")
    calls = []
    monkeypatch.setattr(run_study, "run_notebook", lambda nb, output, params, publish=True, **_: calls.append(
        (output.name, {k: v for k, v in params.items() if k in ("SEED", "SEEDS")}, publish)))
    out = tmp_path / "runs"
    assert run_study.main(["--notebooks", str(folder), "--out", str(out), "--seeds", "3,1"]) == 0
    # only the first seed's copies publish their figures (the README's); a later seed's would replace them
    assert calls == [("01_data.ipynb", {"SEED": 3}, True), ("02_train.ipynb", {"SEED": 3}, True),
                     ("02_train.seed1.ipynb", {"SEED": 1}, False), ("05_train.ipynb", {"SEED": 3}, True),
                     ("05_train.seed1.ipynb", {"SEED": 1}, False),
                     ("08_eval.ipynb", {"SEED": 3, "SEEDS": [3, 1]}, True)]
    assert "[3/6] 02_train (seed 1) ... ok in" in capsys.readouterr().out
    [study] = list(out.iterdir())
    assert len(json.loads((study / "study.json").read_text())["done"]) == 6
    with pytest.raises(SystemExit, match="not both"):
        run_study.main(["--notebooks", str(folder), "--out", str(out), "--seeds", "0,1", "--seed", "0"])
    made = subprocess.run(["make", "-n", "study", "SEEDS=0,1,2"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert "--seeds 0,1,2" in made.stdout, made.stdout + made.stderr


GPU_REPORT = """\
import json, os, time
from pathlib import Path
start = time.time()
time.sleep(1.5)
Path(OUT_DIR, NAME + ".json").write_text(json.dumps(
    {"start": start, "end": time.time(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def test_an_unpublished_notebooks_kernel_keeps_its_runs_figures_in_the_run_folder(tmp_path):
    from nbutils.runs import PUBLISH_ENV, new_run
    from nbutils.viz import publishes

    assert publishes(new_run("02_x", {"QUICK": False, "tier": "toy"}, out_dir=tmp_path / "runs"))
    check = (f"import os\nfrom nbutils.runs import new_run\nfrom nbutils.viz import publishes\n"
             f"run = new_run('02_x', {{'QUICK': False, 'tier': 'toy'}}, out_dir={str(tmp_path / 'runs')!r})\n"
             f"seen = os.environ.get({PUBLISH_ENV!r}, 'unset') + ' ' + str(publishes(run))\n"
             f"open({str(tmp_path / 'seen.txt')!r}, 'w').write(seen)")
    write_notebook(tmp_path / "02_x.ipynb", f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})", check,
                   parameters=False)
    for publish, seen in [(False, "0 False"), (True, "unset True")]:
        run_study.run_notebook(tmp_path / "02_x.ipynb", tmp_path / "out.ipynb", {}, publish=publish)
        assert (tmp_path / "seen.txt").read_text() == seen


def test_gpus_run_training_notebooks_concurrently_one_per_gpu_in_the_order_they_need(tmp_path, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("01_data", "02_train", "03_train", "04_train", "08_eval"):
        cell = nbformat.v4.new_code_cell(f'SEED = 0\nOUT_DIR = "runs"\nNAME = "{name}"',
                                         metadata={"tags": ["parameters"]})
        nbformat.write(nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(GPU_REPORT)]),
                       folder / f"{name}.ipynb")
    out = tmp_path / "runs"
    assert run_study.main(["--notebooks", str(folder), "--out", str(out), "--gpus", "0,1"]) == 0
    [study] = list(out.iterdir())
    seen = {p.stem: json.loads(p.read_text()) for p in study.glob("*.json") if p.name != "study.json"}
    training = ("02_train", "03_train", "04_train")
    assert all(seen["01_data"]["end"] <= seen[n]["start"] for n in training)  # the dataset first
    assert seen["02_train"]["end"] <= seen["03_train"]["start"]  # P+ (03) reads TI's (02) run: NEEDS
    assert seen["04_train"]["start"] < seen["02_train"]["end"] and seen["02_train"]["start"] < seen["04_train"]["end"]
    assert {seen["02_train"]["gpu"], seen["04_train"]["gpu"]} == {"0", "1"}  # one notebook per GPU at a time
    assert all(seen[n]["end"] <= seen["08_eval"]["start"] for n in training)  # the evaluation last
    assert len(json.loads((study / "study.json").read_text())["done"]) == 5
    assert "started on GPU" in capsys.readouterr().out
    made = subprocess.run(["make", "-n", "study", "GPUS=0,1"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert "--gpus 0,1" in made.stdout, made.stdout + made.stderr


def test_gpus_a_failing_notebook_stops_what_needs_it_and_the_study_reports_it(tmp_path, capsys):
    for name in ("01_data", "02_train", "03_train", "04_train", "08_eval"):
        write_notebook(tmp_path / f"{name}.ipynb", f'open(OUT_DIR + "/{name}.txt", "w").close()' +
                       ("\nraise ValueError('boom')" if name == "02_train" else ""))
    out = tmp_path / "runs"
    assert run_study.main(["--notebooks", str(tmp_path), "--out", str(out), "--gpus", "0,1"]) == 1
    [study] = list(out.iterdir())
    assert sorted(p.stem for p in study.glob("*.txt")) == ["01_data", "02_train", "04_train"]
    assert "02_train ... FAILED in cell 2" in capsys.readouterr().out
    assert sorted(json.loads((study / "study.json").read_text())["done"]) == ["01_data.ipynb", "04_train.ipynb"]


def test_job_needs_waits_for_the_same_seed_only(tmp_path):
    for name in ("01_data", "02_ti", "03_pplus", "08_eval"):
        write_notebook(tmp_path / f"{name}.ipynb", "x = 1")
    jobs = run_study.study_jobs(run_study.find_notebooks(tmp_path), [0, 1])
    needs = run_study.job_needs(jobs)
    assert needs["03_pplus.ipynb"] == {"01_data.ipynb", "02_ti.ipynb"}
    assert needs["03_pplus.seed1.ipynb"] == {"01_data.ipynb", "02_ti.seed1.ipynb"}
    assert needs["02_ti.seed1.ipynb"] == {"01_data.ipynb"}
    assert needs["08_eval.ipynb"] == {name for _, name, _ in jobs[:-1]}


def test_param_reaches_only_the_notebooks_that_take_it_and_is_part_of_the_study_options(notebooks, tmp_path,
                                                                                          monkeypatch):
    write_notebook(notebooks / "03_steps.ipynb", "pass")
    nb = nbformat.read(notebooks / "03_steps.ipynb", as_version=4)
    nb.cells[0].source += "\nSTEPS = None\nRANKS = [1, 4]"
    nbformat.write(nb, notebooks / "03_steps.ipynb")
    calls = []
    monkeypatch.setattr(run_study, "run_notebook", lambda nb, output, params, **_: calls.append((nb.name, params)))
    out = tmp_path / "runs"
    argv = ["--notebooks", str(notebooks), "--out", str(out), "--only", "01,03", "--param", "STEPS=2",
            "--param", "RANKS=[4]", "--param", "NAME=a b"]
    assert run_study.main(argv) == 0
    [study] = list(out.iterdir())
    base = {"QUICK": False, "OUT_DIR": str(study)}
    assert calls == [("01_ok.ipynb", base), ("03_steps.ipynb", base | {"STEPS": 2, "RANKS": [4]})]
    assert json.loads((study / "study.json").read_text())["options"]["params"] == {"STEPS": 2, "RANKS": [4],
                                                                                    "NAME": "a b"}
    assert run_study.main(argv[:-2] + ["--param", "STEPS=3"]) == 0  # other values: another study
    assert len(list(out.iterdir())) == 2
    for bad in ("STEPS", "2=STEPS"):
        with pytest.raises(SystemExit):
            run_study.parse_args(["--param", bad])


def test_make_test_sd15_runs_the_method_notebooks_on_the_random_sd15_at_128_px():
    made = subprocess.run(["make", "-n", "test-sd15"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert "PORTRAIT_STUDIO_RESOLUTION=128" in made.stdout and "--model sd15-random" in made.stdout, made.stdout
    assert "--only 01,02,03,04,05" in made.stdout and "--quick 1" in made.stdout


def test_make_study_passes_fresh_through():
    made = subprocess.run(["make", "-n", "study", "FRESH=1", "QUICK=1", "MODEL=tiny"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert "--fresh" in made.stdout and "--model tiny" in made.stdout, made.stdout + made.stderr
    made = subprocess.run(["make", "-n", "study"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert "run_study.py" in made.stdout and "--fresh" not in made.stdout


def test_two_notebooks_in_one_folder_run_at_once(tmp_path):
    """Each kernel gets its own IPC sockets: two started together in one folder both answer (they used to collide
    on ``kernel-ipc-*`` files in that folder, and the second timed out)."""
    from concurrent.futures import ThreadPoolExecutor

    for name in ("01_a", "02_b"):
        write_notebook(tmp_path / f"{name}.ipynb", 'from pathlib import Path\nPath(OUT_DIR, f"{SEED}.txt").write_text("ok")',
                       parameters=False)
    (tmp_path / "out").mkdir()
    jobs = [(tmp_path / "01_a.ipynb", {"OUT_DIR": str(tmp_path / "out"), "SEED": 1}),
            (tmp_path / "02_b.ipynb", {"OUT_DIR": str(tmp_path / "out"), "SEED": 2})]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: run_study.run_notebook(job[0], tmp_path / "out" / job[0].name, job[1]), jobs))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.txt")) == ["1.txt", "2.txt"]
    assert not list(tmp_path.glob("kernel-ipc*"))


def test_committed_notebooks_hold_their_own_parameters_only():
    """Each notebook in notebooks/ has one ``parameters`` cell and no papermill ``injected-parameters`` cell: a
    committed executed copy must not carry one run's QUICK and OUT_DIR into the next run (nbval, Colab, a reader)."""
    for path in run_study.find_notebooks(REPO_ROOT / "notebooks"):
        tags = [cell.metadata.get("tags", []) for cell in nbformat.read(path, as_version=4).cells]
        assert sum("parameters" in t for t in tags) == 1, path.name
        assert not any("injected-parameters" in t for t in tags), path.name
