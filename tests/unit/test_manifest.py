"""Manifests of image URLs (``batchvision.core.manifest``): CSV, JSON Lines, URI lists; limits and
errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchvision.core.errors import BadRequest
from batchvision.core.manifest import (
    ManifestError,
    TooManyUrls,
    UrlEntry,
    entries_from_json,
    kind_of_media_type,
    parse,
    read_file,
    scan_json,
)


def test_csv_with_url_and_filename_columns_in_any_order_and_extra_columns() -> None:
    text = '\ufeffid,Filename,URL\n1,a.jpg,http://h/a.jpg\n\n2,,https://h/b.png\n3,"c, d.jpg",http://h/c\n'
    assert parse(text.encode(), "csv", max_entries=10) == [
        UrlEntry("http://h/a.jpg", "a.jpg", "1"),
        UrlEntry("https://h/b.png", None, "2"),
        UrlEntry("http://h/c", "c, d.jpg", "3"),
    ]
    assert UrlEntry("https://h/b.png").name == "https://h/b.png"  # the URL names a nameless entry


def test_csv_with_only_a_url_column() -> None:
    assert parse("url\nhttp://h/1\nhttp://h/2\n", "csv", max_entries=10) == [
        UrlEntry("http://h/1"),
        UrlEntry("http://h/2"),
    ]


def test_json_lines_take_strings_and_objects() -> None:
    text = '"http://h/1"\n\n{"url": "http://h/2", "filename": "two.jpg"}\n{"url": "http://h/3"}\n'
    assert parse(text, "jsonl", max_entries=10) == [
        UrlEntry("http://h/1"),
        UrlEntry("http://h/2", "two.jpg"),
        UrlEntry("http://h/3"),
    ]


def test_uri_lists_skip_comments() -> None:
    assert parse("# mine\nhttp://h/1\r\n\nhttp://h/2\n", "urilist", max_entries=10) == [
        UrlEntry("http://h/1"),
        UrlEntry("http://h/2"),
    ]


@pytest.mark.parametrize(
    ("kind", "text", "says"),
    [
        ("csv", "name,link\na,http://h/a\n", "no 'url' column"),
        ("csv", "", "empty"),
        ("csv", "url\n\n", "lists no URL"),
        ("csv", "filename,url\na.jpg\n", "line 2: no value in the 'url' column"),
        ("jsonl", '"http://h/1"\n{"url": 5}\n', "line 2: no URL"),
        ("jsonl", '"http://h/1"\nnot json\n', "line 2: not JSON"),
        ("jsonl", '{"url": "http://h", "size": 3}\n', "unknown field 'size'"),
        ("jsonl", "[1, 2]\n", "line 1: expected a URL string"),
        ("jsonl", '{"url": "http://h", "filename": 7}\n', "filename must be a string"),
    ],
)
def test_unreadable_manifests_name_the_problem(kind: str, text: str, says: str) -> None:
    with pytest.raises(ManifestError, match=says) as info:
        parse(text, kind, max_entries=10)  # type: ignore[arg-type]
    assert info.value.status == 400 and info.value.code == "bad_manifest"


def test_a_url_over_the_limit_is_its_own_row_with_a_name_cut_short() -> None:
    long = "http://h/" + "a" * 2100
    entries = parse(f"url\nhttp://h/1\n{long}\n", "csv", max_entries=10)
    assert [e.url for e in entries] == ["http://h/1", long]  # its image's bad_url, not the manifest's
    assert entries[1].name == long[:2048] + "…" and entries[0].name == "http://h/1"


def test_not_utf8_is_refused() -> None:
    with pytest.raises(ManifestError, match="not UTF-8"):
        parse(b"url\nhttp://h/\xff\n", "csv", max_entries=10)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "urilist"])
def test_the_entry_limit_stops_reading(kind: str) -> None:
    lines = [f"http://h/{i}" for i in range(6)]
    body = {"csv": "url\n" + "\n".join(lines), "jsonl": "\n".join(f'"{u}"' for u in lines)}.get(
        kind, "\n".join(lines)
    )
    assert len(parse(body, kind, max_entries=6)) == 6  # type: ignore[arg-type]
    with pytest.raises(TooManyUrls) as info:
        parse(body, kind, max_entries=5)  # type: ignore[arg-type]
    assert info.value.status == 413 and info.value.code == "too_many_urls"


def test_json_bodies_and_files_and_media_types(tmp_path: Path) -> None:
    items = ["http://h/1", {"url": "http://h/2", "filename": "b.jpg"}]
    expected = [UrlEntry("http://h/1"), UrlEntry("http://h/2", "b.jpg")]
    assert entries_from_json(items, max_entries=2) == expected
    with pytest.raises(TooManyUrls):
        entries_from_json(items, max_entries=1)
    (tmp_path / "m.csv").write_text("url,filename\nhttp://h/1,one.jpg\n")
    assert read_file(tmp_path / "m.csv") == [UrlEntry("http://h/1", "one.jpg")]
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    with pytest.raises(ManifestError, match="unknown manifest type"):
        read_file(tmp_path / "m.xlsx")
    assert kind_of_media_type("Text/CSV") == "csv" and kind_of_media_type("application/x-ndjson") == "jsonl"
    assert kind_of_media_type("text/plain") is None


# -- counted while reading -------------------------------------------------------------------


def test_a_json_body_over_the_url_limit_is_refused_before_it_is_parsed() -> None:
    body = json.dumps({"callback_url": "https://h/cb", "urls": [f"https://h/{i}" for i in range(11)]})
    with pytest.raises(TooManyUrls, match="more than 10 URLs"):
        scan_json(body.encode(), max_entries=10)
    scan_json(body.encode(), max_entries=11)  # exactly the limit passes
    objects = json.dumps({"urls": [{"url": f"https://h/{i}", "filename": f"{i}.jpg"} for i in range(11)]})
    scan_json(objects.encode(), max_entries=11)  # commas inside entries are not entries
    with pytest.raises(TooManyUrls):
        scan_json(objects.encode(), max_entries=10)


def test_a_json_body_nested_too_deep_is_a_bad_body_whatever_its_shape() -> None:
    for body in (b"[" * 40 + b"]" * 40, b'{"a": ' * 40 + b"1" + b"}" * 40, b"[" * 20_000):
        with pytest.raises(BadRequest, match="nested deeper than 32") as caught:
            scan_json(body, max_entries=10)
        assert caught.value.code == "bad_body"
    scan_json(b'{"urls": [{"url": "https://h/[[[[{{{{\\"", "filename": "a"}]}', max_entries=1)  # in strings


def test_a_json_body_with_more_tokens_than_a_url_job_is_refused() -> None:
    with pytest.raises(TooManyUrls, match="larger than a job of 10 URLs"):
        scan_json(json.dumps({"other": list(range(10_000))}).encode(), max_entries=10)


def test_a_manifest_stops_at_the_first_entry_over_the_limit() -> None:
    # the bytes after the limit are not even valid UTF-8: reading stopped before them
    body = "".join(f"https://h/{i}\n" for i in range(2000)).encode() + b"\xff\xfe" * 10
    with pytest.raises(TooManyUrls):
        parse(body, "urilist", max_entries=10)
    with pytest.raises(TooManyUrls):
        parse(b"url\n" + body, "csv", max_entries=10)
    with pytest.raises(ManifestError, match="not UTF-8"):
        parse(body, "urilist", max_entries=10_000)


def test_ids_and_passthrough_columns() -> None:
    csv_text = "url,id,shop,filename\ns3://bucket/a.jpg,sku-1,north,a\nhttp://h/b.jpg,,south,\n"
    entries = parse(csv_text, "csv", max_entries=10)
    assert entries[0] == UrlEntry("s3://bucket/a.jpg", "a", "sku-1", (("shop", "north"),))
    assert entries[1].id is None and entries[1].columns == (("shop", "south"),)
    jsonl = '{"url": "s3://b/x.jpg", "id": 7, "columns": {"k": 1.5, "ok": true}}\n'
    (entry,) = parse(jsonl, "jsonl", max_entries=10)
    assert entry.id == "7" and entry.columns == (("k", 1.5), ("ok", True)) and entry.passthrough
    for bad, says in (
        ('{"url": "http://h", "columns": [1]}\n', "columns must be an object"),
        ('{"url": "http://h", "columns": {"k": {"x": 1}}}\n', "must be text, a number"),
        ('{"url": "http://h", "id": true}\n', "id must be a string or an integer"),
    ):
        with pytest.raises(ManifestError, match=says):
            parse(bad, "jsonl", max_entries=10)


@pytest.mark.parametrize("name", ["label", "Score", "id", "class_id", "error", "status", "version"])
def test_a_passthrough_column_named_like_a_result_column_is_refused(name: str) -> None:
    # It would collide with the result's own column in CSV, JSON Lines or Parquet.
    jsonl = json.dumps({"url": "http://h/a.jpg", "columns": {"shop": "n", name: "x"}}) + "\n"
    with pytest.raises(ManifestError, match=rf"line 1: pass-through column {name!r}.*reserved.*class_id"):
        parse(jsonl, "jsonl", max_entries=10)
    csv_text = f"url,shop,{name}\nhttp://h/a.jpg,n,x\n"
    if name == "id":  # a CSV column named id is the entries' ids, not a pass-through column
        assert parse(csv_text, "csv", max_entries=10)[0].id == "x"
        return
    with pytest.raises(ManifestError, match=rf"line 2: pass-through column {name!r}"):
        parse(csv_text, "csv", max_entries=10)
    with pytest.raises(ManifestError, match=rf"urls\[0\]: pass-through column {name!r}"):
        entries_from_json([{"url": "http://h/a.jpg", "columns": {name: 1}}], max_entries=10)


def test_a_body_of_unclosed_quotes_is_scanned_in_one_pass() -> None:
    # `\"` repeated: every quote opens a string that never closes. A string token that could
    # not run to the end would be tried again from every quote (quadratic: a 1 MB body took
    # about an hour); it is one token, then the scan is over.
    from batchvision.core.manifest import _JSON_TOKEN

    body = b'{"urls": ["' + b'\\"' * 4
    assert [m.group() for m in _JSON_TOKEN.finditer(body)] == [b"{", b'"urls"', b":", b"[", b'"' + b'\\"' * 4]
    scan_json(b'{"urls": "' + b'\\"' * 2_000_000, max_entries=10)  # 4 MB: invalid JSON, left to the parser
    valid = json.dumps({"urls": [{"url": 'https://h/"q"\\.jpg', "filename": "a\nb"}]}).encode()
    assert [m.group() for m in _JSON_TOKEN.finditer(valid)][:6] == [
        b"{",
        b'"urls"',
        b":",
        b"[",
        b"{",
        b'"url"',
    ]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("[" * 100_000, "nested too deeply"),
        ('"http://e.com/\\ud800.jpg"', "lone surrogate"),
        ('{"url": "http://e.com/a.jpg", "filename": "\\udfff.jpg"}', "lone surrogate"),
        ('{"url": "http://e.com/a.jpg", "columns": {"x": NaN}}', "NaN is not a JSON value"),
        ('{"url": "http://e.com/a.jpg", "columns": {"x": -Infinity}}', "-Infinity is not a JSON value"),
        ('{"url": "http://e.com/a.jpg", "columns": {"x": 1e400}}', "inf: numbers must be finite"),
    ],
)
def test_a_json_lines_line_python_would_take_but_json_does_not_is_refused_by_line(
    line: str, why: str
) -> None:
    # Each used to end in a 500: a RecursionError, a string no store can encode, a NaN.
    body = '"http://e.com/fine.jpg"\n' + line + "\n"
    with pytest.raises(ManifestError, match=f"line 2: .*{why}"):
        parse(body.encode(), "jsonl", max_entries=10)
