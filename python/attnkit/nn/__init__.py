"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .dma import DynamicMaskAttention
from .kv_cache import KVCache
from .lightning import LightningAttention
from .routing import RoutingAttention
from .sqa import SQA_PRESETS, SparseQueryAttention

__all__ = ["DynamicMaskAttention", "KVCache", "LightningAttention", "RoutingAttention", "SQA_PRESETS", "SparseQueryAttention"]
