#!/usr/bin/env bash
# The CUDA glue (csrc/cuda/*.cpp) compiles and links against the torch the GPU
# machine runs (2.11.0+cu130), on a machine with neither a GPU nor a CUDA torch.
#
# The CPU torch lacks the generated c10/cuda headers, so the glue is otherwise
# never compiled here. This downloads the CUDA torch wheel (~530 MB, no
# dependencies, not installed), takes its headers and libraries, compiles the
# glue and csrc/condensed_linear.cpp with CONDENSED_OPS_WITH_CUDA, the kernels
# with nvcc, and links them into one shared library with --no-undefined: a
# missing kernel instantiation or a torch API that 2.11 lacks fails here.
#
#   bash .ci/cuda_glue_check.sh [torch version, default 2.11.0]
set -euo pipefail
cd "$(dirname "$0")/.."

version=${1:-2.11.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip download -q --no-deps --only-binary=:all: -d "$work" "torch==$version"
unzip -q "$work"/torch-"$version"-*.whl 'torch/include/*' 'torch/version.py' \
  'torch/lib/libtorch_cuda.so' 'torch/lib/libc10_cuda.so' 'torch/lib/libtorch_cpu.so' 'torch/lib/libc10.so' -d "$work"
torch="$work/torch"
grep -q "^cuda: .*'[0-9]" "$torch/version.py" || { echo "torch $version from the index has no CUDA"; exit 1; }
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
[ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=/usr/local/cuda

echo "compiling the CUDA glue against torch $(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$torch/version.py")"
cxx_flags=(-std=c++17 -O1 -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -DCONDENSED_OPS_WITH_CUDA -Werror -Wall
  -isystem "$torch/include" -isystem "$torch/include/torch/csrc/api/include" -isystem "$cuda_home/include")
pids=()
for source in csrc/cuda/*.cpp csrc/condensed_linear.cpp; do
  g++ "${cxx_flags[@]}" -c "$source" -o "$work/$(basename "$source" .cpp).o" & pids+=($!)
done
for source in csrc/kernels/cuda/*.cu; do
  nvcc -std=c++17 -O3 -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 -c "$source" \
    -o "$work/$(basename "$source" .cu).cu.o" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

g++ -shared -o "$work/libglue_check.so" "$work"/*.o -L"$torch/lib" -L"$cuda_home/lib64" \
  -ltorch_cuda -lc10_cuda -ltorch_cpu -lc10 -lcudart -Wl,--no-undefined
echo "CUDA glue: compiles and links against torch $version"
