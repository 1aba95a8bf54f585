"""Text conditioning shared by the methods: captions to token ids and to the text encoder's hidden states, placeholder
tokens added to the tokenizer with their embedding rows, and prompts encoded with some rows swapped.

Textual inversion, P+, E4T and the combinations inject learned rows through ``add_tokens`` and
``encode_with_token_rows``; LoRA, SVDiff and DreamBooth encode their captions once with ``encode_captions``.
Every method module imports these from here, none from a sibling method.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids as the pipeline makes them: (B, 77) int64, padded and truncated to ``model_max_length``."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_captions(pipe: StableDiffusionPipeline, captions: Sequence[str],
                    cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The text encoder's last hidden state for ``captions``: (B, 77, D), as ``pipe.encode_prompt`` makes it.

    ``cache=None``: encoded now, differentiable (for a text encoder that trains). With a ``cache`` dict (owned by the
    caller, for a frozen text encoder): each distinct caption is encoded once, on its own, without gradients, and
    reused. On its own, because a batched encoding can differ in the last bits with the batch's other captions
    (measured on a CPU: 2.4e-7 for two captions swapped), and a resumed run fills its cache from other batches than
    the run it continues: its steps would then differ from the uninterrupted run's.
    """
    text_encoder = pipe.text_encoder
    if cache is None:
        return text_encoder(tokenize(pipe.tokenizer, captions).to(text_encoder.device)).last_hidden_state
    with torch.no_grad():
        for caption in dict.fromkeys(captions):
            if caption not in cache:
                cache[caption] = encode_captions(pipe, [caption])[0]
    return torch.stack([cache[c] for c in captions])


def check_placeholder(tokenizer, placeholder: str) -> None:
    """Raise ``ValueError`` unless ``placeholder`` is one word that is not yet a single token of ``tokenizer``."""
    if not isinstance(placeholder, str) or not placeholder or any(c.isspace() for c in placeholder):
        raise ValueError(f"The placeholder {placeholder!r} must be one word without spaces, e.g. '<my-face>'.")
    ids = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise ValueError(
            f"The placeholder {placeholder!r} is already in the tokenizer's vocabulary "
            f"(token {tokenizer.convert_ids_to_tokens(ids)[0]!r}); choose another placeholder, e.g. <my-face>."
        )


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` if the tokenizer keeps it as one token; ``ValueError`` naming its pieces otherwise."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"Pick a single-token init word such as 'person'; {word!r} splits into {pieces}.")
    return ids[0]


def add_tokens(pipe: StableDiffusionPipeline, tokens: Sequence[str], rows: torch.Tensor) -> torch.Tensor:
    """Add ``tokens`` to the tokenizer, grow the text encoder's embedding matrix and set their rows to ``rows``.

    ``rows``: (len(tokens), D). Returns the new token ids, (len(tokens),) int64 on the text encoder's device.
    """
    for token in tokens:
        check_placeholder(pipe.tokenizer, token)
    pipe.tokenizer.add_tokens(list(tokens))
    rows_now = pipe.text_encoder.get_input_embeddings().num_embeddings
    pipe.text_encoder.resize_token_embeddings(max(len(pipe.tokenizer), rows_now), mean_resizing=False)
    weight = pipe.text_encoder.get_input_embeddings().weight
    ids = torch.tensor([single_token_id(pipe.tokenizer, t) for t in tokens], device=weight.device)
    with torch.no_grad():
        weight[ids] = rows.to(weight)
    return ids


def encode_with_token_rows(
    text_encoder, input_ids: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """The text encoder's last hidden state (B, S, D) for ``input_ids`` (B, S), token ``token_ids[k]`` (K,) read as
    ``rows[k]`` (rows: (K, D)), or in sequence ``b`` as ``rows[b, k]`` (rows: (B, K, D)), instead of its own row.

    Gradients flow into ``rows`` only. The encoder's embedding matrix is read, never copied or differentiated (a
    forward hook on its token embedding swaps the looked-up vectors), so a step costs no (V, D) gradient; the
    encoder is not modified.
    """
    embedding = text_encoder.get_input_embeddings()
    input_ids = input_ids.to(embedding.weight.device)
    rows = rows.to(embedding.weight.dtype)
    rows = rows.expand(len(input_ids), -1, -1) if rows.dim() == 2 else rows
    match = (input_ids[..., None] == token_ids.to(input_ids.device)).to(rows.dtype)  # (B, S, K)
    swapped, learned = match.sum(-1, keepdim=True) > 0, torch.bmm(match, rows)  # (B, S, 1), (B, S, D)

    def swap(module, args, looked_up):  # looked_up: (B, S, D)
        return torch.where(swapped, learned, looked_up.detach())

    handle = embedding.register_forward_hook(swap)
    try:
        return text_encoder(input_ids).last_hidden_state
    finally:
        handle.remove()


def with_placeholder(
    dataset: Sequence[tuple[Image.Image, str]], word: str, placeholder: str
) -> list[tuple[Image.Image, str]]:
    """The dataset with the whole word ``word`` (e.g. notebook 01's ``"sks"``) replaced by ``placeholder`` in
    every caption that does not hold ``placeholder`` yet. ``ValueError`` if a caption has neither. Images are
    passed through untouched."""
    pattern = re.compile(rf"(?<![\w<]){re.escape(word)}(?![\w>])")
    out = []
    for image, caption in dataset:
        if placeholder not in caption:
            if not pattern.search(caption):
                raise ValueError(
                    f"The caption {caption!r} does not contain {word!r}: prepare the dataset with that token."
                )
            caption = pattern.sub(placeholder, caption)
        out.append((image, caption))
    return out


def check_captions(tokenizer, captions: Sequence[str], token_id: int, placeholder: str) -> None:
    """Raise ``ValueError`` naming the first caption whose tokens lack ``token_id`` (the placeholder)."""
    for caption in captions:
        if token_id not in tokenizer(caption, add_special_tokens=False).input_ids:
            raise ValueError(
                f"The caption {caption!r} does not contain the placeholder {placeholder!r}: "
                f"use with_placeholder(dataset, 'sks', {placeholder!r}) or write it into the captions."
            )


def copy_saved(param: torch.nn.Parameter, state: dict[str, torch.Tensor], key: str) -> None:
    """Copy ``state[key]`` into ``param``; ``ValueError`` saying what the file holds if it is missing or misshapen."""
    learned = state.get(key)
    if learned is None or learned.shape != param.shape:
        found = {k: tuple(v.shape) for k, v in state.items()}
        raise ValueError(f"Expected {{{key!r}: {tuple(param.shape)}}} but the file holds {found}.")
    with torch.no_grad():
        param.copy_(learned)
