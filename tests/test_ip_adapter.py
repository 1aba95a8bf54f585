"""IP-Adapter on the tiny tier: lambda = 0 is the base model, the aggregations, the published file format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nbutils import ip_adapter as ipa
from nbutils.models import ModelUnavailable, build_tiny_pipeline
from nbutils.sampling import generate
from nbutils.train import Batch, diffusion_loss

D = 16  # image-embedding width of the tests (the toy CLIP's is 64)


def _adapted(scale: float = 1.0, seed: int = 0):
    """A fresh tiny pipeline with an adapter whose W'_k, W'_v are moved off their copies (so they matter)."""
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    ipa.install_ip_adapter(pipe.unet, D, scale=scale, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ipa.ip_adapter_parameters(pipe.unet):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return pipe


def _unet_inputs(pipe, b: int = 2):
    g = torch.Generator().manual_seed(1)
    size = pipe.unet.config.sample_size
    sample = torch.randn(b, 4, size, size, generator=g)
    text = torch.randn(b, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), text, torch.randn(b, D, generator=g)


def test_install_copies_text_keys_and_values_and_uses_diffusers_classes():
    pipe = build_tiny_pipeline(seed=0)
    ipa.install_ip_adapter(pipe.unet, D)
    unet = pipe.unet
    names = ipa.cross_attention_processors(unet)
    assert len(names) == 6 and unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert type(unet.encoder_hid_proj).__name__ == "MultiIPAdapterImageProjection"
    for name, proc in zip(names, ipa.ip_processors(unet)):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert type(proc).__name__ == "IPAdapterAttnProcessor2_0"
        assert torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight)
    state = ipa.ip_adapter_state_dict(unet)
    assert state["image_proj.proj.weight"].shape == (ipa.NUM_TOKENS * 32, D)
    assert sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")}) == [1, 3, 5, 7, 9, 11]


def test_lambda_zero_is_exactly_the_base_unet():
    base = build_tiny_pipeline(seed=0)
    sample, t, text, embeds = _unet_inputs(base)
    with torch.no_grad():
        expected = base.unet(sample, t, text).sample
        pipe = _adapted(scale=0.0)
        at_zero = pipe.unet(sample, t, text, added_cond_kwargs=ipa.ip_added_cond(embeds)).sample
        ipa.set_ip_scale(pipe.unet, 1.0)
        at_one = pipe.unet(sample, t, text, added_cond_kwargs=ipa.ip_added_cond(embeds)).sample
    assert torch.equal(at_zero, expected)
    assert (at_one - expected).abs().max() > 1e-3  # the image tokens do act at lambda = 1


def test_only_the_adapter_gets_gradients_through_diffusion_loss():
    from diffusers import DDPMScheduler

    pipe = _adapted()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    params = ipa.ip_adapter_parameters(pipe.unet)
    for p in params:
        p.requires_grad_(True)
    sample, t, text, embeds = _unet_inputs(pipe)
    batch = Batch(sample, ["", ""], torch.randn_like(sample), t)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    diffusion_loss(ipa.WithImagePrompt(pipe.unet, embeds), sched, batch, text).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert pipe.unet.conv_in.weight.grad is None
    assert len(params) == 4 + 2 * 6  # projection (weight, bias, norm weight, norm bias) + W'_k, W'_v per layer


@pytest.mark.parametrize("how", ipa.AGGREGATIONS)
def test_aggregation_shapes(how):
    pool = ipa.SelfAttentionPool(D)
    embeds = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(0))
    out = ipa.aggregate(embeds, how, pool)
    assert out.shape == (3, D)
    assert ipa.aggregate(embeds[0], how, pool).shape == (D,)
    assert torch.allclose(ipa.aggregate(embeds[0], how, pool), out[0], atol=1e-6)
    if how == "single":
        assert torch.equal(out, embeds[:, 0])
    prompt = ipa.image_prompt_embeds(out[0])
    assert len(prompt) == 1 and prompt[0].shape == (2, 1, D) and not prompt[0][0].any()


def test_untrained_attention_pool_is_mean_pooling():
    embeds = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(0))
    pool = ipa.SelfAttentionPool(D)
    assert torch.allclose(ipa.aggregate(embeds, "attention", pool), embeds.mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("how", ["max", "mean", "attention"])
def test_pooled_aggregations_ignore_the_order_of_the_references(how):
    g = torch.Generator().manual_seed(0)
    pool = ipa.SelfAttentionPool(D)
    with torch.no_grad():  # a trained-looking pool: its output layer is no longer zero
        pool.attn.out_proj.weight.normal_(generator=g)
    embeds = torch.randn(2, 5, D, generator=g)
    shuffled = embeds[:, torch.randperm(5, generator=g)]
    out, out_shuffled = ipa.aggregate(embeds, how, pool), ipa.aggregate(shuffled, how, pool)
    assert torch.allclose(out, out_shuffled, atol=1e-5)
    if how == "attention":
        assert not torch.allclose(out, embeds.mean(dim=1), atol=1e-3)
    with pytest.raises(ValueError, match="aggregation"):
        ipa.aggregate(embeds, "median")


def test_saved_adapter_loads_with_diffusers_and_draws_the_same_pixels(tmp_path):
    pipe = _adapted(scale=0.7)
    embedding = torch.randn(D, generator=torch.Generator().manual_seed(3))
    kwargs = dict(steps=2, guidance_scale=4.0, ip_adapter_image_embeds=ipa.image_prompt_embeds(embedding))
    trained = generate(pipe, "a photo of a person", [0, 1], **kwargs)
    pool = ipa.SelfAttentionPool(D, seed=5)
    ipa.save_ip_adapter(pipe.unet, tmp_path, aggregator=pool, metadata={"recipe": {"steps": 1}})
    fresh = build_tiny_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    ipa.load_ip_adapter(fresh, tmp_path, scale=0.7)  # pipe.load_ip_adapter underneath
    loaded = generate(fresh, "a photo of a person", [0, 1], **kwargs)
    for a, b in zip(trained, loaded):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(trained[0]), np.asarray(generate(
        build_tiny_pipeline(seed=0), "a photo of a person", [0], steps=2, guidance_scale=4.0)[0]))
    again = ipa.load_aggregator(tmp_path, D)
    assert all(torch.equal(a, b) for a, b in zip(pool.state_dict().values(), again.state_dict().values()))


def test_published_adapter_offline_fails_with_one_sentence(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    for source in (str(tmp_path / "no-adapter-here"), ipa.PUBLISHED_REPO):  # HF_HUB_OFFLINE=1 in the tests
        with pytest.raises(ModelUnavailable) as err:
            ipa.load_published_ip_adapter(pipe, source)
        message = str(err.value)
        assert "huggingface-cli download h94/IP-Adapter models/ip-adapter_sd15.safetensors" in message
        assert message.count(". ") == 0 and message.endswith(".")  # one sentence
        assert err.value.__cause__ is None and err.value.__suppress_context__
    assert pipe.unet.config.encoder_hid_dim_type is None  # nothing half-installed


def test_toy_image_encoder_gives_64d_features_that_tell_people_apart():
    from PIL import Image

    from nbutils.domain import render_domain

    dom = render_domain(0, people=2, photos_per_person=3)
    images = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in dom.images.flatten(0, 1)]
    feats = torch.nn.functional.normalize(ipa.ImageEncoder.toy()(images), dim=1)
    assert feats.shape == (6, 64)
    sim = feats @ feats.T
    same = (sim[:3, :3].sum() - 3) / 6 + (sim[3:, 3:].sum() - 3) / 6
    assert same / 2 > sim[:3, 3:].mean()  # photos of one person are closer than photos of two


def test_pretraining_refuses_more_people_than_the_toy_world_has(capsys):
    import importlib.util

    from nbutils.runs import REPO_ROOT

    spec = importlib.util.spec_from_file_location("train_toy_ip_adapter", REPO_ROOT / "scripts" / "train_toy_ip_adapter.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.MAX_PEOPLE == 808  # 3 faces x 3 skins x 5 hair colours x 3 styles x 3 accessories x 2 marks - 2
    with pytest.raises(SystemExit):
        script.main(["--people", "1500"])  # domain_identities would search forever
    assert "--people must be 1..808" in capsys.readouterr().err


def test_notebook_entry_points_resolve_load_and_describe_the_shipped_adapter(tmp_path):
    assert ipa.pretrained_source("auto", "toy") == ipa.TOY_ADAPTER_DIR
    assert ipa.pretrained_source("auto", "real") == ipa.PUBLISHED_REPO
    assert ipa.pretrained_source(str(tmp_path), "real") == tmp_path
    with pytest.raises(ValueError, match="No IP-Adapter is trained for the tiny tier"):
        ipa.pretrained_source("auto", "tiny")
    assert ipa.load_aggregator(tmp_path, 64) is None
    assert ipa.read_recipe("h94/IP-Adapter") == {"source": "h94/IP-Adapter (published weights)"}
    recipe = ipa.read_recipe(ipa.TOY_ADAPTER_DIR)
    assert recipe["people"] == 808 and recipe["photos"] >= 2 and 0 < recipe["minutes"] <= 60
    from nbutils.models import load_pipeline

    pipe = load_pipeline("toy")
    encoder = ipa.attach(pipe, ipa.TOY_ADAPTER_DIR, scale=0.5)
    assert encoder.dim == 64 and pipe.unet.encoder_hid_proj is not None
    assert all(p.scale == [0.5] for p in ipa.ip_processors(pipe.unet))
    assert ipa.load_aggregator(ipa.TOY_ADAPTER_DIR, encoder.dim) is not None
