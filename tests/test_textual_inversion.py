"""Textual Inversion on the tiny random pipeline: what trains, what stays frozen, diffusers round trip, bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nbutils.models import build_tiny_pipeline
from nbutils.runs import new_run
from nbutils.text import with_placeholder
from nbutils.textual_inversion import TextualInversion, default_config, load_textual_inversion
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, load_checkpoint, train

PROMPT = "a watercolor painting of <sks> person"


@pytest.fixture(scope="module")
def dataset():
    pairs = [(render(p, 32), f"a photo of sks person {i}") for i, p in enumerate(portraits(1, 3, identity=TOY_SUBJECT))]
    return with_placeholder(pairs, "sks", "<sks>")


def tiny_cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, lr=5e-2, resolution=32)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {f"{m}.{k}": v.clone() for m, module in modules.items() for k, v in module.state_dict().items()}


def test_only_the_new_rows_learn_and_everything_else_stays_frozen(tmp_run_dir, dataset):
    pipe = build_tiny_pipeline(0)
    vocab = len(pipe.tokenizer)
    ti = TextualInversion(pipe, "<sks>", init_word="person", num_vectors=2)
    assert ti.tokens == ["<sks>", "<sks>_1"] and ti.token_ids.tolist() == [vocab, vocab + 1]
    assert ti.trainable_parameters() == [ti.embeds] and ti.embeds.shape == (2, 32) and ti.embeds.requires_grad
    person = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("person</w>")]
    assert torch.equal(ti.embeds[0], person) and torch.equal(ti.embeds[1], person)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    before = snapshot(pipe)

    train(ti, dataset, tiny_cfg(steps=3), new_run("t", {}, out_dir=tmp_run_dir))

    after = snapshot(pipe)
    key = "text_encoder.embeddings.token_embedding.weight"
    others = torch.ones(len(after[key]), dtype=torch.bool)
    others[ti.token_ids] = False
    assert torch.equal(after[key][others], before[key][others])
    assert not torch.equal(after[key][ti.token_ids], before[key][ti.token_ids])
    assert torch.equal(after[key][ti.token_ids], ti.embeds.detach())  # the pipeline reads the learned rows
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    assert all(not torch.equal(ti.embeds[i], person) for i in range(2))  # both vectors learned


def test_saved_embeddings_load_into_a_fresh_pipeline_with_diffusers(tmp_run_dir, dataset):
    pipe = build_tiny_pipeline(0)
    ti = TextualInversion(pipe, "<sks>", num_vectors=2)
    result = train(ti, dataset, tiny_cfg(steps=2), new_run("t", {}, out_dir=tmp_run_dir))
    saved = load_file(result.checkpoint / "learned_embeds.safetensors")
    assert list(saved) == ["<sks>"] and saved["<sks>"].shape == (2, 32)

    fresh = build_tiny_pipeline(0)
    load_textual_inversion(fresh, result.checkpoint)
    assert fresh.maybe_convert_prompt(PROMPT, fresh.tokenizer) == "a watercolor painting of <sks> <sks>_1 person"
    with torch.no_grad():
        trained_out = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        fresh_out = fresh.encode_prompt(PROMPT, "cpu", 1, False)[0]
        method_out = ti.encode_prompts([PROMPT])
        plain = build_tiny_pipeline(0).encode_prompt("a watercolor painting of person", "cpu", 1, False)[0]
    assert torch.equal(fresh_out, trained_out)
    assert torch.equal(method_out, trained_out)  # training saw exactly what inference sees
    assert trained_out.shape == (1, 77, 32) and not torch.allclose(trained_out, plain)

    with pytest.raises(ValueError, match=r"Expected \{'<sks>': \(1, 32\)\} but the file holds \{'<sks>': \(2, 32\)\}"):
        load_checkpoint(TextualInversion(build_tiny_pipeline(0), "<sks>", num_vectors=1), result.checkpoint)


def test_bad_placeholder_and_init_word_are_rejected_without_touching_the_pipeline():
    pipe = build_tiny_pipeline(0)
    vocab = len(pipe.tokenizer)
    with pytest.raises(ValueError, match=r"'person' is already in the tokenizer's vocabulary.*e\.g\. <my-face>"):
        TextualInversion(pipe, "person")
    with pytest.raises(ValueError, match="'sks' is already in the tokenizer's vocabulary"):
        TextualInversion(pipe, "sks")
    with pytest.raises(ValueError, match="one word without spaces"):
        TextualInversion(pipe, "<my face>")
    pieces = r"'blonde-haired' splits into \['blonde</w>', '-</w>', 'haired</w>'\]"
    with pytest.raises(ValueError, match=rf"single-token init word such as 'person'; {pieces}"):
        TextualInversion(pipe, "<sks>", init_word="blonde-haired")
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.get_input_embeddings().num_embeddings == vocab
    TextualInversion(pipe, "<sks>")
    with pytest.raises(ValueError, match="'<sks>' is already in the tokenizer's vocabulary"):
        TextualInversion(pipe, "<sks>")


def test_captions_must_carry_the_placeholder(dataset):
    ti = TextualInversion(build_tiny_pipeline(0), "<sks>")
    with pytest.raises(ValueError, match=r"'a photo of sks person' does not contain the placeholder '<sks>'.*with_"):
        ti.encode_prompts(["a photo of <sks> person", "a photo of sks person"])
    assert [c for _, c in dataset] == [f"a photo of <sks> person {i}" for i in range(3)]
    assert with_placeholder(dataset, "sks", "<sks>")[0][1] == "a photo of <sks> person 0"  # no double wrapping
    with pytest.raises(ValueError, match="does not contain 'sks'"):
        with_placeholder([(dataset[0][0], "a photo of a person")], "sks", "<sks>")


def test_loading_refuses_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="learned_embeds.safetensors"):
        load_textual_inversion(build_tiny_pipeline(0), tmp_path)


def test_defaults_follow_the_tier():
    real, toy, tiny = (default_config(t) for t in ("real", "toy", "tiny"))
    assert (real.steps, real.batch_size * real.gradient_accumulation, real.lr, real.resolution) == (3000, 4, 2e-3, 512)
    assert toy.resolution == 64 and tiny.resolution == 32 and tiny.steps < toy.steps < real.steps
    quick = default_config("real", quick=True)
    assert quick.steps == 300 and quick.lr == real.lr
    with pytest.raises(ValueError, match="Unknown model tier"):
        default_config("huge")
