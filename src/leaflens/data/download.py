"""``leaflens data download``: put the raw PlantVillage images into ``data.raw_dir``.

Sources (``data.source``):

- a local folder of class folders, or a local ``.zip`` / ``.tar(.gz)`` archive;
- an ``http(s)://`` archive URL, with ``data.sha256`` required: resumable download (HTTP Range), checksum
  verified before anything is extracted;
- ``kaggle:owner/name`` (or ``kaggle`` to use ``data.kaggle_handle``), fetched with ``kagglehub``.

Archives are extracted safely: every member is checked first, and an absolute path, a ``..`` component or a
link refuses the whole archive. The result is moved into place only when complete, and a marker file records
the source, so a second run with the same source does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import requests
from omegaconf import DictConfig
from tqdm import tqdm

from leaflens.logs import logger

MARKER = ".leaflens-source.json"
_CHUNK = 1 << 20


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target directory, or is a link."""


# --------------------------------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_fingerprint(folder: Path) -> dict[str, int]:
    """Cheap change detector for a local folder: file count, total size and newest mtime."""
    count = size = newest = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            info = os.stat(os.path.join(dirpath, name))
            count += 1
            size += info.st_size
            newest = max(newest, int(info.st_mtime))
    return {"files": count, "bytes": size, "newest_mtime": newest}


def read_marker(raw_dir: str | Path) -> dict[str, Any] | None:
    """The source ``download`` last put into ``raw_dir`` (``None`` when it did not fill it)."""
    marker = Path(raw_dir) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def _check_member_name(name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"archive member {name!r} would escape the target directory ('..')")


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive into ``target`` after checking every member.

    Raises:
        UnsafeArchiveError: a member has an absolute path, a ``..`` component, or is a (sym/hard) link.
        ValueError: not a zip or tar archive.
    """
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_member_name(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeArchiveError(f"archive member {info.filename!r} is a symbolic link")
            for info in tqdm(members, desc="extract", unit="file", leave=False):
                zf.extract(info, target)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            entries = tf.getmembers()
            for member in entries:
                _check_member_name(member.name)
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(f"archive member {member.name!r} is a link")
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"archive member {member.name!r} is not a regular file or folder"
                    )
            # The "data" filter re-checks all of the above inside tarfile itself.
            tf.extractall(target, members=entries, filter="data")
        return
    raise ValueError(f"{archive} is neither a zip nor a tar archive")


def fetch_url(url: str, destination: Path, expected_sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination``, resuming a partial ``.part`` file, and verify its sha256.

    Raises:
        ValueError: the checksum does not match (the download is deleted).
        requests.HTTPError: the server answered with an error status.
    """
    expected = expected_sha256.lower()
    if destination.is_file():
        if sha256_file(destination) == expected:
            logger.info("Archive already downloaded and verified: {}", destination)
            return destination
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if offset and response.status_code == 416:  # the partial file is already complete
            response.close()
        else:
            response.raise_for_status()
            if offset and response.status_code != 206:
                logger.info("Server ignored the Range request; downloading {} from the start", url)
                offset = 0
            elif offset:
                logger.info("Resuming {} at byte {}", url, offset)
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with (
                partial.open("ab" if offset else "wb") as handle,
                tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc="download", leave=False
                ) as bar,
            ):
                for chunk in response.iter_content(_CHUNK):
                    handle.write(chunk)
                    bar.update(len(chunk))
    actual = sha256_file(partial)
    if actual != expected:
        partial.unlink()
        raise ValueError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}. "
            "The download was deleted; check data.sha256 or the URL."
        )
    partial.replace(destination)
    return destination


# --------------------------------------------------------------------------------------------------- sources


def _resolve_source(cfg: DictConfig) -> dict[str, Any]:
    """What to fetch: kind (folder|archive|url|kaggle) and the identity recorded in the marker."""
    source = cfg.data.get("source")
    if source is None or not str(source).strip():
        raise ValueError("data.source is empty: give a folder, a .zip, an http(s) URL or kaggle:owner/name")
    source = str(source).strip()
    if source == "kaggle" or source.startswith("kaggle:"):
        handle = source.partition(":")[2] or cfg.data.get("kaggle_handle")
        if not handle:
            raise ValueError("data.source=kaggle needs data.kaggle_handle (owner/name)")
        return {"kind": "kaggle", "source": f"kaggle:{handle}", "handle": handle}
    if urlparse(source).scheme in ("http", "https"):
        sha = cfg.data.get("sha256")
        if not sha:
            raise ValueError(
                f"data.sha256 is required to download {source} (the expected sha256 of the archive)"
            )
        return {"kind": "url", "source": source, "sha256": str(sha).lower()}
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"data.source {path} does not exist")
    if path.is_dir():
        fingerprint = _folder_fingerprint(path)
        if fingerprint["files"] == 0:
            raise ValueError(f"data.source {path} is an empty folder")
        return {"kind": "folder", "source": str(path), "fingerprint": fingerprint}
    info = path.stat()
    if info.st_size == 0:
        raise ValueError(f"data.source {path} is an empty file")
    return {
        "kind": "archive",
        "source": str(path),
        "fingerprint": {"bytes": info.st_size, "mtime": int(info.st_mtime)},
    }


def _fill(spec: dict[str, Any], staging: Path, cfg: DictConfig) -> None:
    """Put the source's files into ``staging``."""
    kind = spec["kind"]
    if kind == "folder":
        logger.info("Copying {} -> {}", spec["source"], staging)
        shutil.copytree(spec["source"], staging, symlinks=False)
    elif kind == "archive":
        logger.info("Extracting {} -> {}", spec["source"], staging)
        safe_extract(Path(spec["source"]), staging)
    elif kind == "url":
        name = Path(urlparse(spec["source"]).path).name or "archive"
        archive = fetch_url(spec["source"], Path(cfg.data.download_dir) / name, spec["sha256"])
        safe_extract(archive, staging)
        if not cfg.data.get("keep_archive", False):
            archive.unlink()
    elif kind == "kaggle":
        import kagglehub  # only needed for this source

        logger.info("Downloading Kaggle dataset {} with kagglehub", spec["handle"])
        fetched = Path(kagglehub.dataset_download(spec["handle"], output_dir=str(staging))).resolve()
        if staging.resolve() not in (fetched, *fetched.parents):  # e.g. Colab ignores output_dir
            shutil.copytree(fetched, staging, symlinks=False, dirs_exist_ok=True)
    else:  # pragma: no cover - _resolve_source only returns the kinds above
        raise AssertionError(kind)
    if not any(p.is_file() for p in staging.rglob("*")):
        raise ValueError(f"data.source {spec['source']} holds no files")


def download(cfg: DictConfig) -> Path:
    """Fetch ``data.source`` into ``data.raw_dir`` (idempotent) and return ``data.raw_dir``."""
    raw_dir = Path(cfg.data.raw_dir).resolve()
    spec = _resolve_source(cfg)
    if spec["kind"] == "folder" and Path(spec["source"]) == raw_dir:
        logger.info("data.source is data.raw_dir ({}); nothing to fetch", raw_dir)
        return raw_dir
    marker = read_marker(raw_dir)
    if marker is not None and marker == spec:
        logger.info("{} already holds {}; nothing to do", raw_dir, spec["source"])
        return raw_dir
    if raw_dir.exists() and marker is None and any(raw_dir.iterdir()):
        raise FileExistsError(
            f"{raw_dir} exists and was not written by `leaflens data download`; "
            "remove it or point data.raw_dir elsewhere"
        )
    staging = raw_dir.with_name(raw_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        _fill(spec, staging, cfg)
        (staging / MARKER).write_text(json.dumps(spec, indent=2) + "\n")
        if raw_dir.exists():
            logger.info("Replacing {} (it held {})", raw_dir, marker["source"] if marker else "nothing")
            shutil.rmtree(raw_dir)
        raw_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(raw_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("Raw data ready in {}", raw_dir)
    return raw_dir
