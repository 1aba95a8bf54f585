"""The results store: every notebook run writes into its own run folder, and later notebooks read only this store.

Layout of one run folder (``<out_dir>/<notebook>-<YYYYmmdd-HHMMSS>[-k]/``)::

    config.json    {"notebook", "method", "params", "created" (ISO time), "environment"}
    metrics.json   scalar results merged by ``Run.log_metrics``; curves under "series" (``Run.log_series``)
    images/        PNGs with their prompt, seed, method, model and the run's config in PNG text chunks
    artifacts/     anything else (checkpoints, embeddings, prepared datasets)

``make study`` runs the notebooks with ``OUT_DIR=runs/<YYYYmmdd-HHMMSS>/``, so one study's runs sit together;
a notebook run by hand uses ``runs/``. Every file is written atomically (temporary file + ``os.replace``), so a
crash never leaves half a file (``atomic_write``; a whole folder: ``write_folder``), and a run folder is created
exclusively. A folder is reused only to resume its own interrupted run (``find_resumable_run``: same notebook,
method, parameters and code version, not finished); a finished run (``Run.finish``) is never written again.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, PngImagePlugin

REPO_ROOT: Path = Path(__file__).resolve().parent.parent

# PNG text chunks stored as plain text; every other chunk ``save_image`` writes holds JSON.
PLAIN_TEXT_KEYS = ("prompt", "method", "model")
RESERVED_IMAGE_KEYS = (*PLAIN_TEXT_KEYS, "seed", "config")
_PACKAGES = ("torch", "diffusers", "transformers", "peft", "torchmetrics")


def repo_path(p: str | Path) -> Path:
    """``p`` as an absolute path: relative paths resolve against ``REPO_ROOT``, absolute ones (and ``~``) stay."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` all at once: a temporary file in the same folder, fsync, then ``os.replace``.

    Readers see either the old file or the new one, never a partial write, even if the process dies. Parent folders
    are created. ``fsync=False`` skips flushing to the disk (a few ms): the file may then be lost, though never torn,
    if the machine itself crashes; for files rewritten very often, such as per-step loss curves.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # usual permissions (umask), unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """``obj`` with ``Path`` turned into ``str``, tuples into lists and 0-d numpy/torch scalars into numbers.

    Raises ``TypeError`` naming ``where`` (e.g. the parameter's key) for anything else that JSON cannot hold.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {_json_key(k, where): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
        return obj.item()
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which cannot be stored as JSON: "
        "pass a str, int, float, bool, None, list or dict (convert it first, e.g. str(x) or x.tolist())."
    )


def _json_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{where} has the key {key!r} ({type(key).__name__}); JSON keys must be str.")
    return key


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically (see ``to_jsonable`` for accepted types)."""
    text = json.dumps(to_jsonable(obj, Path(path).name), indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, text.encode("utf-8"))


def write_folder(folder: str | Path, write: Callable[[Path], None], size_bytes: int, *, replace: bool = False) -> Path:
    """Create ``folder`` by calling ``write(tmp)`` on a temporary sibling folder that is renamed to ``folder`` once
    ``write`` returns, so ``folder`` is either complete or absent. Returns ``folder``.

    On an ``OSError`` (a full disk) the temporary folder is removed and the error re-raised, same ``errno``, with
    the space needed (``size_bytes``, an estimate). ``FileExistsError`` if ``folder`` exists, unless ``replace``:
    then the old folder is swapped out only once the new one is complete, and removed (a resumed or re-run
    notebook rewrites its own run's artifact this way).
    """
    folder = Path(folder)
    if folder.exists() and not replace:
        raise FileExistsError(f"{folder} already exists: save into a new folder (e.g. a new run's artifacts).")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    old = folder.parent / f".{folder.name}.replaced"
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a saved model is an ordinary readable folder
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if old.exists():
                os.rename(old, folder)  # the old folder stays whole when the swap fails
            raise
    except OSError as err:
        cause = "the disk is full" if err.errno == errno.ENOSPC else f"{type(err).__name__}: {err}"
        raise OSError(err.errno, f"Saving to {folder} failed ({cause}); nothing was left there. It needs about "
                                 f"{size_bytes / 1e9:.2f} GB: free space or pick another folder.") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_info() -> dict:
    """What produced a result: Python, platform, library versions, device and git commit.

    Returns ``{"python", "platform", "packages": {name: version or None}, "device", "git_commit",
    "git_dirty"}``; ``git_commit`` (40 hex digits) and ``git_dirty`` (uncommitted changes, untracked files
    included) are ``None`` outside a git checkout or before the first commit.
    """
    import torch  # imported here: the package import stays light

    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    commit = _git("rev-parse", "--verify", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "device": device,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


def create_unique_dir(parent: Path, base: str) -> Path:
    """Create and return ``parent/base``, or ``parent/base-1``, ``-2``, ... when taken; never reuses a folder.

    ``mkdir(exist_ok=False)`` makes the choice race-free between processes.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(10_000):
        path = parent / (base if k == 0 else f"{base}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent} already holds 10,000 folders named {base}-*: clean it up or pick another out_dir.")


def timestamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS``: the suffix of run and study folder names."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_name(name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{what} {name!r} must be a plain file name (no '/', not empty), e.g. 'sample-0'.")


@dataclass
class Run:
    """One run folder (``path``) and its ``config.json`` content (``config``).

    One process writes a run: the ``Run`` that logs keeps ``metrics.json``'s content in memory, so logging a point
    every training step costs one compact JSON write, not a re-read.
    """

    path: Path
    config: dict
    _logged: dict | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        """Folder name, e.g. ``'02_textual_inversion-20250101-120000'``."""
        return self.path.name

    @property
    def notebook(self) -> str:
        return self.config["notebook"]

    @property
    def method(self) -> str:
        """The method this run trained or evaluated ('' when the notebook has none)."""
        return self.config.get("method") or ""

    @property
    def model(self) -> str:
        """The model reference from the run's params (key ``MODEL`` or ``model``; '' if absent)."""
        params = self.config.get("params", {})
        return str(params.get("MODEL", params.get("model", "")))

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.config["created"])

    @property
    def code_version(self) -> str | None:
        """The ``code_version`` of the code that trained this run (``None`` for runs from before it was recorded)."""
        return self.config.get("code_version")

    @property
    def finished(self) -> bool:
        """Whether the notebook that wrote this run reached its end (``finish``): such a run is never resumed."""
        return "finished" in self.metrics

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def metrics(self) -> dict:
        """Content of ``metrics.json``; ``{}`` before anything was logged."""
        if not self.metrics_path.exists():
            return {}
        return json.loads(self.metrics_path.read_text(encoding="utf-8"))

    def save_image(self, image: Image.Image, name: str, *, prompt: str = "", seed: int | None = None, **meta) -> Path:
        """Save ``image`` as ``images/<name>.png`` (atomic) with its provenance in PNG text chunks.

        Chunks: ``prompt``, ``method``, ``model`` (plain text), ``seed``, ``config`` (the run's config) and each
        ``meta`` item (JSON). ``read_png_metadata`` returns them. An image of the same name is replaced.
        """
        _check_name(name, "Image name")
        clash = set(meta) & set(RESERVED_IMAGE_KEYS)
        if clash:
            raise ValueError(f"save_image meta keys {sorted(clash)} are reserved; rename them.")
        info = PngImagePlugin.PngInfo()
        for key, text in (("prompt", prompt), ("method", self.method), ("model", self.model)):
            info.add_itxt(key, text)
        info.add_itxt("seed", json.dumps(to_jsonable(seed, "seed")))
        info.add_itxt("config", json.dumps(self.config, ensure_ascii=False))
        for key, value in meta.items():
            info.add_itxt(key, json.dumps(to_jsonable(value, f"meta {key!r}"), ensure_ascii=False))
        buf = io.BytesIO()
        image.save(buf, format="PNG", pnginfo=info)
        path = self.path / "images" / f"{name.removesuffix('.png')}.png"
        atomic_write(path, buf.getvalue())
        return path

    def _write_metrics(self, change: dict | None = None, series: tuple[str, dict] | None = None) -> dict:
        if self._logged is None:
            self._logged = self.metrics
        if change:
            self._logged.update(change)
        if series:
            points = self._logged.setdefault("series", {}).setdefault(series[0], [])
            step = series[1]["step"]
            same = None  # steps usually grow: only a step at or below the last one can repeat a point
            if points and points[-1]["step"] >= step:
                same = next((i for i, p in enumerate(points) if p["step"] == step), None)
            if same is None:
                points.append(series[1])
            else:
                points[same] = series[1]
        data = json.dumps(self._logged, ensure_ascii=False).encode("utf-8")
        atomic_write(self.metrics_path, data, fsync=series is None)  # curve points come every step: no fsync
        return self._logged

    def log_metrics(self, **values) -> dict:
        """Merge ``values`` into ``metrics.json`` (atomic; later values win) and return the whole dict."""
        if "series" in values:
            raise ValueError("'series' is kept by log_series; log curves with run.log_series(name, step, ...).")
        return copy.deepcopy(self._write_metrics(change=to_jsonable(values, "metric")))

    def log_series(self, name: str, step: int, **values) -> None:
        """Append ``{"step": step, **values}`` to ``metrics.json["series"][name]`` (a loss or checkpoint curve).

        A point logged again at a step the series already holds replaces it, so a resumed run that repeats a step
        keeps one point per step."""
        self._write_metrics(series=(name, to_jsonable({"step": int(step), **values}, f"series {name!r}")))

    def truncate_series(self, last_step: int) -> int:
        """Drop every series point after ``last_step`` (what an interrupted run logged after its newest checkpoint,
        which resuming trains again). Returns how many points were dropped."""
        if self._logged is None:
            self._logged = self.metrics
        dropped = 0
        for name, points in self._logged.get("series", {}).items():
            kept = [p for p in points if p["step"] <= last_step]
            dropped += len(points) - len(kept)
            self._logged["series"][name] = kept
        if dropped:
            self._write_metrics()
        return dropped

    def finish(self) -> None:
        """Mark the run finished (``metrics.json["finished"]``: the local ISO time): its notebook reached the end.
        ``find_resumable_run`` never resumes a finished run; call it in the notebook's last cell."""
        self.log_metrics(finished=datetime.now().astimezone().isoformat())

    def artifact_path(self, *parts: str) -> Path:
        """``path/artifacts/<parts...>``, its parent folders created; parts must stay inside the run folder."""
        if not parts:
            raise ValueError("artifact_path needs at least one name, e.g. run.artifact_path('embeddings.safetensors').")
        for part in parts:
            if Path(part).is_absolute() or ".." in Path(part).parts:
                raise ValueError(f"Artifact path part {part!r} must be relative and must not contain '..'.")
        path = self.path.joinpath("artifacts", *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def figure_path(self, name: str, *, publish: bool) -> Path:
        """Where a notebook saves figure ``name``: the repo's ``figures/`` for a full run (``publish=True``; the
        README shows these), else the run's own ``figures/``, so quick and test runs never overwrite them."""
        if Path(name).name != name:
            raise ValueError(f"Figure name {name!r} must be a plain file name such as 'loss.png'.")
        return (REPO_ROOT if publish else self.path) / "figures" / name


QUICK_ENV = "PORTRAIT_STUDIO_QUICK"
PUBLISH_ENV = "PORTRAIT_STUDIO_PUBLISH"
"""Set to ``"0"``, no run publishes (``nbutils.viz.publishes``): ``scripts/run_study.py`` sets it for a training
notebook's second and later seeds, whose figures would otherwise replace the first seed's (the README's)."""


def resolve_quick(quick: bool | None) -> bool:
    """A notebook's ``QUICK`` parameter: ``None`` reads ``$PORTRAIT_STUDIO_QUICK`` ("1": quick; the test run sets
    it), ``True``/``False`` (from papermill or the user) wins."""
    return os.environ.get(QUICK_ENV, "0") == "1" if quick is None else bool(quick)


def new_run(notebook: str, params: dict, *, out_dir: str | Path = "runs", method: str | None = None,
            code_version: str | None = None) -> Run:
    """Create ``out_dir/<notebook>-<YYYYmmdd-HHMMSS>[-k]/`` with its ``config.json`` and return the ``Run``.

    ``params`` are the notebook's parameters; they must be JSON-serialisable (``Path`` becomes ``str``, anything
    else raises a ``TypeError`` naming the key). A relative ``out_dir`` resolves against the repo root.
    ``code_version``: the ``code_version(...)`` of the code that trains the run, stored so that a later resume can
    refuse a run trained by other code.
    """
    _check_name(notebook, "Notebook name")
    config = {
        "notebook": notebook,
        "method": method,
        "params": to_jsonable(dict(params), "params"),
        "created": datetime.now().astimezone().isoformat(),
        "environment": environment_info(),
    }
    if code_version is not None:
        config["code_version"] = code_version
    path = create_unique_dir(repo_path(out_dir), f"{notebook}-{timestamp()}")
    atomic_write_json(path / "config.json", config)
    return Run(path, config)


def load_run(path: str | Path) -> Run:
    """The run stored in folder ``path``. ``FileNotFoundError`` if it has no ``config.json``, ``ValueError`` if
    that file is not a run config."""
    path = repo_path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a run folder: it has no config.json (run folders come from new_run).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is corrupt ({err}); delete that run folder or restore the file.") from None
    missing = [k for k in ("notebook", "params", "created") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{config_path} is not a run config: it lacks {missing}; delete that run folder.")
    try:
        created = datetime.fromisoformat(config["created"])
    except (TypeError, ValueError):
        created = None
    if created is None or created.tzinfo is None:
        raise ValueError(f"{config_path} has an invalid 'created' time {config['created']!r} (ISO, with time zone).")
    return Run(path, config)


def list_runs(out_dir: str | Path = "runs", notebook: str | None = None, method: str | None = None) -> list[Run]:
    """Runs under ``out_dir``, oldest first, optionally only one notebook's and/or one method's.

    ``out_dir`` may hold run folders directly (``runs/``, hand-run notebooks) or study folders that hold them
    (``runs/<YYYYmmdd-HHMMSS>/``, from ``make study``); both are searched. Folders that are neither, or whose
    config is missing or corrupt, are skipped with a warning naming them.
    """
    root = repo_path(out_dir)
    if not root.is_dir():
        return []
    runs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        candidates = [folder]
        if not (folder / "config.json").exists():
            subfolders = sorted(c for c in folder.iterdir() if c.is_dir())
            if subfolders or any(folder.glob("*.ipynb")) or (folder / "study.json").exists():  # a study folder
                candidates = subfolders
        for candidate in candidates:
            try:
                runs.append(load_run(candidate))
            except (FileNotFoundError, ValueError) as err:
                warnings.warn(f"Skipping {candidate}: {err}", stacklevel=2)
    runs = [r for r in runs if notebook in (None, r.notebook) and method in (None, r.method)]
    return sorted(runs, key=lambda r: (r.created, r.name))


def latest_run(notebook: str, out_dir: str | Path = "runs") -> Run | None:
    """The most recently created run of ``notebook`` under ``out_dir``, or ``None`` if there is none."""
    runs = list_runs(out_dir, notebook=notebook)
    return runs[-1] if runs else None


# ------------------------------------------------------------------------------------------------ resuming
SHARED_TRAINING_CODE = ("train", "study", "metrics", "sampling")
"""``nbutils`` modules behind every method run: the training loop, the evaluation grid, the scores, the sampler."""


def code_version(modules: Sequence[str]) -> str:
    """A fingerprint of the code behind a run: SHA-256 (first 16 hex digits) of the source files
    ``nbutils/<name>.py`` of ``modules`` plus ``SHARED_TRAINING_CODE``, in that order, names included.

    Why a hash of the source and not a version constant: a resumed run must end with the weights and scores an
    uninterrupted run of the *same* code would have, and any edit of the method, the loop, the sampler or a metric
    can break that; a constant is only as good as the memory of whoever edits the code, a hash never forgets. The
    price is that an edit that changes nothing (a comment) also starts a fresh run, which says so. Dependencies
    outside ``nbutils`` are recorded in the run's ``environment``, not in this fingerprint.
    """
    digest = hashlib.sha256()
    for name in dict.fromkeys([*modules, *SHARED_TRAINING_CODE]):
        path = REPO_ROOT / "nbutils" / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"code_version: no module nbutils/{name}.py; name the method's module, e.g. "
                                    "'textual_inversion'.")
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass
class Resumable:
    """What ``find_resumable_run`` decided: ``run`` to continue (``None``: start a new run) and ``reason``, one
    sentence for the notebook to print (which run and why, or why not and which parameter differed)."""

    run: Run | None
    reason: str


def _run_folders(out_dir: Path, notebook: str) -> list[Path]:
    """``out_dir``'s own folders named ``<notebook>-<YYYYmmdd-HHMMSS>[-k]``, newest first (by the name's time, then
    ``k``); study folders below ``out_dir`` are not searched: a notebook resumes only runs of its own ``OUT_DIR``."""
    pattern = re.compile(rf"{re.escape(notebook)}-(\d{{8}}-\d{{6}})(?:-(\d+))?")
    found = []
    for path in out_dir.iterdir() if out_dir.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append((match.group(1), int(match.group(2) or 0), path))
    return [path for *_, path in sorted(found, reverse=True)]


def differing_keys(ours: Any, theirs: Any, prefix: str = "") -> list[str]:
    """The dotted keys (``"train.steps"``) where two JSON values differ; ``[prefix or "value"]`` for unequal
    non-dicts."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        keys = sorted(set(ours) | set(theirs))
        return [d for k in keys for d in differing_keys(ours.get(k), theirs.get(k), f"{prefix}{k}.")]
    return [] if ours == theirs else [prefix.rstrip(".") or "value"]


def find_resumable_run(
    out_dir: str | Path, notebook: str, params: dict, *, code_version: str, method: str | None = None,
    resume: str | Path = "auto",
) -> Resumable:
    """The run a notebook should continue instead of starting a new one, if any.

    ``resume="auto"``: the runs of ``notebook`` (and ``method``) directly in ``out_dir`` are read newest first;
    runs with other ``params`` (model, dataset, training and evaluation recipe: all of them) are other experiments
    and are passed over; the first with the same ``params`` is continued if it has the same ``code_version`` and is
    not finished, else ``None`` (a finished run is never touched; other code starts afresh). A folder whose config
    cannot be read, met before such a run, also gives ``None``. Every ``None`` comes with the reason (for a changed
    parameter: which one differs from the newest run). ``"never"``: always ``None``. A path: that run folder; it
    must pass the same checks, else ``ValueError`` (an explicit request is not silently replaced by a new run); a
    folder of another method counts as ``"auto"``. Nothing is deleted or written here; checkpoints are checked by
    ``nbutils.train.resume_problem``.
    """
    if str(resume) == "never":
        return Resumable(None, "RESUME='never': starting a new run")
    ours = to_jsonable(dict(params), "params")
    if str(resume) != "auto":
        run = load_run(resume)  # a clear FileNotFoundError / ValueError for a folder that is no run
        if method is None or run.method == method:
            problem = _resume_problem(run, notebook, ours, code_version)
            if problem:
                raise ValueError(f"RESUME={str(resume)!r} cannot be resumed: {problem}. Set RESUME='auto' or "
                                 "'never' to start a new run.")
            return Resumable(run, f"resuming {run.path} (RESUME names it)")
    first_differ = None
    for folder in _run_folders(repo_path(out_dir), notebook):
        try:
            run = load_run(folder)
        except (FileNotFoundError, ValueError) as err:
            return Resumable(None, f"the newest run folder {folder} cannot be read ({err}); starting a new run, "
                                   "that folder is left as it is")
        if method is not None and run.method != method:
            continue
        differ = differing_keys(ours, run.config["params"])
        if differ:
            first_differ = first_differ or f"the newest run {run.path} has other parameters ({', '.join(differ)})"
            continue
        problem = _resume_problem(run, notebook, ours, code_version)
        if problem:
            return Resumable(None, f"not resuming {run.path}: {problem}; starting a new run")
        return Resumable(run, f"resuming {run.path}, interrupted before it finished, with the same parameters")
    if first_differ:
        return Resumable(None, f"{first_differ}; starting a new run")
    return Resumable(None, f"no earlier run of {notebook} in {repo_path(out_dir)}; starting a new run")


def _resume_problem(run: Run, notebook: str, params: dict, version: str) -> str | None:
    if run.notebook != notebook:
        return f"it is a run of {run.notebook}, not of {notebook}"
    differ = differing_keys(params, run.config["params"])
    if differ:
        return f"its parameters differ: {', '.join(differ)}"
    if run.finished:
        return f"it finished ({run.metrics['finished']}); a finished run is never touched"
    if run.code_version != version:
        return (f"it was trained by another version of the method code (its code_version {run.code_version}, "
                f"this code's {version})")
    return None


COLAB_DRIVE = Path("/content/drive")
DRIVE_FOLDER = "MyDrive/portrait-studio"


def drive_out_dir(out_dir: str | Path, drive: bool) -> str:
    """A notebook's ``OUT_DIR`` with its ``DRIVE`` parameter: unchanged when ``drive`` is false; with ``True``, on
    Colab, Google Drive is mounted (Colab asks for permission) and a relative ``out_dir`` moves to
    ``/content/drive/MyDrive/portrait-studio/<out_dir>``, so the results store, and with it every checkpoint,
    survives a disconnected runtime. ``True`` anywhere else raises ``RuntimeError``: there is no Drive to mount."""
    if not drive:
        return str(out_dir)
    try:
        from google.colab import drive as colab_drive  # only importable on Colab
    except ImportError:
        raise RuntimeError("DRIVE=True mounts Google Drive, which works on Colab only; here OUT_DIR is already on "
                           "this machine's disk: set DRIVE=False.") from None
    colab_drive.mount(str(COLAB_DRIVE))
    path = Path(out_dir).expanduser()
    return str(path if path.is_absolute() else COLAB_DRIVE / DRIVE_FOLDER / path)


def read_png_metadata(path: str | Path) -> dict:
    """The PNG text chunks of image ``path`` as a dict; chunks written as JSON by ``save_image`` are decoded."""
    with Image.open(repo_path(path)) as img:
        chunks = dict(img.text)
    out: dict[str, Any] = {}
    for key, text in chunks.items():
        if key in PLAIN_TEXT_KEYS:
            out[key] = text
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out
