# Sourced by scripts/setup.sh and scripts/gpu_check.sh: build flags that make llama.cpp run on the CPU it
# is built on. ggml compiles for the build machine (-march=native). With GCC 11 and 12, its AMX matmul
# loads tiles that were never configured (the compiler drops the stores that fill the tile config:
# ggml-org/llama.cpp PR 26954) and the process dies on AMX CPUs. AMX only speeds up prompts on the CPU, so
# it is left out unless the compiler is GCC 13 or later (clang is not known to be safe: left out too).

llama_no_amx_flags() {
  [ "$(uname -s)" != Darwin ] || return 0
  case "$(uname -m)" in x86_64|amd64) ;; *) return 0 ;; esac
  local cxx=${CXX:-c++} major
  echo 'int x;' | "$cxx" -x c++ -mno-amx-tile -c -o /dev/null - 2>/dev/null || return 0  # predates AMX
  if ! "$cxx" --version 2>/dev/null | grep -qi clang; then
    major=$("$cxx" -dumpversion 2>/dev/null | cut -d. -f1)
    [ "${major:-0}" -ge 13 ] 2>/dev/null && return 0
  fi
  echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
}

# Adds the flags to the operator's own CFLAGS and CXXFLAGS (CMake reads both when it configures), once.
export_llama_flags() {
  local flags
  flags=$(llama_no_amx_flags)
  [ -n "$flags" ] || return 0
  case " ${CFLAGS:-} " in *" $flags "*) ;; *) export CFLAGS="${CFLAGS:+$CFLAGS }$flags" ;; esac
  case " ${CXXFLAGS:-} " in *" $flags "*) ;; *) export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$flags" ;; esac
}
