"""llama.cpp's files from the llama-cpp-python sdist: only those asked for, kept, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.llama_cpp_source import SourceError, installed_version, llama_cpp_tree, sdist, version_folder

pytestmark = pytest.mark.slow  # each extraction reads the whole 75 MB sdist


@pytest.fixture(scope="module")
def cached_sdist() -> Path:
    return sdist(version_folder(None))  # downloaded by scripts/setup.sh --dev


@pytest.fixture
def cache(tmp_path: Path, cached_sdist: Path) -> Path:
    """A cache folder that holds only the sdist (a link to the one in the user's cache)."""
    folder = tmp_path / f"llama-cpp-python-{installed_version()}"
    folder.mkdir()
    (folder / cached_sdist.name).symlink_to(cached_sdist)
    return tmp_path


def damage(cache: Path) -> Path:
    folder = cache / f"llama-cpp-python-{installed_version()}"
    folder.mkdir(exist_ok=True)
    for archive in folder.glob("*.tar.gz"):
        archive.unlink()
    damaged = folder / f"llama_cpp_python-{installed_version()}.tar.gz"
    damaged.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    return damaged


def test_only_the_paths_asked_for_are_extracted_and_then_kept(cache: Path) -> None:
    tree = llama_cpp_tree(["convert_hf_to_gguf.py", "gguf-py/gguf"], cache)
    assert sorted(p.name for p in tree.iterdir()) == ["convert_hf_to_gguf.py", "gguf-py"]
    assert sorted(p.name for p in (tree / "gguf-py").iterdir()) == ["gguf"]
    assert (tree / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    damage(cache)  # what is extracted is not read from the sdist again
    assert llama_cpp_tree(["gguf-py/gguf", "convert_hf_to_gguf.py"], cache) == tree


def test_a_path_the_sdist_lacks_is_named(cache: Path) -> None:
    with pytest.raises(SourceError, match=r"holds no vendor/llama.cpp/no-such-file.py: that llama-cpp-python "
                                          r"version does not ship it"):
        llama_cpp_tree(["no-such-file.py"], cache)


def test_a_damaged_sdist_is_named_with_the_fix(tmp_path: Path) -> None:
    damaged = damage(tmp_path)
    with pytest.raises(SourceError, match=f"{damaged} is damaged .*; delete it and run again"):
        llama_cpp_tree(["convert_hf_to_gguf.py"], tmp_path)
