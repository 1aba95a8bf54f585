"""The real tier's precision path on the tiny pipeline: a model loaded in bf16 or fp16 (as ``load_pipeline`` does on
a GPU) trains every method's own tensors in float32 under autocast, and one optimizer step changes them while the
frozen half-precision weights stay bit-identical."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from nbutils.clip_bpe import VOCAB_SIZE
from nbutils.dreambooth import DreamBooth
from nbutils.lora import LoRA
from nbutils.models import build_tiny_pipeline
from nbutils.pplus import PPlus
from nbutils.runs import new_run
from nbutils.svdiff import SVDiff
from nbutils.textual_inversion import TextualInversion
from nbutils.toyworld import TOY_SUBJECT, portraits, render
from nbutils.train import TrainConfig, train

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def half_pipeline(dtype: torch.dtype, *, keep_unet_float32: bool = False):
    """The tiny pipeline in ``dtype``; ``keep_unet_float32``: the UNet stays float32 (what DreamBooth trains)."""
    pipe = build_tiny_pipeline(0).to(dtype=dtype)
    if keep_unet_float32:
        pipe.unet.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


METHODS = {
    "textual_inversion": lambda dtype: TextualInversion(half_pipeline(dtype)),
    "pplus": lambda dtype: PPlus(half_pipeline(dtype)),
    "lora": lambda dtype: LoRA(half_pipeline(dtype), rank=4),
    "svdiff": lambda dtype: SVDiff(half_pipeline(dtype)),
    "dreambooth": lambda dtype: DreamBooth(half_pipeline(dtype, keep_unet_float32=True), prior_loss_weight=0),
}


@pytest.fixture(scope="module")
def dataset():
    return [(render(p, 32), f"a photo of <sks> sks person, view {i}")
            for i, p in enumerate(portraits(0, 2, identity=TOY_SUBJECT))]


def frozen_weights(pipe) -> dict[str, torch.Tensor]:
    """Every frozen tensor of the pipeline's three models, cloned; of the token embedding only the rows of
    SD1.5's own vocabulary (TI and P+ copy their learned rows, appended after it, into the table)."""
    weights = {f"{name}.{k}": p.detach().clone() for name in ("unet", "vae", "text_encoder")
               for k, p in getattr(pipe, name).named_parameters() if not p.requires_grad}
    table = next(k for k in weights if k.endswith("token_embedding.weight"))
    weights[table] = weights[table][:VOCAB_SIZE]
    return weights


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_half_precision_model_trains_float32_tensors_and_keeps_its_frozen_weights(name, precision, dataset,
                                                                                    tmp_run_dir):
    method = METHODS[name](HALF[precision])
    params = method.trainable_parameters()
    assert params and {p.dtype for p in params} == {torch.float32}, name
    before = [p.detach().clone() for p in params]
    frozen = frozen_weights(method.pipe)
    assert HALF[precision] in {w.dtype for w in frozen.values()}  # the base model really is in half precision
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-2, resolution=32, mixed_precision=precision)
    result = train(method, dataset, cfg, new_run("t", {}, out_dir=tmp_run_dir))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses)
    after = method.trainable_parameters()
    assert {p.dtype for p in after} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{name}: one step changed nothing"
    now = frozen_weights(method.pipe)
    assert all(torch.equal(now[k], w) and now[k].dtype == w.dtype for k, w in frozen.items() if k in now)


def test_eight_bit_adam_trains_dreambooth_with_one_byte_moments_and_resumes_exactly(dataset, tmp_run_dir):
    bitsandbytes = pytest.importorskip("bitsandbytes")  # pinned in requirements.lock; its CPU build works here

    def method():
        return DreamBooth(build_tiny_pipeline(0), prior_loss_weight=0, optimizer="adamw8bit")

    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, resolution=32, checkpoint_every=1)
    straight = method()
    assert isinstance(straight.make_optimizer(cfg), bitsandbytes.optim.AdamW8bit)
    before = [p.detach().clone() for p in straight.trainable_parameters()]
    train(straight, dataset, cfg, new_run("straight", {}, out_dir=tmp_run_dir))
    after = straight.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after)) and all(torch.isfinite(p).all() for p in after)
    state = load_file(next((tmp_run_dir).rglob("step-1/optimizer.safetensors")))
    assert any(v.dtype == torch.uint8 for v in state.values())  # the moments of the large tensors, in 8 bits

    run = new_run("resumed", {}, out_dir=tmp_run_dir)
    train(method(), dataset, replace(cfg, steps=1), run)  # stopped after step 1 ...
    resumed = method()
    train(resumed, dataset, cfg, run)  # ... and resumed from its checkpoint in a new process's stead
    assert all(torch.equal(a, b) for a, b in zip(after, resumed.trainable_parameters()))
