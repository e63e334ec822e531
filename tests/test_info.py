"""python -m attnkit.info: runs in a fresh interpreter and reports versions, arches, GPU and ops."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import attnkit
from attnkit import info


def _run_info() -> list[str]:
    env = dict(os.environ)
    # Make the subprocess import the same attnkit as this test session (source tree or install).
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(attnkit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run(
        [sys.executable, "-m", "attnkit.info"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_info_lines():
    lines = _run_info()
    by_key = {}
    for line in lines:
        key, _, val = line.partition(": ")
        by_key[key] = val
    assert by_key["attnkit"].startswith(attnkit.__version__)
    assert by_key["torch"] == torch.__version__
    assert by_key["CUDA (torch)"] == (torch.version.cuda or "none")
    build = info.build_info()
    assert by_key["CUDA kernels built"] == ("yes" if build["cuda"] == "1" else "no")
    assert by_key["compiled arches"] == (build["cuda_archs"] or "none")
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in by_key["GPU"]
    else:
        assert by_key["GPU"] == "none"
    # Every mechanism has a line; SQA is built on every machine, with a CUDA kernel iff registered.
    for op in ("sqa", "dma", "lightning", "routing"):
        assert f"op {op}" in by_key, lines
    sqa_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("attnkit::sqa_fwd", "CUDA")
    assert by_key["op sqa"] == ("CUDA kernel compiled in" if sqa_cuda else "CPU only (no CUDA kernel)")


def test_op_status():
    assert info.op_status("sqa_fwd") in ("cuda", "cpu only")
    assert info.op_status("definitely_not_an_op") == "not built"
