"""The toy tier's parts: SD1.5's tokenizer, SD-shaped modules, and the shipped pipeline folder when present."""
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from nbutils import toy_model
from nbutils import toyworld as tw
from nbutils.clip_bpe import VOCAB_SIZE, clip_tokenizer
from nbutils.metrics import identity_similarity, psnr_db
from nbutils.models import tier_defaults
from nbutils.sampling import autoencode, generate
from nbutils.toy_evaluators import DETECTOR_FILE, EVALUATOR_DIR, TOY_CLIP_DIR, load_toy_evaluators

TOY_DIR = Path(toy_model.__file__).resolve().parents[1] / "data" / "models" / "toy-sd"
needs_evaluators = pytest.mark.skipif(not (EVALUATOR_DIR / DETECTOR_FILE).exists(),
                                      reason="toy evaluators not trained yet")


def test_tokenizer_matches_stable_diffusion():
    """Token ids of SD1.5's tokenizer for a known prompt (from the openai/clip-vit-large-patch14 vocabulary)."""
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok("a photo of a person").input_ids == [49406, 320, 1125, 539, 320, 2533, 49407]
    assert tok.model_max_length == 77


def test_shapes_chain_like_stable_diffusion():
    vae, te, unet = toy_model.toy_vae(), toy_model.toy_text_encoder(), toy_model.toy_unet()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        h = te(torch.zeros(2, 77, dtype=torch.long))[0]
        eps = unet(z, torch.tensor([10, 500]), h).sample
    assert z.shape == (2, 4, 16, 16)
    assert h.shape == (2, 77, toy_model.TEXT_HIDDEN)
    assert eps.shape == z.shape
    n_cross = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert n_cross == 7


def _folder_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


@pytest.mark.skipif(not (TOY_DIR / "model_index.json").exists(), reason="toy model not trained yet (make toy-model)")
def test_shipped_toy_model_loads_offline_and_is_small():
    assert _folder_bytes(TOY_DIR) <= 40 * 2**20
    assert not list(TOY_DIR.rglob("*.bin")) and not list(TOY_DIR.rglob("*.pt"))
    pipe = StableDiffusionPipeline.from_pretrained(TOY_DIR, use_safetensors=True)
    out = pipe("a photo of a person, on the beach", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert len(pipe.tokenizer) == VOCAB_SIZE


def test_toy_schedule_ends_at_pure_noise():
    """Zero terminal SNR (no image left in the last training step) with v-prediction, and sampling from that step."""
    train = toy_model.train_scheduler()
    assert train.alphas_cumprod[-1] == 0 and train.alphas_cumprod[0] > 0.99
    assert train.config.prediction_type == "v_prediction"
    sample = toy_model.sample_scheduler()
    assert torch.equal(sample.alphas_cumprod, train.alphas_cumprod)
    sample.set_timesteps(25)
    assert sample.timesteps[0] == 999


@pytest.mark.skipif(not (TOY_DIR / "model_index.json").exists(), reason="toy model not trained yet (make toy-model)")
def test_shipped_toy_model_uses_the_toy_schedule():
    shipped = StableDiffusionPipeline.from_pretrained(TOY_DIR, use_safetensors=True).scheduler.config
    expected = toy_model.sample_scheduler().config
    assert {k: v for k, v in shipped.items() if not k.startswith("_")} == {
        k: v for k, v in expected.items() if not k.startswith("_")}


@pytest.mark.skipif(not (TOY_DIR / "model_index.json").exists() or not (TOY_CLIP_DIR / "config.json").exists(),
                    reason="toy model or toy CLIP not trained yet")
def test_shipped_toy_model_conditions_on_the_toy_clips_frozen_text_tower():
    """As SD1.5 under OpenAI's CLIP: the generator's text encoder is the toy CLIP's text tower, weight for weight."""
    te = StableDiffusionPipeline.from_pretrained(TOY_DIR, use_safetensors=True).text_encoder.state_dict()
    tower = toy_model.toy_text_encoder(TOY_CLIP_DIR).state_dict()
    assert te.keys() == tower.keys() and all(torch.equal(te[k], tower[k]) for k in te)


@needs_evaluators
def test_shipped_evaluators_read_fresh_renders():
    """On 200 renders never seen in training (seed 5), every identity/scene/style head is >= 95 % right."""
    ev = load_toy_evaluators()
    ps = list(tw.portraits(5, 200, held_out=True))
    pred = ev.predict([tw.render(p, 64) for p in ps])
    for head in ("scene", "style", "face", "skin", "hair_colour", "hair_style", "accessory", "mark"):
        truth = torch.tensor([p.labels()[head] for p in ps])
        assert (pred[head] == truth).float().mean() >= 0.95, head


@pytest.mark.skipif(not (TOY_CLIP_DIR / "config.json").exists(), reason="toy CLIP not trained yet")
def test_toy_clip_ranks_the_true_caption_first():
    """For >= 90 % of 100 fresh renders, the true caption beats 9 captions of other renders."""
    model = CLIPModel.from_pretrained(TOY_CLIP_DIR).eval()
    proc = CLIPProcessor.from_pretrained(TOY_CLIP_DIR)
    ps = list(tw.portraits(6, 100, held_out=True))
    with torch.no_grad():
        img = model.get_image_features(**proc(images=[tw.render(p, 64) for p in ps], return_tensors="pt")).pooler_output
        txt = model.get_text_features(**proc(text=[p.caption() for p in ps], padding="max_length", max_length=77,
                                             return_tensors="pt")).pooler_output
    sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    g = torch.Generator().manual_seed(0)
    hits = 0
    for i in range(100):
        others = torch.randperm(99, generator=g)[:9]
        others = others + (others >= i).long()
        hits += int(sims[i, i] > sims[i, others].max())
    assert hits >= 90


@needs_evaluators
def test_shipped_face_detector_finds_every_portrait_and_nobody_in_empty_pictures():
    """On 300 fresh renders of every identity (seed 5) it finds a face on >= 99 %; on 300 fresh pictures with nobody
    in them (``non_portraits``, seed 5: empty scenes, colour shapes, noise) on <= 2 %."""
    sys.path.insert(0, str(TOY_DIR.parents[2] / "scripts"))
    from train_toy_evaluators import non_portraits

    ev = load_toy_evaluators()
    _, found = ev.identity.embed([tw.render(p, 64) for p in tw.portraits(5, 300, held_out=True)])
    assert found.float().mean() >= 0.99
    _, found = ev.identity.embed(torch.from_numpy(non_portraits(5, 300)).permute(0, 3, 1, 2).float() / 255)
    assert found.float().mean() <= 0.02


def _subject_photos(name):
    folder = TOY_DIR.parents[1] / "subjects" / name
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


@pytest.fixture(scope="module")
def toy_pipe():
    if not (TOY_DIR / "model_index.json").exists():
        pytest.skip("toy model not trained yet (make toy-model)")
    return StableDiffusionPipeline.from_pretrained(TOY_DIR, use_safetensors=True)


@needs_evaluators
@pytest.mark.parametrize("name", sorted(tw.SUBJECTS))
def test_toy_autoencoder_can_draw_each_subject(name, toy_pipe):
    """The ceiling of every method: the VAE's round trip of a subject's 5 photos keeps identity >= 0.95, and the
    attribute net reads every identity trait of the round-tripped photos right on at least 4 of 5."""
    ev = load_toy_evaluators()
    photos = _subject_photos(name)
    assert len(photos) == 5
    back = autoencode(toy_pipe, photos)
    assert identity_similarity(back, photos, ev.identity)["identity"] >= 0.95
    pred, truth = ev.predict(back), tw.Portrait(tw.SUBJECTS[name]).labels()
    for field in tw.IDENTITY_FIELDS:
        assert (pred[field] == truth[field]).sum() >= 4, field


def test_toy_autoencoder_reconstructs_fresh_renders_of_every_trait(toy_pipe):
    """PSNR >= 24 dB on 256 fresh renders drawn from every trait value (the unnamed ones included)."""
    renders = [tw.render(p, 64) for p in tw.portraits(11, 256, held_out=True)]
    assert psnr_db(autoencode(toy_pipe, renders), renders) >= 24


@needs_evaluators
def test_base_model_draws_people_but_not_the_subject_from_its_description(toy_pipe):
    """The toy base model cannot be asked for the subject: prompted with the subject's full description (16 seeds)
    it scores identity <= 0.60 against the photos, while the face detector still finds a person in >= 90 % of its
    samples of "a photo of a person" (so the low score is not the detector rejecting everything it draws)."""
    ev = load_toy_evaluators()
    defaults = tier_defaults("toy")
    kwargs = dict(steps=defaults.inference_steps, guidance_scale=defaults.guidance_scale, batch_size=16,
                  progress=False)
    seeds = list(range(16))
    described = generate(toy_pipe, f"a photo of {tw.TOY_SUBJECT.describe()}", seeds, **kwargs)
    assert identity_similarity(described, _subject_photos("toy"), ev.identity)["identity"] <= 0.60
    people = generate(toy_pipe, "a photo of a person", seeds, **kwargs)
    assert ev.identity.embed(people)[1].float().mean() >= 0.9
