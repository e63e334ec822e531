"""CPU performance targets of the flash core and the ops on it, timed against the PyTorch paths a
CPU user would otherwise call. Usage: PYTHONPATH=python python bench/cpu_targets.py [--threads 2]
[--only sqa,dma,...]. Prints median wall times (ms) and the ratio baseline / attnkit."""
import argparse
import math
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench import baselines as bl


CLOCK = time.perf_counter


def timeit(fn, reps=5, warm=1):
    """Fastest of reps runs, in ms (the least disturbed run on a shared machine)."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return min(ts) * 1e3


def sdpa(q, k, v, causal=True):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def fwd_bwd(f, ins):
    def run():
        for t in ins:
            t.grad = None
        out = f()
        out.backward(torch.ones_like(out))
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="sqa,sqa_bwd,dma,lightning,routing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time (all threads) instead of wall time: steadier when other "
                         "processes load the machine")
    a = ap.parse_args()
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(a.threads)
    only = a.only.split(",")
    g = torch.Generator().manual_seed(0)
    B, H, D = 1, 8, 64
    rows = []

    def rnd(*s, rg=False):
        return torch.randn(*s, generator=g).requires_grad_(rg)

    if "sqa" in only or "sqa_bwd" in only:
        L = 2048
        q, k, v = rnd(B, L, H, D, rg=True), rnd(B, L, H, D, rg=True), rnd(B, L, H, D, rg=True)
        if "sqa" in only:
            with torch.no_grad():
                ta = timeit(lambda: attnkit.sparse_query_attention(q, k, v, causal=True), a.reps)
                tb = timeit(lambda: sdpa(q, k, v), a.reps)
            rows.append(("sqa causal fwd L2048", ta, tb, 0.8))
        if "sqa_bwd" in only:
            ta = timeit(fwd_bwd(lambda: attnkit.sparse_query_attention(q, k, v, causal=True), (q, k, v)), a.reps)
            tb = timeit(fwd_bwd(lambda: sdpa(q, k, v), (q, k, v)), a.reps)
            rows.append(("sqa causal fwd+bwd L2048", ta, tb, 0.7))
    if "dma" in only:
        L, keep = 2048, 256
        q, k, v = rnd(B, L, H, D), rnd(B, L, H, D), rnd(B, L, H, D)
        bias = rnd(B, H, L)
        with torch.no_grad():
            ta = timeit(lambda: attnkit.dynamic_mask_attention(q, k, v, bias, keep=keep, causal=True), a.reps)
            tb = timeit(lambda: sdpa(q, k, v), a.reps)
        rows.append(("dma causal fwd L2048 keep256 vs dense", ta, tb, 2.0))
    if "lightning" in only:
        L = 4096
        q, k, v = rnd(B, L, H, D), rnd(B, L, H, D), rnd(B, L, H, D)
        s = torch.as_tensor(attnkit.lightning_slopes(H), dtype=torch.float32)
        with torch.no_grad():
            ta = timeit(lambda: attnkit.lightning_attention(q, k, v, s, scale=D ** -0.5), a.reps)
            tb = timeit(lambda: bl.lightning_eager(q, k, v, s, scale=D ** -0.5), a.reps)
        rows.append(("lightning fwd L4096 vs eager chunked", ta, tb, 1.5))
    if "routing" in only:
        L = 2048
        C = int(round(math.sqrt(L)))
        w = L // C
        q, v = rnd(B, L, H, D, rg=True), rnd(B, L, H, D, rg=True)
        cent = F.normalize(torch.randn(H, C, D, generator=g), dim=-1)

        def rt():
            k = F.normalize(q, dim=-1)
            qi, ki = attnkit.routing_assign(q.detach(), k.detach(), cent, window=w, shared_qk=True)
            return attnkit.routing_attention(q, k, v, qi, ki, causal=True, shared_qk=True, scale=D ** -0.5)

        ta = timeit(fwd_bwd(rt, (q, v)), a.reps)
        kk = rnd(B, L, H, D, rg=True)
        tb = timeit(fwd_bwd(lambda: sdpa(q, kk, v), (q, kk, v)), a.reps)
        rows.append(("routing fwd+bwd L2048 C=45 vs dense", ta, tb, 1.0))
    print(f"threads={a.threads} clock={'process CPU time' if a.cpu_time else 'wall'} (fastest of {a.reps})")
    for name, ta, tb, target in rows:
        r = tb / ta
        print(f"{name:42s} attnkit {ta:8.1f} ms  baseline {tb:8.1f} ms  ratio {r:5.2f}  target {target:.1f} "
              f"{'OK' if r >= target else 'MISS'}")


if __name__ == "__main__":
    main()
