#!/usr/bin/env bash
# Builds cpullm with AddressSanitizer + UndefinedBehaviorSanitizer into its own virtual environment and
# runs the test suite against that build. Usage: tools/sanitize.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${CPULLM_SANITIZE_DIR:-/tmp/cpullm-sanitize}"
mkdir -p "$work"
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install --quiet torch==2.13.0
pip install --quiet -C build-dir="$work/build" -C cmake.define.CPULLM_SANITIZE=ON "$root[test]"
asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
cd "$root"
# Python itself is not instrumented: leak reports would be about the interpreter, not us.
LD_PRELOAD="$asan $ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  python -c "import cpullm._C as C, sys; assert 'cpullm-sanitize' in C.__file__ or '$work' in C.__file__, C.__file__"
LD_PRELOAD="$asan $ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  python -m pytest -q -p no:cacheprovider "${@:-tests}"
