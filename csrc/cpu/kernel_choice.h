// Which CPU kernel runs: instruction set, strategy per batch size, and the
// small-batch calibration. Torch-free, so the pybind11 module can report it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace condensed_ops::cpu {

enum class Isa { Portable, Avx2, Avx512 };
// The row layout's strategies (cpu_kernels.h).
enum class Strategy { Gather, Scalar, Tiled };

// The forced instruction set (kernel option cpu_isa), else the widest this CPU runs.
Isa active_isa();
std::string isa_name(Isa isa);
std::string strategy_name(Strategy strategy);

// Batches up to this use the small-batch kernel (gather or scalar), larger ones
// tiled: from 2 rows an 8-row tile beats walking the rows again per batch row.
constexpr int64_t kSmallBatchMax = 1;

// The row layout's strategy for `batch` rows: forced (cpu_strategy), else the
// small-batch kernel up to kSmallBatchMax rows, else tiled. Never Gather on
// the portable flavour (it has none).
Strategy row_strategy(int64_t batch, Isa isa);

// The small-batch kernel: forced (cpu_small_batch), else whichever of gather
// and scalar ran a synthetic 90%-sparse layer faster here, timed once per
// process on first use (about 2 ms).
struct SmallBatchChoice {
  Strategy strategy;
  std::string reason;  // "calibrated: gather 41.0 us, scalar 33.2 us", "forced by ..."
};
SmallBatchChoice small_batch_choice(Isa isa);

// The window layout's width for this CPU: 64 slots where AVX-512 permutes read
// it from registers, 256 where scalar loads do.
int64_t window_width(Isa isa);

// Whether the AVX2 window kernel reads x by hardware gathers: forced with
// cpu_small_batch, else timed once per process on the first layer that runs
// it (time_run(gather) runs that layer once; gathers and scalar loads add
// the same products in the same order, so the outputs are bitwise equal
// either way). reason: what was decided and why, "" before the first run.
bool window_gathers(const std::function<void(bool)>& time_run);
std::string window_gathers_reason();

// Batches up to this run faster through the window layout than through the
// row layout's tiled kernel (measured; modules switch layouts there).
constexpr int64_t kWindowMaxBatch = 4;

// The kernel the calling thread's last CPU op ran, as "<isa> <kernel>" (e.g.
// "avx512 tiled", "avx2 window"): the flavour that really ran (double runs
// portable; gather and scalar have no AVX-512 flavour). Tests read it because
// results cannot tell kernels apart: scalar and tiled agree bit for bit on
// many inputs.
// Also counts the ops each flavour ran in this process, so a test run can say
// which compiled flavours no test exercised.
void note_kernel_run(Isa isa, const char* kernel);
std::string last_kernel_run();
int64_t kernel_runs(Isa isa);

}  // namespace condensed_ops::cpu
