"""Pure image handling: cheap validation from headers, decoding to model-sized RGB arrays.

Nothing here touches Redis or TensorFlow, so it is unit-tested directly and used by the
API (validation) and the workers (decoding) alike.

**No pixel is decoded while an upload is checked.** :func:`inspect_image` reads the size and
the frame count from the header (Pillow parses headers without decoding; GIF, WebP and BMP
structure is walked here, byte by byte, without decompressing anything) and checks truncation
from the container structure. Its cost is linear in the file's bytes and independent of the
pixel count it claims, so a 600-byte file that claims 50 million pixels costs the API's event
loop microseconds, not a 200 MB decode. Damage inside compressed data that the structure cannot
show is found by the worker's decode, and becomes that image's error.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from batchvision.core.errors import BatchvisionError, ImageTooLarge, InvalidImage
from batchvision.core.sniff import is_archive

#: Formats we accept, as Pillow names them. GIFs are classified on their first frame.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})


def warm_up() -> None:
    """Import Pillow's format plugins now: the first ``Image.open`` of a WebP would otherwise
    import all of them (about 0.3 s of CPU), inside the first request that brings one."""
    Image.init()


#: Files checked between two :func:`pause` calls, and how long a pause asks to sleep.
YIELD_EVERY = 8
PAUSE_S = 1e-6


def pause() -> None:
    """Let other work run between files of a long request. In the API's gevent workers
    ``time.sleep`` is patched: a sleep hands the event loop to other greenlets (health checks,
    other requests) and, being longer than zero, lets the loop poll for their I/O first (a zero
    sleep would only run greenlets already runnable). Elsewhere it costs a few microseconds."""
    time.sleep(PAUSE_S)


#: Default of the frame limit (``MAX_IMAGE_FRAMES``): animations longer than this are refused.
DEFAULT_MAX_FRAMES = 1000

# Our pixel limit (configurable, checked from the header right after Image.open and before any
# decoding) replaces Pillow's fixed one, which would otherwise refuse or only warn first.
Image.MAX_IMAGE_PIXELS = None


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says about an upload."""

    format: str
    width: int
    height: int
    frames: int = 1

    @property
    def pixels(self) -> int:
        """Pixels of the one frame that is decoded (the first)."""
        return self.width * self.height


def inspect_image(
    data: bytes, *, max_bytes: int, max_pixels: int, max_frames: int = DEFAULT_MAX_FRAMES
) -> ImageInfo:
    """Validate an upload without decoding its pixels; raise :class:`InvalidImage` if bad.

    Checks the byte size, that Pillow recognises an allowed format, the pixel count and the
    frame count from the header (a 20000x20000 PNG is refused here, before any memory is spent
    on it) and, from the container's structure, that the file is not truncated. Nothing is
    decompressed: the cost does not grow with the pixels a file claims.
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
    frames = _structure(data, img)
    if frames > max_frames:
        raise ImageTooLarge(
            f"image has {frames} frames, the limit is {max_frames} (only the first is classified)",
            code="too_many_frames",
        )
    return ImageInfo("JPEG" if fmt == "MPO" else fmt, width, height, frames)


def header_pixels(data: bytes) -> int | None:
    """Width x height from the header alone, ``None`` if it cannot be read (nothing decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.width) * int(img.height)
    except Exception:  # noqa: BLE001 - any unreadable header: the file's own check says why
        return None


class PixelBudget:
    """Decoded pixels left for one request (or archive): each accepted image spends its own.

    An image that does not fit is refused on its own (``pixel_budget``); images refused for
    another reason spend nothing, since they are never decoded.
    """

    def __init__(self, limit: int, what: str = "request") -> None:
        self.limit = limit
        self.left = limit
        self.what = what

    def spend(self, info: ImageInfo) -> None:
        """Take ``info``'s pixels, or raise :class:`ImageTooLarge` when they do not fit."""
        if info.pixels > self.left:
            raise ImageTooLarge(
                f"the images of this {self.what} add up to more than {self.limit} pixels "
                f"(this one has {info.pixels}, {self.left} were left): send it in another {self.what}",
                code="pixel_budget",
            )
        self.left -= info.pixels


def inspect_images(
    datas: list[bytes], *, max_bytes: int, max_pixels: int, max_frames: int, max_total_pixels: int
) -> list[BatchvisionError | None]:
    """:func:`inspect_image` for each file of one request, under one :class:`PixelBudget`:
    ``None`` where a file is fine, else its error. Pauses (:func:`pause`) every few files, so a
    request of thousands of files never holds the API's event loop for long."""
    budget = PixelBudget(max_total_pixels)
    out: list[BatchvisionError | None] = []
    for n, data in enumerate(datas):
        if n % YIELD_EVERY == YIELD_EVERY - 1:
            pause()
        try:
            budget.spend(
                inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels, max_frames=max_frames)
            )
            out.append(None)
        except BatchvisionError as exc:
            out.append(exc)
    return out


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
        _orient(img)
        img = to_rgb(img)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"cannot decode image: {exc}", code="corrupt_image") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc), code="too_many_pixels") from exc


def _orient(img: Image.Image) -> None:
    """Undo the EXIF orientation in place; an image whose EXIF cannot be read keeps its pixels
    as stored (the picture is still there, only its rotation is unknown)."""
    try:
        # In place: without an orientation to undo, exif_transpose would return a copy of the
        # decoded image, about a sixteenth of what decoding a 224x224 JPEG costs.
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - untrusted bytes: Pillow's EXIF parser raises what it meets
        pass  # (a tag of the wrong type: struct.error)


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
        if is_archive(data):  # a zip sent as a file: say how to send it
            raise InvalidImage(
                "not an image file but an archive: send a zip as the 'archive' part of a multipart "
                "upload or as an application/zip body (other archive formats are not read)",
                code="not_an_image",
            ) from exc
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


def _structure(data: bytes, img: Image.Image) -> int:
    """Check that the file is complete from its structure alone; return its frame count.

    JPEG: the last scan is followed by an end-of-image marker. PNG: every chunk and its CRC
    (:meth:`PIL.PngImagePlugin.PngImageFile.verify` inflates nothing). GIF, WebP and BMP: their
    blocks, chunks or pixel array are walked or measured here, without decompressing. Damage
    inside compressed data is the worker's decode to find.
    """
    fmt = img.format
    if fmt in {"JPEG", "MPO"}:
        # The last scan (SOS, FFDA) must be followed by an end-of-image marker (FFD9);
        # an embedded EXIF thumbnail has its own pair earlier in the file.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise InvalidImage("JPEG is truncated (no end-of-image marker)", code="truncated")
        return int(getattr(img, "n_frames", 1))  # MPO: from its index, nothing decoded
    if fmt == "GIF":
        return _gif_frames(data)
    if fmt == "WEBP":
        _webp_chunks(data)
        return int(getattr(img, "n_frames", 1))  # from the container's animation header
    if fmt == "BMP":
        _bmp_complete(data)
        return 1
    frames = int(getattr(img, "n_frames", 1))  # APNG: from its acTL chunk
    try:
        img.verify()  # walks every chunk and checks its CRC; no pixel decoding
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"image data is truncated or corrupt: {exc}", code="truncated") from exc
    return frames


def _truncated(fmt: str, why: str) -> InvalidImage:
    return InvalidImage(f"{fmt} is truncated or corrupt: {why}", code="truncated")


def _gif_frames(data: bytes) -> int:
    """Walk a GIF's blocks (skipping the LZW data, never decoding it) to its trailer; return
    how many image descriptors (frames) it has."""
    n = len(data)
    pos = 13
    if n < pos:
        raise _truncated("GIF", "no logical screen descriptor")
    flags = data[10]
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)  # global colour table
    frames = 0
    while pos < n:
        block = data[pos]
        if block == 0x3B:  # trailer
            return max(frames, 1)
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                break
            local = data[pos + 9]
            pos += 10
            if local & 0x80:
                pos += 3 << ((local & 7) + 1)
            pos = _gif_sub_blocks(data, pos + 1)
            frames += 1
        else:
            raise _truncated("GIF", f"unknown block 0x{block:02x} at byte {pos}")
    raise _truncated("GIF", "no trailer (the file ends inside a block)")


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    n = len(data)
    while pos < n:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    return n + 1  # ran out: the caller's loop ends and reports truncation


def _webp_chunks(data: bytes) -> None:
    """The RIFF container: its declared size fits the file, and its chunks fill it exactly."""
    if len(data) < 20:
        raise _truncated("WebP", "shorter than a RIFF header and one chunk")
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    if riff_end > len(data):
        raise _truncated("WebP", f"the RIFF header declares {riff_end} bytes, the file has {len(data)}")
    pos = 12
    while pos + 8 <= riff_end:
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    if pos > riff_end + 1:  # (a last odd-sized chunk may omit its pad byte)
        raise _truncated("WebP", "a chunk runs past the end of the file")


def _bmp_complete(data: bytes) -> None:
    """An uncompressed BMP's pixel array must be all there (RLE and embedded JPEG/PNG data can
    only be checked by decoding: the worker does)."""
    if len(data) < 26:
        raise _truncated("BMP", "shorter than its headers")
    offset = int.from_bytes(data[10:14], "little")
    header = int.from_bytes(data[14:18], "little")
    if header == 12:  # OS/2 core header
        width = int.from_bytes(data[18:20], "little")
        height = int.from_bytes(data[20:22], "little")
        bpp = int.from_bytes(data[24:26], "little")
        compression = 0
    elif len(data) >= 34:
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)
        bpp = int.from_bytes(data[28:30], "little")
        compression = int.from_bytes(data[30:34], "little")
    else:
        raise _truncated("BMP", "shorter than its headers")
    if compression not in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
        return
    stride = (abs(width) * bpp + 31) // 32 * 4
    needed = offset + stride * abs(height)
    if len(data) < needed:
        raise _truncated("BMP", f"the pixel array needs {needed} bytes, the file has {len(data)}")
