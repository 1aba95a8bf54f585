"""Model tiers: resolving references, clear errors for unavailable models, the tiny pipeline, SD1.5 shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from nbutils import models
from nbutils.clip_bpe import VOCAB_SIZE
from nbutils.models import (
    SD15_ID,
    TINY_STAMP,
    ModelUnavailable,
    build_tiny_pipeline,
    load_pipeline,
    model_tier,
    pick_device,
    pick_dtype,
    resolve_model,
    save_tiny_pipeline,
    sd15_unet_config,
    tier_defaults,
)
from nbutils.runs import REPO_ROOT


def fake_pipeline_folder(path, unet_sample_size, vae_blocks, cross_attention_dim=64):
    """A folder with just the configs ``model_tier`` reads."""
    unet = {"sample_size": unet_sample_size, "cross_attention_dim": cross_attention_dim}
    for sub, cfg in (("unet", unet), ("vae", {"block_out_channels": [8] * vae_blocks})):
        (path / sub).mkdir(parents=True)
        (path / sub / "config.json").write_text(json.dumps(cfg))
    (path / "model_index.json").write_text("{}")
    return path


@pytest.fixture
def no_toy(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "TOY_MODEL_DIR", tmp_path / "toy-sd")


@pytest.fixture
def tmp_tiny_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "tiny-sd"
    monkeypatch.setattr(models, "TINY_MODEL_DIR", path)
    return path


def test_resolve_aliases_paths_and_hub_ids(tmp_path, monkeypatch, no_toy, tmp_tiny_dir):
    assert resolve_model("sd15") == SD15_ID
    assert resolve_model("someone/their-model") == "someone/their-model"
    assert resolve_model("data") == str(REPO_ROOT / "data")  # an existing folder, relative to the repo root
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("./not/here") == str(REPO_ROOT / "not" / "here")  # path-shaped, not a hub id
    with pytest.raises(ModelUnavailable, match="make toy-model"):
        resolve_model("toy")

    assert resolve_model("auto", device="cpu") == str(tmp_tiny_dir)  # no toy model yet: the tiny one, built now
    assert (tmp_tiny_dir / "model_index.json").is_file() and (tmp_tiny_dir / TINY_STAMP).is_file()
    assert resolve_model("tiny") == str(tmp_tiny_dir)

    toy = fake_pipeline_folder(tmp_path / "toy-sd", 16, 3)
    assert resolve_model("auto", device="cpu") == resolve_model("toy") == str(toy)
    monkeypatch.setattr(models, "pick_device", lambda prefer=None: torch.device("cuda"))
    assert resolve_model("auto") == SD15_ID


def test_stale_tiny_cache_is_rebuilt(tmp_tiny_dir):
    tmp_tiny_dir.mkdir(parents=True)
    (tmp_tiny_dir / "model_index.json").write_text("{}")  # an older build: no stamp
    assert resolve_model("tiny") == str(tmp_tiny_dir)
    assert json.loads((tmp_tiny_dir / TINY_STAMP).read_text()) == {"seed": 0, "build": models.TINY_BUILD}
    assert (tmp_tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    for weights in (tmp_tiny_dir / "text_encoder").glob("*.safetensors"):
        weights.unlink()  # damaged: the stamp is current but a model's weights are gone
    assert resolve_model("tiny") == str(tmp_tiny_dir)
    assert (tmp_tiny_dir / "text_encoder" / "model.safetensors").is_file()


def test_processes_that_need_the_cache_at_once_take_turns(tmp_path):
    code = ("import sys; from pathlib import Path; from nbutils import models; "
            "models.TINY_MODEL_DIR = Path(sys.argv[1]); "
            "from nbutils.models import load_pipeline; load_pipeline('tiny', device='cpu'); print('loaded')")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "cache" / "tiny-sd"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and out.strip().endswith("loaded") for p, (out, _) in zip(procs, outs)), outs
    assert sorted(p.name for p in folder.parent.iterdir()) == [".tiny-sd.lock", "tiny-sd"]  # no temporary left


def test_model_tier_from_image_size(tmp_path):
    assert model_tier(SD15_ID) == "real"
    assert model_tier(str(fake_pipeline_folder(tmp_path / "a", 4, 4))) == "tiny"  # 4 * 8 = 32 px
    assert model_tier(str(fake_pipeline_folder(tmp_path / "b", 16, 3))) == "toy"  # 16 * 4 = 64 px
    assert model_tier(str(fake_pipeline_folder(tmp_path / "c", 64, 4))) == "real"  # 64 * 8 = 512 px
    # SD1.5's width (768) at 128 px, as make test-sd15 runs it: the real tier's code paths, at a CPU's size
    assert model_tier(str(fake_pipeline_folder(tmp_path / "d", 16, 4, cross_attention_dim=768))) == "real"
    assert model_tier(str(fake_pipeline_folder(tmp_path / "e", 16, 4, cross_attention_dim=512))) == "toy"


def test_resolution_override_replaces_only_the_resolution(monkeypatch):
    monkeypatch.setenv(models.RESOLUTION_ENV, "128")
    assert tier_defaults("real") == replace(models._TIER_DEFAULTS[("real", False)], resolution=128)
    assert tier_defaults("toy", quick=True).resolution == 128
    for bad in ("12O", "100", "16"):  # not a number, not a multiple of 8, too small
        monkeypatch.setenv(models.RESOLUTION_ENV, bad)
        with pytest.raises(ValueError, match="multiple of 8 and at least 32"):
            tier_defaults("real")


def test_sd15_shape_at_128_px_keeps_every_weight_of_the_512_px_one():
    small, full = (build_tiny_pipeline(0, sd15_shape=True, image_size=size, device="meta") for size in (128, 512))
    assert small.unet.config.sample_size == 16 and full.unet.config.sample_size == 64
    for name in ("unet", "vae", "text_encoder"):
        shapes = [{k: v.shape for k, v in getattr(p, name).state_dict().items()} for p in (small, full)]
        assert shapes[0] == shapes[1], name


def test_tier_defaults():
    assert tier_defaults("real").resolution == 512 and tier_defaults("real").guidance_scale == 7.5
    assert tier_defaults("real").inference_steps == 30
    toy, toy_quick = tier_defaults("toy"), tier_defaults("toy", quick=True)
    assert toy.resolution == toy_quick.resolution == 64 and toy.guidance_scale == 4.0
    assert toy_quick.inference_steps < toy.inference_steps and toy_quick.num_samples < toy.num_samples
    assert tier_defaults("tiny").resolution == 32 and tier_defaults("tiny", True).inference_steps == 2
    with pytest.raises(ValueError, match="'real', 'toy' or 'tiny'"):
        tier_defaults("huge")


def test_missing_folder_raises_model_unavailable_with_the_fix(tmp_path):
    missing = tmp_path / "no-model-here"
    with pytest.raises(ModelUnavailable) as err:
        load_pipeline(str(missing), device="cpu")
    message = str(err.value)
    assert str(missing) in message and "huggingface-cli download" in message and "MODEL='auto'" in message
    assert err.value.__context__ is None  # one message, no chained traceback


def test_unknown_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="no network access to the Hugging Face hub") as err:
        load_pipeline("nobody-xyz/no-such-model", device="cpu")
    assert time.perf_counter() - start < 30
    assert "huggingface-cli download nobody-xyz/no-such-model" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_device_and_dtype_choice(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("cpu") == pick_dtype(torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        assert pick_device() in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("cuda") == torch.float16


def generate(pipe, seed):
    out = pipe("a photo of a person", num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    return out.images


def test_tiny_pipeline_generates_deterministic_32px_images(tiny_pipe):
    assert tiny_pipe.tokenizer.vocab_size == VOCAB_SIZE == tiny_pipe.text_encoder.config.vocab_size
    assert tiny_pipe.vae_scale_factor == 8
    first, again, other = generate(tiny_pipe, 0), generate(tiny_pipe, 0), generate(tiny_pipe, 1)
    assert first.shape == (1, 32, 32, 3) and first.dtype == np.float32
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_tiny_pipeline_samples_like_sd15_not_like_the_toy_model(tiny_pipe):
    """The tiny tier stands in for SD1.5 in tests: epsilon prediction on SD1.5's own schedule, not the toy model's
    v-prediction on a zero-terminal-SNR one."""
    config = tiny_pipe.scheduler.config
    assert config.prediction_type == "epsilon" and not config.rescale_betas_zero_snr
    assert tiny_pipe.scheduler.alphas_cumprod[-1] > 0


def test_tiny_pipeline_weights_depend_only_on_the_seed(tiny_pipe):
    rng_state = torch.random.get_rng_state()
    same, other = build_tiny_pipeline(0), build_tiny_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is untouched
    w = next(k for k in tiny_pipe.text_encoder.state_dict() if k.endswith("layers.0.mlp.fc1.weight"))
    assert torch.equal(same.text_encoder.state_dict()[w], tiny_pipe.text_encoder.state_dict()[w])
    assert not torch.equal(other.text_encoder.state_dict()[w], tiny_pipe.text_encoder.state_dict()[w])


def test_save_and_load_tiny_pipeline_round_trip(tiny_pipe, tmp_path):
    path = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folder left
    weights = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix in (".bin", ".safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert model_tier(str(path)) == "tiny"
    loaded = load_pipeline(str(path), device="cpu")
    assert loaded.dtype == torch.float32 and loaded.safety_checker is None
    ids = tiny_pipe.tokenizer(["a photo of sks person"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = tiny_pipe.text_encoder(ids).last_hidden_state
        got = loaded.text_encoder(ids).last_hidden_state
    assert got.shape == (1, 77, 32)
    assert torch.equal(got, expected)
    with pytest.raises(FileExistsError, match="already holds files"):
        save_tiny_pipeline(path, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_sd15_unet_on_meta_device_has_sd15_shape():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == 16
    assert {m.to_k.in_features for m in attn2} == {768}
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_sd15_shaped_pipeline_on_meta_device():
    pipe = build_tiny_pipeline(sd15_shape=True, device="meta")
    assert pipe.unet.device.type == "meta"
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder.config.num_hidden_layers == 12
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * pipe.vae_scale_factor == 512


def test_hub_offline_when_told_or_when_the_hub_does_not_answer(monkeypatch):
    from huggingface_hub import constants

    class Connection:
        def close(self):
            pass

    def unreachable(address, timeout):
        raise OSError("Name or service not known")

    asked = []
    for told, connect, expected in ((True, unreachable, True), (False, unreachable, True),
                                    (False, lambda address, timeout: asked.append(address) or Connection(), False)):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", told)
        monkeypatch.setattr(models.socket, "create_connection", connect)
        models.hub_offline.cache_clear()
        assert models.hub_offline() is expected
    assert asked == [("huggingface.co", 443)]
    models.hub_offline.cache_clear()
