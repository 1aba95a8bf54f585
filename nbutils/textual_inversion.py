"""Textual Inversion (Gal et al. 2022): teach the model a new word; the model itself stays frozen.

The concept gets a placeholder token (``<sks>``; with N vectors the tokens ``<sks>``, ``<sks>_1``, ...,
``<sks>_{N-1}``, diffusers' multi-vector convention) added to the tokenizer. Its N embedding rows start from an
init word ("person") and are the only numbers that train: an ``(N, D)`` tensor (``D`` = 768 on SD1.5).
The text encoder reads the placeholder tokens from the trainable tensor instead of its own embedding matrix
(``nbutils.text.encode_with_token_rows``), so every other row, the text encoder, the UNet and the VAE stay exactly as
they were. Weights are saved as ``learned_embeds.safetensors`` ``{placeholder: (N, D)}``, the format
``pipe.load_textual_inversion`` reads.

The helpers that add tokens and encode prompts with swapped rows are in ``nbutils.text``, shared with P+ and E4T.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from nbutils.text import add_tokens, check_captions, copy_saved, encode_with_token_rows, single_token_id, tokenize
from nbutils.train import Method, TrainConfig, config_for_tier

WEIGHTS_NAME = "learned_embeds.safetensors"
A1111_KEY = "emb_params"  # the one tensor of an A1111 / kohya safetensors embedding (nbutils.exports)


class TextualInversion(Method):
    """Textual Inversion as a ``nbutils.train`` method: the only trainable tensor is ``embeds`` (N, D) float32.

    ``placeholder``: the new word (``<sks>``); ``init_word``: a single-token word whose embedding starts every
    vector; ``num_vectors``: N. Adds the tokens to ``pipe`` (tokenizer and text encoder) at construction.
    """

    name = "textual_inversion"
    weights_name = WEIGHTS_NAME

    def __init__(
        self, pipe: StableDiffusionPipeline, placeholder: str = "<sks>", init_word: str = "person", num_vectors: int = 1
    ):
        super().__init__(pipe)
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {num_vectors}.")
        self.placeholder = placeholder
        self.tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]
        weight = pipe.text_encoder.get_input_embeddings().weight
        init = weight[single_token_id(pipe.tokenizer, init_word)].detach().float()
        self.token_ids = add_tokens(pipe, self.tokens, init.expand(num_vectors, -1))
        self.embeds = torch.nn.Parameter(init.repeat(num_vectors, 1))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.embeds]

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, 77, D): captions with the placeholder expanded to its N tokens (``pipe.maybe_convert_prompt``)."""
        tokenizer = self.pipe.tokenizer
        check_captions(tokenizer, captions, int(self.token_ids[0]), self.placeholder)
        ids = tokenize(tokenizer, self.pipe.maybe_convert_prompt(list(captions), tokenizer))
        return encode_with_token_rows(self.pipe.text_encoder, ids, self.token_ids, self.embeds)

    def after_step(self) -> None:
        """Copy the learned rows into the text encoder, so ``pipe(...)`` uses them (e.g. in sampling callbacks)."""
        weight = self.pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_ids] = self.embeds.detach().to(weight.dtype)

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """``{placeholder: (N, D)}``, diffusers' textual-inversion format."""
        return {self.placeholder: self.embeds.detach()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        copy_saved(self.embeds, state, self.placeholder)
        self.after_step()


def load_textual_inversion(pipe: StableDiffusionPipeline, path: str | Path, token: str | None = None) -> None:
    """``pipe.load_textual_inversion`` from a checkpoint folder or a ``.safetensors`` file, never unpickling: diffusers'
    ``{placeholder: (N, D)}`` or A1111's ``{"emb_params": (N, D)}`` (``nbutils.exports.export_ti_a1111``).

    Afterwards prompts with the placeholder (``token``, default: the one stored in the file; A1111's files store
    none, so pass it) use the learned rows. ``ValueError`` (``pipe`` unchanged) if the vectors' width D is not the
    text encoder's embedding width, or for an A1111 file without ``token``.
    """
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} at {path}: pass a checkpoint folder of a textual-inversion run.")
    state = load_file(file)
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    for name, vectors in state.items():
        if vectors.shape[-1] != width:
            raise ValueError(
                f"{file} holds {name!r} of shape {tuple(vectors.shape)}: vectors {vectors.shape[-1]} numbers wide, but "
                f"this model's text encoder takes token embeddings {width} wide (SD1.5: 768), so it was learned on "
                "another model. Load the model it was learned on, or learn the embedding on this one."
            )
    if token is None and list(state) == [A1111_KEY]:
        raise ValueError(f"{file} is an A1111 embedding, which names no placeholder (A1111 uses the file name): "
                         "pass token=, e.g. token='<sks>'.")
    pipe.load_textual_inversion(state, token=token)


def default_config(tier: str, quick: bool = False) -> TrainConfig:
    """Training defaults per model tier (``"real"``, ``"toy"``, ``"tiny"``); ``quick`` shortens the run.

    real: diffusers' textual_inversion example (SD1.5, 512 px, 3000 steps, batch 1 x 4 accumulated,
    lr 5e-4 scaled by the batch: 2e-3, constant schedule). toy: a few minutes on a CPU at 64 px.
    tiny: a handful of steps for tests.
    """
    return config_for_tier(tier, quick, {
        "real": TrainConfig(steps=3000, batch_size=1, gradient_accumulation=4, lr=5e-4 * 4, checkpoint_every=500),
        "toy": TrainConfig(steps=400, batch_size=4, lr=5e-3, checkpoint_every=100),
        "tiny": TrainConfig(steps=4, batch_size=2, lr=5e-3, checkpoint_every=2),
    })
