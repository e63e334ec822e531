"""attnkit.nn: attention layers built on the attnkit ops."""

# ---- Dynamic Mask Attention ----
from .dma import DynamicMaskAttention  # noqa: F401
