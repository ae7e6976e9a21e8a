#!/bin/bash
# The Arm kernel paths (neon, neondot) tested on an x86-64 Debian machine, under qemu-aarch64:
#   1. Debian's aarch64 cross compiler, qemu-user and debootstrap (apt), an arm64 Debian root with
#      Python 3.11 (debootstrap, first stage only: nothing arm64 runs during it), PyPI's aarch64 wheels
#      of cpullm's dependencies and pytest (pip install --target --platform);
#   2. the extension cross-built with CMake (CMakeLists.txt's aarch64 branch);
#   3. tests/test_kernels.py on the emulated CPU (qemu's "max": DotProd and I8MM, so scalar, neon,
#      neondot and neoni8mm) and tools/reference_cases.py's check against transformers' logits recorded
#      here, on "max", on a Neoverse-N1 (DotProd, no I8MM) and on a Cortex-A53 (neither: scalar, neon).
# Needs root (apt, and binfmt_misc so that tests which start a child Python can run it under qemu).
#
#   tools/arm_check.sh [WORK_DIR]        (default /tmp/cpullm-arm; reuses what an earlier run left there)
#   PYTHON=/path/to/venv/bin/python tools/arm_check.sh   (the host Python must import cpullm and transformers)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/cpullm-arm}
root=$work/root
py=${PYTHON:-$(command -v python3)}  # a Python with cpullm installed (records the reference logits)
mkdir -p "$work"

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null || ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y g++-aarch64-linux-gnu qemu-user debootstrap >/dev/null
fi
if [ ! -x "$root/usr/bin/python3.11" ]; then
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-dev,libgomp1,libstdc++6 \
    bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log"
  # The first stage unpacks only the base system; the included packages wait in apt's cache.
  for deb in "$root"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
fi
if [ ! -d "$work/site/numpy" ]; then
  "$py" -m pip install -q --target "$work/site" --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    numpy tokenizers jinja2 safetensors gguf tqdm pytest hypothesis
fi

cat >"$work/toolchain.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH $root)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
EOF
cmake -S "$repo" -B "$work/build" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$work/toolchain.cmake" -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" -DPython_EXECUTABLE="$py" \
  -DPython_INCLUDE_DIR="$root/usr/include/python3.11" -DPython_SOABI=cpython-311-aarch64-linux-gnu \
  "-DCMAKE_CXX_FLAGS=-isystem $root/usr/include" >"$work/cmake.log"
ninja -C "$work/build" >>"$work/cmake.log"
rm -rf "$work/pkg" && mkdir -p "$work/pkg" && cp -r "$repo/python/cpullm" "$work/pkg/"
rm -f "$work"/pkg/cpullm/_C*.so
cp "$work"/build/_C*.so "$work/pkg/cpullm/_C.cpython-311-aarch64-linux-gnu.so"  # (named for the host by FindPython)

# Children of the emulated Python (the suite starts some) run through binfmt_misc.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$(command -v qemu-aarch64)"':' \
    >/proc/sys/fs/binfmt_misc/register
fi
arm_python() {  # arm_python CPU ARGS...
  local cpu=$1
  shift
  QEMU_LD_PREFIX=$root QEMU_CPU=$cpu PYTHONPATH=$work/pkg:$work/site PYTHONNOUSERSITE=1 \
    "$root/usr/bin/python3.11" "$@"
}

if [ ! -e "$work/cases/gguf.npz" ]; then
  gguf=$("$py" -c 'from cpullm.hub import resolve; print(resolve("smollm2-135m-instruct"))')
  "$py" "$repo/tools/reference_cases.py" record "$work/cases" --gguf "$gguf" >"$work/record.log" 2>&1
fi
cd "$repo"
arm_python max -c 'import cpullm._C as C; print(C.cpu_features())'
arm_python max -m pytest -q -p no:cacheprovider tests/test_kernels.py
arm_python max tools/reference_cases.py check "$work/cases" --isas neoni8mm neondot neon
arm_python neoverse-n1 -c 'import cpullm._C as C; i = C.cpu_features()["available_isas"]; assert i[-1] == "neondot", i'
arm_python cortex-a53 -c 'import cpullm._C as C; i = C.cpu_features()["available_isas"]; assert i == ["scalar", "neon"], i'
arm_python cortex-a53 tools/reference_cases.py check "$work/cases" --isas neon
