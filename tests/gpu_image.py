"""A Python that imports what the GPU machine's python3 would, for the GPU check's rehearsal: a fresh venv
(the same interpreter as the tests', none of their packages) whose path holds links to this venv's copies
of only the packages the GPU image has (scripts/gpu_image_packages.txt) and the ones .gpu carries, plus
llama_cpp, which the check builds there. A package the check imports that is in neither is simply not
found, here as there: a missing wheel fails the rehearsal, not the device call."""
from __future__ import annotations

import importlib.metadata
import os
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILT_THERE = ("llama_cpp",)


def image_packages() -> set[str]:
    lines = (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _top_level(paths: list[str]) -> set[str]:
    """Import names of the files a distribution installs: its top-level folders and modules (top_level.txt
    can list folders its build left out)."""
    names = set()
    for path in paths:
        first, _, rest = path.partition("/")
        if first.endswith((".dist-info", ".data")) or first in ("..", ""):
            continue
        if rest:
            names.add(first)
        elif first.endswith((".py", ".so")):
            names.add(first.split(".")[0])
    return names


def wheel_imports(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return _top_level(z.namelist())


def python_like_the_gpu_image(dest: Path, carried: Path) -> tuple[Path, dict[str, str]]:
    """(the python, the environment to run it in) where only the image's, the carried (.gpu/wheels) and the
    built-there packages import, with the repository on the path."""
    allowed = image_packages() | set(BUILT_THERE)
    for wheel in carried.glob("*.whl"):
        allowed |= wheel_imports(wheel)
    site = Path(sysconfig.get_paths()["purelib"])
    lib = dest / "site"
    lib.mkdir(parents=True)
    for entry in site.iterdir():
        name = entry.name.split(".")[0].split("-")[0]
        if name in allowed and not entry.name.endswith((".dist-info", ".pth")):
            (lib / entry.name).symlink_to(entry)
    for dotted in (a for a in allowed if "." in a):  # google.protobuf: that, and not google.genai beside it
        parent, child = dotted.split(".", 1)
        if (site / parent / child).exists() and not (lib / parent).exists():
            (lib / parent).mkdir()
        if (site / parent / child).exists():
            (lib / parent / child).symlink_to(site / parent / child)
    for dist in importlib.metadata.distributions(path=[str(site)]):  # their metadata, for importlib.metadata
        names = _top_level([str(f) for f in dist.files or []])
        if names and names <= allowed:
            info = Path(dist._path)  # type: ignore[attr-defined]  (PathDistribution's folder)
            (lib / info.name).symlink_to(info)
    venv.EnvBuilder(with_pip=False).create(dest / "env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=f"{lib}{os.pathsep}{ROOT}", PYTHONUNBUFFERED="1")
    return dest / "env" / "bin" / "python", env
