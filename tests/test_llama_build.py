"""The llama.cpp build check: a build that dies on this CPU is caught and named; setup's AMX flags."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backends.llama_build import smoke, system_info

ROOT = Path(__file__).resolve().parents[1]


def test_a_build_that_dies_with_sigill_is_named_with_the_command_that_rebuilds_it():
    dies = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    problem = smoke(dies)
    assert "SIGILL" in problem and "does not run on this CPU" in problem
    assert "scripts/setup.sh --rebuild" in problem


def test_a_child_that_fails_without_a_signal_reports_its_exit_and_last_words():
    problem = smoke([sys.executable, "-c", "import sys; sys.exit('no model here')"])
    assert "exit 1" in problem and "no model here" in problem


def test_the_installed_build_decodes_a_long_prompt_here():
    assert smoke() is None


def test_system_info_lists_the_cpu_features_the_build_uses():
    info = system_info()
    assert info.startswith("CPU: ") and "= 0" not in info and "|" not in info


def fake_compiler(tmp_path: Path, version: str, accepts_amx: bool = True) -> str:
    """A c++ that answers --version and -dumpversion like `version`, and compiles only what it knows."""
    path = tmp_path / "c++"
    path.write_text(f"""#!/bin/sh
case "$*" in
  --version) echo "{version}";;
  -dumpversion) echo "{version.split()[-1]}";;
  *-mno-amx-tile*) cat >/dev/null; exit {0 if accepts_amx else 1};;
esac
""")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "amd64") or sys.platform == "darwin",
                    reason="the AMX flags are for x86-64 Linux builds")
@pytest.mark.parametrize("version,accepts_amx,flags", [
    ("g++ (Debian 12.2.0-14) 12.2.0", True, True),
    ("g++ (GCC) 11.4.0", True, True),
    ("g++ (GCC) 13.2.0", True, False),
    ("g++ (GCC) 10.2.1", False, False),
    ("clang version 17.0.6", True, True),
])
def test_setup_leaves_amx_out_where_the_compiler_miscompiles_it(tmp_path, version, accepts_amx, flags):
    env = {**os.environ, "CXX": fake_compiler(tmp_path, version, accepts_amx), "CFLAGS": "-O2"}
    env.pop("CXXFLAGS", None)
    twice = "source scripts/llama_build.sh; export_llama_flags; export_llama_flags; "  # a rerun adds none
    out = subprocess.run(["bash", "-c", twice + "echo \"$CFLAGS|${CXXFLAGS:-}\""], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    assert out == (f"-O2 {amx}|{amx}" if flags else "-O2|")


def test_setup_cuda_names_what_is_missing_before_it_touches_anything(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with no nvidia-smi, on any machine
    bin_dir.mkdir()
    for tool in ("dirname", "sed"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir), "CXX": fake_compiler(tmp_path, "g++ (GCC) 12.2.0")}
    done = subprocess.run([shutil.which("bash"), "scripts/setup.sh", "--cuda"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "missing an NVIDIA driver that sees a GPU" in done.stderr


def test_setup_refuses_an_unknown_option():
    done = subprocess.run(["bash", "scripts/setup.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --gpu" in done.stderr
