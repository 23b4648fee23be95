"""Drawing a product of the synthetic catalog: what each category, colour, pattern and brand mark looks like.

A product is a silhouette of one of 16 categories (`PRODUCTS`: shapes in a unit box, and the
words titles name it with) drawn with PIL on a light, slightly noisy background, with a main
colour (`COLOUR_RGB`), a pattern masked to the product body, an optional trim colour on a
category-specific part (collar and cuffs, sole, handle, waistband, ...) and a brand logo mark
(8 shapes) at a fixed spot on the product. `render_product` returns [S, S, 3] uint8 RGB;
prodclip/data/synthetic.py draws each item's attributes and writes its title.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw

COLOUR_RGB = {
    "red": (205, 35, 40),
    "orange": (240, 130, 20),
    "yellow": (240, 205, 35),
    "green": (40, 150, 60),
    "blue": (35, 75, 190),
    "purple": (120, 50, 160),
    "pink": (240, 135, 185),
    "brown": (115, 70, 35),
    "beige": (215, 190, 150),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
    "grey": (130, 130, 130),
}

_BRAND_MARKS = ("disk", "triangle", "square", "bar", "plus", "ring", "diamond", "double_bar")

# A unit-box shape: ("poly", [x, y, x, y, ...]), ("ellipse" | "ring", bbox, width),
# ("rrect", bbox, radius), ("arc" | "chord", bbox, start_deg, end_deg, width),
# ("line", [x, y, ...], width). Coordinates are in [0, 1], y pointing down.
Shape = tuple


def _mirror(left_half: list[tuple[float, float]]) -> tuple:
    """A left-right symmetric polygon from its left half, listed from top centre to bottom centre."""
    right_half = [(1.0 - x, y) for x, y in reversed(left_half)]
    return ("poly", [c for point in left_half + right_half for c in point])


def _poly(*points: tuple[float, float]) -> tuple:
    return ("poly", [c for point in points for c in point])


def _both_sides(shape: tuple) -> list[tuple]:
    """A polygon and its mirror image about x = 0.5."""
    coords = list(shape[1])
    mirrored = [1.0 - c if k % 2 == 0 else c for k, c in enumerate(coords)]
    return [shape, ("poly", mirrored)]


@dataclasses.dataclass(frozen=True)
class Product:
    """How one category is drawn in the unit box and named in titles."""
    synonyms: tuple[str, ...]  # first is the canonical name
    trim_parts: tuple[str, ...]  # words for the trim-coloured part, e.g. ("sole",)
    body: tuple[Shape, ...]
    trim: tuple[Shape, ...]
    logo_at: tuple[float, float]
    details: tuple[Shape, ...] = ()  # thin lines drawn in the contrast colour (placket, laces, hands)
    group: str = "apparel"


PRODUCTS: dict[str, Product] = {
    "t-shirt": Product(
        ("t-shirt", "tee", "t shirt"), ("trim", "cuffs"),
        body=(_mirror([(0.5, 0.17), (0.40, 0.10), (0.28, 0.12), (0.04, 0.30), (0.16, 0.46),
                       (0.27, 0.38), (0.27, 0.92), (0.5, 0.92)]),),
        trim=(*_both_sides(_poly((0.04, 0.30), (0.16, 0.46), (0.235, 0.40), (0.115, 0.245))),
              _mirror([(0.5, 0.23), (0.37, 0.10), (0.44, 0.10), (0.5, 0.15)])),
        logo_at=(0.62, 0.36)),
    "shirt": Product(
        ("shirt", "button-down shirt", "collared shirt"), ("collar and cuffs", "collar"),
        body=(_mirror([(0.5, 0.12), (0.40, 0.08), (0.27, 0.12), (0.06, 0.86), (0.18, 0.88),
                       (0.28, 0.44), (0.28, 0.94), (0.5, 0.94)]),),
        trim=(*_both_sides(_poly((0.36, 0.05), (0.5, 0.12), (0.43, 0.28))),
              *_both_sides(_poly((0.06, 0.86), (0.18, 0.88), (0.195, 0.80), (0.08, 0.78)))),
        details=(("line", [0.5, 0.14, 0.5, 0.94], 0.035),),
        logo_at=(0.64, 0.40)),
    "dress": Product(
        ("dress", "sundress", "frock"), ("belt",),
        body=(_mirror([(0.5, 0.18), (0.41, 0.14), (0.40, 0.03), (0.35, 0.03), (0.33, 0.16),
                       (0.37, 0.42), (0.12, 0.95), (0.5, 0.95)]),),
        trim=(_poly((0.34, 0.38), (0.66, 0.38), (0.665, 0.47), (0.335, 0.47)),),
        logo_at=(0.5, 0.68)),
    "trousers": Product(
        ("trousers", "pants", "chinos"), ("waistband",),
        body=(_poly((0.24, 0.05), (0.76, 0.05), (0.84, 0.96), (0.58, 0.96), (0.5, 0.34),
                    (0.42, 0.96), (0.16, 0.96)),),
        trim=(_poly((0.235, 0.05), (0.765, 0.05), (0.772, 0.15), (0.228, 0.15)),),
        logo_at=(0.34, 0.25)),
    "shorts": Product(
        ("shorts", "bermuda shorts"), ("waistband",),
        body=(_poly((0.16, 0.20), (0.84, 0.20), (0.92, 0.76), (0.56, 0.80), (0.5, 0.48),
                    (0.44, 0.80), (0.08, 0.76)),),
        trim=(_poly((0.155, 0.20), (0.845, 0.20), (0.86, 0.31), (0.14, 0.31)),),
        logo_at=(0.28, 0.45)),
    "skirt": Product(
        ("skirt", "a-line skirt", "midi skirt"), ("waistband",),
        body=(_poly((0.33, 0.14), (0.67, 0.14), (0.90, 0.86), (0.70, 0.82), (0.5, 0.87),
                    (0.30, 0.82), (0.10, 0.86)),),
        trim=(_poly((0.325, 0.14), (0.675, 0.14), (0.70, 0.24), (0.30, 0.24)),),
        logo_at=(0.5, 0.55)),
    "sneaker": Product(
        ("sneakers", "trainers", "running shoes"), ("sole",),
        body=(_poly((0.06, 0.40), (0.30, 0.40), (0.48, 0.28), (0.62, 0.28), (0.68, 0.42),
                    (0.93, 0.55), (0.95, 0.68), (0.06, 0.68)),),
        trim=(("rrect", (0.03, 0.66, 0.97, 0.80), 0.05),),
        details=(("line", [0.48, 0.36, 0.56, 0.44], 0.03), ("line", [0.56, 0.33, 0.64, 0.41], 0.03)),
        logo_at=(0.28, 0.55), group="shoes"),
    "boot": Product(
        ("boots", "ankle boots", "boot"), ("sole",),
        body=(_poly((0.22, 0.04), (0.56, 0.04), (0.57, 0.50), (0.86, 0.62), (0.90, 0.78),
                    (0.20, 0.78), (0.22, 0.40)),),
        trim=(_poly((0.17, 0.77), (0.92, 0.77), (0.92, 0.90), (0.42, 0.90), (0.38, 0.95),
                    (0.19, 0.95)),),
        logo_at=(0.38, 0.40), group="shoes"),
    "handbag": Product(
        ("handbag", "purse", "shoulder bag"), ("handle", "strap"),
        body=(_poly((0.16, 0.42), (0.84, 0.42), (0.94, 0.92), (0.06, 0.92)),),
        trim=(("arc", (0.26, 0.10, 0.74, 0.72), 180, 360, 0.08),),
        logo_at=(0.5, 0.66), group="bags"),
    "backpack": Product(
        ("backpack", "rucksack"), ("pocket", "front pocket"),
        body=(("rrect", (0.20, 0.14, 0.80, 0.94), 0.16), ("arc", (0.38, 0.02, 0.62, 0.26), 180, 360, 0.06)),
        trim=(("rrect", (0.28, 0.58, 0.72, 0.88), 0.07),),
        logo_at=(0.5, 0.36), group="bags"),
    "cap": Product(
        ("cap", "baseball cap"), ("brim", "peak"),
        body=(("chord", (0.04, 0.26, 0.76, 1.16), 180, 360), ("ellipse", (0.36, 0.21, 0.44, 0.29), 0)),
        trim=(("chord", (0.46, 0.58, 1.0, 0.86), 180, 360), ("rrect", (0.46, 0.68, 1.0, 0.74), 0.02)),
        logo_at=(0.36, 0.52), group="accessories"),
    "mug": Product(
        ("mug", "coffee mug", "cup"), ("handle and rim", "handle"),
        body=(("rrect", (0.14, 0.18, 0.68, 0.90), 0.06),),
        trim=(("arc", (0.52, 0.30, 0.92, 0.76), 270, 450, 0.09),
              ("rrect", (0.14, 0.18, 0.68, 0.27), 0.03)),
        logo_at=(0.41, 0.58), group="home"),
    "lamp": Product(
        ("table lamp", "lamp", "desk lamp"), ("base", "stand"),
        body=(_poly((0.32, 0.06), (0.68, 0.06), (0.86, 0.48), (0.14, 0.48)),),
        trim=(("rrect", (0.45, 0.46, 0.55, 0.86), 0.0), ("ellipse", (0.26, 0.80, 0.74, 0.96), 0)),
        logo_at=(0.5, 0.30), group="home"),
    "cushion": Product(
        ("cushion", "throw pillow"), ("piping", "border"),
        body=(_poly((0.08, 0.10), (0.5, 0.18), (0.92, 0.10), (0.84, 0.5), (0.92, 0.90),
                    (0.5, 0.82), (0.08, 0.90), (0.16, 0.5)),),
        trim=(("line", [0.08, 0.10, 0.5, 0.18, 0.92, 0.10, 0.84, 0.5, 0.92, 0.90, 0.5, 0.82, 0.08, 0.90,
                        0.16, 0.5, 0.08, 0.10], 0.07),),
        logo_at=(0.66, 0.66), group="home"),
    "watch": Product(
        ("watch", "wristwatch"), ("bezel", "case"),
        body=(("rrect", (0.37, 0.0, 0.63, 1.0), 0.04), ("ellipse", (0.22, 0.24, 0.78, 0.80), 0)),
        trim=(("ring", (0.22, 0.24, 0.78, 0.80), 0.10),),
        details=(("line", [0.5, 0.52, 0.5, 0.36], 0.04), ("line", [0.5, 0.52, 0.62, 0.58], 0.04)),
        logo_at=(0.5, 0.90), group="accessories"),
    "sunglasses": Product(
        ("sunglasses", "shades"), ("frame", "frames"),
        body=(("ellipse", (0.06, 0.30, 0.47, 0.74), 0), ("ellipse", (0.53, 0.30, 0.94, 0.74), 0)),
        trim=(("ring", (0.06, 0.30, 0.47, 0.74), 0.07), ("ring", (0.53, 0.30, 0.94, 0.74), 0.07),
              ("arc", (0.42, 0.36, 0.58, 0.52), 180, 360, 0.06),
              ("line", [0.02, 0.40, 0.08, 0.38], 0.06), ("line", [0.92, 0.38, 0.98, 0.40], 0.06)),
        logo_at=(0.27, 0.52), group="accessories"),
}


@functools.lru_cache(maxsize=None)
def _pattern_masks(image_size: int) -> dict[str, np.ndarray]:
    """Pattern name -> ([S + P, S + P] bool tile, period P); cropped at a random phase per item."""
    period = max(6, round(image_size / 8))
    n = image_size + period
    y, x = np.mgrid[0:n, 0:n]
    half = period / 2
    tri = np.abs((x % period) - half)  # triangle wave in x, amplitude P/2
    dot_y, dot_x = (y % period) - half, (x % period) - half
    masks = {
        "solid": np.zeros((n, n), bool),
        "striped": (y % period) < half,
        "dotted": dot_y ** 2 + dot_x ** 2 <= (0.3 * period) ** 2,
        "checked": ((y // half) + (x // half)) % 2 == 0,
        "zigzag": ((y + tri) % period) < half,
        "diagonal": ((x + y) % period) < half,
    }
    return {name: (mask, period) for name, mask in masks.items()}


def _contrast_shade(rgb: np.ndarray) -> np.ndarray:
    """A clearly darker (light colours) or lighter (dark colours) shade of rgb, for patterns."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    shade = rgb * 0.5 if luma > 140 else rgb + (255.0 - rgb) * 0.55
    return shade


def _place(shape: Shape, scale_px: float, origin: tuple[float, float], flip: bool) -> tuple[str, list, dict]:
    """A unit-box shape in pixel coordinates: (kind, xy, options)."""
    kind = shape[0]
    ox, oy = origin

    def px_x(x: float) -> float:
        return ox + ((1.0 - x) if flip else x) * scale_px

    def px_y(y: float) -> float:
        return oy + y * scale_px

    if kind in ("poly", "line"):
        coords = shape[1]
        xy = [px_x(c) if k % 2 == 0 else px_y(c) for k, c in enumerate(coords)]
        width = max(1, round(shape[2] * scale_px)) if kind == "line" else 0
        return kind, xy, {"width": width}
    x0, y0, x1, y1 = shape[1]
    if flip:
        x0, x1 = 1.0 - x1, 1.0 - x0
    box = [ox + x0 * scale_px, px_y(y0), ox + x1 * scale_px, px_y(y1)]
    if kind in ("ellipse", "ring"):
        return kind, box, {"width": max(1, round(shape[2] * scale_px))}
    if kind == "rrect":
        return kind, box, {"radius": round(shape[2] * scale_px)}
    start, end = shape[2], shape[3]
    if flip:
        start, end = 180 - end, 180 - start
    width = max(1, round(shape[4] * scale_px)) if kind == "arc" else 0
    return kind, box, {"start": start, "end": end, "width": width}


def _draw(draw: ImageDraw.ImageDraw, placed: tuple[str, list, dict], fill: int | tuple) -> None:
    kind, xy, opt = placed
    if kind == "poly":
        draw.polygon(xy, fill=fill)
    elif kind == "line":
        draw.line(xy, fill=fill, width=opt["width"], joint="curve")
    elif kind == "ellipse":
        draw.ellipse(xy, fill=fill)
    elif kind == "ring":
        draw.ellipse(xy, outline=fill, width=opt["width"])
    elif kind == "rrect":
        draw.rounded_rectangle(xy, radius=opt["radius"], fill=fill)
    elif kind == "arc":
        draw.arc(xy, opt["start"], opt["end"], fill=fill, width=opt["width"])
    elif kind == "chord":
        draw.chord(xy, opt["start"], opt["end"], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def _draw_brand_mark(draw: ImageDraw.ImageDraw, mark: str, cx: float, cy: float, r: float,
                     fill: tuple[int, int, int], patch: tuple[int, int, int]) -> None:
    """Brand `mark` of radius r centred at (cx, cy), on a plain patch that hides the pattern."""
    draw.rectangle([cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1], fill=patch)
    if mark == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif mark == "triangle":
        draw.polygon([cx, cy - r, cx + r, cy + r, cx - r, cy + r], fill=fill)
    elif mark == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=fill)
    elif mark == "bar":
        draw.rectangle([cx - r, cy - 0.35 * r, cx + r, cy + 0.35 * r], fill=fill)
    elif mark == "plus":
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif mark == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.4 * r)))
    elif mark == "diamond":
        draw.polygon([cx, cy - r, cx + r, cy, cx, cy + r, cx - r, cy], fill=fill)
    elif mark == "double_bar":
        t = 0.3 * r
        draw.rectangle([cx - r, cy - r, cx - r + 2 * t, cy + r], fill=fill)
        draw.rectangle([cx + r - 2 * t, cy - r, cx + r, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown brand mark {mark!r}")


def _dilate(mask: np.ndarray) -> np.ndarray:
    """[S, S] bool, grown by one pixel in the 4 axis directions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[S, S, 3] float32: a light, near-neutral tint with a soft gradient and pixel noise."""
    base = (rng.uniform(196, 232) + rng.uniform(-6, 6, size=3)).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = _ramp(size)
    gradient = np.float32(rng.uniform(0, 8)) * (np.float32(np.cos(direction)) * ramp[None, :]
                                               + np.float32(np.sin(direction)) * ramp[:, None])
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    noise *= np.float32(rng.uniform(0.5, 4.0))
    noise += base
    noise += gradient[..., None]
    return noise


@functools.lru_cache(maxsize=None)
def _ramp(size: int) -> np.ndarray:
    """[S] float32 from -1 to 1."""
    return np.linspace(-1.0, 1.0, size, dtype=np.float32)


_OUTLINE_RGB = np.array([45, 45, 50], np.float32)


def render_product(rng: np.random.Generator, size: int, category: str, colour: str, pattern: str,
                   trim: str | None, brand: int) -> np.ndarray:
    """[S, S, 3] uint8 image of one product: a key of PRODUCTS, main and trim colours (keys of COLOUR_RGB;
    trim None: no trim), a pattern name and the brand's index (brand i wears the i-th of the 8 marks)."""
    product = PRODUCTS[category]
    scale = rng.uniform(0.70, 1.0)
    scale_px = scale * (size - 4)
    slack = (size - scale_px) / 2
    origin = (slack + rng.uniform(-1, 1) * max(slack - 1, 0), slack + rng.uniform(-1, 1) * max(slack - 1, 0))
    flip = bool(rng.random() < 0.5)
    body_rgb = np.clip(np.array(COLOUR_RGB[colour], np.float64) + rng.uniform(-8, 8, 3), 0, 255)
    has_trim = trim is not None

    body_img = Image.new("L", (size, size), 0)
    trim_img = Image.new("L", (size, size), 0)
    body_draw, trim_draw = ImageDraw.Draw(body_img), ImageDraw.Draw(trim_img)
    for shape in product.body:
        _draw(body_draw, _place(shape, scale_px, origin, flip), 255)
    for shape in product.trim:
        _draw(trim_draw if has_trim else body_draw, _place(shape, scale_px, origin, flip), 255)
    body = np.asarray(body_img) > 0
    trim_mask = np.asarray(trim_img) > 0
    body &= ~trim_mask

    pattern_tile, period = _pattern_masks(size)[pattern]
    dy, dx = rng.integers(0, period, size=2)
    pattern_mask = pattern_tile[dy:dy + size, dx:dx + size] & body

    image = _background(rng, size)
    product_mask = body | trim_mask
    image[_dilate(product_mask) & ~product_mask] = _OUTLINE_RGB
    image[body] = body_rgb
    image[pattern_mask] = _contrast_shade(body_rgb)
    if has_trim:
        image[trim_mask] = COLOUR_RGB[trim]
    np.clip(image, 0, 255, out=image)
    image = Image.fromarray(image.astype(np.uint8))

    draw = ImageDraw.Draw(image)
    luma = 0.299 * body_rgb[0] + 0.587 * body_rgb[1] + 0.114 * body_rgb[2]
    contrast = (25, 25, 25) if luma > 140 else (245, 245, 245)
    for shape in product.details:
        _draw(draw, _place(shape, scale_px, origin, flip), contrast)
    lx, ly = product.logo_at
    cx = origin[0] + ((1.0 - lx) if flip else lx) * scale_px
    cy = origin[1] + ly * scale_px
    _draw_brand_mark(draw, _BRAND_MARKS[brand], cx, cy, max(2.5, 0.075 * scale_px), contrast,
                     tuple(int(v) for v in body_rgb))
    return np.asarray(image)
