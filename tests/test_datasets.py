"""Every `dataset`: its archive is checked and read, its ids map back, custom tables and synthetic data."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SHARED_DATA, set_params, stage, user_error
from pipeline.data import load_id_maps, load_split
from pipeline.datasets import DATASETS, read_interactions, read_titles
from pipeline.synthetic import SHAPES, generate

ML1M_RATINGS = "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n2::3408::1::978299000\n"
ML1M_MOVIES = "661::James and the Giant Peach (1996)::Animation\n1193::One Flew Over: a Nest (1975)::Drama\n" \
              "3408::Misérables, Les (1995)::Drama\n"


def make_zip(mirror: Path, archive: str, members: dict[str, bytes]) -> Path:
    mirror.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(mirror / archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return mirror / archive


def build(workdir: Path, mirror: Path | None = None, verify: bool = True) -> tuple[str, str]:
    """Run download and build_matrix in workdir; return their stderr."""
    env = {"MOVIELENS_MIRROR": str(mirror)} if mirror else {}
    if not verify:
        env["MOVIELENS_SKIP_VERIFY"] = "1"
    down = stage("download", "data/raw", cwd=workdir, env=env)
    assert down.returncode == 0, down.stderr
    built = stage("build_matrix", "data/raw", "data/prepared", cwd=workdir)
    assert built.returncode == 0, built.stderr
    return down.stderr, built.stderr


def test_ml1m_format_is_read(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text(ML1M_RATINGS)
    (tmp_path / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    ratings = read_interactions(tmp_path / "ratings.dat", DATASETS["ml-1m"].ratings_table)
    assert ratings["user_id"].tolist() == [1, 1, 2, 2] and ratings["movie_id"].tolist() == [1193, 661, 1193, 3408]
    assert ratings["timestamp"].tolist()[0] == 978300760 and ratings["rating"].tolist() == [5, 3, 4, 1]
    titles = read_titles(tmp_path / "movies.dat", DATASETS["ml-1m"].titles_table)
    assert titles["title"].tolist() == ["James and the Giant Peach (1996)", "One Flew Over: a Nest (1975)",
                                        "Misérables, Les (1995)"]


def test_ml1m_bad_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text(ML1M_RATINGS + "3::12::4\n")
    with pytest.raises(Exception) as err:
        read_interactions(tmp_path / "ratings.dat", DATASETS["ml-1m"].ratings_table)
    assert "ratings.dat, line 5" in str(err.value) and "expected 4 fields" in str(err.value)


def test_ml1m_through_the_stages(workdir: Path, tmp_path: Path) -> None:
    lines = "".join(f"{u}::{m}::{1 + (u + m) % 5}::{978300000 + 7 * m + u}\n"
                    for u in range(1, 31) for m in (661, 1193, 3408, 1, 2, 3, 4, 5))
    movies = ML1M_MOVIES + "".join(f"{m}::Film {m} (1990)::Drama\n" for m in range(1, 6))
    mirror = tmp_path / "mirror"
    make_zip(mirror, "ml-1m.zip", {"ml-1m/ratings.dat": lines, "ml-1m/movies.dat": movies.encode("latin-1")})
    set_params(workdir, dataset="ml-1m", test_negatives=2, topK=3)
    build(workdir, mirror, verify=False)
    assert sorted(p.name for p in (workdir / "data/raw").iterdir()) == ["movies.dat", "ratings.dat", "source.json"]
    users, items = load_id_maps(workdir / "data/prepared")
    assert users["user_id"].tolist() == list(range(1, 31))
    assert items.set_index("movie_id").loc[3408, "title"] == "Misérables, Les (1995)"
    # With checksums on, these generated files are refused, naming the published SHA-256.
    err = user_error(stage("download", "data/raw2", cwd=workdir, env={"MOVIELENS_MIRROR": str(mirror)}))
    assert "ml-1m/ratings.dat failed its checksum: expected sha256 506d64ca" in err


def test_md5_checked_archives_refuse_any_other_archive(workdir: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    make_zip(mirror, "ml-20m.zip", {"ml-20m/ratings.csv": "userId,movieId,rating,timestamp\n1,2,3.5,4\n",
                                    "ml-20m/movies.csv": "movieId,title,genres\n2,A (1990),Drama\n"})
    set_params(workdir, dataset="ml-20m")
    err = user_error(stage("download", "data/raw", cwd=workdir, env={"MOVIELENS_MIRROR": str(mirror)}))
    assert "is not the official ml-20m.zip's cd245b17a1ae2cc31bb14903e1204af3" in err
    assert not (workdir / "data/raw").exists()


@pytest.mark.skipif(not (SHARED_DATA / "ml-latest-small/ratings.csv").exists(), reason="no ../shared/data")
def test_real_ml_latest_small(workdir: Path, tmp_path: Path) -> None:
    """The real release (CSV, header, CRLF, sparse movie ids), checked against its published SHA-256."""
    mirror = tmp_path / "mirror"
    make_zip(mirror, "ml-latest-small.zip", {
        f"ml-latest-small/{name}": (SHARED_DATA / "ml-latest-small" / name).read_bytes()
        for name in ("ratings.csv", "movies.csv")})
    set_params(workdir, dataset="ml-latest-small")
    build(workdir, mirror)
    split = load_split(workdir / "data/prepared")
    users, items = load_id_maps(workdir / "data/prepared")
    assert (split.n_users, split.n_items) == (610, 9724)
    assert split.train.nnz + len(split.val_users) + len(split.test_users) == 100_836
    assert items["movie_id"].max() == 193609 and items.set_index("movie_id").loc[1, "title"] == "Toy Story (1995)"
    assert not items["title"].str.contains("\r").any()


def test_custom_tsv_without_header_string_ids_and_min_rating(workdir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(25):
        for j, m in enumerate(rng.choice(40, 12, replace=False)):
            rows.append(f"fan{u:02d}\tfilm-{m}\t{1 + (u * j) % 5}\n")
    table = tmp_path / "mine.tsv"
    table.write_text("".join(rows))
    set_params(workdir, dataset="custom", custom_path=str(table), custom_sep="\t", custom_header=False,
               custom_user=0, custom_item=1, custom_time="", custom_rating=2, min_rating=2,
               test_negatives=5, topK=5)
    _, log = build(workdir)
    kept = [r for r in rows if int(r.split("\t")[2]) >= 2]
    assert f"kept {len(kept)} of {len(rows)} interactions" in log
    users, items = load_id_maps(workdir / "data/prepared")
    split = load_split(workdir / "data/prepared")
    assert users["user_id"].tolist() == sorted({r.split("\t")[0] for r in kept})
    assert items["movie_id"].tolist() == sorted({r.split("\t")[1] for r in kept})
    # Round trip: the test item of each user is that user's last kept line (no timestamps: line order).
    last = {}
    for r in kept:
        last[r.split("\t")[0]] = r.split("\t")[1]
    got = dict(zip(users["user_id"][split.test_users], items["movie_id"][split.test_items]))
    assert got == last


def test_custom_errors_name_the_param_or_column(workdir: Path, tmp_path: Path) -> None:
    set_params(workdir, dataset="custom", custom_path=str(tmp_path / "missing.csv"))
    err = user_error(stage("download", "data/raw", cwd=workdir))
    assert "'custom_path'" in err and "missing.csv" in err
    table = tmp_path / "t.csv"
    table.write_text("who,what,when\na,b,1\n")
    set_params(workdir, custom_path=str(table))
    assert stage("download", "data/raw", cwd=workdir).returncode == 0
    err = user_error(stage("build_matrix", "data/raw", "data/prepared", cwd=workdir))
    assert "no column named 'user'" in err and "'who', 'what', 'when'" in err


def test_changing_dataset_without_download_is_caught(prepared: Path) -> None:
    set_params(prepared, dataset="ml-1m")
    err = user_error(stage("build_matrix", "data/raw", "data/prepared", cwd=prepared))
    assert "holds dataset 'ml-100k'" in err and "'ml-1m'" in err


def test_synthetic_1m_shape_and_determinism() -> None:
    shape = SHAPES["synthetic-1m"]
    a, b = generate(shape), generate(shape)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 1_000_209 and a["userId"].nunique() == 6_040 and a["movieId"].nunique() == 3_706
    assert not a.duplicated(["userId", "movieId"]).any()
    per_user = a.groupby("userId").size()
    assert per_user.min() >= 20 and per_user.max() > 10 * per_user.median()  # heavy users
    counts = np.sort(a["movieId"].value_counts().to_numpy())[::-1]
    assert counts[: len(counts) // 10].sum() > 0.4 * len(a)  # a long tail: top 10% items, > 40% of ratings
    same_user = np.diff(a["userId"].to_numpy()) == 0
    assert (np.diff(a["timestamp"].to_numpy())[same_user] >= 0).all()


def test_synthetic_1m_through_the_stages(workdir: Path) -> None:
    set_params(workdir, dataset="synthetic-1m")
    build(workdir)
    split = load_split(workdir / "data/prepared")
    assert (split.n_users, split.n_items) == (6_040, 3_706)
    assert split.train.nnz + 2 * 6_040 == 1_000_209


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(prepared: Path) -> None:
    assert stage("sample_negatives", "data/prepared", "data/candidates", cwd=prepared).returncode == 0
    set_params(prepared, device="cuda")
    err = user_error(stage("train", "mlp", "data/prepared", "data/candidates", "models", "training", cwd=prepared))
    assert "'device' is 'cuda'" in err and "no CUDA device" in err
    assert not (prepared / "models").exists() and not (prepared / "training").exists()
