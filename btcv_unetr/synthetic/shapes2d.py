"""Synthetic 2D segmentation pictures for the 2D mode (UNETR with ``spatial_dims: 2`` on RGB): the
built-in default data set, as :mod:`btcv_unetr.synthetic.phantoms` is for 3D CT.

Two kinds of scene, both on a cluttered background (a gradient, a floor, textured rectangles,
ellipses and bars, some of them in the subject's colours) so that no colour threshold solves them:

* ``pet``: an animal-like blob (body, head, ears, legs, tail; sometimes a snout) at a random
  position, scale, turn and facing, with a fur texture (solid, stripes, spots or patches). The mask
  is a trimap as the Oxford-IIIT Pet set's: 0 background, 1 animal, 2 a 2-4 px boundary band
  straddling the animal's outline (see :data:`PET_CLASSES`).
* ``face``: a frontal face with a random pose (shift, scale, turn of up to 15 degrees), skin tone,
  hair style and mouth (closed or open), with 11 part classes as the Helen face-parsing set's (see
  :data:`FACE_CLASSES`). Left and right are the viewer's: "left eye" is the eye on the picture's
  left (smaller column index). A horizontal flip must therefore swap the classes of
  :data:`FACE_MIRROR_PAIRS`: the face datalist lists them as ``mirror_pairs``, and 2D training's
  flip (``--hflip_prob``) swaps them. Ears are skin; neck and clothes are background, as in Helen.

Each picture is drawn from its own random stream ``(seed, index)``, so a case does not depend on
how many others are generated. numpy draws, scipy.ndimage dilates, erodes and blurs; a 256 x 256 scene
takes some 20-40 ms.

    generate_scene   (seed, index, size, kind) -> RGB picture (H, W, 3) uint8, mask (H, W) uint8
    write_dataset    images/case_NNNN.png, masks/case_NNNN.png and a Decathlon-style dataset.json
    class_names      the class names of a kind, index order
    add_arguments, run   the ``btcv-unetr shapes2d`` command

    btcv-unetr shapes2d --out DIR --cases N --seed S [--size 256] [--kind pet|face]
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..files import atomic_write, atomic_write_json
from ..logs import with_progress

PATCH = 16          # UNETR's patch size in 2D: pictures must tile into whole patches
DEFAULT_SIZE = 256
MAX_SIZE = 2048     # a 2048 x 2048 scene needs some 150 MB of working memory
KINDS = ("pet", "face")

PET_CLASSES: tuple[str, ...] = ("background", "animal", "boundary")
FACE_CLASSES: tuple[str, ...] = (
    "background", "skin", "left brow", "right brow", "left eye", "right eye", "nose",
    "upper lip", "lower lip", "hair", "mouth interior",
)
# Classes that trade places under a left-right flip (left/right are the viewer's).
FACE_MIRROR_PAIRS: tuple[tuple[int, int], ...] = ((2, 3), (4, 5))

# Fur (RGB): ginger, brown, black, grey, cream, white, tan, chocolate, silver, golden.
FUR = np.array([(205, 120, 50), (125, 85, 50), (38, 33, 30), (128, 128, 126), (225, 205, 170),
                (236, 234, 228), (190, 150, 100), (90, 56, 36), (176, 176, 182), (215, 165, 80)], np.float32)
# Hair (RGB): black, dark brown, brown, blonde, auburn, grey.
HAIR = np.array([(25, 20, 18), (60, 40, 28), (110, 75, 45), (215, 180, 115), (140, 60, 30), (160, 158, 155)],
                np.float32)
SKIN_LIGHT, SKIN_DARK = np.array((240, 205, 180), np.float32), np.array((85, 55, 40), np.float32)


def class_names(kind: str) -> tuple[str, ...]:
    """Class names of ``kind`` ("pet" or "face") in index order."""
    _check_kind(kind)
    return PET_CLASSES if kind == "pet" else FACE_CLASSES


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


# ---- drawing primitives (float pictures, 0-255; coordinates in pixels, x = column, y = row) ----

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Open pixel grids: rows (H, 1) and columns (1, W), float32 pixel centres."""
    index = np.arange(size, dtype=np.float32)
    return index[:, None], index[None, :]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 1) -> np.ndarray:
    """Value noise (size, size) float32 with unit standard deviation.

    Random values on a grid of ``cells`` x ``cells`` squares are interpolated smoothly (features
    about ``size / cells`` px wide); each further octave adds a grid twice as fine at half weight.
    """
    total = np.zeros((size, size), np.float32)
    weight = 1.0
    for octave in range(octaves):
        n = max(1, cells * 2 ** octave)
        coarse = rng.standard_normal((n + 1, n + 1)).astype(np.float32)
        t = np.arange(size, dtype=np.float32) * np.float32(n / size)
        i = np.minimum(t.astype(np.int64), n - 1)
        f = t - i
        f = f * f * (3 - 2 * f)  # smoothstep: no creases along the grid lines
        rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]           # (size, n + 1)
        total += np.float32(weight) * (rows[:, i] * (1 - f) + rows[:, i + 1] * f)
        weight *= 0.5
    std = float(total.std())
    return total / np.float32(std) if std > 0 else total


def _to_local(x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float,
              scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame centred at (cx, cy), turned by ``angle`` (radians, clockwise on the
    picture) and in units of ``scale``; broadcasts open grids to full ones."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    return (c * dx + s * dy) / np.float32(scale), (-s * dx + c * dy) / np.float32(scale)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             angle: float = 0.0, arch: float = 0.0) -> np.ndarray:
    """Normalised radius of points (x, y) from an ellipse: inside where < 1.

    The ellipse is centred at (cx, cy) with semi-axes (rx, ry), turned by ``angle``; ``arch`` bends
    it so that its ends move by ``arch * ry`` along +y (a brow's or a smile's curve).
    """
    u, v = _to_local(x, y, cx, cy, angle, 1.0)
    u, v = u / np.float32(rx), v / np.float32(ry)
    if arch:
        v = v - np.float32(arch) * u * u
    return np.sqrt(u * u + v * v)


def _window(size: int, cx: float, cy: float, reach: float) -> tuple[slice, slice] | None:
    """Rows and columns of the square of half-side ``reach`` px around (cx, cy); None when off the picture."""
    r0, r1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size)
    c0, c1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


@functools.lru_cache(maxsize=None)
def _octagon(radius: int) -> np.ndarray:
    """A disc-like footprint (2 * radius + 1, 2 * radius + 1) bool, read-only: a pixel grown by alternating
    cross (4-neighbourhood) and square (8-neighbourhood) steps, ``radius`` of them."""
    footprint = np.zeros((2 * radius + 1,) * 2, bool)
    footprint[radius, radius] = True
    for step in range(radius):
        footprint = ndimage.binary_dilation(footprint, ndimage.generate_binary_structure(2, 1 + step % 2))
    footprint.flags.writeable = False
    return footprint


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` (H, W) bool dilated by the octagon of ``radius`` px."""
    return ndimage.binary_dilation(mask, _octagon(radius)) if radius else mask


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` (H, W) bool eroded by the octagon of ``radius`` px; beyond the picture counts as inside, so
    that the picture's border is not an outline."""
    return ndimage.binary_erosion(mask, _octagon(radius), border_value=1) if radius else mask


def _blur(image: np.ndarray) -> np.ndarray:
    """A 3 x 3 binomial blur ([1, 2, 1] / 4 along rows and columns) of ``image`` (H, W[, 3]) float32; the edge
    pixels repeat beyond the border."""
    for axis in (0, 1):
        image = ndimage.convolve1d(image, np.array([0.25, 0.5, 0.25], np.float32), axis=axis, mode="nearest")
    return image


def _paint(image: np.ndarray, inside: np.ndarray, colour: np.ndarray) -> None:
    """Set the pixels of ``image`` (H, W, 3) where ``inside`` (H, W) holds to ``colour`` ((3,) or (H, W, 3))."""
    image[inside] = colour if colour.ndim == 1 else colour[inside]


def _shade(colour: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """``colour`` (3,) or (H, W, 3) times a brightness ``gain`` (H, W): (H, W, 3)."""
    return colour * gain[..., None]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(15, 240, 3).astype(np.float32)


def _near(rng: np.random.Generator, colour: np.ndarray, spread: float = 25.0) -> np.ndarray:
    """A colour close to ``colour`` (RGB, 0-255)."""
    return np.clip(colour * rng.uniform(0.8, 1.2) + rng.normal(0, spread, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, size: int, lure: np.ndarray) -> np.ndarray:
    """A cluttered backdrop (size, size, 3) float32.

    A gradient between two colours, sometimes a floor below a horizon, textured noise, then 8-24
    rectangles, ellipses and bars. About a quarter of the items take colours near ``lure`` (the
    subject's), and some are striped, so that neither colour nor texture alone finds the subject.
    """
    y, x = _grid(size)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    a = rng.uniform(0, 2 * math.pi)
    t = 0.5 + ((x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)) / np.float32(size)
    image = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.5:
        horizon = size * rng.uniform(0.45, 0.85) + (x - size / 2) * np.float32(rng.uniform(-0.2, 0.2))
        floor = np.broadcast_to(y > horizon, (size, size))
        image[floor] = _random_colour(rng) * rng.uniform(0.7, 1.0)
    texture = _smooth_noise(rng, size, 4, 3)
    image += texture[..., None] * rng.uniform(5, 18, 3).astype(np.float32)

    for _ in range(rng.integers(8, 25)):
        colour = _near(rng, lure) if rng.random() < 0.25 else _random_colour(rng)
        cx, cy = size * rng.uniform(-0.1, 1.1, 2)
        angle = rng.uniform(0, math.pi)
        shape = rng.choice(("rectangle", "ellipse", "bar"))
        if shape == "bar":
            hw, hh = size * rng.uniform(0.1, 0.4), size * rng.uniform(0.008, 0.04)
        else:
            hw, hh = size * rng.uniform(0.03, 0.22, 2)
        box = _window(size, cx, cy, math.hypot(hw, hh))
        if box is None:
            continue
        u, v = _to_local(x[:, box[1]], y[box[0]], cx, cy, angle, 1.0)
        if shape == "ellipse":
            inside = (u / hw) ** 2 + (v / hh) ** 2 < 1
        else:
            inside = (np.abs(u) < hw) & (np.abs(v) < hh)
        gain = 1 + 0.12 * texture[box] + np.float32(rng.uniform(-0.25, 0.25)) * v / np.float32(max(hh, 1.0))
        if rng.random() < 0.2:  # striped items: stripes are not the animal's alone
            gain = gain * (1 + 0.3 * np.sign(np.sin(u * np.float32(2 * math.pi / rng.uniform(4, 14)))))
        _paint(image[box], inside, _shade(colour, gain))
    return image


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera: uneven light, a 3 x 3 blur (soft edges, as a photograph's), sensor noise; uint8 (H, W, 3)."""
    size = image.shape[0]
    y, x = _grid(size)
    a = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(0.8, 1.15) + rng.uniform(0, 0.25) * (
        (x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)) / np.float32(size)
    image = _blur(image * light[..., None])
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---- pets ----

def _animal_parts(rng: np.random.Generator, thin: float) -> tuple[list[tuple[float, ...]], tuple[float, float, float]]:
    """Ellipses (cx, cy, rx, ry, angle) of one animal in its own frame (units of half a body length;
    head towards +x, y down), and its head (cx, cy, radius).

    Ears, legs and tail are at least ``2 * thin`` wide, so that most of each keeps an inside after the
    trimap's band is taken off (a part thinner than the band would be all boundary).
    """
    b = rng.uniform(0.42, 0.65)                                   # body half-height
    parts = [(0.0, 0.0, 1.0, b, 0.0)]
    rh = rng.uniform(0.33, 0.5)
    hx, hy = rng.uniform(0.85, 1.1), -b * rng.uniform(0.5, 0.95)
    parts.append((hx, hy, rh, rh * rng.uniform(0.85, 1.05), 0.0))
    if rng.random() < 0.5:                                        # a dog's snout
        parts.append((hx + rh * 0.9, hy + rh * 0.25, rh * 0.5, rh * 0.3, 0.2))
    pointed = rng.random() < 0.55
    for side in (-0.45, 0.4):                                     # rear and front ear
        if pointed:
            parts.append((hx + side * rh, hy - rh * 0.9, max(rh * 0.22, thin), rh * 0.45, side * 0.6))
        else:
            parts.append((hx + side * rh * 1.2, hy + rh * 0.15, max(rh * 0.25, thin), rh * 0.6, -side * 0.5))
    leg = rng.uniform(0.45, 0.85)                                 # legs reach a common ground line
    width = max(rng.uniform(0.09, 0.15), thin)
    for u in (-0.65, 0.6):                                        # hind and front pairs, seen from the side:
        tilt = rng.uniform(-0.15, 0.15)                           # near and far legs overlap, nearly parallel
        for offset in (-1, 1):                                    # (no narrow gap for the band to close)
            centre = u + offset * rng.uniform(0, 0.5) * width
            parts.append((centre, b * 0.5 + leg / 2, width, leg / 2 + width, tilt + rng.uniform(-0.03, 0.03)))
    phi = rng.uniform(-0.4, 1.3)                                  # tail: up and back from the rump
    length, base = rng.uniform(0.3, 0.65), (-0.9, -0.25 * b)
    direction = (-math.cos(phi), -math.sin(phi))
    parts.append((base[0] + direction[0] * length, base[1] + direction[1] * length, length,
                  max(rng.uniform(0.06, 0.12), thin), math.atan2(direction[1], direction[0])))
    return parts, (hx, hy, rh)


def _fur(rng: np.random.Generator, base: np.ndarray, x: np.ndarray, y: np.ndarray, level: np.ndarray,
         coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Fur colours (H, W, 3): ``base`` with a pattern (solid, stripes, spots or patches) of a second
    colour, grain from ``fine`` noise, and shading darker towards the outline (``level`` -> 1)."""
    pattern = rng.choice(("solid", "stripes", "spots", "patches"))
    second = FUR[rng.integers(len(FUR))] if rng.random() < 0.5 else base * rng.uniform(0.3, 0.6)
    if pattern == "stripes":    # tabby stripes across the body, wavy
        period = rng.uniform(0.15, 0.35)
        w = np.clip(2.5 * (np.sin(2 * math.pi * x / np.float32(period) + 1.5 * coarse) - 0.2), 0, 1)
    elif pattern == "spots":
        w = np.clip(3 * (fine - rng.uniform(0.6, 1.2)), 0, 1)
    elif pattern == "patches":
        w = np.clip(4 * (coarse - rng.uniform(-0.3, 0.6)), 0, 1)
    else:
        w = np.zeros_like(coarse)
    colour = base + (second - base) * w[..., None]
    belly = np.clip(y * 2, 0, 1) * np.float32(rng.uniform(0, 0.2))  # lighter underside
    gain = (1.05 - 0.35 * np.clip(level, 0, 1) ** 4) * (1 + 0.1 * fine) + belly
    return _shade(colour, gain)


def _pet_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pet picture (size, size, 3) uint8 and its trimap (size, size) uint8: 0 background, 1 animal, 2 boundary."""
    base = np.clip(FUR[rng.integers(len(FUR))] + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
    image = _background(rng, size, lure=base)
    rows, cols = _grid(size)
    scale = size * rng.uniform(0.15, 0.25)                    # half a body length, px
    cx, cy = size * rng.uniform(0.32, 0.68), size * rng.uniform(0.35, 0.62)
    facing = 1.0 if rng.random() < 0.5 else -1.0
    x, y = _to_local(cols, rows, cx, cy, rng.uniform(-0.5, 0.5), scale)
    x = x * np.float32(facing)
    parts, (hx, hy, rh) = _animal_parts(rng, thin=3.0 / scale)   # parts at least 6 px wide
    level = np.min([_ellipse(x, y, *part) for part in parts], axis=0)
    coarse, fine = _smooth_noise(rng, size, 3, 2), _smooth_noise(rng, size, max(2, size // 16), 2)
    level = level + 0.05 * fine                                 # a furry, irregular outline
    animal = level < 1
    _paint(image, animal, _fur(rng, base, x, y, level, coarse, fine))
    eye = _ellipse(x, y, hx + rh * 0.35, hy - rh * 0.15, rh * 0.12, rh * 0.12) < 1
    nose = _ellipse(x, y, hx + rh * 0.95, hy + rh * 0.2, rh * 0.1, rh * 0.08) < 1
    _paint(image, (eye | nose) & animal, np.array((25, 20, 20), np.float32))
    if rng.random() < 0.25:                                     # something in front: a bar or a post
        ox, oy = cx + scale * rng.uniform(-1, 1), cy + scale * rng.uniform(-0.6, 0.6)
        u, v = _to_local(cols, rows, ox, oy, rng.uniform(0, math.pi), 1.0)
        # Wider than the band (6 px or more): a thinner bar would be all boundary across the animal.
        half_width = max(size * rng.uniform(0.015, 0.04), 3.0)
        bar = (np.abs(v) < half_width) & (np.abs(u) < size * rng.uniform(0.2, 0.7))
        _paint(image, bar, _shade(_random_colour(rng), 1 + 0.1 * coarse))
        animal &= ~bar
    # The trimap: a band of 2-4 px straddling the outline is "boundary", as the pets' trimaps mark it.
    inner, outer = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    mask = np.zeros((size, size), np.uint8)
    mask[_dilate(animal, outer)] = 2
    mask[_erode(animal, inner)] = 1
    return _finish(rng, image), mask


# ---- faces ----

def _skin(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0, 1)
    return np.clip(SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * t + rng.normal(0, 8, 3), 0, 255).astype(np.float32)


def _face_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A frontal face in its own frame: units of the face's half-width, x to the viewer's right, y down."""
    skin = _skin(rng)
    hair_colour = np.clip(HAIR[rng.integers(len(HAIR))] + rng.normal(0, 10, 3), 0, 255).astype(np.float32)
    image = _background(rng, size, lure=skin)  # skin-coloured clutter: colour alone cannot find the face
    mask = np.zeros((size, size), np.uint8)
    rows, cols = _grid(size)
    unit = size * rng.uniform(0.19, 0.25)
    cx, cy = size * (0.5 + rng.uniform(-0.07, 0.07)), size * (0.5 + rng.uniform(0.02, 0.1))
    x, y = _to_local(cols, rows, cx, cy, rng.uniform(-0.26, 0.26), unit)
    coarse, fine = _smooth_noise(rng, size, 3, 2), _smooth_noise(rng, size, max(2, size // 16), 2)
    h = rng.uniform(1.2, 1.4)                                   # face half-height

    def put(inside: np.ndarray, colour: np.ndarray, label: int) -> None:
        _paint(image, inside, colour)
        mask[inside] = label

    # Back to front: clothes, hair behind the head, neck, ears and face, fringe, then the parts.
    clothes = _ellipse(x, y, 0, h + 1.7, rng.uniform(1.9, 2.6), 1.1) < 1
    put(clothes, _shade(_random_colour(rng), 1 + 0.1 * coarse + 0.05 * fine), 0)
    hair_bottom = rng.uniform(-0.3, 2.4)                        # short hair to shoulder length
    crown = _ellipse(x, y, 0, -0.15 * h, rng.uniform(1.12, 1.3), h * rng.uniform(1.0, 1.12)) + 0.05 * fine
    long_hair = (np.abs(x) < rng.uniform(1.05, 1.3) + 0.05 * fine) & (y > 0)
    hair = ((crown < 1) | long_hair) & (y < hair_bottom)
    # Strands radiating from the crown.
    strands = np.sin(np.arctan2(y + 1.6 * h, x) * np.float32(rng.uniform(40, 90)) + 2 * coarse)
    hair_look = _shade(hair_colour, (1 + 0.15 * strands + 0.1 * fine) * (1 - 0.2 * np.clip(crown, 0, 1.2) ** 4))
    put(hair, hair_look, 9)
    neck = (np.abs(x) < 0.42 + 0.1 * np.clip(y - h, 0, None)) & (y > 0.5) & ~clothes
    put(neck, _shade(skin, 0.72 + 0.04 * fine), 0)

    light = np.float32(rng.uniform(-0.12, 0.12))               # light from one side
    chin = 1 - 0.15 * np.clip(y / np.float32(h), 0, 1)          # narrower towards the chin
    face_level = np.sqrt((x / chin) ** 2 + (y / np.float32(h)) ** 2)
    ears = np.min([_ellipse(x, y, side * 0.97, -0.05, 0.13, 0.27) for side in (-1, 1)], axis=0) < 1
    skin_look = _shade(skin, (1 - 0.22 * np.clip(face_level, 0, 1.2) ** 6) * (1 + light * x) + 0.03 * fine)
    if hair_bottom < 0.2 or rng.random() < 0.5:                # long hair may cover the ears
        put(ears, skin_look, 1)
    face = face_level < 1
    put(face, skin_look, 1)
    hairline = rng.uniform(-1.15, -0.8) + rng.uniform(0.2, 0.5) * x * x + 0.04 * fine
    put(face & (y < hairline) & (crown < 1), hair_look, 9)

    # The parts lie within 1.2 half-widths of the face's centre: draw them in that window only.
    box = _window(size, cx, cy, 1.2 * unit)
    _face_parts(rng, image[box], mask[box], x[box], y[box], fine[box], skin, hair_colour, light)
    return _finish(rng, image), mask


def _face_parts(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, x: np.ndarray, y: np.ndarray,
                fine: np.ndarray, skin: np.ndarray, hair_colour: np.ndarray, light: float) -> None:
    """Paint brows, eyes, nose, lips and mouth into ``image`` (h, w, 3) and ``mask`` (h, w) (views of a
    window), given the face-frame coordinates ``x``, ``y`` (h, w) of its pixels."""

    def put(inside: np.ndarray, colour: np.ndarray, label: int) -> None:
        _paint(image, inside, colour)
        mask[inside] = label

    ex, ey = rng.uniform(0.33, 0.42), rng.uniform(-0.2, -0.1)   # eyes
    erx, ery = rng.uniform(0.14, 0.19), rng.uniform(0.06, 0.09)
    brow_y = ey - rng.uniform(0.17, 0.24)
    brow_colour = hair_colour * rng.uniform(0.5, 0.9)
    iris = _near(rng, np.array((90, 60, 40), np.float32), 40) * rng.uniform(0.4, 1.0)
    gaze = rng.uniform(-0.05, 0.05)
    for side, brow_label, eye_label in ((-1, 2, 4), (1, 3, 5)):
        tilt = side * rng.uniform(-0.05, 0.12)
        brow = _ellipse(x, y, side * (ex + 0.02), brow_y, rng.uniform(0.2, 0.25), rng.uniform(0.035, 0.055),
                        tilt, arch=rng.uniform(0.5, 1.5)) < 1
        put(brow, _shade(brow_colour, 1 + 0.1 * fine), brow_label)
        eye_level = _ellipse(x, y, side * ex, ey, erx, ery, -tilt)
        eye = eye_level < 1
        look = np.broadcast_to(np.array((232, 226, 218), np.float32), image.shape).copy()
        iris_level = _ellipse(x, y, side * ex + gaze, ey, ery * 0.95, ery * 0.95)
        look[iris_level < 1] = iris
        look[iris_level < 0.45] = (15, 12, 12)
        look[(eye_level > 0.75) & (y < ey)] = skin * 0.3         # upper lid and lashes
        put(eye, look, eye_label)

    ny = rng.uniform(0.08, 0.16)                                 # nose: a ridge and a base with nostrils
    nw = rng.uniform(0.14, 0.18)
    nose_level = np.minimum(_ellipse(x, y, 0, ny - 0.1, 0.1, 0.27), _ellipse(x, y, 0, ny + 0.1, nw, 0.09))
    nose_look = _shade(skin, (0.97 - 0.12 * np.clip(nose_level, 0, 1) ** 2) * (1 + 2 * light * x))
    nostrils = np.min([_ellipse(x, y, side * 0.07, ny + 0.13, 0.045, 0.025) for side in (-1, 1)], axis=0) < 1
    nose_look[nostrils] = skin * 0.35
    put(nose_level < 1, nose_look, 6)

    my, mw = rng.uniform(0.55, 0.68), rng.uniform(0.25, 0.35)   # mouth: centre line, half-width
    smile = rng.uniform(-0.25, 0.35)                             # > 0: corners up
    gap = 0.0 if rng.random() < 0.6 else rng.uniform(0.03, 0.08)
    upper_t, lower_t = rng.uniform(0.05, 0.08), rng.uniform(0.07, 0.11)
    yl = y - np.float32(my) + np.float32(smile) * x * x          # height above (<0) or below the mouth line
    lip = skin * 0.55 + _near(rng, np.array((185, 75, 85), np.float32), 15) * 0.45
    interior = None
    if gap:
        interior = (x / np.float32(mw * 0.9)) ** 2 + (yl / np.float32(gap)) ** 2 < 1
    upper = ((x / np.float32(mw)) ** 2 + (yl / np.float32(gap + upper_t)) ** 2 < 1) & (yl < 0)
    lower = ((x / np.float32(mw * 0.95)) ** 2 + (yl / np.float32(gap + lower_t)) ** 2 < 1) & (yl >= 0)
    put(upper, _shade(lip, 0.85 + 0.04 * fine), 7)
    put(lower, _shade(lip, 1.0 + 0.1 * np.clip(-yl / np.float32(gap + lower_t) + 0.5, 0, 1)), 8)
    if interior is not None:
        look = np.broadcast_to(np.array((70, 25, 30), np.float32), image.shape).copy()
        if rng.random() < 0.7:
            look[yl < -gap * 0.3] = (228, 222, 205)               # upper teeth
        put(interior, look, 10)


# ---- the data set ----

def generate_scene(seed: int, index: int, size: int = DEFAULT_SIZE, kind: str = "pet") -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of the set drawn with ``seed``; the same arguments give the same arrays.

    Args:
        seed: data-set seed.
        index: case number; each case has its own random stream, so a case does not depend on how
            many others are generated.
        size: side of the square picture, px (16 or more; the scene scales with it, except the
            pets' 2-4 px boundary band and the blur, which are in pixels).
        kind: "pet" (classes :data:`PET_CLASSES`) or "face" (:data:`FACE_CLASSES`).

    Returns:
        picture (size, size, 3) uint8 RGB and mask (size, size) uint8 of class indices.
    """
    _check_kind(kind)
    if size < PATCH:
        raise ValueError(f"size must be >= {PATCH}, not {size}")
    rng = np.random.default_rng([seed, index])
    return _pet_scene(rng, size) if kind == "pet" else _face_scene(rng, size)


def _write_png(array: np.ndarray, path: Path) -> None:
    """An RGB (H, W, 3) or single-channel (H, W) uint8 array as a PNG, atomically."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 3)
    atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp)))


def write_dataset(out: str | Path, cases: int, seed: int, size: int = DEFAULT_SIZE, kind: str = "pet",
                  validation_fraction: float = 0.2, progress: bool = True) -> Path:
    """Write ``images/case_NNNN.png`` (RGB), ``masks/case_NNNN.png`` (class indices) and ``dataset.json``.

    Cases are numbered from 0; the last ``round(cases * validation_fraction)`` of them (at least
    one, and at least one left for training) form the validation split. Paths in the datalist are
    relative to ``out``. Returns the datalist path.
    """
    _check_kind(kind)
    if cases < 2:
        raise ValueError("cases must be >= 2 (at least one training and one validation case)")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be between 0 and 1, not {validation_fraction}")
    out = Path(out)
    entries = []
    for index in with_progress(range(cases), progress, f"{kind} scenes"):
        picture, mask = generate_scene(seed, index, size, kind)
        entry = {"image": f"images/case_{index:04d}.png", "label": f"masks/case_{index:04d}.png"}
        _write_png(picture, out / entry["image"])
        _write_png(mask, out / entry["label"])
        entries.append(entry)
    n_val = min(max(1, round(cases * validation_fraction)), cases - 1)
    names = class_names(kind)
    datalist = {
        "name": f"shapes2d-{kind}",
        # Read by the model card of every checkpoint trained on it: such a model is not for real pictures.
        "synthetic": True, "generator": "btcv-unetr shapes2d",
        "description": f"synthetic {kind} scenes ({len(names)} classes), seed {seed}, {size} x {size} RGB",
        "tensorImageSize": "2D", "modality": {"0": "R", "1": "G", "2": "B"},
        "labels": {str(index): name for index, name in enumerate(names)},
        # The classes a left-right flip swaps: training's --hflip_prob mirrors faces correctly with them.
        **({"mirror_pairs": [list(pair) for pair in FACE_MIRROR_PAIRS]} if kind == "face" else {}),
        "numTraining": cases, "numTest": 0,
        "training": entries[:-n_val], "validation": entries[-n_val:],
    }
    path = out / "dataset.json"
    atomic_write_json(path, datalist)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cases", type=int, default=100, help="pictures (default 100; a fifth for validation)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"picture side in px, a multiple of {PATCH} (default {DEFAULT_SIZE})")
    parser.add_argument("--kind", choices=KINDS, default="pet",
                        help="pet: animal/boundary trimaps (3 classes); face: face parts (11 classes)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    if args.cases < 2:
        raise UserError(f"shapes2d: --cases {args.cases} must be >= 2 (at least one training and one validation case)")
    if not (PATCH <= args.size <= MAX_SIZE and args.size % PATCH == 0):
        raise UserError(f"shapes2d: --size {args.size} must be a multiple of {PATCH} (the model's patch size) "
                        f"from {PATCH} to {MAX_SIZE}, e.g. {DEFAULT_SIZE}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"shapes2d: --out {args.out} is a file, not a folder")
    path = write_dataset(args.out, args.cases, args.seed, args.size, args.kind)
    print(f"wrote {args.cases} {args.kind} scenes of {args.size} x {args.size}; datalist: {path}")
    return 0
