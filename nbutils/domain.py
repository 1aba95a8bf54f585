"""The toy world as a *domain*: many people, several photos each, for pretraining encoders (E4T, IP-Adapter).

Encoder methods learn once, on a whole domain (E4T: faces; IP-Adapter: any image), how to turn photos of someone
into conditioning, and then personalise in seconds. Their papers pretrain on large photo collections; on the toy
tier the renderer draws as many people as needed. The domain covers every trait value (purple hair and the star
included, as a face encoder has seen every hair colour), and never one of the study's subjects
(``toyworld.SUBJECTS``), whose exact identities stay unseen until a notebook personalises to them.

A domain photo's caption says what the *text* should carry (style, expression, scene) and names the person only by
the placeholder ``{S}``; the photos of the same person carry who they are.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from nbutils.toyworld import (ACCESSORIES, FACE_SHAPES, HAIR_COLOURS, HAIR_STYLES, MARKS, SCENE_PHRASES,
                              SKIN_TONES, STYLE_PHRASES, SUBJECTS, Identity, Portrait, random_identity,
                              random_portrait, render)

PLACEHOLDER = "{S}"


def domain_identities(seed: int, n: int) -> list[Identity]:
    """``n`` distinct identities, every trait value uniform, none of them one of ``toyworld.SUBJECTS``."""
    rng, found = random.Random(seed), []
    held_out = set(SUBJECTS.values())
    available = len(FACE_SHAPES) * len(SKIN_TONES) * len(HAIR_COLOURS) * len(HAIR_STYLES) * len(ACCESSORIES) * len(
        MARKS) - len(held_out)
    if not 0 < n <= available:
        raise ValueError(f"The toy world has {available} identities besides the subjects: ask for 1..{available}.")
    while len(found) < n:
        ident = random_identity(rng, held_out=True)
        if ident not in held_out and ident not in found:
            found.append(ident)
    return found


def caption(p: Portrait, subject_phrase: str = PLACEHOLDER) -> str:
    """``p``'s caption with the person named only by ``subject_phrase``, e.g.
    ``'a watercolor painting of {S}, smiling, in a forest'``."""
    return f"{STYLE_PHRASES[p.style]} of {subject_phrase}, {p.expression}, {SCENE_PHRASES[p.scene]}"


@dataclass
class DomainSet:
    """``images``: (P, K, 3, size, size) uint8 renders, K photos of each of P people; ``captions[p][k]`` the caption
    of photo k of person p (``PLACEHOLDER`` for the person); ``identities[p]`` who person p is."""

    images: torch.Tensor
    captions: list[list[str]]
    identities: list[Identity]

    @property
    def people(self) -> int:
        return self.images.shape[0]

    @property
    def photos_per_person(self) -> int:
        return self.images.shape[1]

    def pixels(self, people: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
        """Float32 images in [0, 1] of the given (person, photo) index pairs: shape ``people.shape + (3, s, s)``."""
        return self.images[people, photos].float() / 255.0


def render_domain(seed: int, people: int, photos_per_person: int, size: int = 64) -> DomainSet:
    """``photos_per_person`` random portraits (pose, expression, scene, style) of each of ``domain_identities(seed,
    people)``, rendered at ``size`` px; the same set for the same arguments."""
    identities = domain_identities(seed, people)
    rng = random.Random(seed + 1)
    images = np.zeros((people, photos_per_person, 3, size, size), dtype=np.uint8)
    captions = []
    for i, ident in enumerate(identities):
        row = []
        for k in range(photos_per_person):
            p = random_portrait(rng, ident)
            images[i, k] = np.asarray(render(p, size)).transpose(2, 0, 1)
            row.append(caption(p))
        captions.append(row)
    return DomainSet(torch.from_numpy(images), captions, identities)


def leave_one_out(
    generator: torch.Generator, people: int, photos_per_person: int, batch: int, refs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One leave-one-out batch: ``(person (B,), target (B,), references (B, refs))`` int64 indices.

    Each row picks a person, one photo of theirs to predict, and ``refs`` *other* photos of the same person as the
    reference images (distinct, the target never among them): the model must draw the held-out photo from the
    text and the others, so it cannot copy the reference's scene or style. Needs ``refs < photos_per_person``.
    """
    if not 0 < refs < photos_per_person:
        raise ValueError(f"refs must be in 1..{photos_per_person - 1} (photos per person - 1), got {refs}")
    person = torch.randint(0, people, (batch,), generator=generator)
    order = torch.argsort(torch.rand(batch, photos_per_person, generator=generator), dim=1)
    return person, order[:, 0], order[:, 1:refs + 1]
