"""scripts/ablate_augmentations.py: its variants switch notebook 01's own parameters, and its figure draws every
variant and method."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts import ablate_augmentations as ablation  # noqa: E402


def test_every_variant_sets_only_parameters_notebook_01_has():
    cells = nbformat.read(REPO / "notebooks" / "01_dataset.ipynb", as_version=4).cells
    [parameters] = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    names = {line.split("=")[0].strip() for line in parameters.source.splitlines() if "=" in line}
    assert set(ablation.VARIANTS) == {"none", "colour jitter", "scale crop", "rotation", "all"}
    for variant, switches in ablation.VARIANTS.items():
        assert set(switches) <= names, variant
    alone = [v for v in ablation.VARIANTS if v not in ("none", "all")]
    assert all(sum(value is False for value in ablation.VARIANTS[v].values()) == 2 for v in alone)  # one left on


def test_the_figure_has_a_panel_per_score_and_a_bar_per_variant_and_method(tmp_path):
    rows = [{"variant": v, "method": m, **{k: 0.1 * i for k in ablation.KEYS}}
            for i, v in enumerate(ablation.VARIANTS) for m in ("lora", "textual_inversion")]
    rows[0]["success_rate"] = None  # a score a run did not log draws as 0
    fig = ablation.figure(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").is_file() and len(fig.axes) == len(ablation.KEYS)
    assert all(len(ax.patches) == 2 * len(ablation.VARIANTS) for ax in fig.axes)
    assert fig.axes[2].patches[0].get_height() == 0 and fig.axes[0].patches[4].get_height() > 0
