// Forward kernel, its planner and launcher:
//   y[b, o] = bias[o] + sum_j values[o, j] * x[b, idx[o, j]]
// (also grad_x = grad_y @ W, run over W's column layout with CSR rows).
//
// Work split: a block owns a contiguous range of output rows (grid.x) and a
// set of batch slabs (grid.y strides over them). Per slab it stages kTile x
// rows transposed in shared memory; then groups of `lanes_per_row` lanes walk
// one output row each: every lane streams 16-byte packs of weights and indices
// (coalesced across the group), gathers the kTile x values of each index with
// one or two shared loads, and keeps kTile float sums in registers. A
// butterfly shuffle adds the group's partial sums at the end of the row.
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

// One lane's share of output row o: the unaligned head and tail element by
// element, the aligned middle in 16-byte packs (lane l takes packs l, l + G, ...).
template <typename scalar_t, typename index_t, int kTile, bool kSharedX>
__device__ __forceinline__ void accumulate_row(const ForwardProblem<scalar_t, index_t>& p, int64_t o, int lane,
                                               int lanes, const SlabColumns<scalar_t, kTile, kSharedX>& x,
                                               acc_t<scalar_t> (&sums)[kTile]) {
  constexpr int V = kVector<scalar_t>;
  const int64_t begin = p.row_offsets ? load_readonly(p.row_offsets + o) : o * p.fan_in;
  const int64_t end = p.row_offsets ? load_readonly(p.row_offsets + o + 1) : begin + p.fan_in;
  // Rows start anywhere (o * fan_in, or a CSR offset): pack loads need
  // V-aligned element positions, the bases being 16-byte aligned.
  const int64_t vec_begin = min64(end, round_up(begin, V));
  const int64_t vec_end = max64(vec_begin, round_down(end, V));
  const uint32_t in = static_cast<uint32_t>(p.in_features);
  for (int64_t e = begin + lane; e < vec_begin; e += lanes) {
    add_entry(sums, to_acc(load_readonly(p.values + e)), load_readonly(p.idx + e), in, x, p.bad_index_flag);
  }
  for (int64_t e = vec_end + lane; e < end; e += lanes) {
    add_entry(sums, to_acc(load_readonly(p.values + e)), load_readonly(p.idx + e), in, x, p.bad_index_flag);
  }
  // Two packs in flight per lane: the second pair of loads issues before the
  // first pack's gathers wait on theirs.
#pragma unroll 2
  for (int64_t e = vec_begin + int64_t(lane) * V; e < vec_end; e += int64_t(lanes) * V) {
    const Pack<scalar_t, V> w = load_readonly<scalar_t, V>(p.values + e);
    const Pack<index_t, V> c = load_readonly<index_t, V>(p.idx + e);
#pragma unroll
    for (int j = 0; j < V; ++j) add_entry(sums, to_acc(w.v[j]), c.v[j], in, x, p.bad_index_flag);
  }
}

// (No __launch_bounds__: see launch.cuh.)
template <typename scalar_t, typename index_t, int kTile, bool kSharedX>
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
      if (active) accumulate_row(p, o, lane, lanes, x, sums);
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
#pragma unroll
        for (int b = 0; b < kTile; ++b) sums[b] += __shfl_xor_sync(0xffffffffu, sums[b], offset);
      }
      if (active) {
        const acc bias = p.bias ? to_acc(load_readonly(p.bias + o)) : acc(0);
        // Every lane holds the full sums; lane b % lanes writes batch row b.
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

}  // namespace

template <typename scalar_t>
LaunchPlan plan_forward(int64_t batch, int64_t in_features, int64_t out_features, double mean_row_length,
                        const DeviceLimits& limits, XAccess access) {
  constexpr int V = kVector<scalar_t>;
  LaunchPlan plan;
  plan.threads = kThreads;
  const int64_t sms = std::max(1, limits.multiprocessors);
  bool fits = false;
  const int tile = plan_batch_tile<scalar_t>(batch, in_features, 0, shared_budget(limits), access, &fits);
  const size_t slab = slab_bytes<scalar_t>(in_features, tile);
  bool shared_x = access == XAccess::Shared ? fits : access == XAccess::Auto && fits;
  const int64_t slabs = std::max<int64_t>(1, (batch + tile - 1) / tile);

  // Lanes per row: the shuffle-cost bound, raised while the launch would keep
  // too few lanes busy, capped by the packs a row has.
  const double row_length = std::max(mean_row_length, 1.0);
  int lanes = 1;
  while (lanes < 32 && double(2 * lanes) * log2_int(2 * lanes) <= row_length / kShuffleShare) lanes *= 2;
  const double lanes_wanted = double(sms) * kWarpsPerMultiprocessorWanted * 32.0 /
                              double(std::max<int64_t>(1, out_features * std::min<int64_t>(slabs, 1 << 16)));
  while (lanes < 32 && lanes < lanes_wanted) lanes *= 2;
  lanes = std::min(lanes, pow2_at_least(int64_t(std::ceil(row_length / V))));
  plan.lanes_per_row = std::max(1, std::min(lanes, 32));
  const int64_t groups_per_block = kThreads / plan.lanes_per_row;

  const auto blocks_per_sm = [&](bool staged) -> int64_t {
    const int64_t by_threads = 2048 / kThreads;
    if (!staged) return by_threads;
    const size_t per_block = slab + 1024;  // + the runtime's reserved 1 KB
    return std::clamp<int64_t>(int64_t(limits.max_shared_bytes_per_multiprocessor / per_block), 1, by_threads);
  };
  // Work units are (row chunk, slab) pairs, one block each (gridDim.y covers
  // the slabs). Enough units for kWaves waves of resident blocks keeps the
  // last, partial wave short; never fewer rows per block than groups (idle
  // warps); with x staged, enough rows per block that each staged value feeds
  // kStagingReuse gathers. If that leaves fewer blocks than SMs, x goes
  // through L1 instead.
  const int64_t max_chunks = std::max<int64_t>(1, (out_features + groups_per_block - 1) / groups_per_block);
  const auto row_chunks_for = [&](bool staged) {
    const int64_t wanted = (kWaves * sms * blocks_per_sm(staged) + slabs - 1) / slabs;
    int64_t cap = max_chunks;
    if (staged) {
      cap = std::min<int64_t>(
          cap, std::max<int64_t>(1, int64_t(double(out_features) * row_length / (kStagingReuse * double(in_features)))));
    }
    return std::clamp<int64_t>(wanted, 1, cap);
  };
  int64_t row_chunks = row_chunks_for(shared_x);
  if (shared_x && access == XAccess::Auto && row_chunks * slabs < sms) {
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

template <typename scalar_t, typename index_t>
cudaError_t launch_forward(const ForwardProblem<scalar_t, index_t>& p, const LaunchPlan& plan, cudaStream_t stream) {
  if (p.batch == 0 || p.out_features == 0) return cudaSuccess;
  return with_batch_tile<scalar_t>(plan.batch_tile, [&](auto tile) {
    constexpr int kTile = decltype(tile)::value;
    const auto kernel = plan.shared_x ? condensed_linear_forward_kernel<scalar_t, index_t, kTile, true>
                                      : condensed_linear_forward_kernel<scalar_t, index_t, kTile, false>;
    return launch_kernel(kernel, dim3(plan.grid_x, plan.grid_y), unsigned(plan.threads), plan.shared_bytes, stream, p,
                         plan.lanes_per_row, plan.work_per_block);
  });
}

// ---- explicit instantiations -------------------------------------------------
#define CONDENSED_OPS_FORWARD_PLAN(scalar_t)                                                               \
  template LaunchPlan plan_forward<scalar_t>(int64_t, int64_t, int64_t, double, const DeviceLimits&, XAccess);
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
