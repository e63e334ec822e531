// The schema of every op of the attnkit library, one ATTNKIT_OP("schema") each: an X-macro list,
// included by csrc/torch_bindings.cpp (TORCH_LIBRARY(attnkit)) and by the CPU emulator's test
// extensions (tests/cuda_emu), which define ATTNKIT_OP before including it. Adding an op means adding
// its lines here; implementations register per dispatch key in csrc/<op>/<op>_cpu.cpp / <op>_cuda.cpp.
// No include guard: each includer expands the list once with its own ATTNKIT_OP.
#ifndef ATTNKIT_OP
#error "define ATTNKIT_OP(schema) before including op_schemas.h"
#endif

// ---- Sparse Query Attention (flash core) ----
// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; out [B, Lq, max(Hq,Hkv), D]; lse [B, max(Hq,Hkv), Lq] fp32.
// window_left / window_right: -1 unbounded, else query i (aligned i' = i + Lk - Lq) sees keys
// i' - window_left <= j <= i' + window_right. deterministic: dq without atomics (CUDA).
ATTNKIT_OP(
    "sqa_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, int window_left=-1, int window_right=-1)"
    " -> (Tensor out, Tensor lse)")
ATTNKIT_OP(
    "sqa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale,"
    " int window_left=-1, int window_right=-1, bool deterministic=False)"
    " -> (Tensor dq, Tensor dk, Tensor dv)")
// Varlen: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens_* int32 [B + 1]; out [total_q, H, D],
// lse [H, total_q] fp32 (H = max(Hq, Hkv)).
ATTNKIT_OP(
    "sqa_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
    " int max_seqlen_k, bool causal, float scale, int window_left=-1, int window_right=-1)"
    " -> (Tensor out, Tensor lse)")
ATTNKIT_OP(
    "sqa_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q,"
    " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left=-1,"
    " int window_right=-1, bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)")
// KV cache decode (forward only): appends k/v (optional, [B, Lnew, Hkv, D]) into k_cache / v_cache
// [B, Lmax, Hkv, D] in place at rows cache_seqlens[b] (int32 [B]), then attends q [B, Lq, Hq, D] to
// the first cache_seqlens[b] + Lnew keys. num_splits: split-KV chunks on CUDA (0: automatic).
ATTNKIT_OP(
    "sqa_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, Tensor cache_seqlens,"
    " bool causal, float scale, int window_left=-1, int window_right=-1, int num_splits=0)"
    " -> (Tensor out, Tensor lse)")

// ---- flash core, CPU test hook (not public API; tests/test_flash_core.py) ----
// Built only with the CMake option ATTNKIT_TEST_OPS (make dev / make test turn it on).
#ifdef ATTNKIT_TEST_OPS
// Runs flash_fwd_cpu and, when dout is given, flash_bwd_cpu with every optional FlashParams input.
// bias [B, Hb, 1|rows, Lk] fp32; row_thr / row_tie [B, Hkv, rows]; q_index / k_index
// [B, max(Hq,Hkv), S, w] int32. Returns [out, lse, dq, dk, dv, dbias] (empty when not computed).
ATTNKIT_OP(
    "_flash_core_cpu_test(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? row_thr, Tensor? row_tie,"
    " Tensor? q_index, Tensor? k_index, bool causal, int window_left, bool self_mask, float self_score,"
    " float scale, Tensor? dout) -> Tensor[]")
// The split-KV heuristic (flash/flash_splits.h) for a grid of `blocks` blocks, key_tiles key blocks, sms SMs.
ATTNKIT_OP("_flash_num_splits_heuristic(int blocks, int key_tiles, int sms) -> int")
#endif  // ATTNKIT_TEST_OPS

// ---- Routing attention (Routing Transformer; flash core with segment gathers) ----
// q/k [B, L, H, D]; centroids [H, C, D] (unit norm). q_idx/k_idx [B, H, C, w] int32, each list the
// w tokens with the largest normalize(x).mu_c (ties to the lower position), sorted by position.
// shared_qk: k is not read (may be None) and k_idx equals q_idx. with_assign: also the argmax cluster
// of every token, int32 [B, L, H] (q) or [2B, L, H] (q then k), for the k-means step; else empty.
// key_padding_mask [B, L] bool: padded tokens rank below every other token (score -inf), so they
// enter no list while window <= the number of unpadded tokens.
ATTNKIT_OP(
    "routing_assign(Tensor q, Tensor? k, Tensor centroids, int window, bool shared_qk, bool with_assign=False,"
    " Tensor? key_padding_mask=None) -> (Tensor q_idx, Tensor k_idx, Tensor assign)")
// Attention inside clusters: out [B, L, H, D] (mean over the clusters a token's query is routed to,
// 0 when none), out_seg [B, C*wq, H, D] and lse [B, H, C*wq] fp32 in segment space (saved for the
// backward). With q_idx = k_idx = None: one segment holding the whole sequence (local heads), out_seg
// is empty and the backward takes out in its place. key_padding_mask [B, L] bool: True keys are never
// attended; only without q_idx / k_idx (the core takes no bias with segments: route padded tokens
// out with routing_assign's key_padding_mask instead). window_left < 0: no window. self_mask: the
// score of a query with its own token is -5e4.
// deterministic is read by the backward only (routing_bwd; False: fp32 atomics on CUDA); the forward
// takes it so that autograd can pass it on.
ATTNKIT_OP(
    "routing_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_idx, Tensor? k_idx, Tensor? key_padding_mask,"
    " bool causal, int window_left, bool self_mask, float scale, bool deterministic=True)"
    " -> (Tensor out, Tensor out_seg, Tensor lse)")
ATTNKIT_OP(
    "routing_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? q_idx, Tensor? k_idx,"
    " Tensor? key_padding_mask, Tensor out_seg, Tensor lse, bool causal, int window_left, bool self_mask,"
    " float scale, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)")
// Online k-means. x [N, H, D], centroids [H, C, D], any float dtypes (sums in fp64 / fixed point).
// kmeans_assign: int32 [N, H], argmax_c normalize(x).mu_c (first maximum).
ATTNKIT_OP("kmeans_assign(Tensor x, Tensor centroids) -> Tensor")
// In place: mu_c <- normalize(decay mu_c + (1 - decay) normalize(mean of the normalised x assigned
// to c)) for every cluster that got a vector; assign (int32 [N, H]) is computed when None.
ATTNKIT_OP("kmeans_ema_update_(Tensor(a!) centroids, Tensor x, Tensor? assign, float decay) -> ()")
// ---- Dynamic Mask Attention (flash core + top-keep mask selection) ----
// bias [B, Hkv, Lk]: per-key scores shared by all query rows. dma_select builds the compact mask:
// thr / tie [B, Hkv, Lq] (fp32 / int32, the core's kept predicate), forward tile lists
// [B, Hkv, nQB, width] + counts [B, Hkv, nQB], backward tile lists [B, Hkv, nKB, nQB] + counts.
// seqused_k (int32 [B], each in [0, Lk]): batch b selects among its first seqused_k[b] keys only,
// its rows aligned to that count (query row i at key position seqused_k[b] - lq + i).
ATTNKIT_OP(
    "dma_select(Tensor bias, int keep, int lq, bool causal, Tensor? seqused_k=None)"
    " -> (Tensor thr, Tensor tie, Tensor fwd_list, Tensor fwd_count, Tensor bwd_list, Tensor bwd_count)")
// Tile lists are optional (None: no tile skipping); the backward lists ride along for autograd.
// deterministic is read by the backward only (True: dq through per-key-block fp32 slices summed in a
// fixed order on CUDA, False: fp32 atomics); the forward takes it so that autograd can pass it on.
ATTNKIT_OP(
    "dma_fwd(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor thr, Tensor tie, Tensor? fwd_list,"
    " Tensor? fwd_count, Tensor? bwd_list, Tensor? bwd_count, bool causal, float scale,"
    " bool deterministic=False) -> (Tensor out, Tensor lse)")
ATTNKIT_OP(
    "dma_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor out, Tensor lse, Tensor thr,"
    " Tensor tie, Tensor? bwd_list, Tensor? bwd_count, bool causal, float scale, bool deterministic=False)"
    " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)")
// KV cache decode (forward only, not differentiable): appends k/v [B, Lnew, Hkv, D] and bias
// [B, Hkv, Lnew] (all three or none) into k_cache / v_cache [B, Lmax, Hkv, D] and bias_cache
// [B, Hkv, Lmax] in place at rows cache_seqlens[b] (int32 [B]), then runs DMA for batch row b over
// its first n_b = cache_seqlens[b] + Lnew keys: top-keep by bias among the keys each query row sees
// (causal: row i at key position n_b - Lq + i; ties to the lower key), then the core.
// out [B, Lq, max(H, Hkv), D], lse [B, max(H, Hkv), Lq] fp32.
ATTNKIT_OP(
    "dma_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) bias_cache, Tensor? k, Tensor? v,"
    " Tensor? bias, Tensor cache_seqlens, int keep, bool causal, float scale) -> (Tensor out, Tensor lse)")
// Compatibility path (flash-dmattn interface): attn_mask (bool) and attn_bias broadcastable to
// [B, Hq|Hkv|1, Lq|1, Lk]. dbias has attn_bias's shape and dtype (empty when not asked for).
ATTNKIT_OP(
    "masked_bias_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? attn_bias, bool causal,"
    " float scale) -> (Tensor out, Tensor lse)")
ATTNKIT_OP(
    "masked_bias_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? attn_bias,"
    " Tensor out, Tensor lse, bool causal, float scale, bool need_dbias)"
    " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)")

// ---- Mixture-of-Head attention (flash core with compact query gathers + csrc/moh/ kernels) ----
// q [B, L, Hq, D], k/v [B, L, Hkv, D] (Hkv divides Hq); head_idx [B, L, K] int32/int64 (-1: empty
// slot; distinct per token); head_weight [B, L, K] fp32 or q's dtype. out [B, L, Hq, D]: row (t, h)
// = w * softmax(q_th K_h^T scale) V_h when token t selected h with weight w, else 0; lse [B, Hq, L]
// fp32 (-inf where not selected). Slot-space residuals for the backward: out_slot [B, L, Hq, D]
// (unweighted head outputs, row i of head h = the i-th token selecting h; 0 past the count),
// lse_slot [B, Hq, L] (-inf past the count), q_index [B, Hq, L] (-1 past the count) and q_count
// [B, Hq] int32 (the lists), slot [B, L, K] int32 (-1 for empty slots).
ATTNKIT_OP(
    "moh_fwd(Tensor q, Tensor k, Tensor v, Tensor head_idx, Tensor head_weight, bool causal, float scale)"
    " -> (Tensor out, Tensor lse, Tensor out_slot, Tensor lse_slot, Tensor q_index, Tensor q_count, Tensor slot)")
ATTNKIT_OP(
    "moh_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor head_idx, Tensor head_weight, Tensor out_slot,"
    " Tensor lse_slot, Tensor q_index, Tensor q_count, Tensor slot, bool causal, float scale)"
    " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dweight)")

// ---- Lightning attention (own kernels: csrc/lightning/) ----
// q, k [B, L, H, Dk], v [B, L, H, Dv]; slopes [H]; states [N, H, Dk, Dv] (N = B, or the number of
// sequences of cu_seqlens with B = 1). State, slopes and accumulation are fp32 (fp64 for fp64 inputs,
// CPU only). block_size: chunk length (0: automatic); num_splits: segments per sequence (0: automatic).
ATTNKIT_OP(
    "lightning_fwd(Tensor q, Tensor k, Tensor v, Tensor slopes, float scale, Tensor? initial_state,"
    " Tensor? cu_seqlens, int block_size, int num_splits) -> (Tensor o, Tensor final_state)")
// dslopes is all zeros unless compute_dslopes; dinitial_state is always computed (it is cheap).
ATTNKIT_OP(
    "lightning_bwd(Tensor dout, Tensor? dfinal_state, Tensor q, Tensor k, Tensor v, Tensor slopes, float scale,"
    " Tensor? initial_state, Tensor? cu_seqlens, int block_size, int num_splits, bool compute_dslopes)"
    " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dslopes, Tensor dinitial_state)")
// One decoding step, q/k [B, 1, H, Dk], v [B, 1, H, Dv]; state [B, H, Dk, Dv] updated in place.
ATTNKIT_OP("lightning_decode_(Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor slopes, float scale) -> Tensor o")
// The same step without mutation: returns the new state.
ATTNKIT_OP(
    "lightning_decode(Tensor q, Tensor k, Tensor v, Tensor state, Tensor slopes, float scale)"
    " -> (Tensor o, Tensor new_state)")
