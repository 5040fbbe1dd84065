"""Files of llama.cpp's source tree, taken from the sdist of the installed llama-cpp-python.

A GGUF file must be written the way the llama.cpp that loads it expects, and that llama.cpp is the one
compiled into llama-cpp-python: its sdist carries the same tree under vendor/llama.cpp. pip downloads the
sdist once per version into a cache folder, which keeps it so that later requests need no network; only
the files asked for are extracted from it.

    CACHE/llama-cpp-python-VERSION/llama_cpp_python-VERSION.tar.gz   the sdist, as pip downloaded it
    CACHE/llama-cpp-python-VERSION/llama.cpp/...                      the files extracted so far

    python -m models.llama_cpp_source [--cache DIR]   # download the sdist now (scripts/setup.sh --dev)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from models.errors import SourceError

log = logging.getLogger(__name__)
PACKAGE = "llama-cpp-python"
VENDORED = "vendor/llama.cpp/"  # llama.cpp's root inside the sdist's top folder


def default_cache() -> Path:
    """$XDG_CACHE_HOME/storynet-miner, or ~/.cache/storynet-miner (scripts/setup.sh moves the cache of the
    subnet's first name, storyfi-miner, here)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "storynet-miner"


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"{PACKAGE} is not installed in {sys.prefix}; run scripts/setup.sh") from None


def llama_cpp_tree(paths: Sequence[str], cache: Path | None = None) -> Path:
    """The cached llama.cpp source folder of the installed version, holding every path asked for.

    Paths are relative to llama.cpp's root (`convert_hf_to_gguf.py`, `gguf-py/gguf`); a folder comes
    with everything under it. The sdist is downloaded the first time a path is missing from the cache.
    """
    folder = version_folder(cache)
    tree = folder / "llama.cpp"
    missing = [p for p in paths if not (tree / p).exists()]
    if missing:
        extract(sdist(folder), missing, tree)
    return tree


def version_folder(cache: Path | None) -> Path:
    return (cache or default_cache()) / f"{PACKAGE}-{installed_version()}"


def sdist(folder: Path) -> Path:
    """The sdist in folder, downloaded first if it is not there."""
    archives = sorted(folder.glob("*.tar.gz"))
    if archives:
        return archives[0]
    folder.mkdir(parents=True, exist_ok=True)
    requirement = f"{PACKAGE}=={installed_version()}"
    log.info("downloading the source of %s (about 75 MB) into %s, once for this version", requirement, folder)
    # A temporary folder, renamed at the end: an interrupted download never looks complete.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                              "--no-binary", ":all:", requirement, "--dest", tmp],
                             check=False, capture_output=True, text=True)
        downloaded = sorted(Path(tmp).glob("*.tar.gz"))
        if run.returncode != 0 or not downloaded:
            raise SourceError(
                f"pip could not download the sdist of {requirement} ({run.stderr.strip()[-500:]}). Check that "
                f"PyPI is reachable, or put the sdist in {folder} yourself: `pip download --no-deps "
                f"--no-binary :all: {requirement} --dest {folder}`")
        os.replace(downloaded[0], folder / downloaded[0].name)
    return folder / downloaded[0].name


def extract(archive: Path, paths: Sequence[str], tree: Path) -> None:
    tree.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
            top = tar.next().name.split("/")[0]  # llama_cpp_python-VERSION
            root = f"{top}/{VENDORED}"
            members = [m for m in tar.getmembers()
                       if any(m.name == root + p or m.name.startswith(f"{root}{p}/") for p in paths)]
            tar.extractall(tmp, members=members, filter="data")
            for path in paths:
                place(path, Path(tmp, root), tree, archive)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        reason = " ".join(str(exc).split())  # tarfile explains on several lines
        raise SourceError(f"{archive} is damaged ({reason}); delete it and run again to download it anew") from None


def place(path: str, extracted: Path, tree: Path, archive: Path) -> None:
    """Move path from the extracted tree into the cached one."""
    source, target = extracted / path, tree / path
    if not source.exists():
        raise SourceError(f"{archive} holds no {VENDORED}{path}: that llama-cpp-python version does not ship it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Renamed whole, so a path that exists is complete; another process may have placed it first.
    try:
        os.replace(source, target)
    except OSError:
        if not target.exists():
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the sdist of the installed llama-cpp-python, which "
                                                 "llama.cpp's converter is taken from, and print its path.")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="cache folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        print(sdist(version_folder(args.cache)))
    except SourceError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
