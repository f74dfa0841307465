#!/usr/bin/env bash
# The CUDA kernels' checks for one GPU session, in at most ~330 s:
#   1. environment: GPU, driver, torch, nvcc; whether this torch survives an
#      IndexError (a torch build that crashes when an op raises IndexError
#      must not take the other results down: those tests run apart)
#   2. build: pip install --no-build-isolation --no-deps -e . (no network)
#   3. tests/test_cuda.py -k "grouped or variant", then the row-layout forward's
#      variant sweep against dense and CSR (benchmarks/cuda_sweep.py: the
#      planner's pick against the best variant, share of copy bandwidth), the
#      grouped kernel timed against dense bf16 cuBLAS (standalone script), then
#      the rest of tests/test_cuda.py, all without the tests that raise IndexError
#   4. compute-sanitizer memcheck, then racecheck, on small cases of every
#      kernel: grouped (tensor cores, every m-tile count, batch tails) and the
#      per-row ones (forward shared and L1 x, grad_input scatter and columns,
#      grad_values), and the in-kernel guard against unvalidated indices
#   5. python -m condensed_ops.bench, grouped g = 1 8 16 32 against dense bf16
#   6. the tests that raise IndexError, in their own pytest run
# Each step is cut at its cap or at the overall budget; logs go to $OUT when
# set (the device tool brings back 8 files at most), else to a temp dir.
#
#   bash benchmarks/device_check.sh        # from anywhere; DEVICE_CHECK_BUDGET_S=350 by default
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${DEVICE_CHECK_BUDGET_S:-350}
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
    # Every function of the script goes along: a step's function calls others.
    timeout --kill-after=10 "$cap" bash -c "$(declare -f); \"\$@\"" "$1" "$@" >"$LOG/$name.log" 2>&1
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
"""Small cases of every CUDA kernel, for compute-sanitizer. With
SKIP_BAD_INDEX=1 (a torch that crashes on IndexError) the unvalidated-index
cases still run, but their report is not raised."""
import os

import torch

import condensed_ops

grad_input = torch.ops.condensed_ops.condensed_linear_grad_input
grad_values = torch.ops.condensed_ops.condensed_linear_grad_values
skip_report = os.environ.get("SKIP_BAD_INDEX") == "1"
g = torch.Generator().manual_seed(0)
f32, f16, bf16, f64, i16, i32, i64 = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                      torch.int16, torch.int32, torch.int64)
# (batch, in, out, fan_in, dtype, index dtype): tiles 1, 4, 8, 16, tails,
# several slabs (partial sums in grad_values), odd row lengths.
CASES = [(1, 37, 29, 11, f32, i16), (5, 100, 40, 19, bf16, i32), (40, 64, 33, 9, f16, i16),
         (70, 50, 20, 13, f32, i32), (3, 30, 7, 5, f64, i64), (300, 24, 10, 24, bf16, i16)]
# Grouped (batch, in, groups, group_size, fan_in, dtype, index dtype): 1..4
# m16 tiles, 64- and 128-column batch tiles with tails, fan_in tails.
GROUPED = [(1, 37, 3, 8, 11, bf16, i16), (17, 64, 2, 24, 40, f16, i32), (130, 100, 2, 32, 77, bf16, i32),
           (70, 90, 1, 64, 45, f16, i16), (3, 45, 2, 56, 16, bf16, i64)]


def expect_report():
    torch.cuda.synchronize()
    if skip_report:
        return
    try:
        condensed_ops.condensed_linear(torch.ones(1, 2, device="cuda"), torch.ones(1, 1, device="cuda"),
                                       torch.zeros(1, 1, dtype=torch.int32, device="cuda"))
    except IndexError as e:
        assert "an earlier call" in str(e), e
    else:
        raise AssertionError("the kernels did not report a bad index")


def r(*shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype).cuda()


for batch, n_in, groups, size, k, dtype, index_dtype in GROUPED:
    x, values, bias = r(batch, n_in, dtype=dtype), r(groups, size, k, dtype=dtype), r(groups * size, dtype=dtype)
    idx = torch.stack([torch.randperm(n_in, generator=g)[:k] for _ in range(groups)]).to(index_dtype).cuda()
    condensed_ops.condensed_linear(x, values, idx, bias)
    info = torch.iinfo(index_dtype)
    idx.data[0, 0] = info.max
    idx.data[groups - 1, k - 1] = info.min
    condensed_ops.condensed_linear(x, values, idx, bias)
    expect_report()

# The forward's forced variants (lanes per row, packs in flight, fan-in splits).
for lanes, packs, splits in (("1", "4", "8"), ("32", "2", "2"), ("8", "4", "4")):
    with condensed_ops.kernel_options(cuda_lanes_per_row=lanes, cuda_packs_in_flight=packs, cuda_splits=splits):
        for batch, n_in, n_out, k, dtype, index_dtype in CASES[:3]:
            x, values = r(batch, n_in, dtype=dtype), r(n_out, k, dtype=dtype)
            idx = torch.randint(0, n_in, (n_out, k), generator=g).to(index_dtype).cuda()
            condensed_ops.condensed_linear(x, values, idx, r(n_out, dtype=dtype))

for x_path in ("shared", "global"):
    condensed_ops._C._set_kernel_option("cuda_x", x_path)
    for batch, n_in, n_out, k, dtype, index_dtype in CASES:
        x, values, bias = r(batch, n_in, dtype=dtype), r(n_out, k, dtype=dtype), r(n_out, dtype=dtype)
        gy = r(batch, n_out, dtype=dtype)
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
  # Does this torch survive an IndexError raised in C++ (ATen's indexing)?
  "$PY" -c 'import torch; torch.rand(10)[10]' >/dev/null 2>&1
  local rc=$?
  if ((rc == 1)); then echo "torch IndexError probe: raised normally (rc=1)"; else echo "torch IndexError probe: CRASHED (rc=$rc)"; fi
  echo "$rc" >"$WORK/indexerror_rc"
}

build() {
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps -v -e . &&
    "$PY" -c 'import condensed_ops; assert condensed_ops._C.with_cuda, "built without CUDA"; print("with_cuda: True")' || return
  # The same question for an IndexError raised by one of our C++ ops (CPU).
  "$PY" -c 'import torch, condensed_ops; condensed_ops.condensed_linear(torch.ones(1, 2), torch.ones(1, 1), torch.tensor([[5]]))' \
    >/dev/null 2>&1
  echo "condensed_ops IndexError probe (CPU op): rc=$? (1 = raised normally)"
}

sanitize() {
  local tool=$1 skip=0
  [ "$(cat "$WORK/indexerror_rc" 2>/dev/null)" = 1 ] || skip=1
  # No caching allocator: every tensor its own allocation, so a read past
  # one is outside any allocation and memcheck sees it.
  SKIP_BAD_INDEX=$skip PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 9 \
    --print-limit 20 "$PY" "$WORK/small_cases.py"
}
sanitizers() {
  sanitize memcheck && sanitize racecheck
}

bench_grouped() {
  "$PY" -m condensed_ops.bench --device cuda --dtype bfloat16 --shapes 4096x14336 768x3072 --sparsity 0.9 \
    --batch 1 16 256 2048 --group 1 8 16 32 --rounds 10 --max-seconds 1 --json "$LOG/bench_grouped.json" --no-progress
}

# Tests that raise IndexError on purpose: run on their own, last, so that a
# torch that crashes on IndexError cannot hide the other results.
RAISES='bad_index or revalidated or skip_indices or skips_indices'
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --maxfail=25)

env_report 2>&1 | tee -a "$LOG/summary.txt"  # into the summary: few files may come back
step build 120 build
grep -h "IndexError probe" "$LOG/build.log" 2>/dev/null | tee -a "$LOG/summary.txt"
step t_grouped 60 "${PYTEST[@]}" tests/test_cuda.py -k "(grouped or variant) and not ($RAISES)"
step sweep 100 "$PY" benchmarks/cuda_sweep.py --shapes 768x3072 3072x768 4096x14336 14336x4096 1024x4096 \
  --batch 1 16 256 --max-seconds 0.3 --json "$LOG/cuda_sweep.json"
step timing 35 "$PY" benchmarks/time_grouped.py
step t_cuda 55 "${PYTEST[@]}" tests/test_cuda.py -k "not grouped and not variant and not ($RAISES)"
step sanitize 50 sanitizers
step bench 30 bench_grouped
step t_raises 30 "${PYTEST[@]}" tests/test_cuda.py -k "$RAISES"

echo
echo "== summary ($((SECONDS - start))s of ${BUDGET}s; logs in $LOG)"
cat "$LOG/summary.txt"
echo
tail -n 8 "$LOG/timing.log" 2>/dev/null || true
grep '^|' "$LOG/bench.log" 2>/dev/null || true
grep -A 40 '^| dtype' "$LOG/sweep.log" 2>/dev/null | tail -n 32 || true
# Few files come back: fold the last run's log and the bench JSON into others
# (summary, build, t_grouped, sweep + cuda_sweep.json, timing + time_grouped.json,
# t_cuda, sanitize, bench).
if [ -f "$LOG/t_raises.log" ]; then
  { echo "== t_raises"; cat "$LOG/t_raises.log"; } >>"$LOG/t_cuda.log" && rm -f "$LOG/t_raises.log"
fi
for pair in sweep:cuda_sweep timing:time_grouped; do
  log=${pair%%:*} json=${pair#*:}
  if [ -f "$LOG/$json.json" ]; then
    { echo "== $json.json"; cat "$LOG/$json.json"; } >>"$LOG/$log.log" && rm -f "$LOG/$json.json"
  fi
done
if [ -f "$LOG/bench_grouped.json" ]; then
  { echo "== bench_grouped.json"; cat "$LOG/bench_grouped.json"; } >>"$LOG/bench.log" && rm -f "$LOG/bench_grouped.json"
fi
