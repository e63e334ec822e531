// Split-KV forward (flash-decoding): how many splits of the key blocks to run. Torch- and CUDA-free,
// so the CPU build (and its tests) can call it; flash_fwd_num_splits (flash.h) feeds it the device's
// SM count.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace attnkit::flash {

// Most splits the forward accepts (FlashParams::num_splits) and the combine kernel merges.
constexpr int kFlashMaxSplits = 128;

// blocks: thread blocks of the unsplit forward grid (batch * heads * query blocks); key_tiles: the
// most key blocks one of them visits; sms: streaming multiprocessors of the device.
// 1 when the grid already covers most of the SMs or there is nothing to split. Otherwise the split
// count s in [1, min(max_splits, sms, key_tiles)] whose last wave is fullest: a wave efficiency
// w / ceil(w) with w = blocks * s / sms, taking the smallest s within 85% of the best one, and
// skipping any s whose longest split has as many key blocks as with s - 1 splits (it adds combine
// work and idle blocks without shortening the critical path).
inline int flash_num_splits_heuristic(int64_t blocks, int64_t key_tiles, int sms, int max_splits = kFlashMaxSplits) {
  if (blocks <= 0 || key_tiles <= 1 || sms <= 0) return 1;
  if (blocks * 5 >= int64_t(sms) * 4) return 1;  // >= 80% of the SMs busy without splitting
  const int cap = static_cast<int>(std::min<int64_t>({int64_t(max_splits), int64_t(sms), key_tiles}));
  if (cap <= 1) return 1;
  auto per_split = [&](int s) { return (key_tiles + s - 1) / s; };
  auto useful = [&](int s) { return s == 1 || per_split(s) != per_split(s - 1); };
  auto efficiency = [&](int s) {
    const double waves = double(blocks) * s / sms;
    return waves / std::ceil(waves);
  };
  double best = 0.0;
  for (int s = 1; s <= cap; ++s) {
    if (useful(s)) best = std::max(best, efficiency(s));
  }
  for (int s = 1; s <= cap; ++s) {
    if (useful(s) && efficiency(s) >= 0.85 * best) return s;
  }
  return 1;
}

}  // namespace attnkit::flash
