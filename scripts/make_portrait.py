"""``make portrait``: one papermill call of ``notebooks/09_portrait.ipynb``, a progress line per stage.

The notebook writes its own run folder ``<out>/09_portrait-<YYYYmmdd-HHMMSS>/`` (the portrait PNG with its recipe in
its PNG text chunks, the contact sheet, metrics.json); this script moves the executed notebook into it. Only the
notebook's ``[portrait k/n]`` lines are shown; a bad input (``PortraitInputError``) is reported in one message, before
anything trains.

    python scripts/make_portrait.py --photos data/me --scene "on the beach" --style watercolor --route prompt
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from papermill.exceptions import PapermillExecutionError

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from nbutils.runs import list_runs, repo_path, timestamp  # noqa: E402
from run_study import describe_failure, run_notebook  # noqa: E402

NOTEBOOK = REPO_ROOT / "notebooks" / "09_portrait.ipynb"
PREFIX = "[portrait"


class ProgressLines:
    """A file-like sink for the notebook's printed output that passes on only the lines starting with ``prefix``."""

    def __init__(self, out, prefix: str = PREFIX):
        self.out, self.prefix, self.pending = out, prefix, ""

    def write(self, text: str) -> None:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(self.prefix):
                self.out.write(line + "\n")

    def flush(self) -> None:
        self.out.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Turn a folder of photos into a stylised portrait (notebook 09).")
    p.add_argument("--photos", default="auto", help="folder of 3-20 photos; auto: data/me, else the demo subject")
    p.add_argument("--scene", default=None, help='where the subject is, e.g. "on the beach"')
    p.add_argument("--style", default=None, help="the style, e.g. watercolor (toy: photo, sketch, pixel art, "
                                                  "watercolor, pop art)")
    p.add_argument("--method", default=None, help="auto (the best trade-off of the evaluation) or a method name")
    p.add_argument("--route", default=None, help="prompt, img2img or nst")
    p.add_argument("--style-image", default=None, help="a reference image for the nst route")
    p.add_argument("--model", default=None, help="auto, toy, tiny, sd15, a folder or a hub id")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", type=int, choices=(0, 1), default=0, help="1: a short run (tests)")
    p.add_argument("--allow-toy-photos", type=int, choices=(0, 1), default=0,
                   help="1: train the toy model on real photos anyway (it cannot learn a real face)")
    p.add_argument("--out", default="runs", help="the results store (relative: from the repo root)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = repo_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parameters = {"PHOTOS": args.photos, "QUICK": bool(args.quick), "OUT_DIR": str(out),
                  "ALLOW_TOY_PHOTOS": bool(args.allow_toy_photos)}
    for name in ("scene", "style", "method", "route", "style_image", "model", "seed"):
        if getattr(args, name) not in (None, ""):
            parameters[name.upper()] = getattr(args, name)
    started, since = time.perf_counter(), datetime.now().astimezone()
    executed = out / f".09_portrait-{timestamp()}.ipynb"
    print(f"make portrait: {', '.join(f'{k}={v!r}' for k, v in parameters.items())}", flush=True)
    failure = None
    try:
        run_notebook(NOTEBOOK, executed, parameters, stdout_file=ProgressLines(sys.stdout))
    except PapermillExecutionError as err:
        failure = err
    except KeyboardInterrupt:
        print("INTERRUPTED: run the same command again (a finished training run is reused).")
        return 130
    runs = [r for r in list_runs(out, notebook="09_portrait") if r.created >= since.replace(microsecond=0)]
    target = runs[-1].path / "09_portrait.ipynb" if runs else out / executed.name.lstrip(".")
    if executed.exists():
        executed.rename(target)
    if failure is not None:
        if failure.ename == "PortraitInputError":
            print(f"make portrait stopped before any training: {failure.evalue}")
            return 2
        print(f"FAILED in {describe_failure(NOTEBOOK, failure)}: {failure.ename}: {failure.evalue}")
        print(f"The executed notebook with the traceback is {target}")
        return 1
    print(f"make portrait: done in {time.perf_counter() - started:.0f} s; run folder {target.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
