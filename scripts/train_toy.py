"""Train the toy tier from scratch on the procedural portrait world (``make toy-model``).

Stages, each checkpointed under the work folder (default ``~/.cache/portrait-studio/toy-train``) and skipped when
its output exists, so an interrupted run resumes where it stopped:

1. ``data``     render the pretraining set (identities without the held-out traits) at 64 px;
2. ``vae``      train the KL autoencoder on random 32 px crops (it is fully convolutional);
3. ``latents``  encode the set once with the frozen VAE;
4. ``unet``     train the UNet under the frozen text tower of the toy CLIP (v-prediction MSE on a zero-terminal-SNR
                schedule, 10 % empty captions for guidance, EMA), as SD1.5 trains under OpenAI's frozen CLIP;
5. ``save``     write the ``StableDiffusionPipeline`` folder ``data/models/toy-sd`` (safetensors).

The toy CLIP, the other toy evaluators and the toy subject are made first by ``scripts/train_toy_evaluators.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from nbutils import toy_model, toyworld
from nbutils.clip_bpe import clip_tokenizer
from nbutils.toy_evaluators import TOY_CLIP_DIR
from nbutils.train import Batch, diffusion_loss

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(os.environ.get("PORTRAIT_STUDIO_CACHE", Path.home() / ".cache" / "portrait-studio")) / "toy-train"


def _render(p: toyworld.Portrait) -> np.ndarray:
    return np.asarray(toyworld.render(p, toy_model.RESOLUTION))


def world_recipe() -> dict:
    """What the pretraining renders depend on besides the seed: the unnamed trait values and how often they appear."""
    return {"unnamed": toyworld.UNNAMED, "unnamed_rates": toyworld.UNNAMED_RATES, "subjects": {
        name: asdict(ident) for name, ident in toyworld.SUBJECTS.items()}}


def stage_data(work: Path, n: int, seed: int) -> None:
    """Render ``n`` pretraining portraits (``toyworld.pretraining_portraits``: the unnamed traits on other people,
    never a subject): ``images.npy`` (n, 64, 64, 3) uint8 and ``portraits.json``."""
    world = work / "world.json"
    if (work / "images.npy").exists():
        if not world.exists() or json.loads(world.read_text()) != world_recipe():
            raise RuntimeError(
                f"The renders in {work} were drawn from another version of the pretraining world than "
                f"nbutils.toyworld's (recorded in {world.name}, or not recorded at all). Train into a new --work "
                "folder, or delete that folder's contents to start over."
            )
        return
    world.write_text(json.dumps(world_recipe(), indent=1))
    ps = list(toyworld.pretraining_portraits(seed, n))
    with Pool(os.cpu_count()) as pool:
        imgs = list(tqdm(pool.imap(_render, ps, chunksize=64), total=n, desc="render"))
    np.save(work / "images.tmp.npy", np.stack(imgs))
    (work / "portraits.json").write_text(json.dumps([toyworld.to_dict(p) for p in ps]))
    os.replace(work / "images.tmp.npy", work / "images.npy")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; a previous ``out`` is kept as ``out.old`` until then."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def colour_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colours outside the world's palette for ``(B, 3, H, W)`` in [-1, 1]: half the images get their RGB channels
    permuted, every image a random gain of 0.75-1.25 per channel, so the autoencoder learns a general colour code
    instead of the palette's few values (and reconstructs hair and marks it rarely or never saw)."""
    b = len(x)
    perms = torch.stack([torch.randperm(3, generator=g) for _ in range(b)])
    keep = torch.rand(b, generator=g) < 0.5
    perms[keep] = torch.arange(3)
    x = x.gather(1, perms[:, :, None, None].expand_as(x).to(x.device))
    gain = (0.75 + 0.5 * torch.rand(b, 3, 1, 1, generator=g)).to(x.device)
    return ((x + 1) * gain - 1).clamp(-1, 1)


def stage_vae(work: Path, steps: int, batch: int, seed: int, device: torch.device, ckpt_every: int = 250,
              stop_after: int | None = None) -> None:
    """Train the VAE (MSE + L1 + 1e-6 KL) on random 32 px crops with ``colour_jitter``, AdamW at 1e-3 with 5 %
    warm-up and cosine decay; checkpoint and resume under ``work/vae-ckpt`` (the batch of step k is the same after
    a resume); report full-image PSNR on held-out renders. ``stop_after``: leave after that many steps, as an
    interruption would (for tests)."""
    out = work / "vae.safetensors"
    if out.exists():
        return
    torch.manual_seed(seed)
    images = np.load(work / "images.npy", mmap_mode="r")
    vae = toy_model.toy_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt = work / "vae-ckpt"
    start = _load_vae_ckpt(ckpt, vae, opt) if ckpt.exists() else 0
    warm = max(1, steps // 20)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="vae")
    for step in bar:
        rng = np.random.default_rng([seed, step])
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = np.sort(rng.choice(len(images) - 256, batch, replace=False))
        y, x = rng.integers(0, 64 - 32 + 1, 2)
        crop = colour_jitter(_to_tensor(np.ascontiguousarray(images[idx, y : y + 32, x : x + 32])).to(device), g)
        post = vae.encode(crop).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, crop) + F.l1_loss(rec, crop) + 1e-6 * post.kl().mean()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min((step + 1) / warm, 0.5 * (1 + math.cos(math.pi * step / steps)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 in (steps, stop_after):
            _save_vae_ckpt(ckpt, step + 1, vae, opt)
        if step + 1 == stop_after:
            return
    vae.eval()
    with torch.no_grad():
        held = _to_tensor(np.ascontiguousarray(images[-256:])).to(device)
        lat = vae.encode(held).latent_dist.mean
        rec = vae.decode(lat).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (held + 1) / 2).item()
    scaling = 1.0 / lat.std().item()
    vae.register_to_config(scaling_factor=scaling)
    save_file(vae.cpu().state_dict(), out)
    (work / "vae.json").write_text(json.dumps({"psnr_db": -10 * math.log10(mse), "scaling_factor": scaling}))
    print(f"VAE held-out PSNR {-10 * math.log10(mse):.1f} dB, scaling factor {scaling:.3f}")


def load_vae(work: Path):
    vae = toy_model.toy_vae()
    vae.load_state_dict(load_file(work / "vae.safetensors"))
    vae.register_to_config(scaling_factor=json.loads((work / "vae.json").read_text())["scaling_factor"])
    return vae.eval().requires_grad_(False)


def stage_latents(work: Path, device: torch.device) -> None:
    """Encode every image once: ``latents.safetensors`` (n, 4, 16, 16), already times the scaling factor."""
    out = work / "latents.safetensors"
    if out.exists():
        return
    vae = load_vae(work).to(device)
    images = np.load(work / "images.npy", mmap_mode="r")
    chunks = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 256), desc="encode"):
            x = _to_tensor(np.ascontiguousarray(images[i : i + 256])).to(device)
            chunks.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).cpu())
    save_file({"latents": torch.cat(chunks).contiguous()}, out)


def _portrait(d: dict) -> toyworld.Portrait:
    ident = toyworld.Identity(**{k: d[k] for k in toyworld.IDENTITY_FIELDS})
    rest = {k: v for k, v in d.items() if k not in toyworld.IDENTITY_FIELDS}
    return toyworld.Portrait(identity=ident, **rest)


def _save_optimizer(opt, path: Path) -> None:
    state = opt.state_dict()
    tensors = {f"{k}.{name}": v.contiguous() for k, s in state["state"].items() for name, v in s.items() if torch.is_tensor(v)}
    save_file(tensors, path)


def _load_optimizer(opt, path: Path) -> None:
    state = opt.state_dict()
    for key, v in load_file(path).items():
        k, name = key.split(".", 1)
        state["state"].setdefault(int(k), {})[name] = v
    opt.load_state_dict(state)


def _save_vae_ckpt(path: Path, step: int, vae, opt) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), tmp / "vae.safetensors")
    _save_optimizer(opt, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    replace_dir(tmp, path)


def _load_vae_ckpt(path: Path, vae, opt) -> int:
    vae.load_state_dict(load_file(path / "vae.safetensors"))
    _load_optimizer(opt, path / "optimizer.safetensors")
    return json.loads((path / "state.json").read_text())["step"]


def _save_unet_ckpt(path: Path, step: int, unet, ema_unet, opt) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(unet.state_dict(), tmp / "unet.safetensors")
    save_file({f"{i}": p.detach().contiguous() for i, p in enumerate(ema_unet.shadow_params)}, tmp / "ema_unet.safetensors")
    _save_optimizer(opt, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "ema_step": ema_unet.optimization_step}))
    replace_dir(tmp, path)


def _load_unet_ckpt(path: Path, unet, ema_unet, opt) -> int:
    unet.load_state_dict(load_file(path / "unet.safetensors"))
    saved = load_file(path / "ema_unet.safetensors")
    ema_unet.shadow_params = [saved[f"{i}"].to(old.device) for i, old in enumerate(ema_unet.shadow_params)]
    meta = json.loads((path / "state.json").read_text())
    ema_unet.optimization_step = meta["ema_step"]
    _load_optimizer(opt, path / "optimizer.safetensors")
    return meta["step"]


def unet_recipe() -> dict:
    """What a UNet checkpoint is valid for: the UNet's and the training noise schedule's configurations (as JSON)."""
    configs = {"unet": toy_model.toy_unet().config, "schedule": toy_model.train_scheduler().config}
    public = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in configs.items()}
    return json.loads(json.dumps(public | {"world": world_recipe()}))  # tuples become lists, as in the recorded file


def _check_unet_recipe(work: Path) -> None:
    """Record the recipe in ``work/unet-recipe.json``; refuse a folder whose UNet was trained under another one (a
    checkpoint of another model or schedule would otherwise be resumed, or its final weights saved, silently)."""
    path, recipe = work / "unet-recipe.json", unet_recipe()
    trained = any((work / name).exists() for name in ("unet-ckpt", "unet-final"))
    if trained and (not path.exists() or json.loads(path.read_text()) != recipe):
        raise RuntimeError(
            f"The UNet in {work} was trained under another model or noise schedule than nbutils.toy_model's "
            f"(recorded in {path.name}, or not recorded at all). Train into a new --work folder, or delete the "
            "unet-ckpt, unet-final and unet-* files there to start the UNet stage over; the rendered data and the "
            "autoencoder can stay."
        )
    if not path.exists():
        path.write_text(json.dumps(recipe, indent=1))


def stage_unet(work: Path, steps: int, batch: int, seed: int, lr: float = 1e-3, ckpt_every: int = 200,
               stop_after: int | None = None, device: torch.device = torch.device("cpu"),
               clip: Path | None = TOY_CLIP_DIR) -> None:
    """Train the UNet from scratch on the cached latents; checkpoint and resume under ``work/unet-ckpt``.

    ``clip``: the CLIP folder whose frozen text tower conditions the UNet (``None``: random, for tests).
    ``stop_after``: leave after that many steps with a checkpoint, as an interruption would (for tests).
    """
    _check_unet_recipe(work)
    done = work / "unet-final"
    if done.exists():
        return
    torch.manual_seed(seed)
    latents = load_file(work / "latents.safetensors")["latents"].to(device)
    portraits = [_portrait(d) for d in json.loads((work / "portraits.json").read_text())]
    tok = clip_tokenizer()
    unet = toy_model.toy_unet().to(device)
    te = toy_model.toy_text_encoder(clip).to(device).eval().requires_grad_(False)
    noise_sched = toy_model.train_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema_unet = EMAModel(unet.parameters(), decay=0.999)
    ckpt = work / "unet-ckpt"
    start = _load_unet_ckpt(ckpt, unet, ema_unet, opt) if ckpt.exists() else 0

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / 200)
        return lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))

    log = open(work / "unet-loss.jsonl", "a")
    pending: list[torch.Tensor] = []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="unet")
    for step in bar:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the batch of step k is the same after a resume
        rng = random.Random(seed * 1_000_003 + step)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        captions = ["" if rng.random() < 0.1 else toyworld.caption_variants(portraits[i], rng, name_unnamed=False)
                    for i in idx.tolist()]
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        x0 = latents[idx.to(device)]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g).to(device)
        with torch.no_grad():
            states = te(ids.to(device))[0]
        loss = diffusion_loss(unet, noise_sched, Batch(x0, captions, noise, t), states)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema_unet.step(unet.parameters())
        pending.append(loss.detach())
        if len(pending) == 10 or (step + 1) % ckpt_every == 0 or step + 1 in (steps, stop_after):
            values = torch.stack(pending).tolist()  # one wait for the device per 10 steps, not one per step
            log.writelines(json.dumps({"step": step + 2 - len(values) + k, "loss": v}) + "\n" for k, v in enumerate(values))
            bar.set_postfix(loss=f"{values[-1]:.4f}")
            pending.clear()
        if (step + 1) % ckpt_every == 0 or step + 1 in (steps, stop_after):
            log.flush()
            _save_unet_ckpt(ckpt, step + 1, unet, ema_unet, opt)
        if step + 1 == stop_after:
            log.close()
            return
    log.close()
    ema_unet.copy_to(unet.parameters())
    tmp = work / "unet-final.tmp"
    tmp.mkdir(exist_ok=True)
    save_file(unet.cpu().state_dict(), tmp / "unet.safetensors")
    save_file(te.cpu().state_dict(), tmp / "text_encoder.safetensors")
    os.replace(tmp, done)


def stage_save(work: Path, out: Path, recipe: dict) -> None:
    """Assemble and save the ``StableDiffusionPipeline`` folder (safetensors) at ``out``."""
    unet, te = toy_model.toy_unet(), toy_model.toy_text_encoder()
    unet.load_state_dict(load_file(work / "unet-final" / "unet.safetensors"))
    te.load_state_dict(load_file(work / "unet-final" / "text_encoder.safetensors"))
    pipe = StableDiffusionPipeline(
        vae=load_vae(work), text_encoder=te, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=toy_model.sample_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    losses = [json.loads(line)["loss"] for line in (work / "unet-loss.jsonl").read_text().splitlines()[-100:]]
    info = {"trained_by": "scripts/train_toy.py", "recipe": recipe, "vae": json.loads((work / "vae.json").read_text()),
            "unet_final_loss_mean_last_100_steps": float(np.mean(losses)), "torch": torch.__version__}
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    replace_dir(tmp, out)
    print(f"saved {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=REPO / "data" / "models" / "toy-sd")
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads; 1 is much faster when other jobs share the cores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in vars(args).items() if k not in ("work", "out", "threads")}
    if device.type == "cuda":
        recipe["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.time()
    for name, fn in [
        ("data", lambda: stage_data(args.work, args.images, args.seed)),
        ("vae", lambda: stage_vae(args.work, args.vae_steps, args.vae_batch, args.seed, device)),
        ("latents", lambda: stage_latents(args.work, device)),
        ("unet", lambda: stage_unet(args.work, args.unet_steps, args.batch, args.seed, args.lr, device=device)),
        ("save", lambda: stage_save(args.work, args.out, {**recipe, "seconds_this_run": round(time.time() - t0)})),
    ]:
        t = time.time()
        fn()
        print(f"stage {name}: {time.time() - t:.0f} s (total {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
