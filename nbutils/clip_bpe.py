"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ``open_clip`` ships.

The toy and tiny-random tiers use the very tokenizer of Stable Diffusion 1.5 (49,408 tokens), so prompts,
placeholder tokens and ``load_textual_inversion`` behave exactly as on the real tier. Only the vocabulary file
of ``open_clip`` is read; the package itself is never imported (it would need torchvision).
"""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408


def bpe_file() -> Path:
    """Path of ``open_clip/bpe_simple_vocab_16e6.txt.gz``, found without importing ``open_clip``."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The CLIP vocabulary comes from open_clip: run `pip install --no-deps open-clip-torch==3.3.0` "
            "(or `make venv`)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49,408 entries) and its 48,894 BPE merges as ``('a', 'b')`` pairs."""
    lines = gzip.open(bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` identical to Stable Diffusion 1.5's.

    transformers 5 needs vocab and merges as objects here: given file paths it silently builds a 3-token tokenizer.
    """
    vocab, merges = vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok
