"""Run the notebook series end to end with papermill: the command behind ``make study``.

Each ``notebooks/[0-9][0-9]_*.ipynb`` runs in order, in a kernel of this very interpreter, with the parameters
``QUICK``, ``OUT_DIR`` and (if given) ``MODEL`` and ``SEED`` injected. Everything lands in one study folder
``runs/<YYYYmmdd-HHMMSS>/``: the executed notebooks (``<name>.ipynb``) and, since ``OUT_DIR`` points there, the
run folders the notebooks create. The first failing notebook stops the study (exit code 1) with its name and cell.

A study picks up after an interruption (Ctrl-C, a killed process, a failure): ``study.json`` in the study folder
records its options and each notebook that ran to the end. Run again with the same options, the runner reuses the
newest study folder of those options that has notebooks left, skips the notebooks that finished there and runs the
others; the method notebooks (``RESUME="auto"``) then continue their interrupted training from its newest
checkpoint. The interrupted notebook's executed copy is kept as ``<name>.interrupted-<k>.ipynb``. ``--fresh``
starts a new study folder whatever the last one holds.

    python scripts/run_study.py --quick 1 --only 01,02 --seed 0

``--seeds 0,1,2`` (``make study SEEDS=0,1,2``) runs every training notebook (02-05) once per seed, the first
seed's executed copy as ``<name>.ipynb``, the others' as ``<name>.seed<s>.ipynb``; the other notebooks run once with
the first seed, and a notebook whose parameters define ``SEEDS`` (08, the evaluation) gets the list, to pool them.

``--gpus 0,1`` (``make study GPUS=0,1``) runs the training notebooks concurrently, one per GPU (each kernel sees only
its own through ``CUDA_VISIBLE_DEVICES``), in the order they need: the notebooks before them (the dataset) first, one
at a time; a training notebook once the notebooks it reads (``NEEDS``, same seed) have finished; the rest (style
transfer, evaluation, portrait) after every training notebook, one at a time. The results equal a sequential run's:
every notebook is seeded and reads only what its ``NEEDS`` wrote.

``--param STEPS=2`` (repeatable; ``make study PARAMS="STEPS=2 N_SAMPLES=1"``) injects a value (a Python literal,
else a string) into every notebook whose parameters cell assigns that name, e.g. to shorten a run on a slow machine.
The study ends with its time and the peak memory (RSS) of its largest notebook kernel.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat
import papermill
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from papermill.exceptions import PapermillExecutionError
from traitlets import default

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from nbutils.runs import PUBLISH_ENV, atomic_write_json, create_unique_dir, repo_path, timestamp  # noqa: E402

STATE_FILE = "study.json"
TRAINING = ("02", "03", "04", "05", "06")
"""The numbers of the notebooks that train a method: run once per seed of ``--seeds``."""
NEEDS = {"03": ("02",), "05": ("02", "04"), "06": ("02", "05")}
"""Training notebook -> the training notebooks whose runs (of the same seed) it reads: P+ compares with TI's run,
DreamBooth with TI's and LoRA's, the encoders with TI's and DreamBooth's."""


class CurrentInterpreterKernelManager(AsyncKernelManager):
    """Starts every kernel with ``sys.executable``, whatever kernelspecs (stale or missing) are installed.

    It talks to the kernel over local IPC sockets where the OS has them (no TCP port, no unencrypted-TCP warning).
    """

    @default("transport")
    def _default_transport(self) -> str:
        return "tcp" if os.name == "nt" else "ipc"

    def _ip_default(self) -> str:
        # An IPC "address" is a path prefix for socket files. jupyter_client's default, "kernel-ipc" in the working
        # folder, gave two kernels started at once in one folder the same sockets (the second never answered).
        if self.transport == "ipc":
            return os.path.join(tempfile.gettempdir(), f"portrait-studio-{uuid.uuid4().hex[:12]}-ipc")
        return super()._ip_default()

    visible_devices: str | None = None
    """``CUDA_VISIBLE_DEVICES`` for the kernel (``None``: inherited)."""
    publish: bool = True
    """``False``: the kernel's runs keep their figures in their run folders (``nbutils.viz.PUBLISH_ENV``)."""

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="portrait-studio",
            language="python",
            env={**({} if self.visible_devices is None else {"CUDA_VISIBLE_DEVICES": self.visible_devices}),
                 **({} if self.publish else {PUBLISH_ENV: "0"})},
        )


def kernel_manager_for(gpu: str | None, publish: bool = True) -> type[CurrentInterpreterKernelManager]:
    """The kernel manager class whose kernels see only GPU ``gpu`` (``None``: every device, as the environment)
    and, with ``publish`` false, keep every run's figures in its run folder."""
    if gpu is None and publish:
        return CurrentInterpreterKernelManager
    return type(f"KernelManagerGPU{gpu}{'' if publish else 'Unpublished'}", (CurrentInterpreterKernelManager,),
                {"visible_devices": gpu, "publish": publish})


def find_notebooks(folder: Path, only: str | None = None) -> list[Path]:
    """``folder/[0-9][0-9]_*.ipynb`` in name order; ``only`` (``"01,03"``) keeps those numbers."""
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {n.strip().zfill(2) for n in only.split(",") if n.strip()}
        unknown = wanted - {nb.name[:2] for nb in notebooks}
        if unknown:
            raise SystemExit(f"--only {only}: no notebook numbered {', '.join(sorted(unknown))} in {folder}.")
        notebooks = [nb for nb in notebooks if nb.name[:2] in wanted]
    if not notebooks:
        raise SystemExit(f"No notebooks named like 01_name.ipynb in {folder}.")
    return notebooks


def describe_failure(notebook: Path, err: PapermillExecutionError) -> str:
    """``'cell 3 (In [4]: first line of the cell)'``: the failing cell's 1-based position in the source notebook
    (papermill's ``cell_index`` counts its injected parameters cell too), its execution count and first line."""
    cells = nbformat.read(notebook, as_version=4).cells
    number = next((i + 1 for i, cell in enumerate(cells) if cell.source == err.source), err.cell_index)
    first_line = next((line.strip() for line in err.source.splitlines() if line.strip()), "")
    return f"cell {number} (In [{err.exec_count}]: {first_line})"


def run_notebook(notebook: Path, output: Path, parameters: dict, *, stdout_file=None, gpu: str | None = None,
                 publish: bool = True) -> None:
    """Execute ``notebook`` into ``output`` with ``parameters``, in the notebook's folder, with this Python.
    ``stdout_file``: a writable object that receives the cells' printed output as it comes (``None``: none);
    ``gpu``: the only CUDA device the kernel sees (``None``: those of the environment); ``publish`` false: its
    runs keep their figures in their run folders (a later seed's copy, ``PUBLISH_ENV``)."""
    papermill.execute_notebook(
        notebook,
        output,
        parameters=parameters,
        kernel_name="python3",  # recorded in the output; the kernel itself always runs sys.executable
        language="python",
        progress_bar=False,
        cwd=notebook.parent,
        kernel_manager_class=kernel_manager_for(gpu, publish),
        stdout_file=stdout_file,
    )


def prepare_once(store: Path, parameters: dict) -> Path:
    """Run notebook 01 (the prepared dataset) into ``store`` with ``parameters`` (``OUT_DIR`` is ``store``), unless
    ``store`` already holds a ``01_dataset`` run; returns ``store``. The scripts that train on other subjects or
    other preparations (``sweep.py``, ``ablate_augmentations.py``) prepare them with the notebook itself."""
    from nbutils.runs import list_runs

    if not list_runs(store, notebook="01_dataset"):
        store.mkdir(parents=True, exist_ok=True)
        run_notebook(REPO_ROOT / "notebooks" / "01_dataset.ipynb", store / "01_dataset.ipynb",
                     {**parameters, "OUT_DIR": str(store)})
    return store


def study_options(args: argparse.Namespace, notebooks: list[Path]) -> dict:
    """What makes two studies the same study: the notebooks (their names and folder) and the injected options."""
    options = {"notebooks": [name for _, name, _ in study_jobs(notebooks, args.seeds)],
               "folder": str(notebooks[0].parent), "quick": args.quick, "model": args.model, "seed": args.seed,
               "seeds": args.seeds}
    return options | ({"params": args.param} if args.param else {})


def parse_param(text: str) -> tuple[str, object]:
    """``"NAME=VALUE"`` -> ``(NAME, value)``: VALUE as a Python literal (``2``, ``None``, ``[1, 4]``), else the
    string itself. ``argparse.ArgumentTypeError`` without a ``=`` or with a NAME that is not an identifier."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE (e.g. STEPS=2)")
    try:
        return name, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return name, value.strip()


def injected_params(jobs: list[tuple[Path, str, dict]], params: dict) -> list[tuple[Path, str, dict]]:
    """``jobs`` with each of ``params`` added to the notebooks whose parameters cell assigns it."""
    return [(nb, name, {**extra, **{k: v for k, v in params.items() if takes_parameter(nb, k)}})
            for nb, name, extra in jobs]


def takes_parameter(notebook: Path, name: str) -> bool:
    """Whether ``notebook``'s cell tagged ``parameters`` assigns ``name``."""
    cells = nbformat.read(notebook, as_version=4).cells
    return any("parameters" in c.metadata.get("tags", []) and
               any(line.startswith(f"{name} =") for line in c.source.splitlines()) for c in cells)


def study_jobs(notebooks: list[Path], seeds: list[int] | None) -> list[tuple[Path, str, dict]]:
    """``(notebook, executed copy's name, parameters to add)`` in run order. Without ``seeds``: every notebook once,
    nothing added. With ``seeds``: each training notebook (``TRAINING``) once per seed with ``SEED``, the others once
    with the first seed, and ``SEEDS`` for those that take it."""
    if not seeds:
        return [(nb, nb.name, {}) for nb in notebooks]
    jobs = []
    for nb in notebooks:
        if nb.name[:2] in TRAINING:
            jobs += [(nb, nb.name if k == 0 else f"{nb.stem}.seed{s}.ipynb", {"SEED": s}) for k, s in enumerate(seeds)]
        else:
            jobs.append((nb, nb.name, {"SEED": seeds[0], **({"SEEDS": seeds} if takes_parameter(nb, "SEEDS") else {})}))
    return jobs


def read_state(study: Path) -> dict | None:
    """``study/study.json`` (``{"options", "done": {notebook: seconds}}``), or ``None`` if missing or unreadable."""
    try:
        state = json.loads((study / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("done"), dict) else None


def find_unfinished_study(parent: Path, options: dict) -> tuple[Path | None, str]:
    """The newest study folder under ``parent`` (by name, ``YYYYmmdd-HHMMSS[-k]``) if it was started with
    ``options`` and has notebooks left to run; else ``None``. Returns it with a sentence saying why."""
    studies = sorted((p for p in parent.iterdir() if p.is_dir() and p.name[:8].isdigit()),
                     key=lambda p: (p.name[:15], int(p.name[16:] or 0) if p.name[16:].isdigit() else 0))
    if not studies:
        return None, "no earlier study"
    newest = studies[-1]
    state = read_state(newest)
    if state is None:
        return None, f"the newest study {newest} has no readable {STATE_FILE}: it is left as it is"
    if state.get("options") != options:
        theirs = state.get("options") or {}
        differ = [k for k in options if theirs.get(k) != options[k]]
        return None, f"the newest study {newest} ran with other options ({', '.join(differ)})"
    if all(name in state["done"] for name in options["notebooks"]):
        return None, f"the newest study {newest} finished"
    return newest, f"resuming the study in {newest}: {len(state['done'])} of {len(options['notebooks'])} notebooks done"


def keep_interrupted_copy(output: Path) -> Path | None:
    """Rename an interrupted run's executed notebook ``<name>.ipynb`` to ``<name>.interrupted-<k>.ipynb``."""
    if not output.exists():
        return None
    for k in range(1, 10_000):
        kept = output.with_name(f"{output.stem}.interrupted-{k}.ipynb")
        if not kept.exists():
            output.rename(kept)
            return kept
    raise FileExistsError(f"{output.parent} holds 10,000 interrupted copies of {output.name}: clean it up.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the portrait-studio notebooks in order into runs/<timestamp>/.")
    p.add_argument("--quick", type=int, choices=(0, 1), default=0, help="1: fewer steps and samples (a short run)")
    p.add_argument("--model", default=None,
                   help="injected as MODEL: auto, sd15, toy, tiny, a local folder or a hub id (notebooks keep their "
                        "own if absent: 'auto' for the method notebooks, 'toy' for 00_toy_world)")
    p.add_argument("--seed", type=int, default=None, help="injected as SEED (notebooks keep their own if absent)")
    p.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",") if s.strip()], default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: the training notebooks run once per seed and the "
                        "evaluation pools them (instead of --seed)")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,02")
    p.add_argument("--out", default="runs", help="parent folder of the study folder (relative: from the repo root)")
    p.add_argument("--notebooks", default="notebooks", help="folder holding the numbered notebooks")
    p.add_argument("--gpus", type=lambda v: [g.strip() for g in v.split(",") if g.strip()], default=None,
                   help="comma-separated CUDA device numbers, e.g. 0,1: the training notebooks run concurrently, one "
                        "per GPU, in the order they need (see NEEDS)")
    p.add_argument("--param", type=parse_param, action="append", default=None, metavar="NAME=VALUE",
                   help="inject VALUE (a Python literal, else a string) as NAME into every notebook whose parameters "
                        "assign NAME; repeatable, e.g. --param STEPS=2 --param N_SAMPLES=1")
    p.add_argument("--fresh", action="store_true",
                   help="start a new study folder even if the newest one, with the same options, was interrupted")
    args = p.parse_args(argv)
    args.param = dict(args.param) if args.param else None
    return args


def run_job(notebook: Path, output: Path, parameters: dict, gpu: str | None = None) -> str | None:
    """Execute one job of the study; ``None`` if it ran to the end, else the lines that say where it failed. Only
    the executed copy named as the notebook publishes figures (not ``<name>.seed<s>.ipynb``, see ``study_jobs``)."""
    try:
        run_notebook(notebook, output, parameters, gpu=gpu, publish=output.name == notebook.name)
    except PapermillExecutionError as err:
        return (f"FAILED in {describe_failure(notebook, err)}: {err.ename}: {err.evalue}\n"
                f"Notebook {notebook.name} failed; the executed notebook with the traceback is {output}")
    except (DeadKernelError, CellTimeoutError) as err:
        return f"FAILED: {type(err).__name__}: {err}\nNotebook {notebook.name} failed; what ran is in {output}"
    return None


def job_label(notebook: Path, extra: dict, seeds: bool) -> str:
    """``'02_textual_inversion (seed 1)'`` in a study of several seeds, the notebook's name otherwise."""
    return notebook.stem + (f" (seed {extra['SEED']})" if seeds else "")


def job_needs(jobs: list[tuple[Path, str, dict]]) -> dict[str, set[str]]:
    """Executed copy's name -> the names of the jobs it must wait for under ``--gpus``: a training notebook waits
    for the notebooks before the training ones and for its ``NEEDS`` of the same seed; any later notebook for every
    job before it."""
    needs: dict[str, set[str]] = {}
    for k, (notebook, name, extra) in enumerate(jobs):
        number = notebook.name[:2]
        earlier = jobs[:k]
        if number in TRAINING:
            needs[name] = {n for nb, n, e in earlier if nb.name[:2] not in TRAINING or
                           (nb.name[:2] in NEEDS.get(number, ()) and e.get("SEED") == extra.get("SEED"))}
        else:
            needs[name] = {n for _, n, _ in earlier}
    return needs


def run_jobs(jobs: list[tuple[Path, str, dict]], state: dict, study: Path, parameters: dict, gpus: list[str],
             seeds: bool) -> int:
    """Run the jobs not yet done, at most one per GPU of ``gpus`` at a time, each once its ``job_needs`` are done;
    record each finished one in ``study.json``. Returns the exit code (0, 1: a notebook failed, 130: interrupted)."""
    needs = job_needs(jobs)
    total, free, failed = len(jobs), list(gpus), False
    waiting = [(i, job) for i, job in enumerate(jobs, 1) if job[1] not in state["done"]]
    for i, (notebook, name, extra) in enumerate(jobs, 1):
        if name in state["done"]:
            print(f"[{i}/{total}] {job_label(notebook, extra, seeds)} ... done before, skipped", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        running: dict[concurrent.futures.Future, tuple[int, tuple, str, float]] = {}
        try:
            while waiting or running:
                ready = [(i, job) for i, job in waiting if needs[job[1]] <= set(state["done"])]
                while ready and free and not failed:
                    (i, (notebook, name, extra)), gpu = ready.pop(0), free.pop(0)
                    waiting.remove((i, (notebook, name, extra)))
                    output = study / name
                    kept = keep_interrupted_copy(output)
                    what = job_label(notebook, extra, seeds)
                    print(f"[{i}/{total}] {what} ... started on GPU {gpu}" +
                          (f" (again; the interrupted copy is {kept.name})" if kept else ""), flush=True)
                    future = pool.submit(run_job, notebook, output, {**parameters, **extra}, gpu)
                    running[future] = (i, (notebook, name, extra), gpu, time.perf_counter())
                if not running:
                    break  # a failure stopped new starts, or what is left waits on a failed job
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    i, (notebook, name, extra), gpu, started = running.pop(future)
                    free.append(gpu)
                    what = job_label(notebook, extra, seeds)
                    failure = future.result()
                    if failure:
                        failed = True
                        print(f"[{i}/{total}] {what} ... {failure}", flush=True)
                        continue
                    seconds = time.perf_counter() - started
                    state["done"][name] = round(seconds, 1)
                    atomic_write_json(study / STATE_FILE, state)
                    print(f"[{i}/{total}] {what} ... ok in {seconds:.1f} s (GPU {gpu})", flush=True)
        except KeyboardInterrupt:
            print("INTERRUPTED")
            print(f"Stopped; run the same command again to resume the study in {study} (FRESH=1 / --fresh starts a "
                  "new one)")
            return 130
    if failed or waiting:
        return 1
    print(f"All {total} notebooks ran; results in {study}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed is not None and args.seeds:
        raise SystemExit("Give --seed or --seeds, not both.")
    notebooks = find_notebooks(repo_path(args.notebooks), args.only)
    options = study_options(args, notebooks)
    parent = repo_path(args.out)
    parent.mkdir(parents=True, exist_ok=True)
    study, why = (None, "--fresh") if args.fresh else find_unfinished_study(parent, options)
    state = read_state(study) if study else None
    if study is None:
        study = create_unique_dir(parent, timestamp())
        state = {"options": options, "done": {}}
        atomic_write_json(study / STATE_FILE, state)
        print(f"New study ({why}); run it again with the same options to resume it, FRESH=1 (--fresh) for a new one")
    else:
        print(why.capitalize())
    parameters = {"QUICK": bool(args.quick), "OUT_DIR": str(study)}
    if args.model is not None:
        parameters["MODEL"] = args.model
    if args.seed is not None:
        parameters["SEED"] = args.seed
    print(f"Study folder: {study}", flush=True)
    jobs = injected_params(study_jobs(notebooks, args.seeds), args.param or {})
    if args.gpus:
        return run_jobs(jobs, state, study, parameters, args.gpus, bool(args.seeds))
    for i, (notebook, name, extra) in enumerate(jobs, 1):
        output = study / name
        what = job_label(notebook, extra, bool(args.seeds))
        if name in state["done"]:
            print(f"[{i}/{len(jobs)}] {what} ... done before, skipped", flush=True)
            continue
        kept = keep_interrupted_copy(output)
        print(f"[{i}/{len(jobs)}] {what} ...", end=" ", flush=True)
        if kept:
            print(f"(again; the interrupted copy is {kept.name})", end=" ", flush=True)
        start = time.perf_counter()
        try:
            failure = run_job(notebook, output, {**parameters, **extra})
        except KeyboardInterrupt:
            print("INTERRUPTED")
            print(f"Stopped in {notebook.name}; run the same command again to resume the study in {study} "
                  "(FRESH=1 / --fresh starts a new one)")
            return 130
        if failure:
            print(failure)
            return 1
        seconds = time.perf_counter() - start
        state["done"][name] = round(seconds, 1)
        atomic_write_json(study / STATE_FILE, state)
        print(f"ok in {seconds:.1f} s", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    print(f"All {len(jobs)} notebooks ran in {sum(state['done'].values()):.0f} s (peak RSS of a notebook kernel: "
          f"{peak_gb:.1f} GiB); results in {study}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
