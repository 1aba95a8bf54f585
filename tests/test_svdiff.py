"""SVDiff on the tiny random pipeline: the reparametrisation, what trains, file round trip, SD1.5 size, bad input."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from nbutils.models import TOY_MODEL_DIR, build_tiny_pipeline, sd15_unet_config
from nbutils.runs import atomic_write, new_run
from nbutils.svdiff import (
    SpectralShift,
    SVDiff,
    add_spectral_shifts,
    default_config,
    load_svdiff,
    matrix_shape,
    num_spectral_shifts,
    read_svdiff,
    shifts_metadata,
    spectral_layers,
    weights_sha256,
)
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, encode_latents, load_checkpoint, make_batch, train

PROMPT = "a watercolor painting of sks person"
CONV = "unet.down_blocks.0.resnets.0.conv1"  # a 3 x 3 convolution, 32 -> 32 channels: a 32 x 288 matrix
LINEAR = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # 32 -> 32


@pytest.fixture(scope="module")
def dataset():
    people = portraits(0, 3, identity=TOY_SUBJECT)
    return [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(people)]


def tiny(seed: int = 0):
    pipe = build_tiny_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, lr=5e-2, resolution=32)


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the pipeline but the shifts, cloned; a parametrised weight under its original name."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {f"{m}.{k.replace('parametrizations.weight.original', 'weight')}": v.clone()
            for m, module in modules.items() for k, v in module.state_dict().items() if not k.endswith(".delta")}


def unet_output(pipe) -> torch.Tensor:
    """The UNet's prediction (1, 4, 4, 4) for a fixed latent, timestep and prompt."""
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        text = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        return pipe.unet(latent, 500, text).sample


def images(pipe) -> torch.Tensor:
    """Two 32 px images (2, 3, 32, 32) for a fixed prompt and seed."""
    return pipe(PROMPT, num_inference_steps=2, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
                output_type="pt").images


def svdiff_layers(pipe) -> dict[str, torch.nn.Module]:
    return spectral_layers(pipe.unet, "unet") | spectral_layers(pipe.text_encoder, "text_encoder")


def test_zero_shifts_give_back_the_base_model_exactly():
    pipe, base = tiny(), tiny()
    svdiff = SVDiff(pipe, train_text_encoder=True)
    assert all(torch.count_nonzero(d) == 0 for d in svdiff.trainable_parameters())
    layers = svdiff_layers(pipe)
    assert layers.keys() == svdiff.shifts.keys()
    assert all(torch.equal(m.weight, m.parametrizations.weight.original) for m in layers.values())
    assert torch.equal(unet_output(pipe), unet_output(base))
    assert torch.equal(images(pipe), images(base))
    with pytest.raises(ValueError, match="already has a parametrised weight .* start from a freshly loaded pipeline"):
        SVDiff(pipe)


def test_a_shifted_weight_is_u_relu_sigma_plus_delta_v():
    pipe = tiny()
    svdiff = SVDiff(pipe)
    for name, shape in ((CONV, (32, 32, 3, 3)), (LINEAR, (32, 32))):
        module, shift = pipe.unet.get_submodule(name.removeprefix("unet.")), svdiff.shifts[name]
        original = module.parametrizations.weight.original
        assert original.shape == shape and shift.delta.shape == (min(matrix_shape(module)),) == (32,)
        torch.testing.assert_close(shift.S, torch.linalg.svdvals(original.reshape(32, -1)))
        with torch.no_grad():
            shift.delta.copy_(torch.linspace(-0.3, 0.3, 32) * shift.S)
            shift.delta[:4] = -shift.S[:4] - 1.0  # ReLU clips the four largest singular values to zero
        paper = (shift.U @ torch.diag(torch.relu(shift.S + shift.delta)) @ shift.Vh).reshape(shape)
        torch.testing.assert_close(module.weight, paper, atol=1e-5, rtol=1e-4)
        assert torch.linalg.matrix_rank(module.weight.reshape(32, -1)) == 28
        assert not torch.allclose(module.weight, original, atol=1e-3)


@pytest.mark.parametrize("layer, x", [
    (torch.nn.Linear(24, 40), torch.randn(2, 7, 24)),
    (torch.nn.Conv2d(6, 16, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)),
    (torch.nn.Conv2d(16, 8, 1), torch.randn(1, 16, 5, 5)),
])
def test_the_factored_path_gives_the_shifted_layers_output_and_gradients(layer, x):
    """Adding ``change_of_output`` to the base layer's output equals the layer with the shifted weight formed: the
    output and the shifts' gradients, for a linear layer and strided, padded and 1 x 1 convolutions."""
    torch.manual_seed(0)
    shift = add_spectral_shifts({"layer": layer})["layer"]
    with torch.no_grad():
        shift.delta.copy_(torch.randn_like(shift.delta) * shift.S)
    grads, outputs = {}, {}
    for factored in (False, True):
        with mock.patch.object(SpectralShift, "factored_is_cheaper", return_value=factored):
            shift.delta.grad = None
            outputs[factored] = layer(x)
            outputs[factored].square().sum().backward()
            grads[factored] = shift.delta.grad.clone()
        assert not shift.factored  # the path ends with the call: layer.weight read elsewhere is the shifted one
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[True], grads[False], atol=1e-4, rtol=1e-4)
    assert grads[True].abs().sum() > 0


def test_each_call_takes_the_cheaper_path():
    """A wide layer at a few positions adds the factored change; at many positions, or inside
    ``parametrize.cached()``, it forms the shifted weight."""
    wide = torch.nn.Conv2d(128, 128, 3, padding=1)
    shift = add_spectral_shifts({"wide": wide})["wide"]
    few, many = torch.randn(1, 128, 2, 2), torch.randn(4, 128, 64, 64)
    assert shift.factored_is_cheaper(wide, few) and not shift.factored_is_cheaper(wide, many)
    with torch.no_grad():
        assert shift.factored_is_cheaper(wide, few)
        with parametrize.cached():
            assert not shift.factored_is_cheaper(wide, few)
    grouped = torch.nn.Conv2d(8, 8, 3, groups=2)
    assert not add_spectral_shifts({"g": grouped})["g"].factored_is_cheaper(grouped, torch.randn(1, 8, 3, 3))


def test_only_the_shifts_train_and_the_base_model_stays_bit_identical(tmp_run_dir, dataset):
    pipe = tiny()
    before = base_weights(pipe)
    svdiff = SVDiff(pipe)
    params = svdiff.trainable_parameters()
    assert sum(p.numel() for p in params) == num_spectral_shifts(pipe.unet) == 5060
    assert all(p.dtype == torch.float32 and p.requires_grad and p.dim() == 1 for p in params)
    sigma = svdiff.shifts[CONV].S.clone()

    train(svdiff, dataset, tiny_cfg(steps=3), new_run("t", {}, out_dir=tmp_run_dir))

    after = base_weights(pipe)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(svdiff.shifts[CONV].S, sigma)
    assert all(torch.count_nonzero(d) > 0 for d in svdiff.trainable_parameters())


def test_loss_decreases_when_overfitting_one_image(tmp_run_dir, dataset):
    svdiff = SVDiff(tiny())
    latents = encode_latents(svdiff.pipe, [dataset[0][0]], 32)
    held_out = make_batch(latents, [dataset[0][1]], TrainConfig(batch_size=32, seed=99), 1, 0, 1000)  # fixed noise
    with torch.no_grad():
        before = svdiff.loss(held_out).item()
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-2, resolution=32, max_grad_norm=None)
    train(svdiff, dataset[:1], cfg, new_run("t", {}, out_dir=tmp_run_dir))
    with torch.no_grad():
        after = svdiff.loss(held_out).item()
    assert after < 0.8 * before, (before, after)  # measured: 1.083 -> 0.750


def test_saved_shifts_reproduce_the_trained_model_in_a_fresh_pipeline(tmp_run_dir, dataset):
    pipe = tiny()
    svdiff = SVDiff(pipe, train_text_encoder=True)
    result = train(svdiff, dataset, tiny_cfg(steps=2), new_run("t", {}, out_dir=tmp_run_dir))
    state, metadata = read_svdiff(result.checkpoint)
    assert state.keys() == svdiff.shifts.keys() and all(v.dim() == 1 for v in state.values())
    assert metadata["format"] == "svdiff" and metadata["base_sha256"] == weights_sha256(svdiff_layers(tiny()))
    assert json.loads(metadata["layers"])[CONV] == [32, 288]

    fresh, base = tiny(), tiny()
    load_svdiff(fresh, result.checkpoint)
    trained_out = unet_output(pipe)
    assert torch.equal(unet_output(fresh), trained_out)
    assert not torch.allclose(trained_out, unet_output(base), atol=1e-4)
    trained_images = images(pipe)
    assert torch.equal(images(fresh), trained_images) and not torch.allclose(trained_images, images(base), atol=1e-3)

    again = SVDiff(tiny(), train_text_encoder=True)
    assert load_checkpoint(again, result.checkpoint) == 2
    assert all(torch.equal(again.shifts[k].delta, v.delta) for k, v in svdiff.shifts.items())


def test_shifts_for_another_model_shape_or_other_weights_are_caught(tmp_path, tmp_run_dir, dataset):
    other = tiny()
    other.register_modules(unet=UNet2DConditionModel.from_config(other.unet.config, cross_attention_dim=16))
    made = SVDiff(other)
    file = tmp_path / "svdiff_shifts.safetensors"
    atomic_write(file, save(made.state_dict_to_save(), metadata=made.save_metadata()))
    fresh = tiny()
    with pytest.raises(ValueError, match=r"another shape: layer unet\..*attn2\.to_k has \(16,\) shifts there but "
                                         r"needs \(32,\) here\. Load the model it was trained on"):
        load_svdiff(fresh, file)
    assert not any(parametrize.is_parametrized(m) for m in fresh.unet.modules())  # refused before any change

    result = train(SVDiff(tiny()), dataset, tiny_cfg(steps=1), new_run("t", {}, out_dir=tmp_run_dir))
    lacks = r"lacks 12 of this model's 133 layers \(e\.g\. text_encoder\.encoder\.layers\.0\..*same text-encoder"
    with pytest.raises(ValueError, match=lacks):
        load_checkpoint(SVDiff(tiny(), train_text_encoder=True), result.checkpoint)
    with pytest.warns(UserWarning, match="learned on other base weights"):
        load_svdiff(tiny(seed=1), result.checkpoint)  # same shapes, other weights

    atomic_write(tmp_path / "plain.safetensors", save({"x": torch.zeros(3)}))
    with pytest.raises(ValueError, match="is not an SVDiff shifts file"):
        load_svdiff(tiny(), tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="No svdiff_shifts.safetensors"):
        load_svdiff(tiny(), tmp_run_dir)


def test_sd15_has_222_696_shifts_under_a_megabyte():
    full = build_tiny_pipeline(sd15_shape=True, device="meta")
    assert list(full.unet.config.block_out_channels) == sd15_unet_config()["block_out_channels"]
    layers = spectral_layers(full.unet, "unet")
    assert len(layers) == 282 and num_spectral_shifts(full.unet) == 222_696
    assert matrix_shape(layers["unet.up_blocks.1.resnets.0.conv1"]) == (1280, 2560 * 9)
    assert num_spectral_shifts(full.unet) + num_spectral_shifts(full.text_encoder) == 277_992
    shapes = {name: matrix_shape(m) for name, m in layers.items()}
    zeros = {name: torch.zeros(min(shape)) for name, shape in shapes.items()}
    size = len(save(zeros, metadata=shifts_metadata(shapes, "sd15", "0" * 64)))
    assert 222_696 * 4 < size < 1.0e6, size  # 0.89 MB of shifts plus the header (LoRA rank 4: 3.2 MB)


def test_on_sd15_at_512_px_the_cheaper_path_halves_a_training_steps_flops():
    """FLOPs of one forward and backward (batch 1, 64 x 64 latents) counted on the meta device: forming every
    shifted weight costs 2.6x a full fine-tuning step, taking the cheaper path per layer 1.3x."""
    def step_flops(unet) -> float:
        with FlopCounterMode(display=False) as counter:
            latents, text = torch.zeros(1, 4, 64, 64, device="meta"), torch.zeros(1, 77, 768, device="meta")
            unet(latents, torch.tensor([10], device="meta"), text).sample.sum().backward()
        return counter.get_total_flops()

    full_fine_tuning = step_flops(build_tiny_pipeline(sd15_shape=True, device="meta").unet)
    unet = build_tiny_pipeline(sd15_shape=True, device="meta").unet.requires_grad_(False)
    add_spectral_shifts(spectral_layers(unet, "unet"))
    cheaper = step_flops(unet)
    with mock.patch.object(SpectralShift, "factored_is_cheaper", return_value=False):
        formed = step_flops(unet)
    assert 2.3e12 < full_fine_tuning < 2.5e12
    assert formed > 2.5 * full_fine_tuning and cheaper < 1.35 * full_fine_tuning


def cheapest_step_over_full_fine_tuning(unet, latents: torch.Tensor, text: torch.Tensor) -> float:
    """A lower bound on SVDiff's step cost, as a multiple of a full fine-tuning step's FLOPs (counted on ``unet``
    for ``latents`` (B, C, H, W) and ``text`` (B, S, D)).

    Multiply-adds per shifted layer with ``n`` output positions, an (out, i) weight matrix and r = min(out, i):
    full fine-tuning costs ``3 n out i`` (output, input gradient, weight gradient). SVDiff costs the least of its
    three exact computations: forming W' (``+ 2 out i r``: form it, project the weight gradient on the singular
    vectors), the factored path (no weight gradient, ``+ 2 n r (i + out)`` for U diag(shift) V^T x and its
    gradients) and forming W' forward with the shift gradients taken factored (``+ out i r + n r (i + out)``).
    Attention, normalisation and the rest cost the same in both, as counted."""
    positions = {}
    layers = spectral_layers(unet, "unet")

    def count(name):
        def hook(module, args, out):
            positions[name] = out[0, 0].numel() * len(out) if isinstance(module, torch.nn.Conv2d) else \
                out.numel() // out.shape[-1]
        return hook

    hooks = [m.register_forward_hook(count(name)) for name, m in layers.items()]
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.full((len(latents),), 10, device=latents.device), text).sample.sum().backward()
    for hook in hooks:
        hook.remove()
    extra = 0
    for name, module in layers.items():
        (out, inner), n = matrix_shape(module), positions[name]
        rank = min(out, inner)
        extra += min(2 * out * inner * rank, 2 * n * rank * (inner + out) - n * out * inner,
                     out * inner * rank + n * rank * (inner + out) - n * out * inner)
    return 1 + 2 * extra / counter.get_total_flops()


@pytest.mark.parametrize("model", ["toy", "sd15"])
def test_no_exact_svdiff_step_costs_under_1_15_full_fine_tuning_steps(model):
    """The benchmark's SVDiff target (a step <= 1.15x the bare full fine-tuning loop's time, issue #16) lies below
    the method's arithmetic: on the toy model at the benchmark's 64 px and batch 4, and on SD1.5 at 512 px and batch
    1, even the cheapest exact computation of every layer costs more than 1.15 full fine-tuning steps of FLOPs."""
    if model == "toy":
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TOY_MODEL_DIR / "unet"))
        size, batch, width = unet.config.sample_size, 4, unet.config.cross_attention_dim
    else:
        unet, size, batch, width = build_tiny_pipeline(sd15_shape=True, device="meta").unet, 64, 1, 768
    device = unet.device
    ratio = cheapest_step_over_full_fine_tuning(unet, torch.zeros(batch, 4, size, size, device=device),
                                                torch.zeros(batch, 77, width, device=device))
    assert 1.15 < ratio < {"toy": 1.25, "sd15": 1.3}[model], ratio


def test_defaults_follow_the_tier():
    real, toy, tiny_tier = (default_config(t) for t in ("real", "toy", "tiny"))
    assert (real.steps, real.batch_size, real.lr, real.resolution) == (500, 1, 1e-3, 512)
    assert toy.resolution == 64 and tiny_tier.resolution == 32 and tiny_tier.steps < toy.steps
    with pytest.raises(ValueError, match="Unknown model tier"):
        default_config("huge")
