"""Every method side by side, read from the results store alone (notebook 08).

The method notebooks log through ``nbutils.study``. In each run folder, ``metrics.json`` holds what training cost
(``log_resources``: ``train_s`` in seconds, ``peak_rss_mb`` / ``peak_cuda_mb`` in MiB, ``artifact_bytes``, ``steps``,
``trainable_params``) and the series ``"eval"``: one point per checkpoint, step 0 being the base model asked for
"a person", with the scores of ``metrics.evaluate_images`` and the point's ``subject_phrase``. ``images/`` holds the
grid's first-seed image of every prompt at every checkpoint, with prompt, seed and step in its PNG text chunks.

- ``select_runs``: the latest finished run of each method for one model, ``QUICK`` and ``SEED``, with notes on
  every run left out and every method missing;
- ``comparison_rows`` (final scores and costs, one row per method and the base model; over several training seeds
  the mean, the spread between seeds and a bootstrap interval over every seed's images), ``table_markdown`` and
  ``write_csv``;
- ``scatter_points``, ``interval_bars``, ``pareto_front`` and ``pareto_figure``: identity against editability
  (CLIP-T), with error bars;
- ``curves_figure``: a score per checkpoint, one curve per method;
- ``sample_matrix`` and ``matrix_figure``: methods x prompts, the same seed in every cell.

Every reader tolerates an empty store, unfinished runs, missing scores and missing images: it leaves them out and
says so in a note, so the notebook reports what there is.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from nbutils.runs import Run, atomic_write, list_runs, read_png_metadata, repo_path
from nbutils.viz import image_grid, new_figure, plot_curve, score_table, series_points

METHODS: dict[str, tuple[str, str]] = {
    "textual_inversion": ("Textual Inversion", "02"),
    "pplus": ("P+", "03"),
    "lora": ("LoRA", "04"),
    "svdiff": ("SVDiff", "04"),
    "dreambooth": ("DreamBooth", "05"),
    "dreambooth_no_prior": ("DreamBooth without prior preservation", "05"),
    "dreambooth_ti": ("DreamBooth + TI", "05"),
    "pivotal_tuning": ("LoRA + TI (pivotal tuning)", "05"),
}
"""The methods of notebooks 02-05: ``{method: (label, notebook number)}``, in the order tables list them. Each
trains with the study's loop and loads back by its own loader (``nbutils.personalised``, the portrait)."""

ENCODERS: dict[str, tuple[str, str]] = {
    "e4t_encoder": ("E4T encoder alone (1 photo, no tuning)", "06"),
    "e4t": ("E4T (1 photo)", "06"),
    "ip_adapter_single": ("IP-Adapter (1 photo)", "06"),
    "ip_adapter_max": ("IP-Adapter + max pool", "06"),
    "ip_adapter_mean": ("IP-Adapter + avg pool", "06"),
    "ip_adapter_attention": ("IP-Adapter + self-attention", "06"),
}
"""The encoder methods of notebook 06, pretrained on the toy world's people and compared after ``METHODS``; the
later notebooks that draw with a run (style transfer, the portrait) choose among ``METHODS`` only."""

BASE = "base model"
"""The row of the untrained model: step 0 of a run's ``"eval"`` series (the prompts with "a person")."""

COLUMNS: dict[str, str] = {
    "run": "run folder",
    "steps": "steps",
    "n_seeds": "training seeds",
    "identity": "identity (cos) ↑",
    "identity_lo": "identity, 95 % interval low",
    "identity_hi": "identity, 95 % interval high",
    "identity_sd": "identity, spread between seeds (sd)",
    "detection_rate": "face detection rate",
    "success_rate": "success rate ↑ (me, where, how)",
    "clip_t": "CLIP-T (cos) ↑",
    "clip_t_lo": "CLIP-T, 95 % interval low",
    "clip_t_hi": "CLIP-T, 95 % interval high",
    "clip_t_sd": "CLIP-T, spread between seeds (sd)",
    "clip_i": "CLIP-I (cos) ↑",
    "dino": "DINO (cos) ↑",
    "fid": "FID ↓",
    "kid_mean": "KID ↓",
    "is_mean": "IS ↑",
    "train_s": "train time (s)",
    "peak_rss_mb": "peak RAM (MiB)",
    "peak_cuda_mb": "peak GPU memory (MiB)",
    "artifact_bytes": "artifact size (bytes)",
    "trainable_params": "trainable parameters",
}
"""A comparison row's keys (besides ``"method"``) and their labels; the scores come from the last checkpoint. The
``_lo``/``_hi`` columns are a 95 % percentile bootstrap interval of the mean over every generated image (pooled over
the training seeds); ``_sd`` is the standard deviation of the per-seed means (``None`` for one seed); the success rate
(toy tier) is the share of images whose every identity trait, scene and style are those asked for. ``_OPTIONAL``
columns (DINO: the real tier's) appear in tables and CSV files only when some row has a value."""

_SCORES = ("identity", "detection_rate", "success_rate", "clip_t", "clip_i", "dino", "fid", "kid_mean", "is_mean")
_OPTIONAL = ("dino",)
_INTERVALS = ("identity", "clip_t")
_COSTS = ("train_s", "peak_rss_mb", "peak_cuda_mb", "artifact_bytes", "trainable_params")


def label(method: str) -> str:
    """The display name of ``method`` (``'pplus'`` -> ``'P+'``); an unknown method keeps its name."""
    known = {**METHODS, **ENCODERS}
    return known[method][0] if method in known else method


def _read_metrics(run: Run) -> dict | str:
    """``run``'s metrics, or why the run cannot be compared (a sentence)."""
    try:
        metrics = run.metrics
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its metrics.json is corrupt"
    if not metrics:
        return "it logged no metrics (it crashed or is still running)"
    if not metrics.get("series", {}).get("eval"):
        return "it logged no checkpoint scores (series 'eval')"
    if "train_s" not in metrics:
        return "it logged no training costs yet (it crashed or is still running)"
    return metrics


def _model_ref(run: Run) -> str:
    return str(run.config["params"].get("model_ref") or run.model)


@dataclass
class Selection:
    """The runs to compare: ``runs`` maps each method to its latest finished run (known methods in ``METHODS``
    order, then others by name), ``metrics`` their ``metrics.json``; ``model_ref``: the model they all trained
    (``None`` when the store has no method run); ``notes``: what was left out and why, one sentence each."""

    runs: dict[str, Run] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    model_ref: str | None = None
    notes: list[str] = field(default_factory=list)


def select_runs(
    out_dir: str | Path = "runs", *, model: str = "auto", quick: bool | None = None, seed: int | None = None,
    expected: Sequence[str] = (*METHODS, *ENCODERS), methods: Collection[str] | None = None,
) -> Selection:
    """The latest finished run of every method in ``out_dir`` (of ``methods`` only, when given) that trained
    ``model`` with ``QUICK == quick`` and ``SEED == seed`` (``None``: any).

    ``model="auto"`` takes the model of the newest finished method run that fits ``quick`` and ``seed``; any other
    value is resolved by ``nbutils.models.resolve_model``. A run counts as finished when its ``metrics.json`` holds an
    ``"eval"`` series and ``train_s``; newer unfinished runs are noted and skipped. ``expected`` methods without a
    run get a note naming their notebook, as does a difference between the chosen runs' evaluation grids.
    """
    root = repo_path(out_dir)
    selection = Selection()
    params = {"QUICK": quick, "SEED": seed}
    runs = [r for r in list_runs(out_dir) if r.method and (methods is None or r.method in methods)]
    fitting = [r for r in runs if all(v is None or r.config["params"].get(k) == v for k, v in params.items())]
    if not fitting:
        wanted = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) or "any settings"
        found = f" ({len(runs)} with other QUICK or SEED)" if runs else ""
        selection.notes.append(f"No method run with {wanted} in {root}{found}: run the method notebooks (02-05) "
                               "first with the same OUT_DIR, QUICK and SEED.")
        return selection
    metrics = {r.path: _read_metrics(r) for r in fitting}
    if model == "auto":
        finished = [r for r in fitting if isinstance(metrics[r.path], dict)]
        selection.model_ref = _model_ref((finished or fitting)[-1])
    else:
        from nbutils.models import resolve_model  # lazy: only here is a model reference resolved

        selection.model_ref = resolve_model(model)
    others = sorted({_model_ref(r) for r in fitting if _model_ref(r) != selection.model_ref})
    if others:
        selection.notes.append(f"Left out the runs of other models ({', '.join(others)}); this compares "
                               f"{selection.model_ref}.")
    if len(fitting) < len(runs):
        selection.notes.append(f"Left out {len(runs) - len(fitting)} method run(s) made with another QUICK or SEED.")
    by_method: dict[str, list[Run]] = {}
    for r in fitting:
        if _model_ref(r) == selection.model_ref:
            by_method.setdefault(r.method, []).append(r)
    known = [*METHODS, *ENCODERS]
    order = [m for m in known if m in by_method] + sorted(m for m in by_method if m not in known)
    for method in order:
        for r in reversed(by_method[method]):  # newest first
            if isinstance(metrics[r.path], dict):
                selection.runs[method], selection.metrics[method] = r, metrics[r.path]
                break
            selection.notes.append(f"Skipped {r.name}: {metrics[r.path]}.")
    for method in expected:
        if method not in selection.runs:
            notebook = f"notebook {({**METHODS, **ENCODERS})[method][1]}" if method in known else "its notebook"
            selection.notes.append(f"No finished {label(method)} run for this model, QUICK and SEED: run {notebook} "
                                   "to add it.")
    grids = [r.config["params"].get("eval") or {} for r in selection.runs.values()]
    differ = sorted({k for g in grids for k in g if any(h.get(k) != g[k] for h in grids)})
    if differ:
        selection.notes.append(f"The runs were evaluated on different grids ({', '.join(differ)} differ): their "
                               "scores compare only roughly.")
    return selection


# --------------------------------------------------------------------------------------------------- the table
def _final_point(metrics: dict) -> dict:
    return max(metrics["series"]["eval"], key=lambda p: p["step"])


def _pooled(points: Sequence[dict]) -> dict:
    """One row's scores from the same checkpoint of one run per training seed: each score's mean over the seeds,
    ``_sd`` the spread of the per-seed means (``None`` for one seed), ``_lo``/``_hi`` the bootstrap interval over the
    pooled per-image scores (the logged ``_ci`` when a point has no per-image list), ``n_seeds``."""
    from nbutils.metrics import bootstrap_ci  # numpy only; lazy so that importing this module loads no scorer

    row: dict = {"n_seeds": len(points)}
    for key in _SCORES:
        values = [p[key] for p in points if p.get(key) is not None]
        row[key] = float(sum(values) / len(values)) if values else None
    for key in _INTERVALS:
        values = [p[key] for p in points if p.get(key) is not None]
        row[f"{key}_sd"] = float(statistics.stdev(values)) if len(values) > 1 else None
        pooled = [v for p in points for v in (p.get(f"{key}_per_image") or []) if v is not None]
        interval = bootstrap_ci(pooled) if pooled else (points[0].get(f"{key}_ci") if len(points) == 1 else None)
        row[f"{key}_lo"], row[f"{key}_hi"] = interval or (None, None)
    return row


def comparison_rows(selection: Selection | Sequence[Selection]) -> list[dict]:
    """One row per compared method, after a ``BASE`` row (step 0 of the first method's runs, no costs):
    ``{"method": label, **{key: value for key in COLUMNS}}``, the scores of the last checkpoint, ``None`` where not
    logged. ``selection``: one ``Selection``, or one per training seed (``select_runs(..., seed=s)``): a method's
    row then pools its run of every seed (``_pooled``; costs and ``run``/``steps`` are the first seed's)."""
    selections = [selection] if isinstance(selection, Selection) else list(selection)
    methods = list(dict.fromkeys(m for s in selections for m in s.metrics))
    rows = []
    for method in methods[:1]:
        bases = [p for s in selections if method in s.metrics
                 for p in s.metrics[method]["series"]["eval"] if p["step"] == 0]
        if bases:
            first = next(s for s in selections if method in s.metrics)
            rows.append({"method": BASE, "run": first.runs[method].name, "steps": 0, **_pooled(bases),
                         **dict.fromkeys(_COSTS)})
    for method in methods:
        having = [s for s in selections if method in s.metrics]
        metrics = having[0].metrics[method]
        final = _final_point(metrics)
        rows.append({"method": label(method), "run": having[0].runs[method].name,
                     "steps": metrics.get("steps", final["step"]),
                     **_pooled([_final_point(s.metrics[method]) for s in having]),
                     **{k: metrics.get(k) for k in _COSTS}})
    return rows


def _columns(rows: Sequence[dict]) -> list[str]:
    """The ``COLUMNS`` keys shown for ``rows``: all but the ``_OPTIONAL`` ones that no row has a value for."""
    return [k for k in COLUMNS if k not in _OPTIONAL or any(row.get(k) is not None for row in rows)]


def table_markdown(rows: Sequence[dict]) -> str:
    """``rows`` as a Markdown table: one column per row (method), one line per shown ``COLUMNS`` entry."""
    if not rows:
        return "*No runs to compare.*"
    keys = _columns(rows)
    return score_table({row["method"]: {COLUMNS[k]: row.get(k) for k in keys} for row in rows},
                       keys=[COLUMNS[k] for k in keys])


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write ``rows`` as CSV to ``path`` atomically (header: ``method`` and the shown ``COLUMNS`` keys; ``None`` is
    an empty cell) and return the path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["method", *_columns(rows)], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    path = repo_path(path)
    atomic_write(path, buf.getvalue().encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------------- Pareto front
def scatter_points(rows: Sequence[dict], x: str = "clip_t", y: str = "identity") -> tuple[dict, list[str]]:
    """``({method: (x, y)}, notes)``: the rows that have both scores, and a note for each that lacks one."""
    points, notes = {}, []
    for row in rows:
        missing = [k for k in (x, y) if row.get(k) is None]
        if not missing:
            points[row["method"]] = (float(row[x]), float(row[y]))
            continue
        faces = row.get("detection_rate")
        why = f" (faces found in {faces:.0%} of its images)" if faces is not None and "identity" in missing else ""
        notes.append(f"{row['method']} is not plotted: no {' or '.join(COLUMNS[k] for k in missing)} logged{why}.")
    return points, notes


def interval_bars(rows: Sequence[dict], x: str = "clip_t", y: str = "identity") -> dict:
    """``{method: ((x_lo, x_hi), (y_lo, y_hi))}``: the rows' 95 % intervals of both scores, for ``pareto_figure``
    (rows without both intervals are left out)."""
    keys = (f"{x}_lo", f"{x}_hi", f"{y}_lo", f"{y}_hi")
    return {row["method"]: ((row[keys[0]], row[keys[1]]), (row[keys[2]], row[keys[3]])) for row in rows
            if all(row.get(k) is not None for k in keys)}


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The names whose point no other point dominates (both coordinates maximised: at least as high in both and
    higher in one), ordered by the first coordinate."""
    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())

    return sorted((name for name, p in points.items() if not dominated(p)), key=lambda n: points[n])


def _message_figure(title: str, message: str) -> Figure:
    """A figure that says why there is nothing to draw."""
    fig = new_figure((6, 2.5))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_title(title)
    return fig


def pareto_figure(points: Mapping[str, tuple[float, float]], title: str,
                  xlabel: str = "editability: CLIP-T (cosine)", ylabel: str = "identity (cosine)",
                  errors: Mapping[str, tuple[tuple[float, float], tuple[float, float]]] | None = None) -> Figure:
    """Scatter of ``points`` (``{name: (x, y)}``), each labelled, with the Pareto front (``pareto_front``) as a line
    and, for the names in ``errors`` (``interval_bars``), their intervals as error bars."""
    if not points:
        return _message_figure(title, "No run has both scores logged: nothing to plot.")
    fig = new_figure((6.5, 4.5))
    ax = fig.subplots()
    front = pareto_front(points)
    for name, (x, y) in points.items():
        on_front = name in front
        colour = "tab:red" if on_front else "tab:blue"
        if errors and name in errors:
            (x_lo, x_hi), (y_lo, y_hi) = errors[name]
            ax.errorbar([x], [y], xerr=[[x - x_lo], [x_hi - x]], yerr=[[y - y_lo], [y_hi - y]], fmt="none",
                        ecolor=colour, alpha=0.5, capsize=3, zorder=2)
        ax.scatter([x], [y], s=60, marker="*" if on_front else "o", zorder=3, color=colour)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.plot(*zip(*(points[n] for n in front)), color="tab:red", lw=1, ls="--", zorder=2,
            label=f"Pareto front ({len(front)} of {len(points)})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return fig


# --------------------------------------------------------------------------------------------------- curves
def curves_figure(runs: Mapping[str, Run], key: str, title: str, ylabel: str) -> Figure:
    """``key`` of each run's ``"eval"`` series against the optimizer step, one curve per method (step 0: the base
    model)."""
    series = {label(m): series_points(r, key) for m, r in runs.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return _message_figure(title, f"No run logged {key!r} at its checkpoints: nothing to plot.")
    return plot_curve(series, title=title, xlabel="optimizer step", ylabel=ylabel)


# --------------------------------------------------------------------------------------------------- samples
@dataclass
class SampleMatrix:
    """Images for a methods x prompts grid: ``cells[row][c]`` is the image of ``prompts[c]`` (a prompt name such
    as ``'beach'``) at ``seed``, ``None`` where the run saved none; ``notes`` say what is missing or was resized."""

    seed: int | None
    prompts: list[str]
    cells: dict[str, list[Image.Image | None]]
    notes: list[str]


def _images_at(run: Run, step: int, phrase: str) -> dict[tuple[str, int], Path]:
    """``{(prompt name, seed): png}`` of ``run``'s images at ``step``, their prompt matched to the run's grid."""
    grid = run.config["params"].get("eval") or {}
    names = {t.replace("{S}", phrase): n for n, t in zip(grid.get("names", []), grid.get("templates", []))}
    found = {}
    for png in sorted((run.path / "images").glob("*.png")):
        meta = read_png_metadata(png)
        if meta.get("step") == step and meta.get("prompt") in names:
            found[(names[meta["prompt"]], meta.get("seed"))] = png
    return found


def sample_matrix(runs: Mapping[str, Run], seed: int | None = None) -> SampleMatrix:
    """The base model's and each method's last-checkpoint image of every evaluation prompt at ``seed``.

    Images are matched by their PNG text chunks: the prompt (with the run's subject phrase, mapped back to the
    prompt's name through the run's evaluation grid), the seed and the step. ``seed=None`` takes the smallest seed
    any run saved. Images of another size than the largest are resized to it (Lanczos), with a note.
    """
    found: dict[str, dict[tuple[str, int], Path]] = {}
    notes: list[str] = []
    for method, run in runs.items():
        points = {p["step"]: p.get("subject_phrase", "") for p in run.metrics.get("series", {}).get("eval", [])}
        if not points:
            notes.append(f"{label(method)}: {run.name} logged no checkpoints, so no images are matched.")
            continue
        if BASE not in found and 0 in points:
            found[BASE] = _images_at(run, 0, points[0])
        final = max(points)
        found[label(method)] = _images_at(run, final, points[final])
        if not found[label(method)]:
            notes.append(f"{label(method)}: {run.name} has no images of its evaluation prompts at step {final}.")
    keys = [k for images in found.values() for k in images]
    if seed is None and keys:
        seed = min(s for _, s in keys)
    in_grid_order = [n for r in runs.values() for n in (r.config["params"].get("eval") or {}).get("names", [])]
    at_seed = {name for name, s in keys if s == seed}
    prompts = [name for name in dict.fromkeys(in_grid_order) if name in at_seed]
    cells: dict[str, list[Image.Image | None]] = {}
    for row, images in found.items():
        cells[row] = [Image.open(images[(p, seed)]).convert("RGB") if (p, seed) in images else None for p in prompts]
        missing = [p for p, image in zip(prompts, cells[row]) if image is None]
        if missing and images:
            notes.append(f"{row}: no image of {', '.join(missing)} at seed {seed}.")
    sizes = {image.size for row in cells.values() for image in row if image is not None}
    if len(sizes) > 1:
        target = max(sizes)
        for row, images in cells.items():
            resized = [image.size for image in images if image is not None and image.size != target]
            if resized:
                notes.append(f"{row}: images of {resized[0][0]}x{resized[0][1]} px resized to "
                             f"{target[0]}x{target[1]} px to fit the grid.")
            cells[row] = [None if im is None else im if im.size == target else im.resize(target, Image.LANCZOS)
                          for im in images]
    return SampleMatrix(seed, prompts, cells, notes)


def matrix_figure(matrix: SampleMatrix, title: str) -> Figure:
    """The grid of ``matrix``: one row per method (the base model first), one column per prompt; a missing image is
    a grey cell."""
    if not matrix.prompts:
        return _message_figure(title, "No run saved images of its evaluation prompts: nothing to show.")
    size = next(im.size for row in matrix.cells.values() for im in row if im is not None)
    blank = Image.new("RGB", size, (200, 200, 200))
    return image_grid([[blank if im is None else im for im in row] for row in matrix.cells.values()],
                      row_labels=list(matrix.cells), col_labels=[p.replace("_", " ") for p in matrix.prompts],
                      title=title, cell=1.6)
