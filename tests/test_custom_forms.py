"""A custom table loads the same whatever tool wrote it.

A spreadsheet program or an editor on another system writes the same rows with a UTF-8 BOM,
Windows (\\r\\n) or old Mac (\\r) line ends, quoted header names and fields, blank lines (empty, or
spaces and tabs only) anywhere, or no newline at the end. Each of these must read exactly like the
plain file (same rows, same order, same types), so `build_matrix` writes byte-identical
data/prepared files; a genuinely malformed line is still a one-line error naming the file and its
physical line (blank lines counted).

The property tests draw a table (string ids holding separators, quotes and line breaks; integer
times; ratings; an unused column), write it plainly and again in a random mix of those forms, and
compare: in-process for many examples, through the real `download` and `build_matrix` stages,
byte for byte, for a few.
"""
from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import REPO, set_params, stage, user_error
from pipeline.build_matrix import custom_table
from pipeline.common import PipelineError
from pipeline.datasets import DATASETS, read_interactions

SEPS = [",", "\t", ";", "|", "::", " "]
# Header names per column; those holding a separator are quoted where that separator is used.
NAMES = {"user": ["user", "user id", "User,Id", "who;r|u"], "item": ["item", "movie title", "Item|Name", "what,x"],
         "timestamp": ["timestamp", "when", "ts;x"], "rating": ["rating", "stars x", "r,s"],
         "note": ["note", "n\tote"]}
RATINGS = ["1", "2.5", "4.0", "5", "0.5", "-1", "3.25", "1e1"]
PARAM = {"user": "custom_user", "item": "custom_item", "timestamp": "custom_time", "rating": "custom_rating"}


def fuzz(max_examples: int):
    """Reproducible, deadline-free settings (as in test_fuzz): the same examples on every run."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)


def _text(sep: str, min_size: int) -> st.SearchStrategy[str]:
    """Field text: with a one-character separator anything CSV quoting carries (every separator,
    quotes, line breaks); with '::' no ':' and no line break (that format has no quoting)."""
    alphabet = 'ab XZ09é,\t;|"' + (":\n\r" if len(sep) == 1 else "")
    return st.text(st.sampled_from(list(alphabet)), min_size=min_size, max_size=6)


def _id(sep: str) -> st.SearchStrategy[str]:
    # not only blanks: a line of only spaces and tabs is a blank line
    return _text(sep, 1).filter(lambda s: s.strip(" \t"))


@st.composite
def tables(draw) -> dict:
    """A custom table: its params and its rows (field texts by column name, in file order)."""
    sep = draw(st.sampled_from(SEPS))
    header = draw(st.booleans())
    columns = ["user", "item"] + [c for c in ("timestamp", "rating", "note") if draw(st.booleans())]
    columns = draw(st.permutations(columns))
    users = draw(st.lists(_id(sep), min_size=1, max_size=4, unique=True))
    items = draw(st.lists(_id(sep), min_size=1, max_size=6, unique=True))
    rows = []
    for _ in range(draw(st.integers(1, 25))):
        rows.append({"user": draw(st.sampled_from(users)), "item": draw(st.sampled_from(items)),
                     "timestamp": str(draw(st.integers(-(10**12), 10**12))), "rating": draw(st.sampled_from(RATINGS)),
                     "note": draw(_text(sep, 0))})
    names = {c: draw(st.sampled_from(NAMES[c])) for c in columns}
    params = {"custom_sep": sep, "custom_header": header, "custom_time": "", "custom_rating": ""}
    for c in columns:
        if c in PARAM:
            params[PARAM[c]] = names[c] if header else columns.index(c)
    return {"params": params, "columns": columns, "names": names, "rows": rows}


def _needs_quotes(text: str, sep: str) -> bool:
    return len(sep) == 1 and (sep in text or any(c in text for c in '"\n\r'))


def _field(text: str, sep: str, quote: bool) -> str:
    if len(sep) == 1 and (quote or _needs_quotes(text, sep)):
        return '"' + text.replace('"', '""') + '"'
    return text


def _records(table: dict) -> list[list[str]]:
    """The table's lines as field texts: the header (if any), then one per row."""
    columns = table["columns"]
    lines = [[table["names"][c] for c in columns]] if table["params"]["custom_header"] else []
    return lines + [[row[c] for c in columns] for row in table["rows"]]


def _join(fields: list[str], sep: str, quote=lambda: False) -> str:
    return sep.join(_field(text, sep, quote()) for text in fields)


def plain(table: dict) -> bytes:
    """The table written plainly: UTF-8, '\\n' after every line, quotes only where needed."""
    sep = table["params"]["custom_sep"]
    return "".join(_join(fields, sep) + "\n" for fields in _records(table)).encode()


@st.composite
def forms(draw, table: dict, records: list[list[str] | str] | None = None) -> tuple[bytes, list[int]]:
    """The same table as some tool might write it, a random mix of every form; and the physical line
    (1-based, as an editor numbers them) each record starts on. A record given as a str is written as is."""
    sep = table["params"]["custom_sep"]
    rnd: random.Random = draw(st.randoms(use_true_random=False))
    quoting = draw(st.sampled_from(["none", "all", "some"]))
    quote = {"none": lambda: False, "all": lambda: True, "some": lambda: rnd.random() < 0.5}[quoting]
    lines = [(fields if isinstance(fields, str) else _join(fields, sep, quote), True)
             for fields in (records or _records(table))]
    blanks = draw(st.lists(st.tuples(st.integers(0, len(lines)), st.sampled_from(["", " ", "\t", " \t  "])),
                           max_size=5))
    for at, blank in sorted(blanks, reverse=True):  # at len(lines): after the last line
        lines.insert(at, (blank, False))
    end = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    text, starts = bom, []
    for line, is_record in lines:
        if is_record:
            starts.append(1 + len(re.findall("\r\n|\r|\n", text)))
        text += line + (rnd.choice(["\n", "\r\n", "\r"]) if end == "mixed" else end)
    if not draw(st.booleans()):  # no newline at the end
        text = text[: -2 if text.endswith("\r\n") else -1]
    return text.encode(), starts


def _read(path: Path, params: dict) -> pd.DataFrame:
    return read_interactions(path, custom_table(params), string_ids=True)


def _expected(table: dict) -> dict[str, list]:
    rows, columns = table["rows"], table["columns"]
    out = {"user_id": [r["user"] for r in rows], "movie_id": [r["item"] for r in rows],
           "timestamp": [int(r["timestamp"]) for r in rows] if "timestamp" in columns else list(range(len(rows)))}
    if "rating" in columns:
        out["rating"] = [float(r["rating"]) for r in rows]
    return out


@pytest.fixture(scope="module")
def forms_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("forms")


@fuzz(150)
@given(data=st.data())
def test_every_form_reads_like_the_plain_file(forms_dir: Path, data) -> None:
    table = data.draw(tables(), label="table")
    variant, _ = data.draw(forms(table), label="variant")
    (forms_dir / "plain").write_bytes(plain(table))
    (forms_dir / "variant").write_bytes(variant)
    expected = _read(forms_dir / "plain", table["params"])
    assert {c: expected[c].tolist() for c in expected} == _expected(table)
    pd.testing.assert_frame_equal(_read(forms_dir / "variant", table["params"]), expected)


@st.composite
def corrupted(draw, table: dict) -> tuple[list[list[str] | str], int, str]:
    """The table's records with one made malformed: (records, its index, the start of the message)."""
    records = _records(table)
    columns, sep = table["columns"], table["params"]["custom_sep"]
    first = 1 if table["params"]["custom_header"] else 0
    index = draw(st.integers(first, len(records) - 1))
    fields = records[index]
    kinds = ["empty id", "blank id"]
    kinds += ["more fields"] if index > 0 else []  # (the first line sets the count)
    # A line short of trailing fields that are not used reads (pandas pads it): not drawn here.
    kinds += ["fewer fields"] if index > 0 and columns[-1] != "note" else []
    kinds += ["time"] if "timestamp" in columns else []
    kinds += ["rating"] if "rating" in columns else []
    kinds += ["open quote"] if len(sep) == 1 and index == len(records) - 1 else []  # (it runs to the end)
    kind = draw(st.sampled_from(kinds))
    n = len(columns)
    name = {"user": "user_id", "item": "movie_id"}
    if kind in ("empty id", "blank id"):
        column = draw(st.sampled_from(["user", "item"]))
        fields[columns.index(column)] = "" if kind == "empty id" else draw(st.sampled_from([" ", "\t\t"]))
        return records, index, f"{name[column]} is {'empty' if kind == 'empty id' else 'only blanks'}"
    if kind == "fewer fields":
        del fields[draw(st.integers(0, n - 1))]
        return records, index, f"expected {n} fields separated by {sep!r}, got {n - 1}"
    if kind == "more fields":
        fields.append("extra")
        return records, index, f"expected {n} fields separated by {sep!r}, got {n + 1}"
    if kind == "time":
        fields[columns.index("timestamp")] = "soon"
        return records, index, "timestamp must be an integer, got 'soon'"
    if kind == "rating":
        fields[columns.index("rating")] = "x"
        return records, index, "rating must be a finite number, got 'x'"
    records[index] = '"open' + sep + sep.join("1" for _ in range(n - 1))  # as written: a quote never closed
    return records, index, "a quoted field starts here and never ends"


@fuzz(150)
@given(data=st.data())
def test_a_malformed_line_is_named_in_every_form(forms_dir: Path, data) -> None:
    table = data.draw(tables().filter(lambda t: len(t["rows"]) >= 2), label="table")
    records, index, words = data.draw(corrupted(table), label="corrupted")
    variant, starts = data.draw(forms(table, records), label="variant")
    path = forms_dir / "bad"
    path.write_bytes(variant)
    with pytest.raises(PipelineError) as err:
        _read(path, table["params"])
    assert str(err.value).startswith(f"{path}, line {starts[index]}: {words}"), (str(err.value), starts[index])


def _prepared(root: Path, name: str, data: bytes, params: dict) -> dict[str, bytes]:
    """Run the real download and build_matrix stages on the table; return data/prepared's files."""
    work = root / name
    work.mkdir()
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (work / "table.txt").write_bytes(data)
    set_params(work, dataset="custom", custom_path=str(work / "table.txt"), min_rating=0, **params)
    for args in (("download", "data/raw"), ("build_matrix", "data/raw", "data/prepared")):
        proc = stage(*args, cwd=work)
        assert proc.returncode == 0, proc.stderr
    return {p.name: p.read_bytes() for p in sorted((work / "data/prepared").iterdir())}


@fuzz(4)
@given(data=st.data())
def test_every_form_builds_byte_identical_prepared_data(data) -> None:
    table = data.draw(tables().filter(lambda t: len(t["rows"]) >= 8), label="table")
    variant, _ = data.draw(forms(table), label="variant")
    assume(variant != plain(table))
    with tempfile.TemporaryDirectory() as tmp:
        want = _prepared(Path(tmp), "plain", plain(table), table["params"])
        got = _prepared(Path(tmp), "variant", variant, table["params"])
    assert sorted(got) == sorted(want) and len(want) >= 5
    for name in want:
        assert got[name] == want[name], name


# --- each form alone -------------------------------------------------------------------------------

PLAIN = 'user,item,rating,timestamp\nu1,Zodiac,4,100\nu2,"Godfather, The",3.5,200\nu1,"Say ""Hi""",1,300\n'
CSV_PARAMS = {"custom_sep": ",", "custom_header": True, "custom_user": "user", "custom_item": "item",
              "custom_time": "timestamp", "custom_rating": "rating"}
QUOTED_ALL = ('"user","item","rating","timestamp"\n"u1","Zodiac","4","100"\n"u2","Godfather, The","3.5","200"\n'
              '"u1","Say ""Hi""","1","300"\n')


@pytest.mark.parametrize("name, data", [
    ("utf-8 BOM", b"\xef\xbb\xbf" + PLAIN.encode()),
    ("Windows line ends", PLAIN.replace("\n", "\r\n").encode()),
    ("old Mac line ends", PLAIN.replace("\n", "\r").encode()),
    ("mixed line ends", "".join(line + end for line, end in zip(PLAIN.splitlines(), ["\r\n", "\r", "\n", "\r"]))
     .encode()),
    ("quoted header names", PLAIN.replace("user,item,rating,timestamp", '"user","item","rating","timestamp"')
     .encode()),
    ("every field quoted", QUOTED_ALL.encode()),
    ("a blank last line", (PLAIN + "\n").encode()),
    ("blank lines everywhere", ("\n\n" + PLAIN.replace("\n", "\n\n") + "\n").encode()),
    ("lines of spaces and tabs", (" \n" + PLAIN.replace("\n", "\n \t \n") + "\t").encode()),
    ("no newline at the end", PLAIN[:-1].encode()),
    ("all at once", b"\xef\xbb\xbf\r\n" + QUOTED_ALL.replace("\n", "\r\n\r\n").encode()[:-4]),
])
def test_each_form_reads_like_the_plain_file(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / "plain.csv").write_text(PLAIN)
    (tmp_path / "form.csv").write_bytes(data)
    expected = _read(tmp_path / "plain.csv", CSV_PARAMS)
    assert expected["movie_id"].tolist() == ["Zodiac", "Godfather, The", 'Say "Hi"']
    assert expected["rating"].tolist() == [4.0, 3.5, 1.0] and expected["timestamp"].tolist() == [100, 200, 300]
    pd.testing.assert_frame_equal(_read(tmp_path / "form.csv", CSV_PARAMS), expected)


@pytest.mark.parametrize("sep", ["\t", ";", "|", " "])
def test_quotes_with_every_one_character_separator(tmp_path: Path, sep: str) -> None:
    params = {**CSV_PARAMS, "custom_sep": sep, "custom_user": "the user"}
    (tmp_path / "t").write_text(f'"the user"{sep}item{sep}rating{sep}timestamp\n'
                                f'"a{sep}b"{sep}"x""y"{sep}"4"{sep}10\n'
                                f'c{sep}"two\nlines"{sep}3{sep}"20"\n')
    df = _read(tmp_path / "t", params)
    assert df["user_id"].tolist() == [f"a{sep}b", "c"] and df["movie_id"].tolist() == ['x"y', "two\nlines"]
    assert df["timestamp"].tolist() == [10, 20] and df["rating"].tolist() == [4.0, 3.0]


def test_double_colon_has_no_quoting(tmp_path: Path) -> None:
    params = {**CSV_PARAMS, "custom_sep": "::", "custom_header": False, "custom_user": 0, "custom_item": 1,
              "custom_rating": 2, "custom_time": 3}
    (tmp_path / "t").write_bytes(b'\xef\xbb\xbf"a"::b c::4::10\r\n\r\n  \r\nd::"e::3::20')
    df = _read(tmp_path / "t", params)
    assert df["user_id"].tolist() == ['"a"', "d"] and df["movie_id"].tolist() == ["b c", '"e']


@pytest.mark.parametrize("sep", [" ", "\t"])
def test_blank_lines_of_the_separator_are_blank(tmp_path: Path, sep: str) -> None:
    """With sep ' ' (or '\\t'), pandas reads a line of spaces (tabs) as empty fields: still blank."""
    params = {"custom_sep": sep, "custom_header": False, "custom_user": 0, "custom_item": 1, "custom_time": "",
              "custom_rating": ""}
    (tmp_path / "plain").write_text(f"a{sep}b\nc{sep}d\n")
    (tmp_path / "form").write_text(f"{sep}\na{sep}b\n{sep * 3}\n \t \n  \t\t  \nc{sep}d\n{sep}")
    pd.testing.assert_frame_equal(_read(tmp_path / "form", params), _read(tmp_path / "plain", params))
    (tmp_path / "bad").write_text(f"a{sep}b\n{sep * 3}\nc\n")
    with pytest.raises(PipelineError, match=re.escape(f"bad, line 3: expected 2 fields separated by {sep!r}, got 1")):
        _read(tmp_path / "bad", params)


def test_header_after_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("\n \nwho,item,rating,timestamp\nu1,x,4,1\n")
    with pytest.raises(PipelineError, match=r"t\.csv, line 3: no column named 'user' for user_id"):
        _read(tmp_path / "t.csv", CSV_PARAMS)
    (tmp_path / "t.csv").write_text("\n \r\n\t\r")
    with pytest.raises(PipelineError, match=r"t\.csv: the file has only blank lines$"):
        _read(tmp_path / "t.csv", CSV_PARAMS)
    (tmp_path / "t.csv").write_text("user,item,rating,timestamp\n\n  \n")
    with pytest.raises(PipelineError, match=r"t\.csv: no interactions in the file$"):
        _read(tmp_path / "t.csv", CSV_PARAMS)


# --- what is still an error: one line, the file and its physical line --------------------------------

HEAD = "user,item,rating,timestamp\r\n\r\n"  # CRLF and a blank line 2: line numbers count it


@pytest.mark.parametrize("body, line, words", [
    ("u1,x,4\r\n", 3, "expected 4 fields separated by ',', got 3"),
    ("u1,x,4,100,7\r\n", 3, "expected 4 fields separated by ',', got 5"),
    ("u1,x,4,100\r\n\r\nu2,y,4,soon\r\n", 5, "timestamp must be an integer, got 'soon'"),
    ("u1,x,4,100\r\n  \r\nu2,y,\"4,5\",100\r\n", 5, "rating must be a finite number, got '4,5'"),
    ('u1,x,4,100\r\nu2,"y,4,200\r\nu3,z,4,300\r\n', 4, "a quoted field starts here and never ends"),
    ('u1,x,4,100\r\nu2,y,4,"200', 4, "a quoted field starts here and never ends"),
    ('u1,"x\r\n\r\ny",4,100\r\nu2,"y\r\nu3",z,4,300\r\n', 6,
     "expected 4 fields separated by ',', got 5 (a quoted field runs over several lines"),
    ('u1,"x\r\n\r\ny",4,100\r\n,z,4,300\r\n', 6, "user_id is empty"),
    ('u1,x,4,100\r\nu2,"",4,100\r\n', 4, "movie_id is empty"),
    ("u1,x,4,100\r\nu2,  ,4,100\r\n", 4, "movie_id is only blanks ('  ')"),
    ("u1,x,4,100\r\nu2,y,inf,100\r\n", 4, "rating must be a finite number, got 'inf'"),
    ("u1,x,4,100\r\nu2,y,4,\xff\r\n", 4, "not valid utf-8 text (byte 0xff)"),
])
def test_a_malformed_line_is_named(tmp_path: Path, body: str, line: int, words: str) -> None:
    path = tmp_path / "mine.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + body).encode().replace("\xff".encode(), b"\xff"))  # a stray byte
    with pytest.raises(PipelineError) as err:
        _read(path, CSV_PARAMS)
    message = str(err.value)
    assert message.startswith(f"{path}, line {line}: {words}"), message
    assert "\n" not in message


@pytest.mark.parametrize("sep, text, line, words", [
    ("\t", "a\tb\n\nc\n", 3, "expected 2 fields separated by '\\t', got 1"),  # a short line of strings
    (";", "a;b\r\r;c\r", 3, "user_id is empty"),
    ("|", 'a|b\n"c|d"|e|f\n', 2, "expected 2 fields separated by '|', got 3"),
    ("::", "a::b\n\nc:d::e\n", 3, "field 'c:d' holds ':'"),
    (" ", 'a b\n\n"c d" "e\n', 3, "a quoted field starts here and never ends"),
])
def test_a_malformed_line_is_named_with_any_separator(tmp_path: Path, sep: str, text: str, line: int,
                                                      words: str) -> None:
    params = {"custom_sep": sep, "custom_header": False, "custom_user": 0, "custom_item": 1, "custom_time": "",
              "custom_rating": ""}
    (tmp_path / "t").write_text(text, newline="")
    with pytest.raises(PipelineError) as err:
        _read(tmp_path / "t", params)
    assert str(err.value).startswith(f"{tmp_path / 't'}, line {line}: {words}"), str(err.value)


def test_movielens_files_stay_strict(tmp_path: Path) -> None:
    """MovieLens's own formats are checksummed releases: a blank line there is still an error."""
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n\n")
    with pytest.raises(PipelineError, match="line 2: empty line"):
        read_interactions(tmp_path / "u.data", DATASETS["ml-100k"].ratings_table)
    (tmp_path / "u.data").write_text('"1"\t2\t3\t4\n')  # and a quote is text
    with pytest.raises(PipelineError, match="line 1: user_id must be an integer"):
        read_interactions(tmp_path / "u.data", DATASETS["ml-100k"].ratings_table)


def test_the_issue_table_through_the_stages(workdir: Path, tmp_path: Path) -> None:
    """The issue's case: a spreadsheet's export (BOM, CRLF, quotes) with a blank last line."""
    rows = (REPO / "examples/interactions.csv").read_text().splitlines()
    exported = "\ufeff" + "\r\n".join(",".join(f'"{f}"' for f in r.split(",")) for r in rows) + "\r\n\r\n"
    (tmp_path / "export.csv").write_bytes(exported.encode())
    set_params(workdir, dataset="custom", custom_path=str(tmp_path / "export.csv"))
    for args in (("download", "data/raw"), ("build_matrix", "data/raw", "data/prepared")):
        proc = stage(*args, cwd=workdir)
        assert proc.returncode == 0, proc.stderr
    (tmp_path / "export.csv").write_bytes((exported + '"u9","x","3"\r\n').encode())
    assert stage("download", "data/raw", cwd=workdir).returncode == 0
    err = user_error(stage("build_matrix", "data/raw", "data/prepared", cwd=workdir))
    assert f"export.csv, line {len(rows) + 2}: expected 4 fields separated by ',', got 3" in err, err
