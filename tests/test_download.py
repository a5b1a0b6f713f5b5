"""The download stage against a misbehaving server and hostile or broken archives.

Every failure must be a one-line error (exit 2) and leave neither data/raw nor any file that a
later run could mistake for a finished download.
"""
from __future__ import annotations

import http.server
import socket
import stat
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import stage, user_error, write_movielens_zip

VERIFY_OFF = {"MOVIELENS_SKIP_VERIFY": "1"}


class Handler(http.server.BaseHTTPRequestHandler):
    """/ok/ serves the archive; /404/ and /503/ fail; /drop/ closes the connection halfway."""

    archive = b""
    hits: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        kind = self.path.strip("/").split("/")[0]
        Handler.hits[kind] = Handler.hits.get(kind, 0) + 1
        if kind in ("404", "503"):
            self.send_error(int(kind))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        if kind == "drop":
            self.wfile.write(self.archive[: len(self.archive) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(self.archive)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    Handler.archive = write_movielens_zip(tmp_path_factory.mktemp("served")).read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def nothing_left(workdir: Path) -> bool:
    """True if the stage left no output and no temporary in data/."""
    data = workdir / "data"
    return not data.exists() or not any(data.iterdir())


def download(workdir: Path, mirror: str | Path, **env: str):
    return stage("download", "data/raw", cwd=workdir, env={"MOVIELENS_MIRROR": str(mirror), **env})


def test_served_archive_downloads(workdir: Path, server: str) -> None:
    assert download(workdir, f"{server}/ok", **VERIFY_OFF).returncode == 0
    assert sorted(p.name for p in (workdir / "data/raw").iterdir()) == ["source.json", "u.data", "u.item"]


def test_http_404_fails_at_once_naming_the_url(workdir: Path, server: str) -> None:
    Handler.hits.clear()
    err = user_error(download(workdir, f"{server}/404", **VERIFY_OFF))
    assert f"{server}/404/ml-100k.zip" in err and "HTTP 404" in err and "MOVIELENS_MIRROR" in err
    assert Handler.hits["404"] == 1  # a client error is not retried
    assert nothing_left(workdir)


def test_http_503_is_retried_then_fails(workdir: Path, server: str) -> None:
    Handler.hits.clear()
    err = user_error(download(workdir, f"{server}/503", **VERIFY_OFF))
    assert "HTTP 503" in err and f"{server}/503/ml-100k.zip" in err
    assert Handler.hits["503"] == 3
    assert nothing_left(workdir)


def test_connection_dropped_mid_transfer_leaves_nothing(workdir: Path, server: str) -> None:
    Handler.hits.clear()
    err = user_error(download(workdir, f"{server}/drop", **VERIFY_OFF))
    assert "failed after 3 attempts" in err and "IncompleteRead" in err
    assert Handler.hits["drop"] == 3
    assert nothing_left(workdir)
    # A previous good download survives a later dropped one untouched.
    assert download(workdir, f"{server}/ok", **VERIFY_OFF).returncode == 0
    before = (workdir / "data/raw/u.data").read_bytes()
    user_error(download(workdir, f"{server}/drop", **VERIFY_OFF))
    assert (workdir / "data/raw/u.data").read_bytes() == before
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["raw"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "corrupt_member"])
def test_broken_archive_is_refused_with_checksums(workdir: Path, tmp_path: Path, damage: str) -> None:
    mirror = tmp_path / "mirror"
    good = write_movielens_zip(mirror).read_bytes()
    if damage == "truncated":
        bad = good[: len(good) // 2]
    elif damage == "garbage":
        bad = b"<html>not found</html>"
    else:  # flip bytes inside the first member's compressed data: a CRC failure on read
        bad = bytearray(good)
        for i in range(60, 90):
            bad[i] ^= 0xFF
        bad = bytes(bad)
    (mirror / "ml-100k.zip").write_bytes(bad)
    err = user_error(download(workdir, mirror, **VERIFY_OFF))
    assert "ml-100k.zip" in err
    if damage == "corrupt_member":
        assert "truncated or corrupt" in err or "checksum" in err
    else:
        assert "truncated or corrupt" in err and "the official archive's is 0e33842e" in err
    assert nothing_left(workdir)


def evil_zip(path: Path, name: str, symlink: bool = False) -> None:
    """A zip with valid members plus one hostile entry."""
    write_movielens_zip(path.parent)
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, "owned")


@pytest.mark.parametrize("name, symlink, why", [
    ("../evil.txt", False, "climbs out"),
    ("ml-100k/../../evil.txt", False, "climbs out"),
    ("/tmp/movielens-evil-absolute.txt", False, "absolute path"),
    ("ml-100k/link", True, "symbolic link"),
])
def test_archive_with_escaping_member_is_refused(workdir: Path, tmp_path: Path, name: str,
                                                 symlink: bool, why: str) -> None:
    mirror = tmp_path / "mirror"
    evil_zip(mirror / "ml-100k.zip", name, symlink)
    err = user_error(download(workdir, mirror, **VERIFY_OFF))
    assert repr(name) in err and why in err
    assert nothing_left(workdir)
    assert not Path("/tmp/movielens-evil-absolute.txt").exists()
    assert not [p for p in tmp_path.rglob("*evil*")] and not [p for p in tmp_path.rglob("link")]


@pytest.mark.parametrize("missing", ["u.data", "u.item"])
def test_archive_without_a_needed_file_names_it(workdir: Path, tmp_path: Path, missing: str) -> None:
    source = zipfile.ZipFile(write_movielens_zip(tmp_path / "src"))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with zipfile.ZipFile(mirror / "ml-100k.zip", "w") as zf:
        for name in source.namelist():
            if not name.endswith(missing):
                zf.writestr(name, source.read(name))
    err = user_error(download(workdir, mirror, **VERIFY_OFF))
    assert f"no ml-100k/{missing} in the archive" in err
    assert nothing_left(workdir)
