"""Shared test helpers: devices, the FlashAttention tolerance rule."""

from __future__ import annotations

import pytest
import torch

import attnkit  # noqa: F401  (registers the ops)

# CUDA-parametrised tests exist only where a GPU is visible.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def assert_close_fa(out, ref, eager, atol, name: str = "out"):
    """FlashAttention's rule: max|out - ref| <= 2 * max|eager - ref| + atol.

    ``ref`` is the float64 reference; ``eager`` the same math in plain PyTorch at the kernel's dtype
    (its error measures what that dtype can do). NaNs in ``out`` always fail; infinities must match.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert eager.shape == ref.shape, f"{name}: eager shape {tuple(eager.shape)} != reference {tuple(ref.shape)}"
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    e = eager.detach().double().cpu()
    assert not torch.isnan(o).any(), f"{name}: NaN in the output"
    if o.numel() == 0:
        return
    inf_o, inf_r = torch.isinf(o), torch.isinf(r)
    assert torch.equal(inf_o, inf_r), f"{name}: infinities differ from the reference"
    assert torch.equal(o[inf_o], r[inf_r]), f"{name}: signs of infinities differ"
    fin = ~inf_r
    err = (o - r)[fin].abs().max().item() if fin.any() else 0.0
    ok = fin & torch.isfinite(e)
    eager_err = (e - r)[ok].abs().max().item() if ok.any() else 0.0
    bound = 2 * eager_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > 2 * eager error {eager_err:.3e} + atol {atol:.1e}"
