"""The results CSV: cells that a spreadsheet would run as formulas are neutralised."""

from __future__ import annotations

import csv
import io
import json

import pytest

from batchvision.core.results import Prediction, Row, csv_cell, csv_lines, error_result, jsonl_lines


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx"])
def test_formula_cells_get_a_leading_quote_and_json_keeps_the_raw_value(name: str) -> None:
    rows = [Row(0, name, error_result("truncated", "=cmd|' /C calc'!A0"))]
    parsed = list(csv.reader(io.StringIO("".join(csv_lines(rows)), newline="")))
    assert parsed[1][0] == "'" + name
    assert parsed[1][5] == "truncated: =cmd|' /C calc'!A0"  # starts with the code: no formula
    assert json.loads("".join(jsonl_lines(rows)))["filename"] == name


def test_ordinary_cells_and_numbers_are_unchanged() -> None:
    rows = [Row(0, "a/x-1.jpg", Prediction("-dash", 3, 0.5, ()))]
    parsed = list(csv.reader(io.StringIO("".join(csv_lines(rows)), newline="")))
    assert parsed[1][:4] == ["a/x-1.jpg", "'-dash", "0.5", "3"]


def test_a_carriage_return_at_the_start_is_neutralised_too() -> None:
    assert csv_cell("\r=1+1") == "'\r=1+1" and csv_cell(0.5) == 0.5 and csv_cell("ok") == "ok"


def test_pass_through_column_names_in_the_header_are_neutralised_too() -> None:
    # A manifest's column names come from whoever wrote it, like its values.
    from batchvision.core.results import csv_header

    head = csv_header(columns=['=HYPERLINK("http://evil.example")', "@SUM(1+1)", "camera"])
    assert head[-3:] == ['\'=HYPERLINK("http://evil.example")', "'@SUM(1+1)", "camera"]
