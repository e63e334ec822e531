"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .routing import RoutingAttention
from .sqa import SQA_PRESETS, SparseQueryAttention

__all__ = ["SparseQueryAttention", "SQA_PRESETS", "RoutingAttention"]

# ---- Dynamic Mask Attention ----
from .dma import DynamicMaskAttention  # noqa: E402

__all__ += ["DynamicMaskAttention"]

# ---- Lightning attention (TransNormerLLM) ----
from .lightning import LightningAttention  # noqa: E402

__all__ += ["LightningAttention"]
