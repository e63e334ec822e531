import pytest
import torch


def assert_close_fa(out, ref, eager, atol, name="output"):
    """FlashAttention's rule: max|out - ref| <= 2 * max|eager - ref| + atol * max(1, max|ref|).

    ref is the float64 reference, eager the same math in the kernel's dtype (pass ref again when the
    kernel runs in float64). The slack scales with the magnitude of the values once above 1 (gradients
    summed over long sequences reach hundreds; kernels accumulate sequentially in fp32, eager torch
    pairwise). Non-finite entries must agree exactly (e.g. lse = -inf of empty rows).
    """
    out64, ref64, eager64 = out.double(), ref.double(), eager.double()
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out64), fin), f"{name}: non-finite entries differ from the reference"
    assert torch.equal(out64[~fin], ref64[~fin]), f"{name}: non-finite values differ from the reference"
    if fin.any():
        err = (out64[fin] - ref64[fin]).abs().max().item()
        base = (eager64[fin] - ref64[fin]).abs().max().item()
        slack = atol * max(1.0, ref64[fin].abs().max().item())
        assert err <= 2 * base + slack, f"{name}: max error {err:.3e} > 2 * {base:.3e} + {slack:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
