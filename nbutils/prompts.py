"""Evaluation prompts in the style of DreamBench (Ruiz et al., 2023), adapted to portraits of one person.

Each prompt is a template with ``{S}`` where the subject phrase goes (``"sks person"``, ``"<sks>"``). The five
categories follow DreamBench's live-subject prompts: *recontextualization* (a new place), *accessorization* (something
worn), *property* (a changed appearance: hair), *expression* (a changed face) and *art* (a painting or drawing style).

One table holds both tiers. The ``real`` column is free English for Stable Diffusion 1.5; the ``toy`` column uses only
the phrases of the toy world's captions (``nbutils.toyworld``: its style, scene, accessory phrases and expressions, in
the caption's word order), or is ``None`` where the toy world has no such thing.

CLIP-T scores an image against its prompt *without* the subject token: ``strip_subject`` swaps the subject phrase for
the class phrase (``"a photo of sks person on the beach"`` -> ``"a photo of a person on the beach"``).

``toy_request`` reads what a toy-world prompt asks for (its style, scene, ...), for the toy tier's success rate and
its FID reference renders (``nbutils.metrics.evaluate_images``). ``CLASS_PROMPT`` is the bare class prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from nbutils.toyworld import (ACCESSORY_PHRASES, EXPRESSIONS, HAIR_COLOURS, HAIR_STYLES, MARK_PHRASES, SCENE_PHRASES,
                              STYLE_PHRASES, TOY_SUBJECT)

CLASS_PROMPT = "a photo of a person"
"""The bare class prompt: DreamBooth's class images (``nbutils.class_images``) and its language drift
(``nbutils.metrics.language_drift``) draw it."""

CATEGORIES = ("recontextualization", "accessorization", "property", "expression", "art")


def _toy(style: str, *tail: str) -> str:
    """A toy-world template in caption order: ``'<style phrase> of {S}, <tail>, <tail>'``."""
    return ", ".join([f"{STYLE_PHRASES[style]} of {{S}}", *tail])


def _toy_hair(colour: str) -> str:
    """The toy subject with another hair colour, worded like the toy captions (``'red long hair'``)."""
    return f"{STYLE_PHRASES['photo']} of {{S}} with {colour} {TOY_SUBJECT.hair_style} hair"


# (name, category, real template, toy template or None)
_TABLE: tuple[tuple[str, str, str, str | None], ...] = (
    ("beach", "recontextualization", "a photo of {S} on the beach", _toy("photo", SCENE_PHRASES["beach"])),
    ("forest", "recontextualization", "a photo of {S} in a forest", _toy("photo", SCENE_PHRASES["forest"])),
    ("city", "recontextualization", "a photo of {S} on a busy city street", _toy("photo", SCENE_PHRASES["city"])),
    ("night", "recontextualization", "a photo of {S} in the city at night", _toy("photo", SCENE_PHRASES["night"])),
    ("studio", "recontextualization", "a studio portrait photo of {S}", _toy("photo", SCENE_PHRASES["studio"])),
    ("snow", "recontextualization", "a photo of {S} in the snow", None),
    ("mountain", "recontextualization", "a photo of {S} with a mountain in the background", None),
    ("cafe", "recontextualization", "a photo of {S} sitting in a cafe", None),
    ("sunglasses", "accessorization", "a photo of {S} wearing sunglasses",
     _toy("photo", ACCESSORY_PHRASES["sunglasses"])),
    ("hat", "accessorization", "a photo of {S} wearing a hat", _toy("photo", ACCESSORY_PHRASES["hat"])),
    ("santa_hat", "accessorization", "a photo of {S} wearing a santa hat", None),
    ("scarf", "accessorization", "a photo of {S} wearing a rainbow scarf", None),
    ("chef", "accessorization", "a photo of {S} in a chef outfit", None),
    ("firefighter", "accessorization", "a photo of {S} in a firefighter outfit", None),
    ("red_hair", "property", "a photo of {S} with red hair", _toy_hair("red")),
    ("blonde_hair", "property", "a photo of {S} with blonde hair", _toy_hair("blonde")),
    ("white_hair", "property", "a photo of {S} with white hair", _toy_hair("white")),
    ("short_hair", "property", "a photo of {S} with short hair", None),
    ("smiling", "expression", "a photo of {S} smiling", _toy("photo", "smiling")),
    ("surprised", "expression", "a photo of {S} looking surprised", _toy("photo", "surprised")),
    ("neutral", "expression", "a photo of {S} with a neutral expression", _toy("photo", "neutral")),
    ("laughing", "expression", "a photo of {S} laughing", None),
    ("sad", "expression", "a photo of {S} looking sad", None),
    ("van_gogh", "art", "a painting of {S} in the style of Van Gogh", None),
    ("vermeer", "art", "a painting of {S} in the style of Vermeer", None),
    ("rembrandt", "art", "a painting of {S} in the style of Rembrandt", None),
    ("pencil_sketch", "art", "a pencil sketch of {S}", _toy("sketch")),
    ("pixel_art", "art", "a pixel art image of {S}", _toy("pixel art")),
    ("watercolor", "art", "a watercolor painting of {S}", _toy("watercolor")),
    ("pop_art", "art", "a pop art poster of {S}", _toy("pop art")),
)


@dataclass(frozen=True)
class PromptSet:
    """One evaluation prompt: ``template`` holds ``{S}`` once, where the subject phrase goes."""

    name: str
    category: str
    template: str

    def fill(self, subject_phrase: str) -> str:
        """The prompt for ``subject_phrase``, e.g. ``'a photo of sks person on the beach'``."""
        return self.template.replace("{S}", subject_phrase)


PROMPT_SETS: dict[str, tuple[PromptSet, ...]] = {
    "real": tuple(PromptSet(name, cat, real) for name, cat, real, _ in _TABLE),
    "toy": tuple(PromptSet(name, cat, toy) for name, cat, _, toy in _TABLE if toy is not None),
}
"""Prompt sets by tier: ``"real"`` (every prompt) and ``"toy"`` (those the toy world can draw)."""


def strip_subject(prompt: str, subject_phrase: str, class_phrase: str = "a person") -> str:
    """``prompt`` with every ``subject_phrase`` (and an article right before it) replaced by ``class_phrase``.

    ``strip_subject("a photo of sks person smiling", "sks person")`` -> ``"a photo of a person smiling"``; an article
    before the phrase is absorbed, so ``"a sks person"`` also becomes ``"a person"``. Raises ``ValueError`` if the
    phrase is not in the prompt (a prompt scored without its subject would measure nothing).
    """
    pattern = re.compile(r"(?<!\w)(?:(?:a|an|the)\s+)?" + re.escape(subject_phrase) + r"(?!\w)", re.IGNORECASE)
    stripped, n = pattern.subn(class_phrase, prompt) if subject_phrase.strip() else (prompt, 0)
    if n == 0:
        raise ValueError(
            f"subject phrase {subject_phrase!r} is not in the prompt {prompt!r}; pass the phrase the prompt was "
            "filled with (e.g. 'sks person')"
        )
    return stripped


_TOY_PARTS = {phrase: (field, value) for field, table in (("scene", SCENE_PHRASES), ("accessory", ACCESSORY_PHRASES),
                                                          ("mark", MARK_PHRASES))
              for value, phrase in table.items() if phrase}
_TOY_PARTS.update({e: ("expression", e) for e in EXPRESSIONS})


def toy_request(prompt: str, subject_phrase: str = "{S}") -> dict[str, str] | None:
    """What a prompt in the toy captions' word order asks the toy world for, as ``toyworld`` field values.

    ``prompt`` holds ``subject_phrase`` once (a template: ``"{S}"``). ``"a pop art poster of {S}"`` ->
    ``{"style": "pop art"}``; ``"a photo of {S}, on the beach"`` -> ``{"style": "photo", "scene": "beach"}``;
    ``"a photo of {S} with red long hair"`` -> ``{"style": "photo", "hair_colour": "red", "hair_style": "long"}``.
    Keys are ``toyworld.Portrait`` / ``Identity`` field names (``style`` always; ``scene``, ``expression``,
    ``accessory``, ``mark``, ``hair_colour`` and ``hair_style`` when named), ready for ``toyworld.with_fields``; a
    field left out is not asked for. ``None`` for a prompt that is not a toy-world prompt (every real-tier prompt
    but the styles the two tiers share, e.g. ``"a photo of {S} on the beach"``, which has no comma).
    """
    if not subject_phrase or prompt.count(subject_phrase) != 1:
        return None
    head, *tail = prompt.replace(subject_phrase, "{S}").split(", ")
    style = next((k for k, phrase in STYLE_PHRASES.items() if head.startswith(f"{phrase} of {{S}}")), None)
    if style is None:
        return None
    request = {"style": style}
    hair = head.removeprefix(f"{STYLE_PHRASES[style]} of {{S}}")
    if hair:
        found = re.fullmatch(r" with (\w+) (\w+) hair", hair)
        if found is None or found[1] not in HAIR_COLOURS or found[2] not in HAIR_STYLES:
            return None
        request.update(hair_colour=found[1], hair_style=found[2])
    for part in tail:
        field, value = _TOY_PARTS.get(part, (None, None))
        if field is None or field in request:
            return None
        request[field] = value
    return request
