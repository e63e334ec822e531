"""Emulated CUDA checks of the deterministic dq paths (no GPU needed): the routing local-window backward
(dq slices numbered from each query block's first visible key block, their count bounded by the
window) and DMA's deterministic flag (bitwise equal gradients with tile skipping on and off).

Builds the CUDA op layer under the CPU emulator of tests/cuda_emu (the same sources as its
run_ops_e2e.py, in a build directory of its own) and compares with attnkit.reference under the
FlashAttention rule of the test suite.

    PYTHONPATH=python python tests/emu_window_dq.py
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import torch
from torch.utils.cpp_extension import load

root = pathlib.Path(__file__).resolve().parent.parent
emu_dir = root / "tests" / "cuda_emu"
sys.path.insert(0, str(root / "tests"))
torch.set_num_threads(1)

from conftest import assert_close_fa  # noqa: E402

import attnkit  # noqa: E402,F401
from attnkit import reference  # noqa: E402

t0 = time.time()
build_dir = os.environ.get("EMU_BUILD_DIR") or os.path.join(tempfile.gettempdir(), "attnkit_emu_window_dq")
os.makedirs(build_dir, exist_ok=True)
load(
    name="attnkit_ops_emu",
    sources=[str(emu_dir / f) for f in ("emu_ops_ext.cpp", "emu_ops_flash.cpp", "emu_ops_routing_select.cpp",
                                        "emu_ops_routing_combine.cpp", "emu_ops_kmeans.cpp",
                                        "emu_ops_dma_select.cpp")]
    + [str(root / f) for f in ("csrc/flash/flash_api.cpp", "csrc/sqa/sqa_api.cpp", "csrc/dma/dma_api.cpp")],
    extra_include_paths=[str(emu_dir / "ops_include"), str(emu_dir / "cuda_include"), str(emu_dir),
                         str(root / "csrc")],
    extra_cflags=["-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas"],
    extra_ldflags=["-pthread"],
    build_directory=build_dir,
    is_python_module=False,
)
print(f"built ({time.time() - t0:.0f}s)", flush=True)
emu = torch.ops.attnkit_emu
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
failed = 0


def run(label, fn, *args):
    global failed
    t = time.time()
    try:
        fn(*args)
        print(f"ok   {label} ({time.time() - t:.1f}s)", flush=True)
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {label}: {e}", flush=True)


def local_window(dtype, B, L, H, D, window_left, deterministic):
    g = torch.Generator().manual_seed(L + window_left)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(3))
    scale = D**-0.5
    out, _, lse = emu.routing_fwd(q, k, v, None, None, None, True, window_left, False, scale, deterministic)
    idx = torch.arange(L).expand(B, H, 1, L)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference.routing_attention_ref(*leaves64, idx, idx, causal=True, shared_qk=False, scale=scale,
                                          window_left=window_left)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = reference.routing_attention_ref(*leaves, idx, idx, causal=True, shared_qk=False, scale=scale,
                                            window_left=window_left, dtype=dtype)
    assert_close_fa(out, ref, eager, ATOL[dtype], "out")
    dout = torch.randn(q.shape, generator=g).to(dtype)
    dq, dk, dv = emu.routing_bwd(dout, q, k, v, None, None, None, out, lse, True, window_left, False, scale,
                                 deterministic)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    eager_g = torch.autograd.grad(eager, leaves, dout)
    for name, a, r, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, eager_g):
        assert_close_fa(a, r, e, ATOL[dtype] * 4, name)
    if deterministic:
        again = emu.routing_bwd(dout, q, k, v, None, None, None, out, lse, True, window_left, False, scale, True)
        assert all(torch.equal(x, y) for x, y in zip((dq, dk, dv), again)), "deterministic bwd not repeatable"


def dma_deterministic(dtype, B, lq, lk, hq, hkv, d, keep, causal):
    g = torch.Generator().manual_seed(lq * 31 + lk)
    q = torch.randn(B, lq, hq, d, generator=g).to(dtype)
    k = torch.randn(B, lk, hkv, d, generator=g).to(dtype)
    v = torch.randn(B, lk, hkv, d, generator=g).to(dtype)
    bias = torch.randn(B, hkv, lk, generator=g)
    scale = d**-0.5
    thr, tie, fl, fc, bl, bc = torch.ops.attnkit.dma_select(bias, keep, lq, causal)
    dout = torch.randn(B, lq, max(hq, hkv), d, generator=g).to(dtype)
    grads = []
    for lists in (True, False):
        args = (fl, fc, bl, bc) if lists else (None, None, None, None)
        out, lse = emu.dma_fwd(q, k, v, bias, thr, tie, *args, causal, scale, True)
        grads.append(emu.dma_bwd(dout, q, k, v, bias, out, lse, thr, tie, args[2], args[3], causal, scale, True))
    leaves64 = [t.double().requires_grad_() for t in (q, k, v, bias)]
    ref, _ = reference.dynamic_mask_attention(*leaves64, keep=keep, causal=causal, scale=scale)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [bias.clone().requires_grad_()]
    eager, _ = reference.dynamic_mask_attention(*leaves, keep=keep, causal=causal, scale=scale)
    ref_g = torch.autograd.grad(ref, leaves64, dout.double())
    eager_g = torch.autograd.grad(eager, leaves, dout)
    for name, a, r, e in zip(("dq", "dk", "dv", "dbias"), grads[0], ref_g, eager_g):
        mag = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        assert_close_fa(a, r, e, ATOL[dtype] * 4 * mag, name)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), *grads):
        assert torch.equal(a, b), f"{name}: tile skipping on / off differ in deterministic mode"


for dt in (torch.float16, torch.bfloat16):
    for wl in (0, 63, 100):
        run(f"routing local window {dt} window_left={wl} det", local_window, dt, 1, 200, 2, 64, wl, True)
    run(f"routing local window {dt} window_left=100 atomic", local_window, dt, 1, 200, 2, 64, 100, False)
    run(f"routing local window {dt} window_left=500 det (wider than L)", local_window, dt, 1, 130, 1, 32, 500, True)
run("dma deterministic fp16 GQA", dma_deterministic, torch.float16, 1, 130, 150, 4, 2, 64, 40, True)
run("dma deterministic bf16 SQA", dma_deterministic, torch.bfloat16, 2, 70, 70, 1, 2, 32, 17, False)
print(f"{failed} failed ({time.time() - t0:.0f}s)")
sys.exit(1 if failed else 0)
