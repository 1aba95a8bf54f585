"""Pretrain an IP-Adapter for the toy tier on the toy world's domain (``nbutils.domain``), leave-one-out.

    python scripts/train_toy_ip_adapter.py            # about 30 minutes at 1 thread on the project's 2-core CPU

The toy world holds 810 identities; by default every one but the two subjects' (808) is a person of the domain.

Stages, under the work folder (default ``~/.cache/portrait-studio/ip-adapter-train``), each resumable:

1. ``data``    render ``--people`` distinct people x ``--photos`` photos (``domain.render_domain``), cache their VAE
               latents (``nbutils.train.encode_latents``), toy-CLIP image embeddings (``ImageEncoder.toy``) and the
               text tower's states of every caption (``{S}`` -> ``"a person"``);
2. ``adapter`` train the image projection and every layer's ``W'_k``, ``W'_v`` on the frozen toy UNet: each row
               predicts one photo of a person (v-prediction loss, ``nbutils.train.diffusion_loss``) from its caption
               and *another* photo of the same person (``domain.leave_one_out``, 1 reference); images dropped to the
               zero embedding and captions to ``""`` at ``--drop`` each (and both together), for guidance;
3. ``pool``    the adapter frozen, train the ``SelfAttentionPool`` aggregator on ``--pool-refs`` other photos;
4. ``save``    ``--out`` (``data/models/toy-encoders/ip-adapter``): ``ip_adapter.safetensors`` (the published
               format, ``pipe.load_ip_adapter`` reads it), ``aggregator.safetensors`` and ``training.json`` (the
               recipe, the seconds of every stage, the loss at the start and end of each training).

AdamW, linear warm-up then cosine decay; every draw comes from a generator seeded by ``(seed, stage, step)``, so a
resumed stage continues exactly. Checkpoints (``<stage>-step-<k>.safetensors`` + ``.json``, written atomically)
every ``--ckpt-every`` steps; the newest complete one is resumed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nbutils import domain, toyworld  # noqa: E402
from nbutils import ip_adapter as ipa  # noqa: E402
from nbutils.models import load_pipeline  # noqa: E402
from nbutils.runs import atomic_write, atomic_write_json  # noqa: E402
from nbutils.text import encode_captions  # noqa: E402
from nbutils.toyworld import SUBJECTS  # noqa: E402
from nbutils.train import Batch, diffusion_loss, encode_latents  # noqa: E402

DEFAULT_WORK = Path(os.environ.get("PORTRAIT_STUDIO_CACHE", Path.home() / ".cache" / "portrait-studio")) / \
    "ip-adapter-train"
DEFAULT_OUT = REPO / "data" / "models" / "toy-encoders" / "ip-adapter"
SUBJECT_PHRASE = "a person"  # the text names nobody: the image carries who
MAX_PEOPLE = math.prod(len(v) for v in (toyworld.FACE_SHAPES, toyworld.SKIN_TONES, toyworld.HAIR_COLOURS,
                                        toyworld.HAIR_STYLES, toyworld.ACCESSORIES, toyworld.MARKS)) - len(SUBJECTS)


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from ``key`` (``(seed, stage, step)``)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


# --------------------------------------------------------------------------------------------------- data
def stage_data(work: Path, pipe, args) -> dict[str, torch.Tensor]:
    """``latents`` (P*K, 4, 16, 16), ``image_embeds`` (P*K, 64), ``caption_ids`` (P*K,) int64 rows of ``text``
    (U, 77, 64), the last row the empty caption; row ``p * K + k`` is photo k of person p. Cached in ``work``."""
    path = work / f"data-{args.seed}-{args.people}x{args.photos}.safetensors"
    if path.is_file():
        return load_file(path)
    began = time.perf_counter()
    dom = domain.render_domain(args.seed, args.people, args.photos)
    images = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in dom.images.flatten(0, 1)]
    captions = [c.replace(domain.PLACEHOLDER, SUBJECT_PHRASE) for row in dom.captions for c in row]
    unique = sorted(set(captions)) + [""]
    with torch.no_grad():
        latents = encode_latents(pipe, images, 64, batch_size=64).cpu()
        embeds = ipa.ImageEncoder.toy()(images)
        text = torch.cat([encode_captions(pipe, unique[i:i + 64]) for i in range(0, len(unique), 64)]).cpu()
    data = {"latents": latents, "image_embeds": embeds, "text": text,
            "caption_ids": torch.tensor([unique.index(c) for c in captions])}
    atomic_write(path, save({k: v.contiguous() for k, v in data.items()}))
    atomic_write_json(path.with_suffix(".json"), {"data_s": round(time.perf_counter() - began, 1)})
    return data


# --------------------------------------------------------------------------------------------------- checkpoints
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step <= warmup:
        return peak * step / max(1, warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def save_ckpt(work: Path, stage: str, step: int, params: list[torch.nn.Parameter], opt, info: dict) -> None:
    """``<stage>-step-<step>.safetensors`` (parameters ``p.<i>``, AdamW moments ``m.<i>.<name>``) then its
    ``.json`` (written last: a checkpoint counts only with it); older checkpoints of the stage are removed."""
    tensors = {f"p.{i}": p.detach().contiguous() for i, p in enumerate(params)}
    for i, s in opt.state_dict()["state"].items():
        tensors.update({f"m.{i}.{k}": v.contiguous() for k, v in s.items() if torch.is_tensor(v)})
    base = work / f"{stage}-step-{step}"
    atomic_write(base.with_suffix(".safetensors"), save(tensors))
    atomic_write_json(base.with_suffix(".json"), {"step": step, **info})
    for old in work.glob(f"{stage}-step-*.json"):
        if old != base.with_suffix(".json"):
            old.unlink()
            old.with_suffix(".safetensors").unlink(missing_ok=True)


def load_newest(work: Path, stage: str, params: list[torch.nn.Parameter], opt) -> dict | None:
    """Load the newest complete checkpoint of ``stage`` into ``params`` and ``opt``; its JSON, or ``None``."""
    found = sorted(work.glob(f"{stage}-step-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if not found:
        return None
    info = json.loads(found[-1].read_text())
    tensors = load_file(found[-1].with_suffix(".safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"p.{i}"])
    state = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("m."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    return info


# --------------------------------------------------------------------------------------------------- training
def train_stage(stage: str, key: int, work: Path, pipe, data, params, embed_rows, args, steps: int, refs: int,
                drop_image: bool) -> dict:
    """One training stage; ``embed_rows(person, refs)`` -> (B, D) aggregated reference embeddings. Returns the
    stage's record: steps, seconds (summed over resumed sessions), mean loss of the first and last 100 steps."""
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    info = load_newest(work, stage, params, opt) or {"step": 0, "train_s": 0.0, "losses": []}
    start, spent, losses = info["step"], info["train_s"], info["losses"]
    if start >= steps:
        return {"steps": steps, "train_s": round(spent, 1), **loss_summary(losses)}
    began = time.perf_counter()
    K, B = args.photos, args.batch
    empty = len(data["text"]) - 1
    bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=stage, mininterval=10)
    for step in bar:
        g = generator(args.seed, key, step)
        # a person, one photo to predict, and `refs` other photos of theirs as the references
        person, target, ref = domain.leave_one_out(g, args.people, K, B, refs)
        latents = data["latents"][person * K + target]
        embeds = embed_rows(data["image_embeds"][person[:, None] * K + ref])  # (B, D)
        # drop the image (zero embedding), the caption (""), or both, for classifier-free guidance
        r = torch.rand(B, generator=g)
        no_image = (r < args.drop) | (r >= 1 - args.drop) if drop_image else torch.zeros(B, dtype=torch.bool)
        no_text = ((r >= args.drop) & (r < 2 * args.drop)) | (r >= 1 - args.drop)
        embeds = torch.where(no_image[:, None], torch.zeros_like(embeds), embeds)
        text = data["text"][torch.where(no_text, empty, data["caption_ids"][person * K + target])]
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g)
        batch = Batch(latents, [""] * B, noise, timesteps, step)
        # the denoising loss through the adapter; only `params` get gradients
        loss = diffusion_loss(ipa.WithImagePrompt(pipe.unet, embeds), sched, batch, text)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            print(f"{stage} step {step}: loss {np.mean(losses[-50:]):.4f} (mean of 50), "
                  f"{time.perf_counter() - began:.0f} s this session", flush=True)
        if step % args.ckpt_every == 0 or step == steps:
            save_ckpt(work, stage, step, params, opt,
                      {"train_s": spent + time.perf_counter() - began, "losses": losses})
        if args.stop_after and step - start >= args.stop_after:
            break
    spent += time.perf_counter() - began
    return {"steps": steps, "train_s": round(spent, 1), **loss_summary(losses)}


def loss_summary(losses: list[float]) -> dict:
    return {"loss_first_100": float(np.mean(losses[:100])) if losses else None,
            "loss_last_100": float(np.mean(losses[-100:])) if losses else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--people", type=int, default=MAX_PEOPLE, help=f"at most {MAX_PEOPLE}: every identity but the subjects'")
    ap.add_argument("--photos", type=int, default=8, help="photos per person")
    ap.add_argument("--pool-refs", type=int, default=5, help="references per row in stage 3 (the subject has 5)")
    ap.add_argument("--adapter-steps", type=int, default=2500)
    ap.add_argument("--pool-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--drop", type=float, default=0.05, help="share of rows without image (and without caption)")
    ap.add_argument("--scale", type=float, default=1.0, help="lambda during training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--stop-after", type=int, default=0, help="leave each stage after N steps (timing pilots)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0 < args.people <= MAX_PEOPLE:  # domain_identities would search forever for more
        ap.error(f"--people must be 1..{MAX_PEOPLE}: the toy world has {MAX_PEOPLE + len(SUBJECTS)} identities and "
                 "the subjects' are held out")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    t0, seconds = time.time(), {}
    pipe = load_pipeline("toy", device="cpu")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()

    data = stage_data(args.work, pipe, args)
    seconds["data_s"] = json.loads((args.work / f"data-{args.seed}-{args.people}x{args.photos}.json").read_text())["data_s"]
    dim = data["image_embeds"].shape[1]
    ipa.install_ip_adapter(pipe.unet, dim, scale=args.scale, seed=args.seed)
    adapter = ipa.ip_adapter_parameters(pipe.unet)
    for p in adapter:
        p.requires_grad_(True)
    record = {"adapter": train_stage("adapter", 1, args.work, pipe, data, adapter, lambda e: e[:, 0], args,
                                     args.adapter_steps, 1, drop_image=True)}
    if args.stop_after and record["adapter"]["loss_last_100"] is not None and \
            not (args.work / f"adapter-step-{args.adapter_steps}.json").is_file():
        print(json.dumps(record, indent=2))
        return 0
    for p in adapter:
        p.requires_grad_(False)
    pool = ipa.SelfAttentionPool(dim, seed=args.seed)
    record["pool"] = train_stage("pool", 2, args.work, pipe, data, list(pool.parameters()), pool, args,
                                 args.pool_steps, args.pool_refs, drop_image=False)
    if args.stop_after and not (args.work / f"pool-step-{args.pool_steps}.json").is_file():
        print(json.dumps(record, indent=2))
        return 0
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("work", "out", "threads", "stop_after")}
    info = {"trained_by": "scripts/train_toy_ip_adapter.py", "recipe": recipe, "stages": record,
            "image_encoder": "data/models/toy-clip (get_image_features, 64-d)", "num_tokens": ipa.NUM_TOKENS,
            "trainable": {"adapter": sum(p.numel() for p in adapter), "pool": sum(p.numel() for p in pool.parameters())},
            "seconds_this_session": round(time.time() - t0, 1), **seconds, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    ipa.save_ip_adapter(pipe.unet, args.out, aggregator=pool, metadata={"recipe": recipe})
    atomic_write_json(args.out / "training.json", info)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
