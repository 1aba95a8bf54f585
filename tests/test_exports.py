"""Exports for other tools on the tiny random pipeline: names and alpha of the kohya LoRA, A1111's embedding, the
same pixels when diffusers loads each export in a fresh pipeline (of randomised weights, and of runs trained by
``nbutils.train``), and bad input refused with the fix."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbutils.combos import PivotalTuning, load_pivotal, save_pivotal
from nbutils.exports import export_lora_kohya, export_pivotal, export_ti_a1111, load_lora_checked
from nbutils.lora import LoRA, add_lora, load_lora, lora_layers
from nbutils.models import build_tiny_pipeline
from nbutils.runs import new_run
from nbutils.sampling import generate
from nbutils.textual_inversion import TextualInversion, load_textual_inversion
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, train

PROMPT = "a watercolor painting of <sks> person"
Q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a kohya layer name


@pytest.fixture(scope="module")
def dataset():
    """Three 32 px renders of the toy subject, captioned with the placeholder ``<sks>``."""
    people = portraits(0, 3, identity=TOY_SUBJECT)
    return [(render(p, 32), f"a photo of <sks> person, view {i}") for i, p in enumerate(people)]


def trained(method, dataset, run_dir: Path):
    """``method`` after 2 steps of ``nbutils.train.train`` (batch 2, lr 5e-2, 32 px); its final checkpoint folder."""
    cfg = TrainConfig(steps=2, batch_size=2, lr=5e-2, resolution=32)
    return train(method, dataset, cfg, new_run("t", {}, out_dir=run_dir)).checkpoint


def drawn(pipe, prompt: str = PROMPT) -> np.ndarray:
    """Two seeded 32 px images from ``nbutils.sampling.generate`` (2 steps, guidance 2) as (2, 32, 32, 3) uint8."""
    images = generate(pipe, prompt, [0, 1], steps=2, guidance_scale=2.0, progress=False)
    return np.stack([np.asarray(image) for image in images])


def assert_kohya_names(state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """Every tensor is one of kohya's three per layer (``lora_unet_<layer>`` / ``lora_te_text_model_<layer>``, dots
    as ``_``): ``.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r), ``.alpha`` (0-d float32)."""
    pattern = r"lora_(unet|te_text_model)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)"
    assert state and all(re.fullmatch(pattern, k) for k in state), sorted(state)[:3]
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert len(state) == 3 * len(layers)
    for layer in layers:
        down, up, a = (state[f"{layer}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == rank and up.shape[1] == rank
        assert a.shape == () and a.dtype == torch.float32 and a.item() == alpha


def tiny() -> StableDiffusionPipeline:
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, prompt: str = PROMPT, **kwargs) -> torch.Tensor:
    """One 32 px image (1, 3, 32, 32) for a fixed seed."""
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt",
                **kwargs).images


def randomise(tensors, seed: int, std: float = 0.1) -> None:
    """Overwrite ``tensors`` in place with seeded N(0, std^2) numbers (LoRA's B starts at zero: this makes it draw)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=generator) * std)


def random_lora(pipe, **kwargs) -> LoRA:
    lora = LoRA(pipe, rank=4, alpha=8, **kwargs)
    randomise([v for k, v in lora.state_dict_to_save().items() if ".up." in k], seed=1)
    return lora


def save_lora(lora: LoRA, file: Path) -> Path:
    """The run checkpoint's LoRA file: its tensors and header, as ``nbutils.train`` writes them."""
    save_file({k: v.detach().contiguous() for k, v in lora.state_dict_to_save().items()}, file,
              metadata=lora.save_metadata())
    return file


def lora_free(pipe) -> bool:
    return not any("lora_" in k for m in (pipe.unet, pipe.text_encoder) for k in m.state_dict())


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_kohya_export_keeps_names_tensors_and_alpha_and_draws_the_same_pixels(tmp_path, train_text_encoder):
    source = save_lora(random_lora(tiny(), train_text_encoder=train_text_encoder), tmp_path / "lora.safetensors")
    out = export_lora_kohya(source, tmp_path / "a1111" / "sks-lora.safetensors")
    assert out == tmp_path / "a1111" / "sks-lora.safetensors" and [p.name for p in out.parent.iterdir()] == [out.name]

    ours, kohya = load_file(source), load_file(out)
    assert len(kohya) == len(ours) // 2 * 3  # down, up and alpha per layer
    unet_q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora"
    assert torch.equal(kohya[f"lora_unet_{Q}.lora_down.weight"], ours[f"{unet_q}.down.weight"])
    assert torch.equal(kohya[f"lora_unet_{Q}.lora_up.weight"], ours[f"{unet_q}.up.weight"])
    assert f"lora_unet_{Q.replace('to_q', 'to_out_0')}.alpha" in kohya
    te_q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # SD1.5's kohya name, as A1111 and ComfyUI map it
    assert (f"{te_q}.lora_down.weight" in kohya) == train_text_encoder
    if train_text_encoder:
        te_ours = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"
        assert torch.equal(kohya[f"{te_q}.lora_up.weight"], ours[te_ours])
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert all(a.shape == () and a.dtype == torch.float32 and a.item() == 8.0 for a in alphas)  # not the rank, 4
    with safe_open(out, "pt") as f:
        header = f.metadata()
    assert (header["ss_network_dim"], header["ss_network_alpha"], header["ss_network_module"]) == (
        "4", "8.0", "networks.lora")
    assert json.loads(header["source.lora_adapter_metadata"])["unet.lora_alpha"] == 8

    original, exported = tiny(), tiny()
    load_lora(original, source)
    load_lora_checked(exported, out)  # diffusers' load_lora_weights reads the kohya file
    drawn = images(original)
    assert torch.equal(images(exported), drawn)
    # The comparison can fail: the base model, and the LoRA at the strength diffusers' default alpha (= rank) gives.
    assert not torch.allclose(images(original, cross_attention_kwargs={"scale": 0.0}), drawn, atol=1e-3)
    assert not torch.allclose(images(original, cross_attention_kwargs={"scale": 4 / 8}), drawn, atol=1e-3)


def test_pivotal_tuning_exports_draw_the_same_pixels_as_its_diffusers_files(tmp_path):
    method = PivotalTuning(tiny(), rank=4, alpha=8)
    randomise([v for k, v in method.lora.state_dict_to_save().items() if ".up." in k], seed=1)
    randomise([method.ti.embeds], seed=2, std=1.0)
    folder = save_pivotal(method, tmp_path / "pivotal")
    a1111 = tmp_path / "a1111"
    lora_out = export_lora_kohya(folder / "pytorch_lora_weights.safetensors", a1111 / "sks-lora.safetensors")
    ti_out = export_ti_a1111(folder / "learned_embeds.safetensors", a1111 / "sks.safetensors", "<sks>")

    original, exported = tiny(), tiny()
    load_pivotal(original, folder)
    load_textual_inversion(exported, ti_out, token="<sks>")
    load_lora_checked(exported, lora_out)
    drawn = images(original)
    assert torch.equal(images(exported), drawn)
    assert not torch.allclose(images(original, "a watercolor painting of person"), drawn, atol=1e-3)


def test_a1111_embedding_loads_the_same_rows_and_pixels(tmp_path):
    ti = TextualInversion(tiny(), "<sks>", num_vectors=2)
    randomise([ti.embeds], seed=2, std=1.0)
    source = tmp_path / "learned_embeds.safetensors"
    save_file(ti.state_dict_to_save(), source)
    out = export_ti_a1111(source, tmp_path / "sks.safetensors", "<sks>")
    assert out == tmp_path / "sks.safetensors"
    exported_state = load_file(out)
    assert list(exported_state) == ["emb_params"] and torch.equal(exported_state["emb_params"], ti.embeds)
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt", "name": "<sks>"}

    original, exported = tiny(), tiny()
    load_textual_inversion(original, source)
    load_textual_inversion(exported, out, token="<sks>")
    ids = [exported.tokenizer.convert_tokens_to_ids(t) for t in ("<sks>", "<sks>_1")]
    assert ids == [original.tokenizer.convert_tokens_to_ids(t) for t in ("<sks>", "<sks>_1")]
    rows = exported.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, original.text_encoder.get_input_embeddings().weight[ids])
    assert torch.equal(rows, ti.embeds)
    drawn = images(original)
    assert torch.equal(images(exported), drawn)
    assert not torch.allclose(images(original, "a watercolor painting of person"), drawn, atol=1e-3)

    with pytest.raises(ValueError, match=r"A1111 embedding, which names no placeholder .* pass token="):
        load_textual_inversion(tiny(), out)
    with pytest.raises(ValueError, match=r"holds \['<sks>'\], not the placeholder '<me>': pass as token"):
        export_ti_a1111(source, tmp_path / "me.safetensors", "<me>")
    with pytest.raises(ValueError, match=r"with the ending \.safetensors, e\.g\. sks\.safetensors"):
        export_ti_a1111(source, tmp_path / "sks.pt", "<sks>")


def test_a_lora_of_another_model_shape_is_refused_in_either_format(tmp_path):
    other = UNet2DConditionModel.from_config(tiny().unet.config, cross_attention_dim=16)
    add_lora(other, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=lora_layers({"unet": other})["unet"])
    source = tmp_path / "pytorch_lora_weights.safetensors"  # diffusers' writer, no adapter metadata: alpha = rank
    out = export_lora_kohya(source, tmp_path / "other.safetensors")
    assert {v.item() for k, v in load_file(out).items() if k.endswith(".alpha")} == {4.0}

    fresh = tiny()
    misfit = r"another shape: its down matrix for layer unet\..*attn2\.to_k is \(4, 16\), but .* here is \(32, 32\)"
    for file in (source, out):
        with pytest.raises(ValueError, match=misfit):
            load_lora_checked(fresh, file)
    assert lora_free(fresh)  # refused before touching the pipeline
    with pytest.raises(ValueError, match=r"is not a diffusers LoRA file .* holds 'lora_unet_.*'\. Pass the pytorch_"):
        export_lora_kohya(out, tmp_path / "again.safetensors")
    with pytest.raises(FileNotFoundError, match="No LoRA file at"):
        load_lora_checked(fresh, tmp_path / "missing.safetensors")


def test_a_kohya_file_with_keys_of_no_module_is_refused(tmp_path):
    out = export_lora_kohya(save_lora(random_lora(tiny()), tmp_path / "lora.safetensors"), tmp_path / "k.safetensors")
    state = load_file(out)
    unknown = Q.replace("attn1", "attn3")  # the tiny UNet's transformer blocks have attn1 and attn2
    for part in ("lora_down.weight", "lora_up.weight", "alpha"):
        state[f"lora_unet_{unknown}.{part}"] = state[f"lora_unet_{Q}.{part}"].clone()
    save_file(state, tmp_path / "unknown.safetensors")
    fresh = tiny()
    with pytest.raises(ValueError, match=r"layer unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn3\."
                                         r"to_q, which this model lacks"):
        load_lora_checked(fresh, tmp_path / "unknown.safetensors")
    assert lora_free(fresh)


def test_an_embedding_of_another_width_is_refused_in_either_format(tmp_path):
    source = tmp_path / "learned_embeds.safetensors"
    save_file({"<sks>": torch.randn(2, 16)}, source)  # the tiny text encoder is 32 wide
    out = export_ti_a1111(source, tmp_path / "sks.safetensors", "<sks>")
    fresh = tiny()
    vocab = len(fresh.tokenizer)
    for file, name in ((source, "'<sks>'"), (out, "'emb_params'")):
        with pytest.raises(ValueError, match=rf"holds {name} of shape \(2, 16\): vectors 16 numbers wide, but this "
                                             r"model's text encoder takes token embeddings 32 wide"):
            load_textual_inversion(fresh, file, token="<sks>")
    assert len(fresh.tokenizer) == vocab and fresh.text_encoder.get_input_embeddings().num_embeddings == vocab


def test_trained_lora_exported_for_kohya_draws_the_trained_pixels_through_diffusers_loader(tmp_path, dataset):
    pipe = tiny()
    lora = LoRA(pipe, rank=4, alpha=8, train_text_encoder=True)
    checkpoint = trained(lora, dataset, tmp_path / "runs")
    out = export_lora_kohya(checkpoint / "pytorch_lora_weights.safetensors", tmp_path / "sks-lora.safetensors")
    state = load_file(out)
    assert_kohya_names(state, rank=4, alpha=8.0)
    assert {k.split("_")[1] for k in state} == {"unet", "te"}  # both adapted parts, by kohya's prefixes
    assert torch.equal(state[f"lora_unet_{Q}.lora_up.weight"],
                       pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_B.default.weight)

    fresh = tiny()
    fresh.load_lora_weights(str(out.parent), weight_name=out.name)  # diffusers' own reader of kohya files
    expected = drawn(pipe)
    assert np.array_equal(drawn(fresh), expected)
    assert not np.array_equal(drawn(tiny()), expected)  # the comparison can fail: the base model draws otherwise


def test_trained_embedding_exported_for_a1111_draws_the_trained_pixels_through_diffusers_loader(tmp_path, dataset):
    pipe = tiny()
    ti = TextualInversion(pipe, "<sks>", num_vectors=2)
    checkpoint = trained(ti, dataset, tmp_path / "runs")
    out = export_ti_a1111(checkpoint / "learned_embeds.safetensors", tmp_path / "sks.safetensors", "<sks>")
    assert list(load_file(out)) == ["emb_params"] and torch.equal(load_file(out)["emb_params"], ti.embeds)

    fresh = tiny()
    fresh.load_textual_inversion(str(out), token="<sks>")  # diffusers' own loader: one tensor, the token's rows
    expected = drawn(pipe)
    assert np.array_equal(drawn(fresh), expected)
    assert not np.array_equal(drawn(pipe, "a photo of person"), expected)


def test_trained_pivotal_tuning_exported_as_two_files_draws_the_trained_pixels(tmp_path, dataset):
    pipe = tiny()
    method = PivotalTuning(pipe, rank=4, alpha=8, token_lr=5e-2)
    trained(method, dataset, tmp_path / "runs")
    folder = save_pivotal(method, tmp_path / "pivotal")
    files = export_pivotal(folder, tmp_path / "a1111", "my-face")
    assert files == {"embedding": tmp_path / "a1111" / "my-face.safetensors",
                     "lora": tmp_path / "a1111" / "my-face-lora.safetensors"}
    assert sorted(p.name for p in (tmp_path / "a1111").iterdir()) == ["my-face-lora.safetensors", "my-face.safetensors"]
    assert_kohya_names(load_file(files["lora"]), rank=4, alpha=8.0)
    assert {k.split("_")[1] for k in load_file(files["lora"])} == {"unet"}  # the token, not a text-encoder LoRA
    assert torch.equal(load_file(files["embedding"])["emb_params"], method.ti.embeds)

    fresh = tiny()
    fresh.load_textual_inversion(str(files["embedding"]), token="<sks>")
    fresh.load_lora_weights(str(files["lora"].parent), weight_name=files["lora"].name)
    expected = drawn(pipe)
    assert np.array_equal(drawn(fresh), expected)
    lora_only = tiny()  # each file matters: the LoRA without the token draws otherwise
    lora_only.load_lora_weights(str(files["lora"].parent), weight_name=files["lora"].name)
    assert not np.array_equal(drawn(lora_only, "a photo of person"), expected)
    assert not np.array_equal(drawn(tiny(), "a photo of person"), expected)

    with pytest.raises(ValueError, match=r"letters, digits, _ and - only \(e\.g\. 'my-face'\), not 'my face'"):
        export_pivotal(folder, tmp_path / "again", "my face")
    with pytest.raises(FileNotFoundError, match=r"lacks pytorch_lora_weights\.safetensors and learned_embeds\."
                                                r"safetensors: pass the folder that nbutils\.combos\.save_pivotal"):
        export_pivotal(tmp_path / "runs", tmp_path / "again", "my-face")
    assert not (tmp_path / "again").exists()
