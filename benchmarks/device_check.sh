#!/usr/bin/env bash
# The CUDA kernels' checks for one GPU session, in at most ~6 minutes:
#   1. environment: GPU, driver, torch, nvcc
#   2. build: pip install --no-build-isolation --no-deps -e . (needs nothing from the network)
#   3. the CUDA tests (tests/test_cuda.py)
#   4. compute-sanitizer memcheck, then racecheck, on small cases of every
#      kernel: forward (shared and L1 x, tiles 1..16, CSR rows), grad_input
#      (atomic scatter and the transposed layout: key, sort, offset kernels),
#      grad_values (with batch splits and the partial-sum kernel), and the
#      in-kernel guard against indices that skipped validation
#   5. a benchmark table: condensed vs dense F.linear, eager (L2 flushed) and
#      CUDA-graph medians, per x path, with the bytes/FLOP floor
#   6. the rest of the test suite, with whatever time is left
# Each step is cut at its cap or at the overall budget; logs go to $OUT when
# set (the device tool brings it back: 8 files at most), else to a temp dir.
#
#   bash benchmarks/device_check.sh        # from anywhere; DEVICE_CHECK_BUDGET_S=360 by default
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${DEVICE_CHECK_BUDGET_S:-360}
LOG=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
WORK=$(mktemp -d)
export PY SANITIZER WORK PYTHONUNBUFFERED=1
start=$SECONDS
: > "$LOG/summary.txt"

# step NAME CAP_SECONDS COMMAND...: runs COMMAND into $LOG/NAME.log, cut at its
# cap or at what is left of the budget, then shows the log's tail.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  ((left < cap)) && cap=$left
  if ((cap < 15)); then
    echo "$name: skipped, the time budget is spent" | tee -a "$LOG/summary.txt"
    return
  fi
  echo "== $name (at most ${cap}s)"
  local t0=$SECONDS
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
    timeout --kill-after=10 "$cap" bash -c "$(declare -f "$1"); \"\$@\"" "$1" "$@" >"$LOG/$name.log" 2>&1
  else
    timeout --kill-after=10 "$cap" "$@" >"$LOG/$name.log" 2>&1
  fi
  local rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict=TIMEOUT
  ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
  printf '%-10s %-7s rc=%-3s %4ss\n' "$name" "$verdict" "$rc" $((SECONDS - t0)) | tee -a "$LOG/summary.txt"
  tail -n 25 "$LOG/$name.log"
}

# ---- the Python pieces -------------------------------------------------------------

cat >"$WORK/small_cases.py" <<'EOF'
"""Small cases of every CUDA kernel, for compute-sanitizer."""
import os

import torch

import condensed_ops

grad_input = torch.ops.condensed_ops.condensed_linear_grad_input
grad_values = torch.ops.condensed_ops.condensed_linear_grad_values
g = torch.Generator().manual_seed(0)
f32, f16, bf16, f64, i16, i32, i64 = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                      torch.int16, torch.int32, torch.int64)
# (batch, in, out, fan_in, dtype, index dtype): tiles 1, 4, 8, 16, tails,
# several slabs (partial sums in grad_values), odd row lengths.
CASES = [(1, 37, 29, 11, f32, i16), (5, 100, 40, 19, bf16, i32), (40, 64, 33, 9, f16, i16),
         (70, 50, 20, 13, f32, i32), (3, 30, 7, 5, f64, i64), (300, 24, 10, 24, bf16, i16)]


def expect_report():
    torch.cuda.synchronize()
    try:
        condensed_ops.condensed_linear(torch.ones(1, 2, device="cuda"), torch.ones(1, 1, device="cuda"),
                                       torch.zeros(1, 1, dtype=torch.int32, device="cuda"))
    except IndexError as e:
        assert "an earlier call" in str(e), e
    else:
        raise AssertionError("the kernels did not report a bad index")


for x_path in ("shared", "global"):
    os.environ["CONDENSED_OPS_CUDA_X"] = x_path
    for batch, n_in, n_out, k, dtype, index_dtype in CASES:
        def r(*shape):
            return torch.randn(*shape, generator=g).to(dtype).cuda()
        x, values, bias, gy = r(batch, n_in), r(n_out, k), r(n_out), r(batch, n_out)
        idx = torch.randint(0, n_in, (n_out, k), generator=g).to(index_dtype).cuda()
        condensed_ops.condensed_linear(x, values, idx, bias)
        for path in ("scatter", "transposed"):
            os.environ["CONDENSED_OPS_CUDA_GRAD_INPUT"] = path
            grad_input(gy, values, idx, n_in)
        grad_values(gy, x, idx)
        # Indices far outside x that skipped validation (.data bypasses the
        # version counter): the kernels must skip them without touching memory.
        info = torch.iinfo(index_dtype)
        idx.data[0, 0] = info.max
        idx.data[n_out - 1, k - 1] = info.min
        condensed_ops.condensed_linear(x, values, idx, bias)
        expect_report()
        for path in ("scatter", "transposed"):
            os.environ["CONDENSED_OPS_CUDA_GRAD_INPUT"] = path
            grad_input(gy, values, idx, n_in)
            expect_report()
        grad_values(gy, x, idx)
        expect_report()
torch.cuda.synchronize()
print("small cases: OK")
EOF

cat >"$WORK/bench.py" <<'EOF'
"""Condensed vs dense F.linear on this GPU: medians in microseconds."""
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

import condensed_ops

grad_input = torch.ops.condensed_ops.condensed_linear_grad_input
grad_values = torch.ops.condensed_ops.condensed_linear_grad_values
# Leads to judge the numbers by (KINDS.md, H100 80GB HBM3): device-to-device
# copy ~3.0 TB/s (bytes read + written); fp32 FMA rate 67 TFLOP/s datasheet.
BANDWIDTH, FMA_RATE = 3.0e12, 33.5e12
SPARSITY = 0.9


def layer(n_in, n_out, dtype):
    g = torch.Generator().manual_seed(0)
    k = round((1 - SPARSITY) * n_in)
    idx = torch.rand(n_out, n_in, generator=g).topk(k, dim=1).indices.sort(dim=1).values.to(torch.int16).cuda()
    values = torch.randn(n_out, k, generator=g).to(dtype).cuda()
    return values, idx, k


def median_us(fn, graph):
    fn()
    torch.cuda.synchronize()
    if graph:  # ten replays of a graph holding ~rep ms of calls
        return 1e3 * do_bench_cudagraph(fn, rep=10, return_mode="median")
    return 1e3 * do_bench(fn, warmup=5, rep=20, return_mode="median")


print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, sparsity {SPARSITY}, int16 indices; "
      "eager = L2 flushed, graph = replays; floor = max(bytes / 3.0 TB/s, FMAs / 33.5 T/s)")
print()
print("| dtype | in→out | batch | fwd eager | fwd graph | shared graph | global graph | dense graph | floor "
      "| grad_x graph | grad_values graph | dense bwd graph |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for dtype in (torch.bfloat16, torch.float32):
    for n_in, n_out in ((768, 3072), (3072, 768), (4096, 4096)):
        values, idx, k = layer(n_in, n_out, dtype)
        dense = condensed_ops.to_dense(values, idx, n_in)
        for batch in (1, 8, 32, 256, 4096):
            x = torch.randn(batch, n_in, device="cuda").to(dtype)
            gy = torch.randn(batch, n_out, device="cuda").to(dtype)
            size = torch.finfo(dtype).bits // 8
            moved = values.numel() * (size + 2) + (x.numel() + gy.numel()) * size
            floor = 1e6 * max(moved / BANDWIDTH, batch * n_out * k / FMA_RATE)
            fwd = lambda: condensed_ops.condensed_linear(x, values, idx)
            row = [median_us(fwd, False), median_us(fwd, True)]
            for x_path in ("shared", "global"):
                os.environ["CONDENSED_OPS_CUDA_X"] = x_path
                row.append(median_us(fwd, True))
            os.environ["CONDENSED_OPS_CUDA_X"] = "auto"
            row += [median_us(lambda: F.linear(x, dense), True), floor,
                    median_us(lambda: grad_input(gy, values, idx, n_in), True),
                    median_us(lambda: grad_values(gy, x, idx), True),
                    median_us(lambda: (gy @ dense, gy.t() @ x), True)]
            cells = " | ".join(f"{v:.1f}" for v in row)
            print(f"| {str(dtype)[6:]} | {n_in}→{n_out} | {batch} | {cells} |", flush=True)
EOF

# ---- the steps ---------------------------------------------------------------------

env_report() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  nvcc --version | tail -n 2
  echo "compute-sanitizer: $SANITIZER"
  nproc
}

build() {
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps -v -e . &&
    "$PY" -c 'import condensed_ops; assert condensed_ops._C.with_cuda, "built without CUDA"; print("with_cuda: True")'
}

sanitize() {
  local tool=$1
  # No caching allocator: every tensor its own allocation, so a read past
  # one is outside any allocation and memcheck sees it.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 9 --print-limit 20 \
    "$PY" "$WORK/small_cases.py"
}

step env 30 env_report
step build 180 build
step test_cuda 120 "$PY" -m pytest tests/test_cuda.py -q --maxfail=25 -p no:cacheprovider
step memcheck 90 sanitize memcheck
step racecheck 60 sanitize racecheck
step bench 75 "$PY" "$WORK/bench.py"
step test_rest 150 "$PY" -m pytest tests -q --maxfail=10 -p no:cacheprovider --ignore=tests/test_cuda.py

echo
echo "== summary ($((SECONDS - start))s of ${BUDGET}s; logs in $LOG)"
cat "$LOG/summary.txt"
echo
grep '^|' "$LOG/bench.log" 2>/dev/null || true
