"""nbutils.text: prompts encoded with some token rows read from trainable tensors."""
from __future__ import annotations

import torch
from torch.func import functional_call

from nbutils.models import build_tiny_pipeline
from nbutils.text import add_tokens, encode_captions, encode_with_token_rows, tokenize

TOKENS = ["<a>", "<b>"]


def _pipe_with_tokens():
    pipe = build_tiny_pipeline()
    ids = add_tokens(pipe, TOKENS, torch.zeros(2, pipe.text_encoder.config.hidden_size))
    return pipe, ids


def _written_into_the_matrix(pipe, input_ids, token_ids, rows):
    """The reference: the rows written into the encoder's own embedding matrix, then a plain forward."""
    weight = pipe.text_encoder.get_input_embeddings().weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[token_ids] = rows
        out = pipe.text_encoder(input_ids).last_hidden_state
        weight.copy_(kept)
    return out


def test_rows_read_exactly_as_if_written_into_the_matrix_per_batch_and_per_sequence():
    pipe, token_ids = _pipe_with_tokens()
    ids = tokenize(pipe.tokenizer, ["a photo of <a> and <b>", "<b> in a garden", "no token here"])
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shared = encode_with_token_rows(pipe.text_encoder, ids, token_ids, rows)
    assert torch.equal(shared, _written_into_the_matrix(pipe, ids, token_ids, rows))
    per_sequence = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = encode_with_token_rows(pipe.text_encoder, ids, token_ids, per_sequence)
    for b in range(3):  # one sequence at a time: equal up to the batched matmuls' rounding
        torch.testing.assert_close(out[b], _written_into_the_matrix(pipe, ids[b:b + 1], token_ids, per_sequence[b])[0])
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks  # the swap leaves no hook behind


def test_gradients_reach_the_rows_alone_and_match_a_swapped_matrix():
    pipe, token_ids = _pipe_with_tokens()
    encoder = pipe.text_encoder
    weight = encoder.get_input_embeddings().weight
    weight.requires_grad_(True)  # even a trainable matrix gets no (V, D) gradient from the swap
    ids = tokenize(pipe.tokenizer, ["a photo of <a> <a>", "<b> by the sea"])
    target = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    (encode_with_token_rows(encoder, ids, token_ids, rows) * target).sum().backward()
    assert weight.grad is None and rows.grad is not None and rows.grad.abs().min() > 0
    # the former route: the whole matrix with the rows swapped in, read through functional_call
    name = next(n for n, p in encoder.named_parameters() if p is weight)
    reference_rows = rows.detach().clone().requires_grad_(True)
    swapped = weight.detach().index_put((token_ids,), reference_rows)
    (functional_call(encoder, {name: swapped}, (ids,)).last_hidden_state * target).sum().backward()
    torch.testing.assert_close(rows.grad, reference_rows.grad, rtol=1e-5, atol=1e-6)


def test_a_cached_caption_is_encoded_on_its_own_whatever_its_batch():
    """A resumed run fills its text cache from other batches than the run it continues, so a cached caption must not
    depend on the captions encoded with it (batched, these two differ in the last bits on a CPU)."""
    pipe = build_tiny_pipeline()
    captions = [f"a photo of <sks> sks person, view {i}" for i in range(2)]
    together, swapped = {}, {}
    encode_captions(pipe, captions, together)
    encode_captions(pipe, captions[::-1], swapped)
    with torch.no_grad():
        alone = {c: encode_captions(pipe, [c])[0] for c in captions}
    assert all(torch.equal(together[c], alone[c]) and torch.equal(swapped[c], alone[c]) for c in captions)
    assert torch.equal(encode_captions(pipe, captions, together), torch.stack([alone[c] for c in captions]))
