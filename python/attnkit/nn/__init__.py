"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .dma import DynamicMaskAttention
from .lightning import LightningAttention
from .routing import RoutingAttention
from .sqa import SQA_PRESETS, SparseQueryAttention

__all__ = ["DynamicMaskAttention", "LightningAttention", "RoutingAttention", "SQA_PRESETS", "SparseQueryAttention"]
