"""Style transfer: the losses on hand-computed values, VGG-19's exact torchvision layout and its weight files, and
stylise on the seeded random VGG-19 at 32 px; the colour-preserving helpers by hand; the CLIP stack against
transformers' own hidden states (a tiny random CLIP); the style-image loader on every kind of bad file."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import nbutils.style_transfer as st
from nbutils.photos import DEFAULT_MAX_PIXELS
from nbutils.runs import REPO_ROOT
from nbutils.style_transfer import (
    STYLE_LAYERS,
    VGG19_LAYERS,
    content_loss,
    extract,
    gram_distance,
    gram_matrix,
    load_style_image,
    style_loss,
    stylise,
    stylise_batch,
    clip_vision_stack,
    luminance,
    match_colours,
    nst_defaults,
    toy_attribute_stack,
    vae_encoder_stack,
    vgg19_features,
    with_luminance,
)
from nbutils.toy_evaluators import ToyAttributeNet
from nbutils.toyworld import TOY_SUBJECT, portraits, render, with_fields

# torchvision's vgg19().features: a 3x3 conv (padding 1) + ReLU per conv, a 2x2 max pool after each block
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
POOL_INDICES = (4, 9, 18, 27, 36)


@pytest.fixture(scope="module")
def net() -> nn.Sequential:
    return vgg19_features(None, seed=0)


@pytest.fixture(scope="module")
def content() -> Image.Image:
    return render(with_fields(next(portraits(0, 1, identity=TOY_SUBJECT)), style="photo"), 32)


@pytest.fixture(scope="module")
def style() -> Image.Image:
    return render(with_fields(next(portraits(5, 1)), style="pop art"), 32)


# --- the losses -------------------------------------------------------------------------------------------------

TWO_CHANNELS = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
# F = [[1, 2, 3, 4], [0, 1, 0, 1]]: F F^T = [[30, 6], [6, 2]], divided by C*H*W = 8
TWO_CHANNELS_GRAM = torch.tensor([[[3.75, 0.75], [0.75, 0.25]]])


def test_gram_matrix_by_hand():
    gram = gram_matrix(TWO_CHANNELS)
    assert gram.shape == (1, 2, 2)
    torch.testing.assert_close(gram, TWO_CHANNELS_GRAM)
    batch = torch.cat([TWO_CHANNELS, 2 * TWO_CHANNELS])
    torch.testing.assert_close(gram_matrix(batch), torch.cat([TWO_CHANNELS_GRAM, 4 * TWO_CHANNELS_GRAM]))


def test_gram_matrix_does_not_grow_with_image_size():
    tiled = TWO_CHANNELS.repeat(1, 1, 3, 5)  # the same texture over 15x the area
    torch.testing.assert_close(gram_matrix(tiled), TWO_CHANNELS_GRAM)


def test_content_loss_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert content_loss(f, torch.zeros_like(f)).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert content_loss(f, f).item() == 0


def test_style_loss_by_hand():
    one_channel = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2): Gram (1 + 9) / 2 = 5
    features = {"a": TWO_CHANNELS, "b": one_channel, "unused": torch.randn(1, 3, 2, 2)}
    targets = {"a": torch.zeros(1, 2, 2), "b": torch.ones(1, 1, 1)}
    mse_a = (3.75**2 + 0.75**2 + 0.75**2 + 0.25**2) / 4
    mse_b = (5 - 1) ** 2
    loss = style_loss(features, targets, {"a": 2.0, "b": 0.5})
    assert loss.item() == pytest.approx(2.0 * mse_a + 0.5 * mse_b)  # 15.625
    assert style_loss(features, {"a": TWO_CHANNELS_GRAM}, {"a": 1.0}).item() == 0


# --- VGG-19 ---------------------------------------------------------------------------------------------------


def test_vgg19_has_torchvisions_keys_and_shapes_on_meta():
    net = vgg19_features(None, device="meta")
    expected = []
    in_channels = 3
    for index, channels in zip(CONV_INDICES, CONV_CHANNELS):
        expected += [(f"features.{index}.weight", (channels, in_channels, 3, 3)),
                     (f"features.{index}.bias", (channels,))]
        in_channels = channels
    assert [(f"features.{k}", tuple(v.shape)) for k, v in net.state_dict().items()] == expected
    assert len(net) == 37 and all(p.is_meta and not p.requires_grad for p in net.parameters())
    for index, module in enumerate(net):
        if index in CONV_INDICES:
            assert isinstance(module, nn.Conv2d) and module.padding == (1, 1) and module.stride == (1, 1)
        elif index in POOL_INDICES:
            assert isinstance(module, nn.MaxPool2d) and module.kernel_size == 2 and module.stride == 2
        else:
            assert isinstance(module, nn.ReLU)


def test_conventional_layer_names():
    assert sorted(VGG19_LAYERS.values()) == list(range(37))
    convs = [VGG19_LAYERS[n] for n in VGG19_LAYERS if n.startswith("conv")]
    assert tuple(convs) == CONV_INDICES
    assert all(VGG19_LAYERS[n.replace("conv", "relu")] == VGG19_LAYERS[n] + 1 for n in VGG19_LAYERS if "conv" in n)
    assert tuple(VGG19_LAYERS[f"pool{b}"] for b in range(1, 6)) == POOL_INDICES
    assert (VGG19_LAYERS["conv1_1"], VGG19_LAYERS["relu4_2"], VGG19_LAYERS["conv5_4"]) == (0, 22, 34)
    assert [VGG19_LAYERS[n] for n in STYLE_LAYERS] == [1, 6, 11, 20, 29]


def test_random_weights_are_seeded_kaiming(net):
    again, other = vgg19_features(None, seed=0), vgg19_features(None, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    assert not torch.equal(net[0].weight, other[0].weight)
    assert all(torch.count_nonzero(net[i].bias) == 0 for i in CONV_INDICES)
    for index, fan_in in ((0, 3 * 9), (34, 512 * 9)):  # Kaiming for ReLU: std = sqrt(2 / fan_in)
        assert net[index].weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)


@pytest.mark.parametrize("name, zipfile", [("vgg19.safetensors", None), ("vgg19.pth", True),
                                           ("vgg19-dcbe5a78.pth", False)])  # 2017's file: torch's legacy format
def test_published_keys_load_from_either_file_and_the_classifier_is_ignored(tmp_path, name, zipfile):
    source = vgg19_features(None, seed=1)  # not the random default (seed 0): loading must replace it
    state = {f"features.{k}": v.contiguous() for k, v in source.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=zipfile)
    loaded = vgg19_features(path)
    assert [k for k, _ in loaded.named_parameters()] == [k for k, _ in source.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), source.parameters()))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


_tripped: list[str] = []


def _trip() -> None:
    _tripped.append("arbitrary code ran")


class Tripwire:
    """Unpickling this object runs ``_trip``: what a malicious .pth could do."""

    def __reduce__(self):
        return _trip, ()


def test_pth_is_read_with_weights_only(tmp_path):
    path = tmp_path / "vgg19-dcbe5a78.pth"
    torch.save({"features.0.bias": torch.zeros(64), "payload": Tripwire()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        vgg19_features(path)
    assert _tripped == []


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        vgg19_features(tmp_path / "vgg19-dcbe5a78.pth")
    message = str(err.value)
    assert ("download torchvision's vgg19-dcbe5a78.pth from https://download.pytorch.org/models/vgg19-dcbe5a78.pth"
            in message)
    assert f"into {REPO_ROOT / 'data' / 'models' / 'vgg19'}/" in message and "weights=None" in message


def test_other_weight_files_are_refused_with_a_reason(tmp_path):
    save_file({"classifier.6.bias": torch.zeros(1000)}, tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match="holds no 'features.N.weight' tensors"):
        vgg19_features(tmp_path / "head.safetensors")
    (tmp_path / "vgg19.ckpt").write_bytes(b"\0")
    with pytest.raises(ValueError, match="expected a .safetensors file or torchvision's vgg19-dcbe5a78.pth"):
        vgg19_features(tmp_path / "vgg19.ckpt")


def test_extract_normalises_with_imagenet_statistics(net):
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = extract(net, image, ["pool5", "conv1_1", "relu1_1", "relu4_2"])
    assert list(feats) == ["conv1_1", "relu1_1", "relu4_2", "pool5"]  # network order
    assert [tuple(f.shape) for f in feats.values()] == [(2, 64, 32, 32), (2, 64, 32, 32), (2, 512, 4, 4),
                                                       (2, 512, 1, 1)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    by_hand = F.conv2d((image - mean) / std, net[0].weight, net[0].bias, padding=1)
    torch.testing.assert_close(feats["conv1_1"], by_hand)
    torch.testing.assert_close(feats["relu1_1"], by_hand.clamp(min=0))  # the ReLU did not overwrite conv1_1
    torch.testing.assert_close(extract(net[:2], image, ["relu1_1"])["relu1_1"], feats["relu1_1"])  # stops early
    with pytest.raises(ValueError, match="unknown VGG-19 layer 'relu6_1'"):
        extract(net, image, ["relu6_1"])


# --- stylise ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_style_loss_falls(net, content, style, optimizer):
    steps = 8
    out, history = stylise(content, style, net, steps=steps, optimizer=optimizer, progress=False)
    assert out.mode == "RGB" and out.size == content.size
    assert all(len(v) == steps + 1 for v in history.values())
    np.testing.assert_allclose(history["total"], np.add(history["content"], history["style"]), rtol=1e-6)
    assert history["style"][-1] < 0.5 * history["style"][0]
    assert history["content"][0] == 0  # it starts from the content image
    assert not np.array_equal(np.asarray(out), np.asarray(content))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255


@pytest.mark.parametrize("optimizer, lr", [("lbfgs", 1.0), ("adam", 0.3)])
def test_history_is_the_loss_by_hand_of_the_first_and_the_returned_image(net, content, optimizer, lr):
    """Gatys's loss written out: weighted content MSE at relu4_2 + 1e6 x the mean over the five style layers of the
    Gram MSE, the style image scaled to the content's longer side; the returned image was clamped at each step (a
    large Adam lr pushes pixels out of [0, 1]), so the loss recorded last is its own, up to 8-bit rounding."""
    wide = content.crop((0, 0, 32, 24))
    big_style = render(with_fields(next(portraits(5, 1)), style="pop art"), 64)
    out, history = stylise(wide, big_style, net, steps=6, optimizer=optimizer, lr=lr, progress=False)
    assert out.size == (32, 24)
    target = extract(net, _to_tensor(wide), ["relu4_2"])["relu4_2"]
    style_small = big_style.resize((32, 32), Image.Resampling.LANCZOS)
    grams = {k: gram_matrix(f) for k, f in extract(net, _to_tensor(style_small), STYLE_LAYERS).items()}

    def by_hand(image: Image.Image) -> tuple[float, float]:
        feats = extract(net, _to_tensor(image), ("relu4_2", *STYLE_LAYERS))
        style_term = 1e6 * sum(0.2 * F.mse_loss(gram_matrix(feats[k]), grams[k]) for k in STYLE_LAYERS)
        return F.mse_loss(feats["relu4_2"], target).item(), style_term.item()

    assert (history["content"][0], history["style"][0]) == pytest.approx(by_hand(wide), rel=1e-5)
    assert (history["content"][-1], history["style"][-1]) == pytest.approx(by_hand(out), rel=0.01)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_same_seed_same_pixels(net, content, style, optimizer):
    def run(seed: int) -> np.ndarray:
        out, _ = stylise(content, style, net, steps=3, optimizer=optimizer, seed=seed, init="noise", progress=False)
        return np.asarray(out)

    first = run(0)
    assert np.array_equal(first, run(0))
    assert not np.array_equal(first, run(1))


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_without_style_the_content_image_stays(net, content, style, optimizer):
    out, history = stylise(content, style, net, steps=4, optimizer=optimizer, style_weight=0.0, progress=False)
    assert np.array_equal(np.asarray(out), np.asarray(content))
    assert history["total"] == [0.0] * 5


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_nan_loss_returns_the_last_good_image_and_warns(net, content, style, optimizer, monkeypatch):
    calls = []

    def nan_from_the_12th_call(*args, **kwargs):  # L-BFGS's line search evaluates more than once per step
        calls.append(1)
        loss = style_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 12 else loss

    monkeypatch.setattr(st, "style_loss", nan_from_the_12th_call)
    with pytest.warns(RuntimeWarning, match=r"the loss of the image after \d+ of 20 steps is nan; returning the "
                                            r"image after \d+ steps.*Try a lower lr \(now 1\) or lower weights"):
        out, history = stylise(content, style, net, steps=20, optimizer=optimizer, lr=1.0, progress=False)
    kept = len(history["total"]) - 1  # steps whose image had a finite loss
    assert 0 < kept < 20 and all(np.isfinite(history["total"]))
    if optimizer == "adam":  # one evaluation per step: the 12th measures the image after 11 steps
        assert kept == 10
    monkeypatch.undo()
    clean, clean_history = stylise(content, style, net, steps=kept, optimizer=optimizer, lr=1.0, progress=False)
    assert np.array_equal(np.asarray(out), np.asarray(clean))
    assert clean_history == history


def test_infinite_weight_stops_at_once_with_the_starting_image(net, content, style):
    with pytest.warns(RuntimeWarning, match=r"after 0 of 5 steps is inf.*style_weight=inf"):
        out, history = stylise(content, style, net, steps=5, style_weight=float("inf"), progress=False)
    assert np.array_equal(np.asarray(out), np.asarray(content)) and history["total"] == []


def test_bad_choices_are_named(net, content, style):
    with pytest.raises(ValueError, match="optimizer='sgd': use 'lbfgs' or 'adam'"):
        stylise(content, style, net, optimizer="sgd")
    with pytest.raises(ValueError, match="init='white': use 'content' or 'noise'"):
        stylise(content, style, net, init="white")
    with pytest.raises(ValueError, match="colour='grey': use one of 'style', 'match', 'luminance', "
                                         "'luminance-matched'"):
        stylise(content, style, net, colour="grey")


def test_a_batch_under_adam_paints_each_image_as_alone(net, content, style):
    other = render(with_fields(next(portraits(3, 1, identity=TOY_SUBJECT)), style="photo"), 32)
    both, history = stylise_batch([content, other], [style], net, steps=3, optimizer="adam", progress=False)
    alone = [stylise(im, style, net, steps=3, optimizer="adam", progress=False) for im in (content, other)]
    for batched, (single, _) in zip(both, alone):  # Adam acts per pixel: only float rounding differs
        assert np.abs(np.asarray(batched, float) - np.asarray(single, float)).max() <= 1
    np.testing.assert_allclose(history["style"], np.mean([h["style"] for _, h in alone], axis=0), rtol=1e-4)
    with pytest.raises(ValueError, match="2 styles for 3 content images"):
        stylise_batch([content] * 3, [style] * 2, net)
    with pytest.raises(ValueError, match="the content images differ in size"):
        stylise_batch([content, content.resize((16, 16))], [style], net)


def test_toy_attribute_stack_names_the_attribute_nets_layers():
    attribute_net = ToyAttributeNet().eval().requires_grad_(False)  # random weights: only the layout matters here
    stack = toy_attribute_stack(attribute_net)
    assert (stack.content_layer, stack.style_layers) == ("act3_2", ("act1_1", "act2_1", "act3_1", "act4_1"))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = extract(stack, x, ["act4_1", "act1_1", "act3_2"])
    assert {k: tuple(f.shape) for k, f in feats.items()} == {"act1_1": (2, 32, 32, 32), "act3_2": (2, 128, 8, 8),
                                                            "act4_1": (2, 128, 4, 4)}
    body = attribute_net.body
    torch.testing.assert_close(feats["act1_1"], body[2](body[1](body[0]((x - 0.5) / 0.5))))  # its own scaling
    full = attribute_net.body[:20]((x - 0.5) / 0.5)
    torch.testing.assert_close(extract(stack, x, ["act4_2"])["act4_2"], full)
    with pytest.raises(ValueError, match="unknown toy attribute net layer 'relu4_2'"):
        extract(stack, x, ["relu4_2"])


def test_gram_distance_is_the_unweighted_style_loss(net, content, style):
    far, near = gram_distance(net, [content, style], style)
    assert near < 1e-12 < 1e-6 * far  # its own style: zero up to float rounding in a batch
    feats = extract(net, _to_tensor(content), STYLE_LAYERS)
    grams = {k: gram_matrix(f) for k, f in extract(net, _to_tensor(style), STYLE_LAYERS).items()}
    assert far == pytest.approx(style_loss(feats, grams, {k: 0.2 for k in STYLE_LAYERS}).item(), rel=1e-5)


def test_a_style_set_is_the_mean_of_its_gram_matrices(net, content, style):
    other = render(with_fields(next(portraits(6, 1)), style="pop art"), 32)
    _, history = stylise(content, [style, other], net, steps=0, style_weight=1.0, style_layers=["relu1_1"],
                         progress=False)
    feats = {k: extract(net, _to_tensor(im), ["relu1_1"])["relu1_1"] for k, im in (("c", content), ("a", style),
                                                                                    ("b", other))}
    mean = (gram_matrix(feats["a"]) + gram_matrix(feats["b"])) / 2
    assert history["style"][0] == pytest.approx(F.mse_loss(gram_matrix(feats["c"]), mean).item(), rel=1e-5)
    twice, _ = stylise(content, [style, style], net, steps=2, optimizer="adam", progress=False)
    once, _ = stylise(content, style, net, steps=2, optimizer="adam", progress=False)
    assert np.array_equal(np.asarray(twice), np.asarray(once))


# --- keeping the content's colours (Gatys et al. 2017) ---------------------------------------------------------


def test_luminance_by_hand():
    pixels = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 0.5]]).view(1, 3, 1, 3)  # red, green, grey
    torch.testing.assert_close(luminance(pixels), torch.tensor([0.299, 0.587, 0.5]).view(1, 1, 1, 3))


def test_with_luminance_keeps_yiq_chrominance():
    rgb = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)  # Y = 0.0598 + 0.2348 + 0.0684 = 0.363
    out = with_luminance(rgb, torch.full((1, 1, 1, 1), 0.463))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.3, 0.5, 0.7]))  # + 0.1 on every channel
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    before, after = yiq @ rgb.flatten(), yiq @ out.flatten()
    torch.testing.assert_close(after[1:], before[1:])  # I and Q unchanged
    assert after[0].item() == pytest.approx(0.463, abs=1e-3)
    assert with_luminance(rgb, torch.ones(1, 1, 1, 1)).max().item() == 1.0  # clamped


def test_match_colours_by_hand_and_its_statistics():
    g = torch.Generator().manual_seed(0)
    target = 0.3 + 0.4 * torch.rand(2, 3, 6, 6, generator=g)
    source = 0.5 * target + 0.1  # covariance / 4, mean shifted: the map is x -> 2 (x - 0.1)
    torch.testing.assert_close(match_colours(source, target, eps=0), target, atol=1e-5, rtol=0)
    source = 0.4 + 0.2 * torch.rand(2, 3, 5, 7, generator=g)  # another size; values stay inside [0, 1]
    mapped = match_colours(source, target, eps=0)
    assert mapped.shape == source.shape

    def stats(x):
        flat = x.flatten(2)
        centred = flat - flat.mean(2, keepdim=True)
        return flat.mean(2), centred @ centred.transpose(1, 2) / flat.shape[2]

    for got, want in zip(stats(mapped), stats(target)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("colour", ["luminance", "luminance-matched"])
def test_luminance_mode_keeps_the_contents_colours(net, content, style, colour):
    out, history = stylise(content, style, net, steps=4, optimizer="adam", colour=colour, progress=False)
    before, after = _to_tensor(content), _to_tensor(out)
    delta = after - before  # the same on every channel, up to 8-bit rounding, where nothing was clamped
    inside = ((after > 0) & (after < 1)).all(1, keepdim=True).expand_as(delta)
    spread = (delta.max(1, keepdim=True).values - delta.min(1, keepdim=True).values).expand_as(delta)
    assert spread[inside].max().item() <= 1.5 / 255
    assert delta.abs().max().item() > 0.05 and history["style"][-1] < history["style"][0]
    unchanged, _ = stylise(content, style, net, steps=3, optimizer="adam", colour=colour, style_weight=0.0,
                           progress=False)
    assert np.abs(np.asarray(unchanged, float) - np.asarray(content, float)).max() <= 1


def test_match_mode_paints_with_the_colour_matched_style(net, content, style, monkeypatch):
    seen = []
    monkeypatch.setattr(st, "gram_matrix", lambda f: seen.append(f) or gram_matrix(f))
    stylise(content, style, net, steps=0, colour="match", style_layers=["conv1_1"], progress=False)
    matched = match_colours(_to_tensor(style.resize(content.size, Image.Resampling.LANCZOS)), _to_tensor(content))
    torch.testing.assert_close(seen[0], extract(net, matched, ["conv1_1"])["conv1_1"], atol=1e-3, rtol=1e-3)


def test_nst_defaults_per_tier():
    assert nst_defaults("toy") == nst_defaults("tiny") == {"features": "vgg19-random", "colour": "luminance",
                                                           "style_weight": 1e8}
    assert nst_defaults("real") == {"features": "vgg19", "colour": "style", "style_weight": 1e6}
    nst_defaults("toy")["colour"] = "style"  # a copy: the table is not changed
    assert nst_defaults("toy")["colour"] == "luminance" and st.NST_DEFAULTS["toy"]["colour"] in st.COLOURS
    with pytest.raises(ValueError, match="unknown tier 'sdxl'"):
        nst_defaults("sdxl")


# --- the CLIP image tower as a feature stack -------------------------------------------------------------------


def test_clip_stack_reads_transformers_patch_tokens():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4)
    vision = CLIPVisionModel(config).eval()
    stack = clip_vision_stack(vision, "tiny CLIP")
    assert list(stack.layers) == ["patches", "tokens", "layer1", "layer2"]
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pixels = (x - torch.tensor(st.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(st.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states  # tokens, layer1, layer2
        feats = extract(stack, x, stack.layers)
    assert {k: tuple(f.shape) for k, f in feats.items()} == {k: (2, 16, 4, 4) for k in stack.layers}
    for name, h in zip(("tokens", "layer1", "layer2"), hidden):  # the class token dropped, a 4 x 4 grid
        torch.testing.assert_close(feats[name], h[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4))
    patches = F.conv2d(pixels, vision.embeddings.patch_embedding.weight, stride=4)
    torch.testing.assert_close(feats["patches"], patches)
    assert (stack.content_layer, stack.style_layers) == ("layer2", ("patches", "layer1"))
    assert not any(p.requires_grad for p in stack.net.parameters())


def test_vae_encoder_stack_names_the_encoders_blocks():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=16).eval()
    stack = vae_encoder_stack(vae)
    assert list(stack.layers) == ["conv_in", "res1", "down1", "res2", "mid"]  # the last block does not downsample
    assert (stack.content_layer, stack.style_layers) == ("res2", ("conv_in", "res1"))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    feats = extract(stack, x, stack.layers)
    assert {k: tuple(f.shape) for k, f in feats.items()} == {"conv_in": (1, 8, 16, 16), "res1": (1, 8, 16, 16),
                                                            "down1": (1, 8, 8, 8), "res2": (1, 16, 8, 8),
                                                            "mid": (1, 16, 8, 8)}
    with torch.no_grad():
        encoder = vae.encoder
        h = encoder.mid_block(encoder.down_blocks[1](encoder.down_blocks[0](encoder.conv_in(x * 2 - 1))))
    torch.testing.assert_close(feats["mid"], h)  # diffusers' own encoder, [-1, 1] input, up to its last norm


# --- the style image ------------------------------------------------------------------------------------------


def snapshot(path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_a_file_that_is_not_an_image_says_what_to_do(tmp_path):
    path = tmp_path / "starry_night.jpg"
    path.write_text("this is text, not a JPEG")
    before = snapshot(path)
    with pytest.raises(ValueError, match=r"style image starry_night.jpg: cannot be read as an image \(.*\): "
                                         r"re-export it as jpg or png"):
        load_style_image(path)
    assert snapshot(path) == before


def test_a_tiny_image_is_refused_naming_the_minimum(tmp_path):
    path = tmp_path / "icon.png"
    Image.new("RGB", (40, 80), (10, 20, 30)).save(path)
    with pytest.raises(ValueError, match=r"style image icon.png: too small \(40x80 px\): .* at least 64 px on the "
                                         r"shorter side"):
        load_style_image(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No style image at .*nowhere.png"):
        load_style_image(tmp_path / "nowhere.png")


def _grey(path):
    Image.new("L", (100, 80), 128).save(path)
    return (128, 128, 128)


def _cmyk(path):
    Image.new("RGB", (100, 80), (200, 40, 40)).convert("CMYK").save(path)
    return (200, 40, 40)


def _rgba(path):
    Image.new("RGBA", (100, 80), (0, 0, 0, 0)).save(path)  # transparent black
    return (255, 255, 255)


def _sixteen_bit(path):
    Image.fromarray(np.full((80, 100), 32896, dtype=np.uint16)).save(path)  # 32896 / 257 = 128
    return (128, 128, 128)


@pytest.mark.parametrize("name, write", [("grey.png", _grey), ("cmyk.jpg", _cmyk), ("cutout.png", _rgba),
                                         ("deep.png", _sixteen_bit)])
def test_other_modes_become_rgb_and_the_file_is_untouched(tmp_path, name, write):
    path = tmp_path / name
    colour = write(path)
    assert Image.open(path).mode in ("L", "CMYK", "RGBA", "I;16")
    before = snapshot(path)
    image = load_style_image(path)
    assert image.mode == "RGB" and image.size == (100, 80)
    np.testing.assert_allclose(np.asarray(image, dtype=float).reshape(-1, 3).mean(0), colour, atol=6)
    assert snapshot(path) == before


def test_a_20_megapixel_image_is_downscaled(tmp_path):
    path = tmp_path / "scan.jpg"
    Image.new("RGB", (5000, 4000), (90, 140, 200)).save(path, quality=80)
    before = snapshot(path)
    image = load_style_image(path)
    w, h = image.size
    assert 0.9 * DEFAULT_MAX_PIXELS < w * h <= DEFAULT_MAX_PIXELS and abs(w / h - 1.25) < 0.01
    np.testing.assert_allclose(np.asarray(image, dtype=float).reshape(-1, 3).mean(0), (90, 140, 200), atol=3)
    assert snapshot(path) == before
