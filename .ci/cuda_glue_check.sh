#!/usr/bin/env bash
# The package's CUDA build (CMake's CUDA branch: kernels with nvcc, the glue in
# csrc/cuda, the extension linked against libtorch_cuda) configures, compiles
# and links against the torch the GPU machine runs (2.11.0+cu130), here, on a
# machine with neither a GPU nor a CUDA torch.
#
# The CPU torch lacks the generated c10/cuda headers, so the glue is otherwise
# never compiled here. This downloads the CUDA torch wheel (~530 MB, no
# dependencies, not installed: its CUDA libraries could not load here), unzips
# its headers and the four libraries the extension links, and answers
# CMakeLists.txt's `import torch` questions with a stub module beside them.
# Then it checks that the extension leaves no condensed_ops symbol undefined
# (a shared module links with undefined symbols; a missing kernel
# instantiation would only show at import on the GPU machine).
#
#   bash .ci/cuda_glue_check.sh [torch version, default 2.11.0]
set -euo pipefail
cd "$(dirname "$0")/.."

version=${1:-2.11.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m pip download -q --no-deps --only-binary=:all: -d "$work" "torch==$version"
unzip -q "$work"/torch-"$version"-*.whl 'torch/include/*' 'torch/version.py' \
  'torch/lib/libtorch_cuda.so' 'torch/lib/libc10_cuda.so' 'torch/lib/libtorch_cpu.so' 'torch/lib/libc10.so' \
  -d "$work/site"
cuda=$(sed -n "s/^cuda: .* = '\(.*\)'$/\1/p" "$work/site/torch/version.py")
[ -n "$cuda" ] || { echo "torch $version from the index has no CUDA"; exit 1; }
cat >"$work/site/torch/__init__.py" <<EOF
# What CMakeLists.txt asks torch; the real headers and libraries sit beside this file.
import types
__version__ = "$version+cu${cuda/./}"
version = types.SimpleNamespace(cuda="$cuda")
def compiled_with_cxx11_abi():
    return True
EOF

echo "building the CUDA extension against torch $version+cu${cuda/./} (not installed)"
# -Werror all-warnings: this build is also the kernels' compile check (sm_80 and sm_90).
PYTHONPATH="$work/site" cmake -S . -B "$work/build" -G Ninja -DPython_EXECUTABLE="$(command -v python)" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION=0.0.0 \
  -DCMAKE_CUDA_FLAGS="-Werror all-warnings" >"$work/configure.log" ||
  { cat "$work/configure.log"; exit 1; }
grep -q "CUDA kernels: nvcc" "$work/configure.log" || { cat "$work/configure.log"; echo "CMake left CUDA out"; exit 1; }
cmake --build "$work/build" -- -j 2 >"$work/build.log" 2>&1 || { tail -n 60 "$work/build.log"; exit 1; }

extension=$(ls "$work"/build/_C*.so)
undefined=$(nm -D --undefined-only -C "$extension" | grep condensed_ops || true)
if [ -n "$undefined" ]; then
  echo "the CUDA extension leaves condensed_ops symbols undefined:"
  echo "$undefined"
  exit 1
fi
echo "CUDA extension: configures, compiles and links against torch $version (no undefined condensed_ops symbol)"
