"""``python -m attnkit.info``: versions, the build's CUDA arches, the visible GPU, and which ops have
a CUDA kernel compiled in."""

from __future__ import annotations

import sys

import torch

# Each mechanism and the schema whose CUDA registration stands for "the op has a CUDA kernel".
# Op authors: keep this pointing at your op's main (forward) schema.
OPS: dict[str, str] = {
    "sqa": "sqa_fwd",
    "dma": "dma_fwd",
    "lightning": "lightning_fwd",
    "routing": "routing_fwd",
}


def build_info() -> dict[str, str]:
    """The key=value lines of ``torch.ops.attnkit._build_info()`` as a dict."""
    text = torch.ops.attnkit._build_info()
    info = {}
    for line in text.splitlines():
        if "=" in line:
            key, val = line.split("=", 1)
            info[key.strip()] = val.strip()
    return info


def op_status(schema: str) -> str:
    """'cuda' when attnkit::<schema> has a CUDA kernel, 'cpu only' when it exists without one,
    'not built' when the schema is not defined."""
    name = f"attnkit::{schema}"
    if not torch._C._dispatch_has_kernel(name):
        return "not built"
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        return "cuda"
    return "cpu only"


def gpu_description() -> str:
    if not torch.cuda.is_available():
        return "none"
    parts = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        parts.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.1f} GiB)")
    return "; ".join(parts)


def lines() -> list[str]:
    import attnkit

    info = build_info()
    out = [
        f"attnkit: {attnkit.__version__} (extension {info.get('version', '?')})",
        f"torch: {torch.__version__}",
        f"CUDA (torch): {torch.version.cuda or 'none'}",
        f"CUDA kernels built: {'yes' if info.get('cuda') == '1' else 'no'}",
        f"compiled arches: {info.get('cuda_archs') or 'none'}",
        f"GPU: {gpu_description()}",
    ]
    words = {"cuda": "CUDA kernel compiled in", "cpu only": "CPU only (no CUDA kernel)", "not built": "not built"}
    for op, schema in OPS.items():
        out.append(f"op {op}: {words[op_status(schema)]}")
    return out


def main(argv: list[str] | None = None) -> int:
    for line in lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
