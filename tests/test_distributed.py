"""attnkit.distributed: ring SQA and lightning state passing over torch.distributed.

Each test starts one process group (gloo on CPU with 2 or 3 processes; NCCL with 2 GPUs where
there are) and runs a batch of cases in it. A case shards full inputs, runs the distributed op
forward and backward, gathers the outputs and gradients back and checks them, on the group's
first rank, against the float64 oracle of ``attnkit.reference`` with the FlashAttention rule,
taking the single-process op at the same dtype as the "eager" error measure. Byte counts of the
communication are checked exactly against the closed-form volumes.

CPU groups start with the ``fork`` method (the children inherit the imported torch: starting
fresh interpreters costs tens of seconds on a busy machine); NCCL groups use ``spawn``.
"""

from __future__ import annotations

import datetime
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close_fa

import attnkit
import attnkit.distributed as ad
from attnkit.reference import lightning_attention_reference, sqa_reference

_ATOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Lightning's outputs are unnormalised sums: its slack is relative to max |reference|.
_LT_REL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ------------------------------------------------------------------------------------------------
# Process-group plumbing
# ------------------------------------------------------------------------------------------------


def _launch(world, tmp_path, backend, cases):
    method = "spawn" if backend == "nccl" else "fork"
    try:
        mp.start_processes(_worker, args=(world, str(tmp_path), backend, cases), nprocs=world, join=True,
                           start_method=method)
    except Exception:
        # The first rank to fail may only see its peer's failure: report every rank's error.
        errors = sorted(tmp_path.glob("rank*.err"))
        raise AssertionError("\n".join(p.read_text() for p in errors) or "a rank failed without a report")


def _worker(rank, world, tmp, backend, cases):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A short timeout: a rank that failed leaves its peers waiting in a collective.
    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    device = "cuda" if backend == "nccl" else "cpu"
    try:
        for name, kw in cases:
            try:
                _CASES[name](device=device, **kw)
            except Exception:
                with open(f"{tmp}/rank{rank}.err", "w") as f:
                    f.write(f"rank {rank}/{world}, case {name} {kw}:\n{traceback.format_exc()}")
                raise
    finally:
        dist.destroy_process_group()


def _group(ranks):
    """(group, is_member, rank in group, size); new_group is collective over the default group."""
    if ranks is None:
        return None, True, dist.get_rank(), dist.get_world_size()
    g = dist.new_group(ranks)
    me = dist.get_rank()
    if me not in ranks:
        return g, False, -1, len(ranks)
    return g, True, ranks.index(me), len(ranks)


def _randn(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Cases (each runs on every rank of the group)
# ------------------------------------------------------------------------------------------------


def _ring_case(*, device, dtype, B, L, Hq, Hkv, D, layout, causal, ranks=None, count=False, seed=0):
    group, member, grank, W = _group(ranks)
    if not member:
        return
    gen = torch.Generator().manual_seed(seed)
    q = _randn((B, L, Hq, D), gen, dtype, device)
    k = _randn((B, L, Hkv, D), gen, dtype, device)
    v = _randn((B, L, Hkv, D), gen, dtype, device)
    H = max(Hq, Hkv)
    go = _randn((B, L, H, D), gen, dtype, device)
    shard = lambda t: ad.shard_sequence(t, group=group, layout=layout)
    unshard = lambda t: ad.unshard_sequence(t, group=group, layout=layout)
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    counter = ad.CommCounter()
    with counter:
        out, lse = ad.ring_sparse_query_attention(
            ql, kl, vl, group=group, causal=causal, layout=layout, return_lse=True
        )
        fwd_bytes, fwd_msgs = counter.p2p_bytes, counter.p2p_messages
        (out * shard(go)).sum().backward()
    n = L // W
    if count:
        e = torch.empty((), dtype=dtype).element_size()
        acc = 8 if dtype == torch.float64 else 4
        kv_shard = 2 * B * n * Hkv * D
        assert fwd_msgs == W - 1 and fwd_bytes == (W - 1) * kv_shard * e
        assert fwd_bytes == ad.ring_sqa_comm_bytes(B, n, Hkv, D, W, dtype)
        assert counter.p2p_messages == 3 * W - 2
        assert counter.p2p_bytes == 2 * (W - 1) * kv_shard * e + W * kv_shard * acc
        assert counter.p2p_bytes == ad.ring_sqa_comm_bytes(B, n, Hkv, D, W, dtype, backward=True)
        assert counter.collectives == []  # q, k and v are never gathered
    assert out.shape == (B, n, H, D) and out.dtype == dtype and lse.shape == (B, H, n)
    with torch.no_grad():
        full = [unshard(t) for t in (out, ql.grad, kl.grad, vl.grad)]
        lse_full = ad.unshard_sequence(lse, group=group, dim=2, layout=layout)
    if grank != 0:
        return
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = sqa_reference(*ref_in, causal=causal, return_lse=True)
    (ref_out * go.cpu().double()).sum().backward()
    eag_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    eag_out, eag_lse = attnkit.sparse_query_attention(*eag_in, causal=causal, return_lse=True)
    (eag_out * go).sum().backward()
    atol = _ATOL[dtype]
    assert_close_fa(full[0], ref_out, eag_out, atol, "out")
    assert_close_fa(lse_full, ref_lse, eag_lse, atol, "lse")
    for name, got, r, e in zip(("dq", "dk", "dv"), full[1:], ref_in, eag_in):
        assert_close_fa(got, r.grad, e.grad, atol, name)


def _lightning_case(*, device, dtype, B, n, H, Dk, Dv, with_init, scale=1.0, ranks=None, count=False, seed=1):
    group, member, grank, W = _group(ranks)
    if not member:
        return
    L = n * W
    gen = torch.Generator().manual_seed(seed)
    q = _randn((B, L, H, Dk), gen, dtype, device) * 0.5
    k = _randn((B, L, H, Dk), gen, dtype, device) * 0.5
    v = _randn((B, L, H, Dv), gen, dtype, device)
    go = _randn((B, L, H, Dv), gen, dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gf_all = _randn((W, B, H, Dk, Dv), gen, acc, device)  # each rank's gradient of the final state
    # Slopes that let the state cross several shards (decay over a shard from ~0.97 to ~0.1).
    # Slopes and state in the accumulation dtype, so that the gradients compare at its precision.
    slopes = torch.tensor([0.06, 0.01, 0.001], dtype=torch.float64)[:H].to(device=device, dtype=acc)
    init = _randn((B, H, Dk, Dv), gen, acc, device) if with_init else None
    ql, kl, vl = (ad.shard_sequence(t, group=group).requires_grad_() for t in (q, k, v))
    sl = slopes.clone().requires_grad_()
    il = init.clone().requires_grad_() if with_init else None
    counter = ad.CommCounter()
    with counter:
        o, final = ad.lightning_attention_cp(
            ql, kl, vl, sl, group=group, scale=scale, initial_state=il, output_final_state=True
        )
        fwd = list(counter.collectives)
        loss = (o * ad.shard_sequence(go, group=group)).sum() + (final * gf_all[grank]).sum()
        loss.backward()
    if count:
        e = 8 if dtype == torch.float64 else 4
        state = B * H * Dk * Dv * e
        assert counter.p2p_bytes == 0
        assert fwd == [("all_gather", state, W)]
        assert counter.collectives == [("all_gather", state, W), ("all_gather", 2 * state, W)]
        assert counter.sent_bytes == 3 * (W - 1) * state
        assert counter.sent_bytes == ad.lightning_cp_comm_bytes(B, H, Dk, Dv, W, dtype, backward=True)
    assert o.shape == (B, n, H, Dv) and o.dtype == dtype and final.shape == (B, H, Dk, Dv)
    with torch.no_grad():
        full = [ad.unshard_sequence(t, group=group) for t in (o, ql.grad, kl.grad, vl.grad)]
        finals = [torch.empty_like(final) for _ in range(W)]
        dist.all_gather(finals, final.detach().contiguous(), group=group)
        shared = [sl.grad] + ([il.grad] if with_init else [])
        for t in shared:  # replicated inputs hold this rank's share of their gradient
            dist.all_reduce(t, group=group)
    for f in finals[1:]:  # the final state is the same on every rank
        assert torch.equal(f, finals[0])
    if grank != 0:
        return
    gf = gf_all.sum(0)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, slopes)]
    ref_init = init.detach().cpu().double().requires_grad_() if with_init else None
    ref_o, ref_f = lightning_attention_reference(*ref_in, scale=scale, initial_state=ref_init)
    ((ref_o * go.cpu().double()).sum() + (ref_f * gf.cpu().double()).sum()).backward()
    eag_in = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes)]
    eag_init = init.detach().clone().requires_grad_() if with_init else None
    eag_o, eag_f = attnkit.lightning_attention(*eag_in, scale=scale, initial_state=eag_init, output_final_state=True)
    ((eag_o * go).sum() + (eag_f * gf).sum()).backward()
    rel = _LT_REL[dtype]
    checks = [("o", full[0], ref_o, eag_o), ("final_state", finals[0], ref_f, eag_f)]
    names = ("dq", "dk", "dv", "dslopes")
    checks += [(nm, g, r.grad, e.grad) for nm, g, r, e in zip(names, full[1:] + [sl.grad], ref_in, eag_in)]
    if with_init:
        checks.append(("dinitial_state", il.grad, ref_init.grad, eag_init.grad))
    for name, got, ref, eag in checks:
        assert_close_fa(got, ref, eag, rel * ref.abs().max().item(), name)


def _shard_case(*, device):
    rank, W = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(2)
    for layout in ad.LAYOUTS:
        parts = W if layout == "contiguous" else 2 * W
        c = 3
        x = torch.arange(2 * parts * c * 5, dtype=torch.float64).reshape(2, parts * c, 5).to(device)
        xl = ad.shard_sequence(x, layout=layout)
        # Which global rows this rank holds, by the layout's definition.
        rows = [rank] if layout == "contiguous" else [rank, 2 * W - 1 - rank]
        expect = torch.cat([x[:, r * c : (r + 1) * c] for r in rows], 1)
        assert torch.equal(xl, expect)
        assert torch.equal(ad.unshard_sequence(xl, layout=layout), x)
        # Another dim, negative index.
        xt = x.transpose(1, 2).contiguous()
        assert torch.equal(ad.unshard_sequence(ad.shard_sequence(xt, dim=-1, layout=layout), dim=-1, layout=layout), xt)
        # Autograd: shard puts the gradient of its rows back in place; unshard hands this rank its slice.
        xg = x.clone().requires_grad_()
        g = _randn(x.shape, gen, torch.float64, device)
        y = ad.unshard_sequence(ad.shard_sequence(xg, layout=layout) * 3.0, layout=layout)
        (y * g).sum().backward()
        mask = torch.zeros_like(x)
        for r in rows:
            mask[:, r * c : (r + 1) * c] = 1
        assert torch.equal(xg.grad, 3.0 * g * mask)
        total = xg.grad.clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, 3.0 * g, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match=f"multiple of {parts}"):
            ad.shard_sequence(torch.zeros(1, parts * c + 1, 2, device=device), layout=layout)
    with pytest.raises(ValueError, match="layout must be one of"):
        ad.shard_sequence(x, layout="striped")
    with pytest.raises(ValueError, match="dim must be in"):
        ad.shard_sequence(x, dim=3)
    with pytest.raises(ValueError, match="must be even"):
        ad.unshard_sequence(torch.zeros(1, 3, 2, device=device), layout="zigzag")
    q = torch.zeros(1, 6, 2, 8, device=device)
    with pytest.raises(ValueError, match="must be even"):
        ad.ring_sparse_query_attention(q[:, :5], q[:, :5], q[:, :5], layout="zigzag")
    with pytest.raises(ValueError, match="shard length"):
        ad.ring_sparse_query_attention(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="divide one another"):
        k3 = torch.zeros(1, 6, 3, 8, device=device)
        ad.ring_sparse_query_attention(q, k3, k3)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        bad_state = torch.zeros(1, 2, 8, 7, device=device)
        ad.lightning_attention_cp(q, q, q, torch.ones(2, device=device), initial_state=bad_state)
    with pytest.raises(ValueError, match=r"slopes must have shape \[H\]"):
        ad.lightning_attention_cp(q, q, q, torch.ones(3, device=device))


def _bench_case(*, device):
    """The torchrun benchmark, run inside this group at a tiny size: it must report a passing check
    and counted bytes equal to the formulas."""
    import contextlib
    import io

    from attnkit.bench import distributed as bench

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench.main(["--seqlen", "48", "--dim", "16", "--heads", "2,4", "--lightning-heads", "2", "--steps", "1",
                    "--warmup", "0", "--dtype", "fp64"])
    text = buf.getvalue()
    if dist.get_rank() == 0:
        assert "check vs single-process op: ok" in text, text
        assert "!!" not in text and text.count("ring SQA") == 1 and text.count("lightning CP") == 1, text


_CASES = {"ring": _ring_case, "lightning": _lightning_case, "shard": _shard_case, "bench": _bench_case}


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def _ring_cases(L, dtypes_extra, D=16, cpu=True):
    cases = []
    for Hq, Hkv in ((4, 2), (2, 4)):
        for layout in ad.LAYOUTS:
            for causal in (False, True):
                cases.append(dict(dtype=torch.float32 if cpu else torch.bfloat16, B=2, L=L, Hq=Hq, Hkv=Hkv, D=D,
                                  layout=layout, causal=causal))
    cases[0]["count"] = True
    for dtype, Hq, Hkv, layout in dtypes_extra:
        cases.append(dict(dtype=dtype, B=1, L=L, Hq=Hq, Hkv=Hkv, D=D, layout=layout, causal=True, count=True))
    return [("ring", c) for c in cases]


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ad.shard_sequence(torch.zeros(1, 4, 1, 1))
    with pytest.raises(RuntimeError, match="init_process_group"):
        ad.ring_sparse_query_attention(*(torch.zeros(1, 4, 1, 8),) * 3)


def test_gloo_two_ranks(tmp_path):
    # Shards of 74 rows (zigzag: two chunks of 37): no multiple of the core's 64-row tiles.
    cases = [("shard", {}), ("bench", {})]
    cases += _ring_cases(148, [(torch.float64, 2, 4, "zigzag"), (torch.bfloat16, 4, 2, "contiguous")])
    cases += [
        ("lightning", dict(dtype=torch.float32, B=2, n=37, H=3, Dk=8, Dv=12, with_init=False, count=True)),
        ("lightning", dict(dtype=torch.float32, B=2, n=37, H=3, Dk=8, Dv=12, with_init=True, scale=0.5)),
        ("lightning", dict(dtype=torch.float64, B=1, n=29, H=2, Dk=6, Dv=5, with_init=True, count=True)),
    ]
    _launch(2, tmp_path, "gloo", cases)


def test_gloo_three_ranks(tmp_path):
    # Shards of 50 rows (zigzag: 2 x 25); then a two-rank subgroup {2, 0} of the three, in ring
    # order 2 -> 0 -> 2, which exercises group ranks != global ranks.
    cases = [("shard", {})]
    cases += _ring_cases(150, [(torch.float64, 4, 2, "zigzag")])
    cases += [
        ("ring", dict(dtype=torch.float32, B=1, L=44, Hq=2, Hkv=4, D=16, layout="zigzag", causal=True, ranks=[2, 0],
                      count=True)),
        ("lightning", dict(dtype=torch.float32, B=1, n=21, H=3, Dk=8, Dv=4, with_init=True, count=True)),
        ("lightning", dict(dtype=torch.float32, B=1, n=21, H=2, Dk=4, Dv=8, with_init=False, ranks=[2, 0])),
    ]
    _launch(3, tmp_path, "gloo", cases)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
    reason="the NCCL variant needs torch with NCCL and at least 2 GPUs",
)
def test_nccl(tmp_path):
    world = min(torch.cuda.device_count(), 4)
    L = 2 * world * 100  # zigzag chunks of 100 rows
    cases = [("shard", {})] + _ring_cases(L, [], D=64, cpu=False)
    cases += [
        ("lightning", dict(dtype=torch.bfloat16, B=2, n=100, H=3, Dk=64, Dv=64, with_init=True, count=True)),
        ("lightning", dict(dtype=torch.float32, B=1, n=70, H=2, Dk=32, Dv=64, with_init=False)),
    ]
    _launch(world, tmp_path, "nccl", cases)
