"""Zip uploads: images read in memory, hostile archives refused."""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from collections.abc import Callable

import pytest

from batchvision.core.archive import ArchiveContents, ArchiveRejected, ArchiveTooLarge, read_zip
from batchvision.core.sniff import HEAD_BYTES
from batchvision.core.synthetic import labelled_files

LIMITS = {"max_members": 100, "max_total_bytes": 50_000_000, "max_ratio": 100.0}


def _zip(members: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_images_with_relative_paths_others_skipped() -> None:
    imgs = [(f"a/b/{n}", data) for n, data, _ in labelled_files(3, seed=1)]
    nested = _zip([("x.txt", b"hi")])
    data = _zip([*imgs, ("notes.txt", b"not an image"), ("inner.zip", nested)])
    out = read_zip(data, **LIMITS)
    assert [n for n, _ in out.images] == [n for n, _ in imgs]
    assert {s["filename"]: s["reason"] for s in out.skipped} == {
        "notes.txt": "not an image",
        "inner.zip": "nested archive (not expanded)",
    }


@pytest.mark.parametrize("name", ["../evil.jpg", "a/../../evil.jpg", "/etc/evil.jpg", "C:/evil.jpg"])
def test_path_escapes_are_refused(name: str) -> None:
    with pytest.raises(ArchiveRejected):
        read_zip(_zip([(name, b"\xff\xd8\xff")]), **LIMITS)


def test_symlink_is_refused() -> None:
    with pytest.raises(ArchiveRejected, match="symbolic link"):
        read_zip(_zip([], symlink="link.jpg"), **LIMITS)


def test_zip_bomb_is_refused() -> None:
    bomb = _zip([("zeros.jpg", b"\0" * 20_000_000)])
    assert len(bomb) < 100_000
    with pytest.raises(ArchiveTooLarge) as exc:
        read_zip(bomb, **LIMITS)
    assert exc.value.status == 413
    with pytest.raises(ArchiveTooLarge):
        read_zip(bomb, max_members=10, max_total_bytes=1_000_000, max_ratio=10_000)


def test_too_many_members_and_garbage() -> None:
    with pytest.raises(ArchiveTooLarge):
        read_zip(
            _zip([(f"{i}.txt", b"x") for i in range(5)]), max_members=3, max_total_bytes=10**6, max_ratio=100
        )
    with pytest.raises(ArchiveRejected):
        read_zip(b"PK\x03\x04 definitely not a zip", **LIMITS)


def test_corrupt_member_is_a_clear_refusal() -> None:
    name, data, _ = next(labelled_files(1, seed=2))
    raw = bytearray(_zip([(name, data)]))
    raw[60:80] = b"\0" * 20  # damage the compressed data: CRC or inflate fails
    with pytest.raises(ArchiveRejected):
        read_zip(bytes(raw), **LIMITS)


def test_the_members_pixels_add_up_to_at_most_the_archive_limit(
    png_header_only: Callable[[int, int], bytes],
) -> None:
    members = [(f"m{n}.png", png_header_only(1000, 1000)) for n in range(5)]  # 1 MP each
    members.append(("huge.png", png_header_only(5000, 5000)))  # over the per-image limit: not counted
    data = _zip(members)
    limits = {**LIMITS, "max_pixels": 2_000_000}
    assert len(read_zip(data, **limits, max_total_pixels=5_000_000).images) == 6
    with pytest.raises(ArchiveTooLarge) as exc:
        read_zip(data, **limits, max_total_pixels=4_999_999)
    assert "5000000 pixels" in exc.value.message and exc.value.status == 413


def _image_zip() -> bytes:
    name, data, _ = next(labelled_files(1, seed=3))
    return _zip([(name, data)])


def _end_record(raw: bytes) -> int:
    return raw.rindex(b"PK\x05\x06")


def _central_header(raw: bytes) -> int:
    return raw.index(b"PK\x01\x02")


def _forged_offset(raw: bytes) -> bytes:
    # The central directory's offset in the end record, 10 bytes too far.
    out = bytearray(raw)
    at = _end_record(raw) + 16
    out[at : at + 4] = (int.from_bytes(out[at : at + 4], "little") + 10).to_bytes(4, "little")
    return bytes(out)


def _future_version(raw: bytes) -> bytes:
    # "Version needed to extract" 14.1 in the central directory.
    out = bytearray(raw)
    at = _central_header(raw) + 6
    out[at : at + 2] = (141).to_bytes(2, "little")
    return bytes(out)


def _bad_utf8_name(raw: bytes) -> bytes:
    # The UTF-8 flag on a name that is not UTF-8, in the local header the member is read by.
    out = bytearray(raw)
    out[6:8] = (int.from_bytes(out[6:8], "little") | 0x800).to_bytes(2, "little")
    out[30] = 0xFF
    return bytes(out)


def _nul_name() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("\0x.jpg"), b"\xff\xd8\xff")  # zipfile keeps what is before the NUL: ""
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: _forged_offset(_image_zip()),
        lambda: _future_version(_image_zip()),
        lambda: _bad_utf8_name(_image_zip()),
        _nul_name,
    ],
    ids=["forged-offset", "future-version", "bad-utf8-name", "empty-name"],
)
def test_a_malformed_archive_is_refused_not_a_server_error(make: Callable[[], bytes]) -> None:
    # Each escaped the parser as NotImplementedError, IndexError, ValueError or
    # UnicodeDecodeError: a 500.
    with pytest.raises(ArchiveRejected):
        read_zip(make(), **LIMITS)


def test_entries_past_the_limit_are_refused_before_the_directory_is_read() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(201):  # folders: no member among them, yet each is an entry to parse
            zf.writestr(f"d{i}/", b"")
    with pytest.raises(ArchiveTooLarge, match="201 entries"):
        read_zip(buf.getvalue(), **LIMITS)
    forged = bytearray(buf.getvalue())  # the end record declares 1 entry: zipfile reads 201
    at = _end_record(bytes(forged))
    forged[at + 8 : at + 12] = (1).to_bytes(2, "little") * 2
    with pytest.raises(ArchiveTooLarge, match="201 entries"):
        read_zip(bytes(forged), **LIMITS)
    small = io.BytesIO()
    with zipfile.ZipFile(small, "w") as zf:
        for i in range(150):  # folders count, within twice the member limit
            zf.writestr(f"d{i}/", b"")
        zf.writestr("d0/x.txt", b"hi")
    assert read_zip(small.getvalue(), **LIMITS).skipped == [
        {"filename": "d0/x.txt", "reason": "not an image"}
    ]


def _unflagged(names: list[tuple[str, bytes]], extra: dict[str, bytes] | None = None) -> bytes:
    """A zip whose member names are the given header bytes without the UTF-8 flag, as Info-ZIP's
    ``zip`` and macOS write them: written under ASCII stand-ins of the same length, then patched
    (zipfile would set the flag, or refuse the bytes)."""
    _, data, _ = next(labelled_files(1, seed=4))
    buf = io.BytesIO()
    stand_ins = []
    with zipfile.ZipFile(buf, "w") as zf:
        for i, (display, raw) in enumerate(names):
            stand_in = f"{i:0{len(raw)}d}"
            stand_ins.append((stand_in.encode(), raw))
            info = zipfile.ZipInfo(stand_in)
            info.extra = (extra or {}).get(display, b"")
            zf.writestr(info, data)
    out = buf.getvalue()
    for stand_in, raw in stand_ins:
        assert out.count(stand_in) == 2  # the local header and the central directory
        out = out.replace(stand_in, raw)
    return out


def _unicode_path(header_name: bytes, name: str) -> bytes:
    body = b"\x01" + zlib.crc32(header_name).to_bytes(4, "little") + name.encode()
    return (0x7075).to_bytes(2, "little") + len(body).to_bytes(2, "little") + body


def test_member_names_without_the_utf8_flag_come_back_as_written() -> None:
    utf8 = "photos/ünïcødé_日本.jpg"
    legacy = "caf\x82.jpg".encode("latin-1")  # CP437 "café.jpg": not UTF-8
    mac = "mac/naïve.jpg"
    raw_mac = b"mac/na?ve.jpg"  # a lossy header name, the real one in the extra field
    archive = _unflagged(
        [(utf8, utf8.encode()), ("legacy", legacy), (mac, raw_mac)],
        extra={mac: _unicode_path(raw_mac, mac)},
    )
    names = [name for name, _ in read_zip(archive, **LIMITS).images]
    assert names == [utf8, "café.jpg", mac]


def test_a_unicode_path_field_for_another_name_is_ignored() -> None:
    stale = _unicode_path(b"something-else.jpg", "wrong.jpg")  # its CRC is of another name
    archive = _unflagged([("x", b"right.jpg")], extra={"x": stale})
    assert [name for name, _ in read_zip(archive, **LIMITS).images] == ["right.jpg"]


def _read_traced(data: bytes) -> tuple[ArchiveContents, int]:
    """``read_zip`` of ``data`` (any compression ratio), and the peak of memory it allocated."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = read_zip(data, **{**LIMITS, "max_ratio": 1e6})
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_member_that_is_no_image_is_skipped_without_being_expanded() -> None:
    # 40 MB of text that compresses well: only its first bytes are needed to skip it.
    data = _zip(
        [("notes.txt", b"plain text " * 4_000_000), *[(n, d) for n, d, _ in labelled_files(1, seed=2)]]
    )
    out, peak = _read_traced(data)
    assert [s["reason"] for s in out.skipped] == ["not an image"] and len(out.images) == 1
    assert peak < 5_000_000, f"{peak} bytes at the peak: the skipped member was read whole"


def test_a_member_named_as_an_image_is_kept_for_its_row_but_never_expanded() -> None:
    text = b"plain text " * 4_000_000  # 44 MB that compresses well
    data = _zip([("notes.txt", b"hi"), ("a/fake.JPG", text), ("empty.png", b""), ("inner.gif", _zip([]))])
    out, peak = _read_traced(data)
    # Its first bytes only: the upload's check tells from them what it is (its row's error).
    assert out.images == [("a/fake.JPG", text[:HEAD_BYTES]), ("empty.png", b"")]
    assert {s["filename"]: s["reason"] for s in out.skipped} == {
        "notes.txt": "not an image",
        "inner.gif": "nested archive (not expanded)",  # an archive is never expanded, however named
    }
    assert peak < 5_000_000, f"{peak} bytes at the peak: the member was read whole"


def test_the_bytes_the_members_declare_are_reserved_before_any_is_expanded() -> None:
    imgs = [(n, d) for n, d, _ in labelled_files(3, seed=3)]
    data = _zip(imgs)
    asked: list[int] = []
    read_zip(data, **LIMITS, reserve=asked.append)
    assert asked == [sum(len(d) for _, d in imgs)]

    class Busy(Exception):
        pass

    def refuse(n: int) -> None:
        raise Busy(n)

    # Before any member is read: with a member whose data is broken, a reservation made after
    # reading would come too late (the broken member is refused first).
    broken = bytearray(data)
    at = data.find(b"PK\x03\x04") + 30 + len(imgs[0][0]) + 40  # into the first member's data
    broken[at : at + 16] = b"\x00" * 16
    with pytest.raises(ArchiveRejected):
        read_zip(bytes(broken), **LIMITS)
    with pytest.raises(Busy):
        read_zip(bytes(broken), **LIMITS, reserve=refuse)
