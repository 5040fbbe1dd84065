"""Download a catalog model's GGUF files from the Hugging Face Hub, resumably and verified.

    storynet-miner download llama-3.1-8b [--quant Q4_K_M] [--dir DIR] [--json]
    storynet-miner download --list

The config lines that select the file (or --json) go to stdout; progress and messages to stderr. The
files go to the config's models_dir unless --dir says otherwise.

Each file is fetched with huggingface_hub's own client (metadata HEAD, auth headers, progress bar,
in-run retries with Range) into `<dir>/<file>.<sha-prefix>.part`, checked against the SHA-256 the hub
publishes for LFS files, then renamed into place. huggingface_hub 2.x's `hf_hub_download` deletes its
temporary file when a run fails, so a 40 GB download interrupted at 39 GB would start over; keeping
our own `.part` file lets the next run continue where the last one stopped. Before any of that, the first
part's GGUF header is read with ranged GETs, and a file this llama.cpp cannot load is refused, not fetched.
"""
from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from models.errors import (ChecksumMismatchError, ConfigError, DownloadError, DownloadInterruptedError,
                          GatedRepoAccessError, NotEnoughDiskError, UnloadableModelError)
from models import catalog, default_models_dir
from models.catalog import Quant
from models.gguf_header import Header, NeedMoreBytes, parse_header
from models.loadable import why_unloadable

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_YAML = re.compile(r"[A-Za-z0-9_./-]+")
# A GGUF header is mostly the vocabulary: about 0.5 MB for 32k tokens, several MB for Llama-3's 128k.
HEADER_FIRST_BYTES = 1 << 20
HEADER_MAX_BYTES = 64 << 20
_OUT_OF_DATE = ("the catalog entry may be out of date: compare with https://huggingface.co/{repo} and fix "
                "models/catalog.py")
Log = Callable[[str], None]


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    url: str               # where the bytes are (the hub may redirect to a CDN)
    size: int
    sha256: str | None     # LFS files only: the hub's X-Linked-Etag
    commit: str
    send_token: bool       # False when the bytes live off the hub (signed CDN url)

    def part_path(self, dest: Path) -> Path:
        # the hash in the name ties a partial file to one version of the remote file
        return dest / f"{self.filename}.{(self.sha256 or self.commit)[:16]}.part"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n:,} bytes"


def _hub_error(err: HfHubHTTPError, repo: str, filename: str, revision: str) -> DownloadError:
    status = err.response.status_code if err.response is not None else None
    if isinstance(err, GatedRepoError) or status in (401, 403):
        return GatedRepoAccessError(
            f"{repo}: access denied (HTTP {status}); the repository is gated or needs a login.\n"
            f"  1. open https://huggingface.co/{repo} while logged in and accept its license\n"
            "  2. run `hf auth login` (`huggingface-cli login` on older huggingface_hub), or set HF_TOKEN\n"
            "     to a read token from https://huggingface.co/settings/tokens\n"
            "  3. run this command again")
    if isinstance(err, (RemoteEntryNotFoundError, RevisionNotFoundError)) or status == 404:
        return DownloadError(
            f"{repo}: no file {filename} at revision {revision}; the catalog entry may be out of date: "
            f"compare with https://huggingface.co/{repo}/tree/{revision} and fix models/catalog.py")
    return DownloadError(f"{repo}/{filename}: the hub answered HTTP {status}; try again later ({err})")


def remote_file(repo: str, filename: str, *, revision: str = "main", token: str | None = None,
                endpoint: str | None = None) -> RemoteFile:
    """Ask the hub (one HEAD) for the file's size, SHA-256 and download location."""
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except HfHubHTTPError as err:
        raise _hub_error(err, repo, filename, revision) from None
    except httpx2.TransportError as err:
        raise DownloadError(f"cannot reach {endpoint or constants.ENDPOINT} for {repo}/{filename}: {err}; "
                            "check the network (or HF_ENDPOINT) and run again") from None
    if meta.size is None or meta.commit_hash is None:
        raise DownloadError(f"{url}: the server sent no file size or commit; "
                            "is HF_ENDPOINT a Hugging Face hub?")
    sha = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None
    on_hub = urlparse(meta.location).netloc == urlparse(url).netloc
    return RemoteFile(repo, filename, meta.location, meta.size, sha, meta.commit_hash, on_hub)


def _first_bytes(r: RemoteFile, n: int, token: str | None) -> bytes:
    """The first n bytes of the file, through huggingface_hub's client (retries, auth headers, proxies)."""
    headers = {**(build_hf_headers(token=token) if r.send_token else {}), "Range": f"bytes=0-{n - 1}"}
    data = bytearray()
    try:
        with http_stream_backoff("GET", r.url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as got:
            hf_raise_for_status(got)
            for chunk in got.iter_bytes():
                data += chunk
                if len(data) >= n:  # a server that ignores Range sends the whole file: stop reading
                    break
    except HfHubHTTPError as err:
        raise _hub_error(err, r.repo, r.filename, r.commit) from None
    except httpx2.TransportError as err:
        raise DownloadError(f"{r.repo}/{r.filename}: reading its header failed ({err}); check the network and "
                            "run again") from None
    return bytes(data[:n])


def remote_header(r: RemoteFile, token: str | None = None) -> Header:
    """The file's GGUF header, read with ranged GETs from its start, each twice as long as the last."""
    n = HEADER_FIRST_BYTES
    while True:
        data = _first_bytes(r, min(n, r.size), token)
        try:
            return parse_header(data, f"{r.repo}/{r.filename}")
        except NeedMoreBytes:
            if len(data) >= r.size or n >= HEADER_MAX_BYTES:
                raise DownloadError(f"{r.repo}/{r.filename}: no whole GGUF header in its first {_gb(len(data))}; "
                                    f"{_OUT_OF_DATE.format(repo=r.repo)}") from None
            n *= 2
        except ValueError as e:
            raise DownloadError(f"{e}; {_OUT_OF_DATE.format(repo=r.repo)}") from None


def check_loadable(r: RemoteFile, token: str | None = None) -> None:
    """UnloadableModelError, before a byte is written, when this llama.cpp could not load the file."""
    if reason := why_unloadable(remote_header(r, token), f"{r.repo}/{r.filename}"):
        raise UnloadableModelError(reason)


def _done(r: RemoteFile, dest: Path) -> bool:
    final = dest / r.filename
    return final.is_file() and final.stat().st_size == r.size


def check_disk(dest: Path, files: list[RemoteFile]) -> None:
    """Refuse to start when the files (minus what is already here) cannot fit on dest's disk."""
    needed = sum(r.size - _part_size(r, dest) for r in files if not _done(r, dest))
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise NotEnoughDiskError(
            f"{dest}: needs {_gb(needed)} more but only {_gb(free)} is free; free some space or "
            "choose a directory on a larger disk with --dir")


def _part_size(r: RemoteFile, dest: Path) -> int:
    part = r.part_path(dest)
    return part.stat().st_size if part.is_file() else 0


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(r: RemoteFile, path: Path, final: Path, log: Log) -> None:
    if r.sha256 is None:
        log(f"{r.filename}: the hub publishes no SHA-256 for it (not an LFS file); size checked only")
        return
    log(f"{r.filename}: checking SHA-256 of {_gb(r.size)}")
    actual = sha256_of(path)
    if actual != r.sha256:
        bad = final.with_name(final.name + ".corrupt")
        os.replace(path, bad)
        raise ChecksumMismatchError(
            f"{final}: SHA-256 {actual} does not match the hub's {r.sha256} "
            f"({r.repo}@{r.commit[:12]}); the file was moved to {bad}. Run the same command again "
            "to download it afresh (delete the .corrupt file once you no longer need it)")


def _fetch(r: RemoteFile, dest: Path, token: str | None, log: Log) -> Path:
    """One process at a time per file (huggingface_hub downloads under a file lock too): two downloads of
    the same file would append to one .part file in turns. The second waits, then finds the file done."""
    final = dest / r.filename
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"{final}: another download of this file is running; waiting for it")
        lock.acquire()
    try:
        return _fetch_alone(r, dest, token, log)
    finally:
        lock.release()


def _fetch_alone(r: RemoteFile, dest: Path, token: str | None, log: Log) -> Path:
    final = dest / r.filename
    if _done(r, dest):
        _verify(r, final, final, log)
        log(f"{final}: already downloaded")
        return final
    part = r.part_path(dest)
    for stale in dest.glob(f"{glob.escape(r.filename)}.*.part"):  # an older version of the file
        if stale != part:
            stale.unlink()
    resume = _part_size(r, dest)
    if resume > r.size:  # not a prefix of this file: start over
        part.unlink()
        resume = 0
    if resume:
        log(f"{r.filename}: resuming at {_gb(resume)} of {_gb(r.size)}")
    headers = build_hf_headers(token=token) if r.send_token else {}
    try:
        with part.open("ab", buffering=0) as f:  # unbuffered: what arrived is on disk if we are killed
            http_get(r.url, f, resume_size=resume, headers=headers, expected_size=r.size,
                     displayed_filename=r.filename)
    except (httpx2.TransportError, OSError) as err:
        got = _part_size(r, dest)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise NotEnoughDiskError(
                f"{dest}: the disk filled up at {_gb(got)} of {r.filename} ({_gb(r.size)}); free "
                f"{_gb(r.size - got)} there and run the same command again to resume, or choose a directory "
                f"on a larger disk with --dir") from None
        raise DownloadInterruptedError(
            f"{r.filename}: download stopped at {_gb(got)} of {_gb(r.size)} ({err}); "
            "run the same command again to resume") from None
    _verify(r, part, final, log)
    os.replace(part, final)
    return final


def download_quant(quant: Quant, dest_dir: str | Path, *, revision: str = "main", token: str | None = None,
                   endpoint: str | None = None, log: Log = _stderr) -> list[Path]:
    """Download every part of `quant` into dest_dir; returns the paths, first part first."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    # all metadata first: a gated repo, a missing file or one llama.cpp cannot load fails before any byte is written
    files = [remote_file(quant.repo, fn, revision=revision, token=token, endpoint=endpoint)
             for fn in quant.files]
    if not all(_done(r, dest) for r in files):
        check_loadable(files[0], token)  # the first part holds the metadata and the first blocks' tensors
    check_disk(dest, files)
    return [_fetch(r, dest, token, log) for r in files]


def yaml_snippet(model_path: Path) -> str:
    """The config lines that select the downloaded model."""
    try:
        shown = str(model_path.resolve().relative_to(Path.cwd()))
    except ValueError:
        shown = str(model_path.resolve())
    if not _PLAIN_YAML.fullmatch(shown):
        shown = json.dumps(shown)  # a JSON string is a valid double-quoted YAML scalar
    return (f"backends:\n  - type: llama_cpp\n    model_path: {shown}\n"
            "    n_gpu_layers: auto\n")


def _catalog_table() -> str:
    rows = [("name", "quant", "size", "repo", "files", "source gated")]
    for m in catalog.MODELS.values():
        for q in m.quants:
            approx = "~" if q.size_source == "estimate" else ""
            rows.append((m.name, q.quant, f"{approx}{q.total_bytes / 1e9:.2f} GB", q.repo,
                         str(len(q.files)), "yes" if m.source_gated else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(catalog.MODELS)}")
    p.add_argument("--quant", default="Q4_K_M", help="Q4_K_M (default) or Q4_0")
    p.add_argument("--dir", type=Path, help="where to put the file(s) (default: models_dir of --config, "
                                            f"else {default_models_dir()})")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the GGUF repo")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of YAML")
    p.add_argument("--list", action="store_true", help="list the catalog and exit")


def command(args: argparse.Namespace, models_dir: str | None = None) -> int:
    """models_dir: where the miner's config keeps models (default: default_models_dir()); --dir wins."""
    if args.list:
        print(_catalog_table())
        return 0
    if not args.name:
        raise ConfigError(f"give a model name ({', '.join(catalog.MODELS)}) or --list")
    folder = (args.dir or Path(models_dir or default_models_dir())).expanduser()
    entry = catalog.get(args.name)
    quant = entry.quant(args.quant)
    _stderr(f"downloading {entry.name} {quant.quant} into {folder}")
    paths = download_quant(quant, folder, revision=args.revision)
    snippet = yaml_snippet(paths[0])
    if args.json:
        print(json.dumps({"model": entry.name, "quant": quant.quant, "repo": quant.repo, "dir": str(folder),
                          "files": [str(p) for p in paths], "model_path": str(paths[0]), "yaml": snippet}, indent=2))
    else:
        print(snippet, end="")
    return 0
