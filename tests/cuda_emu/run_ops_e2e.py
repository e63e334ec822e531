"""End-to-end check of the SQA and routing ops' CUDA path under the CPU emulator (no GPU needed).

Builds the CUDA op layer (csrc/sqa/sqa_cuda.cpp, csrc/routing/routing_cuda.cpp, csrc/flash/flash_api.cpp)
with the flash core's and routing's kernels compiled as host C++ against emu_cuda.h, registered as
torch ops `attnkit_emu::*` on CPU tensors, and compares them with attnkit.reference using the
FlashAttention rule of the test suite (conftest.assert_close_fa).

    PYTHONPATH=python .venv/bin/python tests/cuda_emu/run_ops_e2e.py [sqa|routing|dma|dma-kvcache|moh]
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import torch
from torch.utils.cpp_extension import load

here = pathlib.Path(__file__).resolve().parent
root = here.parent.parent
sys.path.insert(0, str(root / "tests"))
torch.set_num_threads(1)

from conftest import assert_close_fa  # noqa: E402

import attnkit  # noqa: E402,F401
from attnkit import reference  # noqa: E402

# EMU_SANITIZE=1 (tests/cuda_emu/sanitize.sh): AddressSanitizer + UBSan build, run with libasan preloaded
sanitize = os.environ.get("EMU_SANITIZE") == "1"
san_flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]  # line tables: file:line in reports
t0 = time.time()
load(
    name="attnkit_ops_emu_san" if sanitize else "attnkit_ops_emu",
    sources=[str(here / f) for f in ("emu_ops_ext.cpp", "emu_ops_flash.cpp", "emu_ops_routing_select.cpp",
                                     "emu_ops_routing_combine.cpp", "emu_ops_kmeans.cpp",
                                     "emu_ops_dma_select.cpp", "emu_ops_moh.cpp")]
    + [str(root / f) for f in ("csrc/flash/flash_api.cpp", "csrc/sqa/sqa_api.cpp", "csrc/dma/dma_api.cpp",
                               "csrc/moh/moh_api.cpp")],
    # the stand-in headers (c10/cuda, cuda_runtime.h) come before torch's
    extra_include_paths=[str(here / "ops_include"), str(here / "cuda_include"), str(here), str(root / "csrc")],
    extra_cflags=["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"] + (san_flags if sanitize else []),
    extra_ldflags=["-pthread"] + (san_flags if sanitize else []),
    build_directory=os.environ.get("EMU_BUILD_DIR") or None,
    verbose=bool(os.environ.get("EMU_VERBOSE")),
    is_python_module=False,
)
print(f"built ({time.time() - t0:.0f}s)", flush=True)
emu = torch.ops.attnkit_emu
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
only = sys.argv[1] if len(sys.argv) > 1 else ""
failed = 0


def close(name, a, r, e, dtype):
    atol = ATOL[dtype] * max(1.0, r.abs().max().item() if r.numel() else 0.0)
    assert_close_fa(a, r, e, atol, name)


# EMU_CASES: only the cases whose label contains one of these '|'-separated substrings
cases = [c for c in os.environ.get("EMU_CASES", "").split("|") if c]


def run(label, fn, *args):
    global failed
    if cases and not any(c in label for c in cases):
        return
    t = time.time()
    try:
        fn(*args)
        status = "ok"
    except Exception as err:  # report and go on
        failed += 1
        status = f"FAIL {type(err).__name__}: {err}"
    print(f"{label}: {status} ({time.time() - t:.1f}s)", flush=True)


# ---- SQA: the tolerances of tests/test_sqa.py ----
ATOL_FWD = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
ATOL_BWD = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def sqa_eager(q, k, v, causal, scale):
    """The same math in plain PyTorch at the inputs' dtype (as in tests/test_sqa.py)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    H = max(Hq, Hkv)
    q = q.repeat_interleave(H // Hq, dim=2).transpose(1, 2)
    k = k.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    v = v.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) * scale
    Lq, Lk = s.shape[-2], s.shape[-1]
    if causal:
        vis = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        s = s.masked_fill(~vis, float("-inf"))
    seen = torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(torch.where(seen, s, 0.0), dim=-1)
    p = torch.where(seen, p, 0.0).to(v.dtype)
    return (p @ v).transpose(1, 2)


def check_sqa(dtype, B, Lq, Lk, Hq, Hkv, D, causal):
    g = torch.Generator().manual_seed(Lq * 131 + Lk + Hq)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    scale = D**-0.5
    out, lse = emu.sqa_fwd(q, k, v, causal, scale)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference.sqa_reference(*leaves64, causal=causal, scale=scale, return_lse=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = sqa_eager(*leaves, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_fa(out, ref, eager, ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq, dk, dv = emu.sqa_bwd(dout, q, k, v, out, lse, causal, scale)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    eager_g = torch.autograd.grad(eager, leaves, dout)
    for name, a, r, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, eager_g):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close_fa(a, r, e, ATOL_BWD[dtype], name)


if only in ("", "sqa"):
    for dt in (torch.float16, torch.bfloat16):
        for shape in [
            (2, 70, 70, 4, 2, 64, False),
            (1, 70, 130, 4, 2, 64, True),  # causal, Lq < Lk (bottom-right)
            (1, 130, 70, 2, 4, 64, True),  # reverse GQA, Lq > Lk: rows without keys
            (2, 1, 1, 4, 2, 64, True),
            (1, 1, 130, 2, 4, 64, True),
            (1, 130, 1, 4, 2, 64, True),
            (1, 70, 70, 2, 2, 32, True),
        ]:
            run(f"sqa {str(dt):15s} {shape}", check_sqa, dt, *shape)


def check_sqa_window(dtype, B, Lq, Lk, Hq, Hkv, D, causal, window, deterministic):
    """window_size, deterministic dq and head dims padded inside the kernels (D not instantiated)."""
    g = torch.Generator().manual_seed(Lq * 17 + Lk + D)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype)
    scale = D**-0.5
    out, lse = emu.sqa_fwd(q, k, v, causal, scale, *window)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference.sqa_reference(*leaves64, causal=causal, scale=scale, return_lse=True, window_size=window)
    # eager term: the same masked math at fp32 rounded to dtype
    eager = reference.sqa_reference(*(t.float() for t in (q, k, v)), causal=causal, scale=scale,
                                    window_size=window).to(dtype)
    assert_close_fa(out, ref, eager, ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = emu.sqa_bwd(dout, q, k, v, out, lse, causal, scale, *window, deterministic)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_g):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close_fa(a, r, r.to(dtype), ATOL_BWD[dtype] * max(1.0, r.abs().max().item()), name)
    if deterministic:
        again = emu.sqa_bwd(dout, q, k, v, out, lse, causal, scale, *window, True)
        assert all(torch.equal(x, y) for x, y in zip(grads, again)), "deterministic bwd not repeatable"


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def check_sqa_varlen(dtype, lq, lk, Hq, Hkv, D, causal, window, deterministic):
    """One launch over packed sequences (per-batch offsets and lengths in the kernels)."""
    g = torch.Generator().manual_seed(sum(lq) * 7 + sum(lk))
    q = torch.randn(sum(lq), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    cq, ck = _cu(lq), _cu(lk)
    scale = D**-0.5
    out, lse = emu.sqa_varlen_fwd(q, k, v, cq, ck, max(lq), max(lk), causal, scale, *window)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference.sqa_varlen_reference(*leaves64, cq, ck, causal=causal, scale=scale, window_size=window,
                                                  return_lse=True)
    assert_close_fa(out, ref, ref.to(dtype), ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    grads = emu.sqa_varlen_bwd(dout, q, k, v, out, lse, cq, ck, max(lq), max(lk), causal, scale, *window,
                               deterministic)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_g):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close_fa(a, r, r.to(dtype), ATOL_BWD[dtype] * max(1.0, r.abs().max().item()), name)


def check_sqa_kvcache(dtype, B, Lq, Lnew, Lmax, cs, Hq, Hkv, D, causal, window, num_splits=0):
    """Append in place + attention over cache_seqlens[b] + Lnew keys per batch row (seqused_k); split-KV
    (num_splits > 1, or 0 where the heuristic splits on the emulator's 132 SMs) and combine."""
    g = torch.Generator().manual_seed(Lmax + D + Lq)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype)
    kc = torch.randn(B, Lmax, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(B, Lmax, Hkv, D, generator=g).to(dtype)
    k = torch.randn(B, Lnew, Hkv, D, generator=g).to(dtype) if Lnew else None
    v = torch.randn(B, Lnew, Hkv, D, generator=g).to(dtype) if Lnew else None
    seqlens = torch.tensor(cs, dtype=torch.int32)
    ref, kc_ref, vc_ref, ref_lse = reference.sqa_kvcache_reference(q.double(), kc, vc, k, v, seqlens, causal=causal,
                                                                   window_size=window, return_lse=True)
    out, lse = emu.sqa_kvcache_fwd(q, kc, vc, k, v, seqlens, causal, D**-0.5, *window, num_splits)
    assert not out.isnan().any(), "NaN in out"
    assert (out[lse.isinf().transpose(1, 2)] == 0).all(), "rows without keys: o = 0"
    assert_close_fa(out, ref, ref.to(dtype), ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)
    assert torch.equal(kc.double(), kc_ref) and torch.equal(vc.double(), vc_ref), "cache append"


if only in ("", "sqa", "sqa-api"):
    for dt in (torch.float16, torch.bfloat16):
        for shape in [
            (1, 70, 140, 2, 1, 64, False, (20, 5), False),
            (1, 130, 70, 1, 2, 32, True, (0, 0), True),
            (1, 70, 70, 2, 2, 80, True, (-1, -1), False),  # D 80 runs the 96 kernel
            (1, 40, 70, 2, 1, 192, False, (-1, 0), True),  # D 192 runs the 256 kernel
        ]:
            run(f"sqa window/det/pad-D {str(dt):15s} {shape}", check_sqa_window, dt, *shape)
        for shape in [
            ([5, 0, 70, 1], [9, 3, 64, 0], 2, 1, 32, False, (-1, -1), False),
            ([70, 33, 0], [70, 100, 5], 1, 2, 64, True, (10, 2), True),
        ]:
            run(f"sqa varlen {str(dt):15s} {shape}", check_sqa_varlen, dt, *shape)
        for shape in [
            (3, 1, 1, 140, [0, 77, 130], 4, 2, 64, True, (-1, -1)),
            (2, 4, 2, 90, [10, 70], 1, 2, 80, True, (16, -1)),
            # split-KV: 0 = heuristic (6 blocks on 132 SMs: splits over the 3 key blocks), 1000 is
            # clamped to the key blocks; GQA 4:1, batch rows of 1 key (Lq = 4: three query rows without keys)
            (3, 1, 1, 140, [0, 77, 130], 4, 1, 64, True, (-1, -1), 3),
            (2, 4, 1, 200, [0, 150], 8, 2, 128, True, (-1, -1), 0),
            (2, 4, 0, 200, [1, 180], 4, 1, 64, False, (30, 0), 1000),
        ]:
            run(f"sqa kvcache {str(dt):15s} {shape}", check_sqa_kvcache, dt, *shape)


# ---- routing: the tolerances of tests/test_routing.py ----
R_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _centroids(H, C, D, seed=1):
    return torch.nn.functional.normalize(torch.randn(H, C, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def check_assign(dtype, B, L, H, D, C, w, shared, pad):
    g = torch.Generator().manual_seed(L + C)
    q = torch.randn(B, L, H, D, generator=g).to(dtype)
    k = None if shared else torch.randn(B, L, H, D, generator=g).to(dtype)
    mu = _centroids(H, C, D)
    kpm = None
    if pad:
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[:, L - 3:] = True
    qi, ki, assign = emu.routing_assign(q, k, mu, w, shared, True, kpm)
    # the reference scores in float64 on the rounded inputs; the kernel in fp32: allow rank swaps of
    # (near-)ties by comparing the selected scores' sums rather than identities where they differ
    rqi, rki = reference.routing_assign_ref(q.double(), None if shared else k.double(), mu.double(), w, shared, kpm)
    for name, a, r, x in (("q_idx", qi, rqi, q), ("k_idx", ki, rki, q if shared else k)):
        assert a.dtype == torch.int32 and a.shape == r.shape, name
        assert torch.equal(a, a.sort(-1).values), f"{name} not sorted by position"
        if not torch.equal(a.long(), r):
            s = reference.routing_scores_ref(x.double(), mu.double())
            if kpm is not None:
                s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
            sa, sr = s.gather(-1, a.long()).sort(-1).values, s.gather(-1, r).sort(-1).values
            bad = (a.long() != r).any(-1).sum().item()
            assert torch.allclose(sa, sr, atol=1e-5), f"{name}: {bad} lists differ beyond ties"
    ra = reference.kmeans_assign_ref(q.reshape(-1, H, D), mu).reshape(B, L, H)
    agree = (assign[:B].long() == ra).float().mean().item()
    assert agree > 0.99, f"assign: only {agree:.3f} agree"
    assert assign.shape == ((1 if shared else 2) * B, L, H)


def check_attention(dtype, B, L, H, D, C, w, shared, causal, deterministic, indexed=True):
    g = torch.Generator().manual_seed(L * 7 + C)
    q = (torch.randn(B, L, H, D, generator=g)).to(dtype)
    k = (torch.nn.functional.normalize(q.float(), dim=-1).to(dtype) if shared
         else torch.randn(B, L, H, D, generator=g).to(dtype))
    v = torch.randn(B, L, H, D, generator=g).to(dtype)
    mu = _centroids(H, C, D, seed=L)
    scale = D**-0.5
    if indexed:
        qi, ki, _ = emu.routing_assign(q, None if shared else k, mu, w, shared, False, None)
        qi64, ki64 = qi.long(), ki.long()
    else:  # local heads: one segment with the whole sequence
        qi = ki = None
        qi64 = ki64 = torch.arange(L).expand(B, H, 1, L)
    out, out_seg, lse = emu.routing_fwd(q, k, v, qi, ki, None, causal, -1, shared, scale, deterministic)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.routing_attention_ref(*leaves64, qi64, ki64, causal=causal, shared_qk=shared, scale=scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = reference.routing_attention_ref(*leaves, qi64, ki64, causal=causal, shared_qk=shared, scale=scale,
                                            dtype=dtype)
    assert out.dtype == dtype
    assert_close_fa(out, ref, eager, R_ATOL[dtype], "out")
    dout = torch.randn(q.shape, generator=g).to(dtype)
    seg = out_seg if indexed else out
    dq, dk, dv = emu.routing_bwd(dout, q, k, v, qi, ki, None, seg, lse, causal, -1, shared, scale, deterministic)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    eager_g = torch.autograd.grad(eager, leaves, dout)
    for name, a, r, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, eager_g):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close_fa(a, r, e, R_ATOL[dtype] * 4, name)
    if deterministic:  # bitwise repeatable
        again = emu.routing_bwd(dout, q, k, v, qi, ki, None, seg, lse, causal, -1, shared, scale, True)
        assert all(torch.equal(x, y) for x, y in zip((dq, dk, dv), again)), "deterministic bwd not repeatable"


def check_kmeans(dtype, N, H, D, C, decay, given):
    g = torch.Generator().manual_seed(N + C)
    x = torch.randn(N, H, D, generator=g).to(dtype)
    mu = _centroids(H, C, D, seed=C)
    before = mu.clone()
    a = emu.kmeans_assign(x, mu)
    ra = reference.kmeans_assign_ref(x, before)
    agree = (a.long() == ra).float().mean().item()
    assert a.dtype == torch.int32 and agree > 0.99, f"kmeans_assign: only {agree:.3f} agree"
    emu.kmeans_ema_update_(mu, x, a if given else None, decay)
    expect = reference.kmeans_ema_update_ref(before, x, decay, assign=a)
    torch.testing.assert_close(mu.double(), expect, atol=1e-6, rtol=0)


if only in ("", "routing"):
    for dt in (torch.float16, torch.bfloat16):
        run(f"routing_assign {dt} shared", check_assign, dt, 2, 70, 2, 64, 3, 24, True, False)
        run(f"routing_assign {dt} separate+pad", check_assign, dt, 1, 130, 2, 64, 5, 40, False, True)
        for shared in (True, False):
            for det in (True, False):
                run(f"routing_attention {dt} shared={shared} det={det}", check_attention, dt, 1, 70, 2, 64, 3, 24,
                    shared, True, det)
        run(f"routing_attention {dt} non-causal L=130", check_attention, dt, 1, 130, 1, 64, 4, 40, False, False, True)
        run(f"routing_attention {dt} L=1", check_attention, dt, 1, 1, 2, 64, 2, 1, True, True, False)
        run(f"routing local heads {dt}", check_attention, dt, 1, 70, 2, 64, 1, 70, False, True, True, False)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        run(f"kmeans {dt} given assign", check_kmeans, dt, 300, 3, 64, 5, 0.7, True)
        run(f"kmeans {dt} computed assign", check_kmeans, dt, 100, 2, 32, 7, 0.0, False)


# ---- DMA: the rule of tests/test_dma.py (slack scaled by the magnitude once above 1) ----
D_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def close_mag(out, r, e, atol, name):
    rr = r.detach().double()
    rr = rr[torch.isfinite(rr)]
    mag = max(1.0, rr.abs().max().item()) if rr.numel() else 1.0
    assert_close_fa(out, r, e, atol * mag, name)


def check_dma_select(B, H, lk, keep, lq, causal, ties):
    g = torch.Generator().manual_seed(lk + keep)
    bias = torch.randn(B, H, lk, generator=g)
    if ties:
        bias = (bias * 2).round() / 2
    kern = emu.dma_select(bias, keep, lq, causal)
    cpu = torch.ops.attnkit.dma_select(bias, keep, lq, causal)
    names = ("thr", "tie", "fwd_list", "fwd_count", "bwd_list", "bwd_count")
    for name, a, c in zip(names, kern, cpu):
        assert a.shape == c.shape and a.dtype == c.dtype, f"{name}: {a.shape} {a.dtype} vs CPU {c.shape} {c.dtype}"
        assert torch.equal(a, c), f"{name}: differs from the CPU op at {(a != c).nonzero()[:5].tolist()}"


def check_dma_select_used(B, H, lk, keep, lq, causal, used):
    """Per-batch key counts (seqused_k): the kernels' selection equals the CPU op's."""
    g = torch.Generator().manual_seed(lk + keep + lq)
    bias = (torch.randn(B, H, lk, generator=g) * 2).round() / 2
    su = torch.tensor(used, dtype=torch.int32)
    kern = emu.dma_select(bias, keep, lq, causal, su)
    cpu = torch.ops.attnkit.dma_select(bias, keep, lq, causal, su)
    names = ("thr", "tie", "fwd_list", "fwd_count", "bwd_list", "bwd_count")
    for name, a, c in zip(names, kern, cpu):
        assert a.shape == c.shape and a.dtype == c.dtype, f"{name}: {a.shape} {a.dtype} vs CPU {c.shape} {c.dtype}"
        assert torch.equal(a, c), f"{name}: differs from the CPU op at {(a != c).nonzero()[:5].tolist()}"


def check_dma_kvcache(dtype, B, Lq, Lnew, Lmax, cs, hq, hkv, d, keep, causal, bias_dtype=torch.float32):
    """dma_kvcache_fwd: in-place append, selection with per-batch key counts, one core launch with
    seqused_k and the forward tile lists; against the float64 oracle over each row's valid keys."""
    g = torch.Generator().manual_seed(Lmax + d + Lq + keep)
    q = torch.randn(B, Lq, hq, d, generator=g).to(dtype)
    kc = torch.randn(B, Lmax, hkv, d, generator=g).to(dtype)
    vc = torch.randn(B, Lmax, hkv, d, generator=g).to(dtype)
    bc = ((torch.randn(B, hkv, Lmax, generator=g) * 2).round() / 2).to(bias_dtype)  # ties
    k = torch.randn(B, Lnew, hkv, d, generator=g).to(dtype) if Lnew else None
    v = torch.randn(B, Lnew, hkv, d, generator=g).to(dtype) if Lnew else None
    bias = ((torch.randn(B, hkv, Lnew, generator=g) * 2).round() / 2).to(bias_dtype) if Lnew else None
    seqlens = torch.tensor(cs, dtype=torch.int32)
    scale = d**-0.5
    ref, kc_ref, vc_ref, bc_ref = reference.dma_kvcache_reference(q, kc, vc, bc, k, v, bias, seqlens, keep=keep,
                                                                  causal=causal, scale=scale)
    out, lse = emu.dma_kvcache_fwd(q, kc, vc, bc, k, v, bias, seqlens, keep, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref.shape and lse.shape == (B, max(hq, hkv), Lq)
    close_mag(out, ref, ref.to(dtype), D_ATOL[dtype], "out")
    # rows without a visible key: lse -inf exactly
    for b in range(B):
        n = cs[b] + Lnew
        for i in range(Lq):
            empty = n == 0 or (causal and n - Lq + i < 0)
            assert bool(torch.isinf(lse[b, :, i]).all()) == empty, f"lse of batch {b} row {i}"
    assert torch.equal(kc.double(), kc_ref) and torch.equal(vc.double(), vc_ref), "cache append"
    assert torch.equal(bc.double(), bc_ref), "bias cache append"


def check_dma(dtype, B, lq, lk, hq, hkv, d, keep, causal):
    g = torch.Generator().manual_seed(lq * 3 + lk + keep)
    q, k, v = (torch.randn(B, L, h, d, generator=g) for L, h in ((lq, hq), (lk, hkv), (lk, hkv)))
    bias = torch.randn(B, hkv, lk, generator=g)
    dout = torch.randn(B, lq, max(hq, hkv), d, generator=g)
    scale = d**-0.5
    thr, tie, fl, fc, bl, bc = emu.dma_select(bias, keep, lq, causal)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out, lse = emu.dma_fwd(qd, kd, vd, bias, thr, tie, fl, fc, bl, bc, causal, scale)
    dq, dk, dv, db = emu.dma_bwd(dout.to(dtype), qd, kd, vd, bias, out, lse, thr, tie, bl, bc, causal, scale)

    def fwd_bwd(dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        bb = bias.to(dt).requires_grad_()
        o, l_ = reference.dynamic_mask_attention(*xs, bb, keep=keep, causal=causal, scale=scale)
        return o.detach(), l_.detach(), torch.autograd.grad(o, [*xs, bb], dout.to(dt))

    r64, eager = fwd_bwd(torch.float64), fwd_bwd(dtype)
    atol = D_ATOL[dtype]
    close_mag(out, r64[0], eager[0], atol, "out")
    close_mag(lse, r64[1], eager[1], 1e-2, "lse")
    for name, a, r, e in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, db), r64[2], eager[2]):
        close_mag(a, r, e, atol * (4 if name == "dbias" else 1), name)


def check_masked_bias(dtype, causal):
    B, LQ, LK, HQ, HKV, d = 1, 70, 130, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, LQ, HQ, d, generator=g)
    k = torch.randn(B, LK, HKV, d, generator=g)
    v = torch.randn(B, LK, HKV, d, generator=g)
    mask = torch.rand(B, HKV, LQ, LK, generator=g) > 0.4
    mask[0, :, 3] = False  # a fully masked row
    mask[..., 64:] = False  # fully masked tiles
    bias = torch.randn(B, HKV, LQ, LK, generator=g)
    dout = torch.randn(B, LQ, HQ, d, generator=g)
    scale = d**-0.5
    qd, kd, vd, bd = (t.to(dtype) for t in (q, k, v, bias))
    out, lse = emu.masked_bias_fwd(qd, kd, vd, mask, bd, causal, scale)
    dq, dk, dv, db = emu.masked_bias_bwd(dout.to(dtype), qd, kd, vd, mask, bd, out, lse, causal, scale, True)

    def fwd_bwd(dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        bb = bias.to(dt).requires_grad_()
        o, l_ = reference.masked_bias_attention(*xs, attn_mask=mask, attn_bias=bb, causal=causal, scale=scale)
        return o.detach(), l_.detach(), torch.autograd.grad(o, [*xs, bb], dout.to(dt))

    r64, eager = fwd_bwd(torch.float64), fwd_bwd(dtype)
    atol = D_ATOL[dtype]
    close_mag(out, r64[0], eager[0], atol, "out")
    close_mag(lse, r64[1], eager[1], 1e-2, "lse")
    for name, a, r, e in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, db), r64[2], eager[2]):
        close_mag(a, r, e, atol * (4 if name == "dbias" else 1), name)


if only in ("", "dma"):
    for causal in (False, True):
        run(f"dma_select causal={causal}", check_dma_select, 2, 2, 150, 40, 130, causal, False)
        run(f"dma_select causal={causal} ties", check_dma_select, 1, 2, 130, 17, 70, causal, True)
    run("dma_select keep >= lk", check_dma_select, 1, 1, 30, 40, 30, True, False)
    for dt in (torch.float16, torch.bfloat16):
        run(f"dma {dt} causal Lq<Lk GQA", check_dma, dt, 1, 70, 130, 4, 2, 64, 48, True)
        run(f"dma {dt} non-causal reverse GQA", check_dma, dt, 1, 130, 70, 2, 4, 64, 20, False)
        run(f"dma {dt} L=1", check_dma, dt, 2, 1, 1, 2, 2, 64, 1, True)
        run(f"masked_bias {dt} causal", check_masked_bias, dt, True)

if only in ("", "dma", "dma-kvcache"):
    for causal in (True, False):
        run(f"dma_select seqused_k causal={causal}", check_dma_select_used, 3, 2, 200, 20, 70, causal, [0, 90, 200])
        run(f"dma_select seqused_k causal={causal} lq=1", check_dma_select_used, 2, 2, 300, 40, 1, causal, [45, 300])
    for dt in (torch.float16, torch.bfloat16):
        for shape in [
            # (B, Lq, Lnew, Lmax, cache_seqlens, Hq, Hkv, D, keep, causal)
            (3, 1, 1, 140, [0, 77, 130], 4, 2, 64, 16, True),  # Lq 1, GQA, a row with its new key only
            (3, 1, 0, 260, [0, 70, 259], 2, 2, 64, 24, True),  # a row with no key, tile skipping over 5 blocks
            (2, 4, 4, 150, [0, 120], 2, 4, 32, 40, True),  # Lq 4, reverse GQA
            (2, 4, 2, 90, [1, 80], 4, 1, 64, 100, False),  # keep above the keys, MQA, non-causal
            (2, 4, 0, 100, [2, 60], 2, 2, 64, 8, True),  # causal rows without keys (2 keys, 4 rows)
        ]:
            run(f"dma kvcache {str(dt):15s} {shape}", check_dma_kvcache, dt, *shape)
        run(f"dma kvcache {str(dt):15s} bias in q's dtype", check_dma_kvcache, dt, 2, 1, 1, 100, [30, 98], 2, 2, 64,
            10, True, dt)

# ---- Mixture-of-Head: the tolerances of tests/test_moh.py ----
M_ATOL_FWD = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
M_ATOL_BWD = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check_moh(dtype, B, L, Hq, Hkv, D, K, causal, empty):
    sys.path.insert(0, str(root / "tests"))
    from test_moh import make_inputs, moh_eager

    q, k, v, idx, w = make_inputs(B, L, Hq, Hkv, D, K, dtype, "cpu", seed=L + Hq, empty_frac=empty)
    scale = D**-0.5
    out, lse, out_slot, lse_slot, q_index, q_count, slot = emu.moh_fwd(q, k, v, idx, w, causal, scale)
    # the lists of the device counting sort equal the CPU op's (position order, same slots)
    c_out = torch.ops.attnkit.moh_fwd(q.float(), k.float(), v.float(), idx, w, causal, scale)
    assert torch.equal(q_count, c_out[5]), "q_count"
    assert torch.equal(slot, c_out[6]), "slot"
    for b in range(B):
        for h in range(Hq):
            n = int(q_count[b, h])
            assert torch.equal(q_index[b, h, :n], c_out[4][b, h, :n]), "q_index"
    leaves64 = [t.double().requires_grad_() for t in (q, k, v, w)]
    ref, ref_lse = reference.mixture_of_heads_attention_ref(*leaves64[:3], idx, leaves64[3], causal=causal,
                                                            scale=scale, return_lse=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    eager = moh_eager(*leaves[:3], idx, leaves[3], causal, scale)
    assert out.dtype == dtype
    assert_close_fa(out, ref, eager, M_ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = emu.moh_bwd(dout, q, k, v, idx, w, out_slot, lse_slot, q_index, q_count, slot, causal, scale)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    eager_g = torch.autograd.grad(eager, leaves, dout)
    for name, a, r, e in zip(("dq", "dk", "dv", "dweight"), grads, ref_g, eager_g):
        assert a.shape == r.shape, name
        assert_close_fa(a, r, e, M_ATOL_BWD[dtype] * (4 if name == "dweight" else 1), name)


if only in ("", "moh"):
    for dt in (torch.float16, torch.bfloat16):
        run(f"moh {dt} causal GQA K=3", check_moh, dt, 2, 150, 8, 2, 64, 3, True, 0.0)
        run(f"moh {dt} non-causal K=Hq empty slots", check_moh, dt, 1, 90, 4, 4, 32, 4, False, 0.3)
        run(f"moh {dt} causal K=1 MQA long", check_moh, dt, 1, 300, 4, 1, 64, 1, True, 0.1)
    # more than one sort chunk (256 tokens) and a weight in q's dtype
    run("moh bf16 L=600 K=2", check_moh, torch.bfloat16, 1, 600, 4, 2, 32, 2, True, 0.2)

print("PASSED" if not failed else f"FAILED: {failed}")
sys.exit(1 if failed else 0)
