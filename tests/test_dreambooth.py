"""DreamBooth on the tiny random pipeline: the prior-preservation loss, saving, resuming."""
from __future__ import annotations

import errno
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from nbutils.class_images import class_latents, ensure_class_images
from nbutils.dreambooth import DreamBooth, default_config, save_pipeline
from nbutils.models import build_tiny_pipeline, load_pipeline
from nbutils.prompts import CLASS_PROMPT
from nbutils.runs import new_run
from nbutils.sampling import generate
from nbutils.text import tokenize
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, diffusion_loss, encode_latents, list_checkpoints, make_batch, train

GEN = dict(steps=2, guidance_scale=4.0)  # class-image sampling on the tiny tier


@pytest.fixture(scope="module")
def dataset():
    people = portraits(0, 3, identity=TOY_SUBJECT)
    return [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(people)]


@pytest.fixture(scope="module")
def class_set(tmp_path_factory):
    return ensure_class_images(build_tiny_pipeline(0), 4, model="tiny", cache_dir=tmp_path_factory.mktemp("cls"), **GEN)


def tiny_cfg(steps: int, **changes) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": 2, "lr": 1e-3, "resolution": 32, **changes})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


# --------------------------------------------------------------------------------------------------- the loss
def test_prior_term_is_the_denoising_loss_on_class_latents(dataset, class_set):
    pipe = build_tiny_pipeline(0)
    cfg = tiny_cfg(2, seed=5)
    captions = [c for _, c in dataset]
    latents = encode_latents(pipe, [im for im, _ in dataset], 32)
    batch = make_batch(latents, captions, cfg, 1, 0, 1000)
    weighted = DreamBooth(pipe, class_set, prior_loss_weight=0.5)
    plain = DreamBooth(pipe, class_set, prior_loss_weight=0)
    for method in (weighted, plain):
        method.prepare(cfg)
    assert plain.class_latents is None  # lambda = 0: no class data is even loaded

    prior = weighted.class_batch(batch)
    with torch.no_grad():
        encode = lambda texts: pipe.text_encoder(tokenize(pipe.tokenizer, texts)).last_hidden_state  # noqa: E731
        instance = diffusion_loss(pipe.unet, weighted.noise_scheduler, batch, encode(batch.captions))
        class_term = diffusion_loss(pipe.unet, weighted.noise_scheduler, prior, encode([CLASS_PROMPT] * 2))
        assert torch.equal(plain.loss(batch), instance)  # lambda = 0 is plain fine-tuning's loss
        torch.testing.assert_close(weighted.loss(batch), instance + 0.5 * class_term)
    assert class_term > 0.1 and abs(weighted.loss(batch).item() - instance.item()) > 0.05

    def unet_grads(loss: torch.Tensor) -> torch.Tensor:
        pipe.unet.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in pipe.unet.parameters()])

    one_call = unet_grads(weighted.loss(batch))  # the UNet on instance + class latents concatenated
    two_calls = unet_grads(diffusion_loss(pipe.unet, weighted.noise_scheduler, batch, encode(batch.captions))
                           + 0.5 * diffusion_loss(pipe.unet, weighted.noise_scheduler, prior, encode([CLASS_PROMPT] * 2)))
    assert ((one_call - two_calls).norm() / two_calls.norm()).item() < 1e-5 and two_calls.norm() > 0

    cached = class_latents(pipe, class_set, 32)
    assert prior.latents.shape == (2, 4, 4, 4) and prior.captions == [CLASS_PROMPT] * 2
    assert all(any(torch.equal(row, c) for c in cached) for row in prior.latents)  # real class latents
    assert not any(torch.equal(row, x) for row in prior.latents for x in latents)
    assert not torch.equal(prior.noise, batch.noise)  # its own noise stream
    assert torch.equal(weighted.class_batch(batch).noise, prior.noise)  # a pure function of (seed, step, micro)
    later = make_batch(latents, captions, cfg, 2, 0, 1000)
    assert not torch.equal(weighted.class_batch(later).noise, prior.noise)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tmp_run_dir, dataset):
    # a fresh cache: the first run encodes the class latents, the resumed one reads them from the cache
    class_set = ensure_class_images(build_tiny_pipeline(0), 4, model="tiny", cache_dir=tmp_path, **GEN)
    cfg = tiny_cfg(4, checkpoint_every=2)
    straight = DreamBooth(build_tiny_pipeline(0), class_set)
    full = train(straight, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))

    class Interrupt(Exception):
        pass

    def stop_at_2(step, method, run):
        if step == 2:
            raise Interrupt

    run = new_run("t", {}, out_dir=tmp_run_dir)
    with pytest.raises(Interrupt):
        train(DreamBooth(build_tiny_pipeline(0), class_set), dataset, cfg, run, callbacks=[stop_at_2])
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    resumed_method = DreamBooth(build_tiny_pipeline(0), class_set)
    resumed = train(resumed_method, dataset, cfg, run)

    assert (resumed.start_step, resumed.losses) == (2, full.losses[2:])
    assert same(state(straight.pipe.unet), state(resumed_method.pipe.unet))
    assert not same(state(straight.pipe.unet), state(build_tiny_pipeline(0).unet))
    saved = load_file(resumed.checkpoint / "dreambooth.safetensors")
    assert saved.keys() == {f"unet.{k}" for k in straight.pipe.unet.state_dict()}

    plain = train(DreamBooth(build_tiny_pipeline(0), prior_loss_weight=0), dataset, tiny_cfg(1),
                  new_run("t", {}, out_dir=tmp_run_dir))
    assert plain.losses[0] < full.losses[0] - 0.05  # same first batch and weights: the prior term adds to it


def test_only_the_unet_trains_and_the_saved_pipeline_reloads_with_identical_outputs(tmp_path, tmp_run_dir, dataset,
                                                                                  class_set):
    method = DreamBooth(build_tiny_pipeline(0), class_set)
    pipe = method.pipe
    before = {name: state(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
    train(method, dataset, tiny_cfg(2, lr=1e-2), new_run("t", {}, out_dir=tmp_run_dir))
    assert not same(before["unet"], state(pipe.unet))
    assert same(before["vae"], state(pipe.vae)) and same(before["text_encoder"], state(pipe.text_encoder))

    folder = save_pipeline(pipe, tmp_path / "model")
    reloaded = load_pipeline(str(folder), device="cpu")
    assert same(state(pipe.unet), state(reloaded.unet))
    prompts, seeds = ["a photo of sks person", "a watercolor painting of sks person"], [3, 4]
    trained_images = generate(pipe, prompts, seeds, **GEN)
    assert np.array_equal(pixels(trained_images), pixels(generate(reloaded, prompts, seeds, **GEN)))
    assert not np.array_equal(pixels(trained_images), pixels(generate(build_tiny_pipeline(0), prompts, seeds, **GEN)))
    with pytest.raises(FileExistsError, match="already exists"):
        save_pipeline(pipe, folder)


def test_replace_swaps_in_a_complete_new_folder_and_keeps_the_old_one_when_writing_fails(tmp_path, monkeypatch):
    folder = save_pipeline(build_tiny_pipeline(0), tmp_path / "model")
    other = build_tiny_pipeline(1)
    assert save_pipeline(other, folder, replace=True) == folder  # a resumed run rewrites its own artifact
    assert same(state(other.unet), state(load_pipeline(str(folder), device="cpu").unet))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or swapped-out sibling left

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="the disk is full"):
        save_pipeline(build_tiny_pipeline(2), folder, replace=True)
    assert same(state(other.unet), state(load_pipeline(str(folder), device="cpu").unet))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_full_disk_while_saving_leaves_no_folder(tmp_path, monkeypatch):
    written = []

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 64)  # half a weights file
        written.append(filename)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # what diffusers' save_pretrained calls
    parent = tmp_path / "artifacts"
    with pytest.raises(OSError, match=r"the disk is full\); nothing was left there.*GB: free space") as err:
        save_pipeline(build_tiny_pipeline(0), parent / "model")
    assert err.value.errno == errno.ENOSPC and written
    assert list(parent.iterdir()) == []  # neither the model folder nor its temporary sibling


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_update(tmp_run_dir, dataset, class_set,
                                                                            monkeypatch):
    plain, checkpointed = (DreamBooth(build_tiny_pipeline(0), class_set, gradient_checkpointing=gc)
                           for gc in (False, True))
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = make_batch(latents, ["a photo of sks person"] * 2, tiny_cfg(1), 1, 0, 1000)
    for method, expected_runs in ((plain, 1), (checkpointed, 2)):  # the backward pass runs the block again
        block, runs = method.pipe.unet.down_blocks[0].resnets[0], []
        forward = block.forward  # wrapped: forward hooks do not fire in the recomputation
        monkeypatch.setattr(block, "forward", lambda *a, **k: runs.append(1) or forward(*a, **k))
        method.instance_loss(batch).backward()
        monkeypatch.undo()
        method.pipe.unet.zero_grad(set_to_none=True)
        assert len(runs) == expected_runs
    for method in (plain, checkpointed):
        train(method, dataset, tiny_cfg(1), new_run("t", {}, out_dir=tmp_run_dir))
    a, b = state(plain.pipe.unet), state(checkpointed.pipe.unet)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_text_encoder_option_trains_and_checkpoints_it(tmp_run_dir, dataset):
    method = DreamBooth(build_tiny_pipeline(0), prior_loss_weight=0, train_text_encoder=True)
    params = method.trainable_parameters()
    assert len(params) == len(list(method.pipe.unet.parameters())) + len(list(method.pipe.text_encoder.parameters()))
    before = state(method.pipe.text_encoder)
    result = train(method, dataset, tiny_cfg(1, lr=1e-2), new_run("t", {}, out_dir=tmp_run_dir))
    assert not same(before, state(method.pipe.text_encoder))
    saved = load_file(result.checkpoint / "dreambooth.safetensors")
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}

    unet_only = {k: v for k, v in saved.items() if k.startswith("unet.")}
    with pytest.raises(ValueError, match=r"no text_encoder weights \(it holds \['unet'\]\).*train_text_encoder"):
        DreamBooth(build_tiny_pipeline(0), prior_loss_weight=0, train_text_encoder=True).load_saved(unet_only)


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_rejected_with_the_fix(dataset, class_set):
    with pytest.raises(ValueError, match=r"needs class images: pass class_images=ensure_class_images"):
        DreamBooth(build_tiny_pipeline(0))
    with pytest.raises(ValueError, match="prior_loss_weight must be 0 or more"):
        DreamBooth(build_tiny_pipeline(0), class_set, prior_loss_weight=-1)
    with pytest.raises(ValueError, match=r"must be float32.*dtype=torch.float32"):
        DreamBooth(build_tiny_pipeline(0).to(dtype=torch.bfloat16), class_set)
    method = DreamBooth(build_tiny_pipeline(0), prior_loss_weight=0)
    captions = ["a photo of sks person", "a photo of a person"]
    batch = make_batch(torch.zeros(2, 4, 4, 4), captions, tiny_cfg(1), 1, 0, 1000)
    with pytest.raises(ValueError, match=r"'a photo of a person' does not name the subject with 'sks'"):
        method.loss(batch)
    method.check_captions(["sks person", "a photo of sks, smiling"])  # whole words pass
    with pytest.raises(ValueError, match="does not name the subject"):
        method.check_captions(["a photo of sksperson"])


def test_eight_bit_adam_is_used_when_importable_and_never_silently_replaced(monkeypatch):
    pipe = build_tiny_pipeline(0)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: `import bitsandbytes` fails
    with pytest.raises(ImportError, match=r"8-bit Adam needs bitsandbytes.*adamw8bit-if-available"):
        DreamBooth(pipe, prior_loss_weight=0, optimizer="adamw8bit")
    with pytest.warns(UserWarning, match="training with torch AdamW instead"):
        fallback = DreamBooth(pipe, prior_loss_weight=0, optimizer="adamw8bit-if-available")
    assert type(fallback.make_optimizer(tiny_cfg(1))) is torch.optim.AdamW

    class AdamW8bit(torch.optim.AdamW):
        pass

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(
        AdamW8bit=AdamW8bit)))
    optimizer = DreamBooth(pipe, prior_loss_weight=0, optimizer="adamw8bit").make_optimizer(tiny_cfg(1, lr=3e-4))
    assert type(optimizer) is AdamW8bit and optimizer.param_groups[0]["lr"] == 3e-4
    with pytest.raises(ValueError, match="optimizer must be 'adamw'"):
        DreamBooth(pipe, prior_loss_weight=0, optimizer="sgd")


def test_defaults_follow_the_tier():
    real, toy, tiny = (default_config(t) for t in ("real", "toy", "tiny"))
    assert (real.steps, real.batch_size, real.lr, real.resolution) == (800, 1, 5e-6, 512)
    assert (toy.resolution, tiny.resolution) == (64, 32) and tiny.steps < toy.steps < real.steps
    assert default_config("toy", quick=True).steps == 30
