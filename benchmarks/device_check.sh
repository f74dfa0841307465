#!/usr/bin/env bash
# The CUDA kernels' checks for one GPU session, in at most ~6 minutes:
#   1. environment: GPU, driver, torch, nvcc
#   2. build: pip install --no-build-isolation --no-deps -e . (needs nothing from the network)
#   3. the CUDA tests (tests/test_cuda.py)
#   4. compute-sanitizer memcheck, then racecheck, on small cases of every
#      kernel: forward (shared and L1 x, tiles 1..16, CSR rows), grad_input
#      (atomic scatter and the column layout: key, sort, offset kernels),
#      grad_values (with batch splits and the partial-sum kernel), and the
#      in-kernel guard against indices that skipped validation
#   5. python -m condensed_ops.bench on CUDA (forward sweep at 90%, training,
#      ViT end to end), JSON kept for `python -m condensed_ops.bench.report`
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
    condensed_ops._C._set_kernel_option("cuda_x", x_path)
    for batch, n_in, n_out, k, dtype, index_dtype in CASES:
        def r(*shape):
            return torch.randn(*shape, generator=g).to(dtype).cuda()
        x, values, bias, gy = r(batch, n_in), r(n_out, k), r(n_out), r(batch, n_out)
        idx = torch.randint(0, n_in, (n_out, k), generator=g).to(index_dtype).cuda()
        condensed_ops.condensed_linear(x, values, idx, bias)
        for path in ("scatter", "columns"):
            condensed_ops._C._set_kernel_option("cuda_grad_input", path)
            grad_input(gy, values, idx, n_in)
        grad_values(gy, x, idx)
        # Indices far outside x that skipped validation (.data bypasses the
        # version counter): the kernels must skip them without touching memory.
        info = torch.iinfo(index_dtype)
        idx.data[0, 0] = info.max
        idx.data[n_out - 1, k - 1] = info.min
        condensed_ops.condensed_linear(x, values, idx, bias)
        expect_report()
        for path in ("scatter", "columns"):
            condensed_ops._C._set_kernel_option("cuda_grad_input", path)
            grad_input(gy, values, idx, n_in)
            expect_report()
        grad_values(gy, x, idx)
        expect_report()
torch.cuda.synchronize()
print("small cases: OK")
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

env_report 2>&1 | tee -a "$LOG/summary.txt"  # into the summary: few files may come back
step build 180 build
step test_cuda 120 "$PY" -m pytest tests/test_cuda.py -q --maxfail=25 -p no:cacheprovider
sanitizers() {
  sanitize memcheck && sanitize racecheck
}

# condensed vs dense fp32 / TF32 / bf16, CSR, the paper's gather and 2:4, at
# 90%: CUDA-graph and eager medians, GB/s and roofline fraction; then forward +
# backward; then the ViT-B/16 encoder end to end. JSON for the README's report.
bench() {
  "$PY" -m condensed_ops.bench --device cuda --dtype bfloat16 float32 --sparsity 0.9 --batch 1 16 256 2048 \
    --rounds 10 --max-seconds 1 --vit --vit-batch 1 64 256 --json "$LOG/bench_cuda.json" --no-progress &&
    "$PY" -m condensed_ops.bench --device cuda --training --shapes 768x3072 3072x768 --sparsity 0.9 --batch 256 2048 \
      --rounds 10 --max-seconds 1 --json "$LOG/bench_cuda_training.json" --no-progress
}
step sanitize 150 sanitizers
step bench 150 bench
step test_rest 150 "$PY" -m pytest tests -q --maxfail=10 -p no:cacheprovider --ignore=tests/test_cuda.py

echo
echo "== summary ($((SECONDS - start))s of ${BUDGET}s; logs in $LOG)"
cat "$LOG/summary.txt"
echo
grep '^|' "$LOG/bench.log" 2>/dev/null || true
# logs + JSON: at most 8 files come back from the device tool
