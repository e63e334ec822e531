// Dynamic Mask Attention: the compact mask produced by mask selection, shared by the CPU and CUDA
// implementations (torch-free, usable from .cu files).
//
// Semantics (per batch b and KV head g; bias[j] = bias[b, g, j], shift = Lk - Lq):
//   visible keys of query row i: j <= i + shift when causal, all keys otherwise; n_i = their count;
//   if n_i <= keep every visible key is kept, else the keep visible keys with the largest bias are
//   kept, ties going to the lower j.
// The mask is stored as a per-row threshold understood by the flash core's kept predicate
//   kept(i, j) = bias[j] > thr[i] || (bias[j] == thr[i] && j <= tie[i])     (on top of visibility)
// i.e. (thr, tie) = (bias[j*], j*) for the keep-th key j* of row i in the order (bias desc, j asc);
// rows that keep all their visible keys get (thr, tie) = (-inf, kTieAll).
//
// Per-batch key counts (seqused_k, a KV cache): batch b uses only its first n_b = seqused_k[b] <= Lk
// keys, with shift = n_b - Lq for its rows; keys j >= n_b are never kept and enter no tile list.
//
// NaN biases: ordered below -inf; a NaN key is never kept by the predicate. If the keep-th key of a
// row is NaN the row keeps all its non-NaN visible keys.
//
// Tile lists (at the flash core's tile granularity kListBlock, see flash.h):
//   fwd_list [B][Hkv][nQB][fwd_width]: per query block, the ascending key blocks holding a key that
//     some row of the block keeps (and sees); fwd_count [B][Hkv][nQB].
//   bwd_list [B][Hkv][nKB][nQB]: per key block, the ascending query blocks with such a row;
//     bwd_count [B][Hkv][nKB].
//   Unused list entries are -1. fwd_width = min(nKB, keep + 2) bounds the forward count: the rows of
//   one query block keep at most keep keys visible to its first row plus keys of <= 2 newly visible
//   key blocks (non-causal: at most keep keys).
#pragma once
#include <algorithm>
#include <climits>
#include <cstdint>

namespace attnkit::dma {

constexpr int kListBlock = 64;      // query rows and key columns per tile of the lists
constexpr int kTieAll = INT_MAX;    // row_tie of a row that keeps all its visible keys

inline int64_t num_list_blocks(int64_t n) {
  return (n + kListBlock - 1) / kListBlock;
}
inline int64_t fwd_list_width(int64_t lk, int64_t keep) {
  const int64_t nkb = num_list_blocks(lk);
  return keep >= nkb ? nkb : std::min<int64_t>(nkb, keep + 2);  // no keep + 2 overflow for huge keep
}

// Parameters of the CUDA mask-selection kernels. Segments are the (b, g) pairs, seg = b * Hkv + g.
struct SelectParams {
  int nseg;
  int lq, lk;
  int keep;
  bool causal;
  int shift;       // lk - lq
  bool all_kept;   // no row has more than keep visible keys: no sort, thresholds -inf
  int levels;      // wavelet-matrix levels: bits of lk - 1 (>= 1)
  int nwords;      // ceil(lk / 32)
  int nqb, nkb;    // list blocks along queries / keys
  int fwd_width;   // fwd_list row length
  int h_kv;        // segments per batch (seg / h_kv is the batch)

  const float* bias;  // [nseg][lk] fp32, contiguous
  // [nseg / h_kv] int32, each in [0, lk]: the keys segment seg uses are its first
  // seqused_k[seg / h_kv]; nullptr: all lk (then shift above applies)
  const int* seqused_k;

  // Workspaces (see dma_select.cu for sizes: dma_select_workspace_bytes).
  void* workspace;

  // Outputs.
  float* thr;      // [nseg][lq]
  int* tie;        // [nseg][lq]
  int* fwd_list;   // [nseg][nqb][fwd_width]
  int* fwd_count;  // [nseg][nqb]
  int* bwd_list;   // [nseg][nkb][nqb]
  int* bwd_count;  // [nseg][nkb]
};

// Tile lists of the compatibility path (masked_bias): a tile (query block, key block) of KV head g
// is active when some visible element of it has a bias > -inf (NaN counts as active) in some
// output head of g's group. The bias is fp32 [B][Hb][rows or broadcast][lk] with column stride 1.
struct BiasListParams {
  int batch, h_kv, kv_group, bias_head_group;  // output head h reads bias head h / bias_head_group
  int lq, lk, shift;
  bool causal;
  int nqb, nkb;
  const float* bias;
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride;
  void* workspace;  // flags: batch * h_kv * nqb * nkb bytes
  int* fwd_list;    // [B][h_kv][nqb][nkb]
  int* fwd_count;
  int* bwd_list;    // [B][h_kv][nkb][nqb]
  int* bwd_count;
};

}  // namespace attnkit::dma
