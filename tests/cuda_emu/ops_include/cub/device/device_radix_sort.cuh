// CPU emulator stand-in for cub::DeviceRadixSort::SortPairs (tests/cuda_emu/run_ops_e2e.py): a stable
// ascending sort of the key bits [begin_bit, end_bit) carrying the values, like cub's LSD radix sort.
// The first call (d_temp_storage == nullptr) only reports the temporary storage it needs.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

namespace cub {
struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, int num_items, int begin_bit = 0,
                               int end_bit = int(sizeof(K) * 8), cudaStream_t = nullptr) {
    if (d_temp_storage == nullptr) {
      temp_storage_bytes = 256;  // any size: the stand-in sorts in host memory
      return cudaSuccess;
    }
    const int width = end_bit - begin_bit;
    const uint64_t mask = width >= 64 ? ~uint64_t{0} : ((uint64_t{1} << width) - 1);
    auto digit = [&](int i) { return (uint64_t(keys_in[i]) >> begin_bit) & mask; };
    std::vector<int> order(num_items);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return digit(a) < digit(b); });
    for (int i = 0; i < num_items; ++i) {
      keys_out[i] = keys_in[order[i]];
      values_out[i] = values_in[order[i]];
    }
    return cudaSuccess;
  }
};
}  // namespace cub
