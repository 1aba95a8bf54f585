"""E4T (nbutils.e4t) on the tiny tier: shapes, the offset's scale and regulariser, what one step trains, the saved
files in a fresh pipeline, and resuming the pretraining script."""
import importlib.util
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nbutils.e4t import (PLACEHOLDER, WEIGHTS_NAME, E4T, E4TConfig, E4TPersonalise, encode_with_subject_vectors,
                         load_personalised, read_config, weight_offset_l2)
from nbutils.models import build_tiny_pipeline, ensure_tiny_pipeline
from nbutils.runs import REPO_ROOT, new_run
from nbutils.sampling import generate
from nbutils.text import tokenize
from nbutils.toy_evaluators import TOY_CLIP_DIR
from nbutils.train import Batch, TrainConfig, train

CONFIG = E4TConfig(clip_dir=str(TOY_CLIP_DIR), hidden=16, scale=0.1, offset_l2=0.5, weight_l2=2.0, rank=2, alpha=2.0)


def tiny(seed=0):
    pipe = build_tiny_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=[False, True], ids=["clip-features", "latent-branch"])
def pretrained(tmp_path_factory, request):
    """An ``e4t.safetensors`` as pretraining writes it, with non-zero encoder output and weight offsets (an encoder
    reading CLIP features only, and one with the latent branch)."""
    method = E4T(tiny(), replace(CONFIG, latent_branch=request.param))
    with torch.no_grad():
        torch.manual_seed(1)
        for p in method.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("e4t")
    save_file({k: v.contiguous() for k, v in method.state_dict_to_save().items()}, str(folder / WEIGHTS_NAME),
              metadata=method.save_metadata())
    return folder


def test_features_offset_and_text_shapes():
    method = E4T(tiny(), CONFIG)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    features = method.tower(images)
    assert features.shape == (3, 448) and method.tower.dim == 448  # 4 x 96 (3 class tokens + mean patch) + 64
    vectors, offsets = method.subject_vectors(features)
    assert vectors.shape == offsets.shape == (3, 32)  # the tiny text encoder's width
    assert torch.equal(offsets, torch.zeros(3, 32))  # the output layer starts at zero: the class word itself
    assert torch.equal(vectors[0], method.class_embedding)
    # each caption's placeholder reads its own row: the same as that row written into the encoder's matrix
    captions = [f"a photo of {PLACEHOLDER} person", f"a sketch of {PLACEHOLDER} person"]
    rows = torch.randn(2, 32)
    text = encode_with_subject_vectors(method.pipe, captions, method.token_id, rows)
    assert text.shape == (2, 77, 32)
    encoder = method.pipe.text_encoder
    weight = encoder.get_input_embeddings().weight
    kept = weight[method.token_id].detach().clone()
    for b in range(2):
        with torch.no_grad():
            weight[method.token_id] = rows[b]
            alone = encoder(tokenize(method.pipe.tokenizer, captions[b:b + 1])).last_hidden_state
            weight[method.token_id] = kept
        torch.testing.assert_close(text[b], alone[0])


def test_offset_is_scaled_and_regularised():
    method = E4T(tiny(), CONFIG)
    features = torch.randn(4, 448)
    with torch.no_grad():
        method.encoder.net[-1].weight.normal_()
    raw = method.encoder.net(features)
    _, offsets = method.subject_vectors(features)
    torch.testing.assert_close(offsets, 0.1 * raw)
    assert weight_offset_l2(method.pipe.unet).item() == 0.0  # B starts at zero
    layer = method.pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(weight_offset_l2(method.pipe.unet), delta.pow(2).sum())
    expected = 0.5 * offsets.pow(2).sum(-1).mean() + 2.0 * delta.pow(2).sum()
    torch.testing.assert_close(method.regulariser(offsets), expected)


def test_one_step_trains_encoder_and_weight_offsets():
    method = E4T(tiny(), CONFIG)
    before = {k: v.clone() for k, v in method.state_dict_to_save().items()}
    frozen = {k: v.clone() for k, v in method.pipe.unet.state_dict().items() if "lora" not in k}
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(2, 4, 4, 4, generator=g), [f"a photo of {PLACEHOLDER} person"] * 2,
                  torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 700]))
    optimizer = method.make_optimizer(TrainConfig(lr=1e-2))
    loss, parts = method.domain_loss(batch, torch.randn(2, 448, generator=g))
    loss.backward()
    optimizer.step()
    after = method.state_dict_to_save()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("unet.") and "lora.up" in k for k in changed)
    assert all(torch.equal(v, method.pipe.unet.state_dict()[k]) for k, v in frozen.items())  # base UNet frozen
    assert parts["offset_norm"] == 0.0 and parts["diffusion"] > 0


def test_latent_branch_reads_the_latents():
    method = E4T(tiny(), replace(CONFIG, latent_branch=True))
    with torch.no_grad():
        method.encoder.net[-1].weight.normal_()
    features, latents = torch.randn(2, 448), torch.randn(2, 4, 4, 4)
    vectors, offsets = method.subject_vectors(features, latents)
    assert vectors.shape == (2, 32)
    other, _ = method.subject_vectors(features, latents.flip(0))
    assert not torch.allclose(vectors, other)  # the latents change the word
    with pytest.raises(ValueError, match="latents"):
        method.subject_vectors(features)


def test_personalised_files_round_trip(pretrained, photo, tmp_run_dir):
    assert replace(read_config(pretrained), latent_branch=False) == CONFIG
    pipe = tiny()
    method = E4TPersonalise(pipe, pretrained, photo)
    start = method.vector()[0].detach().clone()
    assert start.norm() > 0  # the pretrained encoder moves the word from the photo alone
    caption = f"a photo of {PLACEHOLDER} person"
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, resolution=32)
    result = train(method, [(photo, caption)], cfg, new_run("e4t", {}, out_dir=tmp_run_dir))
    assert not torch.equal(method.vector()[0], start)  # tuning moved the subject word
    ti_file, lora_file = method.save_personalised(result.checkpoint)
    assert torch.equal(load_file(ti_file)[PLACEHOLDER], method.vector()[0].detach())
    fresh = tiny()
    load_personalised(fresh, result.checkpoint)
    same = generate(pipe, caption, [3], steps=2, guidance_scale=3.0, progress=False)[0]
    loaded = generate(fresh, caption, [3], steps=2, guidance_scale=3.0, progress=False)[0]
    assert np.array_equal(np.asarray(same), np.asarray(loaded))
    plain = generate(tiny(), "a photo of a person", [3], steps=2, guidance_scale=3.0, progress=False)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(loaded))  # and something was learned


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_toy_e4t", REPO_ROOT / "scripts" / "train_toy_e4t.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_toy_e4t"] = module
    spec.loader.exec_module(module)
    return module


def test_pretraining_resumes_exactly(script, tmp_path):
    model = str(ensure_tiny_pipeline())
    common = ["--model", model, "--people", "6", "--photos", "2", "--steps", "4", "--batch", "2", "--warmup", "1",
              "--checkpoint-every", "2", "--cache", str(tmp_path / "cache")]
    whole = script.main(common + ["--runs", str(tmp_path / "a"), "--out", str(tmp_path / "out_a")])
    assert script.main(common + ["--runs", str(tmp_path / "b"), "--out", str(tmp_path / "out_b"),
                                 "--stop-after", "2"]) is None
    resumed = script.main(common + ["--runs", str(tmp_path / "b"), "--out", str(tmp_path / "out_b")])
    a, b = load_file(whole / WEIGHTS_NAME), load_file(resumed / WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the domain was rendered once


def test_notebook_entry_points_find_and_describe_the_shipped_e4t(tmp_path):
    from nbutils import e4t as e4t_module

    assert e4t_module.pretrained_folder("auto", "toy") == e4t_module.TOY_E4T_DIR
    with pytest.raises(FileNotFoundError, match="No pretrained E4T for the real tier"):
        e4t_module.pretrained_folder("auto", "real")
    with pytest.raises(FileNotFoundError, match="make toy-encoders"):
        e4t_module.pretrained_folder(tmp_path, "toy")
    recipe = e4t_module.read_recipe(e4t_module.TOY_E4T_DIR)
    assert recipe["people"] == 800 and recipe["steps"] > 0 and 0 < recipe["minutes"] <= 60
