// W's column layout (CSC) for grad_x: a counting sort of the entries by column.
#include <vector>

#include "cpu_kernels.h"
#include "type_pairs.h"

namespace condensed_ops::kernels {

template <typename index_t>
bool column_offsets(const index_t* idx, int64_t entries, int64_t in_features, int64_t* offsets) {
  std::fill(offsets, offsets + in_features + 1, 0);
  for (int64_t e = 0; e < entries; ++e) {
    const int64_t c = idx[e];
    if (uint64_t(c) >= uint64_t(in_features)) return false;
    ++offsets[c + 1];
  }
  for (int64_t c = 0; c < in_features; ++c) offsets[c + 1] += offsets[c];
  return true;
}

template <typename index_t, typename row_index_t>
bool fill_columns(const index_t* idx, int64_t out_features, int64_t fan_in, int64_t in_features,
                  const int64_t* offsets, int64_t column_begin, int64_t column_end, row_index_t* rows,
                  int32_t* sources) {
  // Visiting entries in (o, j) order keeps each column's outputs ascending.
  std::vector<int64_t> cursor(offsets + column_begin, offsets + column_end);
  for (int64_t o = 0; o < out_features; ++o) {
    for (int64_t j = 0; j < fan_in; ++j) {
      const int64_t c = idx[o * fan_in + j];
      if (uint64_t(c) >= uint64_t(in_features)) return false;
      if (c < column_begin || c >= column_end) continue;
      int64_t& at = cursor[c - column_begin];
      if (at >= offsets[c + 1]) return false;  // idx changed since the offsets were counted
      rows[at] = row_index_t(o);
      sources[at] = int32_t(o * fan_in + j);
      ++at;
    }
  }
  return true;
}

template <typename scalar_t>
void gather_column_values(const scalar_t* values, const int32_t* sources, int64_t begin, int64_t end,
                          scalar_t* column_values) {
  for (int64_t e = begin; e < end; ++e) column_values[e] = values[sources[e]];
}

template bool column_offsets<int16_t>(const int16_t*, int64_t, int64_t, int64_t*);
template bool column_offsets<int32_t>(const int32_t*, int64_t, int64_t, int64_t*);

#define CONDENSED_OPS_INSTANTIATE(index_t, row_index_t)                                                    \
  template bool fill_columns<index_t, row_index_t>(const index_t*, int64_t, int64_t, int64_t, const int64_t*, \
                                                   int64_t, int64_t, row_index_t*, int32_t*);
CONDENSED_OPS_INSTANTIATE(int16_t, int16_t)
CONDENSED_OPS_INSTANTIATE(int16_t, int32_t)
CONDENSED_OPS_INSTANTIATE(int32_t, int16_t)
CONDENSED_OPS_INSTANTIATE(int32_t, int32_t)
#undef CONDENSED_OPS_INSTANTIATE

#define CONDENSED_OPS_INSTANTIATE(scalar_t) \
  template void gather_column_values<scalar_t>(const scalar_t*, const int32_t*, int64_t, int64_t, scalar_t*);
CONDENSED_OPS_FOR_EACH_VALUE_TYPE(CONDENSED_OPS_INSTANTIATE)
#undef CONDENSED_OPS_INSTANTIATE

}  // namespace condensed_ops::kernels
