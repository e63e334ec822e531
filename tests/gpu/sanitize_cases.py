"""One small forward + backward of every op and configuration class, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python3 tests/gpu/sanitize_cases.py
    compute-sanitizer --tool racecheck python3 tests/gpu/sanitize_cases.py --quick

Not a pytest file: it only exercises the CUDA kernels (dtypes, head dims, causal, GQA both ways,
odd lengths, empty batch, bias / thresholds / tile lists, gathers) so the sanitizer can watch them.
"""

import argparse
import sys

import torch

import attnkit

DEV = "cuda"


def _qkv(B, Lq, Lk, Hq, Hkv, D, dtype, grad=True):
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda L, H: torch.randn(B, L, H, D, device=DEV, dtype=dtype, generator=g).requires_grad_(grad)  # noqa: E731
    return mk(Lq, Hq), mk(Lk, Hkv), mk(Lk, Hkv)


def _backward(out):
    out.float().square().sum().backward()


def sqa_cases(quick):
    dims = [64] if quick else [32, 64, 96, 128, 256]
    for dtype in (torch.float16, torch.bfloat16):
        for D in dims:
            for (Hq, Hkv) in [(4, 4), (4, 1), (2, 4)]:
                for causal in (False, True):
                    for (Lq, Lk) in [(1, 1), (17, 130), (130, 17), (65, 65)]:
                        q, k, v = _qkv(2, Lq, Lk, Hq, Hkv, D, dtype)
                        _backward(attnkit.sparse_query_attention(q, k, v, causal=causal))
                if quick:
                    break
    q, k, v = _qkv(0, 16, 16, 2, 2, 64, torch.float16)
    _backward(attnkit.sparse_query_attention(q, k, v, causal=True))


def dma_cases(quick):
    for causal in (False, True):
        for keep in (1, 7, 64, 1000):
            q, k, v = _qkv(1, 150, 150, 4, 2, 64, torch.bfloat16)
            bias = torch.randn(1, 2, 150, device=DEV, requires_grad=True)
            _backward(attnkit.dynamic_mask_attention(q, k, v, bias, keep=keep, causal=causal))
    q, k, v = _qkv(1, 70, 70, 2, 2, 64, torch.float16)
    mask = torch.rand(1, 2, 70, 70, device=DEV) > 0.5
    bias = torch.randn(1, 2, 70, 70, device=DEV, requires_grad=True)
    _backward(attnkit.masked_bias_attention(q, k, v, attn_mask=mask, attn_bias=bias))


def routing_cases(quick):
    for shared in (True, False):
        for causal in (True, False):
            q, k, v = _qkv(1, 100, 100, 2, 2, 64, torch.float16)
            mu = torch.nn.functional.normalize(torch.randn(2, 4, 64, device=DEV), dim=-1)
            qi, ki = attnkit.routing_assign(q.detach(), None if shared else k.detach(), mu, cluster_size=30, shared_qk=shared)
            kk = q if shared else k
            _backward(attnkit.routing_attention(q, kk, v, qi, ki, causal=causal, shared_qk=shared))
            attnkit.kmeans_ema_update_(mu, q.detach(), decay=0.9)


def lightning_cases(quick):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (L, Dk, Dv) in [(1, 64, 64), (100, 64, 128), (130, 48, 32)]:
            q, k, v = _qkv(2, L, L, 4, 4, Dk, dtype)
            v = torch.randn(2, L, 4, Dv, device=DEV, dtype=dtype, requires_grad=True)
            slopes = attnkit.lightning_slopes(4, device=DEV).requires_grad_(True)
            o, _ = attnkit.lightning_attention(q, k, v, slopes)
            _backward(o)
    q, k, v = _qkv(1, 1, 1, 4, 4, 64, torch.bfloat16, grad=False)
    state = torch.zeros(1, 4, 64, 64, device=DEV)
    attnkit.lightning_attention_decode(q, k, v, state, attnkit.lightning_slopes(4, device=DEV))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer configurations (racecheck is slow)")
    ap.add_argument("--ops", default="sqa,dma,routing,lightning")
    ap.add_argument("--device", default="cuda", help="cpu: check the script itself where no GPU is")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    for op in args.ops.split(","):
        globals()[f"{op}_cases"](args.quick)
        if DEV == "cuda":
            torch.cuda.synchronize()
        print(f"{op}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
