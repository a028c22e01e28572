"""Preprocessing: formats, modes, orientation, and refusals, without Redis or TensorFlow."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from batchvision.core.errors import ImageTooLarge, InvalidImage
from batchvision.core.imaging import decode_image, inspect_image, inspect_images, normalize, to_rgb
from batchvision.core.synthetic import encode

LIMITS = {"max_bytes": 5_000_000, "max_pixels": 4_000_000}


def _img(mode: str, size: tuple[int, int] = (40, 30), color: object = None) -> Image.Image:
    return Image.new(mode, size, color if color is not None else 0)


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("BMP", {}), ("GIF", {})],
)
def test_accepts_allowed_formats(fmt: str, kw: dict[str, object]) -> None:
    data = encode(
        _img("RGB", color=(200, 10, 10)).convert("P") if fmt == "GIF" else _img("RGB", color=(200, 10, 10)),
        fmt,
        **kw,
    )
    info = inspect_image(data, **LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)
    arr = decode_image(data, (16, 12), max_pixels=LIMITS["max_pixels"])
    assert arr.shape == (12, 16, 3) and arr.dtype == np.uint8
    assert arr[..., 0].mean() > 150 and arr[..., 1].mean() < 60


def test_refuses_other_formats_and_non_images() -> None:
    tiff = encode(_img("RGB"), "TIFF")
    with pytest.raises(InvalidImage) as exc:
        inspect_image(tiff, **LIMITS)
    assert exc.value.code == "unsupported_format"
    with pytest.raises(InvalidImage) as exc:
        inspect_image(b"hello, I am a text file renamed .jpg\n", **LIMITS)
    assert exc.value.code == "not_an_image"
    with pytest.raises(InvalidImage) as exc:
        inspect_image(b"", **LIMITS)
    assert exc.value.code == "empty_file"


def test_a_zip_sent_as_an_image_is_told_where_archives_go() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.jpg", encode(_img("RGB"), "JPEG"))
    with pytest.raises(InvalidImage) as exc:
        inspect_image(buf.getvalue(), **LIMITS)
    assert exc.value.code == "not_an_image" and "'archive' part" in exc.value.message


def test_truncated_jpeg_and_png_are_refused_from_structure() -> None:
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)), "JPEG")
    with pytest.raises(InvalidImage) as exc:
        inspect_image(jpeg[: len(jpeg) // 2], **LIMITS)
    assert exc.value.code == "truncated"
    png = encode(_img("RGB", (200, 200), (1, 2, 3)), "PNG")
    with pytest.raises(InvalidImage):
        inspect_image(png[:-20], **LIMITS)
    # and the worker side refuses it too, with a per-image error rather than a crash
    with pytest.raises(InvalidImage):
        decode_image(jpeg[: len(jpeg) // 2], (32, 32), max_pixels=LIMITS["max_pixels"])


def test_size_and_pixel_limits() -> None:
    data = encode(_img("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLarge):
        inspect_image(data, max_bytes=10, max_pixels=10**6)
    with pytest.raises(ImageTooLarge) as exc:
        inspect_image(data, max_bytes=10**6, max_pixels=100 * 99)
    assert exc.value.status == 413 and exc.value.code == "too_many_pixels"


def test_decompression_bomb_is_refused_from_the_header(png_header_only: Callable[[int, int], bytes]) -> None:
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge) as exc:
        inspect_image(bomb, max_bytes=10**6, max_pixels=50_000_000)
    assert exc.value.code == "too_many_pixels" and exc.value.status == 413
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, (32, 32), max_pixels=50_000_000)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "1", "LA", "RGBA", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = _img(mode, (10, 10))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (10, 10)


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255
    opaque = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    assert tuple(np.asarray(to_rgb(opaque))[0, 0]) == (255, 0, 0)


def test_16_bit_is_scaled_not_clipped() -> None:
    arr = np.full((6, 6), 65535 // 2, dtype=np.uint16)
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = decode_image(buf.getvalue(), (6, 6), max_pixels=100)
    assert 120 <= out.mean() <= 135


def test_cmyk_jpeg_decodes() -> None:
    data = encode(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG")
    out = decode_image(data, (10, 10), max_pixels=10**6)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_exif_orientation_is_applied() -> None:
    # A 40x20 image whose EXIF says "rotate 90": the decoded image is 20 wide, 40 tall.
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, (20, 40), max_pixels=10**6)
    assert out.shape == (40, 20, 3)
    assert out[:15].mean() > 200 and out[25:].mean() < 50  # the white half is now on top


def malformed_exif_jpeg() -> bytes:
    """A JPEG whose EXIF asks for a rotation and has a tag of the wrong type (StripOffsets as
    text): Pillow's orientation step raises ``struct.error`` on it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Cam"  # Make, ASCII ...
    raw = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x11\x00\x02")  # ... renamed StripOffsets
    return encode(Image.new("RGB", (40, 30), (250, 10, 10)), "JPEG", exif=raw, quality=95)


def test_an_image_with_unreadable_exif_decodes_as_stored() -> None:
    data = malformed_exif_jpeg()
    with pytest.raises(struct.error):  # what Pillow does with it
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)), in_place=True)
    out = decode_image(data, (40, 30), max_pixels=10**6)
    assert out.shape == (30, 40, 3)  # not rotated: its orientation could not be read
    assert out[..., 0].mean() > 200


def test_gif_uses_first_frame() -> None:
    frames = [Image.new("P", (10, 10), i) for i in (1, 2)]
    frames[0].putpalette([0, 0, 0, 250, 0, 0, 0, 250, 0] + [0] * 759)
    frames[1].putpalette([0, 0, 0, 250, 0, 0, 0, 250, 0] + [0] * 759)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), (10, 10), max_pixels=10**6)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50


def test_jpeg_draft_mode_matches_full_decode() -> None:
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).resize(
        (1440, 1080), Image.Resampling.BICUBIC
    )
    data = encode(base, "JPEG", quality=92)
    fast = decode_image(data, (224, 224), max_pixels=10**7).astype(float)
    full = np.asarray(base.resize((224, 224), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(fast - full).mean() < 6


def test_normalize_modes() -> None:
    batch = np.full((1, 2, 2, 3), 255, np.uint8)
    assert normalize(batch, "tf").max() == pytest.approx(1.0)
    assert normalize(batch, "unit").max() == pytest.approx(1.0)
    assert normalize(batch, "none").max() == 255
    caffe = normalize(batch, "caffe")
    assert caffe[0, 0, 0, 0] == pytest.approx(255 - 103.939)
    with pytest.raises(ValueError):
        normalize(batch, "nope")


def test_the_configured_pixel_limit_is_the_one_that_applies(
    png_header_only: Callable[[int, int], bytes],
) -> None:
    # 95 MP is above Pillow's own default guard; with a higher configured limit it passes.
    big = png_header_only(10000, 9500)
    assert inspect_image(big, max_bytes=10**6, max_pixels=200_000_000).width == 10000
    with pytest.raises(ImageTooLarge):
        inspect_image(big, max_bytes=10**6, max_pixels=90_000_000)


# -- no decoding while checking; truncation from structure; frames and pixel budgets ----------


def _big(fmt: str, size: tuple[int, int] = (4000, 4000), **kw: object) -> bytes:
    return encode(_img("P" if fmt == "GIF" else "RGB", size), fmt, **kw)


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [("WEBP", {"lossless": True}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("PNG", {}), ("JPEG", {})],
)
def test_checking_decodes_no_pixel_of_any_format(
    fmt: str, kw: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 678-byte lossless WebP of 4000x4000 used to be decoded in the API's event loop (61 MiB).
    data = _big(fmt, **kw)
    from PIL import ImageFile

    def no_decode(self: object) -> None:
        raise AssertionError(f"{fmt}: pixels decoded while checking")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    monkeypatch.setattr(Image.Image, "load", no_decode)
    info = inspect_image(data, max_bytes=100_000_000, max_pixels=16_000_000)
    assert (info.width, info.height, info.frames) == (4000, 4000, 1)
    with pytest.raises(ImageTooLarge) as exc:
        inspect_image(data, max_bytes=100_000_000, max_pixels=15_999_999)
    assert exc.value.code == "too_many_pixels"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP"])
def test_truncated_gif_webp_and_bmp_are_refused_from_structure(fmt: str) -> None:
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (120, 160, 3), np.uint8))
    data = encode(picture.convert("P") if fmt == "GIF" else picture, fmt)
    assert inspect_image(data, **LIMITS).format == fmt
    for cut in (len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidImage) as exc:
            inspect_image(data[:cut], **LIMITS)
        assert exc.value.code in ("truncated", "corrupt_image"), (cut, exc.value.message)


def _animation(fmt: str, frames: int) -> bytes:
    images = [_img("RGB", (8, 8), (n * 7 % 256, 0, 0)) for n in range(frames)]
    if fmt == "GIF":
        images = [i.convert("P") for i in images]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], duration=10)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_frames_are_counted_from_the_header_and_limited(fmt: str) -> None:
    data = _animation(fmt, 12)
    assert inspect_image(data, **LIMITS, max_frames=12).frames == 12
    with pytest.raises(ImageTooLarge) as exc:
        inspect_image(data, **LIMITS, max_frames=11)
    assert exc.value.code == "too_many_frames" and "12 frames" in exc.value.message


def test_a_request_has_one_pixel_budget_and_each_file_past_it_gets_its_own_error(
    png_header_only: Callable[[int, int], bytes],
) -> None:
    at_limit = png_header_only(2000, 2000)  # 4 MP each, the per-image limit
    over = png_header_only(2001, 2000)
    files = [at_limit, over, at_limit, at_limit, b"text", at_limit]
    problems = inspect_images(
        files, max_bytes=10**6, max_pixels=4_000_000, max_frames=10, max_total_pixels=10_000_000
    )
    codes = [p.code if p else None for p in problems]
    # the refused ones spend nothing: two fit (8 MP), the third and fourth at the limit do not
    assert codes == [None, "too_many_pixels", None, "pixel_budget", "not_an_image", "pixel_budget"]
    assert "10000000 pixels" in str(problems[3])
