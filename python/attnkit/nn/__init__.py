"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .dma import DynamicMaskAttention
from .kv_cache import KVCache
from .lightning import LightningAttention
from .moh import MOH_PRESETS, MoHAttention
from .routing import RoutingAttention
from .sqa import SQA_PRESETS, SparseQueryAttention

__all__ = [
    "DynamicMaskAttention",
    "KVCache",
    "LightningAttention",
    "MOH_PRESETS",
    "MoHAttention",
    "RoutingAttention",
    "SQA_PRESETS",
    "SparseQueryAttention",
]
