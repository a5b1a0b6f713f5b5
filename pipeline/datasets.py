"""The datasets the `dataset` param can name, and fast, strict readers for their files.

A MovieLens release is a zip on files.grouplens.org; we use its ratings file and its movie list.
Each is checked against a published SHA-256 where one exists (so a mirror's repack of the same
files passes), otherwise the whole archive against GroupLens's published md5. `custom` reads a
user's own table; `synthetic-*` are generated (pipeline.synthetic).

Interactions are parsed with pandas' C engine straight into typed columns. Only when that fails
does a line-by-line scan run, to name the first bad line; so a good file costs one C pass. Movie
lists are small and read line by line.
"""
from __future__ import annotations

import codecs
import csv
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.common import PipelineError

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
SOURCE_FILE = "source.json"  # in data/raw: {"dataset": ..., "ratings": file name, "titles": file name or null}


@dataclass(frozen=True)
class Table:
    """How to read one delimited text file. Columns are 0-based positions or header names."""

    sep: str
    header: bool
    columns: dict[str, int | str]  # our name ("user_id", "movie_id", "timestamp", "rating", "title")
    encoding: str = "utf-8"
    fields: int | None = None  # fields per line, if fixed by the format (else: the first line's count)


@dataclass(frozen=True)
class Dataset:
    """One named dataset: where its archive is, which members we use, how to check and read them."""

    name: str
    archive: str | None = None  # zip file name on GroupLens and in MOVIELENS_MIRROR
    md5: str | None = None  # GroupLens's published md5 of the archive
    ratings: str = ""  # member path of the ratings file inside the archive
    titles: str = ""  # member path of the movie list
    sha256: dict[str, str] = field(default_factory=dict)  # member -> published SHA-256
    ratings_table: Table | None = None
    titles_table: Table | None = None

    @property
    def url(self) -> str:
        return f"{GROUPLENS}/{self.archive}"


_CSV_RATINGS = Table(",", True, {"user_id": "userId", "movie_id": "movieId", "rating": "rating",
                                 "timestamp": "timestamp"})
_CSV_TITLES = Table(",", True, {"movie_id": "movieId", "title": "title"})

DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset(
        "ml-100k", "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "ml-100k/u.data", "ml-100k/u.item",
        {"ml-100k/u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
         "ml-100k/u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"},
        Table("\t", False, {"user_id": 0, "movie_id": 1, "rating": 2, "timestamp": 3}, fields=4),
        Table("|", False, {"movie_id": 0, "title": 1}, "latin-1"),
    ),
    Dataset(
        "ml-1m", "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ml-1m/ratings.dat", "ml-1m/movies.dat",
        {"ml-1m/ratings.dat": "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
         "ml-1m/movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9"},
        Table("::", False, {"user_id": 0, "movie_id": 1, "rating": 2, "timestamp": 3}, "latin-1", 4),
        Table("::", False, {"movie_id": 0, "title": 1}, "latin-1"),
    ),
    Dataset("ml-20m", "ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ml-20m/ratings.csv",
            "ml-20m/movies.csv", {}, _CSV_RATINGS, _CSV_TITLES),
    Dataset("ml-25m", "ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ml-25m/ratings.csv",
            "ml-25m/movies.csv", {}, _CSV_RATINGS, _CSV_TITLES),
    Dataset(
        "ml-latest-small", "ml-latest-small.zip", None, "ml-latest-small/ratings.csv",
        "ml-latest-small/movies.csv",
        {"ml-latest-small/ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
         "ml-latest-small/movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07"},
        _CSV_RATINGS, _CSV_TITLES,
    ),
    Dataset("custom"),
    Dataset("synthetic-1m"),
    Dataset("synthetic-20m"),
]}

INT_COLUMNS = ("user_id", "movie_id", "timestamp")

# What pandas' C parser takes as a number: ASCII digits, optional sign, ASCII whitespace around.
# The line-by-line scan below must accept exactly what the C pass accepts, or it blames a good line.
_WS = "[ \t\n\v\f\r]*"
_INT_TEXT = re.compile(f"{_WS}[+-]?[0-9]+{_WS}")
_MANTISSA = "(?:[0-9]+[.]?[0-9]*|[.][0-9]+)"
# (After a '+' sign it also takes blanks between the 'e' and the exponent: '+5e 5' is 500000.)
_FLOAT_TEXT = re.compile(f"{_WS}(?:[+-]?{_MANTISSA}(?:[eE][+-]?[0-9]+)?|[+]{_MANTISSA}[eE][ \t\v\f]*[+-]?[0-9]+){_WS}")
_EXPONENT_BLANKS = re.compile("(?<=[eE])[ \t\v\f]+")
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte the encoding cannot decode, as errors="surrogateescape" reads it
_INT64 = (-(2**63), 2**63)
# A column of only these words the C pass reads as booleans, which cast "safely" to 1 and 0 (or
# 1.0 and 0.0); read as NA instead, they fail the column like any other word.
_BOOL_WORDS = sorted({"".join(chars) for word in ("true", "false")
                      for chars in itertools.product(*((c, c.upper()) for c in word))})


class _LineError(Exception):
    """A malformed line found by a line-by-line scan; str(err) is 'line N: what is wrong'."""


def _is_int64(text: str) -> bool:
    """True if the C pass reads `text` as an int64 (it also takes an integral number like '4.0' or '1e3')."""
    if text.isascii() and text.isdigit() and len(text) < 19:  # the common case, fast
        return True
    if _INT_TEXT.fullmatch(text):
        return _INT64[0] <= int(text) < _INT64[1]
    if _FLOAT_TEXT.fullmatch(text):
        value = float(_EXPONENT_BLANKS.sub("", text))
        return value.is_integer() and _INT64[0] <= value < _INT64[1]
    return False


def _is_finite_number(text: str) -> bool:
    if text.isascii() and text.replace(".", "", 1).isdigit() and len(text) < 300:  # the common case, fast
        return True
    return bool(_FLOAT_TEXT.fullmatch(text)) and math.isfinite(float(_EXPONENT_BLANKS.sub("", text)))


def _records(path: Path, table: Table) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) per record, as pandas splits the file: lines end at \\n, \\r\\n or
    a lone \\r; a ',' table follows CSV quoting (a record's number is that of its first line); an
    empty line gives []; a UTF-8 BOM is dropped; an undecodable byte reads as a lone surrogate."""
    encoding = "utf-8-sig" if codecs.lookup(table.encoding).name == "utf-8" else table.encoding
    with open(path, encoding=encoding, errors="surrogateescape", newline="") as fh:
        if table.sep != ",":
            for number, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                yield number, line.split(table.sep) if line else []
            return
        reader = csv.reader(fh)
        start = 1
        try:
            for fields in reader:
                yield start, fields
                start = reader.line_num + 1
        except csv.Error as err:
            raise _LineError(f"line {start}: not valid CSV ({err})") from None


def _undecodable(fields: list[str], table: Table) -> str | None:
    for text in fields:
        found = None if text.isascii() else _BAD_BYTE.search(text)
        if found:
            return f"not valid {table.encoding} text (byte 0x{ord(found.group()) - 0xDC00:02x})"
    return None


def _first_record(path: Path, table: Table) -> list[str]:
    """Return the fields of the file's first line ([] for an empty file), or raise naming the line."""
    records = _records(path, table)
    try:
        _, fields = next(records, (1, []))
    except _LineError as err:
        raise PipelineError(f"{path}, {err}") from None
    finally:
        records.close()
    return fields


def _header_fields(path: Path, table: Table) -> list[str]:
    fields = _first_record(path, table)
    bad = _undecodable(fields, table)
    if bad:
        raise PipelineError(f"{path}, line 1: {bad}")
    return [f.strip().strip('"') for f in fields]


def _positions(path: Path, table: Table, n_fields: int) -> dict[str, int]:
    """Resolve every column of the table to a 0-based field position, or raise naming it."""
    names = _header_fields(path, table) if table.header else []
    out = {}
    for ours, col in table.columns.items():
        if isinstance(col, str) and not col.lstrip("-").isdigit():
            if col not in names:
                raise PipelineError(f"{path}, line 1: no column named {col!r} for {ours} "
                                    f"(the header has {', '.join(map(repr, names))})")
            out[ours] = names.index(col)
        else:
            pos = int(col)
            if not 0 <= pos < n_fields:
                raise PipelineError(f"{path}: column {pos} for {ours} does not exist (lines have {n_fields} "
                                    f"fields, numbered from 0)")
            out[ours] = pos
    return out


def _line_problem(fields: list[str], table: Table, n_fields: int, checks: list[tuple[int, str, type]]) -> str | None:
    bad = _undecodable(fields, table)
    if bad:
        return bad
    if not fields:
        return "empty line"
    if len(fields) != n_fields:
        return f"expected {n_fields} fields separated by {table.sep!r}, got {len(fields)}"
    for pos, name, kind in checks:
        text = fields[pos]
        if not (_is_int64(text) if kind is int else _is_finite_number(text)):
            shown = "nothing" if not text.strip() else repr(text)
            what = "an integer" if kind is int else "a finite number"
            return f"{name} must be {what}, got {shown}"
    if len(table.sep) > 1:  # the C pass splits at its first character alone
        for text in fields:
            if table.sep[0] in text:
                return f"field {text!r} holds {table.sep[0]!r}, which the separator {table.sep!r} is made of"
    return None


def _first_bad_line(path: Path, table: Table, n_fields: int, checks: dict[int, tuple[str, type]]) -> str | None:
    """Scan the file line by line (the error path only); describe its first malformed line."""
    ordered = [(pos, name, kind) for pos, (name, kind) in sorted(checks.items())]
    try:
        for number, fields in _records(path, table):
            if number == 1 and table.header:
                bad = _undecodable(fields, table)
                if bad:
                    return f"line 1: {bad}"
                continue
            problem = _line_problem(fields, table, n_fields, ordered)
            if problem:
                return f"line {number}: {problem}"
    except _LineError as err:
        return str(err)
    return None


def read_interactions(path: Path, table: Table, string_ids: bool = False) -> pd.DataFrame:
    """Return user_id, movie_id, timestamp (int64) and, if the table has one, rating (float64).

    Ids are int64, or strings when `string_ids`. A table without a timestamp column gets the line
    order as its timestamp. Any malformed line stops with the file name and line number. Integers
    are what pandas' C parser reads as int64 (so '4.0' and '1e3' pass); ratings must be finite.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the download stage first")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: the file is empty")
    first = _first_record(path, table)
    if not first and not table.header:
        raise PipelineError(f"{path}, line 1: empty line")
    n_fields = table.fields or max(len(first), 1)
    pos = _positions(path, table, n_fields)
    kinds = {"user_id": str if string_ids else int, "movie_id": str if string_ids else int,
             "timestamp": int, "rating": float}
    checks = {pos[c]: (c, kinds[c]) for c in pos if kinds.get(c) in (int, float)}
    # "::" is read as ":" (the C engine needs one character): field j of the line is column 2j.
    single = table.sep if len(table.sep) == 1 else table.sep[0]
    stride = len(table.sep)
    n_columns = (n_fields - 1) * stride + 1
    wanted = {pos[c] * stride: {int: np.int64, float: np.float64, str: str}[kinds[c]] for c in pos}
    dtypes = {i: wanted.get(i, str) for i in range(n_columns)}
    not_numbers = {pos[c] * stride: _BOOL_WORDS for c in pos if kinds[c] in (int, float)}

    def malformed(err: Exception | None) -> PipelineError:
        bad = _first_bad_line(path, table, n_fields, checks)
        if bad:
            return PipelineError(f"{path}, {bad}")
        if isinstance(err, pd.errors.EmptyDataError):
            return PipelineError(f"{path}: no interactions in the file")
        return PipelineError(f"{path}: malformed" + (f" ({err})" if err else ""))

    try:
        with np.errstate(all="ignore"):  # pandas' failed int casts warn before they raise
            df = pd.read_csv(path, sep=single, header=None, skiprows=1 if table.header else 0, dtype=dtypes,
                             keep_default_na=False, na_values=not_numbers, skip_blank_lines=False, engine="c",
                             encoding=table.encoding,
                             quoting=csv.QUOTE_MINIMAL if table.sep == "," else csv.QUOTE_NONE)
    except (ValueError, OverflowError, pd.errors.ParserError) as err:  # UnicodeDecodeError is a ValueError
        raise malformed(err) from None
    # What the C pass lets through: every line with more fields than the format's (it takes the
    # first line's count), a "::" field holding one ":", a rating of inf (or NA: a true/false word).
    if df.shape[1] != n_columns or any((df[j] != "").any() for j in range(1, n_columns, stride) if stride > 1) or (
            "rating" in pos and not np.isfinite(df[pos["rating"] * stride].to_numpy()).all()):
        raise malformed(None)
    if len(df) == 0:
        raise PipelineError(f"{path}: no interactions in the file")
    out = pd.DataFrame({c: df[pos[c] * stride] for c in ("user_id", "movie_id")})
    out["timestamp"] = df[pos["timestamp"] * stride] if "timestamp" in pos else np.arange(len(df), dtype=np.int64)
    if "rating" in pos:
        out["rating"] = df[pos["rating"] * stride]
    return out


def read_titles(path: Path, table: Table) -> pd.DataFrame:
    """Return movie_id (int64) and title (str) from a movie list; ids that are not integers are an error.

    Movie lists are small (at most ~62k lines), so this is a plain line-by-line read: exact line
    numbers, blank lines skipped, lines of any length (a missing title reads as '').
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the download stage first")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: the file is empty")
    if table.header:
        names = _header_fields(path, table)
        for ours in ("movie_id", "title"):
            if table.columns[ours] not in names:
                raise PipelineError(f"{path}, line 1: no column named {table.columns[ours]!r} for {ours} "
                                    f"(the header has {', '.join(map(repr, names))})")
        id_pos, title_pos = names.index(table.columns["movie_id"]), names.index(table.columns["title"])
    else:
        id_pos, title_pos = int(table.columns["movie_id"]), int(table.columns["title"])
    ids: list[int] = []
    titles: list[str] = []
    try:
        for number, fields in _records(path, table):
            bad = _undecodable(fields, table)
            if bad:
                raise _LineError(f"line {number}: {bad}")
            if (number == 1 and table.header) or not fields:
                continue
            text = fields[id_pos] if id_pos < len(fields) else ""
            if not (_INT_TEXT.fullmatch(text) and _INT64[0] <= int(text) < _INT64[1]):
                raise _LineError(f"line {number}: movie id must be an integer, got "
                                 f"{'nothing' if not text.strip() else repr(text)}")
            ids.append(int(text))
            titles.append(fields[title_pos] if title_pos < len(fields) else "")
    except _LineError as err:
        raise PipelineError(f"{path}, {err}") from None
    return pd.DataFrame({"movie_id": np.array(ids, dtype=np.int64), "title": pd.Series(titles, dtype=str)})
