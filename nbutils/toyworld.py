"""A procedural portrait world: deterministic cartoon portraits with captions naming what they show.

The toy tier's base model is pretrained on this world, and the toy evaluators are trained on its ground truth.
Every attribute has a few, very distinct values that stay large and keep their colour in every drawing style,
so that a 64 px model can learn them from words. One hair colour (``purple``) and one mark (``star``) are *unnamed*:
pretraining images show them on other people, but no pretraining caption names them (``UNNAMED``). Both toy subjects
carry them, and neither subject's exact identity is ever drawn in pretraining, so the base model could render a
subject but has no words for them, as Stable Diffusion 1.5 could draw a face like yours without knowing your name.

Images are drawn at ``4 * size`` and downsampled with a Lanczos filter; ``render`` returns an RGB ``PIL.Image``
of ``size x size`` pixels.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterator

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

FACE_SHAPES = ("round", "oval", "square")
SKIN_TONES = {"pale": (250, 220, 190), "tan": (205, 150, 100), "dark": (110, 70, 45)}
HAIR_COLOURS = {
    "black": (30, 28, 30),
    "blonde": (245, 205, 55),
    "red": (205, 45, 30),
    "white": (240, 240, 240),
    "purple": (150, 50, 215),  # held out: only the toy subject has it
}
HAIR_STYLES = ("short", "long", "afro")
ACCESSORIES = ("none", "sunglasses", "hat")
MARKS = ("none", "star")  # held out: only the toy subject has the star
EXPRESSIONS = ("smiling", "neutral", "surprised")
SCENES = ("studio", "beach", "forest", "city", "night")
STYLES = ("photo", "sketch", "pixel art", "watercolor", "pop art")

PRETRAIN_HAIR_COLOURS = tuple(c for c in HAIR_COLOURS if c != "purple")
IDENTITY_FIELDS = ("face", "skin", "hair_colour", "hair_style", "accessory", "mark")

STYLE_PHRASES = {
    "photo": "a photo",
    "sketch": "a pencil sketch",
    "pixel art": "a pixel art image",
    "watercolor": "a watercolor painting",
    "pop art": "a pop art poster",
}
SCENE_PHRASES = {
    "studio": "in a studio",
    "beach": "on the beach",
    "forest": "in a forest",
    "city": "in the city",
    "night": "at night",
}
ACCESSORY_PHRASES = {"none": "", "sunglasses": "wearing sunglasses", "hat": "wearing a hat"}
MARK_PHRASES = {"none": "", "star": "with a star on the cheek"}


@dataclass(frozen=True)
class Identity:
    """Who is drawn: the traits an identity embedder must recognise in every scene and style."""

    face: str
    skin: str
    hair_colour: str
    hair_style: str
    accessory: str = "none"
    mark: str = "none"

    def describe(self) -> str:
        """Words for this identity, e.g. ``'a person with a round face, pale skin and red short hair'``."""
        words = f"a person with a {self.face} face, {self.skin} skin and {self.hair_colour} {self.hair_style} hair"
        extras = [p for p in (ACCESSORY_PHRASES[self.accessory], MARK_PHRASES[self.mark]) if p]
        return ", ".join([words, *extras])


@dataclass(frozen=True)
class Portrait:
    """One picture of the world: an identity, its pose and expression, a scene and a drawing style."""

    identity: Identity
    expression: str = "neutral"
    scene: str = "studio"
    style: str = "photo"
    dx: float = 0.0  # horizontal head offset, fraction of the image width
    dy: float = 0.0  # vertical head offset, fraction of the image height
    scale: float = 1.0  # head size relative to the standard framing
    tilt: float = 0.0  # head rotation in degrees, counter-clockwise
    seed: int = 0  # texture noise (trees, stars, windows, paper)

    def caption(self) -> str:
        """The full caption, e.g. ``'a photo of a person with ..., smiling, in a forest'``."""
        return f"{STYLE_PHRASES[self.style]} of {self.identity.describe()}, {self.expression}, {SCENE_PHRASES[self.scene]}"

    def labels(self) -> dict[str, int]:
        """Class index of every attribute, for training and scoring the toy evaluators."""
        ident = self.identity
        return {
            "face": FACE_SHAPES.index(ident.face),
            "skin": list(SKIN_TONES).index(ident.skin),
            "hair_colour": list(HAIR_COLOURS).index(ident.hair_colour),
            "hair_style": HAIR_STYLES.index(ident.hair_style),
            "accessory": ACCESSORIES.index(ident.accessory),
            "mark": MARKS.index(ident.mark),
            "expression": EXPRESSIONS.index(self.expression),
            "scene": SCENES.index(self.scene),
            "style": STYLES.index(self.style),
        }


LABEL_SIZES = {
    "face": len(FACE_SHAPES),
    "skin": len(SKIN_TONES),
    "hair_colour": len(HAIR_COLOURS),
    "hair_style": len(HAIR_STYLES),
    "accessory": len(ACCESSORIES),
    "mark": len(MARKS),
    "expression": len(EXPRESSIONS),
    "scene": len(SCENES),
    "style": len(STYLES),
}

TOY_SUBJECT = Identity(face="oval", skin="tan", hair_colour="purple", hair_style="long", accessory="none", mark="star")
"""The held-out identity that the notebooks personalise the toy model to (``data/subjects/toy``)."""
TOY_VAL_SUBJECT = Identity(face="square", skin="pale", hair_colour="purple", hair_style="short", accessory="hat",
                           mark="star")
"""The validation subject (``data/subjects/toy-val``): every named trait differs from ``TOY_SUBJECT``'s, the two
unnamed ones are shared, so recipes chosen on it face the same problem as on the reported subject."""
SUBJECTS = {"toy": TOY_SUBJECT, "toy-val": TOY_VAL_SUBJECT}

UNNAMED = {"hair_colour": "purple", "mark": "star"}
"""Trait values drawn in pretraining images but never named in their captions."""
UNNAMED_RATES = {"hair_colour": 0.1, "mark": 0.15}
"""How often a pretraining identity carries each unnamed value (rare, so the base model seldom draws it unasked)."""


def random_identity(rng: random.Random, *, held_out: bool = False) -> Identity:
    """A random identity, every value uniform; ``held_out=False`` leaves out the ``UNNAMED`` values."""
    colours = tuple(HAIR_COLOURS) if held_out else PRETRAIN_HAIR_COLOURS
    return Identity(
        face=rng.choice(FACE_SHAPES),
        skin=rng.choice(tuple(SKIN_TONES)),
        hair_colour=rng.choice(colours),
        hair_style=rng.choice(HAIR_STYLES),
        accessory=rng.choice(ACCESSORIES),
        mark=rng.choice(MARKS) if held_out else "none",
    )


def random_portrait(rng: random.Random, identity: Identity | None = None, *, held_out: bool = False) -> Portrait:
    """A random pose, expression, scene and style for ``identity`` (a random pretraining identity if None)."""
    return Portrait(
        identity=identity or random_identity(rng, held_out=held_out),
        expression=rng.choice(EXPRESSIONS),
        scene=rng.choice(SCENES),
        style=rng.choice(STYLES),
        dx=rng.uniform(-0.08, 0.08),
        dy=rng.uniform(-0.04, 0.04),
        scale=rng.uniform(0.9, 1.1),
        tilt=rng.uniform(-10.0, 10.0),
        seed=rng.randrange(2**31),
    )


def portraits(seed: int, n: int, *, identity: Identity | None = None, held_out: bool = False) -> Iterator[Portrait]:
    """``n`` random portraits, the same ones for the same ``seed``."""
    rng = random.Random(seed)
    for _ in range(n):
        yield random_portrait(rng, identity, held_out=held_out)


def pretraining_identity(rng: random.Random) -> Identity:
    """A random identity of the base model's pretraining set: the unnamed values at ``UNNAMED_RATES``, every other
    value uniform, and never one of the ``SUBJECTS`` (drawn again until it is none of them)."""
    while True:
        ident = replace(
            random_identity(rng),
            hair_colour=UNNAMED["hair_colour"] if rng.random() < UNNAMED_RATES["hair_colour"]
            else rng.choice(PRETRAIN_HAIR_COLOURS),
            mark=UNNAMED["mark"] if rng.random() < UNNAMED_RATES["mark"] else "none",
        )
        if ident not in SUBJECTS.values():
            return ident


def pretraining_portraits(seed: int, n: int) -> Iterator[Portrait]:
    """``n`` random portraits of ``pretraining_identity`` people, the same ones for the same ``seed``."""
    rng = random.Random(seed)
    for _ in range(n):
        yield random_portrait(rng, pretraining_identity(rng))


def is_unnamed(field: str, value: str) -> bool:
    """Whether a pretraining caption leaves ``field = value`` unsaid (``UNNAMED``)."""
    return UNNAMED.get(field) == value


def caption_variants(p: Portrait, rng: random.Random, drop: float = 0.3, *, name_unnamed: bool = True) -> str:
    """The caption with each optional phrase dropped with probability ``drop``, so that short prompts work too.

    The style phrase and "a person" are always kept: ``'a photo of a person, in a forest'`` is a valid caption.
    ``name_unnamed=False`` (the base model's pretraining captions) leaves the ``UNNAMED`` values unsaid: purple long
    hair is captioned "long hair", a star mark not at all; the random draws stay the same either way.
    """
    ident = p.identity
    parts = []
    if rng.random() > drop:
        parts.append(f"a {ident.face} face")
    if rng.random() > drop:
        parts.append(f"{ident.skin} skin")
    if rng.random() > drop:
        said = name_unnamed or not is_unnamed("hair_colour", ident.hair_colour)
        parts.append(f"{ident.hair_colour} {ident.hair_style} hair" if said else f"{ident.hair_style} hair")
    head = f"{STYLE_PHRASES[p.style]} of a person"
    if parts:
        head += " with " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
    mark = MARK_PHRASES[ident.mark] if name_unnamed or not is_unnamed("mark", ident.mark) else ""
    tail = [ACCESSORY_PHRASES[ident.accessory], mark]
    tail += [p.expression if rng.random() > drop else "", SCENE_PHRASES[p.scene] if rng.random() > drop else ""]
    return ", ".join([head, *[t for t in tail if t and rng.random() > drop / 2]])


# --------------------------------------------------------------------------------------------------- drawing
def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * f))) for c in rgb)  # type: ignore[return-value]


def _background(draw: ImageDraw.ImageDraw, scene: str, s: int, rng: random.Random) -> None:
    if scene == "studio":
        for y in range(s):
            g = int(170 - 60 * y / s)
            draw.line([(0, y), (s, y)], fill=(g, g, g + 8))
    elif scene == "beach":
        draw.rectangle([0, 0, s, int(0.5 * s)], fill=(120, 190, 245))
        draw.rectangle([0, int(0.5 * s), s, int(0.68 * s)], fill=(20, 90, 170))
        draw.rectangle([0, int(0.68 * s), s, s], fill=(235, 210, 140))
        draw.ellipse([int(0.75 * s), int(0.06 * s), int(0.92 * s), int(0.23 * s)], fill=(255, 240, 120))
    elif scene == "forest":
        draw.rectangle([0, 0, s, s], fill=(30, 85, 40))
        for _ in range(7):
            x = rng.uniform(0, s)
            w = s * 0.05
            draw.rectangle([x - w, 0.35 * s, x + w, s], fill=(95, 60, 30))
            r = rng.uniform(0.12, 0.2) * s
            draw.ellipse([x - r, 0.3 * s - r, x + r, 0.3 * s + r], fill=(50, 140, 55))
    elif scene == "city":
        draw.rectangle([0, 0, s, s], fill=(245, 160, 90))
        x = 0.0
        while x < s:
            w = rng.uniform(0.12, 0.22) * s
            top = rng.uniform(0.15, 0.5) * s
            draw.rectangle([x, top, x + w - 2, s], fill=(85, 85, 100))
            for wy in range(int(top + 6), s, 12):
                for wx in range(int(x + 5), int(x + w - 8), 10):
                    draw.rectangle([wx, wy, wx + 4, wy + 5], fill=(255, 225, 120))
            x += w
    elif scene == "night":
        draw.rectangle([0, 0, s, s], fill=(12, 18, 55))
        for _ in range(40):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(255, 255, 230))
        draw.ellipse([int(0.72 * s), int(0.06 * s), int(0.9 * s), int(0.24 * s)], fill=(245, 245, 210))
    else:
        raise ValueError(f"unknown scene {scene!r}; choose one of {SCENES}")


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        a = math.pi / 2 + k * math.pi / 5
        rr = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
    return pts


def _figure(p: Portrait, s: int) -> Image.Image:
    """The person on a transparent layer, centred, before pose transforms."""
    ident = p.identity
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    skin = SKIN_TONES[ident.skin]
    hair = HAIR_COLOURS[ident.hair_colour]
    cx, cy = s / 2, s * 0.46
    hw = {"round": 0.2, "oval": 0.17, "square": 0.2}[ident.face] * s  # half width of the face
    hh = {"round": 0.2, "oval": 0.25, "square": 0.21}[ident.face] * s  # half height
    # shoulders and shirt (the same muted colour for everyone, so it carries no identity)
    d.ellipse([cx - 0.4 * s, cy + 0.22 * s, cx + 0.4 * s, cy + 0.75 * s], fill=(70, 90, 120, 255))
    d.rectangle([cx - 0.07 * s, cy + hh - 0.03 * s, cx + 0.07 * s, cy + hh + 0.08 * s], fill=skin + (255,))
    # hair behind the head
    if ident.hair_style == "long":
        d.rounded_rectangle([cx - hw - 0.06 * s, cy - hh - 0.05 * s, cx + hw + 0.06 * s, cy + hh + 0.12 * s],
                            radius=int(0.1 * s), fill=hair + (255,))
    elif ident.hair_style == "afro":
        r = hw + 0.13 * s
        d.ellipse([cx - r, cy - hh - 0.1 * s, cx + r, cy - hh - 0.1 * s + 2 * r], fill=hair + (255,))
    # face
    box = [cx - hw, cy - hh, cx + hw, cy + hh]
    if ident.face == "square":
        d.rounded_rectangle(box, radius=int(0.05 * s), fill=skin + (255,))
    else:
        d.ellipse(box, fill=skin + (255,))
    # hair on top
    if ident.hair_style in ("short", "long"):
        d.chord([cx - hw - 0.02 * s, cy - hh - 0.04 * s, cx + hw + 0.02 * s, cy + 0.2 * hh], 180, 360,
                fill=hair + (255,))
    else:
        d.chord([cx - hw, cy - hh - 0.02 * s, cx + hw, cy + 0.1 * hh], 180, 360, fill=hair + (255,))
    # eyes, mouth
    ey = cy - 0.02 * s
    ex = 0.45 * hw
    er = 0.025 * s
    if ident.accessory == "sunglasses":
        d.rounded_rectangle([cx - hw * 0.95, ey - 0.05 * s, cx - 0.02 * s, ey + 0.05 * s], radius=4, fill=(10, 10, 10, 255))
        d.rounded_rectangle([cx + 0.02 * s, ey - 0.05 * s, cx + hw * 0.95, ey + 0.05 * s], radius=4, fill=(10, 10, 10, 255))
        d.line([cx - hw, ey - 0.02 * s, cx + hw, ey - 0.02 * s], fill=(10, 10, 10, 255), width=max(1, s // 60))
    else:
        for sx in (-1, 1):
            d.ellipse([cx + sx * ex - er, ey - er, cx + sx * ex + er, ey + er], fill=(25, 25, 25, 255))
    my = cy + 0.45 * hh
    mw = 0.35 * hw
    lw = max(1, s // 50)
    if p.expression == "smiling":
        d.arc([cx - mw, my - 0.05 * s, cx + mw, my + 0.05 * s], 10, 170, fill=(120, 20, 30, 255), width=lw * 2)
    elif p.expression == "surprised":
        d.ellipse([cx - 0.035 * s, my - 0.035 * s, cx + 0.035 * s, my + 0.045 * s], fill=(90, 15, 25, 255))
    elif p.expression == "neutral":
        d.line([cx - mw, my, cx + mw, my], fill=(120, 20, 30, 255), width=lw * 2)
    else:
        raise ValueError(f"unknown expression {p.expression!r}; choose one of {EXPRESSIONS}")
    if ident.mark == "star":
        d.polygon(_star(cx + 0.55 * hw, cy + 0.35 * hh, 0.06 * s), fill=(255, 215, 0, 255))
    if ident.accessory == "hat":
        d.rectangle([cx - hw - 0.1 * s, cy - hh + 0.02 * s, cx + hw + 0.1 * s, cy - hh + 0.07 * s], fill=(120, 70, 30, 255))
        d.rounded_rectangle([cx - hw * 0.8, cy - hh - 0.17 * s, cx + hw * 0.8, cy - hh + 0.04 * s], radius=6,
                            fill=(120, 70, 30, 255))
    return layer


def _stylise(img: Image.Image, style: str, rng: random.Random) -> Image.Image:
    s = img.width
    if style == "photo":
        shade = Image.linear_gradient("L").rotate(90).resize((s, s))
        img = Image.blend(img, ImageEnhance.Brightness(img).enhance(0.75), 0.0)
        img = Image.composite(img, ImageEnhance.Brightness(img).enhance(0.8), shade)
        return img.filter(ImageFilter.GaussianBlur(s / 160))
    if style == "sketch":
        edges = ImageOps.invert(img.convert("L").filter(ImageFilter.FIND_EDGES)).point(lambda v: 0 if v < 200 else 255)
        pale = Image.blend(img, Image.new("RGB", img.size, (250, 248, 240)), 0.25)
        return Image.composite(pale, Image.new("RGB", img.size, (40, 40, 40)), edges.filter(ImageFilter.MinFilter(3)))
    if style == "pixel art":
        small = img.resize((s // 8, s // 8), Image.Resampling.BOX).quantize(32).convert("RGB")
        return small.resize((s, s), Image.Resampling.NEAREST)
    if style == "watercolor":
        soft = img.filter(ImageFilter.MedianFilter(5)).filter(ImageFilter.GaussianBlur(s / 90))
        paper = Image.effect_noise((s, s), 40).convert("RGB")
        return Image.blend(Image.blend(soft, Image.new("RGB", img.size, (255, 250, 235)), 0.2), paper, 0.08)
    if style == "pop art":
        poster = ImageOps.posterize(ImageEnhance.Color(img).enhance(1.5), 3)
        edges = img.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 25 else 0)
        poster.paste((0, 0, 0), mask=edges.filter(ImageFilter.MaxFilter(5)))
        d = ImageDraw.Draw(poster)
        step = s // 10
        for y in range(0, s, step):
            for x in range((y // step % 2) * step // 2, s, step):
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 255, 255))
        return poster
    raise ValueError(f"unknown style {style!r}; choose one of {STYLES}")


def render(p: Portrait, size: int = 64, *, person: bool = True) -> Image.Image:
    """Draw ``p`` as an RGB image of ``size x size`` pixels (drawn at 4x and downsampled).

    ``person=False`` draws the scene and style alone, with nobody in it (a picture in which no face can be found).
    """
    s = 4 * size
    rng = random.Random(p.seed)
    img = Image.new("RGB", (s, s))
    _background(ImageDraw.Draw(img), p.scene, s, rng)
    if person:
        fig = _figure(p, s)
        fig = fig.rotate(p.tilt, resample=Image.Resampling.BICUBIC, center=(s / 2, s * 0.5))
        side = int(s * p.scale)
        fig = fig.resize((side, side), Image.Resampling.BICUBIC)
        img.paste(fig, (int((s - side) / 2 + p.dx * s), int((s - side) / 2 + p.dy * s + (s - side) / 2)), fig)
    img = _stylise(img, p.style, rng)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def with_fields(p: Portrait, **changes: object) -> Portrait:
    """``p`` with some portrait or identity fields changed, e.g. ``with_fields(p, scene="beach", hair_colour="red")``."""
    ident_names = {f.name for f in fields(Identity)}
    ident_changes = {k: v for k, v in changes.items() if k in ident_names}
    rest = {k: v for k, v in changes.items() if k not in ident_names}
    return replace(p, identity=replace(p.identity, **ident_changes), **rest)


def to_dict(p: Portrait) -> dict:
    """A JSON-ready description of ``p`` (identity fields flattened)."""
    d = asdict(p)
    d.update(d.pop("identity"))
    return d
