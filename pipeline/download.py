"""Stage `download`: fetch the MovieLens-100K archive and extract the verified files we use.

Source: the official GroupLens URL, or `$MOVIELENS_MIRROR/ml-100k.zip` when MOVIELENS_MIRROR is set
(a local directory or a URL prefix). Only u.data and u.item are extracted, each checked against its
published SHA-256, so any archive holding the official files passes (GroupLens's own, a mirror's
repack). MOVIELENS_SKIP_VERIFY=1 skips that check, for tests that serve generated data.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from pipeline.common import PipelineError, atomic_output, run_stage

log = logging.getLogger("download")

ARCHIVE = "ml-100k.zip"
OFFICIAL_URL = f"https://files.grouplens.org/datasets/movielens/{ARCHIVE}"
OFFICIAL_MD5 = "0e33842e24a9c977be4e0107933c0723"  # 4,924,029 bytes
MEMBERS = {  # file we use -> SHA-256 of the official release's copy
    "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
}
TIMEOUT_S = 30
ATTEMPTS = 3


def resolve_source(mirror: str | None) -> str:
    """Return the archive's location: a local path or a URL."""
    if not mirror:
        return OFFICIAL_URL
    if urllib.parse.urlparse(mirror).scheme in ("http", "https", "ftp", "file"):
        return mirror.rstrip("/") + "/" + ARCHIVE
    return str(Path(mirror).expanduser().resolve() / ARCHIVE)


def _fetch_url(url: str, dest: Path) -> None:
    """Download url to dest with a progress bar; retry transient failures with backoff."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(dest, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=ARCHIVE) as bar:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            return
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == ATTEMPTS:
                raise PipelineError(
                    f"download of {url} failed: HTTP {err.code} {err.reason}. "
                    "Set MOVIELENS_MIRROR to a directory or URL prefix holding ml-100k.zip to use a copy."
                ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            if attempt == ATTEMPTS:
                reason = getattr(err, "reason", err)
                raise PipelineError(
                    f"download of {url} failed after {ATTEMPTS} attempts: {reason}. "
                    "Without network access, set MOVIELENS_MIRROR to a directory or URL prefix "
                    "holding ml-100k.zip."
                ) from None
        wait = 2 ** (attempt - 1)
        log.warning("attempt %d of %d failed; retrying in %d s", attempt, ATTEMPTS, wait)
        time.sleep(wait)


def fetch(source: str, dest: Path) -> None:
    """Copy the archive at `source` (path or URL) to `dest`."""
    if "://" in source:
        _fetch_url(source, dest)
        return
    if not Path(source).is_file():
        raise PipelineError(f"{source}: no such file (MOVIELENS_MIRROR must be a directory holding {ARCHIVE})")
    shutil.copyfile(source, dest)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def extract_verified(archive: Path, out_dir: Path, verify: bool = True) -> None:
    """Write ml-100k/<name> for each name in MEMBERS into out_dir, refusing any checksum mismatch."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for name, expected in MEMBERS.items():
                member = f"ml-100k/{name}"
                if member not in names:
                    raise PipelineError(f"{archive}: no {member} in the archive")
                data = zf.read(member)
                actual = hashlib.sha256(data).hexdigest()
                if verify and actual != expected:
                    raise PipelineError(
                        f"{archive}: {member} failed its checksum: expected sha256 {expected}, got {actual}"
                    )
                (out_dir / name).write_bytes(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise PipelineError(f"{archive}: not a readable zip archive ({err})") from None


def download(out_dir: Path, mirror: str | None, verify: bool = True) -> None:
    """Fetch the archive and write the verified members to out_dir, all or nothing."""
    source = resolve_source(mirror)
    log.info("fetching %s", source)
    with atomic_output(out_dir, is_dir=True) as tmp:
        archive = tmp / ARCHIVE
        fetch(source, archive)
        md5 = _digest(archive, "md5")
        if md5 == OFFICIAL_MD5:
            log.info("archive md5 %s: the official GroupLens archive", md5)
        else:
            log.info("archive md5 %s differs from the official %s; checking its files", md5, OFFICIAL_MD5)
        if not verify:
            log.warning("MOVIELENS_SKIP_VERIFY is set: file checksums are NOT checked")
        extract_verified(archive, tmp, verify)
        archive.unlink()
    log.info("wrote %s to %s", ", ".join(MEMBERS), out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write u.data and u.item into")
    args = parser.parse_args()
    verify = os.environ.get("MOVIELENS_SKIP_VERIFY", "") not in ("1", "true", "yes")
    download(args.out_dir, os.environ.get("MOVIELENS_MIRROR") or None, verify)


if __name__ == "__main__":
    run_stage(main)
