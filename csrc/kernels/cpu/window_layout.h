// The window layout: a constant fan-in weight rearranged, once, for small batches.
//
// Rows go kWindowLanes (16) at a time, one row per SIMD lane: a *block*. x's
// columns are cut into windows of `window - 1` columns, each kept in `window`
// slots whose last slot holds 0. For each block and window, the block's
// entries in that window form *steps*: step s holds, for every lane, that
// row's s-th entry in the window (its value, and its slot in the window). A
// lane with fewer entries is padded with (value 0, the zero slot), so padding
// adds exactly +0 whatever x holds (0 * inf would be NaN). A kernel keeps one
// window of x in registers (AVX-512: 4 zmm for 64 slots) and turns each step
// into a permute and one FMA for 16 rows: no gathers, no horizontal sums.
//
// The price is padding: a block's window takes as many steps as its fullest
// lane. For random columns at 90% sparsity, steps hold about 1.7x the entries
// with 64-slot windows and 1.3x with 256-slot ones.
//
// One uint8 blob (a torch tensor in the glue), sections 64-byte aligned:
//   WindowLayoutHeader
//   int64 block_steps[blocks + 1]     first step of each block
//   int32 steps[blocks * windows]     steps of each (block, window)
//   scalar_t values[total_steps][16]
//   uint8 slots[total_steps][16]      slot in the window, < window
// Everything in it is checked before use (check_window_layout, and the kernels
// check the step counts as they walk), so a damaged blob raises, never reads
// out of bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "numeric.h"

namespace condensed_ops::kernels {

constexpr int64_t kWindowLanes = 16;
// Window widths: kPermuteWindow for AVX-512 permutes (4 zmm of x), the widest
// a uint8 slot can address for scalar loads (fewer windows, less padding).
constexpr int64_t kPermuteWindow = 64;
constexpr int64_t kScalarWindow = 256;
constexpr uint32_t kWindowLayoutMagic = 0x57444E43;  // "CNDW"
constexpr uint32_t kWindowLayoutVersion = 1;

enum class ValueType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };
template <typename T> constexpr ValueType value_type_of();
template <> constexpr ValueType value_type_of<float>() { return ValueType::Float32; }
template <> constexpr ValueType value_type_of<double>() { return ValueType::Float64; }
template <> constexpr ValueType value_type_of<Half>() { return ValueType::Float16; }
template <> constexpr ValueType value_type_of<BFloat16>() { return ValueType::BFloat16; }

struct WindowLayoutHeader {
  uint32_t magic;
  uint32_t version;
  ValueType value_type;
  int32_t value_bytes;
  int64_t window;  // slots per window; columns per window = window - 1
  int64_t in_features;
  int64_t out_features;
  int64_t blocks;
  int64_t windows;
  int64_t total_steps;
  int64_t block_steps_at;  // byte offsets of the sections
  int64_t steps_at;
  int64_t values_at;
  int64_t slots_at;
  int64_t bytes;  // the whole blob

  int64_t window_columns() const { return window - 1; }
};

template <typename scalar_t>
struct WindowLayoutView {
  int64_t in_features;
  int64_t out_features;
  int64_t blocks;
  int64_t windows;
  int64_t window;
  int64_t total_steps;
  const int64_t* block_steps;
  const int32_t* steps;
  const scalar_t* values;
  const uint8_t* slots;
};

inline int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

inline int64_t windows_for(int64_t in_features, int64_t window) {
  return std::max<int64_t>(1, (in_features + window - 2) / (window - 1));
}

// The header of a layout with `total_steps` steps: section offsets and size.
inline WindowLayoutHeader plan_window_layout(ValueType value_type, int32_t value_bytes, int64_t window,
                                             int64_t in_features, int64_t out_features, int64_t total_steps) {
  WindowLayoutHeader h{};
  h.magic = kWindowLayoutMagic;
  h.version = kWindowLayoutVersion;
  h.value_type = value_type;
  h.value_bytes = value_bytes;
  h.window = window;
  h.in_features = in_features;
  h.out_features = out_features;
  h.blocks = (out_features + kWindowLanes - 1) / kWindowLanes;
  h.windows = windows_for(in_features, window);
  h.total_steps = total_steps;
  h.block_steps_at = align64(sizeof(WindowLayoutHeader));
  h.steps_at = align64(h.block_steps_at + (h.blocks + 1) * int64_t(sizeof(int64_t)));
  h.values_at = align64(h.steps_at + h.blocks * h.windows * int64_t(sizeof(int32_t)));
  h.slots_at = align64(h.values_at + total_steps * kWindowLanes * value_bytes);
  h.bytes = align64(h.slots_at + total_steps * kWindowLanes);
  return h;
}

// nullptr if `blob` holds a well-formed layout, else why not (its value type is
// the caller's to compare). Checks the header against the blob's size and
// block_steps for monotony; the kernels check each block's step counts
// against block_steps as they go.
inline const char* check_window_layout(const uint8_t* blob, int64_t bytes) {
  if (bytes < int64_t(sizeof(WindowLayoutHeader))) return "it is smaller than its header";
  WindowLayoutHeader h;
  std::memcpy(&h, blob, sizeof h);
  if (h.magic != kWindowLayoutMagic || h.version != kWindowLayoutVersion) return "its header is not a window layout's";
  if (h.value_type < ValueType::Float32 || h.value_type > ValueType::BFloat16) return "its value type is unknown";
  if (h.value_bytes != (h.value_type == ValueType::Float64 ? 8 : h.value_type == ValueType::Float32 ? 4 : 2)) {
    return "its value size does not match its value type";
  }
  if (h.window < 2 || h.window > 256 || (h.window & (h.window - 1)) != 0) return "its window is not a power of two in [2, 256]";
  if (h.in_features < 0 || h.out_features < 0 || h.total_steps < 0 || h.total_steps > (int64_t(1) << 40)) {
    return "its sizes are out of range";
  }
  const WindowLayoutHeader expected =
      plan_window_layout(h.value_type, h.value_bytes, h.window, h.in_features, h.out_features, h.total_steps);
  if (std::memcmp(&expected, &h, sizeof h) != 0 || h.bytes != bytes) return "its sections do not match its size";
  const auto* block_steps = reinterpret_cast<const int64_t*>(blob + h.block_steps_at);
  if (block_steps[0] != 0 || block_steps[h.blocks] != h.total_steps) return "its block table is inconsistent";
  for (int64_t b = 0; b < h.blocks; ++b) {
    if (block_steps[b + 1] < block_steps[b]) return "its block table is inconsistent";
  }
  return nullptr;
}

inline WindowLayoutHeader read_window_header(const uint8_t* blob) {
  WindowLayoutHeader h;
  std::memcpy(&h, blob, sizeof h);
  return h;
}

template <typename scalar_t>
WindowLayoutView<scalar_t> view_window_layout(const uint8_t* blob) {
  const WindowLayoutHeader h = read_window_header(blob);
  return WindowLayoutView<scalar_t>{h.in_features, h.out_features, h.blocks, h.windows, h.window, h.total_steps,
                                    reinterpret_cast<const int64_t*>(blob + h.block_steps_at),
                                    reinterpret_cast<const int32_t*>(blob + h.steps_at),
                                    reinterpret_cast<const scalar_t*>(blob + h.values_at), blob + h.slots_at};
}

// ---- building one -------------------------------------------------------------------

// Output o's entries are row source_row[o] of (values, idx), or none when
// source_row[o] < 0 (an ablated neuron: its output is its bias); nullptr
// means row o. Lets a layer's ablated neurons cost nothing but padding lanes,
// and its outputs come out in order.
inline int64_t source_row_of(const int64_t* source_row, int64_t o) { return source_row ? source_row[o] : o; }

// steps[b * windows + w] for blocks [block_begin, block_end): the most entries
// any of the block's rows has in window w. False, at once, at an index outside
// [0, in_features): idx may have changed since it was validated (through
// .data), and a bad one would count outside the table.
template <typename index_t>
bool count_window_steps(const index_t* idx, const int64_t* source_row, int64_t out_features, int64_t fan_in,
                        int64_t in_features, int64_t window, int64_t windows, int64_t block_begin, int64_t block_end,
                        int32_t* steps) {
  const int64_t columns = window - 1;
  const uint64_t limit = uint64_t(in_features);
  std::vector<int32_t> lane_counts(windows);
  for (int64_t b = block_begin; b < block_end; ++b) {
    int32_t* block = steps + b * windows;
    std::fill(block, block + windows, 0);
    const int64_t row_end = std::min(out_features, (b + 1) * kWindowLanes);
    for (int64_t o = b * kWindowLanes; o < row_end; ++o) {
      const int64_t row = source_row_of(source_row, o);
      if (row < 0) continue;
      std::fill(lane_counts.begin(), lane_counts.end(), 0);
      for (int64_t j = 0; j < fan_in; ++j) {
        const int64_t c = idx[row * fan_in + j];
        if (uint64_t(c) >= limit) return false;
        ++lane_counts[c / columns];
      }
      for (int64_t w = 0; w < windows; ++w) block[w] = std::max(block[w], lane_counts[w]);
    }
  }
  return true;
}

// Fills blocks [block_begin, block_end) of a blob whose header, block_steps and
// steps are written. Each row's entries keep their order within a window.
// False, at once, if idx no longer fits the step counts (it changed while the
// layout was built): nothing is written outside the block's steps.
template <typename scalar_t, typename index_t>
bool fill_window_blocks(const scalar_t* values, const index_t* idx, const int64_t* source_row, int64_t fan_in,
                        uint8_t* blob, int64_t block_begin, int64_t block_end) {
  const WindowLayoutHeader h = read_window_header(blob);
  const auto* block_steps = reinterpret_cast<const int64_t*>(blob + h.block_steps_at);
  const auto* steps = reinterpret_cast<const int32_t*>(blob + h.steps_at);
  auto* out_values = reinterpret_cast<scalar_t*>(blob + h.values_at);
  uint8_t* out_slots = blob + h.slots_at;
  const int64_t columns = h.window_columns();
  const uint8_t zero_slot = uint8_t(h.window - 1);
  const uint64_t limit = uint64_t(h.in_features);
  std::vector<int64_t> window_first_step(h.windows + 1);
  std::vector<int64_t> next_step(h.windows);
  for (int64_t b = block_begin; b < block_end; ++b) {
    // Padding everywhere first, then each lane's entries over it.
    const int64_t first = block_steps[b], last = block_steps[b + 1];
    std::fill(out_values + first * kWindowLanes, out_values + last * kWindowLanes, from_acc<scalar_t>(0));
    std::fill(out_slots + first * kWindowLanes, out_slots + last * kWindowLanes, zero_slot);
    int64_t at = first;
    for (int64_t w = 0; w < h.windows; ++w) {
      window_first_step[w] = at;
      at += steps[b * h.windows + w];
    }
    window_first_step[h.windows] = at;
    const int64_t row_end = std::min(h.out_features, (b + 1) * kWindowLanes);
    for (int64_t o = b * kWindowLanes; o < row_end; ++o) {
      const int64_t row = source_row_of(source_row, o);
      if (row < 0) continue;
      const int64_t lane = o - b * kWindowLanes;
      std::copy(window_first_step.begin(), window_first_step.end() - 1, next_step.begin());
      for (int64_t j = 0; j < fan_in; ++j) {
        const int64_t c = idx[row * fan_in + j];
        if (uint64_t(c) >= limit) return false;
        const int64_t w = c / columns;
        if (next_step[w] >= window_first_step[w + 1]) return false;
        const int64_t position = next_step[w]++ * kWindowLanes + lane;
        out_values[position] = values[row * fan_in + j];
        out_slots[position] = uint8_t(c % columns);
      }
    }
  }
  return true;
}

// One row of x scattered into windows: out[w * window + s] = x[w * (window - 1) + s],
// each window's last slot (and columns past in_features) zero.
template <typename acc>
void scatter_into_windows(const acc* x, int64_t in_features, int64_t window, int64_t windows, acc* out) {
  const int64_t columns = window - 1;
  for (int64_t w = 0; w < windows; ++w) {
    const int64_t begin = w * columns;
    const int64_t count = std::clamp<int64_t>(in_features - begin, 0, columns);
    std::copy(x + begin, x + begin + count, out + w * window);
    std::fill(out + w * window + count, out + (w + 1) * window, acc(0));
  }
}

}  // namespace condensed_ops::kernels
