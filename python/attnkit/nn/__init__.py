"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .sqa import SQA_PRESETS, SparseQueryAttention

__all__ = ["SparseQueryAttention", "SQA_PRESETS"]

# ---- Dynamic Mask Attention ----
from .dma import DynamicMaskAttention  # noqa: E402

__all__ += ["DynamicMaskAttention"]
