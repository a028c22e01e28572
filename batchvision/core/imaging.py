"""Pure image handling: cheap validation from headers, decoding to model-sized RGB arrays.

Nothing here touches Redis or TensorFlow, so it is unit-tested directly and used by the
API (validation) and the workers (decoding) alike.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchvision.core.errors import ImageTooLarge, InvalidImage

#: Formats we accept, as Pillow names them. GIFs are classified on their first frame.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})

# Our pixel limit (configurable, checked from the header right after Image.open and before any
# decoding) replaces Pillow's fixed one, which would otherwise refuse or only warn first.
Image.MAX_IMAGE_PIXELS = None


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says about an upload."""

    format: str
    width: int
    height: int


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Validate an upload without decoding its pixels; raise :class:`InvalidImage` if bad.

    Checks the byte size, that Pillow recognises an allowed format, the pixel count from the
    header (a 20000x20000 PNG is refused here, before any memory is spent on it) and, cheaply,
    that the file is not truncated.
    """
    if not data:
        raise InvalidImage("empty file", code="empty_file")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"file is {len(data)} bytes, the limit is {max_bytes}")
    img = _open(data)
    fmt = img.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise InvalidImage(
            f"format {fmt} is not accepted (allowed: JPEG, PNG, WebP, BMP, GIF)",
            code="unsupported_format",
        )
    width, height = img.size
    _check_pixels(width, height, max_pixels)
    _check_complete(data, img)
    return ImageInfo("JPEG" if fmt == "MPO" else fmt, width, height)


def decode_image(data: bytes, size: tuple[int, int], *, max_pixels: int) -> np.ndarray:
    """Decode to a ``(height, width, 3)`` uint8 RGB array of the model's input ``size`` (w, h).

    JPEGs use draft mode, so the decoder itself scales down by 1/2, 1/4 or 1/8 to just above
    the target size: most of the decode cost of a large photo is never paid. EXIF orientation
    is applied; alpha is composited on white; 16-bit and float images are rescaled to 8 bits.
    """
    img = _open(data)
    _check_pixels(img.width, img.height, max_pixels)
    try:
        if img.format in {"JPEG", "MPO"}:
            img.draft("RGB", size)
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"cannot decode image: {exc}", code="corrupt_image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc), code="too_many_pixels") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if mode.startswith("I;16") or top > 255.0 else max(top, 1.0))
        if mode == "F" and top <= 1.0:
            scale = 255.0
        gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in {"RGBA", "LA", "PA", "La", "RGBa"} or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


#: Per-channel scaling that each model family expects, applied to a float32 NHWC batch.
_CAFFE_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PREPROCESS_MODES = ("none", "unit", "tf", "caffe", "torch")


def normalize(batch: np.ndarray, mode: str) -> np.ndarray:
    """Scale a uint8 RGB batch as a model family expects (see ``keras.applications``)."""
    x = batch.astype(np.float32)
    if mode == "none":
        return x
    if mode == "unit":
        return x / 255.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return x[..., ::-1] - _CAFFE_MEAN
    if mode == "torch":
        return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD
    raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {PREPROCESS_MODES}")


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidImage("not an image file (unrecognised data)", code="not_an_image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"image has too many pixels (decompression bomb?): {exc}", code="too_many_pixels"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot read image header: {exc}", code="corrupt_image") from exc


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
            code="too_many_pixels",
        )


def _check_complete(data: bytes, img: Image.Image) -> None:
    """Detect truncation without a full decode where the format allows it."""
    fmt = img.format
    if fmt in {"JPEG", "MPO"}:
        # The last scan (SOS, FFDA) must be followed by an end-of-image marker (FFD9);
        # an embedded EXIF thumbnail has its own pair earlier in the file.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise InvalidImage("JPEG is truncated (no end-of-image marker)", code="truncated")
        return
    try:
        if fmt == "PNG":
            img.verify()  # walks every chunk and checks its CRC; no pixel decoding
        else:
            img.load()  # rarer formats: a full decode is the only reliable check
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc), code="too_many_pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"image data is truncated or corrupt: {exc}", code="truncated") from exc
