"""Catalog entries and downloads: the real huggingface_hub client against a loopback hub."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import namedtuple
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from huggingface_hub import constants

from models import catalog, download
from models.download import (ChecksumMismatchError, GatedRepoAccessError, NotEnoughDiskError,
                             download_quant, yaml_snippet)
from models.errors import UnloadableModelError
from tests.test_gguf_loadable import write_gguf

ROOT = Path(__file__).resolve().parents[1]
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<fn>.+)$")
COMMIT = "c0ffee" * 6 + "beef"
CHUNK = constants.DOWNLOAD_CHUNK_SIZE  # huggingface_hub writes (and so can resume) whole chunks only
HEADER_RANGE = f"bytes=0-{download.HEADER_FIRST_BYTES - 1}"  # the header check's first GET of a large file
# the smallest GGUF header the download's check lets through: general.architecture = llama, no tensors
GGUF_START = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 20) + b"general.architecture"
              + struct.pack("<IQ", 8, 5) + b"llama")


def payload(n: int, seed: int) -> bytes:
    return GGUF_START + random.Random(seed).randbytes(n - len(GGUF_START))


@dataclass
class FakeHub:
    """Speaks the hub's file protocol: HEAD/GET /{repo}/resolve/{rev}/{file}, Range -> 206."""
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # key -> (served bytes, claimed sha)
    gated: dict[str, int] = field(default_factory=dict)                # repo -> HTTP status
    drop_once: dict[str, int] = field(default_factory=dict)            # key -> bytes sent before dropping
    stall: dict[str, tuple[int, threading.Event]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, key, Range)
    url: str = ""

    def add(self, repo: str, filename: str, content: bytes, claimed: bytes | None = None) -> None:
        self.files[f"{repo}/{filename}"] = (content, hashlib.sha256(claimed or content).hexdigest())

    def ranges(self, key: str) -> list[str]:
        return [r for m, k, r in self.requests if m == "GET" and k == key and r]

    def gets(self) -> int:
        return sum(m == "GET" for m, _, _ in self.requests)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _refuse(self, status: int, code: str, body: bool) -> None:
            data = json.dumps({"error": f"{code}: access to this repo is restricted"}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _serve(self, body: bool) -> None:
            m = RESOLVE.match(self.path)
            key = f"{m['repo']}/{unquote(m['fn'])}" if m else self.path
            rng = self.headers.get("Range")
            hub.requests.append((self.command, key, rng))
            if m and m["repo"] in hub.gated:
                return self._refuse(hub.gated[m["repo"]], "GatedRepo", body)
            if key not in hub.files:
                return self._refuse(404, "EntryNotFound", body)
            content, sha = hub.files[key]
            first, _, last = (rng or "bytes=0-").removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last or len(content) - 1), len(content) - 1)
            self.send_response(206 if rng else 200)
            for name, value in (("X-Repo-Commit", COMMIT), ("ETag", f'"{sha}"'),
                                ("X-Linked-Etag", f'"{sha}"'), ("X-Linked-Size", str(len(content))),
                                ("Accept-Ranges", "bytes"), ("Content-Length", str(end + 1 - start))):
                self.send_header(name, value)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
            self.end_headers()
            if body:
                self._body(key, content[start:end + 1], first=not rng)

        def _body(self, key: str, data: bytes, first: bool) -> None:
            if first and key in hub.drop_once:  # a connection lost mid-file
                self.wfile.write(data[:hub.drop_once.pop(key)])
                return
            if first and key in hub.stall:      # a client killed mid-file
                n, release = hub.stall.pop(key)
                self.wfile.write(data[:n])
                self.wfile.flush()
                release.wait(30)
                return
            self.wfile.write(data)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token reaches the fake hub
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield fake
    for _, release in fake.stall.values():
        release.set()
    server.shutdown()
    server.server_close()


def tiny_quant(*files: str, repo: str = "tester/Tiny-GGUF") -> catalog.Quant:
    return catalog.Quant("Q4_K_M", repo, files, 0, "test")


def run_cli(hub: FakeHub, tmp_path: Path, *args: str,
            wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """`storynet-miner download` in its own process: HF_ENDPOINT is read when huggingface_hub is imported."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [sys.executable, "-m", "miner", "download", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)


# ---- catalog ------------------------------------------------------------------------------------------

def test_catalog_has_the_four_models_with_both_quants() -> None:
    assert set(catalog.MODELS) == {"llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "mixtral-8x7b"}
    for entry in catalog.MODELS.values():
        for quant in ("Q4_K_M", "Q4_0"):
            q = entry.quant(quant)
            assert q.files and all(f.endswith(".gguf") for f in q.files), q
            n = len(q.files)
            if n > 1:  # llama.cpp split naming: every part, in order
                assert [f[-20:] for f in q.files] == [f"-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert catalog.get("Llama-3.1-8B").quant("q4_k_m").total_bytes == 4_920_733_536
    assert len(catalog.get("qwen2.5-7b").quant("Q4_K_M").files) == 2
    assert catalog.get("llama-3.1-8b").source_gated and not catalog.get("qwen2.5-7b").source_gated


def test_mixtral_is_a_conversion_with_merged_experts() -> None:
    entry = catalog.get("mixtral-8x7b")
    files = {q.quant: (q.repo, q.files) for q in entry.quants}
    assert files == {"Q4_K_M": ("mradermacher/Mixtral-8x7B-Instruct-v0.1-GGUF", ("Mixtral-8x7B-Instruct-v0.1.Q4_K_M.gguf",)),
                     "Q4_0": ("gobean/Mixtral-8x7B-Instruct-v0.1-GGUF", ("Mixtral-8x7B-Instruct-v0.1-q4-0.gguf",))}
    assert all("TheBloke" not in q.repo for m in catalog.MODELS.values() for q in m.quants)


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(catalog.UnknownModelError, match="llama-3.1-8b, llama-3.1-70b"):
        catalog.get("gpt-5")
    with pytest.raises(catalog.UnknownModelError, match="Q4_K_M, Q4_0"):
        catalog.get("mixtral-8x7b").quant("Q8_0")


# ---- downloads ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dropped_connection_resumes_with_range_and_verifies(hub: FakeHub, tmp_path: Path) -> None:
    data = payload(CHUNK + CHUNK // 2, seed=1)
    hub.add("tester/Tiny-GGUF", "tiny-Q4_K_M.gguf", data)
    hub.drop_once["tester/Tiny-GGUF/tiny-Q4_K_M.gguf"] = CHUNK + 1000
    stale = tmp_path / "m" / "tiny-Q4_K_M.gguf.0123456789abcdef.part"  # left by an older version
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    quiet = {"endpoint": hub.url, "log": lambda _: None}
    paths = download_quant(tiny_quant("tiny-Q4_K_M.gguf"), tmp_path / "m", **quiet)
    assert paths == [tmp_path / "m" / "tiny-Q4_K_M.gguf"]
    assert paths[0].read_bytes() == data
    assert hub.ranges("tester/Tiny-GGUF/tiny-Q4_K_M.gguf") == [HEADER_RANGE, f"bytes={CHUNK}-"]
    assert not list((tmp_path / "m").glob("*.part"))  # the stale part is gone too
    gets = hub.gets()
    download_quant(tiny_quant("tiny-Q4_K_M.gguf"), tmp_path / "m", **quiet)
    assert hub.gets() == gets  # already there and verified: nothing fetched again


@pytest.mark.slow
def test_two_downloads_of_one_file_at_once_end_with_one_good_file(hub: FakeHub, tmp_path: Path) -> None:
    """The second waits on the first's lock, then finds the file done: one GET, no interleaved bytes."""
    quant = catalog.get("llama-3.1-8b").quant("Q4_K_M")
    key = f"{quant.repo}/{quant.files[0]}"
    data = payload(2 * CHUNK, seed=7)
    hub.add(quant.repo, quant.files[0], data)
    release = threading.Event()
    hub.stall[key] = (CHUNK + 1000, release)  # the first holds the file half-written until released
    first = run_cli(hub, tmp_path, "llama-3.1-8b", "--dir", "models", wait=False)
    deadline = time.monotonic() + 30
    while not any(m == "GET" and k == key and not r for m, k, r in hub.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_cli(hub, tmp_path, "llama-3.1-8b", "--dir", "models", wait=False)
    time.sleep(2)  # the second has asked the hub for the file's metadata and waits on the lock now
    release.set()  # the first's connection drops at the stall; it resumes (or the second does, after it)
    outs = [p.communicate(timeout=60) for p in (first, second)]
    assert (tmp_path / "models" / quant.files[0]).read_bytes() == data
    assert not list((tmp_path / "models").glob("*.part"))
    assert any(b"waiting for it" in err for _, err in outs)
    assert second.returncode == 0, outs[1][1][-2000:]
    gets = [r for m, k, r in hub.requests if m == "GET" and k == key and r != HEADER_RANGE]
    assert gets == [None, f"bytes={CHUNK}-"]  # one download at a time: the file, then its rest after the drop


@pytest.mark.slow
def test_killed_download_resumes_on_the_next_run(hub: FakeHub, tmp_path: Path) -> None:
    quant = catalog.get("llama-3.1-8b").quant("Q4_K_M")
    key = f"{quant.repo}/{quant.files[0]}"
    data = payload(CHUNK + CHUNK // 4, seed=2)
    hub.add(quant.repo, quant.files[0], data)
    release = threading.Event()
    hub.stall[key] = (CHUNK + 1000, release)
    proc = run_cli(hub, tmp_path, "llama-3.1-8b", "--dir", "models", wait=False)
    part = tmp_path / "models" / f"{quant.files[0]}.{hashlib.sha256(data).hexdigest()[:16]}.part"
    deadline = time.monotonic() + 30
    while not (part.is_file() and part.stat().st_size == CHUNK) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    release.set()
    assert part.stat().st_size == CHUNK

    done = run_cli(hub, tmp_path, "llama-3.1-8b", "--dir", "models")
    assert done.returncode == 0, done.stderr
    assert hub.ranges(key) == [HEADER_RANGE, HEADER_RANGE, f"bytes={CHUNK}-"]  # each run read the header first
    assert (tmp_path / "models" / quant.files[0]).read_bytes() == data
    assert done.stdout == ("backends:\n  - type: llama_cpp\n"
                           f"    model_path: models/{quant.files[0]}\n    n_gpu_layers: auto\n")
    assert "resuming" in done.stderr


def test_corrupted_file_is_caught_and_moved_aside(hub: FakeHub, tmp_path: Path) -> None:
    good = payload(8 * 1024, seed=3)
    bad = bytes(b ^ 0xFF if i == 100 else b for i, b in enumerate(good))
    hub.add("tester/Tiny-GGUF", "tiny-Q4_K_M.gguf", bad, claimed=good)
    with pytest.raises(ChecksumMismatchError, match="Run the same command again") as err:
        download_quant(tiny_quant("tiny-Q4_K_M.gguf"), tmp_path, endpoint=hub.url, log=lambda _: None)
    assert hashlib.sha256(good).hexdigest() in str(err.value)
    assert not (tmp_path / "tiny-Q4_K_M.gguf").exists()
    assert (tmp_path / "tiny-Q4_K_M.gguf.corrupt").read_bytes() == bad
    assert not list(tmp_path.glob("*.part"))


def test_split_gguf_fetches_every_part(hub: FakeHub, tmp_path: Path) -> None:
    quant = catalog.get("qwen2.5-7b").quant("Q4_K_M")
    parts = {fn: payload(5000 + i, seed=10 + i) for i, fn in enumerate(quant.files)}
    for fn, data in parts.items():
        hub.add(quant.repo, fn, data)
    done = run_cli(hub, tmp_path, "qwen2.5-7b", "--dir", "weights", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [Path(p).name for p in out["files"]] == list(quant.files)
    assert out["model_path"] == out["files"][0]
    for fn, data in parts.items():
        assert (tmp_path / "weights" / fn).read_bytes() == data
    assert "model_path: weights/qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf" in out["yaml"]


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_says_how_to_log_in(hub: FakeHub, tmp_path: Path, status: int) -> None:
    hub.add("meta-llama/Gated-GGUF", "g.gguf", b"x" * 100)
    hub.gated["meta-llama/Gated-GGUF"] = status
    with pytest.raises(GatedRepoAccessError) as err:
        download_quant(tiny_quant("g.gguf", repo="meta-llama/Gated-GGUF"), tmp_path, endpoint=hub.url)
    msg = str(err.value)
    assert f"HTTP {status}" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert "https://huggingface.co/meta-llama/Gated-GGUF" in msg
    assert hub.gets() == 0 and not list(tmp_path.iterdir())


def test_full_disk_is_refused_before_downloading(hub: FakeHub, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("tester/Tiny-GGUF", "a.gguf", payload(3000, seed=4))
    hub.add("tester/Tiny-GGUF", "b.gguf", payload(4000, seed=5))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10_000, 9_000, 1_000))
    with pytest.raises(NotEnoughDiskError) as err:
        download_quant(tiny_quant("a.gguf", "b.gguf"), tmp_path / "d", endpoint=hub.url)
    assert str(tmp_path / "d") in str(err.value)
    assert "needs 7,000 bytes more but only 1,000 bytes is free" in str(err.value)
    assert "--dir" in str(err.value)
    assert hub.ranges("tester/Tiny-GGUF/a.gguf") == ["bytes=0-2999"] and hub.gets() == 1  # the header only


class FillsUp:
    """A file on a disk with `room` bytes left: the write that does not fit fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def test_a_disk_that_fills_up_mid_download_says_so_and_the_next_run_resumes(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(3 * CHUNK, seed=6)
    hub.add("tester/Tiny-GGUF", "tiny-Q4_K_M.gguf", data)
    real_get = download.http_get
    monkeypatch.setattr(download, "http_get", lambda url, f, **kw: real_get(url, FillsUp(f, CHUNK + 10), **kw))
    quiet = {"endpoint": hub.url, "log": lambda _: None}
    with pytest.raises(NotEnoughDiskError) as err:
        download_quant(tiny_quant("tiny-Q4_K_M.gguf"), tmp_path / "m", **quiet)
    assert str(tmp_path / "m") in str(err.value) and "disk filled up" in str(err.value)
    assert "run the same command again to resume" in str(err.value) and "--dir" in str(err.value)
    assert not (tmp_path / "m" / "tiny-Q4_K_M.gguf").exists()  # never a truncated file under the real name
    monkeypatch.setattr(download, "http_get", real_get)  # space freed
    paths = download_quant(tiny_quant("tiny-Q4_K_M.gguf"), tmp_path / "m", **quiet)
    assert paths[0].read_bytes() == data
    assert hub.ranges("tester/Tiny-GGUF/tiny-Q4_K_M.gguf")[-1] == f"bytes={CHUNK + 10}-"


def test_a_file_llama_cpp_cannot_load_is_refused_from_its_header_before_a_byte_is_written(
        hub: FakeHub, tmp_path: Path) -> None:
    old = write_gguf(tmp_path / "old.gguf", split_experts=True).read_bytes()  # TheBloke's Mixtral layout
    hub.add("TheBloke/Tiny-GGUF", "tiny.Q4_K_M.gguf", old)
    with pytest.raises(UnloadableModelError) as err:
        download_quant(tiny_quant("tiny.Q4_K_M.gguf", repo="TheBloke/Tiny-GGUF"), tmp_path / "m", endpoint=hub.url,
                       log=lambda _: None)
    assert str(err.value).startswith("TheBloke/Tiny-GGUF/tiny.Q4_K_M.gguf: its MoE experts are stored one tensor "
                                     "each (blk.0.ffn_gate.0.weight), a layout llama.cpp dropped in 2024; ")
    assert not list((tmp_path / "m").iterdir())  # no .part, no .gguf, no lock
    assert [r for m, _, r in hub.requests if m == "GET"] == [f"bytes=0-{len(old) - 1}"]


def test_a_long_header_is_read_in_doubling_ranges_then_the_file_downloads(hub: FakeHub, tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "new.gguf", filler_bytes=3 << 20).read_bytes()  # Llama-3's vocabulary: ~3 MiB
    hub.add("tester/Tiny-GGUF", "tiny-Q4_K_M.gguf", data)
    paths = download_quant(tiny_quant("tiny-Q4_K_M.gguf"), tmp_path / "m", endpoint=hub.url, log=lambda _: None)
    assert paths[0].read_bytes() == data
    mib = 1 << 20
    assert [r for m, _, r in hub.requests if m == "GET"] == [
        f"bytes=0-{mib - 1}", f"bytes=0-{2 * mib - 1}", f"bytes=0-{len(data) - 1}", None]  # 4 MiB > the file


def test_yaml_quotes_paths_that_need_it(tmp_path: Path) -> None:
    odd = tmp_path / "my models: new" / "m.gguf"
    assert f"model_path: {json.dumps(str(odd))}" in yaml_snippet(odd)
