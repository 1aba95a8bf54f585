"""Choose a method's recipe on the validation subject, never on the subject the study reports.

    python scripts/sweep.py --method lora --lr 3e-4,1e-3,3e-3 --steps 400 --every 100 --option rank=4

prepares ``data/subjects/toy-val`` with notebook 01 itself (once, into ``OUT/val``), samples the base model on
the evaluation grid once, then trains ``--method`` once per learning rate (and per value of each ``--option``),
scoring every ``--every`` steps on 3 prompts x ``--samples`` seeds. Each training is its own run folder under
``OUT/<method>``; a recipe whose finished run is already there is read, not trained again, so a cut sweep resumes.
The table (one row per recipe and checkpoint) is written to ``--table`` (``figures/sweeps/<method>.csv``) and the
chosen recipe printed: ``nbutils.recipes.choose_recipe``'s rule.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nbutils.compare import METHODS  # noqa: E402
from nbutils.recipes import (CLASS_PHRASE, OPTIONS, SWEEP_KEYS, check_options, choose_recipe, sweep_rows,
                             train_recipe, write_table)  # noqa: E402
from nbutils.runs import atomic_write_json, list_runs, new_run, to_jsonable  # noqa: E402
from nbutils.study import eval_setup, load_subject_dataset  # noqa: E402
from nbutils.train import TrainConfig  # noqa: E402

VAL_SUBJECT = "data/subjects/toy-val"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--lr", required=True, help="comma-separated learning rates")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps of each training")
    p.add_argument("--every", type=int, required=True, help="evaluate (and checkpoint) every N steps")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--option", action="append", default=[],
                   help="NAME=V1,V2 (an option of nbutils.recipes.OPTIONS, e.g. rank=1,4,16); repeatable")
    p.add_argument("--samples", type=int, default=8, help="seeds per evaluation prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="toy")
    p.add_argument("--out", default="runs/sweep", help="the sweep's results store")
    p.add_argument("--table", default="figures/sweeps/{method}.csv", help="where the table goes")
    return p.parse_args(argv)


def prepared_validation_subject(out: Path, model: str):
    """Notebook 01 on ``VAL_SUBJECT`` with its defaults (once), and its dataset."""
    from scripts.run_study import prepare_once

    val = prepare_once(out / "val", {"SUBJECT_DIR": str(REPO / VAL_SUBJECT), "MODEL": model, "QUICK": False})
    return load_subject_dataset("auto", val)


def grid(option_args: list[str], method: str) -> list[dict]:
    """Every combination of the ``NAME=V1,V2`` options (numbers)."""
    axes = {}
    for arg in option_args:
        name, _, values = arg.partition("=")
        if name not in OPTIONS[method]:
            raise SystemExit(f"{method} takes no option {name!r}; its options: {sorted(OPTIONS[method]) or 'none'}")
        axes[name] = [float(v) if "." in v or "e" in v else int(v) for v in values.split(",")]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    subject = prepared_validation_subject(out, args.model)
    from nbutils.metrics import suite_for_tier
    from nbutils.models import model_tier, resolve_model

    ref = resolve_model(args.model)
    suite = suite_for_tier(model_tier(ref))
    setup = eval_setup(ref, subject.path, seed=args.seed, quick=False, n_samples=args.samples)
    baseline_file = out / f"baseline-{args.samples}-{args.seed}.json"
    if baseline_file.is_file():
        baseline = json.loads(baseline_file.read_text())
    else:
        from nbutils.metrics import evaluate_images
        from nbutils.models import load_pipeline
        from nbutils.study import sample_prompts

        images = sample_prompts(load_pipeline(ref), setup, CLASS_PHRASE)
        baseline = to_jsonable(evaluate_images(images, subject.references, suite, subject_phrase=CLASS_PHRASE,
                                               seed=setup.seeds[0], truth=subject.identity), "baseline")
        atomic_write_json(baseline_file, baseline)
    class_images = None
    if args.method in ("dreambooth", "dreambooth_ti"):
        from nbutils.class_images import class_image_count, ensure_class_images
        from nbutils.models import load_pipeline

        class_images = ensure_class_images(load_pipeline(ref), class_image_count("toy"), steps=setup.steps,
                                           guidance_scale=setup.guidance_scale, seed=args.seed, model=ref)
    method_dir = out / args.method
    for lr in [float(v) for v in args.lr.split(",")]:
        for options in grid(args.option, args.method):
            cfg = TrainConfig(steps=args.steps, lr=lr, batch_size=args.batch, seed=args.seed,
                              checkpoint_every=args.every, resolution=setup_resolution(ref))
            params = to_jsonable(dict(method=args.method, train=vars(cfg), options=options, eval=setup.as_dict()),
                                 "params")
            done = [r for r in list_runs(method_dir, notebook="sweep")
                    if r.finished and same_recipe(r.config["params"], params)]
            if done:
                print(f"{args.method} lr {lr:g} {options}: done in {done[-1].path}")
                continue
            run = new_run("sweep", params, out_dir=method_dir, method=args.method)
            print(f"{args.method} lr {lr:g} {options}: training into {run.path}", flush=True)
            _, evaluator, costs = train_recipe(args.method, ref, subject, setup, suite, cfg, run,
                                            class_images=class_images, baseline=baseline, **options)
            run.finish()
            last = evaluator.scores[cfg.steps]
            print(f"  identity {last['identity']:.3f}, CLIP-T {last['clip_t']:.3f}, {costs['train_s']:.0f} s",
                  flush=True)
    rows = sweep_rows(list_runs(method_dir, notebook="sweep"), baseline)
    csv_path = write_table(rows, args.table.format(method=args.method))
    choice = choose_recipe(rows, baseline)
    print(f"table: {csv_path} ({len(rows)} rows, scores {', '.join(SWEEP_KEYS)})")
    print("chosen:", json.dumps(choice))
    return 0


def same_recipe(theirs: dict, ours: dict) -> bool:
    """Whether two sweep runs' parameters name the same recipe (an option left at its default counts as given)."""
    def named(params: dict) -> dict:
        return {**params, "options": check_options(params["method"], params["options"])}
    return named(theirs) == named(ours)


def setup_resolution(ref: str) -> int:
    from nbutils.models import model_tier, tier_defaults

    return tier_defaults(model_tier(ref)).resolution


if __name__ == "__main__":
    sys.exit(main())
