"""The climbmix download path of the training template's harness, against a loopback HTTP server serving
small parquet shards: parallel fetch, retries, atomic writes, sha256 manifest, corrupt files rejected, and an
unreachable host failing fast instead of hanging."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "training_template"
sys.path.insert(0, str(TEMPLATE))

import prepare  # noqa: E402


def parquet_bytes(texts: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=64)
    return sink.getvalue()


class Shards(http.server.ThreadingHTTPServer):
    """Serves /shard_NNNNN.parquet; `failures[name]` answers 503 that many times first; `corrupt` names get
    garbage."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.failures: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.hits: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Shards

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        name = self.path.lstrip("/")
        self.server.hits[name] = self.server.hits.get(name, 0) + 1
        if self.server.failures.get(name, 0) > 0:
            self.server.failures[name] -= 1
            self.send_error(503)
            return
        body = self.server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        if name in self.server.corrupt:
            body = b"PAR1 this is not a parquet file" + body[: len(body) // 3]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    srv = Shards()
    for i in (0, 1, 7):
        srv.files[prepare.climbmix_name(i)] = parquet_bytes(
            [f"Document {i}-{j}: the quick brown fox {j * i} jumps over the lazy dog." * 3 for j in range(300)])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_retries_records_sha256_and_leaves_no_partial_files(server, tmp_path):
    server.failures[prepare.climbmix_name(1)] = 2  # two 503s, then success
    manifest = prepare.download_climbmix(tmp_path, 2, base_url=server.url, val_shard=7, backoff=0.01)
    folder = tmp_path / "climbmix"
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_00007.parquet"):
        assert manifest["files"][name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert (folder / name).read_bytes() == server.files[name]
    assert server.hits["shard_00001.parquet"] == 3
    assert manifest["train"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert manifest["val"] == "shard_00007.parquet"
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no temp files left behind"
    # a second call finds everything recorded and downloads nothing
    before = dict(server.hits)
    prepare.download_climbmix(tmp_path, 2, base_url=server.url, val_shard=7)
    assert server.hits == before


def test_corrupt_shard_is_rejected_and_never_lands(server, tmp_path):
    name = prepare.climbmix_name(0)
    server.corrupt.add(name)
    with pytest.raises(prepare.DataUnavailable, match="parquet|attempts"):
        prepare.download_file(f"{server.url}/{name}", tmp_path / name, retries=1, backoff=0.01)
    assert server.hits[name] == 2
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_local_shard_is_fetched_again(server, tmp_path):
    prepare.download_climbmix(tmp_path, 1, base_url=server.url, val_shard=7, backoff=0.01)
    shard = tmp_path / "climbmix" / prepare.climbmix_name(0)
    shard.write_bytes(b"truncated")
    prepare.download_climbmix(tmp_path, 1, base_url=server.url, val_shard=7, backoff=0.01)
    assert shard.read_bytes() == server.files[shard.name]


def test_unreachable_host_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(prepare.DataUnavailable):
        prepare.download_climbmix(tmp_path, 1, base_url=f"http://127.0.0.1:{port}", val_shard=7,
                                  retries=1, backoff=0.01, timeout=2)
    assert time.time() - t0 < 10


def test_climbmix_corpus_builds_a_cache_with_val_and_test(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_CLIMBMIX_URL", server.url)
    monkeypatch.setenv("FARM_CLIMBMIX_SHARDS", "2")
    monkeypatch.setattr(prepare, "CLIMBMIX_VAL_SHARD", 7)
    path = prepare.build_cache(prepare.PROFILES["cpu"], "climbmix", tmp_path / "data", tmp_path / "cache",
                               log=lambda _: None)
    splits = json.loads((path / "manifest.json").read_text())["splits"]
    assert splits["train"]["docs"] >= 600 and splits["val"]["docs"] > 50 and splits["test"]["docs"] > 50
    assert path.name.startswith("climbmix2-")


def test_user_folder_corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(120):
        (folder / f"note{i:03d}.txt").write_text(f"Note {i}.\n\nA paragraph about item {i}, and more words.\n")
    (folder / "table.parquet").write_bytes(parquet_bytes([f"row {j} of the table" for j in range(50)]))
    path = prepare.build_cache(prepare.PROFILES["cpu"], str(folder), tmp_path / "data", tmp_path / "cache",
                               log=lambda _: None)
    splits = json.loads((path / "manifest.json").read_text())["splits"]
    assert sum(s["docs"] for s in splits.values()) == 170
    assert path.name.startswith("dir-")


def test_a_folder_corpus_cache_is_found_by_its_pinned_name_without_the_folder(tmp_path, monkeypatch, capsys):
    """The worker pins a folder corpus's cache name (`prepare.py --corpus-id`) and hides the folder from the
    candidate: with FARM_CORPUS_ID the harness finds the cache without listing the folder."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(300):  # enough documents that every split gets some
        (folder / f"note{i:03d}.txt").write_text(f"Note {i}.\n\nA paragraph about item {i}.\n")
    monkeypatch.delenv("FARM_CORPUS_ID", raising=False)
    assert prepare.main(["--corpus-id", "--corpus", str(folder)]) == 0
    pinned = capsys.readouterr().out.strip()
    assert pinned.startswith("dir-") and len(pinned) == 16
    built = prepare.build_cache(prepare.PROFILES["cpu"], str(folder), tmp_path / "data", tmp_path / "cache",
                                log=lambda _: None)
    assert built.name.startswith(pinned + "-")
    # the folder as the candidate sees it: an empty mount. Listing it would name another cache; the pin does not
    for f in folder.iterdir():
        f.unlink()
    assert not prepare.cache_path(prepare.PROFILES["cpu"], str(folder), tmp_path / "cache").name.startswith(pinned)
    monkeypatch.setenv("FARM_CORPUS_ID", pinned)
    assert prepare.cache_path(prepare.PROFILES["cpu"], str(folder), tmp_path / "cache") == built
    monkeypatch.setenv("FARM_CORPUS_ID", "../elsewhere")
    with pytest.raises(prepare.DataUnavailable, match="not a folder corpus's cache name"):
        prepare.cache_path(prepare.PROFILES["cpu"], str(folder), tmp_path / "cache")
    # named corpora ignore it
    assert prepare.cache_path(prepare.PROFILES["cpu"], "bible", tmp_path / "cache").name.startswith("bible-")
