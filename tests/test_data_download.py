"""`leaflens data download` against a real HTTP server on 127.0.0.1 and real local folders/archives."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from conftest import compose, data_overrides
from leaflens.data.download import MARKER, UnsafeArchiveError, download

CLASSES = ("Apple___healthy", "Grape___Black_rot")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _tree() -> dict[str, bytes]:
    return {
        f"plantvillage/{c}/img_{i}.JPG": _jpeg(10 * k + i) for k, c in enumerate(CLASSES) for i in range(3)
    }


def _zip(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Server:
    """Serves in-memory files, honours ``Range: bytes=N-`` and records every request's headers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        files, requests = self.files, self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append({"path": self.path, **dict(self.headers)})
                data = files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if "Range" in self.headers:
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def base_cfg() -> DictConfig:
    # One real composition per module; each test copies it and points the data paths at its own tmp dir.
    return compose(*data_overrides(Path("/unused")), task_name="data")


def _cfg(base: DictConfig, tmp_path: Path, source: object, **data: object) -> DictConfig:
    cfg = OmegaConf.create(OmegaConf.to_container(base))
    cfg.data.source = str(source) if source is not None else None
    cfg.data.raw_dir = str(tmp_path / "raw")
    cfg.data.processed_dir = str(tmp_path / "processed")
    cfg.data.download_dir = str(tmp_path / "downloads")
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != MARKER
    }


def test_url_download_verified_extracted_and_idempotent(
    server: _Server, base_cfg: DictConfig, tmp_path: Path
) -> None:
    tree = _tree()
    archive = _zip(tree)
    server.files["/good.zip"] = archive
    cfg = _cfg(base_cfg, tmp_path, f"{server.url}/good.zip", sha256=_sha(archive))
    before = len(server.requests)

    raw = download(cfg)

    assert raw == (tmp_path / "raw").resolve()
    assert _files(raw) == tree
    assert len(server.requests) == before + 1
    assert not (tmp_path / "downloads" / "good.zip").exists()  # archive removed after extraction
    marker = (raw / MARKER).read_text()

    assert download(cfg) == raw  # second run: nothing fetched, nothing rewritten
    assert len(server.requests) == before + 1
    assert (raw / MARKER).read_text() == marker
    assert _files(raw) == tree


def test_wrong_checksum_is_refused_and_nothing_is_kept(
    server: _Server, base_cfg: DictConfig, tmp_path: Path
) -> None:
    archive = _zip(_tree())
    server.files["/tampered.zip"] = archive
    cfg = _cfg(base_cfg, tmp_path, f"{server.url}/tampered.zip", sha256="0" * 64)
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(cfg)
    assert not (tmp_path / "raw").exists()
    assert not list((tmp_path / "downloads").glob("*"))


def test_url_without_sha256_is_refused(server: _Server, base_cfg: DictConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.sha256 is required"):
        download(_cfg(base_cfg, tmp_path, f"{server.url}/good.zip", sha256=None))


def test_http_error_is_raised(server: _Server, base_cfg: DictConfig, tmp_path: Path) -> None:
    import requests

    with pytest.raises(requests.HTTPError):
        download(_cfg(base_cfg, tmp_path, f"{server.url}/missing.zip", sha256="0" * 64))


def test_partial_download_resumes_with_range(server: _Server, base_cfg: DictConfig, tmp_path: Path) -> None:
    tree = _tree()
    archive = _zip(tree)
    server.files["/resume.zip"] = archive
    half = len(archive) // 2
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "resume.zip.part").write_bytes(archive[:half])
    before = len(server.requests)

    raw = download(_cfg(base_cfg, tmp_path, f"{server.url}/resume.zip", sha256=_sha(archive)))

    new = server.requests[before:]
    assert len(new) == 1 and new[0].get("Range") == f"bytes={half}-"
    assert _files(raw) == tree


@pytest.mark.parametrize(
    ("name", "entries", "links"),
    [
        ("traversal.zip", {"plantvillage/Apple___healthy/a.JPG": b"x", "../evil.txt": b"pwned"}, None),
        ("absolute.zip", {"/tmp/evil.txt": b"pwned"}, None),
        ("symlink.zip", {"plantvillage/Apple___healthy/a.JPG": b"x"}, {"plantvillage/link": "/etc/passwd"}),
    ],
)
def test_unsafe_archives_are_refused(
    server: _Server, base_cfg: DictConfig, tmp_path: Path, name: str, entries: dict, links: dict | None
) -> None:
    archive = _zip(entries, links)
    server.files[f"/{name}"] = archive
    with pytest.raises(UnsafeArchiveError):
        download(_cfg(base_cfg, tmp_path, f"{server.url}/{name}", sha256=_sha(archive)))
    assert not (tmp_path / "raw").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "raw.partial").exists()


def test_local_tar_with_traversal_is_refused(base_cfg: DictConfig, tmp_path: Path) -> None:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"pwned"))
    with pytest.raises(UnsafeArchiveError):
        download(_cfg(base_cfg, tmp_path / "out", path))
    assert not (tmp_path / "out" / "evil.txt").exists()


def test_local_folder_and_zip_sources(base_cfg: DictConfig, tmp_path: Path) -> None:
    tree = _tree()
    folder = tmp_path / "folder"
    for name, data in tree.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    zip_path = tmp_path / "local.zip"
    zip_path.write_bytes(_zip(tree))

    assert _files(download(_cfg(base_cfg, tmp_path / "a", folder))) == tree
    assert _files(download(_cfg(base_cfg, tmp_path / "b", zip_path))) == tree
    assert _files(folder) == tree  # the source is left untouched


def test_changed_source_replaces_raw_dir(base_cfg: DictConfig, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "Apple___healthy").mkdir(parents=True)
    (first / "Apple___healthy" / "a.JPG").write_bytes(_jpeg(1))
    (second / "Grape___Black_rot").mkdir(parents=True)
    (second / "Grape___Black_rot" / "b.JPG").write_bytes(_jpeg(2))
    raw = download(_cfg(base_cfg, tmp_path / "out", first))
    download(_cfg(base_cfg, tmp_path / "out", second))
    assert set(_files(raw)) == {"Grape___Black_rot/b.JPG"}


def test_bad_sources_give_clear_errors(base_cfg: DictConfig, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download(_cfg(base_cfg, tmp_path, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty folder"):
        download(_cfg(base_cfg, tmp_path, tmp_path / "empty"))
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        download(_cfg(base_cfg, tmp_path, tmp_path / "empty.zip"))
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        download(_cfg(base_cfg, tmp_path, tmp_path / "notes.txt"))
    for blank in (None, "  "):
        with pytest.raises(ValueError, match=r"data\.source is empty"):
            download(_cfg(base_cfg, tmp_path, blank))
    assert not (tmp_path / "raw").exists()


def test_foreign_raw_dir_is_not_overwritten(base_cfg: DictConfig, tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mine.txt").write_text("keep me")
    source = tmp_path / "src" / "Apple___healthy"
    source.mkdir(parents=True)
    (source / "a.JPG").write_bytes(_jpeg(3))
    with pytest.raises(FileExistsError, match="not written by"):
        download(_cfg(base_cfg, tmp_path, source.parent))
    assert (tmp_path / "raw" / "mine.txt").read_text() == "keep me"


def test_source_that_is_the_raw_dir_is_used_in_place(base_cfg: DictConfig, tmp_path: Path) -> None:
    (tmp_path / "raw" / "Apple___healthy").mkdir(parents=True)
    (tmp_path / "raw" / "Apple___healthy" / "a.JPG").write_bytes(_jpeg(4))
    assert download(_cfg(base_cfg, tmp_path, tmp_path / "raw")) == (tmp_path / "raw").resolve()
    assert set(_files(tmp_path / "raw")) == {"Apple___healthy/a.JPG"}
    assert not (tmp_path / "raw" / MARKER).exists()
