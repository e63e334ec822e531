"""End-to-end check of the lightning ops' CUDA path under the CPU emulator (no GPU needed).

Builds tests/cuda_emu/emu_ext.cpp (the CUDA kernels, planner and the op layer, compiled for the host
against emu_cuda.h) and compares forward, backward (dq, dk, dv, d slopes, d initial_state) and decode
with the float64 reference, using the same FlashAttention-style rule as tests/test_lightning.py.

    PYTHONPATH=python .venv/bin/python tests/cuda_emu/run_e2e.py
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
from attnkit.reference import lightning_attention_reference as ref  # noqa: E402

load(
    name="attnkit_lightning_emu",
    sources=[str(here / "emu_ext.cpp")],
    extra_include_paths=[str(here / "cuda_include"), str(root / "csrc"), str(here)],  # stand-in CUDA headers first
    extra_cflags=["-std=c++20", "-O1", "-Wno-unknown-pragmas"],
    build_directory=os.environ.get("EMU_BUILD_DIR") or None,
    verbose=False,
    is_python_module=False,  # a library of torch ops only
)
emu = torch.ops.attnkit_emu
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check(dtype, B, L, H, Dk, Dv, scale, init, cu=None, block=0, splits=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = B if cu is None else len(cu) - 1
    q = (0.5 * torch.randn(B, L, H, Dk, generator=g)).to(dtype)
    k = (0.5 * torch.randn(B, L, H, Dk, generator=g)).to(dtype)
    v = torch.randn(B, L, H, Dv, generator=g).to(dtype)
    slopes = attnkit.lightning_slopes(H) * torch.linspace(4.0, 0.25, H)
    s0 = torch.randn(n, H, Dk, Dv, generator=g) if init else None
    do = torch.randn(B, L, H, Dv, generator=g).to(dtype)
    dfin = torch.randn(n, H, Dk, Dv, generator=g)
    cut = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    o, fin = emu.lightning_fwd(q, k, v, slopes, scale, s0, cut, block, splits)
    dq, dk, dv, ds, dinit = emu.lightning_bwd(do, dfin, q, k, v, slopes, scale, s0, cut, block, splits, True)
    kern = [o, fin, dq, dk, dv, ds] + ([dinit] if init else [])

    def grads(dt, sdt):
        leaves = [t.detach().clone().to(dt if t.is_floating_point() and dt == torch.float64 else t.dtype).requires_grad_()
                  for t in (q, k, v, slopes)]
        li = s0.detach().clone().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_() if init else None
        oo, ff = ref(*leaves, scale=scale, initial_state=li, cu_seqlens=cut, dtype=dt, state_dtype=sdt)
        loss = (oo.double() * do.double()).sum() + (ff.double() * dfin.double()).sum()
        gr = torch.autograd.grad(loss, leaves + ([li] if init else []))
        return [oo, ff, *gr]

    refs = grads(torch.float64, None)
    eager = grads(dtype, torch.float32)
    names = ["o", "final_state", "dq", "dk", "dv", "dslopes", "dinitial_state"]
    for name, a, r, e in zip(names, kern, refs, eager):
        atol = RTOL[dtype] * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        assert_close_fa(a, r, e, atol, name)


def check_decode(dtype):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 1, 3, 32, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(2, 1, 3, 48, generator=g).to(dtype)
    st = torch.randn(2, 3, 32, 48, generator=g)
    slopes = attnkit.lightning_slopes(3)
    o, s1 = emu.lightning_decode(q, k, v, st, slopes, 0.5)
    o_ref, s_ref = attnkit.lightning_attention_decode(q.double(), k.double(), v.double(), st.double(), slopes.double(), scale=0.5, inplace=False)
    torch.testing.assert_close(s1.double(), s_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.double(), o_ref, atol=RTOL[dtype] * o_ref.abs().max().item() * 2, rtol=0)


cases = []
for dt in (torch.float32, torch.float16, torch.bfloat16):
    cases += [
        (dt, 2, 1, 2, 32, 48, 0.5, True),
        (dt, 2, 15, 2, 32, 48, 0.5, True),
        (dt, 1, 150, 2, 48, 32, 0.5, True, None, 32, 3),
        (dt, 1, 108, 2, 16, 40, 1.0, True, [0, 1, 77, 77, 108], 64, 2),
        (dt, 2, 130, 1, 24, 16, 0.25, False, None, 64, 1),
    ]
failed = 0
for c in cases:
    t0 = time.time()
    try:
        check(*c)
        status = "ok"
    except AssertionError as err:  # report and go on
        failed += 1
        status = f"FAIL {err}"
    print(f"{str(c[0]):15s} {c[1:]}: {status} ({time.time() - t0:.1f}s)", flush=True)
for dt in (torch.float32, torch.float16, torch.bfloat16):
    check_decode(dt)
    print(f"decode {dt}: ok", flush=True)
print("PASSED" if not failed else f"FAILED: {failed}")
sys.exit(1 if failed else 0)
