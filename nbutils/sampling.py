"""Seeded sampling from a diffusers text-to-image pipeline, in batches, with a progress bar.

Sample ``i`` of a call always uses ``torch.Generator().manual_seed(seeds[i])`` for its starting noise, so the same
(prompt, seed) pair gives the same image whatever the batch size, and methods are compared on identical noise.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm


def generate(
    pipe: DiffusionPipeline,
    prompts: str | Sequence[str] | None,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    batch_size: int = 16,
    negative_prompt: str | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    progress: bool = True,
    **pipe_kwargs,
) -> list[Image.Image]:
    """One image per seed (and per prompt, when ``prompts`` is a list as long as ``seeds``).

    Instead of prompts, precomputed conditioning can be given (e.g. P+'s per-layer embeddings):
    ``prompt_embeds`` and ``negative_prompt_embeds`` of shape ``(1 or len(seeds), S, D)``, with ``prompts=None``.
    Returns PIL images at the pipeline's default resolution (64 px on the toy tier, 512 px on SD1.5).
    Extra keyword arguments (``cross_attention_kwargs``, ``height``...) go to the pipeline call.
    """
    if prompt_embeds is not None:
        if prompts is not None:
            raise ValueError("give either prompts or prompt_embeds, not both")
        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        embeds = {k: v.expand(len(seeds), *v.shape[1:]) if v is not None and len(v) == 1 else v
                  for k, v in embeds.items()}
        if len(embeds["prompt_embeds"]) != len(seeds):
            raise ValueError(f"got {len(prompt_embeds)} prompt embeddings for {len(seeds)} seeds: give 1 or one per seed")
    elif isinstance(prompts, str):
        prompts = [prompts] * len(seeds)
    if prompt_embeds is None and (prompts is None or len(prompts) != len(seeds)):
        n = 0 if prompts is None else len(prompts)
        raise ValueError(f"got {n} prompts for {len(seeds)} seeds: give one prompt, or one per seed")
    device = pipe._execution_device
    was_enabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    chunks = range(0, len(seeds), batch_size)
    for start in tqdm(chunks, desc="sampling", disable=not progress or len(chunks) < 2):
        idx = slice(start, start + batch_size)
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[idx]]
        shape = _latent_shape(pipe, pipe_kwargs)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, pipe.unet.dtype)
        if prompt_embeds is not None:
            conditioning = {k: v[idx] for k, v in embeds.items() if v is not None}
        else:
            conditioning = {"prompt": list(prompts[idx]),
                            "negative_prompt": [negative_prompt] * len(gens) if negative_prompt else None}
        out = pipe(latents=latents, num_inference_steps=steps, guidance_scale=guidance_scale, **conditioning,
                   **pipe_kwargs)
        images.extend(out.images)
    pipe.set_progress_bar_config(disable=was_enabled)
    return images


def _latent_shape(pipe: DiffusionPipeline, kwargs: dict) -> tuple[int, int, int]:
    """``(C, H/f, W/f)`` of one starting latent, f = the VAE's downsampling factor."""
    f = pipe.vae_scale_factor
    size = pipe.unet.config.sample_size * f
    height, width = kwargs.get("height") or size, kwargs.get("width") or size
    return pipe.unet.config.in_channels, height // f, width // f


@torch.no_grad()
def autoencode(pipe: DiffusionPipeline, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The autoencoder's round trip, no diffusion: each image resized to the pipeline's resolution, encoded to its
    latent mean and decoded. Every image a method generates passes through this decoder, so the round trip's
    identity score is the ceiling of every method's."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    x = pipe.image_processor.preprocess([im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
                                         for im in images]).to(pipe.vae.device, pipe.vae.dtype)
    decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")
