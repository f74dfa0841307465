// Runs every CUDA kernel of csrc/kernels/cuda under the CPU emulator
// (cuda_emulator.h) and compares each output element with a float64
// reference: forward (constant fan-in rows), grad_values (with and without
// batch splits; bitwise deterministic), grad_x through the column layout (too)
// and through the atomic scatter; and counts the bytes each kernel streams
// from the weights (exactly once per batch slab, 16-byte loads). Every value type and index type, x read from
// shared memory and through L1, awkward shapes, padded row strides, an
// expanded (stride 0) x, and indices outside [0, in_features) that must be
// skipped and reported. Outputs start as NaN so unwritten elements show.
//
//   check_kernels [quick|full|races] [seed]
// Prints one line per failure and a summary; exits 1 on any failure.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_kernels.h"
#include "device_helpers.cuh"  // kVector, kMaxBatchTile

namespace k = condensed_ops::kernels::cuda;

namespace {

int failures = 0;
int checks = 0;

double to_double(float v) { return v; }
double to_double(double v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}

template <typename T> const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, double>) return "float64";
  else if constexpr (std::is_same_v<T, __half>) return "float16";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bfloat16";
  else if constexpr (std::is_same_v<T, int16_t>) return "int16";
  else return "int32";
}

// Unit roundoff of the stored result and of the accumulator.
template <typename T> double output_epsilon() {
  if constexpr (std::is_same_v<T, __half>) return std::ldexp(1.0, -11);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return std::ldexp(1.0, -8);
  else return std::numeric_limits<T>::epsilon() / 2;
}
// Half the spacing of the stored type's subnormals: the absolute rounding
// error floor (float16's subnormals start at 6.1e-5).
template <typename T> double output_subnormal_floor() {
  if constexpr (std::is_same_v<T, __half>) return std::ldexp(1.0, -25);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return std::ldexp(1.0, -134);
  else return std::numeric_limits<T>::denorm_min() / 2;
}
template <typename T> double accumulator_epsilon() {
  return std::numeric_limits<k::acc_t<T>>::epsilon() / 2;
}

struct Case {
  int64_t batch, in_features, out_features, fan_in;
  int64_t x_row_padding = 0;  // x row stride = in_features + padding, or 0 when expanded_x
  int64_t y_row_padding = 0;
  bool expanded_x = false;    // every batch row is the same x row (stride 0)
  bool bias = true;
  int bad_indices = 0;        // entries set outside [0, in_features)
  k::XAccess access = k::XAccess::Auto;
  k::DeviceLimits limits{k::DeviceLimits{132, 227 * 1024, 228 * 1024}};
  k::ForwardTuning forced{};  // the forward's forced variant (its access is `access`)

  k::ForwardTuning forward_tuning() const {
    k::ForwardTuning t = forced;
    t.access = access;
    return t;
  }

  std::string describe() const {
    static const char* access_names[] = {"auto", "shared", "global"};
    char s[320];
    std::snprintf(s, sizeof s, "batch=%" PRId64 " in=%" PRId64 " out=%" PRId64 " fan_in=%" PRId64
                  " x_pad=%" PRId64 " y_pad=%" PRId64 " expanded_x=%d bias=%d bad=%d x=%s sms=%d grid_y<=%d"
                  " lanes=%d packs=%d splits=%d tile=%d",
                  batch, in_features, out_features, fan_in, x_row_padding, y_row_padding, int(expanded_x), int(bias),
                  bad_indices, access_names[int(access)], limits.multiprocessors, limits.max_grid_y,
                  forced.lanes_per_row, forced.packs_in_flight, forced.splits, forced.batch_tile);
    return s;
  }
};

// A value within bounds of the reference: the output's own rounding plus a
// float accumulation of `terms` products whose magnitudes add to `magnitude`.
template <typename T>
bool close(double got, double expected, double magnitude, int64_t terms) {
  const double bound = output_epsilon<T>() * std::abs(expected) * 1.01 +
                       double(terms + 2) * accumulator_epsilon<T>() * magnitude + output_subnormal_floor<T>();
  return std::abs(got - expected) <= bound;
}

template <typename T, typename CaseT>
void expect_close(const char* what, const CaseT& c, const std::vector<T>& got, const std::vector<double>& expected,
                  const std::vector<double>& magnitude, const std::vector<int64_t>& terms, int64_t rows, int64_t columns,
                  int64_t row_stride) {
  ++checks;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t col = 0; col < columns; ++col) {
      const double g = to_double(got[size_t(r * row_stride + col)]);
      const size_t e = size_t(r * columns + col);
      if (!close<T>(g, expected[e], magnitude[e], terms[e])) {
        std::printf("FAIL %s %s: [%" PRId64 ", %" PRId64 "] = %.9g, expected %.9g (%s)\n", what, type_name<T>(), r, col,
                    g, expected[e], c.describe().c_str());
        ++failures;
        return;
      }
    }
  }
}

void expect(bool ok, const char* what, const std::string& detail) {
  ++checks;
  if (!ok) {
    if (failures < 50) std::printf("FAIL %s (%s)\n", what, detail.c_str());
    ++failures;
  }
}

// Buffers are allocated by std::vector: operator new aligns them to 16 bytes,
// as torch's allocators do, which the kernels' packed loads rely on.
template <typename T>
std::vector<T> random_values(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (T& e : v) e = from_double<T>(normal(rng));
  return v;
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, from_double<T>(std::numeric_limits<double>::quiet_NaN()));
}

// The weights are streamed exactly once per batch slab (once in all for a
// batch that fits one tile), values only 16 bytes at a time when rows are
// whole packs.
template <typename scalar_t, typename index_t>
void expect_streamed_once(const char* what, const Case& c, const emu::LoadCounter& values,
                          const emu::LoadCounter& idx, int64_t entries, int64_t batch, int batch_tile,
                          bool whole_packs) {
  const int64_t slabs = (batch + batch_tile - 1) / batch_tile;
  const std::string where = std::string(what) + " " + type_name<scalar_t>() + "/" + type_name<index_t>() + ": " + c.describe();
  expect(values.bytes() == entries * int64_t(sizeof(scalar_t)) * slabs, "values not streamed exactly once per slab",
         where);
  expect(idx.bytes() == entries * int64_t(sizeof(index_t)) * slabs, "idx not streamed exactly once per slab", where);
  expect(!whole_packs || values.wide_loads() * 16 == values.bytes(), "values not loaded 16 bytes at a time", where);
}

template <typename scalar_t, typename index_t>
void check_case(const Case& c, std::mt19937_64& rng) {
  using acc = k::acc_t<scalar_t>;
  const int64_t B = c.batch, I = c.in_features, O = c.out_features, K = c.fan_in, entries = O * K;
  const int64_t x_stride = c.expanded_x ? 0 : I + c.x_row_padding;
  const int64_t y_stride = O + c.y_row_padding;
  const std::vector<scalar_t> x = random_values<scalar_t>(rng, size_t(c.expanded_x ? I : B * x_stride));
  const std::vector<scalar_t> values = random_values<scalar_t>(rng, size_t(entries));
  const std::vector<scalar_t> bias = random_values<scalar_t>(rng, size_t(O));
  const std::vector<scalar_t> grad_y = random_values<scalar_t>(rng, size_t(B * O));
  std::vector<index_t> idx(static_cast<size_t>(entries));
  std::uniform_int_distribution<int64_t> column(0, I - 1);
  for (index_t& i : idx) i = index_t(column(rng));
  // Bad entries: negative, == in_features, the type's extremes.
  const int64_t bad_candidates[] = {-1, I, std::numeric_limits<index_t>::max(), std::numeric_limits<index_t>::min()};
  std::vector<bool> bad(size_t(entries), false);
  for (int n = 0; n < c.bad_indices && entries > 0; ++n) {
    const size_t e = size_t(std::uniform_int_distribution<int64_t>(0, entries - 1)(rng));
    idx[e] = index_t(bad_candidates[n % 4]);
    bad[e] = true;
  }
  const bool any_bad = std::count(bad.begin(), bad.end(), true) > 0;
  const auto xv = [&](int64_t b, int64_t i) { return to_double(x[size_t(b * x_stride + i)]); };

  // ---- forward -------------------------------------------------------------
  {
    std::vector<double> expected(static_cast<size_t>(B * O)), magnitude(static_cast<size_t>(B * O));
    std::vector<int64_t> terms(size_t(B * O), K);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t o = 0; o < O; ++o) {
        double sum = c.bias ? to_double(bias[size_t(o)]) : 0.0, mag = std::abs(sum);
        for (int64_t j = 0; j < K; ++j) {
          const size_t e = size_t(o * K + j);
          if (bad[e]) continue;
          const double term = to_double(values[e]) * xv(b, int64_t(idx[e]));
          sum += term;
          mag += std::abs(term);
        }
        expected[size_t(b * O + o)] = sum;
        magnitude[size_t(b * O + o)] = mag;
      }
    }
    std::vector<scalar_t> y = poisoned<scalar_t>(size_t(B * y_stride));
    int flag = 0;
    k::ForwardProblem<scalar_t, index_t> p{x.data(), x_stride, values.data(), idx.data(),
                                                 c.bias ? bias.data() : nullptr, y.data(), y_stride, B, I, O, K,
                                                 nullptr, &flag};
    const k::LaunchPlan plan = k::plan_forward<scalar_t>(B, I, O, double(K), c.limits, c.forward_tuning());
    std::vector<acc> partial(size_t(k::forward_partial_elements(plan, B, O)));
    p.partial = partial.empty() ? nullptr : partial.data();
    emu::LoadCounter values_loads(values.data(), values.size() * sizeof(scalar_t));
    emu::LoadCounter idx_loads(idx.data(), idx.size() * sizeof(index_t));
    expect(k::launch_forward(p, plan, nullptr) == cudaSuccess && cudaGetLastError() == cudaSuccess,
           "forward: launch", c.describe());
    expect_streamed_once<scalar_t, index_t>("forward", c, values_loads, idx_loads, entries, B, plan.batch_tile,
                                            K % k::kVector<scalar_t> == 0);
    expect_close("forward", c, y, expected, magnitude, terms, B, O, y_stride);
    // The padding between rows stays untouched.
    bool padding_kept = true;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t o = O; o < y_stride; ++o) padding_kept &= std::isnan(to_double(y[size_t(b * y_stride + o)]));
    }
    expect(padding_kept, "forward: wrote into y's row padding", c.describe());
    expect(flag == int(any_bad), "forward: bad-index flag", c.describe());
  }

  // ---- grad_values ---------------------------------------------------------
  {
    std::vector<double> expected(static_cast<size_t>(entries)), magnitude(static_cast<size_t>(entries));
    std::vector<int64_t> terms(size_t(entries), B);
    for (int64_t e = 0; e < entries; ++e) {
      double sum = 0, mag = 0;
      for (int64_t b = 0; b < B && !bad[size_t(e)]; ++b) {
        const double term = to_double(grad_y[size_t(b * O + e / K)]) * xv(b, int64_t(idx[size_t(e)]));
        sum += term;
        mag += std::abs(term);
      }
      expected[size_t(e)] = sum;
      magnitude[size_t(e)] = mag;
    }
    const k::LaunchPlan plan = k::plan_grad_values<scalar_t>(B, I, O, K, c.limits, c.access);
    std::vector<acc> partial(static_cast<size_t>(k::grad_values_partial_elements(plan, entries)));
    std::vector<scalar_t> grad = poisoned<scalar_t>(size_t(entries));
    int flag = 0;
    const k::GradValuesProblem<scalar_t, index_t> p{grad_y.data(), O, x.data(), x_stride, idx.data(), grad.data(),
                                                    partial.empty() ? nullptr : partial.data(), B, I, O, K, &flag};
    emu::LoadCounter idx_loads(idx.data(), idx.size() * sizeof(index_t));
    expect(k::launch_grad_values(p, plan, nullptr) == cudaSuccess && cudaGetLastError() == cudaSuccess,
           "grad_values: launch", c.describe());
    expect(idx_loads.bytes() == entries * int64_t(sizeof(index_t)) * ((B + plan.batch_tile - 1) / plan.batch_tile),
           "grad_values: idx not streamed exactly once per batch slab", c.describe());
    expect_close("grad_values", c, grad, expected, magnitude, terms, O, K, K);
    expect(flag == int(any_bad), "grad_values: bad-index flag", c.describe());
    // No atomics anywhere: a second run, scheduled differently, is bitwise equal.
    const std::vector<scalar_t> first = grad;
    expect(k::launch_grad_values(p, plan, nullptr) == cudaSuccess &&
               std::memcmp(first.data(), grad.data(), first.size() * sizeof(scalar_t)) == 0,
           "grad_values: not bitwise reproducible", c.describe());
  }

  // ---- grad_x = grad_y @ W -------------------------------------------------
  std::vector<double> expected(size_t(B * I), 0.0), magnitude(size_t(B * I), 0.0);
  std::vector<int64_t> terms(size_t(B * I), 0);
  for (int64_t e = 0; e < entries; ++e) {
    if (bad[size_t(e)]) continue;
    const int64_t col = int64_t(idx[size_t(e)]);
    for (int64_t b = 0; b < B; ++b) {
      const double term = to_double(values[size_t(e)]) * to_double(grad_y[size_t(b * O + e / K)]);
      expected[size_t(b * I + col)] += term;
      magnitude[size_t(b * I + col)] += std::abs(term);
      terms[size_t(b * I + col)] += 1;
    }
  }
  {  // the deterministic path: column layout, then the forward kernels over it
    size_t sort_bytes = 0;
    expect(k::column_layout_sort_bytes(entries, I, &sort_bytes) == cudaSuccess, "column layout: sort bytes",
           c.describe());
    std::vector<uint32_t> keys0(static_cast<size_t>(entries)), keys1(static_cast<size_t>(entries));
    std::vector<int32_t> positions0(static_cast<size_t>(entries)), positions1(static_cast<size_t>(entries)),
        rows(static_cast<size_t>(entries)), sources(static_cast<size_t>(entries), -1);
    std::vector<unsigned char> scratch(std::max<size_t>(sort_bytes, 1));
    std::vector<int64_t> column_offsets(size_t(I + 1), -1);
    int flag = 0;
    k::ColumnLayoutProblem<index_t> t{};
    t.idx = idx.data();
    t.out_features = O;
    t.fan_in = K;
    t.in_features = I;
    t.keys[0] = keys0.data();
    t.keys[1] = keys1.data();
    t.positions[0] = positions0.data();
    t.positions[1] = positions1.data();
    t.sort_scratch = scratch.data();
    t.sort_scratch_bytes = sort_bytes;
    t.column_offsets = column_offsets.data();
    t.rows = rows.data();
    t.sources = sources.data();
    t.bad_index_flag = &flag;
    expect(k::build_column_layout(t, nullptr) == cudaSuccess && cudaGetLastError() == cudaSuccess,
           "column layout: build", c.describe());
    bool offsets_ok = column_offsets[0] == 0;
    for (int64_t i = 0; i < I; ++i) offsets_ok &= column_offsets[size_t(i)] <= column_offsets[size_t(i + 1)];
    expect(offsets_ok, "column layout: column offsets not monotone from 0", c.describe());
    expect(flag == int(any_bad), "column layout: bad-index flag", c.describe());
    // sources: a permutation of the entries (a gather by it stays in bounds), in column order.
    std::vector<int32_t> sorted_sources = sources;
    std::sort(sorted_sources.begin(), sorted_sources.end());
    bool permutation = true;
    for (int64_t e = 0; e < entries; ++e) permutation &= sorted_sources[size_t(e)] == int32_t(e);
    expect(permutation, "column layout: sources are not a permutation of the entries", c.describe());
    std::vector<scalar_t> column_values(static_cast<size_t>(entries));  // what the glue gathers per call
    for (int64_t e = 0; e < entries; ++e) column_values[size_t(e)] = values[size_t(sources[size_t(e)])];

    std::vector<scalar_t> first;
    for (int run = 0; run < 2; ++run) {
      std::vector<scalar_t> grad_x = poisoned<scalar_t>(size_t(B * I));
      k::ForwardProblem<scalar_t, int32_t> p{grad_y.data(), O, column_values.data(), rows.data(), nullptr,
                                             grad_x.data(), I, B, O, I, 0, column_offsets.data(), nullptr};
      const double mean_row = I > 0 ? double(entries) / double(I) : 0.0;
      const k::LaunchPlan plan = k::plan_forward<scalar_t>(B, O, I, mean_row, c.limits, k::ForwardTuning{c.access});
      std::vector<acc> partial(size_t(k::forward_partial_elements(plan, B, I)));
      p.partial = partial.empty() ? nullptr : partial.data();
      const int64_t kept = column_offsets[size_t(I)];  // entries with a valid index
      emu::LoadCounter values_loads(column_values.data(), size_t(kept) * sizeof(scalar_t));
      emu::LoadCounter rows_loads(rows.data(), size_t(kept) * sizeof(int32_t));
      expect(k::launch_forward(p, plan, nullptr) == cudaSuccess && cudaGetLastError() == cudaSuccess,
             "grad_x columns: launch", c.describe());
      expect_streamed_once<scalar_t, int32_t>("grad_x columns", c, values_loads, rows_loads, kept, B,
                                              plan.batch_tile, false);
      if (run == 0) {
        expect_close("grad_x columns", c, grad_x, expected, magnitude, terms, B, I, I);
        first = grad_x;
      } else {
        expect(std::memcmp(first.data(), grad_x.data(), first.size() * sizeof(scalar_t)) == 0,
               "grad_x columns: not bitwise reproducible", c.describe());
      }
    }
  }
  {  // the atomic scatter, into a zeroed accumulator of the accumulator type
    std::vector<acc> grad_x_acc(static_cast<size_t>(B * I), acc(0));
    int flag = 0;
    const k::ScatterGradInputProblem<scalar_t, index_t> p{grad_y.data(), O, values.data(), idx.data(),
                                                          grad_x_acc.data(), B, I, O, K, &flag};
    expect(k::launch_grad_input_scatter(p, c.limits, nullptr) == cudaSuccess && cudaGetLastError() == cudaSuccess,
           "grad_x scatter: launch", c.describe());
    std::vector<scalar_t> grad_x(static_cast<size_t>(B * I));
    for (size_t i = 0; i < grad_x.size(); ++i) grad_x[i] = from_double<scalar_t>(double(grad_x_acc[i]));
    expect_close("grad_x scatter", c, grad_x, expected, magnitude, terms, B, I, I);
    expect(flag == int(any_bad), "grad_x scatter: bad-index flag", c.describe());
  }
}

template <typename scalar_t, typename index_t>
void check_all(const std::vector<Case>& cases, std::mt19937_64& rng) {
  for (const Case& c : cases) {
    if (std::is_same_v<index_t, int16_t> && c.in_features > std::numeric_limits<int16_t>::max()) continue;
    check_case<scalar_t, index_t>(c, rng);
  }
}

// ---- grouped forward (tensor cores) ----------------------------------------------

struct GroupedCase {
  int64_t batch, in_features, groups, group_size, fan_in;
  int bad_indices = 0;
  bool bias = true;
  int64_t x_t_padding = 0;  // x_t row stride = round_up(batch, 8) + padding (a multiple of 8)
  int64_t y_row_padding = 0;
  k::DeviceLimits limits{k::DeviceLimits{132, 227 * 1024, 228 * 1024}};

  std::string describe() const {
    char s[256];
    std::snprintf(s, sizeof s, "grouped batch=%" PRId64 " in=%" PRId64 " groups=%" PRId64 " g=%" PRId64
                  " fan_in=%" PRId64 " bad=%d bias=%d x_t_pad=%" PRId64 " y_pad=%" PRId64 " grid_y<=%d",
                  batch, in_features, groups, group_size, fan_in, bad_indices, int(bias), x_t_padding, y_row_padding,
                  limits.max_grid_y);
    return s;
  }
};

template <typename scalar_t, typename index_t>
void check_grouped_case(const GroupedCase& c, std::mt19937_64& rng) {
  const int64_t B = c.batch, I = c.in_features, G = c.groups, g = c.group_size, K = c.fan_in, O = G * g;
  const int64_t x_t_stride = (B + 7) / 8 * 8 + c.x_t_padding;
  const int64_t y_stride = O + c.y_row_padding;
  const std::vector<scalar_t> x = random_values<scalar_t>(rng, size_t(B * I));
  const std::vector<scalar_t> values = random_values<scalar_t>(rng, size_t(O * K));
  const std::vector<scalar_t> bias = random_values<scalar_t>(rng, size_t(O));
  std::vector<index_t> idx(size_t(G * K));
  std::uniform_int_distribution<int64_t> column(0, I - 1);
  for (index_t& i : idx) i = index_t(column(rng));
  const int64_t bad_candidates[] = {-1, I, std::numeric_limits<index_t>::max(), std::numeric_limits<index_t>::min()};
  std::vector<bool> bad(idx.size(), false);
  for (int n = 0; n < c.bad_indices; ++n) {
    const size_t e = size_t(std::uniform_int_distribution<int64_t>(0, G * K - 1)(rng));
    idx[e] = index_t(bad_candidates[n % 4]);
    bad[e] = true;
  }
  const bool any_bad = std::count(bad.begin(), bad.end(), true) > 0;
  // x transposed, with NaN in the row padding: padded batch positions must
  // only reach outputs that are never written.
  std::vector<scalar_t> x_t = poisoned<scalar_t>(size_t(I * x_t_stride));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < I; ++i) x_t[size_t(i * x_t_stride + b)] = x[size_t(b * I + i)];

  std::vector<double> expected(size_t(B * O)), magnitude(size_t(B * O));
  std::vector<int64_t> terms(size_t(B * O), K);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t o = 0; o < O; ++o) {
      const int64_t grp = o / g;
      double sum = c.bias ? to_double(bias[size_t(o)]) : 0.0, mag = std::abs(sum);
      for (int64_t j = 0; j < K; ++j) {
        if (bad[size_t(grp * K + j)]) continue;
        const double term = to_double(values[size_t(o * K + j)]) * to_double(x[size_t(b * I + idx[size_t(grp * K + j)])]);
        sum += term;
        mag += std::abs(term);
      }
      expected[size_t(b * O + o)] = sum;
      magnitude[size_t(b * O + o)] = mag;
    }
  }
  std::vector<scalar_t> y = poisoned<scalar_t>(size_t(B * y_stride));
  int flag = 0;
  const k::GroupedForwardProblem<scalar_t, index_t> p{x_t.data(), x_t_stride, values.data(), idx.data(),
                                                      c.bias ? bias.data() : nullptr, y.data(), y_stride,
                                                      B, I, G, g, K, &flag};
  expect(k::grouped_forward_supported<scalar_t>(B, I, g, K, c.limits), "grouped: supported", c.describe());
  emu::LoadCounter values_loads(values.data(), values.size() * sizeof(scalar_t));
  expect(k::launch_grouped_forward(p, c.limits, nullptr) == cudaSuccess && cudaGetLastError() == cudaSuccess,
         "grouped: launch", c.describe());
  // Each block stages its group's weights once (16-byte loads), whatever
  // number of batch tiles it strides over.
  const int64_t batch_tile = B <= 64 ? 64 : 128;
  const int64_t blocks_per_group = std::min<int64_t>((B + batch_tile - 1) / batch_tile, c.limits.max_grid_y);
  expect(values_loads.bytes() == O * K * int64_t(sizeof(scalar_t)) * blocks_per_group &&
             values_loads.wide_loads() * 16 == values_loads.bytes(),
         "grouped: weights not staged exactly once per block, 16 bytes at a time", c.describe());
  expect_close("grouped", c, y, expected, magnitude, terms, B, O, y_stride);
  bool padding_kept = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = O; o < y_stride; ++o) padding_kept &= std::isnan(to_double(y[size_t(b * y_stride + o)]));
  expect(padding_kept, "grouped: wrote into y's row padding", c.describe());
  expect(flag == int(any_bad), "grouped: bad-index flag", c.describe());
}

template <typename scalar_t, typename index_t>
void check_grouped(const std::vector<GroupedCase>& cases, std::mt19937_64& rng) {
  for (const GroupedCase& c : cases) {
    if (std::is_same_v<index_t, int16_t> && c.in_features > std::numeric_limits<int16_t>::max()) continue;
    check_grouped_case<scalar_t, index_t>(c, rng);
  }
}

// What the grouped kernel refuses (the glue falls back to the per-row op).
void check_grouped_refusals() {
  const k::DeviceLimits h100{132, 227 * 1024, 228 * 1024};
  expect(!k::grouped_forward_supported<float>(16, 64, 16, 8, h100), "grouped: float32 supported", "");
  expect(!k::grouped_forward_supported<double>(16, 64, 16, 8, h100), "grouped: float64 supported", "");
  for (const int64_t g : {1, 4, 12, 20, 72, 128}) {
    expect(!k::grouped_forward_supported<__nv_bfloat16>(16, 64, g, 8, h100), "grouped: odd group size supported",
           std::to_string(g));
  }
  for (const int64_t g : {8, 16, 24, 32, 40, 48, 56, 64}) {
    expect(k::grouped_forward_supported<__half>(256, 4096, g, 410, h100), "grouped: group size refused",
           std::to_string(g));
  }
  // Weights past the shared budget: refused, not launched.
  expect(!k::grouped_forward_supported<__nv_bfloat16>(256, 1 << 20, 64, 1 << 16, h100), "grouped: huge fan_in", "");
  expect(!k::grouped_forward_supported<__nv_bfloat16>(256, 4096, 32, 410, k::DeviceLimits{2, 48 * 1024, 64 * 1024}),
         "grouped: shared memory past a 48 KB device", "");
  int flag = 0;
  const k::GroupedForwardProblem<__nv_bfloat16, int16_t> bad_stride{nullptr, 12, nullptr, nullptr, nullptr, nullptr,
                                                                    16, 5, 10, 1, 16, 4, &flag};
  expect(k::launch_grouped_forward(bad_stride, h100, nullptr) == cudaErrorInvalidValue,
         "grouped: x_t row stride not a multiple of 8 accepted", "");
}

// Batch tails (1, 3, 17, 130: tiles of 64 and 128, partial 8-column pieces),
// fan_in tails of the k16 step and of the 32-wide chunk, pipelines shorter
// than the ring, every supported group size (m16 tiles half used at 8, 24,
// 40, 56), one and several groups, bad indices, padded strides, no bias, and
// a device whose grid.y of 1 makes a block stride over batch tiles.
std::vector<GroupedCase> make_grouped_cases(bool full) {
  std::vector<GroupedCase> cases = {
      {1, 37, 1, 8, 11},
      {3, 50, 5, 16, 13},
      {17, 64, 2, 24, 40},
      {130, 100, 1, 32, 77},
      {5, 33, 5, 40, 1},
      {17, 200, 1, 48, 33},
      {3, 45, 1, 56, 16},
      {70, 90, 2, 64, 32},
      {130, 40, 1, 8, 9, 0, false},
      {17, 60, 5, 16, 21, 4},
      {3, 30, 2, 8, 7, 3},
      {9, 70, 3, 16, 50, 0, true, 16, 5},
  };
  GroupedCase striding = {130, 48, 2, 16, 45, 2};
  striding.limits.max_grid_y = 1;
  cases.push_back(striding);
  if (full) {
    cases.push_back({256, 768, 4, 32, 77});
    cases.push_back({200, 300, 3, 64, 130, 5});
  }
  return cases;
}

// The planners' promises, over shapes far larger than the emulator can run
// (up to a million batch rows or input features): launches the hardware
// accepts (grid, shared memory), every output row and weight entry covered by
// exactly the blocks launched, pack-aligned grad_values ranges.
template <typename scalar_t>
void check_plans() {
  const int64_t V = k::kVector<scalar_t>;
  const k::DeviceLimits devices[] = {
      {132, 227 * 1024, 228 * 1024}, {108, 163 * 1024, 164 * 1024}, {2, 48 * 1024, 64 * 1024, 3}};
  const int64_t batches[] = {1, 2, 3, 5, 8, 9, 16, 17, 31, 256, 2048, 4097, 65536, 1 << 20};
  const int64_t features[] = {1, 7, 768, 3072, 4096, 14336, 25000, 30000, 65535, 1 << 20};
  const int64_t fan_ins[] = {1, 3, 77, 410, 1434};
  const k::XAccess accesses[] = {k::XAccess::Auto, k::XAccess::Shared, k::XAccess::Global};
  for (const k::DeviceLimits& d : devices) {
    for (const int64_t batch : batches) {
      for (const int64_t in : features) {
        for (const int64_t out : features) {
          for (const int64_t fan_in : fan_ins) {
            for (const k::XAccess access : accesses) {
              const auto where = [&] {
                char s[160];
                std::snprintf(s, sizeof s, "%s batch=%" PRId64 " in=%" PRId64 " out=%" PRId64 " fan_in=%" PRId64
                              " access=%d sms=%d", type_name<scalar_t>(), batch, in, out, fan_in, int(access),
                              d.multiprocessors);
                return std::string(s);
              };
              const k::LaunchPlan f = k::plan_forward<scalar_t>(batch, in, out, double(fan_in), d, k::ForwardTuning{access});
              const int64_t f_slabs = (batch + f.batch_tile - 1) / f.batch_tile;
              bool ok = f.threads == k::kThreads && f.batch_tile >= 1 && f.batch_tile <= k::kMaxBatchTile<scalar_t> &&
                        (f.batch_tile & (f.batch_tile - 1)) == 0 && f.lanes_per_row >= 1 && f.lanes_per_row <= 32 &&
                        (f.lanes_per_row & (f.lanes_per_row - 1)) == 0 && f.grid_y >= 1 && int64_t(f.grid_y) <= d.max_grid_y &&
                        int64_t(f.grid_y) <= f_slabs && f.grid_x >= 1 &&
                        int64_t(f.grid_x) * f.work_per_block >= out && int64_t(f.grid_x - 1) * f.work_per_block < out &&
                        f.shared_bytes <= size_t(d.max_shared_bytes_per_block) &&
                        // the one slab rule (launch.cuh): the slab, rounded up to 16 bytes
                        f.shared_bytes == (f.shared_x ? size_t((in * f.batch_tile * int64_t(sizeof(scalar_t)) + 15) / 16 * 16) : 0) &&
                        !(access == k::XAccess::Global && f.shared_x) &&
                        // splits: a power of two <= 8, each with packs to load; scratch stays small
                        f.splits >= 1 && f.splits <= 8 && (f.splits & (f.splits - 1)) == 0 &&
                        (f.splits == 1 || std::ceil(double(fan_in) / double(V)) >= 4.0 * f.splits * f.lanes_per_row) &&
                        k::forward_partial_elements(f, batch, out) * int64_t(sizeof(k::acc_t<scalar_t>)) <= (int64_t(64) << 20) &&
                        (f.packs_in_flight == 2 || (f.packs_in_flight == 4 && f.batch_tile <= 4));
              expect(ok, "plan_forward", ok ? "" : where());
              if (int64_t(out) * fan_in >= (int64_t(1) << 31)) continue;  // the glue's limit for weights
              const k::LaunchPlan g = k::plan_grad_values<scalar_t>(batch, in, out, fan_in, d, access);
              const int64_t entries = out * fan_in;
              const int64_t g_slabs = (batch + g.batch_tile - 1) / g.batch_tile;
              ok = g.threads == k::kThreads && g.batch_tile >= 1 && g.batch_tile <= k::kMaxBatchTile<scalar_t> &&
                   g.lanes_per_row >= 1 && g.lanes_per_row <= 32 && (g.lanes_per_row & (g.lanes_per_row - 1)) == 0 &&
                   g.work_per_block % V == 0 && g.grid_x >= 1 && int64_t(g.grid_x) * g.work_per_block >= entries &&
                   int64_t(g.grid_x - 1) * g.work_per_block < entries && g.grid_y >= 1 &&
                   int64_t(g.grid_y) <= std::min<int64_t>(g_slabs, d.max_grid_y) &&
                   g.shared_bytes <= size_t(d.max_shared_bytes_per_block) &&
                   k::grad_values_partial_elements(g, entries) * int64_t(sizeof(k::acc_t<scalar_t>)) <= (int64_t(256) << 20) &&
                   !(access == k::XAccess::Global && g.shared_x);
              expect(ok, "plan_grad_values", ok ? "" : where());
            }
          }
        }
      }
    }
  }
}

// The forward's forced variants (what benchmarks/cuda_sweep.py times):
// lanes per row, four packs in flight, fan-in splits, including splits
// left with no entries and splits over rows with unaligned heads, and forced
// batch tiles larger than the planner's budget allows, or than x fits at all
// (then x goes through L1). Checked for two value/index type pairs: the
// variants change the work split, not the arithmetic per type.
std::vector<Case> make_variant_cases() {
  const k::ForwardTuning variants[] = {{k::XAccess::Auto, 1, 4, 8, 0}, {k::XAccess::Auto, 2, 4, 4, 2},
                                       {k::XAccess::Auto, 32, 2, 2, 0}, {k::XAccess::Auto, 4, 4, 1, 16},
                                       {k::XAccess::Auto, 8, 2, 8, 8}};
  const Case bases[] = {{1, 37, 29, 11}, {2, 200, 3, 150}, {5, 100, 40, 19, 0, 3}, {3, 50, 21, 7, 5, 3},
                        {4, 33, 9, 5, 0, 0, true}, {1, 3000, 6, 1200, 0, 0, false, true, 3},
                        {40, 70, 10, 24}, {21, 13000, 3, 20}};
  std::vector<Case> cases;
  for (size_t i = 0; i < std::size(bases); ++i) {
    for (size_t v = 0; v < std::size(variants); ++v) {
      if ((i + v) % 2 != 0) continue;  // half of the pairs: enough to reach every path, half the time
      Case c = bases[i];
      c.forced = variants[v];
      c.access = (i + v) % 4 == 0 ? k::XAccess::Auto : k::XAccess::Global;
      cases.push_back(c);
    }
  }
  return cases;
}

// Shapes chosen to reach every plan: batch tiles 1..16 with partial last
// slabs, many slabs (grid_y > 1, grad_values partial sums), row lengths that
// are not multiples of a 16-byte pack (head/tail paths), one-entry rows, rows
// longer than a warp's packs, x rows too long for the shared budget (the L1
// path), a small device (more rows per block), padded and expanded strides.
std::vector<Case> make_cases(bool full) {
  // Two SMs, and a grid of at most 2 blocks over the batch: blocks stride over
  // slabs as they do on a GPU past 65535 slabs.
  const k::DeviceLimits small_device{2, 48 * 1024, 64 * 1024, 2};
  std::vector<Case> cases = {
      {1, 37, 29, 11},
      {2, 16, 8, 16},
      {3, 50, 21, 7, 5, 3},
      {5, 100, 40, 19},
      {8, 64, 33, 9, 0, 0, false, false},
      {9, 30, 12, 30},
      {16, 48, 31, 1},
      {17, 77, 5, 40, 0, 2},
      {40, 24, 10, 24},
      {70, 50, 20, 13},
      {6, 200, 3, 150},
      {4, 33, 9, 5, 0, 0, true},
      {3, 40, 11, 6, 0, 0, false, true, 4},
      {20, 40, 11, 6, 0, 0, false, true, 4},
      {1, 30000, 4, 64},
      {33, 13000, 3, 20},
  };
  for (const Case& base : std::vector<Case>(cases)) {
    for (const k::XAccess access : {k::XAccess::Shared, k::XAccess::Global}) {
      Case c = base;
      c.access = access;
      cases.push_back(c);
    }
  }
  for (const k::XAccess access : {k::XAccess::Auto, k::XAccess::Shared, k::XAccess::Global}) {
    Case small = {12, 90, 70, 17, 1, 1};
    small.access = access;
    small.limits = small_device;
    cases.push_back(small);
    Case strided = {45, 60, 20, 9, 0, 3};
    strided.access = access;
    strided.limits = small_device;
    cases.push_back(strided);
  }
  if (full) {
    cases.push_back({300, 64, 40, 24});
    cases.push_back({129, 31, 65, 10, 2, 1});
    cases.push_back({2, 64, 700, 7});
    // The paper's 90%-sparse 768 -> 3072 layer and its transpose, at sizes the
    // benchmarks use.
    cases.push_back({1, 768, 3072, 77});
    cases.push_back({16, 768, 3072, 77});
    cases.push_back({5, 3072, 768, 307});
    cases.push_back({256, 768, 256, 77});
    Case many_slabs = {250, 40, 12, 9, 0, 0, false, true, 3};
    many_slabs.limits = small_device;
    cases.push_back(many_slabs);
  }
  return cases;
}

}  // namespace

// The measured-variant lookup: same architecture and value size, each
// dimension within a factor of 2, the nearest wins; and a plan takes its choice.
void check_tuned_lookup() {
  const k::XAccess a = k::XAccess::Auto;
  const k::TunedForward table[] = {
      {90, 2, 1, 4096, 14336, 410, {a, 16, 4, 1, 0}},
      {90, 2, 256, 4096, 14336, 410, {a, 8, 2, 1, 16}},
      {90, 4, 1, 4096, 14336, 410, {a, 32, 4, 2, 0}},
      {80, 2, 1, 4096, 14336, 410, {a, 4, 2, 1, 0}},
  };
  const auto pick = [&](int cc, int bytes, int64_t batch, int64_t in, int64_t out, double fan_in) {
    const k::TunedForward* t = k::nearest_tuned_forward(table, std::size(table), cc, bytes, batch, in, out, fan_in);
    return t == nullptr ? -1 : int(t - table);
  };
  expect(pick(90, 2, 1, 4096, 14336, 410) == 0, "tuned: exact entry", "");
  expect(pick(90, 2, 2, 3000, 16000, 300) == 0, "tuned: near entry", "");
  expect(pick(90, 2, 128, 4096, 14336, 410) == 1, "tuned: nearest batch", "");
  expect(pick(90, 2, 16, 4096, 14336, 410) == -1, "tuned: batch 16 is 4 doublings from both", "");
  expect(pick(90, 4, 1, 4096, 14336, 410) == 2 && pick(80, 2, 1, 4096, 14336, 410) == 3, "tuned: per dtype, per arch", "");
  expect(pick(86, 2, 1, 4096, 14336, 410) == -1 && pick(0, 2, 1, 4096, 14336, 410) == -1, "tuned: unknown arch", "");
  expect(pick(90, 2, 1, 1024, 14336, 410) == -1 && pick(90, 2, 1, 4096, 14336, 100) == -1, "tuned: too far", "");
  // The committed table: well-formed entries whose choices the plans accept.
  size_t entries = 0;
  const k::TunedForward* committed = k::tuned_forward_table(&entries);
  for (size_t i = 0; i < entries; ++i) {
    const k::ForwardTuning& c = committed[i].choice;
    const bool ok = committed[i].compute_capability == 0 ||
                    (c.access == k::XAccess::Auto && c.lanes_per_row >= 1 && c.lanes_per_row <= 32 &&
                     (c.lanes_per_row & (c.lanes_per_row - 1)) == 0 && (c.packs_in_flight == 2 || c.packs_in_flight == 4) &&
                     c.splits >= 1 && c.splits <= 8 && c.batch_tile >= 0 && c.batch_tile <= 16);
    expect(ok, "tuned: a committed entry's choice is out of range", std::to_string(i));
  }
}

// The rule's forward plans for the benchmark shapes on an H100/H200 (132 SMs,
// 227 KB of shared memory per block): what csrc/kernels/cuda/NOTES.md's model
// is written against.
template <typename scalar_t>
void print_plans() {
  const k::DeviceLimits h100{132, 227 * 1024, 228 * 1024};
  const int64_t shapes[][2] = {{768, 3072}, {3072, 768}, {4096, 14336}, {14336, 4096}, {1024, 4096}, {14336, 1024}};
  for (const auto& shape : shapes) {
    for (const int64_t batch : {1, 4, 16, 256, 2048}) {
      const int64_t fan_in = shape[0] / 10;  // 90% sparse
      const k::LaunchPlan f = k::plan_forward<scalar_t>(batch, shape[0], shape[1], double(fan_in), h100);
      std::printf("%-8s %5" PRId64 "->%-5" PRId64 " batch %4" PRId64 ": tile %2d %s lanes %2d packs %d splits %d"
                  " rows/block %4" PRId64 " grid %u x %u x %d shared %zu\n",
                  type_name<scalar_t>(), shape[0], shape[1], batch, f.batch_tile, f.shared_x ? "shared" : "global",
                  f.lanes_per_row, f.packs_in_flight, f.splits, f.work_per_block, f.grid_x, f.grid_y, f.splits,
                  f.shared_bytes);
    }
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "quick";
  if (mode == "plans") {
    print_plans<float>();
    print_plans<__nv_bfloat16>();
    return 0;
  }
  if (mode == "grouped") {  // the grouped kernel alone (quick iteration, mutant checks)
    std::mt19937_64 rng(argc > 2 ? std::stoull(argv[2]) : 0);
    check_grouped_refusals();
    const std::vector<GroupedCase> grouped = make_grouped_cases(false);
    check_grouped<__half, int32_t>(grouped, rng);
    check_grouped<__nv_bfloat16, int16_t>(grouped, rng);
    std::printf("%d checks over %zu grouped cases, %d failures\n", checks, grouped.size(), failures);
    return failures == 0 ? 0 : 1;
  }
  if (mode == "rows") {  // the row-layout kernels, one value/index type (mutant checks)
    std::mt19937_64 rng(argc > 2 ? std::stoull(argv[2]) : 0);
    std::vector<Case> cases = make_cases(false);
    const std::vector<Case> variants = make_variant_cases();
    cases.insert(cases.end(), variants.begin(), variants.end());
    check_all<float, int32_t>(cases, rng);
    std::printf("%d checks over %zu cases, %d failures\n", checks, cases.size(), failures);
    return failures == 0 ? 0 : 1;
  }
  if (mode != "quick" && mode != "full" && mode != "races") {
    std::fprintf(stderr, "usage: check_kernels [quick|full|races|grouped|rows|plans] [seed]\n");
    return 2;
  }
  std::mt19937_64 rng(argc > 2 ? std::stoull(argv[2]) : 0);
  check_tuned_lookup();
  check_plans<float>();
  check_plans<double>();
  check_plans<__half>();
  check_plans<__nv_bfloat16>();
  std::vector<Case> cases = make_cases(mode == "full");
  if (mode == "races") {
    // For ThreadSanitizer: the cases where threads share memory across
    // barriers (x staged in shared memory, several batch slabs, sums across
    // slabs) and no bad index: the bad-index flag is a deliberate benign race
    // (every writer stores the same constant).
    std::erase_if(cases, [](const Case& c) { return c.bad_indices > 0 || c.access == k::XAccess::Global || c.batch < 9; });
    check_all<float, int32_t>(cases, rng);
    check_all<__nv_bfloat16, int16_t>(cases, rng);
    std::vector<GroupedCase> grouped = make_grouped_cases(false);
    std::erase_if(grouped, [](const GroupedCase& c) { return c.bad_indices > 0; });
    check_grouped<__nv_bfloat16, int16_t>(grouped, rng);
  } else {
    check_all<float, int16_t>(cases, rng);
    check_all<float, int32_t>(cases, rng);
    check_all<double, int16_t>(cases, rng);
    check_all<double, int32_t>(cases, rng);
    check_all<__half, int16_t>(cases, rng);
    check_all<__half, int32_t>(cases, rng);
    check_all<__nv_bfloat16, int16_t>(cases, rng);
    check_all<__nv_bfloat16, int32_t>(cases, rng);
    const std::vector<Case> variants = make_variant_cases();
    check_all<float, int32_t>(variants, rng);
    check_all<__nv_bfloat16, int16_t>(variants, rng);
  }
  if (mode != "races") {
    check_grouped_refusals();
    const std::vector<GroupedCase> grouped = make_grouped_cases(mode == "full");
    check_grouped<__half, int16_t>(grouped, rng);
    check_grouped<__half, int32_t>(grouped, rng);
    check_grouped<__nv_bfloat16, int16_t>(grouped, rng);
    check_grouped<__nv_bfloat16, int32_t>(grouped, rng);
  }
  std::printf("%d checks over %zu cases, %d failures\n", checks, cases.size(), failures);
  return failures == 0 ? 0 : 1;
}
