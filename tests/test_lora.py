"""LoRA on the tiny random pipeline: what trains, diffusers round trip and scale, resume, SD1.5 size, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save

from nbutils.lora import (
    LoRA,
    add_lora,
    adapter_metadata,
    default_config,
    lora_layers,
    lora_metadata,
    lora_parameter_count,
    lora_state_dict,
    load_lora,
)
from nbutils.models import build_tiny_pipeline, sd15_unet_config
from nbutils.runs import new_run
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, encode_latents, list_checkpoints, load_checkpoint, make_batch, train

PROMPT = "a watercolor painting of sks person"


@pytest.fixture(scope="module")
def dataset():
    people = portraits(0, 3, identity=TOY_SUBJECT)
    return [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(people)]


def tiny_cfg(steps: int, **kwargs) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, lr=5e-2, resolution=32, **kwargs)


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the pipeline that is not a LoRA tensor, cloned."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {f"{m}.{k.replace('.base_layer', '')}": v.clone()  # peft moves W to <layer>.base_layer.weight
            for m, module in modules.items() for k, v in module.state_dict().items() if "lora_" not in k}


def unet_output(pipe) -> torch.Tensor:
    """The UNet's prediction (1, 4, 4, 4) for a fixed latent, timestep and prompt."""
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        text = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        return pipe.unet(latent, 500, text).sample


def images(pipe, **kwargs) -> torch.Tensor:
    """Two 32 px images (2, 3, 32, 32) for a fixed prompt and seed."""
    out = pipe(PROMPT, num_inference_steps=2, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
               output_type="pt", **kwargs)
    return out.images


def tiny(seed: int = 0):
    pipe = build_tiny_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_only_the_adapters_train_and_the_base_model_stays_bit_identical(tmp_run_dir, dataset):
    pipe = tiny()
    before = base_weights(pipe)
    lora = LoRA(pipe, rank=4)
    # r * (in + out) per projection; per transformer block of width C with 32-wide text: 14 C r + 64 r.
    # The tiny UNet has five blocks of width 32 and one (mid) of width 64.
    expected = 5 * 4 * (14 * 32 + 64) + 4 * (14 * 64 + 64)
    params = lora.trainable_parameters()
    assert sum(p.numel() for p in params) == expected == lora_parameter_count(pipe.unet) == 14080
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    ups = {k: v.clone() for k, v in lora.state_dict_to_save().items() if ".up." in k}
    assert len(ups) == 6 * 8 and all(torch.count_nonzero(v) == 0 for v in ups.values())  # B starts at zero

    train(lora, dataset, tiny_cfg(steps=3), new_run("t", {}, out_dir=tmp_run_dir))

    after = base_weights(pipe)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.count_nonzero(v) > 0 for k, v in lora.state_dict_to_save().items() if ".up." in k)


def test_initialisation_is_seeded():
    first, again, other = (LoRA(tiny(), seed=s).state_dict_to_save() for s in (0, 0, 1))
    down = next(k for k in first if ".down." in k)
    assert torch.equal(first[down], again[down]) and not torch.equal(first[down], other[down])
    assert first[down].std().item() == pytest.approx(1 / 4, rel=0.3)  # peft's gaussian init: N(0, 1/rank)


def test_loss_decreases_when_overfitting_one_image(tmp_run_dir, dataset):
    lora = LoRA(tiny(), rank=4)
    latents = encode_latents(lora.pipe, [dataset[0][0]], 32)
    held_out = make_batch(latents, [dataset[0][1]], TrainConfig(batch_size=32, seed=99), 1, 0, 1000)  # fixed noise
    with torch.no_grad():
        before = lora.loss(held_out).item()
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, resolution=32, max_grad_norm=None)
    train(lora, dataset[:1], cfg, new_run("t", {}, out_dir=tmp_run_dir))
    with torch.no_grad():
        after = lora.loss(held_out).item()
    assert after < 0.9 * before, (before, after)  # measured: 1.083 -> 0.899


def test_each_distinct_caption_is_encoded_once_when_the_text_encoder_is_frozen(tmp_run_dir, dataset):
    def encoded_captions(train_text_encoder: bool) -> int:
        lora, rows = LoRA(tiny(), train_text_encoder=train_text_encoder), []
        lora.pipe.text_encoder.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
        train(lora, dataset, tiny_cfg(steps=4), new_run("t", {}, out_dir=tmp_run_dir))
        return sum(rows)

    assert encoded_captions(train_text_encoder=False) == 3  # 3 distinct captions in 4 steps of 2
    assert encoded_captions(train_text_encoder=True) == 8  # every caption of every batch, through the adapters


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_saved_lora_reproduces_the_trained_model_in_a_fresh_pipeline(tmp_run_dir, dataset, train_text_encoder):
    pipe = tiny()
    lora = LoRA(pipe, rank=4, alpha=8, train_text_encoder=train_text_encoder)
    result = train(lora, dataset, tiny_cfg(steps=2), new_run("t", {}, out_dir=tmp_run_dir))
    assert result.checkpoint.name == "step-2" and (result.checkpoint / "pytorch_lora_weights.safetensors").is_file()

    # The checkpoint file is what diffusers' own writer makes from the same adapters.
    reference = tmp_run_dir / "reference"
    layers = lora_layers(lora.models)
    StableDiffusionPipeline.save_lora_weights(
        reference, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=adapter_metadata(pipe.unet),
        text_encoder_lora_adapter_metadata=adapter_metadata(pipe.text_encoder) if train_text_encoder else None)
    ours, theirs = (f / "pytorch_lora_weights.safetensors" for f in (result.checkpoint, reference))
    assert load_file(ours).keys() == load_file(theirs).keys()
    assert all(torch.equal(v, load_file(theirs)[k]) for k, v in load_file(ours).items())
    with safe_open(ours, "pt") as a, safe_open(theirs, "pt") as b:
        assert a.metadata() == b.metadata()
        assert json.loads(a.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8

    fresh = tiny()
    load_lora(fresh, result.checkpoint / "pytorch_lora_weights.safetensors" if train_text_encoder
              else result.checkpoint)  # a file or a folder
    assert fresh.unet.peft_config["default_0"].r == 4 and fresh.unet.peft_config["default_0"].lora_alpha == 8
    base = tiny()
    trained_out, fresh_out, base_out = unet_output(pipe), unet_output(fresh), unet_output(base)
    assert torch.equal(fresh_out, trained_out) and not torch.allclose(trained_out, base_out, atol=1e-4)
    trained_images, base_images = images(pipe), images(base)
    assert torch.equal(images(fresh), trained_images)
    assert not torch.allclose(trained_images, base_images, atol=1e-3)

    # Strength at inference: scale 0 is the base model, and the scale does not stick to the pipeline.
    assert torch.equal(images(fresh, cross_attention_kwargs={"scale": 0.0}), base_images)
    half = images(fresh, cross_attention_kwargs={"scale": 0.5})
    assert not torch.allclose(half, base_images, atol=1e-4) and not torch.allclose(half, trained_images, atol=1e-4)
    assert torch.equal(images(fresh), trained_images)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_with_the_same_lora(tmp_run_dir, dataset):
    cfg = tiny_cfg(steps=4, checkpoint_every=2, lr_scheduler="cosine")
    straight = LoRA(tiny())
    full = train(straight, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))

    def stop_at_2(step, method, run):
        if step == 2:
            raise Interrupt

    run = new_run("t", {}, out_dir=tmp_run_dir)
    with pytest.raises(Interrupt):
        train(LoRA(tiny()), dataset, cfg, run, callbacks=[stop_at_2])
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    resumed_lora = LoRA(tiny())
    resumed = train(resumed_lora, dataset, cfg, run)

    assert resumed.start_step == 2 and resumed.losses == full.losses[2:]
    expected = straight.state_dict_to_save()
    assert all(torch.equal(v, expected[k]) for k, v in resumed_lora.state_dict_to_save().items())


def test_rank_and_targets_are_checked_before_the_model_changes():
    pipe = tiny()
    with pytest.raises(ValueError, match=r"rank 33 is larger than layer .*attn1\.to_q allows \(32 x 32 weight: "
                                         r"at most rank 32\)"):
        LoRA(pipe, rank=33)
    with pytest.raises(ValueError, match=r"No Linear layer of the UNet2DConditionModel is named 'to_x'; .*'to_q'"):
        LoRA(pipe, unet_targets=["to_q", "to_x"])
    with pytest.raises(ValueError, match=r"No Linear layer of the CLIPTextModel is named 'query'; .*'q_proj'"):
        LoRA(pipe, train_text_encoder=True, text_encoder_targets=["query"])
    with pytest.raises(ValueError, match="rank must be a whole number of at least 1"):
        LoRA(pipe, rank=0)
    with pytest.raises(ValueError, match="Name at least one layer to adapt"):
        LoRA(pipe, unet_targets=[])
    assert not any("lora_" in k for k in pipe.unet.state_dict())


def test_a_lora_for_another_model_shape_is_refused_clearly(tmp_path, tmp_run_dir, dataset):
    other = UNet2DConditionModel.from_config(tiny().unet.config, cross_attention_dim=16)
    add_lora(other, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora_layers({"unet": other})["unet"])
    fresh = tiny()
    misfit = r"another shape: its down matrix for layer unet\..*attn2\.to_k is \(4, 16\), but .* here is \(32, 32\)"
    with pytest.raises(ValueError, match=misfit):
        load_lora(fresh, tmp_path)
    assert not any("lora_" in k for k in fresh.unet.state_dict())  # refused before touching the pipeline
    with pytest.raises(ValueError, match=r"trained on a model of another shape"):
        LoRA(tiny()).load_saved(load_file(tmp_path / "pytorch_lora_weights.safetensors"))

    result = train(LoRA(tiny(), rank=4), dataset, tiny_cfg(steps=1), new_run("t", {}, out_dir=tmp_run_dir))
    with pytest.raises(ValueError, match=r"holds unet\..* of shape \(4, 32\), this LoRA expects \(2, 32\): use the"):
        load_checkpoint(LoRA(tiny(), rank=2), result.checkpoint)
    with pytest.raises(ValueError, match=r"16 expected tensors are missing .* same targets and train_text_encoder"):
        load_checkpoint(LoRA(tiny(), rank=4, train_text_encoder=True), result.checkpoint)
    with pytest.raises(FileNotFoundError, match="No pytorch_lora_weights.safetensors"):
        load_lora(tiny(), tmp_run_dir)


def test_sd15_rank_4_is_about_0_8_million_numbers_and_3_2_mb():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    add_lora(unet, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    # Per transformer block of width C: self-attention 4 x r(C + C), cross-attention 2 x r(C + C) + 2 x r(768 + C).
    # SD1.5 has 5 blocks of width 320, 5 of 640 and 6 of 1280.
    per_block = {c: 4 * (14 * c + 2 * 768) for c in (320, 640, 1280)}
    expected = 5 * per_block[320] + 5 * per_block[640] + 6 * per_block[1280]
    assert lora_parameter_count(unet) == expected == 797_184
    zeros = {k: torch.zeros(v.shape) for k, v in lora_state_dict({"unet": unet}).items()}
    size = len(save(zeros, metadata=lora_metadata({"unet": unet})))
    assert size == pytest.approx(3.2e6, rel=0.02), size


def test_defaults_follow_the_tier():
    real, toy, tiny_tier = (default_config(t) for t in ("real", "toy", "tiny"))
    assert (real.steps, real.batch_size, real.lr, real.resolution) == (500, 1, 1e-4, 512)
    assert (toy.steps, toy.lr, toy.resolution) == (300, 1e-3, 64) and tiny_tier.resolution == 32
    assert default_config("real", quick=True).steps == 50
    with pytest.raises(ValueError, match="Unknown model tier"):
        default_config("huge")
