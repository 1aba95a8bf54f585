"""The shared training loop on the tiny random pipeline: seeding, learning, checkpoints, resume, divergence."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from nbutils.models import build_tiny_pipeline
from nbutils.runs import new_run
from nbutils.text import tokenize
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import (
    Batch,
    Method,
    TrainConfig,
    TrainingDiverged,
    diffusion_loss,
    encode_latents,
    list_checkpoints,
    load_checkpoint,
    make_batch,
    train,
)


class ShiftMethod(Method):
    """A minimal method: a learned vector added to the text conditioning, plus the UNet's output convolution."""

    name = "shift"

    def __init__(self, pipe, nan_at_call: int | None = None):
        super().__init__(pipe)
        self.shift = torch.nn.Parameter(torch.zeros(pipe.text_encoder.config.hidden_size))
        self.conv_out = pipe.unet.conv_out.requires_grad_(True)
        self.nan_at_call, self.calls = nan_at_call, 0

    def trainable_parameters(self):
        return [self.shift, *self.conv_out.parameters()]

    def encode_prompts(self, captions):
        return self.pipe.text_encoder(tokenize(self.pipe.tokenizer, captions)).last_hidden_state + self.shift

    def loss(self, batch):
        self.calls += 1
        loss = super().loss(batch)
        return loss * float("nan") if self.calls == self.nan_at_call else loss

    def state_dict_to_save(self):
        return {"shift": self.shift.detach(), **{f"conv_out.{k}": v for k, v in self.conv_out.state_dict().items()}}

    def load_saved(self, state):
        with torch.no_grad():
            self.shift.copy_(state["shift"])
            self.conv_out.load_state_dict({k.removeprefix("conv_out."): v for k, v in state.items() if k != "shift"})


def weights(method: Method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.state_dict_to_save().items()}


@pytest.fixture(scope="module")
def dataset():
    people = portraits(0, 3, identity=TOY_SUBJECT)
    return [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(people)]


def test_same_seed_gives_the_same_losses_and_another_seed_does_not(tmp_run_dir, dataset):
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, resolution=32, seed=7)
    runs = [train(ShiftMethod(build_tiny_pipeline(0)), dataset, c, new_run("t", {}, out_dir=tmp_run_dir))
            for c in (cfg, cfg, replace(cfg, seed=8))]
    assert len(runs[0].losses) == 3 and all(l > 0 for l in runs[0].losses)
    assert runs[0].losses == runs[1].losses
    assert runs[0].losses != runs[2].losses


def test_loss_decreases_when_overfitting_one_image(tmp_run_dir, dataset):
    method = ShiftMethod(build_tiny_pipeline(0))
    latents = encode_latents(method.pipe, [dataset[0][0]], 32)
    held_out = make_batch(latents, [dataset[0][1]], TrainConfig(batch_size=32, seed=99), 1, 0, 1000)  # fixed noise
    with torch.no_grad():
        before = method.loss(held_out).item()
    cfg = TrainConfig(steps=20, batch_size=8, lr=3e-2, resolution=32, max_grad_norm=None)
    train(method, dataset[:1], cfg, new_run("t", {}, out_dir=tmp_run_dir))
    with torch.no_grad():
        after = method.loss(held_out).item()
    assert after < 0.75 * before, (before, after)


def test_batches_visit_every_image_once_per_epoch_and_are_reproducible(dataset):
    captions = [c for _, c in dataset]
    latents = torch.zeros(3, 4, 4, 4)
    cfg = TrainConfig(steps=6, batch_size=1, resolution=32, seed=3)
    batches = [make_batch(latents, captions, cfg, step, 0, 1000) for step in range(1, 7)]
    assert sorted(b.captions[0] for b in batches[:3]) == sorted(captions)
    assert sorted(b.captions[0] for b in batches[3:]) == sorted(captions)
    again = make_batch(latents, captions, cfg, 2, 0, 1000)
    assert again.captions == batches[1].captions and torch.equal(again.noise, batches[1].noise)
    assert not torch.equal(batches[0].noise, batches[1].noise)
    assert batches[0].timesteps.dtype == torch.int64 and 0 <= int(batches[0].timesteps) < 1000


def test_v_prediction_target_is_the_velocity(tiny_pipe):
    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    batch = Batch(latents, ["a", "b"], noise, torch.tensor([10, 900]))
    cond = tiny_pipe.text_encoder(tokenize(tiny_pipe.tokenizer, batch.captions)).last_hidden_state
    with torch.no_grad():
        loss = diffusion_loss(tiny_pipe.unet, scheduler, batch, cond)
        alpha_bar = scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * batch.latents + (1 - alpha_bar).sqrt() * batch.noise
        velocity = alpha_bar.sqrt() * batch.noise - (1 - alpha_bar).sqrt() * batch.latents
        expected = torch.mean((tiny_pipe.unet(noisy, batch.timesteps, cond).sample - velocity) ** 2)
    torch.testing.assert_close(loss, expected)


class Interrupt(Exception):
    pass


def stop_at(step_to_stop: int):
    def callback(step, method, run):
        if step == step_to_stop:
            raise Interrupt
    return callback


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_resume_after_interruption_ends_with_the_same_weights(tmp_run_dir, dataset, precision):
    cfg = TrainConfig(steps=4, batch_size=2, gradient_accumulation=2, lr=1e-2, resolution=32, checkpoint_every=2,
                      lr_scheduler="cosine", lr_warmup_steps=1, mixed_precision=precision)
    straight = ShiftMethod(build_tiny_pipeline(0))
    full = train(straight, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))

    run = new_run("t", {}, out_dir=tmp_run_dir)
    with pytest.raises(Interrupt):
        train(ShiftMethod(build_tiny_pipeline(0)), dataset, cfg, run, callbacks=[stop_at(2)])
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    scaler = json.loads((list_checkpoints(run)[0] / "state.json").read_text())["grad_scaler"]
    assert (scaler["_growth_tracker"] == 2) if precision == "fp16" else scaler == {}
    resumed_method = ShiftMethod(build_tiny_pipeline(0))
    resumed = train(resumed_method, dataset, cfg, run)

    assert (resumed.start_step, resumed.final_step) == (2, 4)
    assert resumed.losses == full.losses[2:]
    for key, value in weights(straight).items():
        assert torch.equal(value, weights(resumed_method)[key]), key
    assert [p["step"] for p in run.metrics["series"]["loss"]] == [1, 2, 3, 4]

    again = train(ShiftMethod(build_tiny_pipeline(0)), dataset, cfg, run)  # already finished: nothing to do
    assert again.losses == [] and again.checkpoint.name == "step-4"
    with pytest.raises(ValueError, match="already holds checkpoints: pass resume=True"):
        train(ShiftMethod(build_tiny_pipeline(0)), dataset, cfg, run, resume=False)


def test_checkpoint_layout_is_complete_and_leaves_no_temporary_files(tmp_run_dir, dataset):
    run = new_run("t", {}, out_dir=tmp_run_dir)
    method = ShiftMethod(build_tiny_pipeline(0))
    result = train(method, dataset, TrainConfig(steps=2, resolution=32, checkpoint_every=1), run)
    folder = run.path / "artifacts" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]
    files = sorted(p.name for p in result.checkpoint.iterdir())
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["step"] == 2 and state["method"] == "shift" and state["config"]["steps"] == 2
    moments = load_file(result.checkpoint / "optimizer.safetensors")
    assert set(moments) == {f"{i}.{k}" for i in range(3) for k in ("step", "exp_avg", "exp_avg_sq")}
    assert torch.equal(load_file(result.checkpoint / "weights.safetensors")["shift"], method.shift.detach())

    fresh = ShiftMethod(build_tiny_pipeline(0))
    assert load_checkpoint(fresh, result.checkpoint) == 2
    assert torch.equal(fresh.shift, method.shift) and not torch.equal(fresh.shift, torch.zeros_like(fresh.shift))


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_run_dir, dataset):
    run = new_run("t", {}, out_dir=tmp_run_dir)
    method = ShiftMethod(build_tiny_pipeline(0), nan_at_call=4)
    saved = {}

    def remember(step, m, r):
        saved[step] = (list_checkpoints(r)[-1] / "weights.safetensors").read_bytes()

    cfg = TrainConfig(steps=6, lr=1e-2, resolution=32, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"nan at step 4.*step-3.*Lower the learning rate") as err:
        train(method, dataset, cfg, run, callbacks=[remember])
    assert err.value.step == 4 and err.value.checkpoint.name == "step-3"
    assert [p.name for p in list_checkpoints(run)] == ["step-2", "step-3"]
    assert (list_checkpoints(run)[0] / "weights.safetensors").read_bytes() == saved[2]
    last_good = load_file(err.value.checkpoint / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in last_good.values())
    assert torch.equal(last_good["shift"], method.shift.detach())


def test_bad_inputs_are_rejected_with_the_fix(tmp_run_dir):
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="mixed_precision must be"):
        TrainConfig(mixed_precision="fp8")
    run = new_run("t", {}, out_dir=tmp_run_dir)
    with pytest.raises(ValueError, match=r"\(PIL image, caption\) pairs"):
        train(ShiftMethod(build_tiny_pipeline(0)), [], TrainConfig(steps=1, resolution=32), run)
