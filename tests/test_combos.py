"""Combined methods on the tiny random pipeline: what trains, at which rate, and the diffusers round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nbutils.class_images import ensure_class_images
from nbutils.combos import DreamBoothTI, PivotalTuning, load_pivotal, save_pivotal
from nbutils.dreambooth import save_pipeline
from nbutils.models import build_tiny_pipeline, load_pipeline
from nbutils.runs import new_run
from nbutils.sampling import generate
from nbutils.text import with_placeholder
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, load_checkpoint, make_batch, train

GEN = dict(steps=2, guidance_scale=4.0)
PROMPTS = ["a photo of <sks> person", "a watercolor painting of <sks> person"]
TOKEN = "text_encoder.embeddings.token_embedding.weight"


@pytest.fixture(scope="module")
def dataset():
    people = portraits(0, 3, identity=TOY_SUBJECT)
    pairs = [(render(p, 32), f"a photo of sks person, view {i}") for i, p in enumerate(people)]
    return with_placeholder(pairs, "sks", "<sks>")


@pytest.fixture(scope="module")
def class_set(tmp_path_factory):
    return ensure_class_images(build_tiny_pipeline(0), 4, model="tiny", cache_dir=tmp_path_factory.mktemp("cls"), **GEN)


def tiny_cfg(steps: int, **changes) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": 2, "lr": 1e-2, "resolution": 32, **changes})


def snapshot(pipe) -> dict[str, torch.Tensor]:
    """Every base tensor of the pipeline (peft's LoRA tensors left out, its ``base_layer`` renamed back), cloned."""
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {f"{m}.{k.replace('.base_layer', '')}": v.clone()
            for m, module in modules.items() for k, v in module.state_dict().items() if "lora_" not in k}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def assert_only_token_rows_changed(before: dict, after: dict, token_ids: torch.Tensor, embeds: torch.Tensor) -> None:
    others = torch.ones(len(after[TOKEN]), dtype=torch.bool)
    others[token_ids] = False
    assert torch.equal(after[TOKEN][others], before[TOKEN][others])
    assert not torch.equal(after[TOKEN][token_ids], before[TOKEN][token_ids])
    assert torch.equal(after[TOKEN][token_ids], embeds.detach())  # the pipeline reads the learned rows


def pixels(pipe, seeds=(3, 4)) -> np.ndarray:
    return np.stack([np.asarray(im) for im in generate(pipe, PROMPTS, list(seeds), **GEN)])


def test_dreambooth_ti_trains_the_token_row_and_the_unet_and_nothing_else(tmp_path, tmp_run_dir, dataset, class_set):
    method = DreamBoothTI(build_tiny_pipeline(0), class_set, token_lr=5e-2)
    pipe = method.pipe
    assert method.trainable_parameters() == [*pipe.unet.parameters(), method.ti.embeds]
    assert [g["lr"] for g in method.make_optimizer(tiny_cfg(1)).param_groups] == [1e-2, 5e-2]
    before = snapshot(pipe)
    result = train(method, dataset, tiny_cfg(2), new_run("t", {}, out_dir=tmp_run_dir))

    after = snapshot(pipe)
    moved = changed(before, after)
    assert moved - {TOKEN} == {k for k in before if k.startswith("unet.")}  # every UNet tensor, nothing else
    assert_only_token_rows_changed(before, after, method.ti.token_ids, method.ti.embeds)

    fresh = DreamBoothTI(build_tiny_pipeline(0), class_set)
    load_checkpoint(fresh, result.checkpoint)
    assert torch.equal(fresh.ti.embeds, method.ti.embeds) and not changed(snapshot(fresh.pipe), after)

    reloaded = load_pipeline(str(save_pipeline(pipe, tmp_path / "model")), device="cpu")  # tokenizer keeps <sks>
    assert np.array_equal(pixels(reloaded), pixels(pipe))


@pytest.mark.parametrize("frozen", ["unet", "token"])
def test_each_part_learns_at_its_own_rate(tmp_run_dir, dataset, frozen):
    cfg, token_lr = (tiny_cfg(1, lr=0.0), 5e-2) if frozen == "unet" else (tiny_cfg(1), 0.0)
    method = DreamBoothTI(build_tiny_pipeline(0), prior_loss_weight=0, token_lr=token_lr)
    unet_before, token_before = snapshot(method.pipe), method.ti.embeds.detach().clone()
    train(method, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))
    unet_moved = any(k.startswith("unet.") for k in changed(unet_before, snapshot(method.pipe)))
    token_moved = not torch.equal(method.ti.embeds, token_before)
    assert (unet_moved, token_moved) == ((False, True) if frozen == "unet" else (True, False))


def test_pivotal_tuning_trains_adapters_and_token_and_diffusers_loads_the_saved_files(tmp_path, tmp_run_dir, dataset):
    method = PivotalTuning(build_tiny_pipeline(0), rank=4, token_lr=5e-2)
    pipe = method.pipe
    assert method.trainable_parameters() == [*method.lora.trainable_parameters(), method.ti.embeds]
    assert [g["lr"] for g in method.make_optimizer(tiny_cfg(1)).param_groups] == [1e-2, 5e-2]
    before, adapters_before = snapshot(pipe), method.lora.state_dict_to_save()
    adapters_before = {k: v.clone() for k, v in adapters_before.items()}
    result = train(method, dataset, tiny_cfg(2, lr=5e-2), new_run("t", {}, out_dir=tmp_run_dir))

    after = snapshot(pipe)
    assert changed(before, after) == {TOKEN}  # no base weight moved, only the token's row
    assert_only_token_rows_changed(before, after, method.ti.token_ids, method.ti.embeds)
    adapters = method.lora.state_dict_to_save()
    assert any(not torch.equal(adapters[k], adapters_before[k]) for k in adapters)

    folder = save_pivotal(method, tmp_path / "pivotal")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    fresh = build_tiny_pipeline(0)
    fresh.load_textual_inversion(str(folder))  # diffusers' own loaders, on a pipeline that never saw the run
    fresh.load_lora_weights(str(folder))
    trained = pixels(pipe)
    assert np.array_equal(pixels(fresh), trained)
    helper = build_tiny_pipeline(0)
    load_pivotal(helper, folder)
    assert np.array_equal(pixels(helper), trained)
    assert not np.array_equal(pixels(build_tiny_pipeline(0)), trained)  # the base model draws something else

    resumed = PivotalTuning(build_tiny_pipeline(0), rank=4)
    load_checkpoint(resumed, result.checkpoint)
    assert torch.equal(resumed.ti.embeds, method.ti.embeds)
    assert all(torch.equal(v, adapters[k]) for k, v in resumed.lora.state_dict_to_save().items())


def test_bad_input_is_rejected_with_the_fix(dataset, class_set):
    with pytest.raises(ValueError, match="token_lr must be 0 or more"):
        PivotalTuning(build_tiny_pipeline(0), token_lr=-1)
    with pytest.raises(ValueError, match="token_lr must be 0 or more"):
        DreamBoothTI(build_tiny_pipeline(0), class_set, token_lr=-1)
    method = DreamBoothTI(build_tiny_pipeline(0), class_set)
    method.prepare(tiny_cfg(1))
    batch = make_batch(torch.zeros(1, 4, 4, 4), ["a photo of sks person"], tiny_cfg(1, batch_size=1), 1, 0, 1000)
    with pytest.raises(ValueError, match=r"does not contain the placeholder '<sks>': use with_placeholder"):
        method.loss(batch)
