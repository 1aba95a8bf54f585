"""P+ / Extended Textual Inversion (XTI; Voynov et al. 2023): one learned token embedding per cross-attention layer.

Stable Diffusion feeds the same text conditioning to each of its UNet cross-attention (``attn2``) layers, 16 on
SD1.5. P+ gives every layer its own prompt: the same words, but the placeholder token takes that layer's
embedding. XTI learns those L embeddings, an ``(L, D)`` tensor, with the model frozen, as Textual Inversion does
for one.

How the per-layer prompts reach the layers, without forking the UNet:

1. ``encode_pplus`` runs the text encoder once on L copies of each prompt (one batch of L x B), copy ``l``
   reading the placeholder as row ``l`` of the embeddings; the L results are stacked along the sequence axis into
   one ``(B, L * 77, D)`` conditioning, which the pipeline accepts as ``prompt_embeds``.
2. ``PPlusAttnProcessor`` wraps each ``attn2`` layer's diffusers attention processor: layer ``l`` cuts its own
   77-token slice out of that conditioning before attending. A normal ``(B, 77, D)`` conditioning passes through
   unchanged, so the pipeline still works with plain prompts.

Layers are ordered as the UNet runs them (down blocks, mid block, up blocks). Each has a resolution ``level``: its
feature map is ``2**level`` times smaller than the latent. On SD1.5 (64 x 64 latents) the levels are
``down_blocks.0``: 0 (64 px), ``down_blocks.1``: 1 (32), ``down_blocks.2``: 2 (16), ``mid_block``: 3 (8),
``up_blocks.1``: 2, ``up_blocks.2``: 1, ``up_blocks.3``: 0. The paper finds the coarse (low-resolution, middle)
layers steer shape and the fine (high-resolution, outer) layers colour and texture; ``mix`` uses that split.

Saved as ``pplus_embeds.safetensors``: tensor ``"embeds"`` (L, D) and header metadata ``token``, ``layers`` and
``levels`` (JSON lists); ``load_pplus`` applies it to a fresh pipeline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from nbutils.text import add_tokens, check_captions, copy_saved, encode_with_token_rows, single_token_id, tokenize
from nbutils.train import Method, TrainConfig, config_for_tier

WEIGHTS_NAME = "pplus_embeds.safetensors"


def cross_attention_layers(unet: UNet2DConditionModel) -> tuple[list[str], list[int]]:
    """Names of the UNet's cross-attention modules (``...attn2``) in forward order, and each one's resolution level.

    Down block ``i`` runs at level ``i`` (every down block but the last halves the size at its end), the mid block
    at the last down block's level, up block ``j`` at ``n - 1 - j`` for ``n`` up blocks.
    """
    names, levels = [], []
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    parts = [(f"down_blocks.{i}", b, i) for i, b in enumerate(unet.down_blocks)]
    parts += [("mid_block", unet.mid_block, n_down - 1)] if unet.mid_block is not None else []
    parts += [(f"up_blocks.{j}", b, n_up - 1 - j) for j, b in enumerate(unet.up_blocks)]
    for prefix, block, level in parts:
        for name, _ in block.named_modules():
            if name.endswith("attn2"):
                names.append(f"{prefix}.{name}")
                levels.append(level)
    return names, levels


@dataclass(frozen=True)
class PPlusEmbeds:
    """A P+ concept: ``embeds`` (L, D) float32, row ``l`` for layer ``layers[l]`` (resolution ``levels[l]``),
    used wherever ``token`` appears in a prompt."""

    token: str
    layers: tuple[str, ...]
    levels: tuple[int, ...]
    embeds: torch.Tensor

    def metadata(self) -> dict[str, str]:
        """Safetensors header metadata: token, layers and levels (JSON lists)."""
        return {"token": self.token, "layers": json.dumps(list(self.layers)), "levels": json.dumps(list(self.levels))}


class PPlusAttnProcessor:
    """Wraps layer ``index``'s attention processor: from a P+ conditioning (B, num_layers * tokens, D) it passes
    only its own slice (B, tokens, D) on; any other conditioning passes through unchanged."""

    def __init__(self, inner, index: int, num_layers: int, tokens: int):
        self.inner, self.index, self.num_layers, self.tokens = inner, index, num_layers, tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == self.num_layers * self.tokens:
            start = self.index * self.tokens
            encoder_hidden_states = encoder_hidden_states[:, start : start + self.tokens]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def install_processors(pipe: StableDiffusionPipeline, layers: Sequence[str]) -> None:
    """Wrap the processor of each layer in ``layers`` (in that order) in a ``PPlusAttnProcessor``; idempotent."""
    processors, tokens = dict(pipe.unet.attn_processors), pipe.tokenizer.model_max_length
    for index, layer in enumerate(layers):
        inner = processors[f"{layer}.processor"]
        inner = inner.inner if isinstance(inner, PPlusAttnProcessor) else inner
        processors[f"{layer}.processor"] = PPlusAttnProcessor(inner, index, len(layers), tokens)
    pipe.unet.set_attn_processor(processors)


def encode_pplus(
    pipe: StableDiffusionPipeline, token: str, embeds: torch.Tensor, prompts: Sequence[str]
) -> torch.Tensor:
    """P+ conditioning (B, L * 77, D) for ``prompts``: block ``l`` is the prompt with ``token`` read as ``embeds[l]``.

    ``embeds``: (L, D); gradients flow into it. One text-encoder call on an (L * B, 77) batch: copy ``l`` of the
    prompts reads the placeholder as ``embeds[l]`` (``encode_with_token_rows``).
    """
    ids = tokenize(pipe.tokenizer, prompts)
    num_layers, (batch, length) = embeds.shape[0], ids.shape
    rows = embeds.repeat_interleave(batch, dim=0)[:, None, :]  # (L * B, 1, D): copy l's prompts read embeds[l]
    token_id = torch.tensor([single_token_id(pipe.tokenizer, token)])
    hidden = encode_with_token_rows(pipe.text_encoder, ids.repeat(num_layers, 1), token_id, rows)
    return hidden.view(num_layers, batch, length, -1).transpose(0, 1).reshape(batch, num_layers * length, -1)


def pplus_prompt_embeds(
    pipe: StableDiffusionPipeline, concept: PPlusEmbeds, prompts: Sequence[str], negative_prompt: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds, negative_prompt_embeds)``, each (B, L * 77, D), for ``pipe(prompt_embeds=...,
    negative_prompt_embeds=...)`` on a pipeline prepared by ``load_pplus`` or a ``PPlus`` method."""
    with torch.no_grad():
        embeds = concept.embeds.to(pipe.device)
        positive = encode_pplus(pipe, concept.token, embeds, prompts)
        negative = encode_pplus(pipe, concept.token, embeds, [negative_prompt] * len(prompts))
    return positive, negative


class PPlus(Method):
    """XTI as a ``nbutils.train`` method: the only trainable tensor is ``embeds`` (L, D) float32, one row per
    cross-attention layer, all starting from ``init_word``'s embedding.

    Construction adds ``placeholder`` to the tokenizer (its text-encoder row, used only by plain prompts, is kept at
    the mean of the L rows) and installs ``PPlusAttnProcessor`` on every ``attn2`` layer of ``pipe``.
    """

    name = "pplus"
    weights_name = WEIGHTS_NAME

    def __init__(self, pipe: StableDiffusionPipeline, placeholder: str = "<sks>", init_word: str = "person"):
        super().__init__(pipe)
        self.placeholder = placeholder
        self.layers, self.levels = cross_attention_layers(pipe.unet)
        weight = pipe.text_encoder.get_input_embeddings().weight
        init = weight[single_token_id(pipe.tokenizer, init_word)].detach().float()
        self.token_id = int(add_tokens(pipe, [placeholder], init[None])[0])
        self.embeds = torch.nn.Parameter(init.repeat(len(self.layers), 1))
        install_processors(pipe, self.layers)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.embeds]

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, L * 77, D), see ``encode_pplus``."""
        check_captions(self.pipe.tokenizer, captions, self.token_id, self.placeholder)
        return encode_pplus(self.pipe, self.placeholder, self.embeds, captions)

    def concept(self) -> PPlusEmbeds:
        """A detached snapshot of the learned embeddings."""
        embeds = self.embeds.detach().float().cpu().clone()
        return PPlusEmbeds(self.placeholder, tuple(self.layers), tuple(self.levels), embeds)

    def after_step(self) -> None:
        _set_plain_row(self.pipe, self.token_id, self.embeds.detach())

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        return {"embeds": self.embeds.detach()}

    def save_metadata(self) -> dict[str, str]:
        return self.concept().metadata()

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        copy_saved(self.embeds, state, "embeds")
        self.after_step()


def _set_plain_row(pipe: StableDiffusionPipeline, token_id: int, embeds: torch.Tensor) -> None:
    """Set the placeholder's own embedding row (read by plain, non-P+ prompts) to the mean of the L rows."""
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = embeds.mean(0).to(weight)


def read_pplus(path: str | Path) -> PPlusEmbeds:
    """The concept stored in a ``pplus_embeds.safetensors`` file or a checkpoint folder holding one."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} at {path}: pass a checkpoint folder of a P+ run or the file itself."
        )
    with safe_open(file, framework="pt") as f:
        meta = f.metadata() or {}
        if "embeds" not in f.keys() or not {"token", "layers", "levels"} <= meta.keys():
            raise ValueError(f"{file} is not a P+ file: it needs tensor 'embeds' and metadata token, layers, levels.")
        embeds = f.get_tensor("embeds").float()
    return PPlusEmbeds(meta["token"], tuple(json.loads(meta["layers"])), tuple(json.loads(meta["levels"])), embeds)


def apply_pplus(pipe: StableDiffusionPipeline, concept: PPlusEmbeds) -> None:
    """Prepare ``pipe`` for ``concept``: check the layers match, add its token, install the processors."""
    layers, _ = cross_attention_layers(pipe.unet)
    if list(concept.layers) != layers:
        raise ValueError(
            f"These P+ embeddings were learned for a UNet with {len(concept.layers)} cross-attention layers "
            f"({concept.layers[0]}, ...); this pipeline has {len(layers)}: load the model they were trained on."
        )
    added = pipe.tokenizer.added_tokens_encoder
    if concept.token in added:
        _set_plain_row(pipe, added[concept.token], concept.embeds)
    else:
        add_tokens(pipe, [concept.token], concept.embeds.mean(0, keepdim=True))
    install_processors(pipe, layers)


def load_pplus(pipe: StableDiffusionPipeline, path: str | Path) -> PPlusEmbeds:
    """Read a P+ file (or checkpoint folder) and apply it to ``pipe``; returns the concept for
    ``pplus_prompt_embeds``."""
    concept = read_pplus(path)
    apply_pplus(pipe, concept)
    return concept


def mix(
    embeds_a: PPlusEmbeds, embeds_b: PPlusEmbeds, *, coarse_from: Literal["a", "b"] = "a", fine_max_level: int = 0
) -> PPlusEmbeds:
    """Style mixing: coarse layers (level > ``fine_max_level``: low resolution, the UNet's middle; shape) from one
    concept, fine layers (level <= ``fine_max_level``: high resolution, outer; appearance) from the other.

    With the default ``fine_max_level=0`` the fine layers are those at full latent resolution (``down_blocks.0``
    and ``up_blocks.3`` on SD1.5). The result keeps ``embeds_a``'s token.
    """
    if embeds_a.layers != embeds_b.layers:
        raise ValueError("Both concepts must come from the same model: their cross-attention layers differ.")
    if coarse_from not in ("a", "b"):
        raise ValueError(f"coarse_from must be 'a' or 'b', not {coarse_from!r}.")
    coarse, fine = (embeds_a, embeds_b) if coarse_from == "a" else (embeds_b, embeds_a)
    is_fine = torch.tensor(embeds_a.levels)[:, None] <= fine_max_level
    mixed = torch.where(is_fine, fine.embeds, coarse.embeds)
    return PPlusEmbeds(embeds_a.token, embeds_a.layers, embeds_a.levels, mixed)


def default_config(tier: str, quick: bool = False) -> TrainConfig:
    """Training defaults per model tier; ``quick`` shortens the run.

    real: the P+ paper trains XTI ten times shorter than TI; as in the unofficial diffusers port
    (mkshing/prompt-plus-pytorch): 500 steps, batch 1 x 8 accumulated, lr 5e-3, constant, 512 px.
    toy: a few minutes on a CPU at 64 px. tiny: a handful of steps for tests.
    """
    return config_for_tier(tier, quick, {
        "real": TrainConfig(steps=500, batch_size=1, gradient_accumulation=8, lr=5e-3, checkpoint_every=100),
        "toy": TrainConfig(steps=200, batch_size=4, lr=5e-3, checkpoint_every=50),
        "tiny": TrainConfig(steps=4, batch_size=2, lr=5e-3, checkpoint_every=2),
    })
