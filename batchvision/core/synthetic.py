"""Synthetic labelled images for the demo model, tests and benchmarks (Pillow and NumPy only).

Six shape classes drawn with random position, size, rotation, colours, background and noise,
so a small CNN has to learn the shapes rather than a fixed pattern; plus photo-like noise
images for benchmarks, which cost as much to decode as real photos.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes")


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a foreground colour far enough apart to see the shape."""
    while True:
        bg = rng.integers(0, 256, 3)
        fg = rng.integers(0, 256, 3)
        if np.abs(bg.astype(int) - fg.astype(int)).sum() > 180:
            return tuple(int(c) for c in bg), tuple(int(c) for c in fg)


def _polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def render(label: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Draw one image of class ``label`` at ``size`` (width, height)."""
    w, h = size
    bg, fg = _colours(rng)
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    r = side * rng.uniform(0.22, 0.4)
    cx = rng.uniform(r, w - r)
    cy = rng.uniform(r, h - r)
    angle = rng.uniform(0, 2 * math.pi)
    if label == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif label == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    elif label == "square":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, angle), fill=fg)
    elif label == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.15, 3, angle), fill=fg)
    elif label == "cross":
        t = r * 0.28
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * t, dx * t
            draw.polygon(
                [
                    (cx - dx * r + px, cy - dy * r + py),
                    (cx + dx * r + px, cy + dy * r + py),
                    (cx + dx * r - px, cy + dy * r - py),
                    (cx - dx * r - px, cy - dy * r - py),
                ],
                fill=fg,
            )
    elif label == "stripes":
        period = side * rng.uniform(0.12, 0.22)
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        mask = (phase % 1.0) < 0.5
        arr = np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))
        img = Image.fromarray(arr.astype(np.uint8))
    else:
        raise ValueError(f"unknown class {label!r}")
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, rng.uniform(2, 14), arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return out


def dataset(n: int, input_size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images resized to ``input_size`` as the service does, with balanced labels."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, input_size[1], input_size[0], 3), np.uint8)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    for i, cls in enumerate(y):
        size = (int(rng.integers(48, 160)), int(rng.integers(48, 160)))
        img = render(CLASSES[cls], size, rng).resize(input_size, Image.Resampling.BILINEAR)
        x[i] = np.asarray(img)
    return x, y


def encode(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    """Image to file bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def labelled_files(n: int, seed: int, fmt: str = "JPEG") -> Iterator[tuple[str, bytes, str]]:
    """``(filename, bytes, label)`` for ``n`` random images of the demo classes."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        size = (int(rng.integers(96, 320)), int(rng.integers(96, 320)))
        yield f"{label}_{i:05d}.{ext}", encode(render(label, size, rng), fmt, quality=90), label


def photo_like(size: tuple[int, int], seed: int, quality: int = 90) -> bytes:
    """A JPEG with photo-like detail (smooth gradients plus texture), for benchmarks."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), np.float32)
    texture = rng.normal(0, 18, (h, w, 3))
    return encode(Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)), quality=quality)


# -- the second demo model: colours ---------------------------------------------------

#: The classes of the colour demo model, with their hue in degrees.
COLOURS = {"red": 0, "orange": 30, "yellow": 58, "green": 120, "blue": 225, "purple": 280}
COLOUR_CLASSES = tuple(COLOURS)


def render_colour(label: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A patch (ellipse or rectangle) of colour ``label`` (hue jittered, any brightness and
    saturation that still reads as the colour) on a greyish background, with noise."""
    w, h = size
    grey = int(rng.integers(20, 236))
    tint = rng.integers(-12, 13, 3)
    bg = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    hue = (COLOURS[label] + rng.uniform(-7, 7)) % 360 / 360.0
    rgb = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    rx, ry = side * rng.uniform(0.25, 0.45), side * rng.uniform(0.25, 0.45)
    cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rgb)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, rng.uniform(2, 10), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def colour_dataset(n: int, input_size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` colour images resized to ``input_size``, with balanced labels."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, input_size[1], input_size[0], 3), np.uint8)
    y = np.arange(n) % len(COLOUR_CLASSES)
    rng.shuffle(y)
    for i, cls in enumerate(y):
        size = (int(rng.integers(32, 128)), int(rng.integers(32, 128)))
        img = render_colour(COLOUR_CLASSES[cls], size, rng).resize(input_size, Image.Resampling.BILINEAR)
        x[i] = np.asarray(img)
    return x, y


def colour_files(n: int, seed: int, fmt: str = "JPEG") -> Iterator[tuple[str, bytes, str]]:
    """``(filename, bytes, label)`` for ``n`` random images of the colour classes."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    for i in range(n):
        label = COLOUR_CLASSES[i % len(COLOUR_CLASSES)]
        size = (int(rng.integers(48, 160)), int(rng.integers(48, 160)))
        yield f"{label}_{i:05d}.{ext}", encode(render_colour(label, size, rng), fmt, quality=92), label


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)
