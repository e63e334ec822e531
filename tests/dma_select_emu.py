# Host emulation of the CUDA mask selection (csrc/dma/dma_select.cu, select_cuda), kept step by step
# with the kernels: sort keys, stable radix sort, ranks, minrank, the wavelet build with its
# chunk / warp / word structure, wm_quantile, k_query, k_dma_flags and both compactions. The CUDA code
# cannot run on a machine without a GPU; tests/test_dma.py compares this emulation with the CPU op
# (tests/test_dma_kvcache.py also with per-batch key counts, seqused_k).
import struct
import sys

import numpy as np

K_LIST = 64
K_TIE_ALL = 2**31 - 1
K_WARPS, E = 32, 4
K_WORDS = K_WARPS * E
K_CHUNK = K_WORDS * 32


def f2u(x):
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def desc_key(x):
    u = f2u(x)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return 0xFFFFFFFF
    if x == 0.0:
        u = 0
    asc = (~u & 0xFFFFFFFF) if (u & 0x80000000) else (u | 0x80000000)
    return ~asc & 0xFFFFFFFF


def zeros_of_bit(n, b):
    period, half = 1 << (b + 1), 1 << b
    return (n // period) * half + min(n % period, half)


def popc(x):
    return bin(x & 0xFFFFFFFF).count("1")


def wavelet_build(rank_seg, lk, levels, nwords):
    bits = np.zeros((levels, nwords), dtype=np.uint64)
    zc = np.full((levels, nwords + 1), -1, dtype=np.int64)  # -1: never written
    buf = [np.full(lk, -7, dtype=np.int64), np.full(lk, -7, dtype=np.int64)]
    src = rank_seg.copy()
    for l in range(levels):
        b = levels - 1 - l
        Z = zeros_of_bit(lk, b)
        dst = buf[l & 1]
        running = 0
        for c0 in range(0, lk, K_CHUNK):
            s_cnt = [None] * K_WORDS
            vals, ones_, zmasks = {}, {}, {}
            # phase 1: per (e, warp): ballots
            for e in range(E):
                for warp in range(K_WARPS):
                    wi = e * K_WARPS + warp
                    ones = 0
                    valid_m = 0
                    for lane in range(32):
                        x = c0 + wi * 32 + lane
                        v = int(src[x]) if x < lk else 0
                        valid = x < lk
                        one = valid and ((v >> b) & 1)
                        vals[(wi, lane)] = v
                        ones_[(wi, lane)] = one
                        ones |= (1 << lane) if one else 0
                        valid_m |= (1 << lane) if valid else 0
                    zm = valid_m & ~ones
                    zmasks[wi] = zm
                    s_cnt[wi] = popc(zm)
                    w = (c0 >> 5) + wi
                    if w < nwords:
                        bits[l, w] = ones
            # phase 2: warp 0 scan
            new = [None] * K_WORDS
            sums = [sum(s_cnt[lane * E + e] for e in range(E)) for lane in range(32)]
            incl = np.cumsum(sums)
            for lane in range(32):
                excl = running + int(incl[lane]) - sums[lane]
                for e in range(E):
                    new[lane * E + e] = excl
                    excl += s_cnt[lane * E + e]
            s_total = int(incl[31])
            s_cnt = new
            # phase 3: scatter
            for e in range(E):
                for warp in range(K_WARPS):
                    wi = e * K_WARPS + warp
                    zb = s_cnt[wi]
                    if (c0 >> 5) + wi < nwords:
                        zc[l, (c0 >> 5) + wi] = zb
                    for lane in range(32):
                        x = c0 + wi * 32 + lane
                        if x < lk:
                            zb_ = zb + popc(zmasks[wi] & ((1 << lane) - 1))
                            pos = Z + (x - zb_) if ones_[(wi, lane)] else zb_
                            assert 0 <= pos < lk
                            dst[pos] = vals[(wi, lane)]
            running += s_total
        zc[l, nwords] = running
        assert sorted(dst.tolist()) == list(range(lk)), "level output not a permutation"
        src = dst.copy()
    assert (zc >= 0).all()
    return bits, zc


def wm_rank0(bits, zc, x):
    w, r = x >> 5, x & 31
    c = int(zc[w])
    if r:
        c += popc(~int(bits[w]) & ((1 << r) - 1))
    return c


def wm_quantile(bits, zc, levels, lk, n, k):
    lo, hi, val = 0, n, 0
    for l in range(levels):
        b = levels - 1 - l
        zlo, zhi = wm_rank0(bits[l], zc[l], lo), wm_rank0(bits[l], zc[l], hi)
        zeros = zhi - zlo
        if k <= zeros:
            lo, hi = zlo, zhi
        else:
            k -= zeros
            Z = zeros_of_bit(lk, b)
            lo, hi = Z + (lo - zlo), Z + (hi - zhi)
            val |= 1 << b
    return val


def levels_for(lk):
    l = 1
    while (1 << l) < lk:
        l += 1
    return l


def select_emu(bias, keep, lq, causal, used=None):
    """used: per-batch key counts (seqused_k) or None."""
    B, H, lk = bias.shape
    nseg = B * H
    seg_lk = [lk if used is None else int(used[s // H]) for s in range(nseg)]
    x = bias.reshape(nseg, lk).astype(np.float32)
    all_kept = lk <= keep
    shift = lk - lq
    levels = levels_for(lk)
    nwords = (lk + 31) // 32
    nqb, nkb = -(-lq // K_LIST), -(-lk // K_LIST)
    fw = min(nkb, keep + 2)
    sorted_ = rank = minrank = None
    wms = None
    if not all_kept and nseg * lk > 0:
        # unused keys (j >= the segment's count) take the largest key, after its NaNs (k_make_keys)
        keys = [((s << 32) | (desc_key(x[s, j]) if j < seg_lk[s] else 0xFFFFFFFF), s * lk + j)
                for s in range(nseg) for j in range(lk)]
        keys.sort(key=lambda t: t[0])  # Python sort is stable: as cub radix sort
        sorted_ = np.array([t[1] % lk for t in keys]).reshape(nseg, lk)
        rank = np.zeros((nseg, lk), dtype=np.int64)
        for s in range(nseg):
            rank[s, sorted_[s]] = np.arange(lk)
        minrank = np.array([[rank[s, kb * 64:min(kb * 64 + 64, lk)].min() for kb in range(nkb)] for s in range(nseg)])
        if causal:
            wms = [wavelet_build(rank[s], lk, levels, nwords) for s in range(nseg)]
    thr = np.zeros((nseg, lq), dtype=np.float32)
    tie = np.zeros((nseg, lq), dtype=np.int64)
    prank = np.zeros((nseg, lq), dtype=np.int64)
    for s in range(nseg):
        for i in range(lq):
            n = i + (seg_lk[s] - lq) + 1 if causal else seg_lk[s]
            n = min(n, seg_lk[s])
            rt = lk
            if not all_kept and n > keep:
                rt = wm_quantile(*wms[s], levels, lk, n, keep) if causal else keep - 1
            t, ti = -np.inf, K_TIE_ALL
            if rt < lk:
                j = sorted_[s, rt]
                v = x[s, j]
                if not np.isnan(v):
                    t, ti = v, j
            thr[s, i], tie[s, i], prank[s, i] = t, ti, rt
    flags = np.zeros((nseg, nqb, nkb), dtype=np.uint8)
    for s in range(nseg):
        pr = prank[s]
        shift = seg_lk[s] - lq
        seg_all = all_kept or seg_lk[s] <= keep
        for qb in range(nqb):
            for kb in range(nkb):
                i0, i1 = qb * 64, min(qb * 64 + 64, lq) - 1
                j0, j1 = kb * 64, min(kb * 64 + 64, seg_lk[s]) - 1
                if j0 >= seg_lk[s]:
                    act = False
                elif not causal:
                    act = seg_all or minrank[s, kb] <= pr[0]
                elif j0 > i1 + shift:
                    act = False
                elif j1 <= i0 + shift:
                    act = seg_all or minrank[s, kb] <= pr[i0]
                elif seg_all:
                    act = True
                else:
                    act = False
                    j = j0
                    while j <= min(j1, i1 + shift) and not act:
                        act = rank[s, j] <= pr[max(i0, j - shift)]
                        j += 1
                flags[s, qb, kb] = act
    # compaction
    fl = np.full((nseg, nqb, fw), -99, dtype=np.int64)
    fc = np.full((nseg, nqb), -99, dtype=np.int64)
    for s in range(nseg):
        for qb in range(nqb):
            c = 0
            for base in range(0, nkb, 32):
                m = 0
                for lane in range(32):
                    col = base + lane
                    if col < nkb and flags[s, qb, col]:
                        m |= 1 << lane
                for lane in range(32):
                    if m >> lane & 1:
                        pos = c + popc(m & ((1 << lane) - 1))
                        if pos < fw:
                            fl[s, qb, pos] = base + lane
                        else:
                            raise AssertionError("fwd list overflow")
                c += popc(m)
            c = min(c, fw)
            fl[s, qb, c:] = -1
            fc[s, qb] = c
    bl = np.full((nseg, nkb, nqb), -99, dtype=np.int64)
    bc = np.full((nseg, nkb), -99, dtype=np.int64)
    for s in range(nseg):
        for kb in range(nkb):
            rows = [r for r in range(nqb) if flags[s, r, kb]]
            bl[s, kb, :len(rows)] = rows
            bl[s, kb, len(rows):] = -1
            bc[s, kb] = len(rows)
    shp = lambda a, *t: a.reshape(B, H, *t)
    return (shp(thr, lq), shp(tie, lq), shp(fl, nqb, fw), shp(fc, nqb), shp(bl, nkb, nqb), shp(bc, nkb))
