"""Property-based fuzz of the input readers, the params validation and the samplers.

Contracts checked:
- `read_interactions`, for the tables of ml-100k (tab, no header), ml-1m ('::', latin-1) and
  ml-latest-small (CSV with a header, CRLF): for any input it returns user_id, movie_id, timestamp
  (int64) and rating (float64), or raises PipelineError whose message starts with the file path;
  valid files round-trip exactly; a file with one malformed line is rejected naming that line; an
  error that names `line N` names a line that really is malformed, and no later than the first
  line that is plainly malformed (so the error scan and pandas' C pass agree on what a number is).
- `read_titles` (u.item of ml-100k, and the ml-1m and CSV movie lists): movie_id int64 and title
  str, or a PipelineError naming the file; valid lists round-trip (latin-1, quotes, ragged lines,
  blank lines); a bad movie id is named by its line.
- `params.validate`: for every key of SPECS, every model's knobs (the MLP's top-level keys, the
  others' sections: so keys and models added later are covered) and every kind ('int', 'float',
  'int_list', 'choice', 'model', 'model_list', 'bool', 'str', 'column', 'section'), any
  replacement value is accepted (converted, of the kind, in range) or rejected
  with a PipelineError naming the source and the key ('gmf.lr' in a section); in-range numbers
  written as strings (as DVC writes them) give the same result as the numbers; valid values of
  the other kinds round-trip, also through YAML; a wrong type is rejected naming the key; unknown
  and missing keys are named, in sections too.
- `distinct_ranks` / `ComplementSampler`: sorted distinct ranks in range; never an excluded item.

Every run draws the same examples (derandomize=True, no example database), so CI is reproducible.
Bugs this file found in earlier versions of pipeline/ are kept as plain regression tests at the
end, each with its minimal input.
"""
from __future__ import annotations

import copy
import csv
import functools
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import REPO
from pipeline.common import PipelineError
from pipeline.datasets import DATASETS, Table, read_interactions, read_titles
from pipeline.models import get as get_model, list_models
from pipeline.params import SPECS, Spec, validate
from pipeline.sampling import ComplementSampler, distinct_ranks


def fuzz(max_examples: int):
    """Reproducible, deadline-free settings: the same examples on every run and machine."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """One directory per module (function-scoped tmp_path does not mix with @given)."""
    return tmp_path_factory.mktemp("fuzz")


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _line_numbers(message: str) -> list[int]:
    return [int(n) for n in re.findall(r"\bline (\d+)", message)]


def _lines(text: str) -> list[str]:
    """The file's lines as the readers count them: ended by \\n, \\r\\n or a lone \\r."""
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines[-1] == "" else lines


# --- read_interactions ----------------------------------------------------------------------------

OUTPUT_COLUMNS = ["user_id", "movie_id", "timestamp", "rating"]
FIELD_ORDER = ["user_id", "movie_id", "rating", "timestamp"]  # the order of the fields in all three files
RATINGS_TABLES = {name: DATASETS[name].ratings_table for name in ("ml-100k", "ml-1m", "ml-latest-small")}
TABLE_NAMES = sorted(RATINGS_TABLES)
NEWLINE = {"ml-100k": "\n", "ml-1m": "\n", "ml-latest-small": "\r\n"}


def test_fuzzed_tables_are_what_the_writers_below_assume():
    for table in RATINGS_TABLES.values():
        assert set(table.columns) == set(FIELD_ORDER)
        names = ["userId", "movieId", "rating", "timestamp"] if table.header else [0, 1, 2, 3]
        assert [table.columns[c] for c in FIELD_ORDER] == names
    assert RATINGS_TABLES["ml-1m"].sep == "::" and RATINGS_TABLES["ml-1m"].encoding == "latin-1"
    assert RATINGS_TABLES["ml-latest-small"].sep == "," and RATINGS_TABLES["ml-latest-small"].header


def _first_data_line(table: Table) -> int:
    return 2 if table.header else 1


def _ratings_bytes(table: Table, lines: list[str], newline: str, final_newline: bool = True) -> bytes:
    if table.header:
        lines = [table.sep.join(str(table.columns[c]) for c in FIELD_ORDER)] + lines
    text = newline.join(lines) + (newline if final_newline and lines else "")
    return text.encode(table.encoding)


def _check_frame(df: Any) -> None:
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == OUTPUT_COLUMNS
    assert [str(df[c].dtype) for c in OUTPUT_COLUMNS] == ["int64", "int64", "int64", "float64"], df.dtypes


def _read(path: Path, table: Table) -> tuple[pd.DataFrame | None, str | None]:
    """(frame, None) or (None, message); the message must start with the path. Anything else propagates."""
    try:
        df = read_interactions(path, table)
    except PipelineError as err:
        message = str(err)
        assert message.startswith(str(path)), message
        return None, message
    _check_frame(df)
    return df, None


# Oracles. "Plain": what every reader must accept. "Plainly bad": what none may accept (a field
# holding a character no number has, or nothing; a wrong field count; an empty line). In between
# (' 7', '+7', '4.0', '1e3' for an integer) the reader follows pandas' C parser.
_PLAIN_INT = re.compile(r"-?[0-9]+")
_PLAIN_RATING = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789.eE+- \t\v\f")


def _fields(line: str, table: Table) -> list[str]:
    return line.split(table.sep)  # the fuzzed files hold no quotes, so this is CSV too


def _plain_valid(line: str, table: Table) -> bool:
    fields = _fields(line, table)
    if len(fields) != 4:
        return False
    ints = [fields[FIELD_ORDER.index(c)] for c in ("user_id", "movie_id", "timestamp")]
    return (all(_PLAIN_INT.fullmatch(f) and -(2**63) <= int(f) < 2**63 for f in ints)
            and bool(_PLAIN_RATING.fullmatch(fields[2])))


def _plainly_bad(line: str, table: Table) -> bool:
    fields = _fields(line, table)
    if line == "" or len(fields) != 4:
        return True
    if len(table.sep) > 1 and any(table.sep[0] in f for f in fields):
        return True
    return any(not f.strip(" \t\v\f") or not set(f) <= _NUMBER_CHARS for f in fields)


U31 = st.integers(0, 2**31 - 1)
INT64 = st.one_of(U31, st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
RATING = st.one_of(st.integers(0, 10).map(lambda k: k / 2), st.integers(-3, 9), st.integers(0, 40).map(lambda k: k / 4))
RATING_ROWS = st.lists(st.tuples(INT64, INT64, RATING, INT64), min_size=1, max_size=20)


@pytest.mark.parametrize("name", TABLE_NAMES)
@fuzz(25)
@given(rows=RATING_ROWS, newline=st.sampled_from(["\n", "\r\n", "\r"]), final_newline=st.booleans())
def test_read_interactions_round_trips_valid_files(fuzz_dir, name, rows, newline, final_newline):
    table = RATINGS_TABLES[name]
    lines = [table.sep.join(str(v) for v in row) for row in rows]
    path = _write(fuzz_dir, "ratings", _ratings_bytes(table, lines, newline, final_newline))
    df, message = _read(path, table)
    assert message is None, message
    assert df["user_id"].tolist() == [r[0] for r in rows]
    assert df["movie_id"].tolist() == [r[1] for r in rows]
    assert df["timestamp"].tolist() == [r[3] for r in rows]
    assert df["rating"].tolist() == [float(r[2]) for r in rows]


def _not_a_number(table: Table, column: str) -> st.SearchStrategy[str]:
    """Text that no reader may take for `column`: plainly bad, or a number of the wrong kind."""
    known = ["x", "nan", "NaN", "inf", "-inf", "Infinity", "", " ", "1 2", "0x10", "1_000", "NA", "#", "²", "٣",
             "٣x", "\x00", "--1", "1-", "١.٥", "1e400", "1\ufeff", "1,5", "e3", ".", "TRUE", "false", "tRuE"]
    if column != "rating":
        known += ["1.5", "-0.5", "1e-3", "9223372036854775808", "-9223372036854775809", "1e19", "4.5e0"]
    excluded = set(table.sep) | {"\n", "\r", '"', "\ufeff"}  # a BOM at the file's start is no text
    alphabet = st.characters(max_codepoint=0xFF if table.encoding == "latin-1" else None,
                             exclude_characters="".join(excluded), exclude_categories=("Cs",))
    random = st.text(alphabet, min_size=1, max_size=8).filter(
        lambda s: not set(s) <= _NUMBER_CHARS or not s.strip(" \t\v\f"))
    known = [k for k in known if not set(k) & excluded and k.encode(table.encoding, errors="ignore").decode(
        table.encoding) == k]
    return st.one_of(st.sampled_from(known), random)


@st.composite
def corrupted_ratings(draw, table: Table):
    """Valid lines with exactly one corrupted; returns (lines, 0-based index of the bad line)."""
    rows = draw(RATING_ROWS)
    index = draw(st.integers(0, len(rows) - 1))
    fields = [str(v) for v in rows[index]]
    kind = draw(st.sampled_from(["field_count", "not_a_number", "empty_field"]))
    if kind == "field_count":
        count = draw(st.integers(0, 7).filter(lambda n: n != 4))
        fields = [str(draw(U31)) for _ in range(count)]
    elif kind == "not_a_number":
        column = draw(st.integers(0, 3))
        fields[column] = draw(_not_a_number(table, FIELD_ORDER[column]))
    else:
        fields[draw(st.integers(0, 3))] = ""
    lines = [table.sep.join(str(v) for v in row) for row in rows]
    lines[index] = table.sep.join(fields)
    return lines, index


@pytest.mark.parametrize("name", TABLE_NAMES)
@fuzz(45)
@given(data=st.data())
def test_read_interactions_names_the_corrupted_line(fuzz_dir, name, data):
    table = RATINGS_TABLES[name]
    lines, index = data.draw(corrupted_ratings(table), label="case")
    newline = data.draw(st.sampled_from(["\n", "\r\n", "\r", NEWLINE[name]]), label="newline")
    assert not _plain_valid(lines[index], table)
    path = _write(fuzz_dir, "ratings", _ratings_bytes(table, lines, newline))
    df, message = _read(path, table)
    bad = index + _first_data_line(table)
    assert df is None, f"accepted a file with a malformed line {bad}: {lines[index]!r}"
    assert _line_numbers(message) == [bad], message


@pytest.mark.parametrize(
    "text, bad",
    [
        ("1\t2\t3\t4\n\n", 2),  # a trailing blank line
        ("\n1\t1\t1\t1\n", 1),  # a leading one
        ("1\t2\t3\t4\n5\t6\t7\n", 2),
        ("1\t2\t3\t4\t5\n6\t7\t8\t9\n", 1),
        ("1\t1\t1\n1\t1\t1\t1\n", 1),  # a short first line
        ("1\t2\t3\t4\t5\n6\t7\t8\t9\t10\n", 1),  # 5 fields on every line
        ("1\t+1\t1\t1\n1\tx\t1\t1\n", 2),  # '+1' is an integer to pandas: not the bad line
        ('"1\n"\t1\t1\t1\n1\t1\t1\t1\nx\t1\t1\t1\n', 1),  # a quote is text in u.data
    ],
)
def test_read_interactions_names_the_corrupted_line_examples(fuzz_dir, text, bad):
    path = _write(fuzz_dir, "u.data", text.encode())
    df, message = _read(path, RATINGS_TABLES["ml-100k"])
    assert df is None and _line_numbers(message) == [bad], message


def _check_outcome(table: Table, text: str, df: pd.DataFrame | None, message: str | None) -> None:
    """A frame: no plainly bad line, one row per data line. An error: the lines it names are not
    plainly valid, and it names one no later than the first plainly bad line."""
    lines = _lines(text)
    first = _first_data_line(table)
    if lines and table.encoding == "utf-8" and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]  # a UTF-8 BOM is not text
    data = lines[first - 1:]
    if df is not None:
        assert not any(_plainly_bad(line, table) for line in data), (text, df)
        assert len(df) == len(data)
        return
    named = _line_numbers(message)
    for n in named:
        assert 1 <= n <= len(lines), message
        assert n < first or not _plain_valid(lines[n - 1], table), (message, lines[n - 1])
    bad = [n for n, line in enumerate(lines, start=1) if n >= first and _plainly_bad(line, table)]
    if bad:
        assert named and min(named) <= bad[0], (message, bad[0])


def _tokens(table: Table) -> st.SearchStrategy[str]:
    """Structured junk: valid and invalid numbers, separators, line ends, whitespace, junk."""
    tokens = ["1", "0", "42", "-7", "3.5", "2147483647", "9223372036854775807", "-9223372036854775808",
              "9223372036854775808", "+3", " 5", "6 ", "", "x", "1.0", "1e3", "nan", "inf", "١", "\x00", "\t",
              "\n", "\n\n", "\r\n", "\r", " ", "#", "\ufeff", "é", ",", "::", ":", "|", "\x0b", "TRUE", "false"]
    if table.encoding == "latin-1":
        tokens = [t for t in tokens if all(ord(c) < 256 for c in t)]
    alphabet = st.characters(max_codepoint=0xFF if table.encoding == "latin-1" else None,
                             exclude_characters='"', exclude_categories=("Cs",))
    return st.one_of(st.sampled_from(tokens), st.just(table.sep), st.text(alphabet, max_size=4))


@pytest.mark.parametrize("name", TABLE_NAMES)
@fuzz(50)
@given(data=st.data())
def test_read_interactions_fuzzed_text(fuzz_dir, name, data):
    """Any text (no quote): a frame of every line, or an error naming the right line."""
    table = RATINGS_TABLES[name]
    parts = data.draw(st.lists(_tokens(table), max_size=40), label="parts")
    text = "".join(parts)
    if table.header:
        text = ",".join(table.columns[c] for c in FIELD_ORDER) + "\r\n" + text
    path = _write(fuzz_dir, "ratings", text.encode(table.encoding))
    df, message = _read(path, table)
    _check_outcome(table, text, df, message)


@pytest.mark.parametrize("name", TABLE_NAMES)
@fuzz(30)
@given(data=st.binary(max_size=200))
@example(data=b"")
@example(data=b"\x00\t\x00\t\x00\t\x00\n")
@example(data=b"\xef\xbb\xbf")
def test_read_interactions_arbitrary_bytes(fuzz_dir, name, data):
    path = _write(fuzz_dir, "ratings", data)
    _read(path, RATINGS_TABLES[name])  # a frame, or a PipelineError naming the file


# What might be a number: pandas' C parser decides, and the error scan must decide the same.
_NUMBERISH = st.lists(st.one_of(
    st.sampled_from(list("0123456789.eE+- \t\v\f")),
    st.sampled_from(["inf", "-inf", "Infinity", "nan", "9223372036854775807", "9223372036854775808",
                     "1e400", "e", "00", "\xa0", "٣"]),
), min_size=1, max_size=8).map("".join)


@pytest.mark.parametrize("name", TABLE_NAMES)
@fuzz(50)
@given(token=_NUMBERISH, column=st.sampled_from(FIELD_ORDER))
@example(token="4.0", column="user_id")
@example(token="1e3", column="timestamp")
@example(token=" +7 ", column="movie_id")
@example(token="inf", column="rating")
@example(token="1e400", column="rating")
@example(token="9223372036854775808", column="timestamp")
@example(token="1_000", column="timestamp")
@example(token="+5e 5", column="timestamp")  # pandas: 500000 (only after a '+')
@example(token="5e 5", column="timestamp")
@example(token="TRUE", column="user_id")  # pandas reads a column of true/false words as 1/0
@example(token="fAlSe", column="rating")
def test_read_interactions_scan_agrees_with_the_c_pass(fuzz_dir, name, token, column):
    """A line is named as bad exactly when it fails on its own (else a later bad line is named)."""
    table = RATINGS_TABLES[name]
    token = token.encode(table.encoding, errors="replace").decode(table.encoding)  # '٣' is '?' in latin-1
    if table.sep == "\t":
        token = token.replace("\t", " ")
    fields = ["1", "2", "3", "4"]
    fields[FIELD_ORDER.index(column)] = token
    line = table.sep.join(fields)
    alone, alone_message = _read(_write(fuzz_dir, "ratings", _ratings_bytes(table, [line], "\n")), table)
    path = _write(fuzz_dir, "ratings", _ratings_bytes(table, [line, "x" + table.sep.join(fields[1:])], "\n"))
    _, message = _read(path, table)
    first = _first_data_line(table)
    if alone is None:
        assert _line_numbers(alone_message) == [first], alone_message
        assert _line_numbers(message) == [first], (alone_message, message)
    else:
        assert _line_numbers(message) == [first + 1], message
        if column != "rating" and _PLAIN_INT.fullmatch(token.strip(" \t\v\f").lstrip("+")):
            assert alone[column].tolist() == [int(token)]


# --- read_titles ----------------------------------------------------------------------------------

TITLE_TABLES = {name: DATASETS[name].titles_table for name in ("ml-100k", "ml-1m", "ml-latest-small")}
U_ITEM = TITLE_TABLES["ml-100k"]


def _read_titles(path: Path, table: Table = U_ITEM) -> tuple[pd.DataFrame | None, str | None]:
    try:
        df = read_titles(path, table)
    except PipelineError as err:
        message = str(err)
        assert message.startswith(str(path)), message
        return None, message
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["movie_id", "title"]
    assert df["movie_id"].dtype == np.int64
    assert all(isinstance(t, str) for t in df["title"]), df["title"]
    return df, None


def _title_text(table: Table, exclude: str = "") -> st.SearchStrategy[str]:
    return st.text(st.characters(max_codepoint=0xFF if table.encoding == "latin-1" else None,
                                 exclude_characters=exclude, exclude_categories=("Cs",)), max_size=20)


def _movie_list(table: Table, rows: list[tuple[int, str, list[str]]], blank_after: set[int]) -> bytes:
    """A movie list in the table's format; blank lines after the rows in blank_after."""
    out = io.StringIO()
    if table.sep == ",":
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["movieId", "title", "genres"])
        for i, (mid, title, rest) in enumerate(rows):
            writer.writerow([mid, title, *rest])
            out.write("\r\n" if i in blank_after else "")
    else:
        for i, (mid, title, rest) in enumerate(rows):
            out.write(table.sep.join([str(mid), title, *rest]) + "\n" + ("\n" if i in blank_after else ""))
    return out.getvalue().encode(table.encoding)


@pytest.mark.parametrize("name", sorted(TITLE_TABLES))
@fuzz(25)
@given(data=st.data())
def test_read_titles_round_trips(fuzz_dir, name, data):
    table = TITLE_TABLES[name]
    exclude = {"ml-100k": "|\n\r", "ml-1m": ":\n\r", "ml-latest-small": ""}[name]
    rest = st.lists(_title_text(table, exclude).map(lambda s: s[:6]), max_size=3)
    rows = data.draw(st.lists(st.tuples(INT64, _title_text(table, exclude), rest), min_size=1, max_size=12),
                     label="rows")
    blank_after = set(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=3), label="blank_after"))
    _assert_round_trip(fuzz_dir, table, rows, blank_after)


def test_read_titles_round_trips_u_item_example(fuzz_dir):
    rows = [(1, "Misérables, Les (1995)", ["01-Jan-1995", "", "http://x"]), (2, "NA", []), (3, "", []),
            (4, '"Bad" Boys', ["x", "y", "z", "w"]), (5, "nan", ["1"])]
    _assert_round_trip(fuzz_dir, U_ITEM, rows, {0, 2})


def _assert_round_trip(fuzz_dir: Path, table: Table, rows: list, blank_after: set[int]) -> None:
    path = _write(fuzz_dir, "movies", _movie_list(table, rows, blank_after))
    df, message = _read_titles(path, table)
    assert message is None, message
    assert df["movie_id"].tolist() == [mid for mid, _, _ in rows]
    assert df["title"].tolist() == [title for _, title, _ in rows]


_NOT_AN_ID = st.one_of(
    st.sampled_from(["x", "", " ", "1.5", "1e3", "4.0", "nan", "inf", "99999999999999999999", "-9223372036854775809",
                     "²", "1_000", "0x10", "\x00", "#"]),
    st.text(st.characters(max_codepoint=0xFF, exclude_characters="|\n\r"), min_size=1, max_size=6).filter(
        lambda s: not re.fullmatch(r"[ \t\v\f]*[+-]?[0-9]+[ \t\v\f]*", s)),
)


@fuzz(40)
@given(rows=st.lists(st.tuples(U31, _title_text(U_ITEM, "|\n\r")), min_size=1, max_size=12), data=st.data())
def test_read_titles_names_a_bad_movie_id(fuzz_dir, rows, data):
    index = data.draw(st.integers(0, len(rows) - 1), label="index")
    blank_after = set(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=3), label="blank_after"))
    bad_id = data.draw(_NOT_AN_ID, label="bad_id")
    lines = []
    for i, (mid, title) in enumerate(rows):
        lines.append(f"{bad_id if i == index else mid}|{title}|x")
        if i == index:
            bad = len(lines)
        if i in blank_after:
            lines.append("")
    path = _write(fuzz_dir, "u.item", "".join(line + "\n" for line in lines).encode("latin-1"))
    df, message = _read_titles(path)
    assert df is None, lines
    assert _line_numbers(message) == [bad], message


@pytest.mark.parametrize("name", sorted(TITLE_TABLES))
@fuzz(25)
@given(data=st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(["1", "|", "::", ",", "\n", "x", "é", "\xff", "-2", "1.5", "", '"', "\r", " ",
                              "movieId,title\n"]),
             max_size=30).map(lambda parts: "".join(parts).encode("latin-1")),
))
def test_read_titles_arbitrary_bytes(fuzz_dir, name, data):
    path = _write(fuzz_dir, "movies", data)
    _read_titles(path, TITLE_TABLES[name])


# --- params.validate ------------------------------------------------------------------------------

SOURCE = "fuzz-dir/params-under-test.yaml"
BASE = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
NUMERIC_KINDS = {"int", "float", "int_list"}
OTHER_KINDS = {"choice", "model", "model_list", "bool", "str", "column"}
Path_ = tuple[str, ...]  # a key, or a section and its key: ("dataset",), ("gmf", "lr")
CORE_MODELS = tuple(m for m in list_models() if get_model(m).always_trained)  # itempop, mlp
# Which models each list may name: `models` those trained from the data alone, `fused` the fused ones.
LIST_MODELS = {"models": tuple(m for m in list_models() if not get_model(m).always_trained
                               and not get_model(m).fused_from),
               "fused": tuple(m for m in list_models() if get_model(m).fused_from)}


def _all_specs() -> dict[str, Spec]:
    """Every top-level key of params.yaml: SPECS, the MLP's knobs, one section per other model with knobs."""
    specs = dict(SPECS)
    for name in list_models():
        cls = get_model(name)
        if cls.top_level:
            specs.update(cls.params)
        elif cls.params:
            specs[name] = Spec("section", fields=dict(cls.params))
    return specs


ALL_SPECS = _all_specs()


def _paths(specs: dict[str, Spec], prefix: Path_ = ()) -> dict[Path_, Spec]:
    """Every key of ALL_SPECS and of its sections (so keys and sections added later are covered)."""
    out = {}
    for key, spec in specs.items():
        out[prefix + (key,)] = spec
        if spec.kind == "section":
            out.update(_paths(spec.fields, prefix + (key,)))
    return out


PATHS = _paths(ALL_SPECS)
ALL_PATHS = sorted(PATHS)
NUMERIC_PATHS = sorted(p for p, s in PATHS.items() if s.kind in NUMERIC_KINDS)
OTHER_PATHS = sorted(p for p, s in PATHS.items() if s.kind in OTHER_KINDS)
SECTION_PATHS = sorted(p for p, s in PATHS.items() if s.kind == "section")


def _name(path: Path_) -> str:
    return ".".join(path)  # as messages name it: 'gmf.lr'


def test_every_kind_is_known():
    # a new kind needs its own oracle in _assert_valid_value and strategies below
    assert {s.kind for s in PATHS.values()} <= NUMERIC_KINDS | OTHER_KINDS | {"section"}


def _int_bounds(spec: Spec) -> tuple[int, int]:
    low = math.floor(spec.low) + 1 if spec.low_open else math.ceil(spec.low)
    high = math.ceil(spec.high) - 1 if spec.high_open else math.floor(spec.high)
    return low, high


def _in_range(spec: Spec, x: float) -> bool:
    above = x > spec.low if spec.low_open else x >= spec.low
    below = x < spec.high if spec.high_open else x <= spec.high
    return above and below


def _get(params: Any, path: Path_) -> Any:
    for key in path:
        params = params[key]
    return params


def _with(path: Path_, value: Any, base: dict | None = None) -> dict:
    raw = copy.deepcopy(BASE if base is None else base)
    _get(raw, path[:-1])[path[-1]] = value
    return raw


def _leaf(name: str) -> Path_:
    """The first path ending in `name` (where params.yaml keeps, say, 'lr' may move)."""
    return next(p for p in ALL_PATHS if p[-1] == name and PATHS[p].kind in NUMERIC_KINDS)


def _validate(raw: Any) -> tuple[dict | None, str | None]:
    try:
        return validate(raw, SOURCE), None
    except PipelineError as err:
        assert SOURCE in str(err), str(err)
        return None, str(err)


def _assert_names_key(message: str, key: str) -> None:
    assert SOURCE in message, message
    if re.search(rf"'{re.escape(key)}[.']", message):  # the key, or a key of its section
        return
    # A cross-key rule checked on another key (e.g. topK <= test_negatives + 1 when test_negatives
    # changes): the message quotes the key it checks and states the rule with this key's name.
    others = [q for q in re.findall(r"'([^']*)'", message) if q.split(".")[0] in ALL_SPECS and q != key]
    assert others and re.search(rf"\b{re.escape(key.split('.')[-1])}\b", message), (key, message)


def _assert_valid_value(spec: Spec, value: Any, given: Any) -> None:
    """`value` is what validate made of `given`: of the spec's kind and range."""
    if spec.kind == "int":
        assert type(value) is int and _in_range(spec, value)
    elif spec.kind == "float":
        assert type(value) is float and math.isfinite(value) and _in_range(spec, value)
    elif spec.kind == "int_list":
        assert type(value) is list and value
        assert all(type(v) is int and _in_range(spec, v) for v in value)
    elif spec.kind == "choice":
        assert type(value) is str and value in spec.choices and value == given
    elif spec.kind == "model":
        assert type(value) is str and value in list_models() and value == given
    elif spec.kind == "model_list":
        assert type(value) is list and len(set(value)) == len(value)
        assert all(type(v) is str and v in list_models() and not get_model(v).always_trained for v in value)
        given = yaml.safe_load(given) if isinstance(given, str) else given
        assert value == ([] if given is None else given)
    elif spec.kind == "bool":
        assert type(value) is bool
        assert value is given or (type(given) is str and given.strip().lower() == str(value).lower())
    elif spec.kind == "str":
        assert type(value) is str and value.strip() and value == given
    elif spec.kind == "column":
        assert value == given and type(value) is type(given)
        assert (type(value) is int and value >= 0) or (type(value) is str and (value != "" or spec.optional))
    elif spec.kind == "section":
        given = {} if given is None else given
        assert type(value) is dict and set(value) == set(spec.fields) == set(given), (value, given)
        for key, sub in spec.fields.items():
            _assert_valid_value(sub, value[key], given[key])
    else:
        raise AssertionError(f"no oracle for kind {spec.kind!r}")


_BOUNDARY_INTS = sorted({int(b) + d for s in PATHS.values() if s.kind in NUMERIC_KINDS
                         for b in (s.low, s.high) for d in (-1, 0, 1)})
_CHOICES = sorted({c for s in PATHS.values() for c in s.choices} | set(list_models()))
_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([10**400, -(10**400)]),  # beyond the float range
    st.sampled_from(_BOUNDARY_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e-05", " 0.5 ", "0", "1", "-1", "nan", "inf", "-inf", "1e400", "[8, 4]", "[128,64,32]",
                     "[]", "[7, 4]", "[2, 'x']", "[2, 1.5]", "yes", "null", "~", "{a: 1}", "[0x10]", "1_000",
                     "٣", "4294967296", "100001", "0.99999", "True", "- 2\n- 4", "&a [*a]", "[1, 2", "\x00",
                     "2001-13-01", "!!float x", "[2, !!timestamp x]", "[" * 300]),
    st.sampled_from([str(b) for b in _BOUNDARY_INTS]),
    st.sampled_from(_CHOICES),
    st.sampled_from(["true", "false", " TRUE ", "False", "no", "auto ", "CPU", "ml-100K", "\\t", "userId", " ",
                     f"[{', '.join(_CHOICES[:2])}]", f"[{_CHOICES[0]}, {_CHOICES[0]}]"]),
)
ANY_VALUE = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)


def test_base_params_are_valid():
    params, message = _validate(copy.deepcopy(BASE))
    assert message is None, message
    assert set(params) == set(ALL_SPECS) == set(BASE)
    for path, spec in PATHS.items():
        _assert_valid_value(spec, _get(params, path), _get(BASE, path))


@functools.cache
def _base_params() -> dict:
    params, message = _validate(copy.deepcopy(BASE))
    assert message is None, message
    return params


def _assert_only_changed(params: dict, path: Path_) -> None:
    assert params == _with(path, _get(params, path), _base_params())


@fuzz(200)
@given(path=st.sampled_from(ALL_PATHS), value=ANY_VALUE)
@example(path=("test_negatives",), value=1)  # fires the topK cross-key rule
@example(path=("topK",), value=102)
@example(path=_leaf("layers"), value=[7, 4])  # fires the even-first-entry rule
@example(path=_leaf("lr"), value=10**400)
@example(path=_leaf("layers"), value="[2, !!timestamp x]")
@example(path=("custom_header",), value=1)
@example(path=("custom_user",), value=True)
@example(path=("custom_time",), value=-1)
@example(path=("custom_user",), value="")
@example(path=("custom_path",), value=" ")
@example(path=("device",), value=["cpu"])
@example(path=("models",), value=[])  # fires the rule that fused neumf needs gmf
@example(path=("models",), value=["gmf"])  # fires the rule that recommend_model is trained
@example(path=("models",), value=["mlp", "gmf"])  # a model that always trains
@example(path=("fused",), value=None)
def test_validate_any_value_for_one_key(path, value):
    spec = PATHS[path]
    params, message = _validate(_with(path, value))
    if message is not None:
        _assert_names_key(message, _name(path))
        return
    assert set(params) == set(ALL_SPECS)
    _assert_valid_value(spec, _get(params, path), value)
    _assert_only_changed(params, path)


@st.composite
def in_range_value(draw, spec: Spec):
    if spec.kind in ("int", "int_list"):
        low, high = _int_bounds(spec)
        one = st.one_of(st.integers(low, high), st.sampled_from([low, high]))
        return draw(one) if spec.kind == "int" else draw(st.lists(one, min_size=1, max_size=5))
    floats = st.floats(spec.low, spec.high, exclude_min=spec.low_open, exclude_max=spec.high_open)
    ends = [x for x in (spec.low, spec.high, 1e-05, 0.5) if _in_range(spec, x)]
    return draw(st.one_of(floats, st.sampled_from(ends))) if ends else draw(floats)


def _as_strings(spec: Spec, value: Any) -> list[Any]:
    """The forms a number takes when DVC or a person writes it and PyYAML reads a string."""
    if spec.kind == "int_list":
        return [str(value), "[" + ",".join(map(str, value)) + "]", [str(v) for v in value],
                [f" {v} " for v in value], yaml.safe_dump(value, default_flow_style=True).strip(),
                yaml.safe_dump(value, default_flow_style=False)]
    return [str(value), repr(value), f" {value!r} ", f"{value!r}\n"]


@fuzz(120)
@given(data=st.data(), path=st.sampled_from(NUMERIC_PATHS))
def test_validate_numbers_written_as_strings(data, path):
    spec = PATHS[path]
    value = data.draw(in_range_value(spec), label="value")
    expected, expected_message = _validate(_with(path, value))
    if expected_message is not None:
        # In range, so only a cross-key rule may reject it, never the range check of `path`.
        assert spec.describe() not in expected_message, expected_message
        _assert_names_key(expected_message, _name(path))
    else:
        converted = _get(expected, path)
        if spec.kind == "float":
            assert type(converted) is float and converted == value
        else:
            assert converted == value
    for written in _as_strings(spec, value):
        params, message = _validate(_with(path, written))
        if expected_message is None:
            assert message is None, (written, message)
            assert params == expected, written
            assert type(_get(params, path)) is type(_get(expected, path))
        else:
            assert message is not None, written
            assert spec.describe() not in message, message


@st.composite
def out_of_range_value(draw, spec: Spec):
    if spec.kind in ("int", "int_list"):
        low, high = _int_bounds(spec)
        bad = draw(st.one_of(st.integers(low - 2**40, low - 1), st.integers(high + 1, high + 2**40),
                             st.sampled_from([low - 1, high + 1])))
        if spec.kind == "int":
            return bad
        items = draw(st.lists(st.integers(low, high), max_size=3))
        return items[:1] + [bad] + items[1:]  # not first: exercise the per-item check
    below = [spec.low] if spec.low_open else []
    above = [spec.high] if spec.high_open else []
    return draw(st.one_of(
        st.floats(max_value=spec.low, exclude_max=not spec.low_open, allow_nan=False),
        st.floats(min_value=spec.high, exclude_min=not spec.high_open, allow_nan=False),
        st.sampled_from(below + above + [math.nextafter(spec.low, -math.inf), math.nextafter(spec.high, math.inf)]),
    ))


@fuzz(100)
@given(data=st.data(), path=st.sampled_from(NUMERIC_PATHS), as_string=st.booleans())
def test_validate_rejects_out_of_range(data, path, as_string):
    spec = PATHS[path]
    value = data.draw(out_of_range_value(spec), label="value")
    written = (str(value) if not isinstance(value, float) else repr(value)) if as_string else value
    params, message = _validate(_with(path, written))
    assert message is not None, (path, written, params and _get(params, path))
    assert f"'{_name(path)}' must be {spec.describe()}" in message, message


def _valid_other(spec: Spec, path: Path_) -> st.SearchStrategy[Any]:
    """Valid values of the non-numeric kinds, in the forms YAML and DVC give them."""
    if spec.kind == "choice":
        return st.sampled_from(spec.choices)
    if spec.kind == "model":
        return st.sampled_from(list_models())
    if spec.kind == "model_list":
        lists = st.lists(st.sampled_from(LIST_MODELS[_name(path)]), unique=True)
        none = [st.none(), st.just("[]")]  # `models: []`, or nothing after `models:`
        return st.one_of(lists, lists.map(lambda v: "[" + ", ".join(v) + "]"), *none)  # as `-S models=[a,b]` writes it
    if spec.kind == "bool":
        return st.one_of(st.booleans(), st.sampled_from(["true", "false", "True", "FALSE", " true "]))
    if spec.kind == "str":
        return st.text(max_size=20).filter(str.strip)
    assert spec.kind == "column", spec.kind
    names = st.text(max_size=12).filter(lambda s: s != "" or spec.optional)
    return st.one_of(st.integers(0, 2**40), st.sampled_from([0, 1, "userId", "user id"]), names)


def _wrong_other(spec: Spec, path: Path_) -> st.SearchStrategy[Any]:
    """Values of a wrong type (or outside the choices) for the non-numeric kinds."""
    containers = st.one_of(st.lists(_valid_other(spec, path), min_size=1, max_size=2),
                           st.dictionaries(st.text(max_size=3), _valid_other(spec, path), min_size=1, max_size=2))
    common = st.one_of(st.none(), st.floats(), containers)
    if spec.kind in ("choice", "model"):
        choices = spec.choices if spec.kind == "choice" else tuple(list_models())
        near = [c.upper() for c in choices] + [f" {c}" for c in choices]
        return st.one_of(common, st.booleans(), st.integers(),
                         st.text(max_size=8).filter(lambda s: s not in choices),
                         st.sampled_from([c for c in near if c not in choices]))
    if spec.kind == "model_list":
        names = st.sampled_from(LIST_MODELS[_name(path)])
        models = list_models()
        return st.one_of(st.floats(), st.booleans(), st.integers(),
                         names,  # one name, not a list of one
                         st.lists(names, min_size=1, max_size=3).map(lambda v: v + v[:1]),  # a repeat
                         st.lists(st.one_of(names, st.text(max_size=5).filter(lambda s: s not in models),
                                            st.integers(), st.none()), min_size=1, max_size=3).filter(
                             lambda v: any(x not in models for x in v)),
                         st.dictionaries(names, names, min_size=1, max_size=2))
    if spec.kind == "bool":
        return st.one_of(common, st.integers(), st.sampled_from(["yes", "no", "on", "1", "0", "", "truex"]),
                         st.text(max_size=6).filter(lambda s: s.strip().lower() not in ("true", "false")))
    if spec.kind == "str":
        return st.one_of(common, st.booleans(), st.integers(), st.text(" \t\n", max_size=3))
    assert spec.kind == "column", spec.kind
    return st.one_of(common, st.booleans(), st.integers(max_value=-1),
                     st.nothing() if spec.optional else st.just(""))


@fuzz(60)
@given(data=st.data(), path=st.sampled_from(OTHER_PATHS))
def test_validate_other_kinds_round_trip(data, path):
    spec = PATHS[path]
    value = data.draw(_valid_other(spec, path), label="value")
    params, message = _validate(_with(path, value))
    if message is not None:  # only a cross-key rule may reject a valid value
        assert spec.describe() not in message, message
        _assert_names_key(message, _name(path))
        return
    _assert_valid_value(spec, _get(params, path), value)
    if spec.kind in ("choice", "model", "str", "column") or (spec.kind == "model_list" and isinstance(value, list)):
        assert _get(params, path) == value
    _assert_only_changed(params, path)
    # written to params.yaml (as `dvc exp run -S` or a person does) and read back
    assert _validate(_with(path, yaml.safe_load(yaml.safe_dump(value)))) == (params, None)


@fuzz(80)
@given(data=st.data(), path=st.sampled_from(OTHER_PATHS))
def test_validate_other_kinds_reject_wrong_types(data, path):
    spec = PATHS[path]
    value = data.draw(_wrong_other(spec, path), label="value")
    _assert_rejected_as_wrong(path, value)


@pytest.mark.parametrize("path, value", [(("models",), ["gmf", "mlp"]), (("fused",), ["itempop"]),
                                         (("models",), "[mlp]"), (("models",), ["mlp", 3])])
def test_validate_rejects_a_model_that_always_trains_in_the_lists(path, value):
    _assert_rejected_as_wrong(path, value)


def _model_names(value: Any) -> list | None:
    """The list of distinct model names that a `models` or `fused` value is, or None if it is none."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except Exception:  # noqa: BLE001
            return None
    value = [] if value is None else value
    if isinstance(value, list) and len(set(map(str, value))) == len(value) and all(v in list_models() for v in value):
        return value
    return None


def _assert_rejected_as_wrong(path: Path_, value: Any) -> None:
    spec = PATHS[path]
    params, message = _validate(_with(path, value))
    assert message is not None, (path, value, params and _get(params, path))
    names = _model_names(value) if spec.kind == "model_list" else None
    wrong = sorted(m for m in names or [] if m not in LIST_MODELS[_name(path)])
    if wrong:  # real model names, in the wrong list: the message names the first (models are checked by name)
        assert f"'{_name(path)}' lists {wrong[0]!r}" in message, message
        if wrong[0] in CORE_MODELS:  # a model that always trains: the message says so, naming its stage
            assert f"train_{wrong[0]}" in message, message
        else:
            assert "belongs in" in message, message
        return
    assert f"'{_name(path)}' must be {spec.describe()}" in message, message


_NOT_A_KEY = st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False))


@fuzz(60)
@given(section=st.sampled_from([()] + SECTION_PATHS), key=_NOT_A_KEY, value=ANY_VALUE)
@example(section=(), key="Lr", value=0.1)
@example(section=(), key="lr ", value=0.1)
@example(section=(), key="mlp", value={"lr": 0.1})  # the MLP's old section: its knobs are top-level keys now
@example(section=(), key="itempop", value={})
@example(section=("neumf",), key="layers", value=[16, 8])  # NeuMF's old fields
@example(section=_leaf("lr")[:-1], key="LR", value=0.1)
def test_validate_names_unknown_keys(section, key, value):
    keys = ALL_SPECS if not section else PATHS[section].fields
    if key in keys:
        return
    params, message = _validate(_with(section + (key,), value))
    assert message is not None and "unknown" in message, message
    assert repr(".".join(map(str, section + (key,)))) in message, message


@fuzz(50)
@given(path=st.sampled_from(ALL_PATHS))
def test_validate_names_missing_keys(path):
    raw = copy.deepcopy(BASE)
    del _get(raw, path[:-1])[path[-1]]
    params, message = _validate(raw)
    assert message is not None and "missing" in message and repr(_name(path)) in message, message


@fuzz(50)
@given(raw=ANY_VALUE.filter(lambda v: not isinstance(v, dict)))
def test_validate_rejects_non_mappings(raw):
    params, message = _validate(raw)
    assert message is not None and SOURCE in message


# --- sampling -------------------------------------------------------------------------------------

@fuzz(60)
@given(k=st.integers(0, 8), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_distinct_ranks_sorted_distinct_in_range(k, seed, data):
    sizes = data.draw(st.lists(st.integers(k, 4 * k + 6), max_size=10), label="sizes")
    out = distinct_ranks(np.random.default_rng(seed), np.array(sizes, dtype=np.int64), k)
    assert out.shape == (len(sizes), k) and out.dtype == np.int64
    for row, size in zip(out, sizes):
        assert np.all(np.diff(row) > 0), row
        assert np.all((row >= 0) & (row < size)), (row, size)


@st.composite
def excluded_matrices(draw):
    """A small binary CSR with unsorted indices and duplicate entries, and its complement lists."""
    n_users, n_items = draw(st.integers(1, 6)), draw(st.integers(1, 10))
    rows = [draw(st.lists(st.integers(0, n_items - 1), max_size=n_items + 3)) for _ in range(n_users)]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([i for r in rows for i in r], dtype=np.int32)
    matrix = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_users, n_items))
    complements = [sorted(set(range(n_items)) - set(r)) for r in rows]
    return matrix, complements


@fuzz(60)
@given(case=excluded_matrices(), seed=st.integers(0, 2**32 - 1), per_user=st.integers(1, 4), data=st.data())
def test_complement_sampler_never_returns_an_excluded_item(case, seed, per_user, data):
    matrix, complements = case
    sampler = ComplementSampler(matrix)
    assert sampler.allowed.tolist() == [len(c) for c in complements]
    for user, allowed in enumerate(complements):
        if allowed:
            ranks = np.arange(len(allowed))
            assert sampler.rank_to_item(np.full(len(ranks), user), ranks).tolist() == allowed
    users = np.array([u for u, c in enumerate(complements) if c], dtype=np.int64)
    if len(users) == 0:
        return
    rng = np.random.default_rng(seed)
    drawn = sampler.sample(rng, users, per_user)
    assert drawn.shape == (len(users), per_user)
    for user, items in zip(users, drawn):
        assert set(items.tolist()) <= set(complements[user])
    k = data.draw(st.integers(0, min(len(complements[u]) for u in users)), label="k")
    distinct = sampler.sample_distinct(rng, users, k)
    assert distinct.shape == (len(users), k)
    for user, items in zip(users, distinct):
        assert np.all(np.diff(items) > 0) and set(items.tolist()) <= set(complements[user])


# --- regressions: bugs earlier versions of this file pinned, with their minimal inputs -----------

def _ratings_error(tmp_path: Path, data: bytes) -> str:
    path = _write(tmp_path, "u.data", data)
    with pytest.raises(PipelineError) as info:
        read_interactions(path, DATASETS["ml-100k"].ratings_table)  # how build_matrix reads a u.data
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message[len(str(path)):]


def test_ratings_non_utf8_byte_is_named(tmp_path):
    # was: UnicodeDecodeError escaped
    assert _ratings_error(tmp_path, b"1\t1\t1\t\xff\n") == ", line 1: not valid utf-8 text (byte 0xff)"


def test_ratings_int64_overflow_is_named(tmp_path):
    # was: OverflowError escaped
    message = _ratings_error(tmp_path, b"1\t1\t1\t9223372036854775808\n")
    assert message == ", line 1: timestamp must be an integer, got '9223372036854775808'"


def test_ratings_short_first_line_is_named(tmp_path):
    # was: reported by pandas as 'Expected 3 fields in line 2'
    assert _line_numbers(_ratings_error(tmp_path, b"1\t1\t1\n1\t1\t1\t1\n")) == [1]


def test_ratings_leading_blank_line_is_named(tmp_path):
    # was: reported as 'the file is empty'
    assert _ratings_error(tmp_path, b"\n1\t1\t1\t1\n") == ", line 1: empty line"


def test_ratings_plus_sign_is_not_blamed(tmp_path):
    # was: '+1' accepted as an integer, yet named as the bad line when another line was malformed
    assert _line_numbers(_ratings_error(tmp_path, b"1\t+1\t1\t1\n1\tx\t1\t1\n")) == [2]


def test_ratings_quote_is_text(tmp_path):
    # was: double quotes parsed as CSV quoting, so a quoted newline shifted the line numbers
    assert _line_numbers(_ratings_error(tmp_path, b'"1\n"\t1\t1\t1\n1\t1\t1\t1\nx\t1\t1\t1\n')) == [1]


def test_titles_id_overflow_is_named(tmp_path):
    # was: OverflowError escaped (and later, a silent -2**63)
    path = _write(tmp_path, "u.item", b"99999999999999999999|a\n")
    with pytest.raises(PipelineError, match=re.escape(f"{path}, line 1: movie id must be an integer")):
        read_titles(path, U_ITEM)


def test_titles_leading_quote_is_text(tmp_path):
    # was: '"Bad" Boys' read as 'Bad Boys'
    path = _write(tmp_path, "u.item", '1|"Bad" Boys\n'.encode("latin-1"))
    assert read_titles(path, U_ITEM)["title"].tolist() == ['"Bad" Boys']


def test_params_int_beyond_float_range_is_rejected():
    # was: math.isfinite(int) raised OverflowError
    path = _leaf("lr")
    with pytest.raises(PipelineError, match=re.escape(f"'{_name(path)}' must be")):
        validate(_with(path, 10**400), SOURCE)


@pytest.mark.parametrize("text", ["2001-13-01", "!!float x", "[2, !!timestamp x]", "[" * 1000])
def test_params_layers_string_yaml_cannot_read_is_rejected(text):
    # was: yaml.safe_load raised ValueError/AttributeError/RecursionError, and only YAMLError was caught
    path = _leaf("layers")
    with pytest.raises(PipelineError, match=re.escape(f"'{_name(path)}' must be")):
        validate(_with(path, text), SOURCE)
