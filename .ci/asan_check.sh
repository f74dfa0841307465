#!/usr/bin/env bash
# tests/test_robustness.py against the CPU ops built with AddressSanitizer and
# UBSan: a read or write out of bounds fails the run even where it would not
# crash. Uses the active Python's torch; the package's Python files come from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
build="${ASAN_BUILD_DIR:-$work/build}"  # set it to keep the build between runs

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCONDENSED_OPS_SANITIZE=ON \
  -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build" --target _C

# An importable package: the sources, plus the sanitized extension.
cp -r src/condensed_ops "$work/condensed_ops"
rm -f "$work"/condensed_ops/_C*.so
cp "$build"/_C*.so "$build/_build_info.py" "$work/condensed_ops/"

# torch is not built with ASan: the runtime must come first; its leak report
# would list torch's own allocations.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
# An editable install's import hook would find the source tree's package first.
python - tests/test_robustness.py -q -p no:cacheprovider <<PY
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_")]
import condensed_ops, pytest
if not condensed_ops.__file__.startswith("$work"):
    sys.exit(f"imported {condensed_ops.__file__}, not the sanitized build")
sys.exit(pytest.main(sys.argv[1:]))
PY
