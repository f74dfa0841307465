// A CPU emulation of the small part of CUDA our kernels use, so that the
// kernels in csrc/kernels/cuda can be run and checked on a machine without a
// GPU: every CUDA thread of a block is an OS thread, __syncthreads is a block
// barrier, warp shuffles exchange through per-warp slots behind a warp barrier,
// "device" memory is host memory. Blocks run one after another.
//
// What it checks that nvcc cannot: the kernels' index arithmetic and results
// (against a float64 reference, in check_kernels.cpp), launch configurations
// (threads, grid, dynamic shared memory against the opt-in limit), 16-byte
// alignment of packed loads, the bytes streamed from each weight buffer and
// how many loads were 16 bytes wide, warp shuffles reached by all 32 lanes, and - with
// AddressSanitizer / ThreadSanitizer - any out-of-bounds access (global or
// shared: each block's dynamic shared memory is its own exact-size
// allocation, filled with NaN bytes) and shared-memory races between barriers.
// What it cannot check: timing, the GPU memory model beyond what barriers
// order, and anything specific to the hardware (bank conflicts, occupancy).
//
// Used by tests/test_cuda_emulated.py, which rewrites the two CUDA-only
// syntaxes (`kernel<<<...>>>(...)` and `extern __shared__ T name[]`) and
// compiles the .cu files as C++ with this header force-included.
#pragma once

// device_helpers.cuh leaves its PTX wrappers (cp.async, ldmatrix, mma.sync)
// to this header.
#define CONDENSED_OPS_CUDA_EMULATOR 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <tuple>
#include <vector>

namespace emu {

// The device the planners are given (an H100 SXM's limits); launches are
// checked against the same numbers.
constexpr int kMultiprocessors = 132;
constexpr int kMaxSharedPerBlockOptin = 227 * 1024;
constexpr int kMaxSharedPerMultiprocessor = 228 * 1024;
constexpr int kDefaultSharedPerBlock = 48 * 1024;
constexpr int kWarp = 32;

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "emulated CUDA fault: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A reusable barrier whose party can shrink: a thread that leaves the kernel
// no longer holds the others back (as on the GPU, where exited threads count
// as arrived at __syncthreads).
class Barrier {
 public:
  void reset(int parties) {
    std::lock_guard<std::mutex> lock(mutex_);
    parties_ = parties;
    arrived_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_.load(std::memory_order_relaxed);
    if (++arrived_ == parties_) {
      complete_phase(lock);
      return;
    }
    lock.unlock();
    // Waiting on the atomic, not a condition variable: woken threads need
    // not queue for the mutex again (a convoy of 256 on two cores).
    generation_.wait(generation, std::memory_order_acquire);
  }
  void leave() {
    std::unique_lock<std::mutex> lock(mutex_);
    --parties_;
    if (arrived_ > 0 && arrived_ == parties_) complete_phase(lock);
  }
  int parties() {
    std::lock_guard<std::mutex> lock(mutex_);
    return parties_;
  }

 private:
  void complete_phase(std::unique_lock<std::mutex>& lock) {
    arrived_ = 0;
    generation_.fetch_add(1, std::memory_order_release);
    lock.unlock();
    generation_.notify_all();
  }
  std::mutex mutex_;
  int parties_ = 0;
  int arrived_ = 0;
  std::atomic<uint64_t> generation_{0};
};

// What one block's threads share.
struct Block {
  uint3 index{};
  std::unique_ptr<unsigned char[]> shared;  // exactly the launch's dynamic shared bytes
  size_t shared_size = 0;
  Barrier barrier;                          // __syncthreads
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  // Shuffle slots: [warp][phase][lane], 8 bytes each. Alternating phases lets
  // one barrier per shuffle suffice: a slot is rewritten two shuffles later,
  // after every lane has passed the barrier that follows its read.
  std::vector<uint64_t> shuffle_slots;
};

struct ThreadState {
  uint3 thread_idx{};
  dim3 block_dim{};
  dim3 grid_dim{};
  Block* block = nullptr;
  int shuffle_phase = 0;
};

inline ThreadState& this_thread() {
  thread_local ThreadState state;
  return state;
}

inline unsigned char* dynamic_shared() { return this_thread().block->shared.get(); }

inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, n), per kernel.
inline std::map<const void*, int>& shared_limits() {
  static std::map<const void*, int> limits;
  return limits;
}

inline void syncthreads() { this_thread().block->barrier.arrive_and_wait(); }

template <typename T>
T shuffle_xor(unsigned mask, T value, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  if (mask != 0xffffffffu || width != kWarp) fault("__shfl_xor_sync: only full-warp shuffles are emulated");
  ThreadState& t = this_thread();
  if (t.block_dim.x % kWarp != 0) fault("__shfl_xor_sync in a block that is not a whole number of warps");
  const unsigned lane = t.thread_idx.x % kWarp, warp = t.thread_idx.x / kWarp;
  Barrier& barrier = *t.block->warp_barriers[warp];
  // A full mask names all 32 lanes; on the GPU a missing one is undefined behaviour.
  if (barrier.parties() != kWarp) fault("__shfl_xor_sync with a full mask after lanes of the warp exited");
  uint64_t* slots = t.block->shuffle_slots.data() + (size_t(warp) * 2 + t.shuffle_phase) * kWarp;
  t.shuffle_phase ^= 1;
  std::memcpy(&slots[lane], &value, sizeof(T));
  barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, &slots[(lane ^ unsigned(lane_mask)) % kWarp], sizeof(T));
  return result;
}

inline void record_global_load(const void* p, size_t size);

// All 32 lanes' values of one 8-byte word: the exchange behind the emulated
// warp-collective instructions (ldmatrix, mma.sync), built like a shuffle.
inline void warp_all_gather(uint64_t value, uint64_t (&out)[kWarp]) {
  ThreadState& t = this_thread();
  if (t.block_dim.x % kWarp != 0) fault("warp-collective instruction in a block that is not a whole number of warps");
  const unsigned lane = t.thread_idx.x % kWarp, warp = t.thread_idx.x / kWarp;
  Barrier& barrier = *t.block->warp_barriers[warp];
  if (barrier.parties() != kWarp) fault("warp-collective instruction (.sync.aligned) after lanes of the warp exited");
  uint64_t* slots = t.block->shuffle_slots.data() + (size_t(warp) * 2 + t.shuffle_phase) * kWarp;
  t.shuffle_phase ^= 1;
  slots[lane] = value;
  barrier.arrive_and_wait();
  std::memcpy(out, slots, sizeof(out));
}

// A shared-memory access of `bytes` at p must lie in the block's dynamic
// shared memory and be aligned to `alignment`.
inline void check_shared(const void* p, size_t bytes, size_t alignment, const char* what) {
  const Block& block = *this_thread().block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < block.shared.get() || c + bytes > block.shared.get() + block.shared_size) fault(what);
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) fault(what);
}

// cp.async: copies are queued per thread and land only when a wait_group
// retires their group (or the thread exits), the latest moment the PTX
// memory model allows, so a read that does not wait sees the old bytes.
struct AsyncCopy {
  void* shared;
  const void* global;
  bool fill;
};
struct AsyncCopies {
  std::vector<AsyncCopy> open;                   // issued, not yet committed
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first
};
inline AsyncCopies& async_copies() {
  thread_local AsyncCopies copies;
  return copies;
}
inline void land(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (c.fill) {
      record_global_load(c.global, 16);
      std::memcpy(c.shared, c.global, 16);
    } else {
      std::memset(c.shared, 0, 16);
    }
  }
}
inline void finish_async_copies() {
  AsyncCopies& copies = async_copies();
  for (const auto& group : copies.committed) land(group);
  land(copies.open);
  copies.committed.clear();
  copies.open.clear();
}

// Counts the read-only loads (__ldg) that fall in one buffer while it lives:
// how many bytes a kernel streamed from it, and how many loads were 16 bytes
// wide. Create and destroy outside kernels (no kernel may run meanwhile).
class LoadCounter {
 public:
  LoadCounter(const void* data, size_t bytes)
      : begin_(static_cast<const unsigned char*>(data)), end_(begin_ + bytes) {
    all().push_back(this);
  }
  ~LoadCounter() { std::erase(all(), this); }
  LoadCounter(const LoadCounter&) = delete;
  LoadCounter& operator=(const LoadCounter&) = delete;

  int64_t bytes() const { return bytes_; }
  int64_t loads() const { return loads_; }
  int64_t wide_loads() const { return wide_loads_; }
  void reset() { bytes_ = loads_ = wide_loads_ = 0; }

  static void record(const void* p, size_t size) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (LoadCounter* counter : all()) {
      if (c >= counter->begin_ && c < counter->end_) {
        counter->bytes_ += int64_t(size);
        counter->loads_ += 1;
        counter->wide_loads_ += size == 16 ? 1 : 0;
      }
    }
  }

 private:
  static std::vector<LoadCounter*>& all() {
    static std::vector<LoadCounter*> counters;
    return counters;
  }
  const unsigned char* begin_;
  const unsigned char* end_;
  std::atomic<int64_t> bytes_{0}, loads_{0}, wide_loads_{0};
};

inline void record_global_load(const void* p, size_t size) { LoadCounter::record(p, size); }

template <typename T>
T load_global_readonly(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) fault("__ldg: misaligned address");
  LoadCounter::record(p, sizeof(T));
  return *p;
}

// The OS threads that play one block's CUDA threads: created once per block
// size and reused for every block of every launch (creating 256 threads per
// block would dominate the run time).
class BlockRunner {
 public:
  static BlockRunner& for_size(unsigned threads) {
    static std::mutex mutex;
    static std::map<unsigned, BlockRunner*> runners;  // never freed: workers block until exit
    std::lock_guard<std::mutex> lock(mutex);
    BlockRunner*& runner = runners[threads];
    if (runner == nullptr) runner = new BlockRunner(threads);
    return *runner;
  }

  // Runs body() once on each of the block's threads, with their CUDA
  // coordinates set, and returns when all have finished.
  void run(Block& block, dim3 grid, const std::function<void()>& body) {
    const unsigned warps = (threads_ + kWarp - 1) / kWarp;
    block.barrier.reset(int(threads_));
    block.warp_barriers.resize(warps);
    for (unsigned w = 0; w < warps; ++w) {
      if (!block.warp_barriers[w]) block.warp_barriers[w] = std::make_unique<Barrier>();
      block.warp_barriers[w]->reset(int(std::min(threads_ - w * kWarp, unsigned(kWarp))));
    }
    block.shuffle_slots.assign(size_t(warps) * 2 * kWarp, 0);
    block_ = &block;
    grid_ = grid;
    body_ = &body;
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  explicit BlockRunner(unsigned threads) : threads_(threads) {
    start_.reset(int(threads) + 1);
    done_.reset(int(threads) + 1);
    for (unsigned x = 0; x < threads; ++x) std::thread([this, x] { work(x); }).detach();
  }

  void work(unsigned x) {
    ThreadState& t = this_thread();
    t.thread_idx = uint3{x, 0, 0};
    t.block_dim = dim3(threads_);
    for (;;) {
      start_.arrive_and_wait();
      t.block = block_;
      t.grid_dim = grid_;
      t.shuffle_phase = 0;
      (*body_)();
      finish_async_copies();
      t.block->barrier.leave();
      t.block->warp_barriers[x / kWarp]->leave();
      done_.arrive_and_wait();
    }
  }

  const unsigned threads_;
  Barrier start_, done_;
  // Set by run() before the start barrier, read by the workers after it.
  Block* block_ = nullptr;
  dim3 grid_;
  const std::function<void()>* body_ = nullptr;
};

template <typename Kernel>
class Launch;

// kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes
// emu::launch(kernel, grid, block, shared_bytes, stream)(args...).
template <typename... Params>
class Launch<void (*)(Params...)> {
 public:
  using Kernel = void (*)(Params...);
  Launch(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    if (const cudaError_t err = check_configuration(); err != cudaSuccess) {
      last_error() = err;
      return;
    }
    const std::tuple<Params...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel_, params); };
    BlockRunner& runner = BlockRunner::for_size(block_.x);
    Block block;
    for (unsigned z = 0; z < grid_.z; ++z) {
      for (unsigned y = 0; y < grid_.y; ++y) {
        for (unsigned x = 0; x < grid_.x; ++x) {
          block.index = uint3{x, y, z};
          // Shared memory starts as garbage on the GPU: NaN bytes here, in a
          // fresh exact-size allocation so AddressSanitizer sees overruns.
          block.shared.reset(new unsigned char[std::max<size_t>(shared_bytes_, 1)]);
          block.shared_size = shared_bytes_;
          std::memset(block.shared.get(), 0xff, shared_bytes_);
          runner.run(block, grid_, body);
        }
      }
    }
  }

 private:
  cudaError_t check_configuration() const {
    if (block_.x == 0 || block_.x > 1024 || block_.y != 1 || block_.z != 1) return cudaErrorInvalidConfiguration;
    if (grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.x > 0x7fffffffu || grid_.y > 65535 || grid_.z > 65535) {
      return cudaErrorInvalidConfiguration;
    }
    const auto limit = shared_limits().find(reinterpret_cast<const void*>(kernel_));
    const size_t allowed = limit != shared_limits().end() ? size_t(limit->second) : size_t(kDefaultSharedPerBlock);
    if (shared_bytes_ > allowed) return cudaErrorInvalidValue;
    return cudaSuccess;
  }

  Kernel kernel_;
  dim3 grid_, block_;
  size_t shared_bytes_;
};

template <typename... Params>
Launch<void (*)(Params...)> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                                   cudaStream_t = nullptr) {
  return Launch<void (*)(Params...)>(kernel, grid, block, shared_bytes);
}

}  // namespace emu

// ---- the CUDA names the kernels use ------------------------------------------

#define threadIdx (::emu::this_thread().thread_idx)
#define blockIdx (::emu::this_thread().block->index)
#define blockDim (::emu::this_thread().block_dim)
#define gridDim (::emu::this_thread().grid_dim)
#undef __launch_bounds__
#define __launch_bounds__(...)

inline void __syncthreads() { emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = emu::kWarp) {
  return emu::shuffle_xor(mask, value, lane_mask, width);
}

inline uint4 __ldg(const uint4* p) { return emu::load_global_readonly(p); }
inline uint2 __ldg(const uint2* p) { return emu::load_global_readonly(p); }
inline unsigned __ldg(const unsigned* p) { return emu::load_global_readonly(p); }
inline unsigned short __ldg(const unsigned short* p) { return emu::load_global_readonly(p); }

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
inline double atomicAdd(double* address, double value) { return std::atomic_ref<double>(*address).fetch_add(value); }

// ---- device_helpers.cuh's PTX wrappers, with the PTX ISA's semantics ---------

namespace condensed_ops::kernels::cuda {

inline void cp_async_16(void* shared, const void* global, bool fill) {
  emu::check_shared(shared, 16, 16, "cp.async: destination outside shared memory or not 16-byte aligned");
  if (fill && reinterpret_cast<uintptr_t>(global) % 16 != 0) emu::fault("cp.async: source not 16-byte aligned");
  emu::async_copies().open.push_back({shared, global, fill});
}
inline void cp_async_commit() {
  emu::AsyncCopies& copies = emu::async_copies();
  copies.committed.push_back(std::move(copies.open));
  copies.open.clear();
}
template <int kPending>
void cp_async_wait() {
  emu::AsyncCopies& copies = emu::async_copies();
  while (copies.committed.size() > size_t(kPending)) {
    emu::land(copies.committed.front());
    copies.committed.erase(copies.committed.begin());
  }
}

namespace emulated {
inline uint16_t b16_at(uint64_t row_address, int element) {
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const unsigned char*>(row_address) + 2 * element, 2);
  return v;
}
template <bool kTrans>
void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  emu::check_shared(row, 16, 16, "ldmatrix: row outside shared memory or not 16-byte aligned");
  uint64_t rows[emu::kWarp];
  emu::warp_all_gather(reinterpret_cast<uint64_t>(row), rows);
  const int t = int(threadIdx.x % emu::kWarp);
  for (int i = 0; i < 4; ++i) {
    const uint64_t* m = rows + 8 * i;  // matrix i's 8 row addresses
    const uint16_t lo = kTrans ? b16_at(m[2 * (t % 4)], t / 4) : b16_at(m[t / 4], 2 * (t % 4));
    const uint16_t hi = kTrans ? b16_at(m[2 * (t % 4) + 1], t / 4) : b16_at(m[t / 4], 2 * (t % 4) + 1);
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}
inline float widen(__nv_bfloat16, uint16_t bits) {
  const uint32_t f = uint32_t(bits) << 16;
  float v;
  std::memcpy(&v, &f, 4);
  return v;
}
inline float widen(__half, uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
}  // namespace emulated

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emulated::ldmatrix_x4<false>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emulated::ldmatrix_x4<true>(r, row); }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: every lane contributes
// its fragments and receives its four accumulators, in the PTX ISA's layouts
// (g = lane / 4, q = lane % 4; h selects the 16-bit half, low first):
//   A[m][k] sits in lane 4 (m % 8) + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2
//   B[k][n] sits in lane 4 n + (k % 8) / 2, register (k >= 8), half k % 2
//   D[m][n] goes to lane 4 (m % 8) + n / 2, register 2 (m >= 8) + n % 2
// Products of 16-bit values are exact in float; they are added in k order.
template <typename scalar_t>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint64_t a01[emu::kWarp], a23[emu::kWarp], b01[emu::kWarp];
  emu::warp_all_gather(uint64_t(a[0]) | (uint64_t(a[1]) << 32), a01);
  emu::warp_all_gather(uint64_t(a[2]) | (uint64_t(a[3]) << 32), a23);
  emu::warp_all_gather(uint64_t(b[0]) | (uint64_t(b[1]) << 32), b01);
  const auto reg = [](const uint64_t* lo_pair, const uint64_t* hi_pair, int lane, int r) -> uint32_t {
    const uint64_t w = (r < 2 ? lo_pair : hi_pair)[lane];
    return uint32_t(r % 2 == 0 ? w : w >> 32);
  };
  const auto A = [&](int m, int k) {
    const uint32_t w = reg(a01, a23, 4 * (m % 8) + (k % 8) / 2, (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0));
    return emulated::widen(scalar_t{}, uint16_t(k % 2 == 0 ? w : w >> 16));
  };
  const auto B = [&](int k, int n) {
    const uint32_t w = reg(b01, b01, 4 * n + (k % 8) / 2, k >= 8 ? 1 : 0);
    return emulated::widen(scalar_t{}, uint16_t(k % 2 == 0 ? w : w >> 16));
  };
  const int lane = int(threadIdx.x % emu::kWarp);
  for (int i = 0; i < 4; ++i) {
    const int m = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A(m, k) * B(k, n);
    d[i] = sum;
  }
}

}  // namespace condensed_ops::kernels::cuda

// The runtime calls the kernels' host code makes.
extern "C" inline cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::last_error();
  emu::last_error() = cudaSuccess;
  return err;
}

extern "C" inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > emu::kMaxSharedPerBlockOptin) return cudaErrorInvalidValue;
  emu::shared_limits()[func] = value;
  return cudaSuccess;
}

// The typed overload nvcc's cuda_runtime.h adds for kernels.
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}

extern "C" inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = emu::kMultiprocessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::kMaxSharedPerBlockOptin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::kMaxSharedPerMultiprocessor; return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = 65535; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

// ---- cub::DeviceRadixSort::SortPairs, as a host stable sort ------------------

namespace cub {

template <typename T>
struct DoubleBuffer {
  T* d_buffers[2];
  int selector = 0;
  DoubleBuffer(T* current, T* alternate) : d_buffers{current, alternate} {}
  T* Current() { return d_buffers[selector]; }
  T* Alternate() { return d_buffers[selector ^ 1]; }
};

struct DeviceRadixSort {
  // Stable by keys' bits [begin_bit, end_bit) like cub's LSD sort; a key with
  // a bit set outside that range is a caller's bug (cub would ignore it).
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* scratch, size_t& scratch_bytes, DoubleBuffer<Key>& keys,
                               DoubleBuffer<Value>& values, NumItems items, int begin_bit, int end_bit,
                               cudaStream_t = nullptr) {
    if (scratch == nullptr) {
      scratch_bytes = 256;  // the caller must allocate and pass what it was told
      return cudaSuccess;
    }
    if (scratch_bytes < 256) return cudaErrorInvalidValue;
    const int64_t n = int64_t(items);
    const Key* k = keys.Current();
    const Value* v = values.Current();
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), int64_t(0));
    const int width = int(sizeof(Key) * 8);
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t key = uint64_t(k[i]);
      const uint64_t outside = (end_bit >= width ? 0 : key >> end_bit) | (begin_bit > 0 ? key & ((uint64_t(1) << begin_bit) - 1) : 0);
      if (outside != 0) emu::fault("cub::DeviceRadixSort::SortPairs: a key has bits outside [begin_bit, end_bit)");
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return k[a] < k[b]; });
    Key* k_out = keys.Alternate();
    Value* v_out = values.Alternate();
    for (int64_t i = 0; i < n; ++i) {
      k_out[i] = k[order[size_t(i)]];
      v_out[i] = v[order[size_t(i)]];
    }
    keys.selector ^= 1;
    values.selector ^= 1;
    return cudaSuccess;
  }
};

}  // namespace cub
