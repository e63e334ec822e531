"""Shared test helpers: devices, the FlashAttention tolerance rule."""

from __future__ import annotations

import contextlib

import pytest
import torch

import attnkit  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP_REASON = "needs a CUDA device"

# Both devices are always collected. "cuda" is a plain string so that tests can build tuples of
# parameters from it (``for d in DEVICES``); pytest_collection_modifyitems below marks every collected
# case that has a "cuda" parameter (alone or inside a tuple) as skipped when no GPU is visible, so the
# summary shows what did not run.
DEVICES = ["cpu", "cuda"]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON))


def _mentions_cuda(value) -> bool:
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, (tuple, list)):
        return any(_mentions_cuda(v) for v in value)
    return False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(_mentions_cuda(v) for v in callspec.params.values()):
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@contextlib.contextmanager
def one_thread():
    """Run the (many small) reference / eager torch ops on one thread: on a busy 2-core machine
    OpenMP's spinning makes them several times slower. Kernels under test keep all threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def assert_close_fa(out, ref, eager, atol, name: str = "out"):
    """FlashAttention's rule: max|out - ref| <= 2 * max|eager - ref| + atol.

    ``ref`` is the float64 reference; ``eager`` the same math run by plain PyTorch at the kernel's
    dtype (its error measures what that dtype can do). NaN / inf mismatches always fail.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert eager.shape == ref.shape, f"{name}: eager shape {tuple(eager.shape)} != reference {tuple(ref.shape)}"
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    eager64 = eager.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{name}: NaN in the kernel's output"
    if out64.numel() == 0:
        return
    # Infinities must match exactly (e.g. lse = -inf on rows without a visible key).
    inf_out, inf_ref = torch.isinf(out64), torch.isinf(ref64)
    assert torch.equal(inf_out, inf_ref), f"{name}: infinities differ from the reference"
    assert torch.equal(out64[inf_out], ref64[inf_ref]), f"{name}: signs of infinities differ"
    fin = ~inf_ref
    err = _max_abs((out64 - ref64)[fin])
    eager_err = _max_abs((eager64 - ref64)[fin & torch.isfinite(eager64)])
    bound = 2 * eager_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > 2 * eager error {eager_err:.3e} + atol {atol:.1e}"
