"""P+ / XTI on the tiny random pipeline: per-layer injection, save/load round trip, style mixing, resume."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from nbutils.models import build_tiny_pipeline, sd15_unet_config
from nbutils.pplus import (
    PPlus,
    PPlusEmbeds,
    cross_attention_layers,
    encode_pplus,
    load_pplus,
    mix,
    pplus_prompt_embeds,
    read_pplus,
)
from nbutils.runs import new_run
from nbutils.text import with_placeholder
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, list_checkpoints, train

PROMPT = "a pencil sketch of <sks> person"
TINY_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
]


@pytest.fixture(scope="module")
def dataset():
    pairs = [(render(p, 32), f"a photo of sks person {i}") for i, p in enumerate(portraits(2, 3, identity=TOY_SUBJECT))]
    return with_placeholder(pairs, "sks", "<sks>")


def unet_out(pipe, cond: torch.Tensor) -> torch.Tensor:
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), cond).sample


def attn2_inputs(pipe, cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each cross-attention layer attends to: the input of its key projection."""
    seen, hooks = {}, []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            hook = module.to_k.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
            hooks.append(hook)
    unet_out(pipe, cond)
    for hook in hooks:
        hook.remove()
    return seen


def test_one_embedding_per_cross_attention_layer_in_forward_order():
    pipe = build_tiny_pipeline(0)
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    pplus = PPlus(pipe, "<sks>")
    assert pplus.layers == TINY_LAYERS and sorted(attn2) == sorted(TINY_LAYERS)
    assert pplus.levels == [0, 0, 1, 0, 0, 0]
    assert pplus.embeds.shape == (len(attn2), 32) and pplus.trainable_parameters() == [pplus.embeds]
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**sd15_unet_config())
    layers, levels = cross_attention_layers(sd15)
    assert len(layers) == 16 and layers[0].startswith("down_blocks.0") and layers[-1].startswith("up_blocks.3")
    assert levels == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]


def test_each_layer_reads_its_own_embedding():
    pipe = build_tiny_pipeline(0)
    pplus = PPlus(pipe, "<sks>")
    with torch.no_grad():
        pplus.embeds.copy_(torch.randn(pplus.embeds.shape, generator=torch.Generator().manual_seed(1)))
        base = attn2_inputs(pipe, pplus.encode_prompts([PROMPT]))
        assert all(v.shape == (1, 77, 32) for v in base.values())
        for k, layer in enumerate(pplus.layers):
            zeroed = pplus.embeds.clone()
            zeroed[k] = 0
            inputs = attn2_inputs(pipe, encode_pplus(pipe, "<sks>", zeroed, [PROMPT]))
            changed = [name for name in pplus.layers if not torch.equal(inputs[name], base[name])]
            assert changed == [layer]


def test_equal_layer_embeddings_reproduce_the_plain_prompt_and_plain_prompts_pass_through():
    plain_pipe, pipe = build_tiny_pipeline(0), build_tiny_pipeline(0)
    pplus = PPlus(pipe, "<sks>", init_word="person")  # every layer starts as "person"
    with torch.no_grad():
        cond = pplus.encode_prompts([PROMPT])
        plain = plain_pipe.encode_prompt("a pencil sketch of person person", "cpu", 1, False)[0]
        assert cond.shape == (1, 6 * 77, 32)
        torch.testing.assert_close(cond, plain.repeat(1, 6, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(unet_out(pipe, cond), unet_out(plain_pipe, plain), rtol=0, atol=1e-5)
        assert torch.equal(unet_out(pipe, plain), unet_out(plain_pipe, plain))  # (B, 77, D) passes unchanged


def test_saved_embeddings_give_identical_unet_outputs_in_a_fresh_pipeline(tmp_run_dir, dataset):
    pipe = build_tiny_pipeline(0)
    pplus = PPlus(pipe, "<sks>")
    cfg = TrainConfig(steps=2, batch_size=2, lr=5e-2, resolution=32)
    result = train(pplus, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))
    saved = load_file(result.checkpoint / "pplus_embeds.safetensors")
    assert list(saved) == ["embeds"] and saved["embeds"].shape == (6, 32)

    fresh = build_tiny_pipeline(0)
    concept = load_pplus(fresh, result.checkpoint)
    assert concept.token == "<sks>" and list(concept.layers) == TINY_LAYERS and concept.levels == (0, 0, 1, 0, 0, 0)
    assert torch.equal(concept.embeds, pplus.embeds.detach())
    assert not torch.equal(concept.embeds[0], concept.embeds[2])  # the layers learned different embeddings
    trained_cond, _ = pplus_prompt_embeds(pipe, pplus.concept(), [PROMPT])
    fresh_cond, fresh_neg = pplus_prompt_embeds(fresh, concept, [PROMPT])
    assert torch.equal(fresh_cond, trained_cond) and fresh_neg.shape == fresh_cond.shape
    assert torch.equal(unet_out(fresh, fresh_cond), unet_out(pipe, trained_cond))
    plain_row = fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids("<sks>")]
    torch.testing.assert_close(plain_row, concept.embeds.mean(0))


def test_the_pipeline_generates_with_pplus_conditioning():
    pipe = build_tiny_pipeline(0)
    pplus = PPlus(pipe, "<sks>")

    def image(concept):
        cond, neg = pplus_prompt_embeds(pipe, concept, [PROMPT])
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, num_inference_steps=2, guidance_scale=4.0,
                   output_type="np", generator=torch.Generator().manual_seed(0))
        return out.images

    first = image(pplus.concept())
    changed = pplus.concept()
    changed.embeds[2] = 5.0  # the mid-block layer only
    assert first.shape == (1, 32, 32, 3)
    assert not (first == image(changed)).all()
    assert (first == image(pplus.concept())).all()


def test_mix_takes_coarse_layers_from_one_concept_and_fine_from_the_other():
    zeros = PPlusEmbeds("<a>", tuple(TINY_LAYERS), (0, 0, 1, 0, 0, 0), torch.zeros(6, 32))
    ones = PPlusEmbeds("<b>", tuple(TINY_LAYERS), (0, 0, 1, 0, 0, 0), torch.ones(6, 32))
    mixed = mix(zeros, ones, coarse_from="a")
    assert mixed.embeds[:, 0].tolist() == [1, 1, 0, 1, 1, 1] and mixed.token == "<a>"
    assert mix(zeros, ones, coarse_from="b").embeds[:, 0].tolist() == [0, 0, 1, 0, 0, 0]
    assert mix(zeros, ones, coarse_from="a", fine_max_level=1).embeds[:, 0].tolist() == [1] * 6
    other = PPlusEmbeds("<c>", tuple(TINY_LAYERS[:5]), (0, 0, 1, 0, 0), torch.ones(5, 32))
    with pytest.raises(ValueError, match="same model"):
        mix(zeros, other)


def test_interrupted_training_resumes_to_the_same_embeddings(tmp_run_dir, dataset):
    cfg = TrainConfig(steps=4, batch_size=2, lr=5e-2, resolution=32, checkpoint_every=2)
    straight = PPlus(build_tiny_pipeline(0), "<sks>")
    train(straight, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))

    class Stop(Exception):
        pass

    def stop(step, method, run):
        raise Stop

    run = new_run("t", {}, out_dir=tmp_run_dir)
    with pytest.raises(Stop):
        train(PPlus(build_tiny_pipeline(0), "<sks>"), dataset, cfg, run, callbacks=[stop])
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    resumed = PPlus(build_tiny_pipeline(0), "<sks>")
    result = train(resumed, dataset, cfg, run)
    assert result.start_step == 2 and torch.equal(resumed.embeds, straight.embeds)


def test_loading_rejects_files_for_another_model_or_format(tmp_path):
    pipe = build_tiny_pipeline(0)
    wrong = PPlusEmbeds("<sks>", tuple(TINY_LAYERS[:5]), (0,) * 5, torch.zeros(5, 32))
    save_file({"embeds": wrong.embeds}, tmp_path / "pplus_embeds.safetensors", metadata=wrong.metadata())
    with pytest.raises(ValueError, match="learned for a UNet with 5 cross-attention layers.*this pipeline has 6"):
        load_pplus(pipe, tmp_path)
    save_file({"<sks>": torch.zeros(1, 32)}, tmp_path / "ti.safetensors")
    with pytest.raises(ValueError, match="not a P\\+ file"):
        read_pplus(tmp_path / "ti.safetensors")
    with pytest.raises(FileNotFoundError, match="pplus_embeds.safetensors"):
        read_pplus(tmp_path / "missing")
    assert json.loads(wrong.metadata()["layers"]) == TINY_LAYERS[:5]
    assert len(pipe.tokenizer) == 49408  # nothing was added to the pipeline
