// Backward kernels: grad_values (gathered dot products over the batch), the
// column (CSC) layout that turns grad_x into a forward pass, and the
// atomic scatter used for grad_x at small batch when determinism is not asked for.
#include <algorithm>

#include <cub/device/device_radix_sort.cuh>

#include "cuda_kernels.h"
#include "device_helpers.cuh"
#include "launch.cuh"

namespace condensed_ops::kernels::cuda {
namespace {

// Tuning constants (shared ones in device_helpers.cuh and launch.cuh):
// first-principles values for H100. Shared memory per block holds the x slab
// plus one float sum per weight entry of the block.
// Partial sums over batch splits cost splits * entries * 4 bytes of traffic;
// beyond this many splits the extra parallelism no longer pays for it.
constexpr int64_t kMaxSplits = 32;
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

// ---- grad_values -----------------------------------------------------------

// One entry's share of the slab: sum_b grad_y[b, o] * x[b, idx[o, j]], with
// grad_y[b, o] for the slab's rows held in registers by the caller.
template <typename scalar_t, typename index_t, int kTile, bool kSharedX>
__device__ __forceinline__ acc_t<scalar_t> slab_dot(index_t index, uint32_t in_features,
                                                   const acc_t<scalar_t> (&grad_y)[kTile],
                                                   const SlabColumns<scalar_t, kTile, kSharedX>& x, int* bad_index_flag) {
  using acc = acc_t<scalar_t>;
  const uint32_t c = as_column(index);
  if (c >= in_features) {  // never read outside x: the entry's gradient stays 0
    report_bad_index(bad_index_flag);
    return acc(0);
  }
  acc column[kTile];
  x.load(c, column);
  acc dot = acc(0);
#pragma unroll
  for (int b = 0; b < kTile; ++b) dot = fma(grad_y[b], column[b], dot);
  return dot;
}

// A block owns a V-aligned range of flat weight entries (rows may be cut at
// its ends) and one float sum per entry in shared memory. For each of its
// slabs it stages x, then lanes walk the rows crossing its range (groups of
// lanes_per_row lanes per row, packs of V entries per lane) adding one slab
// dot product per entry. An entry always belongs to the same lane, so the
// sums need no atomics and add the slabs in one fixed order.
// (No __launch_bounds__: see launch.cuh.)
template <typename scalar_t, typename index_t, int kTile, bool kSharedX>
__global__ void grad_values_kernel(const GradValuesProblem<scalar_t, index_t> p, const int lanes_per_row,
                                   const int64_t entries_per_block, const size_t x_tile_bytes) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVector<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* const x_tile = reinterpret_cast<scalar_t*>(shared_bytes);
  acc* const block_sums = reinterpret_cast<acc*>(shared_bytes + x_tile_bytes);  // x_tile_bytes % 16 == 0

  const int64_t entries = p.out_features * p.fan_in;
  const int64_t e_begin = int64_t(blockIdx.x) * entries_per_block;  // a multiple of V
  const int64_t e_end = min64(e_begin + entries_per_block, entries);
  const int64_t row_first = e_begin / p.fan_in;
  const int64_t row_last = (e_end - 1) / p.fan_in + 1;
  const int lanes = lanes_per_row;
  const int lane = threadIdx.x & (lanes - 1);
  const int group = threadIdx.x / lanes;
  const int groups = blockDim.x / lanes;
  const uint32_t in = static_cast<uint32_t>(p.in_features);

  for (int64_t i = threadIdx.x; i < e_end - e_begin; i += blockDim.x) block_sums[i] = acc(0);

  const int64_t slabs = (p.batch + kTile - 1) / kTile;
  for (int64_t slab = blockIdx.y; slab < slabs; slab += gridDim.y) {
    const int64_t b0 = slab * kTile;
    const int rows_here = int(min64(kTile, p.batch - b0));
    const scalar_t* x_slab = p.x + b0 * p.x_row_stride;
    __syncthreads();  // zeroed sums / the previous slab's gathers are done
    if constexpr (kSharedX) {
      stage_x_slab<scalar_t, kTile>(x_tile, x_slab, p.x_row_stride, rows_here, p.in_features);
      __syncthreads();
    }
    const SlabColumns<scalar_t, kTile, kSharedX> x{kSharedX ? x_tile : x_slab, p.x_row_stride, rows_here};
    for (int64_t o = row_first + group; o < row_last; o += groups) {
      acc grad_y[kTile];
#pragma unroll
      for (int b = 0; b < kTile; ++b) {
        grad_y[b] = b < rows_here ? to_acc(load_readonly(p.grad_y + (b0 + b) * p.grad_y_row_stride + o)) : acc(0);
      }
      const int64_t begin = max64(o * p.fan_in, e_begin);
      const int64_t end = min64((o + 1) * p.fan_in, e_end);
      const int64_t vec_begin = min64(end, round_up(begin, V));
      const int64_t vec_end = max64(vec_begin, round_down(end, V));
      for (int64_t e = begin + lane; e < vec_begin; e += lanes) {
        block_sums[e - e_begin] += slab_dot(load_readonly(p.idx + e), in, grad_y, x, p.bad_index_flag);
      }
      for (int64_t e = vec_end + lane; e < end; e += lanes) {
        block_sums[e - e_begin] += slab_dot(load_readonly(p.idx + e), in, grad_y, x, p.bad_index_flag);
      }
      for (int64_t e = vec_begin + int64_t(lane) * V; e < vec_end; e += int64_t(lanes) * V) {
        const Pack<index_t, V> c = load_readonly<index_t, V>(p.idx + e);
        // Packed read-modify-write of V sums: per-element updates would hit
        // the same bank from lanes V words apart (a V-way conflict).
        Pack<acc, V>& sums = *reinterpret_cast<Pack<acc, V>*>(block_sums + (e - e_begin));
        Pack<acc, V> updated = sums;
#pragma unroll
        for (int j = 0; j < V; ++j) updated.v[j] += slab_dot(c.v[j], in, grad_y, x, p.bad_index_flag);
        sums = updated;
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < e_end - e_begin; i += blockDim.x) {
    if (gridDim.y > 1) {
      p.partial[int64_t(blockIdx.y) * entries + e_begin + i] = block_sums[i];
    } else {
      p.grad[e_begin + i] = from_acc<scalar_t>(block_sums[i]);
    }
  }
}

// grad[e] = sum over splits s, in order, of partial[s, e].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const acc_t<scalar_t>* partial, int64_t splits, int64_t entries, scalar_t* grad) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < entries; e += int64_t(gridDim.x) * blockDim.x) {
    acc_t<scalar_t> sum = partial[e];
    for (int64_t s = 1; s < splits; ++s) sum += partial[s * entries + e];
    grad[e] = from_acc<scalar_t>(sum);
  }
}

// ---- column layout ---------------------------------------------------------

// Sort keys: the column, or in_features for an entry whose index is out of
// range (sorted past every real column, then left out of the layout).
template <typename index_t>
__global__ void __launch_bounds__(kThreads)
    column_keys_kernel(const index_t* idx, int64_t entries, uint32_t in_features, uint32_t* keys, int32_t* positions,
                       int* bad_index_flag) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < entries; e += int64_t(gridDim.x) * blockDim.x) {
    uint32_t c = as_column(load_readonly(idx + e));
    if (c >= in_features) {
      report_bad_index(bad_index_flag);
      c = in_features;
    }
    keys[e] = c;
    positions[e] = int32_t(e);
  }
}

// Thread p (0 <= p <= entries) writes column_offsets[c] = p for every column c
// in (key[p - 1], key[p]]: each offset exactly once, empty columns included,
// with no atomics or scan. Every entry gets its position in values (its
// source); entries with a real column also get their row.
__global__ void __launch_bounds__(kThreads)
    column_offsets_kernel(const uint32_t* sorted_keys, const int32_t* sorted_positions, int64_t entries,
                          uint32_t in_features, int64_t fan_in, int64_t* column_offsets, int32_t* rows,
                          int32_t* sources) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p <= entries; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t previous = p == 0 ? -1 : int64_t(sorted_keys[p - 1]);
    const int64_t current = p == entries ? int64_t(in_features) : int64_t(sorted_keys[p]);
    for (int64_t c = previous + 1; c <= current; ++c) column_offsets[c] = p;
    if (p < entries) {
      const int32_t position = sorted_positions[p];
      sources[p] = position;
      if (current < int64_t(in_features)) rows[p] = int32_t(position / fan_in);
    }
  }
}

int key_bits(int64_t in_features) {
  int bits = 1;  // keys lie in [0, in_features]
  while (bits < 32 && (int64_t(1) << bits) <= in_features) ++bits;
  return bits;
}

unsigned grid_for(int64_t items, int blocks_cap = 65535) {
  return unsigned(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, blocks_cap));
}

// ---- atomic scatter --------------------------------------------------------

// One thread per weight entry: grad_x[b, idx] += values * grad_y[b, o] for
// every batch row, with fire-and-forget atomics (RED, the result unused).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    grad_input_scatter_kernel(const ScatterGradInputProblem<scalar_t, index_t> p) {
  using acc = acc_t<scalar_t>;
  const int64_t entries = p.out_features * p.fan_in;
  const uint32_t in = static_cast<uint32_t>(p.in_features);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < entries; e += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t c = as_column(load_readonly(p.idx + e));
    if (c >= in) {
      report_bad_index(p.bad_index_flag);
      continue;
    }
    const int64_t o = e / p.fan_in;
    const acc w = to_acc(load_readonly(p.values + e));
    for (int64_t b = 0; b < p.batch; ++b) {
      atomicAdd(p.grad_x_acc + b * p.in_features + c, w * to_acc(load_readonly(p.grad_y + b * p.grad_y_row_stride + o)));
    }
  }
}

}  // namespace

// ---- planners and launchers --------------------------------------------------

template <typename scalar_t>
LaunchPlan plan_grad_values(int64_t batch, int64_t in_features, int64_t out_features, int64_t fan_in,
                            const DeviceLimits& limits, XAccess access) {
  using acc = acc_t<scalar_t>;
  constexpr int V = kVector<scalar_t>;
  LaunchPlan plan;
  plan.threads = kThreads;
  const int64_t entries = out_features * fan_in;
  const int64_t sms = std::max(1, limits.multiprocessors);
  const size_t budget = shared_budget(limits);
  // A block's sums: at least one pack per thread, so that no lane idles on a short range.
  const size_t min_sums_bytes = size_t(kThreads) * V * sizeof(acc);
  bool fits = false;
  const int tile = plan_batch_tile<scalar_t>(batch, in_features, min_sums_bytes, budget, access, &fits);
  const size_t slab = slab_bytes<scalar_t>(in_features, tile);
  bool shared_x = access == XAccess::Shared ? fits : access == XAccess::Auto && fits;
  const int64_t slabs = std::max<int64_t>(1, (batch + tile - 1) / tile);

  const auto layout = [&](bool staged, int64_t* entries_per_block, int64_t* blocks_per_sm) {
    const size_t sums_budget = budget - (staged ? slab : 0);
    const int64_t max_entries = std::max<int64_t>(V, round_down(int64_t(sums_budget / sizeof(acc)), V));
    const int64_t per_sm_by_threads = 2048 / kThreads;
    // Enough blocks over the entries for the GPU alone when the batch is a
    // single slab; larger blocks (fewer re-staged slabs) when slabs add blocks.
    const int64_t target = sms * per_sm_by_threads;
    const int64_t chunks_wanted = (target + std::min(slabs, target) - 1) / std::min(slabs, target);
    int64_t per_block = round_up((entries + chunks_wanted - 1) / chunks_wanted, V);
    const int64_t smallest = std::min<int64_t>({round_up(entries, V), int64_t(kThreads) * V, max_entries});
    per_block = std::clamp<int64_t>(per_block, smallest, max_entries);
    *entries_per_block = per_block;
    const size_t shared = (staged ? slab : 0) + size_t(per_block) * sizeof(acc);
    *blocks_per_sm = std::clamp<int64_t>(int64_t(limits.max_shared_bytes_per_multiprocessor / (shared + 1024)), 1,
                                         per_sm_by_threads);
  };
  int64_t per_block = 0, blocks_per_sm = 1;
  layout(shared_x, &per_block, &blocks_per_sm);
  if (shared_x && access == XAccess::Auto && double(per_block) < kStagingReuse * double(in_features)) {
    shared_x = false;  // too few gathers per staged element: read x through L1
    layout(false, &per_block, &blocks_per_sm);
  }
  plan.shared_x = shared_x;
  plan.batch_tile = tile;
  plan.work_per_block = per_block;
  plan.shared_bytes = (shared_x ? slab : 0) + size_t(per_block) * sizeof(acc);
  plan.grid_x = unsigned(std::max<int64_t>(1, (entries + per_block - 1) / per_block));
  // Lanes per row: enough to cover a row's packs, at most 8 (a 128-byte line of
  // packs per group): there is no cross-lane sum to amortise here.
  plan.lanes_per_row = std::clamp(pow2_at_least((fan_in + V - 1) / V), 1, 8);
  // Splits of the batch (gridDim.y) for kWaves waves of blocks, as far as the
  // partial sums' memory allows.
  const int64_t wanted = (kWaves * sms * blocks_per_sm + plan.grid_x - 1) / plan.grid_x;
  int64_t splits = std::clamp<int64_t>(wanted, 1, std::min<int64_t>({slabs, kMaxSplits, std::max(1, limits.max_grid_y)}));
  while (splits > 1 && splits * entries * int64_t(sizeof(acc)) > kMaxPartialBytes) --splits;
  plan.grid_y = unsigned(splits);
  return plan;
}

int64_t grad_values_partial_elements(const LaunchPlan& plan, int64_t entries) {
  return plan.grid_y > 1 ? int64_t(plan.grid_y) * entries : 0;
}

template <typename scalar_t, typename index_t>
cudaError_t launch_grad_values(const GradValuesProblem<scalar_t, index_t>& p, const LaunchPlan& plan,
                               cudaStream_t stream) {
  if (p.out_features == 0 || p.fan_in == 0) return cudaSuccess;
  if (p.batch == 0) return cudaErrorInvalidValue;  // the caller zero-fills instead
  const cudaError_t err = with_batch_tile<scalar_t>(plan.batch_tile, [&](auto tile) {
    constexpr int kTile = decltype(tile)::value;
    const auto kernel = plan.shared_x ? grad_values_kernel<scalar_t, index_t, kTile, true>
                                      : grad_values_kernel<scalar_t, index_t, kTile, false>;
    const size_t x_tile_bytes = plan.shared_x ? slab_bytes<scalar_t>(p.in_features, kTile) : 0;
    return launch_kernel(kernel, dim3(plan.grid_x, plan.grid_y), unsigned(plan.threads), plan.shared_bytes, stream, p,
                         plan.lanes_per_row, plan.work_per_block, x_tile_bytes);
  });
  if (err != cudaSuccess || plan.grid_y == 1) return err;
  const int64_t entries = p.out_features * p.fan_in;
  const int64_t blocks = std::min<int64_t>((entries + kThreads - 1) / kThreads, 65535);
  return launch_kernel(sum_partials_kernel<scalar_t>, dim3(unsigned(blocks)), kThreads, 0, stream, p.partial,
                       int64_t(plan.grid_y), entries, p.grad);
}

cudaError_t column_layout_sort_bytes(int64_t entries, int64_t in_features, size_t* bytes) {
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> positions(nullptr, nullptr);
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, keys, positions, entries, 0, key_bits(in_features));
}

template <typename index_t>
cudaError_t build_column_layout(const ColumnLayoutProblem<index_t>& p, cudaStream_t stream) {
  const int64_t entries = p.out_features * p.fan_in;
  const uint32_t in = static_cast<uint32_t>(p.in_features);
  if (entries > 0) {
    column_keys_kernel<index_t><<<grid_for(entries), kThreads, 0, stream>>>(p.idx, entries, in, p.keys[0],
                                                                            p.positions[0], p.bad_index_flag);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // LSD radix sort is stable: equal columns keep increasing entry positions,
  // i.e. increasing outputs, which fixes the order of every grad_x sum.
  cub::DoubleBuffer<uint32_t> keys(p.keys[0], p.keys[1]);
  cub::DoubleBuffer<int32_t> positions(p.positions[0], p.positions[1]);
  if (entries > 0) {
    size_t scratch_bytes = p.sort_scratch_bytes;
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(p.sort_scratch, scratch_bytes, keys, positions, entries, 0,
                                                            key_bits(p.in_features), stream);
    if (err != cudaSuccess) return err;
  }
  column_offsets_kernel<<<grid_for(entries + 1), kThreads, 0, stream>>>(
      keys.Current(), positions.Current(), entries, in, std::max<int64_t>(p.fan_in, 1), p.column_offsets, p.rows,
      p.sources);
  return cudaGetLastError();
}

template <typename scalar_t, typename index_t>
cudaError_t launch_grad_input_scatter(const ScatterGradInputProblem<scalar_t, index_t>& p, const DeviceLimits& limits,
                                      cudaStream_t stream) {
  const int64_t entries = p.out_features * p.fan_in;
  if (entries == 0 || p.batch == 0) return cudaSuccess;
  const int blocks_cap = std::max(1, limits.multiprocessors) * (2048 / kThreads) * 4;
  grad_input_scatter_kernel<scalar_t, index_t><<<grid_for(entries, blocks_cap), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---- explicit instantiations -------------------------------------------------
#define CONDENSED_OPS_BACKWARD_FOR_SCALAR(scalar_t)                                                          \
  template LaunchPlan plan_grad_values<scalar_t>(int64_t, int64_t, int64_t, int64_t, const DeviceLimits&, XAccess);
#define CONDENSED_OPS_BACKWARD(scalar_t, index_t)                                                            \
  template cudaError_t launch_grad_values<scalar_t, index_t>(const GradValuesProblem<scalar_t, index_t>&,    \
                                                              const LaunchPlan&, cudaStream_t);             \
  template cudaError_t launch_grad_input_scatter<scalar_t, index_t>(                                         \
      const ScatterGradInputProblem<scalar_t, index_t>&, const DeviceLimits&, cudaStream_t);

CONDENSED_OPS_BACKWARD_FOR_SCALAR(float)
CONDENSED_OPS_BACKWARD_FOR_SCALAR(double)
CONDENSED_OPS_BACKWARD_FOR_SCALAR(__half)
CONDENSED_OPS_BACKWARD_FOR_SCALAR(__nv_bfloat16)
template cudaError_t build_column_layout<int16_t>(const ColumnLayoutProblem<int16_t>&, cudaStream_t);
template cudaError_t build_column_layout<int32_t>(const ColumnLayoutProblem<int32_t>&, cudaStream_t);
CONDENSED_OPS_BACKWARD(float, int16_t)
CONDENSED_OPS_BACKWARD(float, int32_t)
CONDENSED_OPS_BACKWARD(double, int16_t)
CONDENSED_OPS_BACKWARD(double, int32_t)
CONDENSED_OPS_BACKWARD(__half, int16_t)
CONDENSED_OPS_BACKWARD(__half, int32_t)
CONDENSED_OPS_BACKWARD(__nv_bfloat16, int16_t)
CONDENSED_OPS_BACKWARD(__nv_bfloat16, int32_t)

}  // namespace condensed_ops::kernels::cuda
