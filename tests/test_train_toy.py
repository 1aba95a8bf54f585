"""`make toy-model` end to end at a miniature scale: every stage runs, resumes, and saves a loadable pipeline."""
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from nbutils.runs import REPO_ROOT


def _script(name):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its worker processes pickle its functions by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_toy():
    return _script("train_toy")


@pytest.fixture(scope="module")
def work(tmp_path_factory, train_toy):
    w = tmp_path_factory.mktemp("toy-train")
    train_toy.stage_data(w, n=300, seed=0)
    train_toy.stage_vae(w, steps=2, batch=4, seed=0, device=torch.device("cpu"))
    train_toy.stage_latents(w, torch.device("cpu"))
    return w


def test_data_and_latents_have_the_documented_shapes(work):
    images = np.load(work / "images.npy")
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
    assert len(json.loads((work / "portraits.json").read_text())) == 300
    assert load_file(work / "latents.safetensors")["latents"].shape == (300, 4, 16, 16)


def test_vae_stage_resumes_exactly(work, train_toy, tmp_path):
    """4 VAE steps in one go == 2 steps, stop, then resume to 4 (same weights bit for bit)."""
    import shutil

    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("images.npy", "portraits.json", "world.json"):
            shutil.copy(work / f, folder / f)
        for stop in stops:
            train_toy.stage_vae(folder, steps=4, batch=2, seed=0, device=torch.device("cpu"), ckpt_every=2,
                                stop_after=stop)
        runs[name] = load_file(folder / "vae.safetensors")
    assert runs["straight"].keys() == runs["resumed"].keys()
    assert all(torch.equal(runs["straight"][k], runs["resumed"][k]) for k in runs["straight"])


def test_data_stage_refuses_renders_of_another_world(work, train_toy, tmp_path):
    import shutil

    folder = tmp_path / "old-world"
    folder.mkdir()
    shutil.copy(work / "images.npy", folder / "images.npy")
    with pytest.raises(RuntimeError, match="another version of the pretraining world"):
        train_toy.stage_data(folder, n=300, seed=0)


def test_unet_stage_resumes_exactly(work, train_toy, tmp_path):
    """6 steps in one go == 2 steps, stop, then resume to 6 (same weights bit for bit; 3 checkpoint swaps)."""
    import shutil

    straight = tmp_path / "straight"
    shutil.copytree(work, straight)
    train_toy.stage_unet(straight, steps=6, batch=4, seed=0, ckpt_every=2)

    resumed = tmp_path / "resumed"
    shutil.copytree(work, resumed)
    train_toy.stage_unet(resumed, steps=6, batch=4, seed=0, ckpt_every=2, stop_after=2)
    assert json.loads((resumed / "unet-ckpt" / "state.json").read_text())["step"] == 2
    assert not (resumed / "unet-final").exists()
    train_toy.stage_unet(resumed, steps=6, batch=4, seed=0, ckpt_every=2)
    assert sorted(p.name for p in resumed.iterdir() if p.name.startswith("unet")) == [
        "unet-ckpt", "unet-final", "unet-loss.jsonl", "unet-recipe.json"]

    a = load_file(straight / "unet-final" / "unet.safetensors")
    b = load_file(resumed / "unet-final" / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unet_stage_refuses_a_folder_trained_under_another_recipe(work, train_toy, tmp_path):
    """A checkpoint of another model or noise schedule is never resumed (nor its final weights saved) silently."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(work, folder)
    train_toy.stage_unet(folder, steps=2, batch=4, seed=0, ckpt_every=2, stop_after=1)
    recipe = json.loads((folder / "unet-recipe.json").read_text())
    assert recipe == train_toy.unet_recipe()
    recipe["schedule"]["prediction_type"] = "epsilon"
    (folder / "unet-recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(RuntimeError, match="new --work folder"):
        train_toy.stage_unet(folder, steps=2, batch=4, seed=0, ckpt_every=2)
    (folder / "unet-recipe.json").unlink()  # a folder from before recipes were recorded
    with pytest.raises(RuntimeError, match="not recorded"):
        train_toy.stage_unet(folder, steps=2, batch=4, seed=0, ckpt_every=2)


def test_saved_folder_loads_with_plain_diffusers(work, train_toy, tmp_path):
    train_toy.stage_unet(work, steps=2, batch=4, seed=0, ckpt_every=2)
    out = tmp_path / "toy-sd"
    train_toy.stage_save(work, out, {"unet_steps": 2})
    pipe = StableDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    img = pipe("a photo of a person", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
    assert pipe.vae.config.scaling_factor == pytest.approx(json.loads((work / "vae.json").read_text())["scaling_factor"])
    steps = [json.loads(line)["step"] for line in (work / "unet-loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    info = json.loads((out / "training.json").read_text())
    assert info["recipe"] == {"unet_steps": 2} and np.isfinite(info["unet_final_loss_mean_last_100_steps"])
