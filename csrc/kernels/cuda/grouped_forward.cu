// Grouped constant fan-in forward on the tensor cores:
//   y[b, G * g + r] = bias[G * g + r] + sum_j values[G, r, j] * x[b, idx[G, j]]
//
// Per group G: Y_G^T [g, batch] = W_G [g, fan_in] x X_G [fan_in, batch], where
// row j of X_G is column idx[G, j] of x, i.e. row idx[G, j] of x_t.
//
// Work split: a block owns one group (grid.x) and strides over batch tiles of
// kBatchTile = 4 warps x kNTiles x 8 columns (grid.y). Once per block it
// stages the group's checked columns (bad ones become a sentinel) and the
// group's weights, [16 kMTiles, fan_in padded] in shared memory (rows past g
// and columns past fan_in, or with a bad index, zero). Per batch tile it
// streams X_G through a kStages-deep cp.async ring of kChunk = 32 rows
// (fan_in positions) x kBatchTile columns: gathered rows with a bad index or
// past fan_in, and 8-column pieces past the batch, are zero-filled, so the
// k16 tail steps and padded rows multiply zeros. Each warp owns kNTiles n8
// columns of the tile and all kMTiles m16 rows: per k16 step, kMTiles
// ldmatrix.x4 (weights, A) and kNTiles / 2 ldmatrix.x4.trans (gathered x, B:
// stored k-major, so the transposed load yields B's k-pairs), then
// kMTiles x kNTiles mma.sync. Accumulators are stored straight to y with the
// bias added.
//
// Shared-memory rows are padded by 16 bytes (an odd number of 16-byte units
// per row): the 8 rows one ldmatrix phase reads fall in 8 different bank
// groups.
#include <algorithm>

#include "cuda_kernels.h"
#include "device_helpers.cuh"
#include "launch.cuh"

namespace condensed_ops::kernels::cuda {
namespace {

constexpr int kGroupedThreads = 128;  // 4 warps side by side over the batch tile
constexpr int kGroupedWarps = kGroupedThreads / 32;
constexpr int kChunk = 32;            // fan_in positions per pipeline stage (two k16 steps)
constexpr int kStages = 3;            // cp.async ring depth: two chunks in flight while one is multiplied
constexpr int kMaxGroupSize = 64;     // 4 m16 tiles of accumulators per warp
constexpr uint32_t kNoColumn = 0xffffffffu;  // a padded or bad fan_in position (never < in_features)

// Shared-memory geometry of one launch (elements unless named bytes).
struct GroupedGeometry {
  int n_tiles;               // n8 tiles per warp: 2 or 4
  int batch_tile;            // kGroupedWarps * n_tiles * 8
  int64_t chunks;            // ceil(fan_in / kChunk)
  int64_t weight_row;        // chunks * kChunk + 8
  int64_t stage_row;         // batch_tile + 8
  size_t stage_bytes;        // one stage: kChunk rows of stage_row
  size_t weight_bytes;       // 16 m_tiles rows of weight_row
  size_t column_bytes;       // chunks * kChunk uint32 columns
  size_t shared_bytes;
};

template <typename scalar_t>
GroupedGeometry grouped_geometry(int64_t batch, int64_t group_size, int64_t fan_in) {
  GroupedGeometry s;
  s.n_tiles = batch <= 64 ? 2 : 4;
  s.batch_tile = kGroupedWarps * s.n_tiles * 8;
  s.chunks = std::max<int64_t>(1, (fan_in + kChunk - 1) / kChunk);
  s.weight_row = s.chunks * kChunk + 8;
  s.stage_row = s.batch_tile + 8;
  const int64_t m_tiles = (group_size + 15) / 16;
  s.stage_bytes = size_t(kChunk * s.stage_row) * sizeof(scalar_t);
  s.weight_bytes = size_t(16 * m_tiles * s.weight_row) * sizeof(scalar_t);
  s.column_bytes = size_t(s.chunks * kChunk) * sizeof(uint32_t);
  s.shared_bytes = kStages * s.stage_bytes + s.weight_bytes + s.column_bytes;
  return s;
}

// Issues the copies of chunk `chunk` of the batch tile starting at b0 into one
// stage: row i is x_t's row columns[chunk * kChunk + i], from column b0.
template <typename scalar_t, int kBatchTile>
__device__ __forceinline__ void issue_chunk(scalar_t* stage, int64_t stage_row, const uint32_t* columns, int64_t chunk,
                                            const scalar_t* x_t, int64_t x_t_row_stride, int64_t b0, int64_t batch) {
  constexpr int kPieces = kBatchTile / 8;  // 16-byte pieces per row
  for (int piece = threadIdx.x; piece < kChunk * kPieces; piece += kGroupedThreads) {
    const int row = piece / kPieces, q = piece % kPieces;
    const uint32_t c = columns[chunk * kChunk + row];
    const int64_t b = b0 + q * 8;
    const bool fill = c != kNoColumn && b < batch;  // b < batch: the piece lies inside the row's round_up(batch, 8)
    cp_async_16(stage + row * stage_row + q * 8, fill ? x_t + int64_t(c) * x_t_row_stride + b : x_t, fill);
  }
}

// No __launch_bounds__: with it ptxas spills 4 bytes in a third of the
// instantiations (sm_80 and sm_90, nvcc 13.0); without it none spill.
template <typename scalar_t, typename index_t, int kMTiles, int kNTiles>
__global__ void grouped_forward_kernel(const GroupedForwardProblem<scalar_t, index_t> p, const GroupedGeometry s) {
  constexpr int kBatchTile = kGroupedWarps * kNTiles * 8;
  static_assert(kNTiles % 2 == 0, "one ldmatrix.x4.trans loads two n8 tiles");
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* const stages = reinterpret_cast<scalar_t*>(shared_bytes);
  scalar_t* const weights = reinterpret_cast<scalar_t*>(shared_bytes + kStages * s.stage_bytes);
  uint32_t* const columns = reinterpret_cast<uint32_t*>(shared_bytes + kStages * s.stage_bytes + s.weight_bytes);

  const int64_t group = blockIdx.x;
  const int64_t g = p.group_size, k = p.fan_in;
  const int64_t padded_k = s.chunks * kChunk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // The group's columns, checked once: a bad one is reported and becomes
  // kNoColumn, so neither its x row nor its weights are ever used.
  const uint32_t in = static_cast<uint32_t>(p.in_features);
  for (int64_t j = threadIdx.x; j < padded_k; j += kGroupedThreads) {
    uint32_t c = kNoColumn;
    if (j < k) {
      c = as_column(load_readonly(p.idx + group * k + j));
      if (c >= in) {
        report_bad_index(p.bad_index_flag);
        c = kNoColumn;
      }
    }
    columns[j] = c;
  }
  __syncthreads();

  const int64_t tiles = (p.batch + kBatchTile - 1) / kBatchTile;
  bool weights_staged = false;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t b0 = tile * kBatchTile;
    __syncthreads();  // the previous tile's reads of the stages are done
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < s.chunks) {
        issue_chunk<scalar_t, kBatchTile>(stages + st * (s.stage_bytes / sizeof(scalar_t)), s.stage_row,
                                          columns, st, p.x_t, p.x_t_row_stride, b0, p.batch);
      }
      cp_async_commit();
    }
    if (!weights_staged) {  // uniform across the block; overlaps the first chunks' copies
      weights_staged = true;
      // The group's g * k weights are contiguous and 16-byte aligned (g is a
      // multiple of 8): 16-byte loads, each element placed at [r][j].
      constexpr int V = kVector<scalar_t>;
      const scalar_t* group_values = p.values + group * g * k;
      for (int64_t v = threadIdx.x; v < g * k / V; v += kGroupedThreads) {
        const Pack<scalar_t, V> w = load_readonly<scalar_t, V>(group_values + v * V);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int64_t flat = v * V + e, r = flat / k, j = flat - r * k;
          weights[r * s.weight_row + j] = columns[j] == kNoColumn ? from_acc<scalar_t>(0) : w.v[e];
        }
      }
      // Zeros where the products must vanish: columns past fan_in, rows past g.
      for (int64_t e = threadIdx.x; e < 16 * kMTiles * padded_k; e += kGroupedThreads) {
        const int64_t r = e / padded_k, j = e - r * padded_k;
        if (r >= g || j >= k) weights[r * s.weight_row + j] = from_acc<scalar_t>(0);
      }
    }

    float acc[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

    const int warp_n0 = warp * kNTiles * 8;
    // ldmatrix row addresses: lane t names row t % 8 (+ 8 for odd matrices)
    // of matrix t / 8; matrices 2 and 3 sit 8 columns further.
    const int ld_row = (lane % 8) + 8 * ((lane / 8) % 2);
    const int ld_col = 8 * (lane / 16);
    for (int64_t chunk = 0; chunk < s.chunks; ++chunk) {
      cp_async_wait<kStages - 2>();  // this thread's copies of `chunk` have landed
      __syncthreads();               // everyone's have; the stage refilled below is no longer read
      const int64_t next = chunk + kStages - 1;
      if (next < s.chunks) {
        issue_chunk<scalar_t, kBatchTile>(stages + (next % kStages) * (s.stage_bytes / sizeof(scalar_t)),
                                          s.stage_row, columns, next, p.x_t, p.x_t_row_stride, b0, p.batch);
      }
      cp_async_commit();  // possibly empty: keeps the wait count uniform
      const scalar_t* stage = stages + (chunk % kStages) * (s.stage_bytes / sizeof(scalar_t));
#pragma unroll
      for (int step = 0; step < kChunk / 16; ++step) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          ldmatrix_x4(a[mt], weights + (mt * 16 + ld_row) * s.weight_row + chunk * kChunk + step * 16 + ld_col);
        }
        uint32_t b[kNTiles][2];
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, stage + (step * 16 + ld_row) * s.stage_row + warp_n0 + np * 16 + ld_col);
          b[2 * np][0] = r[0];
          b[2 * np][1] = r[1];
          b[2 * np + 1][0] = r[2];
          b[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) mma_m16n8k16<scalar_t>(acc[mt][nt], a[mt], b[nt]);
      }
    }

    // acc[mt][nt][i] = Y^T[mt * 16 + lane / 4 + 8 (i >> 1)][warp_n0 + nt * 8 + 2 (lane % 4) + (i & 1)].
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t r = mt * 16 + lane / 4 + 8 * half;
        if (r >= g) continue;
        const int64_t o = group * g + r;
        const float bias = p.bias ? to_acc(load_readonly(p.bias + o)) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int64_t b = b0 + warp_n0 + nt * 8 + 2 * (lane % 4) + e;
            if (b < p.batch) p.y[b * p.y_row_stride + o] = from_acc<scalar_t>(acc[mt][nt][2 * half + e] + bias);
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename index_t, int kMTiles>
cudaError_t launch_with_m_tiles(const GroupedForwardProblem<scalar_t, index_t>& p, const GroupedGeometry& s,
                                const DeviceLimits& limits, cudaStream_t stream) {
  const int64_t tiles = (p.batch + s.batch_tile - 1) / s.batch_tile;
  const dim3 grid(unsigned(p.groups), unsigned(std::clamp<int64_t>(tiles, 1, std::max(1, limits.max_grid_y))));
  const auto kernel = s.n_tiles == 2 ? grouped_forward_kernel<scalar_t, index_t, kMTiles, 2>
                                     : grouped_forward_kernel<scalar_t, index_t, kMTiles, 4>;
  return launch_kernel(kernel, grid, kGroupedThreads, s.shared_bytes, stream, p, s);
}

}  // namespace

template <typename scalar_t>
bool grouped_forward_supported(int64_t batch, int64_t in_features, int64_t group_size, int64_t fan_in,
                               const DeviceLimits& limits) {
  if constexpr (!std::is_same_v<scalar_t, __half> && !std::is_same_v<scalar_t, __nv_bfloat16>) {
    return false;
  } else {
    if (group_size <= 0 || group_size % 8 != 0 || group_size > kMaxGroupSize) return false;
    if (fan_in <= 0 || in_features <= 0 || in_features > INT32_MAX || batch < 0) return false;
    const GroupedGeometry s = grouped_geometry<scalar_t>(std::max<int64_t>(batch, 1), group_size, fan_in);
    return s.shared_bytes + 1024 <= size_t(std::max(0, limits.max_shared_bytes_per_block));
  }
}

template <typename scalar_t, typename index_t>
cudaError_t launch_grouped_forward(const GroupedForwardProblem<scalar_t, index_t>& p, const DeviceLimits& limits,
                                   cudaStream_t stream) {
  if (!grouped_forward_supported<scalar_t>(p.batch, p.in_features, p.group_size, p.fan_in, limits) ||
      p.groups > INT32_MAX || p.x_t_row_stride % 8 != 0 || p.x_t_row_stride < round_up(p.batch, 8)) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.groups == 0) return cudaSuccess;
  const GroupedGeometry s = grouped_geometry<scalar_t>(p.batch, p.group_size, p.fan_in);
  switch ((p.group_size + 15) / 16) {
    case 1: return launch_with_m_tiles<scalar_t, index_t, 1>(p, s, limits, stream);
    case 2: return launch_with_m_tiles<scalar_t, index_t, 2>(p, s, limits, stream);
    case 3: return launch_with_m_tiles<scalar_t, index_t, 3>(p, s, limits, stream);
    case 4: return launch_with_m_tiles<scalar_t, index_t, 4>(p, s, limits, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---- explicit instantiations -------------------------------------------------
template bool grouped_forward_supported<float>(int64_t, int64_t, int64_t, int64_t, const DeviceLimits&);
template bool grouped_forward_supported<double>(int64_t, int64_t, int64_t, int64_t, const DeviceLimits&);
template bool grouped_forward_supported<__half>(int64_t, int64_t, int64_t, int64_t, const DeviceLimits&);
template bool grouped_forward_supported<__nv_bfloat16>(int64_t, int64_t, int64_t, int64_t, const DeviceLimits&);
#define CONDENSED_OPS_GROUPED_LAUNCH(scalar_t, index_t)                                                    \
  template cudaError_t launch_grouped_forward<scalar_t, index_t>(                                          \
      const GroupedForwardProblem<scalar_t, index_t>&, const DeviceLimits&, cudaStream_t);
CONDENSED_OPS_GROUPED_LAUNCH(__half, int16_t)
CONDENSED_OPS_GROUPED_LAUNCH(__half, int32_t)
CONDENSED_OPS_GROUPED_LAUNCH(__nv_bfloat16, int16_t)
CONDENSED_OPS_GROUPED_LAUNCH(__nv_bfloat16, int32_t)

}  // namespace condensed_ops::kernels::cuda
