"""Pretrain E4T's encoder and weight offsets on the toy world's faces (``nbutils.e4t``, ``nbutils.domain``).

    python scripts/train_toy_e4t.py              # the shipped recipe -> data/models/toy-encoders/e4t/
    python scripts/train_toy_e4t.py --steps 5 --people 40 --out /tmp/e4t   # a pilot, to time steps

Renders ``--people`` domain identities x ``--photos`` photos each, caches their VAE latents and CLIP image features
(in the run folder), then trains the encoder and the LoRA weight offsets with the toy UNet and text encoder frozen:
each step draws leave-one-out batches (the subject vector from one photo of a person, the denoising loss on
another photo of theirs). Seeded; checkpoints every ``--checkpoint-every`` steps into a run folder under
``runs/`` (``nbutils.train.save_checkpoint``, atomic), and a second call with the same arguments resumes from the
newest. The result: ``e4t.safetensors`` (encoder + LoRA, ``E4TConfig`` in its header) and ``training.json``
(recipe, losses, times) in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbutils.domain import PLACEHOLDER as DOMAIN_S, leave_one_out, render_domain  # noqa: E402
from nbutils.e4t import PLACEHOLDER, WEIGHTS_NAME, E4T, E4TConfig  # noqa: E402
from nbutils.models import TOY_MODEL_DIR, image_size, load_pipeline  # noqa: E402
from nbutils.runs import atomic_write, atomic_write_json, list_runs, new_run, repo_path  # noqa: E402
from nbutils.toy_evaluators import TOY_CLIP_DIR  # noqa: E402
from nbutils.train import (Batch, TrainConfig, _generator, encode_latents, list_checkpoints, load_checkpoint,  # noqa: E402
                           save_checkpoint)

SUBJECT_PHRASE = f"{PLACEHOLDER} person"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--people", type=int, default=800,
                   help="distinct identities (the toy world has 810, the 2 subjects held out: at most 808)")
    p.add_argument("--photos", type=int, default=10, help="photos per person")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--scale", type=float, default=E4TConfig.scale)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--offset-l2", type=float, default=E4TConfig.offset_l2)
    p.add_argument("--weight-l2", type=float, default=E4TConfig.weight_l2)
    p.add_argument("--latent-branch", action=argparse.BooleanOptionalAction, default=True,
                   help="the encoder also reads the reference's VAE latent")
    p.add_argument("--model", default=str(TOY_MODEL_DIR), help="the pipeline folder (frozen)")
    p.add_argument("--runs", default="runs", help="results store for the run folder (checkpoints)")
    p.add_argument("--cache", default=".cache/e4t", help="folder for the rendered domain's latents and features")
    p.add_argument("--out", default="data/models/toy-encoders/e4t")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this session after that step (the next call resumes; for tests)")
    return p.parse_args(argv)


def domain_cache(pipe, method: E4T, args) -> tuple[torch.Tensor, torch.Tensor, list[list[str]], float]:
    """``(latents (P, K, 4, h, w), features (P, K, F), captions, seconds it took to build)``, from ``--cache`` when an earlier
    call rendered the same domain (seed, people, photos) for the same model, else rendered, encoded and saved
    there atomically (a resumed or re-sized run does not render again)."""
    name = f"domain-{Path(args.model).name}-s{args.seed}-{args.people}x{args.photos}.safetensors"
    path = repo_path(args.cache) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        render_and_encode(pipe, method, args, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # read back even when just written: one code path, the same bits
        meta = f.metadata()
    cached = load_file(path)
    return cached["latents"], cached["features"], json.loads(meta["captions"]), float(meta["seconds"])


def render_and_encode(pipe, method: E4T, args, path: Path) -> None:
    """Render the domain, encode its VAE latents and CLIP features, and save them (with the captions and the
    seconds it took) to ``path``."""
    began = time.perf_counter()
    domain = render_domain(args.seed, args.people, args.photos)
    captions = [[c.replace(DOMAIN_S, SUBJECT_PHRASE) for c in row] for row in domain.captions]
    flat = domain.images.flatten(0, 1)  # (P*K, 3, 64, 64) uint8
    from PIL import Image

    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in flat]
    latents = encode_latents(pipe, images, resolution=image_size(args.model), batch_size=64)
    features = torch.cat([method.tower(flat[i:i + 256]) for i in range(0, len(flat), 256)])
    shape = (args.people, args.photos)
    latents, features = latents.view(*shape, *latents.shape[1:]), features.view(*shape, -1)
    tensors = {"latents": latents.contiguous(), "features": features.contiguous()}
    seconds = f"{time.perf_counter() - began:.1f}"
    atomic_write(path, save(tensors, metadata={"captions": json.dumps(captions), "seconds": seconds}))


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the JSON reads the same in every clone)."""
    try:
        return str(Path(path).resolve().relative_to(repo_path(".")))
    except ValueError:
        return str(path)


def find_run(args, params: dict):
    """The newest unfinished run of this script with the same parameters (to resume), or a new one."""
    for run in reversed(list_runs(args.runs, notebook="train_toy_e4t")):
        if run.config["params"] == params and not run.finished:
            print(f"resuming {run.path}")
            return run
    return new_run("train_toy_e4t", params, out_dir=args.runs, method="e4t")


def main(argv: list[str] | None = None) -> Path | None:
    """Train (or resume) and write the artifact; returns the output folder, ``None`` after ``--stop-after``."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    params = {k: v for k, v in vars(args).items() if k not in ("runs", "out", "cache", "stop_after")}
    run = find_run(args, params)
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    config = E4TConfig(clip_dir=str(TOY_CLIP_DIR), scale=args.scale, rank=args.rank, alpha=float(args.rank),
                       offset_l2=args.offset_l2, weight_l2=args.weight_l2, latent_branch=args.latent_branch)
    method = E4T(pipe, config, seed=args.seed)
    latents, features, captions, prep_s = domain_cache(pipe, method, args)
    print(f"domain: {args.people} people x {args.photos} photos, latents {tuple(latents.shape)}, "
          f"features {tuple(features.shape)} ({prep_s:.0f} s)")

    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, lr_warmup_steps=args.warmup, lr_scheduler="cosine",
                      resolution=image_size(args.model))
    params_list = method.trainable_parameters()
    optimizer = method.make_optimizer(cfg)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup, num_training_steps=args.steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    done = list_checkpoints(run)
    start = load_checkpoint(method, done[-1], optimizer, lr_scheduler, scaler) if done else 0
    earlier_s = 0.0
    if done:
        earlier_s = float(json.loads((done[-1] / "state.json").read_text())["train_s"])
        print(f"resumed at step {start} ({earlier_s:.0f} s trained before)")
    run.truncate_series(start)
    num_timesteps = method.noise_scheduler.config.num_train_timesteps
    began = time.perf_counter()
    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, desc="e4t pretraining")
    for step in bar:
        g = _generator(args.seed, 2, step)
        # a leave-one-out batch: the vector from one photo of a person, the loss on another photo of theirs
        person, target, refs = leave_one_out(g, args.people, args.photos, args.batch, refs=1)
        caps = [captions[p][t] for p, t in zip(person.tolist(), target.tolist())]
        drop = torch.rand(args.batch, generator=g) < config.uncond_prob  # the empty prompt, for guidance
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        x0 = latents[person, target]
        noise = torch.randn(x0.shape, generator=g)
        timesteps = torch.randint(0, num_timesteps, (args.batch,), generator=g)
        batch = Batch(x0, caps, noise, timesteps, step, 0)
        # loss: denoising + the offset's and weight offsets' L2 penalties
        optimizer.zero_grad(set_to_none=True)
        ref = (person, refs[:, 0])
        loss, parts = method.domain_loss(batch, features[ref], latents[ref] if config.latent_branch else None)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {loss.item()} at step {step}: lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_list, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        run.log_series("loss", step, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0], **parts)
        bar.set_postfix(loss=f"{parts['diffusion']:.4f}", offset=f"{parts['offset_norm']:.3f}")
        if step == args.steps or step % args.checkpoint_every == 0:
            save_checkpoint(run, method, step, optimizer, lr_scheduler, scaler, cfg,
                            train_s=earlier_s + time.perf_counter() - began)
        if args.stop_after is not None and step >= args.stop_after:
            return None
    train_s = earlier_s + time.perf_counter() - began

    # the shipped artifact: the newest checkpoint's weights file, and the recipe
    out = repo_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    final = list_checkpoints(run)[-1]
    atomic_write(out / WEIGHTS_NAME, (final / WEIGHTS_NAME).read_bytes())
    series = run.metrics.get("series", {}).get("loss", [])
    windows = [series[i:i + 100] for i in range(0, len(series), 100)]
    curve = [{"steps": f"{w[0]['step']}-{w[-1]['step']}", "diffusion": round(sum(p["diffusion"] for p in w) / len(w), 5),
              "offset_norm": round(sum(p["offset_norm"] for p in w) / len(w), 4)} for w in windows if w]
    atomic_write_json(out / "training.json", {
        "method": "E4T domain pretraining (nbutils.e4t, scripts/train_toy_e4t.py)",
        "model": _relative(args.model), "e4t_config": {**asdict(config), "clip_dir": _relative(config.clip_dir)},
        "recipe": {**params, "model": _relative(args.model), "optimizer": "AdamW", "weight_decay": cfg.weight_decay, "lr_scheduler": "cosine",
                   "max_grad_norm": cfg.max_grad_norm, "prediction": "v_prediction", "threads": 1},
        "seconds": {"domain_render_encode": round(prep_s, 1), "train": round(train_s, 1),
                    "train_per_step": round(train_s / max(1, args.steps), 3)},
        "loss_per_100_steps": curve, "run": str(run.path), "trainable_params": sum(p.numel() for p in params_list),
    })
    run.finish()
    print(f"wrote {out / WEIGHTS_NAME} ({(out / WEIGHTS_NAME).stat().st_size:,} bytes), training {train_s:.0f} s")
    return out


if __name__ == "__main__":
    main()
