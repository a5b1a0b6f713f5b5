"""build_matrix: reading u.data/u.item (pipeline.datasets), contiguous ids, and the leave-one-out split by time."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.build_matrix import build, chronological_order, latest_two, tie_break_key
from pipeline.common import PipelineError
from pipeline.datasets import DATASETS, read_interactions, read_titles


def read_ratings(path):
    """An ml-100k u.data file, as build_matrix reads it."""
    return read_interactions(path, DATASETS["ml-100k"].ratings_table)


def leave_one_out(users, timestamps, tie_break):
    """(val_mask, test_mask) in the rows' own order, from the two steps `build` takes."""
    order = chronological_order(users, timestamps, tie_break)
    val_sorted, test_sorted = latest_two(np.asarray(users)[order])
    val_mask = np.zeros(len(order), dtype=bool)
    test_mask = np.zeros(len(order), dtype=bool)
    val_mask[order] = val_sorted
    test_mask[order] = test_sorted
    return val_mask, test_mask


def ratings_frame(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])


def titles_for(movie_ids) -> pd.DataFrame:
    movie_ids = sorted(set(int(m) for m in movie_ids))
    return pd.DataFrame({"movie_id": movie_ids, "title": [f"Movie {m}" for m in movie_ids]})


def original_pairs(split, users_df, items_df):
    """Return (train, val, test) as sets of (original user id, original movie id)."""
    uid = users_df["user_id"].to_numpy()
    mid = items_df["movie_id"].to_numpy()
    coo = split.train.tocoo()
    train = set(zip(uid[coo.row].tolist(), mid[coo.col].tolist()))
    val = set(zip(uid[split.val_users].tolist(), mid[split.val_items].tolist()))
    test = set(zip(uid[split.test_users].tolist(), mid[split.test_items].tolist()))
    return train, val, test


# user 10: 4 distinct timestamps; user 5: 3; user 7: only 2 (train only);
# user 20: movie 100 rated twice (t=1 and t=9): kept once, at t=9, which makes it the latest.
SMALL = [
    (10, 100, 4, 1), (10, 200, 3, 3), (10, 300, 5, 2), (10, 400, 1, 5),
    (5, 200, 2, 10), (5, 100, 4, 20), (5, 500, 3, 15),
    (7, 300, 1, 1), (7, 100, 2, 2),
    (20, 100, 5, 1), (20, 300, 2, 5), (20, 400, 4, 6), (20, 100, 1, 9),
]


@pytest.fixture
def small():
    df = ratings_frame(SMALL)
    return (df, *build(df, titles_for(df["movie_id"])))


def test_latest_is_test_second_latest_is_validation(small):
    _, split, users_df, items_df = small
    train, val, test = original_pairs(split, users_df, items_df)
    assert test == {(10, 400), (5, 100), (20, 100)}
    assert val == {(10, 200), (5, 500), (20, 400)}
    assert train == {(10, 100), (10, 300), (5, 200), (7, 300), (7, 100), (20, 300)}


def test_ids_are_contiguous_and_sorted_by_original_id(small):
    _, split, users_df, items_df = small
    assert users_df["user_index"].tolist() == [0, 1, 2, 3]
    assert users_df["user_id"].tolist() == [5, 7, 10, 20]
    assert items_df["item_index"].tolist() == [0, 1, 2, 3, 4]
    assert items_df["movie_id"].tolist() == [100, 200, 300, 400, 500]
    assert items_df["title"].tolist() == ["Movie 100", "Movie 200", "Movie 300", "Movie 400", "Movie 500"]
    assert split.train.shape == (4, 5)
    assert (split.n_users, split.n_items) == (4, 5)


def test_heldout_arrays_in_index_space(small):
    _, split, _, _ = small
    # users 5, 10, 20 -> indices 0, 2, 3; movies 100..500 -> 0..4; sorted by user index
    assert split.test_users.tolist() == [0, 2, 3]
    assert split.test_items.tolist() == [0, 3, 0]
    assert split.val_users.tolist() == [0, 2, 3]
    assert split.val_items.tolist() == [4, 1, 3]
    assert split.test_users.dtype == np.int64 and split.val_items.dtype == np.int64


def test_train_matrix_values_and_no_leak(small):
    _, split, _, _ = small
    dense = split.train.toarray()
    expected = np.array([
        [0, 1, 0, 0, 0],  # user 5: movie 200
        [1, 0, 1, 0, 0],  # user 7: movies 100, 300 (too few to evaluate)
        [1, 0, 1, 0, 0],  # user 10: movies 100, 300
        [0, 0, 1, 0, 0],  # user 20: movie 300
    ], dtype=np.float32)
    np.testing.assert_array_equal(dense, expected)
    assert dense[split.val_users, split.val_items].sum() == 0
    assert dense[split.test_users, split.test_items].sum() == 0
    assert split.train.has_sorted_indices


def test_train_and_val_and_all_interactions(small):
    """train_and_val: what a refitted model learns from (everything before each test item)."""
    _, split, users_df, items_df = small
    before = split.train.copy()
    both, everything = split.train_and_val(), split.all_interactions()
    for matrix in (both, everything):
        assert matrix.shape == split.train.shape and matrix.has_sorted_indices
        assert set(matrix.data.tolist()) == {1.0}
    np.testing.assert_array_equal(both.toarray(), split.train.toarray() + np.array([
        [0, 0, 0, 0, 1],  # user 5: validation movie 500
        [0, 0, 0, 0, 0],  # user 7: none
        [0, 1, 0, 0, 0],  # user 10: validation movie 200
        [0, 0, 0, 1, 0],  # user 20: validation movie 400
    ]))
    assert both.nnz == split.train.nnz + len(split.val_users)
    assert both[split.test_users, split.test_items].sum() == 0  # never the test item
    assert everything.nnz == both.nnz + len(split.test_users)
    assert everything[split.test_users, split.test_items].sum() == len(split.test_users)
    assert (before != split.train).nnz == 0  # the train matrix is left alone


def test_duplicate_pair_kept_once_at_latest_timestamp():
    # movie 1 rated at t=1 and t=100: at t=100 it is the latest, so it is the test item
    df = ratings_frame([(1, 1, 5, 1), (1, 2, 5, 50), (1, 3, 5, 60), (1, 1, 2, 100)])
    split, users_df, items_df = build(df, titles_for(df["movie_id"]))
    train, val, test = original_pairs(split, users_df, items_df)
    assert test == {(1, 1)} and val == {(1, 3)} and train == {(1, 2)}
    assert split.train.nnz + len(split.val_users) + len(split.test_users) == 3
    # and the other way round: the later rating of movie 1 is older than the rest
    df = ratings_frame([(1, 1, 5, 1), (1, 2, 5, 50), (1, 3, 5, 60), (1, 1, 2, 10), (1, 4, 1, 70)])
    split, users_df, items_df = build(df, titles_for(df["movie_id"]))
    train, val, test = original_pairs(split, users_df, items_df)
    assert test == {(1, 4)} and val == {(1, 3)} and train == {(1, 1), (1, 2)}


@pytest.mark.parametrize("n", [1, 2])
def test_users_with_fewer_than_three_interactions_stay_in_train(n):
    rows = [(1, m, 3, m) for m in range(1, 6)] + [(2, m, 3, m) for m in range(1, n + 1)]
    # a duplicate does not count as a third interaction
    rows.append((2, 1, 4, 99))
    df = ratings_frame(rows)
    split, users_df, items_df = build(df, titles_for(df["movie_id"]))
    train, val, test = original_pairs(split, users_df, items_df)
    assert {u for u, _ in val} == {1} and {u for u, _ in test} == {1}
    assert {(2, m) for m in range(1, n + 1)} <= train
    assert split.train.toarray()[1].sum() == n


def test_exactly_three_interactions_is_eligible():
    df = ratings_frame([(1, 7, 3, 3), (1, 8, 3, 1), (1, 9, 3, 2)])
    split, users_df, items_df = build(df, titles_for(df["movie_id"]))
    assert original_pairs(split, users_df, items_df) == ({(1, 8)}, {(1, 9)}, {(1, 7)})


def test_missing_title_becomes_empty_string():
    df = ratings_frame([(1, 1, 3, 1), (1, 2, 3, 2)])
    _, _, items_df = build(df, pd.DataFrame({"movie_id": [1], "title": ["Only one"]}))
    assert items_df["title"].tolist() == ["Only one", ""]


# --- ties and order independence -----------------------------------------------------------------

def test_timestamp_ties_follow_tie_break_key():
    movies = np.arange(1, 7)
    df = ratings_frame([(30, int(m), 3, 100) for m in movies])
    split, users_df, items_df = build(df, titles_for(movies))
    keys = tie_break_key(np.full(len(movies), 30), movies)
    by_key = movies[np.argsort(keys)]  # ascending: larger key counts as later
    _, val, test = original_pairs(split, users_df, items_df)
    assert test == {(30, int(by_key[-1]))}
    assert val == {(30, int(by_key[-2]))}


def test_ties_only_matter_within_equal_timestamps():
    # movies 1..4 share t=100 but movie 5 at t=200 is strictly the latest
    movies = np.arange(1, 5)
    df = ratings_frame([(3, int(m), 3, 100) for m in movies] + [(3, 5, 3, 200), (3, 6, 3, 50)])
    split, users_df, items_df = build(df, titles_for(range(1, 7)))
    keys = tie_break_key(np.full(4, 3), movies)
    _, val, test = original_pairs(split, users_df, items_df)
    assert test == {(3, 5)}
    assert val == {(3, int(movies[np.argmax(keys)]))}


def random_ratings(seed: int, n_users: int = 40, n_movies: int = 60) -> pd.DataFrame:
    """Ratings with few distinct timestamps (many ties), some repeated pairs, sparse ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in rng.choice(np.arange(1, 500), size=n_users, replace=False):
        count = int(rng.integers(1, 15))
        movies = rng.choice(np.arange(1, n_movies + 1) * 7, size=count, replace=True)  # repeats
        for movie in movies:
            rows.append((int(user), int(movie), int(rng.integers(1, 6)), int(rng.integers(0, 4))))
    return ratings_frame(rows)


def reference_split(df: pd.DataFrame):
    """Brute force: dedupe to latest, order each user by (timestamp, tie_break_key)."""
    latest = {}
    for u, m, _, t in df.itertuples(index=False):
        latest[(u, m)] = max(t, latest.get((u, m), t))
    per_user: dict[int, list] = {}
    for (u, m), t in latest.items():
        key = int(tie_break_key(np.array([u]), np.array([m]))[0])
        per_user.setdefault(u, []).append((t, key, m))
    train, val, test = set(), set(), set()
    for u, events in per_user.items():
        events.sort()
        if len(events) >= 3:
            test.add((u, events[-1][2]))
            val.add((u, events[-2][2]))
            events = events[:-2]
        train.update((u, m) for _, _, m in events)
    return train, val, test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_and_partitions_all_pairs(seed):
    df = random_ratings(seed)
    split, users_df, items_df = build(df, titles_for(df["movie_id"]))
    train, val, test = original_pairs(split, users_df, items_df)
    assert (train, val, test) == reference_split(df)
    all_pairs = set(zip(df["user_id"], df["movie_id"]))
    assert train | val | test == all_pairs
    assert not (train & val) and not (train & test) and not (val & test)
    assert split.train.nnz + len(split.val_users) + len(split.test_users) == len(all_pairs)
    assert users_df["user_id"].tolist() == sorted(df["user_id"].unique())
    assert items_df["movie_id"].tolist() == sorted(df["movie_id"].unique())
    assert len(set(split.test_users.tolist())) == len(split.test_users)  # one test item per user
    np.testing.assert_array_equal(split.val_users, split.test_users)


@pytest.mark.parametrize("seed", [0, 1])
def test_result_does_not_depend_on_row_order(seed):
    df = random_ratings(seed)
    titles = titles_for(df["movie_id"])
    split_a, users_a, items_a = build(df, titles)
    for shuffle_seed in range(3):
        shuffled = df.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
        split_b, users_b, items_b = build(shuffled, titles)
        assert (split_a.train != split_b.train).nnz == 0
        for name in ("val_users", "val_items", "test_users", "test_items"):
            np.testing.assert_array_equal(getattr(split_a, name), getattr(split_b, name))
        pd.testing.assert_frame_equal(users_a, users_b)
        pd.testing.assert_frame_equal(items_a, items_b)


# --- chronological_order + latest_two (the split of `build`), tie_break_key directly -------------

def test_leave_one_out_masks():
    users = np.array([1, 0, 0, 1, 0, 1, 1, 2, 2])
    stamps = np.array([5, 3, 1, 9, 2, 7, 7, 1, 2])
    ties = np.array([0, 0, 0, 0, 0, 10, 20, 0, 0], dtype=np.uint64)
    val, test = leave_one_out(users, stamps, ties)
    # user 0: t=1,2,3 -> test idx1 (t=3), val idx4 (t=2); user 1: t=5,7(10),7(20),9 -> test idx3,
    # val idx6 (the tie with the larger key); user 2: only two -> neither
    assert np.flatnonzero(test).tolist() == [1, 3]
    assert np.flatnonzero(val).tolist() == [4, 6]


def test_leave_one_out_tie_break_decides_equal_timestamps():
    users = np.zeros(4, dtype=np.int64)
    stamps = np.zeros(4, dtype=np.int64)
    ties = np.array([3, 1, 4, 2], dtype=np.uint64)
    val, test = leave_one_out(users, stamps, ties)
    assert np.flatnonzero(test).tolist() == [2]
    assert np.flatnonzero(val).tolist() == [0]


def test_tie_break_key_is_splitmix64_of_the_packed_pair():
    key = tie_break_key(np.array([0]), np.array([0]))
    assert key.dtype == np.uint64
    assert int(key[0]) == 0xE220A8397B1DCDAF  # splitmix64's first output from state 0


def test_tie_break_key_is_fixed_and_distinguishes_pairs():
    u, m = np.meshgrid(np.arange(1, 60), np.arange(1, 60), indexing="ij")
    keys = tie_break_key(u.ravel(), m.ravel())
    assert len(np.unique(keys)) == keys.size
    np.testing.assert_array_equal(keys, tie_break_key(u.ravel().copy(), m.ravel().copy()))
    assert tie_break_key(np.array([1]), np.array([2]))[0] != tie_break_key(np.array([2]), np.array([1]))[0]
    # not ordered by movie id: the key order of one user's movies is a shuffle, not the identity
    row = tie_break_key(np.full(50, 7), np.arange(50))
    assert not np.all(np.diff(row.astype(np.float64)) > 0)
    assert not np.all(np.diff(row.astype(np.float64)) < 0)


# --- reading the raw files -----------------------------------------------------------------------

def read_u_item(path):
    return read_titles(path, DATASETS["ml-100k"].titles_table)


def test_read_ratings_parses_a_good_file(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n")
    df = read_ratings(path)
    assert list(df.columns) == ["user_id", "movie_id", "timestamp", "rating"]
    assert df[["user_id", "movie_id", "timestamp"]].values.tolist() == [
        [196, 242, 881250949], [186, 302, 891717742], [22, 377, 878887116]]
    assert df["rating"].tolist() == [3.0, 3.0, 1.0]
    assert [str(dtype) for dtype in df.dtypes] == ["int64", "int64", "int64", "float64"]


def test_read_ratings_takes_half_star_ratings(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3.5\t881250949\n1\t3\t0.5\t881250950\n")
    assert read_ratings(path)["rating"].tolist() == [3.5, 0.5]


GOOD_LINE = "1\t2\t3\t881250949\n"


@pytest.mark.parametrize(
    "bad_line, line_no, column",
    [
        ("x\t2\t3\t881250949\n", 1, "user_id"),
        ("1\tfoo\t3\t881250949\n", 2, "movie_id"),
        ("1\t2\tx\t881250949\n", 3, "rating"),
        ("1\t2\t\t881250949\n", 3, "rating"),
        ("1\t2\t3\t\n", 4, "timestamp"),
        ("1\t2\t3\t881250949.5\n", 5, "timestamp"),
        ("1\t2\t3\n", 2, "4 fields"),  # a missing field
    ],
)
def test_read_ratings_reports_file_and_line(tmp_path, bad_line, line_no, column):
    path = tmp_path / "ratings.tsv"
    lines = [GOOD_LINE] * 5
    lines[line_no - 1] = bad_line
    path.write_text("".join(lines))
    with pytest.raises(PipelineError) as info:
        read_ratings(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line_no}:"), message
    assert column in message


def test_read_ratings_extra_field_is_an_error(tmp_path):
    path = tmp_path / "u.data"
    path.write_text(GOOD_LINE + "1\t2\t3\t4\t5\n" + GOOD_LINE)
    with pytest.raises(PipelineError, match="u.data, line 2: expected 4 fields"):
        read_ratings(path)


def test_read_ratings_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        read_ratings(tmp_path / "u.data")


def test_read_ratings_empty_file(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("")
    with pytest.raises(PipelineError, match="u.data: the file is empty"):
        read_ratings(path)


def test_read_ratings_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "u.data"
    path.write_text(GOOD_LINE + GOOD_LINE + "1\tx\t3\t4\n")
    with pytest.raises(PipelineError, match="line 3: movie_id"):
        read_ratings(path)
    path.write_text(GOOD_LINE + "\n" + GOOD_LINE + "1\tx\t3\t4\n")  # the blank line is reported
    with pytest.raises(PipelineError, match="line 2: empty line"):
        read_ratings(path)
    path.write_text(GOOD_LINE + "\n\n" + GOOD_LINE + "1\tx\t3\t4\n")  # and counted, were it skipped
    with pytest.raises(PipelineError, match="line 2: empty line"):
        read_ratings(path)


def test_read_ratings_five_fields_everywhere_is_an_error(tmp_path):
    # u.data has 4 fields by its format: a file whose every line has 5 is not a u.data
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\t5\n6\t7\t8\t9\t10\n")
    with pytest.raises(PipelineError, match="u.data, line 1: expected 4 fields .* got 5"):
        read_ratings(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"1\t2\t3\t4\n5\t6\t7\t\xff\n", "line 2: not valid utf-8 text (byte 0xff)"),
        (b"1\t2\t3\t4\n5\t6\t7\t9223372036854775808\n", "line 2: timestamp must be an integer"),
        (b"1\t2\t3\t-9223372036854775809\n", "line 1: timestamp must be an integer"),
        (b"1\t2\t3\t4\n5\t6\t7\t1_000\n", "line 2: timestamp must be an integer"),
        (b"1\t2\tnan\t4\n", "line 1: rating must be a finite number"),
        (b"1\t2\tinf\t4\n", "line 1: rating must be a finite number"),
        (b"1\t2\t1e400\t4\n", "line 1: rating must be a finite number"),
        (b"FALSE\t1\t3\t4\nTRUE\t2\t3\t5\n", "line 1: user_id must be an integer, got 'FALSE'"),
        (b"1\t1\ttrue\t4\n", "line 1: rating must be a finite number, got 'true'"),
    ],
)
def test_read_ratings_names_the_line_where_pandas_does_not(tmp_path, data, expected):
    # each of these used to end in an exception other than PipelineError, a message without a
    # line number, or a frame: inf as a rating, true/false words as 1 and 0
    path = tmp_path / "u.data"
    path.write_bytes(data)
    with pytest.raises(PipelineError) as info:
        read_ratings(path)
    assert str(info.value).startswith(f"{path}, {expected}"), str(info.value)


def test_read_ratings_integral_numbers_do_not_shift_the_blame(tmp_path):
    # pandas' C parser reads '4.0', '1e3', '+7' and ' 8 ' as integers; the error scan must agree,
    # or it names their line instead of the bad one
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4.0\n1\t2\t3\t1e3\n+7\t 8 \t3\t4\n1\tx\t3\t4\n")
    with pytest.raises(PipelineError, match="u.data, line 4: movie_id must be an integer, got 'x'"):
        read_ratings(path)
    path.write_text("1\t2\t3\t4.0\n1\t2\t3\t1e3\n+7\t 8 \t3\t4\n")
    assert read_ratings(path)[["user_id", "movie_id", "timestamp"]].values.tolist() == [
        [1, 2, 4], [1, 2, 1000], [7, 8, 4]]


def test_read_ml_1m_ratings_rejects_a_single_colon(tmp_path):
    # "::" is parsed as ":" (pandas' C engine takes one character): "2:x:3" must not read as 2, 3
    path = tmp_path / "ratings.dat"
    path.write_text("1::2::3::4\n1::2:x:3::4\n")
    with pytest.raises(PipelineError, match="ratings.dat, line 2: expected 4 fields separated by '::'"):
        read_interactions(path, DATASETS["ml-1m"].ratings_table)


def test_read_csv_ratings_with_header_and_crlf(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n"
                     b"\"1\",1029,3.0,1260759179\r\n")
    df = read_interactions(path, DATASETS["ml-latest-small"].ratings_table)
    assert df.values.tolist() == [[1, 31, 1260759144, 2.5], [1, 1029, 1260759179, 3.0]]
    path.write_bytes(b"userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n1,31,2.5\r\n")
    with pytest.raises(PipelineError, match="ratings.csv, line 3: expected 4 fields separated by ','"):
        read_interactions(path, DATASETS["ml-latest-small"].ratings_table)
    path.write_bytes(b"userId,movieId,rating,timestamp\r\n")
    with pytest.raises(PipelineError, match="ratings.csv: no interactions"):
        read_interactions(path, DATASETS["ml-latest-small"].ratings_table)


def test_read_titles_decodes_latin1(tmp_path):
    path = tmp_path / "u.item"
    path.write_bytes(
        b"1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0\n"
        b"2|Mis\xe9rables, Les (1995)|01-Jan-1995||http://x|0|0|0\n"
        b"3|NA|01-Jan-1995||http://x|0|0|0\n"
    )
    df = read_u_item(path)
    assert list(df.columns) == ["movie_id", "title"]
    assert df["movie_id"].dtype == np.int64
    assert df["movie_id"].tolist() == [1, 2, 3]
    assert df["title"].tolist() == ["Toy Story (1995)", "Misérables, Les (1995)", "NA"]


def test_read_titles_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        read_u_item(tmp_path / "u.item")


@pytest.mark.parametrize(
    "data, line_no",
    [
        (b"1|A (1995)|x\nabc|B (1995)|x\n", 2),
        (b"1|A (1995)|x\n\n\n2.5|B (1995)|x\n", 4),  # blank lines are skipped, yet counted
        (b"1|A|x\n99999999999999999999|B|x\n", 2),  # beyond int64
        (b"1|A|x\r\n|B|x\r\n", 2),
    ],
)
def test_read_titles_bad_movie_id(tmp_path, data, line_no):
    path = tmp_path / "u.item"
    path.write_bytes(data)
    with pytest.raises(PipelineError, match=f"u.item, line {line_no}: movie id must be an integer"):
        read_u_item(path)


def test_read_titles_ragged_lines_and_quotes(tmp_path):
    # only the first two fields are used: lines may have more or fewer; quotes are text
    path = tmp_path / "u.item"
    path.write_bytes(b'1|"Bad" Boys|x\n2|B|x|y|z\n\n3\n')
    df = read_u_item(path)
    assert df.values.tolist() == [[1, '"Bad" Boys'], [2, "B"], [3, ""]]


def test_read_titles_other_formats(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_bytes(b"1::Toy Story (1995)::Animation\n2::Mis\xe9rables: Part 1 (1995)::Drama\n")
    df = read_titles(path, DATASETS["ml-1m"].titles_table)
    assert df.values.tolist() == [[1, "Toy Story (1995)"], [2, "Misérables: Part 1 (1995)"]]
    path = tmp_path / "movies.csv"
    path.write_bytes(b'movieId,title,genres\r\n11,"American President, The (1995)",Comedy\r\n'
                     b'12,"Dracula: ""Dead"" (1995)",Horror\r\n')
    df = read_titles(path, DATASETS["ml-latest-small"].titles_table)
    assert df.values.tolist() == [[11, "American President, The (1995)"], [12, 'Dracula: "Dead" (1995)']]
    path.write_bytes(b"movieId,title\r\n1,Caf\xe9\r\n")  # latin-1 in a UTF-8 file
    with pytest.raises(PipelineError, match="movies.csv, line 2: not valid utf-8 text"):
        read_titles(path, DATASETS["ml-latest-small"].titles_table)
