"""The datasets the `dataset` param can name, and fast, strict readers for their files.

A MovieLens release is a zip on files.grouplens.org; we use its ratings file and its movie list.
Each is checked against a published SHA-256 where one exists (so a mirror's repack of the same
files passes), otherwise the whole archive against GroupLens's published md5. `custom` reads a
user's own table; `synthetic-*` are generated (pipeline.synthetic).

Interactions are parsed with pandas' C engine straight into typed columns. Only when that fails
does a line-by-line scan run, to name the first bad line; so a good file costs one C pass. Movie
lists are small and read line by line.

A user's own table (`Table.strict` false) is read as the tools people use write it: a UTF-8 BOM,
\r\n or old-Mac \r line ends, CSV quoting with any one-character separator, blank lines (empty,
or only spaces and tabs) anywhere, no newline at the end: all read like the plain file. MovieLens's
own files (`strict`) keep their exact formats: a blank line is an error, quotes are text but in CSV.
"""
from __future__ import annotations

import codecs
import csv
import io
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype

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
    strict: bool = False  # MovieLens's own formats: a blank line is an error, quotes are text but with ','

    @property
    def quoted(self) -> bool:
        """Whether a '"' at a field's start opens a CSV quoted field (never for a multi-character sep)."""
        return self.sep == "," or (not self.strict and len(self.sep) == 1)


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
                                 "timestamp": "timestamp"}, strict=True)
_CSV_TITLES = Table(",", True, {"movie_id": "movieId", "title": "title"}, strict=True)

DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset(
        "ml-100k", "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "ml-100k/u.data", "ml-100k/u.item",
        {"ml-100k/u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
         "ml-100k/u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"},
        Table("\t", False, {"user_id": 0, "movie_id": 1, "rating": 2, "timestamp": 3}, fields=4, strict=True),
        Table("|", False, {"movie_id": 0, "title": 1}, "latin-1", strict=True),
    ),
    Dataset(
        "ml-1m", "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ml-1m/ratings.dat", "ml-1m/movies.dat",
        {"ml-1m/ratings.dat": "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
         "ml-1m/movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9"},
        Table("::", False, {"user_id": 0, "movie_id": 1, "rating": 2, "timestamp": 3}, "latin-1", 4, strict=True),
        Table("::", False, {"movie_id": 0, "title": 1}, "latin-1", strict=True),
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
# What an id may not be: nothing, or a run of spaces or of tabs. The C pass reads these as NA (so a
# line of separators ' ' or '\t', which it reads as such fields, never passes as an interaction).
_NO_ID = [""] + [blank * n for blank in " \t" for n in range(1, 65)]
_NO_ID_SET = frozenset(_NO_ID)
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


# A blank line of a non-strict table: nothing but spaces and tabs, then its line end (if any).
_BLANK = re.compile("[ \t]*(?:\r\n|\r|\n)?")
_LINE_END = re.compile("\r\n|\r|\n")


class _Row(NamedTuple):
    """One record of a file, as the readers split it."""

    line: int  # the physical line it starts on, 1-based, blank lines counted
    unit: int  # its 0-based number as pandas' `skiprows` counts: one per blank line, one per record
    fields: list[str]  # [] for an empty line
    blank: int = 0  # 0: a record (always, in a strict table); 1: a blank line the C pass skips;
    # 2: a blank line the C pass reads as empty fields (its blanks are the separator, ' ' or '\t')
    text: str = ""  # as in the file, its line end(s) included


def _blank(text: str, table: Table) -> int:
    """_Row.blank of one physical line's text (line end included or not)."""
    if table.strict or not _BLANK.fullmatch(text):
        return 0
    return 2 if table.sep[0] in text else 1


class _Lines:
    """A file's lines, keeping those read since the last take(): the raw text of one CSV record."""

    def __init__(self, fh) -> None:
        self._fh, self._read = fh, []

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        line = next(self._fh)
        self._read.append(line)
        return line

    def take(self) -> str:
        text = "".join(self._read)
        self._read.clear()
        return text


def _open_quote(text: str, sep: str) -> int | None:
    """The offset of a '"' that opens a field of this CSV record and never closes, or None."""
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':  # a quoted field: it ends at a '"' that is not doubled
            j = i + 1
            while True:
                k = text.find('"', j)
                if k < 0:
                    return i
                if not text.startswith('"', k + 1):
                    break
                j = k + 2
            i = k + 1
        k = text.find(sep, i)  # the rest of the field is text, up to the next separator
        if k < 0:
            return None
        i = k + 1
    return None


def _csv_rows(fh, table: Table) -> Iterator[_Row]:
    """_rows of a quoted table. Each record is yielded once the next is read, so that the last one,
    where a quote left open runs to, can be checked for it."""
    lines = _Lines(fh)
    reader = csv.reader(lines, delimiter=table.sep, quotechar='"', doublequote=True)
    limit = csv.field_size_limit(2**31 - 1)  # as long a field as the C pass takes (an open quote reads to the end)
    start, unit, last = 1, 0, None
    try:
        for fields in reader:
            text = lines.take()
            if last is not None:
                yield last
            last = _Row(start, unit, fields, _blank(text, table) if reader.line_num == start else 0, text)
            start, unit = reader.line_num + 1, unit + 1
    except csv.Error as err:
        if last is not None:
            yield last
        raise _LineError(f"line {start}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)
    if last is not None:
        opened = _open_quote(last.text, table.sep)
        if opened is not None:
            line = last.line + len(_LINE_END.findall(last.text, 0, opened))
            raise _LineError(f"line {line}: a quoted field starts here and never ends (a '\"' missing?)")
        yield last


def _rows(path: Path, table: Table) -> Iterator[_Row]:
    """Yield the file's records as pandas splits it: lines end at \\n, \\r\\n or a lone \\r; a quoted
    table (Table.quoted) follows CSV quoting, a record spanning lines numbered by its first; a UTF-8
    BOM is dropped; an undecodable byte reads as a lone surrogate. A strict table's empty line is
    the record []; in any other table a line of only spaces and tabs is a blank row."""
    encoding = "utf-8-sig" if codecs.lookup(table.encoding).name == "utf-8" else table.encoding
    with open(path, encoding=encoding, errors="surrogateescape", newline="") as fh:
        if table.quoted:
            yield from _csv_rows(fh, table)
            return
        for number, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            yield _Row(number, number - 1, line.split(table.sep) if line else [], _blank(line, table), raw)


def _undecodable(fields: list[str], table: Table) -> str | None:
    for text in fields:
        found = None if text.isascii() else _BAD_BYTE.search(text)
        if found:
            return f"not valid {table.encoding} text (byte 0x{ord(found.group()) - 0xDC00:02x})"
    return None


def _first_row(path: Path, table: Table) -> _Row | None:
    """Return the file's first record (a strict table's line 1, even empty; else the first line that
    is not blank), None if there is none, or raise naming the line."""
    rows = _rows(path, table)
    try:
        return next((row for row in rows if not row.blank), None)
    except _LineError as err:
        raise PipelineError(f"{path}, {err}") from None
    finally:
        rows.close()


def _header_fields(path: Path, table: Table, header: _Row) -> list[str]:
    bad = _undecodable(header.fields, table)
    if bad:
        raise PipelineError(f"{path}, line {header.line}: {bad}")
    return [f.strip().strip('"') for f in header.fields]


def _positions(path: Path, table: Table, n_fields: int, header: _Row | None) -> dict[str, int]:
    """Resolve every column of the table to a 0-based field position, or raise naming it."""
    names = _header_fields(path, table, header) if header else []
    out = {}
    for ours, col in table.columns.items():
        if isinstance(col, str) and not col.lstrip("-").isdigit():
            if col not in names:
                raise PipelineError(f"{path}, line {header.line if header else 1}: no column named {col!r} for "
                                    f"{ours} (the header has {', '.join(map(repr, names))})")
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
        problem = f"expected {n_fields} fields separated by {table.sep!r}, got {len(fields)}"
        if any("\n" in text or "\r" in text for text in fields):
            problem += " (a quoted field runs over several lines: is a '\"' missing?)"
        return problem
    for pos, name, kind in checks:
        text = fields[pos]
        if kind is str:
            if text in _NO_ID_SET:
                return f"{name} is empty" if not text else f"{name} is only blanks ({text!r})"
            continue
        if not (_is_int64(text) if kind is int else _is_finite_number(text)):
            shown = "nothing" if not text.strip() else repr(text)
            what = "an integer" if kind is int else "a finite number"
            return f"{name} must be {what}, got {shown}"
    if len(table.sep) > 1:  # the C pass splits at its first character alone
        for text in fields:
            if table.sep[0] in text:
                return f"field {text!r} holds {table.sep[0]!r}, which the separator {table.sep!r} is made of"
    return None


def _first_bad_line(path: Path, table: Table, n_fields: int,
                    checks: dict[int, tuple[str, type]]) -> tuple[str | None, set[int]]:
    """Scan the file line by line (the error path only): describe its first malformed line, or None.

    Also return the rows (as `skiprows` counts them) of the blank lines the C pass reads as fields."""
    ordered = [(pos, name, kind) for pos, (name, kind) in sorted(checks.items())]
    unread: set[int] = set()
    header = table.header
    try:
        for row in _rows(path, table):
            if row.blank:
                if row.blank == 2:
                    unread.add(row.unit)
                continue
            if header:
                header = False
                bad = _undecodable(row.fields, table)
                if bad:
                    return f"line {row.line}: {bad}", unread
                continue
            problem = _line_problem(row.fields, table, n_fields, ordered)
            if problem:
                return f"line {row.line}: {problem}", unread
    except _LineError as err:
        return str(err), unread
    return None, unread


def _lone_cr(path: Path) -> tuple[bool, bool]:
    """(whether a line of the file ends in a lone \\r, whether any ends in \\n): a few ms per 30 MB."""
    lone = lf = ends_in_cr = False
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if ends_in_cr and not chunk.startswith(b"\n"):
                lone = True
            lf = lf or b"\n" in chunk
            if not lone and b"\r" in chunk:
                buf = np.frombuffer(chunk, np.uint8)
                cr = buf[:-1] == 13
                lone = bool(np.count_nonzero(cr) != np.count_nonzero(cr & (buf[1:] == 10)))
            ends_in_cr = chunk.endswith(b"\r")
            if lone and lf:
                break
    return lone, lf


def _one_line_end(path: Path, table: Table) -> str:
    """The file's text with every record ending in \\n (for a file mixing lone \\r with \\n: see
    read_interactions). Line ends inside quoted fields stay as they are; the lines stay the same."""
    def lf(text: str) -> str:
        if text.endswith("\r\n"):
            return text[:-2] + "\n"
        return text[:-1] + "\n" if text.endswith("\r") else text

    try:
        return "".join(lf(row.text) for row in _rows(path, table))
    except _LineError as err:
        raise PipelineError(f"{path}, {err}") from None


def _has_na(column: pd.Series) -> bool:
    """Whether a column of strings holds NA; one C pass over its objects, twice as fast as isna()."""
    return infer_dtype(np.asarray(column.array), skipna=False) not in ("string", "empty")


def read_interactions(path: Path, table: Table, string_ids: bool = False) -> pd.DataFrame:
    """Return user_id, movie_id, timestamp (int64) and, if the table has one, rating (float64).

    Ids are int64, or (non-empty) strings when `string_ids`. A table without a timestamp column gets
    the line order as its timestamp. Any malformed line stops with the file name and line number.
    Integers are what pandas' C parser reads as int64 (so '4.0' and '1e3' pass); ratings must be
    finite. A non-strict table's blank lines are skipped (see the module's docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the download stage first")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: the file is empty")
    first = _first_row(path, table)
    if first is None:
        raise PipelineError(f"{path}: the file has only blank lines")
    if not first.fields and not table.header:
        raise PipelineError(f"{path}, line {first.line}: empty line")
    n_fields = table.fields or max(len(first.fields), 1)
    pos = _positions(path, table, n_fields, first if table.header else None)
    kinds = {"user_id": str if string_ids else int, "movie_id": str if string_ids else int,
             "timestamp": int, "rating": float}
    checks = {pos[c]: (c, kinds[c]) for c in pos if c in kinds}
    # "::" is read as ":" (the C engine needs one character): field j of the line is column 2j.
    single = table.sep if len(table.sep) == 1 else table.sep[0]
    stride = len(table.sep)
    n_columns = (n_fields - 1) * stride + 1
    wanted = {pos[c] * stride: {int: np.int64, float: np.float64, str: str}[kinds[c]] for c in pos}
    dtypes = {i: wanted.get(i, str) for i in range(n_columns)}
    # NA, which no column may hold: a true/false word for a number; for an id, nothing (a missing field
    # too) or blanks.
    na = {pos[c] * stride: _BOOL_WORDS if kinds[c] in (int, float) else _NO_ID for c in pos}
    strings = [pos[c] * stride for c in pos if kinds[c] is str]
    skip = first.unit + 1 if table.header else 0  # the header, and any blank lines above it
    # pandas' C tokenizer, in its default mode, mis-splits a line that starts with the separator after
    # a lone \r (it bypasses `skiprows` and blank-line skipping; after a skipped line it drops the
    # empty first field). An old-Mac file (only \r) is read with \r as the line end; a file mixing
    # lone \r with \n, from its text with every record ending in \n. MovieLens's files never do.
    text, terminator = None, None
    if not table.strict:
        lone, lf = _lone_cr(path)
        if lone and not lf:
            terminator = "\r"
        elif lone:
            text = _one_line_end(path, table)

    def parse(skiprows: int | list[int]) -> tuple[pd.DataFrame | None, Exception | None]:
        """The C pass: (the frame, None), or (None, its error or None) when the scan must judge."""
        try:
            with np.errstate(all="ignore"):  # pandas' failed int casts warn before they raise
                df = pd.read_csv(path if text is None else io.StringIO(text), sep=single, header=None,
                                 skiprows=skiprows, dtype=dtypes, keep_default_na=False, na_values=na,
                                 skip_blank_lines=not table.strict, lineterminator=terminator, engine="c",
                                 encoding=table.encoding,
                                 quoting=csv.QUOTE_MINIMAL if table.quoted else csv.QUOTE_NONE)
        except (ValueError, OverflowError, pd.errors.ParserError) as err:  # UnicodeDecodeError is a ValueError
            return None, err
        # What the C pass lets through: every line with more fields than the format's (it takes the
        # first line's count), a "::" field holding one ":", a rating of inf (or NA: a true/false
        # word), an id of nothing or blanks or a short line (NA in an id column).
        if df.shape[1] != n_columns or any((df[j] != "").any() for j in range(1, n_columns, stride) if stride > 1) or (
                "rating" in pos and not np.isfinite(df[pos["rating"] * stride].to_numpy()).all()) or any(
                _has_na(df[j]) for j in strings):
            return None, None
        return df, None

    df, err = parse(skip)
    if df is None:
        bad, unread = _first_bad_line(path, table, n_fields, checks)
        if bad:
            raise PipelineError(f"{path}, {bad}")
        if unread:  # blank lines of separators (' ' or '\t'), which the C pass reads as fields
            df, err = parse(sorted(set(range(skip)) | unread))
        if df is None:
            if isinstance(err, pd.errors.EmptyDataError):
                raise PipelineError(f"{path}: no interactions in the file")
            raise PipelineError(f"{path}: malformed" + (f" ({err})" if err else ""))
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
        first = _first_row(path, table)
        if first is None:
            raise PipelineError(f"{path}: the file has only blank lines")
        names = _header_fields(path, table, first)
        for ours in ("movie_id", "title"):
            if table.columns[ours] not in names:
                raise PipelineError(f"{path}, line {first.line}: no column named {table.columns[ours]!r} for "
                                    f"{ours} (the header has {', '.join(map(repr, names))})")
        id_pos, title_pos = names.index(table.columns["movie_id"]), names.index(table.columns["title"])
    else:
        id_pos, title_pos = int(table.columns["movie_id"]), int(table.columns["title"])
    ids: list[int] = []
    titles: list[str] = []
    header = table.header
    try:
        for row in _rows(path, table):
            bad = _undecodable(row.fields, table)
            if bad:
                raise _LineError(f"line {row.line}: {bad}")
            if header and not row.blank:
                header = False
                continue
            if row.blank or not row.fields:
                continue
            text = row.fields[id_pos] if id_pos < len(row.fields) else ""
            if not (_INT_TEXT.fullmatch(text) and _INT64[0] <= int(text) < _INT64[1]):
                raise _LineError(f"line {row.line}: movie id must be an integer, got "
                                 f"{'nothing' if not text.strip() else repr(text)}")
            ids.append(int(text))
            titles.append(row.fields[title_pos] if title_pos < len(row.fields) else "")
    except _LineError as err:
        raise PipelineError(f"{path}, {err}") from None
    return pd.DataFrame({"movie_id": np.array(ids, dtype=np.int64), "title": pd.Series(titles, dtype=str)})
