// Forward kernel, its planner and launcher:
//   y[b, o] = bias[o] + sum_j values[o, j] * x[b, idx[o, j]]
// (also grad_x = grad_y @ W, run over W's column layout with CSR rows).
//
// Work split: a block owns a contiguous range of output rows (grid.x) and a
// set of batch slabs (grid.y strides over them). Per slab it stages kTile x
// rows transposed in shared memory; then groups of `lanes_per_row` lanes walk
// one output row each: every lane streams 16-byte packs of weights and indices
// (coalesced across the group, kPacks packs loaded before the first gather so
// that enough bytes are in flight to cover memory latency), gathers the kTile
// x values of each index with one or two shared loads, and keeps kTile float
// sums in registers. A butterfly shuffle adds the group's partial sums at the
// end of the row. Where rows are too few to keep the GPU busy, grid.z splits
// each row's fan-in over `splits` blocks; their sums go to a float scratch
// buffer that a second kernel adds in split order (deterministic).
#include <algorithm>
#include <cmath>

#include "cuda_kernels.h"
#include "device_helpers.cuh"
#include "launch.cuh"

namespace condensed_ops::kernels::cuda {
namespace {

// Tuning constants. Initial values from first principles (H100: 132 SMs,
// 228 KB shared memory per SM, 227 KB per block); to be measured there.
// - Lanes per row: the butterfly costs kTile * log2(lanes) shuffles per row;
//   keep that under 1/8 of a lane's kTile * row_length / lanes multiply-adds.
constexpr double kShuffleShare = 8.0;
// - Enough resident lanes in flight to cover HBM latency at small batch.
constexpr int kWarpsPerMultiprocessorWanted = 32;
// - Fan-in splits: at most this many, each lane of a split keeping at least
//   this many packs of a row.
constexpr int kMaxSplits = 8;
constexpr double kMinPacksPerSplitLane = 4.0;
// - Four packs in flight per lane only up to this batch tile.
constexpr int kMaxTileForFourPacks = 4;

int log2_int(int v) {
  int l = 0;
  while ((1 << (l + 1)) <= v) ++l;
  return l;
}

template <typename scalar_t, typename index_t, int kTile, bool kSharedX>
__device__ __forceinline__ void add_entry(acc_t<scalar_t> (&sums)[kTile], acc_t<scalar_t> weight, index_t index,
                                          uint32_t in_features, const SlabColumns<scalar_t, kTile, kSharedX>& x,
                                          int* bad_index_flag) {
  const uint32_t c = as_column(index);
  if (c >= in_features) {  // never read outside x: skip, and let the glue raise later
    report_bad_index(bad_index_flag);
    return;
  }
  acc_t<scalar_t> column[kTile];
  x.load(c, column);
#pragma unroll
  for (int b = 0; b < kTile; ++b) sums[b] = fma(weight, column[b], sums[b]);
}

// Split s of `splits` of the entries [begin, end): boundaries on pack-aligned
// positions, so every split but the first starts where 16-byte loads can.
template <int V>
__device__ __forceinline__ void split_range(int64_t& begin, int64_t& end, int s, int splits) {
  if (splits == 1) return;
  const int64_t aligned = min64(end, round_up(begin, V));
  const int64_t chunk = round_up((end - aligned + splits - 1) / splits, V);
  const int64_t lo = s == 0 ? begin : min64(end, aligned + s * chunk);
  const int64_t hi = s == splits - 1 ? end : min64(end, aligned + (s + 1) * chunk);
  begin = lo;
  end = hi;
}

// One lane's share of entries [begin, end) of a row: the unaligned head and
// tail element by element, the aligned middle in 16-byte packs (lane l takes
// packs l, l + G, ...), kPacks of them loaded before any is used.
template <typename scalar_t, typename index_t, int kTile, bool kSharedX, int kPacks>
__device__ __forceinline__ void accumulate_row(const ForwardProblem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                                               int lane, int lanes, const SlabColumns<scalar_t, kTile, kSharedX>& x,
                                               acc_t<scalar_t> (&sums)[kTile]) {
  constexpr int V = kVector<scalar_t>;
  // Rows start anywhere (o * fan_in, or a CSR offset): pack loads need
  // V-aligned element positions, the bases being 16-byte aligned.
  const int64_t vec_begin = min64(end, round_up(begin, V));
  const int64_t vec_end = max64(vec_begin, round_down(end, V));
  const uint32_t in = static_cast<uint32_t>(p.in_features);
  // The lane's first head and tail elements load with its first packs (one
  // memory latency per row, not three); further ones exist only when lanes < V.
  const int64_t head = begin + lane, tail = vec_end + lane;
  const bool has_head = head < vec_begin, has_tail = tail < end;
  scalar_t head_weight{}, tail_weight{};
  index_t head_index{}, tail_index{};
  if (has_head) {
    head_weight = load_readonly(p.values + head);
    head_index = load_readonly(p.idx + head);
  }
  if (has_tail) {
    tail_weight = load_readonly(p.values + tail);
    tail_index = load_readonly(p.idx + tail);
  }
  // kPacks packs per round, all loaded before the first gather; the last
  // round's loads are predicated, so a lane's remainder is in flight together too.
  const int64_t step = int64_t(lanes) * V;
  for (int64_t e = vec_begin + int64_t(lane) * V; e < vec_end; e += kPacks * step) {
    Pack<scalar_t, V> w[kPacks];
    Pack<index_t, V> c[kPacks];
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      if (e + u * step < vec_end) {
        w[u] = load_readonly<scalar_t, V>(p.values + e + u * step);
        c[u] = load_readonly<index_t, V>(p.idx + e + u * step);
      }
    }
#pragma unroll
    for (int u = 0; u < kPacks; ++u) {
      if (e + u * step < vec_end) {
#pragma unroll
        for (int j = 0; j < V; ++j) add_entry(sums, to_acc(w[u].v[j]), c[u].v[j], in, x, p.bad_index_flag);
      }
    }
  }
  if (has_head) add_entry(sums, to_acc(head_weight), head_index, in, x, p.bad_index_flag);
  if (has_tail) add_entry(sums, to_acc(tail_weight), tail_index, in, x, p.bad_index_flag);
  for (int64_t e = head + lanes; e < vec_begin; e += lanes) {
    add_entry(sums, to_acc(load_readonly(p.values + e)), load_readonly(p.idx + e), in, x, p.bad_index_flag);
  }
  for (int64_t e = tail + lanes; e < end; e += lanes) {
    add_entry(sums, to_acc(load_readonly(p.values + e)), load_readonly(p.idx + e), in, x, p.bad_index_flag);
  }
}

// (No __launch_bounds__: see launch.cuh.)
template <typename scalar_t, typename index_t, int kTile, bool kSharedX, int kPacks>
__global__ void condensed_linear_forward_kernel(const ForwardProblem<scalar_t, index_t> p, const int lanes_per_row,
                                                const int64_t rows_per_block) {
  using acc = acc_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* const x_tile = reinterpret_cast<scalar_t*>(shared_bytes);

  const int lanes = lanes_per_row;  // a power of two <= 32: groups never straddle a warp
  const int lane = threadIdx.x & (lanes - 1);
  const int group = threadIdx.x / lanes;
  const int groups = blockDim.x / lanes;
  const int warp_first_group = (threadIdx.x & ~31) / lanes;
  const int64_t row_begin = int64_t(blockIdx.x) * rows_per_block;
  const int64_t row_end = min64(row_begin + rows_per_block, p.out_features);
  const int64_t slabs = (p.batch + kTile - 1) / kTile;
  const int split = int(blockIdx.z), splits = int(gridDim.z);

  for (int64_t slab = blockIdx.y; slab < slabs; slab += gridDim.y) {
    const int64_t b0 = slab * kTile;
    const int rows_here = int(min64(kTile, p.batch - b0));
    const scalar_t* x_slab = p.x + b0 * p.x_row_stride;
    if constexpr (kSharedX) {
      __syncthreads();  // the previous slab's gathers are done
      stage_x_slab<scalar_t, kTile>(x_tile, x_slab, p.x_row_stride, rows_here, p.in_features);
      __syncthreads();
    }
    const SlabColumns<scalar_t, kTile, kSharedX> x{kSharedX ? x_tile : x_slab, p.x_row_stride, rows_here};
    // The loop bound is uniform across a warp (its first group's row), so all
    // 32 lanes reach the shuffles together; groups past the end idle through.
    for (int64_t first = row_begin + warp_first_group; first < row_end; first += groups) {
      const int64_t o = first + (group - warp_first_group);
      const bool active = o < row_end;
      acc sums[kTile];
#pragma unroll
      for (int b = 0; b < kTile; ++b) sums[b] = acc(0);
      if (active) {
        int64_t begin = p.row_offsets ? load_readonly(p.row_offsets + o) : o * p.fan_in;
        int64_t end = p.row_offsets ? load_readonly(p.row_offsets + o + 1) : begin + p.fan_in;
        split_range<kVector<scalar_t>>(begin, end, split, splits);
        accumulate_row<scalar_t, index_t, kTile, kSharedX, kPacks>(p, begin, end, lane, lanes, x, sums);
      }
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
#pragma unroll
        for (int b = 0; b < kTile; ++b) sums[b] += __shfl_xor_sync(0xffffffffu, sums[b], offset);
      }
      if (active) {
        // Every lane holds the full sums; lane b % lanes writes batch row b.
        if (splits > 1) {
          acc* const partial = p.partial + split * p.batch * p.out_features;
#pragma unroll
          for (int b = 0; b < kTile; ++b) {
            if (b < rows_here && (b & (lanes - 1)) == lane) partial[(b0 + b) * p.out_features + o] = sums[b];
          }
        } else {
          const acc bias = p.bias ? to_acc(load_readonly(p.bias + o)) : acc(0);
#pragma unroll
          for (int b = 0; b < kTile; ++b) {
            if (b < rows_here && (b & (lanes - 1)) == lane) {
              p.y[(b0 + b) * p.y_row_stride + o] = from_acc<scalar_t>(sums[b] + bias);
            }
          }
        }
      }
    }
  }
}

// y[b, o] = bias[o] + the splits' sums, added in split order.
template <typename scalar_t, typename index_t>
__global__ void add_split_sums_kernel(const ForwardProblem<scalar_t, index_t> p, const int splits) {
  using acc = acc_t<scalar_t>;
  const int64_t outputs = p.batch * p.out_features;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < outputs; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / p.out_features, o = i - b * p.out_features;
    acc sum = p.bias ? to_acc(load_readonly(p.bias + o)) : acc(0);
    for (int s = 0; s < splits; ++s) sum += p.partial[s * outputs + i];
    p.y[b * p.y_row_stride + o] = from_acc<scalar_t>(sum);
  }
}

}  // namespace

const TunedForward* tuned_forward_table(size_t* entries) {
  static const TunedForward table[] = {
#include "tuned_forward.inc"
      {0, 0, 0, 0, 0, 0, {}},  // (an array needs one entry; compute capability 0 matches no device)
  };
  *entries = sizeof(table) / sizeof(table[0]);
  return table;
}

const TunedForward* nearest_tuned_forward(const TunedForward* table, size_t entries, int compute_capability,
                                          int value_bytes, int64_t batch, int64_t in_features, int64_t out_features,
                                          double fan_in) {
  const TunedForward* best = nullptr;
  double best_distance = 0.0;
  for (size_t i = 0; i < entries; ++i) {
    const TunedForward& t = table[i];
    if (t.compute_capability != compute_capability || compute_capability == 0 || t.value_bytes != value_bytes) continue;
    const double ratios[] = {double(std::max<int64_t>(batch, 1)) / double(std::max<int64_t>(t.batch, 1)),
                             double(in_features) / double(std::max<int64_t>(t.in_features, 1)),
                             double(out_features) / double(std::max<int64_t>(t.out_features, 1)),
                             std::max(fan_in, 1.0) / double(std::max<int64_t>(t.fan_in, 1))};
    double distance = 0.0;
    bool near = true;
    for (const double r : ratios) {
      const double d = std::abs(std::log2(r));
      near &= d <= 1.0;
      distance += d;
    }
    if (near && (best == nullptr || distance < best_distance)) {
      best = &t;
      best_distance = distance;
    }
  }
  return best;
}

template <typename scalar_t>
LaunchPlan plan_forward(int64_t batch, int64_t in_features, int64_t out_features, double mean_row_length,
                        const DeviceLimits& limits, const ForwardTuning& forced, bool use_table) {
  constexpr int V = kVector<scalar_t>;
  ForwardTuning tuning = forced;
  const bool nothing_forced = forced.access == XAccess::Auto && forced.lanes_per_row == 0 &&
                              forced.packs_in_flight == 0 && forced.splits == 0 && forced.batch_tile == 0;
  if (nothing_forced && use_table) {
    size_t entries = 0;
    const TunedForward* table = tuned_forward_table(&entries);
    const TunedForward* tuned = nearest_tuned_forward(table, entries, limits.compute_capability, int(sizeof(scalar_t)),
                                                      batch, in_features, out_features, mean_row_length);
    if (tuned != nullptr) tuning = tuned->choice;
  }
  const XAccess access = tuning.access;
  LaunchPlan plan;
  plan.threads = kThreads;
  const int64_t sms = std::max(1, limits.multiprocessors);
  bool fits = false;
  int tile = 1;
  if (tuning.batch_tile > 0) {
    tile = std::min(tuning.batch_tile, kMaxBatchTile<scalar_t>);
    fits = slab_bytes<scalar_t>(in_features, tile) + 1024 <= size_t(std::max(0, limits.max_shared_bytes_per_block));
  } else {
    tile = plan_batch_tile<scalar_t>(batch, in_features, 0, shared_budget(limits), access, &fits);
  }
  const size_t slab = slab_bytes<scalar_t>(in_features, tile);
  bool shared_x = access == XAccess::Shared ? fits : access == XAccess::Auto && fits;
  const int64_t slabs = std::max<int64_t>(1, (batch + tile - 1) / tile);

  // Lanes per row: the shuffle-cost bound, raised while the launch would keep
  // too few lanes busy, capped by the packs a row has.
  const double row_length = std::max(mean_row_length, 1.0);
  const double packs_per_row = std::ceil(row_length / V);
  const double lanes_wanted = double(sms) * kWarpsPerMultiprocessorWanted * 32.0;
  const double row_units = double(std::max<int64_t>(1, out_features * std::min<int64_t>(slabs, 1 << 16)));
  int lanes = 1;
  while (lanes < 32 && double(2 * lanes) * log2_int(2 * lanes) <= row_length / kShuffleShare) lanes *= 2;
  while (lanes < 32 && lanes < lanes_wanted / row_units) lanes *= 2;
  lanes = std::min(lanes, pow2_at_least(int64_t(packs_per_row)));
  plan.lanes_per_row = tuning.lanes_per_row > 0 ? tuning.lanes_per_row : std::max(1, std::min(lanes, 32));
  const int64_t groups_per_block = kThreads / plan.lanes_per_row;

  // Splits of the fan-in over grid.z: only while even 32 lanes per row leave
  // the GPU short of lanes, and each lane of a split keeps kMinPacksPerSplitLane
  // packs (the scratch round trip costs about one pack per output).
  int splits = 1;
  while (splits < kMaxSplits && row_units * plan.lanes_per_row * (2 * splits) <= lanes_wanted &&
         packs_per_row / (2.0 * splits * plan.lanes_per_row) >= kMinPacksPerSplitLane) {
    splits *= 2;
  }
  plan.splits = tuning.splits > 0 ? tuning.splits : splits;
  // Four packs in flight where a lane has more than two to load per row, at
  // the small tiles that are bound by the weights' bytes (larger tiles are
  // bound by the gathers, and their sums take the registers).
  const bool four = packs_per_row / (double(plan.lanes_per_row) * plan.splits) > 2.0;
  plan.packs_in_flight = tile > kMaxTileForFourPacks ? 2 : tuning.packs_in_flight > 0 ? tuning.packs_in_flight
                                                                                       : (four ? 4 : 2);

  const auto blocks_per_sm = [&](bool staged) -> int64_t {
    const int64_t by_threads = 2048 / kThreads;
    if (!staged) return by_threads;
    const size_t per_block = slab + 1024;  // + the runtime's reserved 1 KB
    return std::clamp<int64_t>(int64_t(limits.max_shared_bytes_per_multiprocessor / per_block), 1, by_threads);
  };
  // Work units are (row chunk, slab, split) triples, one block each (gridDim.y
  // covers the slabs, gridDim.z the splits). Enough units for kWaves waves of
  // resident blocks keeps the last, partial wave short; never fewer rows per
  // block than groups (idle warps); with x staged, enough rows per block that
  // each staged value feeds kStagingReuse gathers. If that leaves fewer blocks
  // than SMs, x goes through L1 instead.
  const int64_t max_chunks = std::max<int64_t>(1, (out_features + groups_per_block - 1) / groups_per_block);
  const auto row_chunks_for = [&](bool staged) {
    const int64_t others = slabs * plan.splits;
    const int64_t wanted = (kWaves * sms * blocks_per_sm(staged) + others - 1) / others;
    int64_t cap = max_chunks;
    if (staged) {
      cap = std::min<int64_t>(cap, std::max<int64_t>(1, int64_t(double(out_features) * row_length /
                                                                (kStagingReuse * plan.splits * double(in_features)))));
    }
    return std::clamp<int64_t>(wanted, 1, cap);
  };
  int64_t row_chunks = row_chunks_for(shared_x);
  if (shared_x && access == XAccess::Auto && row_chunks * slabs * plan.splits < sms) {
    shared_x = false;
    row_chunks = row_chunks_for(false);
  }
  plan.shared_x = shared_x;
  plan.batch_tile = tile;
  plan.shared_bytes = shared_x ? slab : 0;
  plan.work_per_block = std::max<int64_t>(1, (out_features + row_chunks - 1) / row_chunks);
  plan.grid_x = unsigned(std::max<int64_t>(1, (out_features + plan.work_per_block - 1) / plan.work_per_block));
  plan.grid_y = unsigned(std::clamp<int64_t>(slabs, 1, std::max(1, limits.max_grid_y)));  // more: blocks stride
  return plan;
}

int64_t forward_partial_elements(const LaunchPlan& plan, int64_t batch, int64_t out_features) {
  return plan.splits > 1 ? int64_t(plan.splits) * batch * out_features : 0;
}

template <typename scalar_t, typename index_t>
cudaError_t launch_forward(const ForwardProblem<scalar_t, index_t>& p, const LaunchPlan& plan, cudaStream_t stream) {
  if (p.batch == 0 || p.out_features == 0) return cudaSuccess;
  if (plan.splits > 1 && p.partial == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(plan.grid_x, plan.grid_y, unsigned(plan.splits));
  const cudaError_t err = with_batch_tile<scalar_t>(plan.batch_tile, [&](auto tile) {
    constexpr int kTile = decltype(tile)::value;
    const auto launch = [&](auto packs) {
      constexpr int kPacks = decltype(packs)::value;
      const auto kernel = plan.shared_x ? condensed_linear_forward_kernel<scalar_t, index_t, kTile, true, kPacks>
                                        : condensed_linear_forward_kernel<scalar_t, index_t, kTile, false, kPacks>;
      return launch_kernel(kernel, grid, unsigned(plan.threads), plan.shared_bytes, stream, p, plan.lanes_per_row,
                           plan.work_per_block);
    };
    if constexpr (kTile <= kMaxTileForFourPacks) {
      if (plan.packs_in_flight == 4) return launch(std::integral_constant<int, 4>{});
    }
    return launch(std::integral_constant<int, 2>{});
  });
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t outputs = p.batch * p.out_features;
  const unsigned blocks = unsigned(std::min<int64_t>((outputs + kThreads - 1) / kThreads, 65535));
  return launch_kernel(add_split_sums_kernel<scalar_t, index_t>, dim3(blocks), unsigned(kThreads), 0, stream, p,
                       plan.splits);
}

// ---- explicit instantiations -------------------------------------------------
#define CONDENSED_OPS_FORWARD_PLAN(scalar_t)                                                               \
  template LaunchPlan plan_forward<scalar_t>(int64_t, int64_t, int64_t, double, const DeviceLimits&,        \
                                             const ForwardTuning&, bool);
#define CONDENSED_OPS_FORWARD_LAUNCH(scalar_t, index_t)                                                    \
  template cudaError_t launch_forward<scalar_t, index_t>(const ForwardProblem<scalar_t, index_t>&,         \
                                                          const LaunchPlan&, cudaStream_t);

CONDENSED_OPS_FORWARD_PLAN(float)
CONDENSED_OPS_FORWARD_PLAN(double)
CONDENSED_OPS_FORWARD_PLAN(__half)
CONDENSED_OPS_FORWARD_PLAN(__nv_bfloat16)
CONDENSED_OPS_FORWARD_LAUNCH(float, int16_t)
CONDENSED_OPS_FORWARD_LAUNCH(float, int32_t)
CONDENSED_OPS_FORWARD_LAUNCH(double, int16_t)
CONDENSED_OPS_FORWARD_LAUNCH(double, int32_t)
CONDENSED_OPS_FORWARD_LAUNCH(__half, int16_t)
CONDENSED_OPS_FORWARD_LAUNCH(__half, int32_t)
CONDENSED_OPS_FORWARD_LAUNCH(__nv_bfloat16, int16_t)
CONDENSED_OPS_FORWARD_LAUNCH(__nv_bfloat16, int32_t)

}  // namespace condensed_ops::kernels::cuda
