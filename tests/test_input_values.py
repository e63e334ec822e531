"""Bad index / offset values raise a Python error naming the argument before any kernel runs, with
the same message on every device, and (on CUDA) leave the context usable; the deterministic flag of
dynamic_mask_attention."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES

import attnkit


def _still_usable(device):
    """A CUDA error raised by a device-side assert would make every later call fail."""
    x = torch.arange(4.0, device=device)
    assert (x * 2).sum().item() == 12.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 20])
@pytest.mark.parametrize("which", ["q_idx", "k_idx"])
def test_routing_index_out_of_range(device, bad, which):
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, L, H, D, C, w = 1, 20, 2, 32, 2, 5
    q, k, v = (torch.randn(B, L, H, D, device=device, dtype=dtype) for _ in range(3))
    qi = torch.sort(torch.randperm(L)[: C * w].view(1, 1, C, w).repeat(B, H, 1, 1), dim=-1).values
    qi = qi.to(device=device, dtype=torch.int32)
    ki = qi.clone()
    (qi if which == "q_idx" else ki)[0, 1, 1, 2] = bad
    with pytest.raises(RuntimeError, match=rf"{which} values must lie in \[0, L=20\) \(got \[{min(bad, 0)}, {max(bad, 0)}"):
        attnkit.routing_attention(q, k, v, qi, ki, causal=True, shared_qk=False)
    _still_usable(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-2, 3])
def test_kmeans_assign_out_of_range(device, bad):
    H, C, D, N = 2, 3, 16, 10
    mu = torch.nn.functional.normalize(torch.randn(H, C, D), dim=-1).to(device)
    x = torch.randn(N, H, D, device=device)
    assign = torch.randint(0, C, (N, H), dtype=torch.int32, device=device)
    assign[4, 1] = bad
    before = mu.clone()
    with pytest.raises(RuntimeError, match=r"assign values must lie in \[0, C=3\)"):
        attnkit.kmeans_ema_update_(mu, x, decay=0.5, assign=assign)
    assert torch.equal(mu, before), "centroids changed by a call that raised"
    _still_usable(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "cu,msg",
    [([1, 4, 10], r"cu_seqlens\[0\] must be 0"), ([0, 6, 4, 10], "non-decreasing"),
     ([0, 4, 9], r"cu_seqlens\[-1\] must equal the number of rows L = 10")],
)
def test_lightning_bad_cu_seqlens(device, cu, msg):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = (torch.randn(1, 10, 2, 16, device=device, dtype=dtype) for _ in range(3))
    slopes = attnkit.lightning_slopes(2).to(device)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=msg):
        attnkit.lightning_attention(q, k, v, slopes, cu_seqlens=cu_t)
    # the op itself (as reached under torch.compile, past the Python checks) raises the same message
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.attnkit.lightning_fwd(q, k, v, slopes, 1.0, None, cu_t, 0, 0)
    _still_usable(device)


@pytest.mark.parametrize("device", DEVICES)
def test_dma_deterministic_flag(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 90, 4, 32, device=device, dtype=dtype)
    k = torch.randn(2, 130, 2, 32, device=device, dtype=dtype)
    v = torch.randn(2, 130, 2, 32, device=device, dtype=dtype)
    bias = torch.randn(2, 2, 130, device=device)
    dout = torch.randn(2, 90, 4, 32, device=device, dtype=dtype)
    runs = []
    for det in (True, True, False):
        xs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = attnkit.dynamic_mask_attention(*xs, keep=20, causal=True, deterministic=det)
        runs.append((out, *torch.autograd.grad(out, xs, dout)))
    for a, b in zip(runs[0], runs[1]):  # deterministic: bitwise repeatable
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):  # same math either way (dq's summation order may differ)
        torch.testing.assert_close(a, b, atol=1e-2 if device == "cuda" else 1e-6, rtol=1e-2 if device == "cuda" else 1e-6)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        attnkit.dynamic_mask_attention(q, k, v, bias, keep=20, deterministic=1)
