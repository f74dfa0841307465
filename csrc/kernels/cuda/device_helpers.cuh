// Device helpers shared by the condensed_linear CUDA kernels: value
// conversions, 16-byte packed loads, the shared-memory x slab and its gathers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"

namespace condensed_ops::kernels::cuda {

// Elements per 16-byte vector: the width of every weight/index stream load.
template <typename scalar_t> constexpr int kVector = int(16 / sizeof(scalar_t));

// Widest batch tile per value type: one staged column (batch_tile values of x)
// is at most 32 bytes, i.e. two 16-byte shared loads per gathered index.
template <typename scalar_t> constexpr int kMaxBatchTile = sizeof(scalar_t) >= 8 ? 4 : sizeof(scalar_t) == 4 ? 8 : 16;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t> __device__ __forceinline__ scalar_t from_acc(acc_t<scalar_t> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved as one access (two for 32 bytes). The alignment makes the
// compiler emit LDS/LDG.64/.128 instead of N narrow accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// Read-only global load of a Pack through the non-coherent (texture) path.
// Weights and indices are never written while a kernel runs, and LDG.CONSTANT
// keeps them from competing with writes for the coherent path.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_readonly(const T* p) {
  constexpr int kBytes = int(sizeof(T)) * N;
  Pack<T, N> r;
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) reinterpret_cast<uint4*>(&r)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(&r) = __ldg(reinterpret_cast<const uint2*>(p));
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<unsigned*>(&r) = __ldg(reinterpret_cast<const unsigned*>(p));
  } else {
    static_assert(kBytes == 2, "Pack of 2, 4, 8 or a multiple of 16 bytes");
    *reinterpret_cast<unsigned short*>(&r) = __ldg(reinterpret_cast<const unsigned short*>(p));
  }
  return r;
}

template <typename T> __device__ __forceinline__ T load_readonly(const T* p) { return load_readonly<T, 1>(p).v[0]; }

// An index as an unsigned column: negative int16/int32 values become huge, so
// one unsigned compare with in_features rejects both ends of the range.
template <typename index_t> __device__ __forceinline__ uint32_t as_column(index_t i) {
  return static_cast<uint32_t>(static_cast<int32_t>(i));
}

__device__ __forceinline__ void report_bad_index(int* flag) {
  // Plain store of a constant: racing writers agree, and the flag may live in
  // mapped host memory, where atomics are not guaranteed.
  if (flag != nullptr) *reinterpret_cast<volatile int*>(flag) = 1;
}

__host__ __device__ constexpr int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
__host__ __device__ constexpr int64_t round_down(int64_t v, int64_t m) { return v / m * m; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Copies rows [0, rows_here) of an x slab into x_tile[c * kTile + b]
// (transposed), zero-filling rows rows_here..kTile-1 so that padding lanes
// multiply zeros. Each thread reads one column of the slab (coalesced across
// the warp for every row) and writes it with one packed store: consecutive
// threads write consecutive 4..32-byte packs, free of bank conflicts, where a
// row-by-row copy would stride the banks by kTile.
template <typename scalar_t, int kTile>
__device__ __forceinline__ void stage_x_slab(scalar_t* x_tile, const scalar_t* x_slab, int64_t row_stride, int rows_here,
                                             int64_t in_features) {
  for (int64_t c = threadIdx.x; c < in_features; c += blockDim.x) {
    Pack<scalar_t, kTile> column;
#pragma unroll
    for (int b = 0; b < kTile; ++b) {
      column.v[b] = b < rows_here ? load_readonly(x_slab + b * row_stride + c) : from_acc<scalar_t>(0);
    }
    *reinterpret_cast<Pack<scalar_t, kTile>*>(x_tile + c * kTile) = column;
  }
}

// x values of one column for the kTile rows of a slab, widened to the
// accumulator type: from the staged tile (one or two 16-byte shared loads) or
// straight from global memory through L1 (x rows too long to stage). Padding
// rows read as zero in both.
template <typename scalar_t, int kTile, bool kSharedX>
struct SlabColumns {
  const scalar_t* base;  // x_tile, or the slab's first x row
  int64_t row_stride;    // global only
  int rows_here;         // global only

  __device__ __forceinline__ void load(uint32_t c, acc_t<scalar_t> (&out)[kTile]) const {
    if constexpr (kSharedX) {
      const Pack<scalar_t, kTile> column = *reinterpret_cast<const Pack<scalar_t, kTile>*>(base + size_t(c) * kTile);
#pragma unroll
      for (int b = 0; b < kTile; ++b) out[b] = to_acc(column.v[b]);
    } else {
#pragma unroll
      for (int b = 0; b < kTile; ++b) {
        out[b] = b < rows_here ? to_acc(load_readonly(base + b * row_stride + c)) : acc_t<scalar_t>(0);
      }
    }
  }
};

// ---- tensor-core and asynchronous-copy primitives (sm_80+) -----------------
// Each PTX instruction sits behind one small wrapper so that the CPU emulator
// (tests/cuda_emulator/cuda_emulator.h, which defines
// CONDENSED_OPS_CUDA_EMULATOR) can supply host versions with the same
// semantics: the fragment layouts of the PTX ISA, copies that land only at
// the wait.
#ifndef CONDENSED_OPS_CUDA_EMULATOR
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; `fill` false
// writes 16 zero bytes and reads nothing (src-size 0). .cg: cached in L2 only,
// gathered columns are reused across blocks, not within one.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool fill) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(fill ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lane t names row t % 8 of matrix
// t / 8 (16 contiguous bytes). Lane t receives elements [t / 4][2 (t % 4) + h]
// of matrix i in register i (h = 0 low half).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}
// The same, transposed: lane t receives elements [2 (t % 4) + h][t / 4].
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}

// d += A (16x16, row) * B (16x8, col), 16-bit inputs, fp32 accumulators, in
// the m16n8k16 fragment layouts (g = lane / 4, q = lane % 4):
//   a[i]: A[g + 8 (i & 1)][2q + 8 (i >> 1) + h]   b[i]: B[2q + 8 i + h][g]
//   d[i]: D[g + 8 (i >> 1)][2q + (i & 1)]
template <typename scalar_t>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // CONDENSED_OPS_CUDA_EMULATOR

// Tuning shared by the forward and backward kernels (first-principles values
// for an H100, to be measured there; see NOTES.md).
constexpr int kThreads = 256;
// Shared budget per block: 2 blocks of 8 warps per SM with ~100 KB each
// keeps 16 warps resident to hide gather and weight-load latency.
constexpr size_t kSharedBudget = 100 * 1024;
// A staged x element must feed at least this many gathers in its block,
// else staging costs more L2 traffic than it saves and x goes through L1.
constexpr double kStagingReuse = 2.0;

}  // namespace condensed_ops::kernels::cuda
