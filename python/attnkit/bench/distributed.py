"""Context-parallel attnkit ops under torchrun: time per step, bytes moved, check against one process.

    torchrun --nproc_per_node=N -m attnkit.bench.distributed [--op ring,lightning] [--seqlen 8192] ...

NCCL with one GPU per process where GPUs are present, gloo with CPU processes otherwise; without
torchrun it runs as a group of one. Every rank builds the same full inputs from a seed and takes
its shard (for the check against the single-process op on rank 0; ``--no-check`` skips it and
the full tensors). Time per step is the median over ``--steps`` steps (forward, or forward and
backward with ``--mode fwd+bwd``) of the slowest rank, with a barrier before each step. Bytes are
what one rank hands to torch.distributed in one step, counted by ``attnkit.distributed.CommCounter``
next to the closed-form volume.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import attnkit
import attnkit.distributed as ad

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def _init():
    """(backend, device, whether this call created the process group)."""
    if dist.is_initialized():  # called from a program that set up its group
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return backend, device, False
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:  # torchrun
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return backend, device, True


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, steps, warmup, device):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)  # gloo and NCCL both take a CPU/GPU float64 scalar here
    return med.item()


def _rel_err(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _bench_ring(a, device, dtype, world, rank):
    B, L, D = a.batch, a.seqlen, a.dim
    Hq, Hkv = a.heads
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(B, L, h, D, generator=gen) for h in (Hq, Hkv, Hkv)]
    go = torch.randn(B, L, max(Hq, Hkv), D, generator=gen)
    local = [ad.shard_sequence(t, layout=a.layout).to(device, dtype).requires_grad_() for t in full]
    gol = ad.shard_sequence(go, layout=a.layout).to(device, dtype)
    bwd = a.mode == "fwd+bwd"

    def step():
        out = ad.ring_sparse_query_attention(*local, causal=a.causal, layout=a.layout)
        if bwd:
            out.backward(gol)
        return out

    t = _time_steps(step, a.steps, a.warmup, device)
    with ad.CommCounter() as cc:
        for x in local:
            x.grad = None
        out = step()
    n = L // world
    pred = ad.ring_sqa_comm_bytes(B, n, Hkv, D, world, dtype, backward=bwd)
    err = None
    if a.check:
        with torch.no_grad():
            out_full = ad.unshard_sequence(out.detach(), layout=a.layout)
            grads = [ad.unshard_sequence(x.grad, layout=a.layout) for x in local] if bwd else []
        if rank == 0:
            ref_in = [x.to(device, dtype).requires_grad_() for x in full]
            ref = attnkit.sparse_query_attention(*ref_in, causal=a.causal)
            errs = [_rel_err(out_full, ref)]
            if bwd:
                ref.backward(go.to(device, dtype))
                errs += [_rel_err(g, r.grad) for g, r in zip(grads, ref_in)]
            err = max(errs)
    flops = 4 * B * L * L * max(Hq, Hkv) * D * (0.5 if a.causal else 1.0) * (3.5 if bwd else 1.0)
    name = f"ring SQA Hq={Hq} Hkv={Hkv} D={D} {a.layout}{' causal' if a.causal else ''}"
    return name, t, cc, pred, err, flops


def _bench_lightning(a, device, dtype, world, rank):
    B, L, H, Dk, Dv = a.batch, a.seqlen, a.lightning_heads, a.dim, a.dim
    gen = torch.Generator().manual_seed(1)
    full = [0.5 * torch.randn(B, L, H, d, generator=gen) for d in (Dk, Dk, Dv)]
    go = torch.randn(B, L, H, Dv, generator=gen)
    slopes = attnkit.lightning_slopes(H).to(device)
    local = [ad.shard_sequence(t).to(device, dtype).requires_grad_() for t in full]
    gol = ad.shard_sequence(go).to(device, dtype)
    bwd = a.mode == "fwd+bwd"

    def step():
        o, _ = ad.lightning_attention_cp(*local, slopes)
        if bwd:
            o.backward(gol)
        return o

    t = _time_steps(step, a.steps, a.warmup, device)
    with ad.CommCounter() as cc:
        for x in local:
            x.grad = None
        out = step()
    pred = ad.lightning_cp_comm_bytes(B, H, Dk, Dv, world, dtype, backward=bwd)
    err = None
    if a.check:
        with torch.no_grad():
            out_full = ad.unshard_sequence(out.detach())
            grads = [ad.unshard_sequence(x.grad) for x in local] if bwd else []
        if rank == 0:
            ref_in = [x.to(device, dtype).requires_grad_() for x in full]
            ref, _ = attnkit.lightning_attention(*ref_in, slopes)
            errs = [_rel_err(out_full, ref)]
            if bwd:
                ref.backward(go.to(device, dtype))
                errs += [_rel_err(g, r.grad) for g, r in zip(grads, ref_in)]
            err = max(errs)
    # State build, intra-chunk Q K^T and (Q K^T) V over 64-row chunks, Q S and the state update;
    # the backward counted as three such passes.
    flops = 2 * B * L * H * (64 * (Dk + Dv) + 3 * Dk * Dv) * (4 if bwd else 1)
    return f"lightning CP H={H} D={Dk}", t, cc, pred, err, flops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", default="ring,lightning", help="comma list of ring, lightning")
    p.add_argument("--seqlen", type=int, default=None, help="global sequence length (default 8192 on GPU, 1024 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", default="8,4", help="Hq,Hkv of ring SQA")
    p.add_argument("--lightning-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag", choices=ad.LAYOUTS)
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-check", dest="check", action="store_false")
    a = p.parse_args(argv)
    a.heads = tuple(int(x) for x in a.heads.split(","))
    backend, device, owned = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    gpu = device.type == "cuda"
    dtype = _DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    a.seqlen = a.seqlen or (8192 if gpu else 1024)
    if not gpu and owned:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rows = []
    for op in a.op.split(","):
        fn = {"ring": _bench_ring, "lightning": _bench_lightning}[op.strip()]
        rows.append(fn(a, device, dtype, world, rank))
    if rank == 0:
        print(f"backend={backend} world={world} device={device.type} dtype={dtype} L={a.seqlen} B={a.batch} "
              f"mode={a.mode} (L/W={a.seqlen // world})")
        hdr = f"{'op':52} {'ms/step':>9} {'TFLOP/s':>8} {'bytes sent/rank':>16} {'formula':>14} {'max rel err':>12}"
        print(hdr)
        print("-" * len(hdr))
        for name, t, cc, pred, err, flops in rows:
            sent = int(cc.sent_bytes)
            ok = "" if err is None else f"{err:12.2e}"
            print(f"{name:52} {t * 1e3:9.2f} {flops / t / 1e12:8.3f} {sent:16d} {pred:14d} {ok}")
            if sent != pred:
                print(f"  !! counted bytes {sent} differ from the formula {pred}")
        # float64 is bounded by the core's float32 lse, which the ring merges by.
        tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(dtype, 3e-2)
        bad = [r[0] for r in rows if r[4] is not None and r[4] > tol]
        verdict = ("FAIL " + ", ".join(bad)) if bad else f"ok (max rel err <= {tol:g})"
        print("check vs single-process op:", verdict if a.check else "skipped")
    dist.barrier()
    if owned:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
