"""Sparse Query Attention: the public function, its fake implementation and its autograd formula."""

from __future__ import annotations

import torch

from .._checks import (
    cache_seqlens_tensor,
    check_attention_inputs,
    check_bool,
    check_scale,
    check_tensor,
    check_window_size,
)

__all__ = ["sparse_query_attention", "sparse_query_attention_varlen", "sparse_query_attention_with_kvcache"]


def sparse_query_attention(q, k, v, *, causal=False, scale=None, window_size=(-1, -1), deterministic=False,
                           return_lse=False):
    """Sparse Query Attention: softmax attention with independent query and key/value head counts.

    Args:
        q: ``[B, Lq, Hq, D]``.
        k, v: ``[B, Lk, Hkv, D]``. ``Hq`` and ``Hkv`` must divide one another.
        causal: mask key ``j`` of query row ``i`` unless ``j <= i + Lk - Lq`` (bottom-right aligned,
            as FlashAttention). A row that sees no key outputs 0 (and its lse is ``-inf``).
        scale: softmax scale, default ``D ** -0.5``.
        window_size: ``(left, right)``, -1 for unbounded (as FlashAttention 2): query row ``i``, at
            aligned position ``i' = i + Lk - Lq``, sees keys ``i' - left <= j <= i' + right``. With
            ``causal`` both masks apply. Key tiles outside the window are skipped, so the cost grows
            with the window, not with ``Lk``.
        deterministic: backward without floating-point atomics for dq (CUDA; the CPU path always
            is deterministic): bitwise reproducible, uses ``ceil(Lk / 64) * Hout / Hq`` fp32 dq
            buffers.
        return_lse: also return the fp32 log-sum-exp of each row.

    Head mapping, with ``H = max(Hq, Hkv)`` output heads:
        - ``Hq >= Hkv`` (MHA / GQA / MQA / SQA): output head ``h`` uses query head ``h`` and KV head
          ``h // (Hq / Hkv)``;
        - ``Hkv > Hq`` (reverse SQA): output head ``h`` uses query head ``h // (Hkv / Hq)`` and KV
          head ``h``.

    Returns:
        ``out`` ``[B, Lq, H, D]`` in the dtype of q, or ``(out, lse)`` with lse ``[B, H, Lq]`` fp32.

    Dtypes: fp16, bf16, fp32 and fp64 on CPU; fp16 and bf16 on CUDA with D in {32, 64, 96, 128, 256}.
    Gradients flow to q, k and v (not through lse).
    """
    check_attention_inputs(q, k, v)
    causal = check_bool("causal", causal)
    return_lse = check_bool("return_lse", return_lse)
    deterministic = check_bool("deterministic", deterministic)
    wl, wr = check_window_size(window_size)
    scale = check_scale(scale, q.shape[-1] ** -0.5)
    if deterministic:
        out, lse = _sqa_fwd_det(q, k, v, causal, scale, wl, wr)
    else:
        out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, causal, scale, wl, wr)
    return (out, lse) if return_lse else out


# Fake implementations (torch.compile / FakeTensor)


@torch.library.register_fake("attnkit::sqa_fwd")


def _sqa_fwd_fake(q, k, v, causal, scale, window_left=-1, window_right=-1):
    B, Lq, Hq, D = q.shape
    H = max(Hq, k.shape[2])
    out = q.new_empty((B, Lq, H, D))
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("attnkit::sqa_bwd")


def _sqa_bwd_fake(dout, q, k, v, out, lse, causal, scale, window_left=-1, window_right=-1, deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Autograd: sqa_fwd -> sqa_bwd. Gradients for q, k, v; lse is not differentiable.


def _make_setup_context(deterministic):
    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale = inputs[:5]
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.scale = scale
        ctx.window = (inputs[5] if len(inputs) > 5 else -1, inputs[6] if len(inputs) > 6 else -1)
        ctx.deterministic = deterministic

    return setup_context


def _sqa_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # Autograd may hand over expanded or otherwise strided grads; the kernels need a unit last stride.
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.attnkit.sqa_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.window[0],
                                           ctx.window[1], ctx.deterministic)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("attnkit::sqa_fwd", _sqa_backward, setup_context=_make_setup_context(False))


# The deterministic forward: the same kernel as sqa_fwd, registered as its own Python custom op so
# that its autograd formula calls sqa_bwd with deterministic=True (the public op's schema stays as
# it is; a flag on the forward that only the backward reads would not change the forward's output).
@torch.library.custom_op("attnkit::sqa_fwd_det", mutates_args=())
def _sqa_fwd_det(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, window_left: int,
                 window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, causal, scale, window_left, window_right)
    return out, lse


_sqa_fwd_det.register_fake(_sqa_fwd_fake)
_sqa_fwd_det.register_autograd(_sqa_backward, setup_context=_make_setup_context(True))


# ---- varlen (packed sequences) ------------------------------------------------------------------


def _check_cu_seqlens(name, t, q):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [batch + 1], got shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _check_int(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def sparse_query_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                                  scale=None, window_size=(-1, -1), deterministic=False, return_lse=False):
    """Sparse Query Attention over packed sequences of different lengths (FlashAttention 2's varlen).

    Args:
        q: ``[total_q, Hq, D]``: the query rows of every sequence, one after another.
        k, v: ``[total_k, Hkv, D]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on q's device: sequence ``b`` owns query rows
            ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1]`` and key rows ``cu_seqlens_k[b] .. cu_seqlens_k[b + 1]``.
            Non-decreasing (zero-length sequences are allowed) and inside the tensors; otherwise a
            ``RuntimeError`` names the argument (the check reads the offsets: one small
            device-to-host copy on CUDA).
        max_seqlen_q, max_seqlen_k: ints, at least every sequence's length (they size the CUDA grid).
        causal, scale, window_size, deterministic: as :func:`sparse_query_attention`, per sequence
            (causal / window align each sequence's own bottom-right corner).

    Returns:
        ``out`` ``[total_q, H, D]`` with ``H = max(Hq, Hkv)`` (the head mapping of
        :func:`sparse_query_attention`), or ``(out, lse)`` with lse ``[H, total_q]`` fp32. Rows outside
        every sequence output 0 (lse ``-inf``) and get zero gradients.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    check_attention_inputs(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_k must have the shape of cu_seqlens_q {tuple(cu_seqlens_q.shape)}, got {tuple(cu_seqlens_k.shape)}"
        )
    max_seqlen_q = _check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_int("max_seqlen_k", max_seqlen_k)
    causal = check_bool("causal", causal)
    return_lse = check_bool("return_lse", return_lse)
    deterministic = check_bool("deterministic", deterministic)
    wl, wr = check_window_size(window_size)
    scale = check_scale(scale, q.shape[-1] ** -0.5)
    op = _sqa_varlen_fwd_det if deterministic else torch.ops.attnkit.sqa_varlen_fwd
    out, lse = op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, wl, wr)
    return (out, lse) if return_lse else out


@torch.library.register_fake("attnkit::sqa_varlen_fwd")
def _sqa_varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window_left=-1, window_right=-1):
    H = max(q.shape[1], k.shape[1])
    return q.new_empty((q.shape[0], H, q.shape[2])), q.new_empty((H, q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("attnkit::sqa_varlen_bwd")
def _sqa_varlen_bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, window_left=-1,
                         window_right=-1, deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _make_varlen_setup_context(deterministic):
    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs[:9]
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, inputs[9] if len(inputs) > 9 else -1,
                    inputs[10] if len(inputs) > 10 else -1, deterministic)

    return setup_context


def _sqa_varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attnkit.sqa_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "attnkit::sqa_varlen_fwd", _sqa_varlen_backward, setup_context=_make_varlen_setup_context(False)
)


@torch.library.custom_op("attnkit::sqa_varlen_fwd_det", mutates_args=())
def _sqa_varlen_fwd_det(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
                        window_left: int, window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.attnkit.sqa_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                causal, scale, window_left, window_right)
    return out, lse


_sqa_varlen_fwd_det.register_fake(_sqa_varlen_fwd_fake)
_sqa_varlen_fwd_det.register_autograd(_sqa_varlen_backward, setup_context=_make_varlen_setup_context(True))


# ---- KV cache decode ----------------------------------------------------------------------------


def sparse_query_attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, causal=False,
                                        scale=None, window_size=(-1, -1), num_splits=0, return_lse=False):
    """Sparse Query Attention against a KV cache, for generation (FlashAttention 2's
    ``flash_attn_with_kvcache``). Forward only.

    Args:
        q: ``[B, Lq, Hq, D]`` (``Lq = 1`` for token-by-token decoding).
        k_cache, v_cache: ``[B, Lmax, Hkv, D]``, owned by the caller.
        k, v: optional new keys / values ``[B, Lnew, Hkv, D]``: written **in place** into the caches at
            rows ``cache_seqlens[b] .. cache_seqlens[b] + Lnew`` before the attention. The caller
            advances ``cache_seqlens`` afterwards.
        cache_seqlens: int, or int32 ``[B]`` on q's device: the valid rows of each cache before the
            append. ``cache_seqlens[b] + Lnew`` must fit in ``Lmax`` (else a ``RuntimeError``).
        causal, scale, window_size: as :func:`sparse_query_attention`, with ``Lk = cache_seqlens[b] + Lnew``
            per batch row (query row ``i`` sits at key position ``Lk - Lq + i``).
        num_splits: split-KV (flash-decoding) on CUDA: the keys of each (batch row, head, query block)
            are split into this many contiguous chunks run by separate thread blocks, whose partial
            results are merged through their log-sum-exp. 0 (default): automatic, splitting only when
            the unsplit grid would leave most of the GPU's SMs idle (small batch, few query rows, long
            cache); 1: no split; larger values are clamped to the number of 64-key blocks (and to 128).
            The CPU path ignores it. Results of different values agree up to rounding.

    Returns:
        ``out`` ``[B, Lq, H, D]`` (``H = max(Hq, Hkv)``), or ``(out, lse)`` with lse ``[B, H, Lq]`` fp32.
    """
    check_attention_inputs(q, k_cache, v_cache)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or neither)")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, 4)
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        B, _, Hkv, D = k_cache.shape
        if k.shape[0] != B or k.shape[2] != Hkv or k.shape[3] != D:
            raise ValueError(f"k must be [B, Lnew, Hkv, D] = [{B}, Lnew, {Hkv}, {D}], got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    cs = cache_seqlens_tensor(cache_seqlens, q.shape[0], q.device)
    if isinstance(cache_seqlens, int):
        lnew = 0 if k is None else k.shape[1]
        if cache_seqlens + lnew > k_cache.shape[1]:
            raise ValueError(
                f"the cache is too short: cache_seqlens ({cache_seqlens}) + {lnew} new keys > its {k_cache.shape[1]} rows"
            )
    causal = check_bool("causal", causal)
    return_lse = check_bool("return_lse", return_lse)
    wl, wr = check_window_size(window_size)
    num_splits = _check_int("num_splits", num_splits)
    scale = check_scale(scale, q.shape[-1] ** -0.5)
    out, lse = torch.ops.attnkit.sqa_kvcache_fwd(q, k_cache, v_cache, k, v, cs, causal, scale, wl, wr, num_splits)
    return (out, lse) if return_lse else out


@torch.library.register_fake("attnkit::sqa_kvcache_fwd")
def _sqa_kvcache_fwd_fake(q, k_cache, v_cache, k, v, cache_seqlens, causal, scale, window_left=-1, window_right=-1,
                          num_splits=0):
    B, Lq, Hq, D = q.shape
    H = max(Hq, k_cache.shape[2])
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)
