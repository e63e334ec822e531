"""attnkit: hand-written CUDA kernels for efficient attention, as torch ops with autograd.

Ops live in ``torch.ops.attnkit``; the checked public functions are re-exported here, one line per op.
"""

from importlib import metadata as _metadata

import torch  # noqa: F401  (load torch's libraries before our extension)

from . import _C  # noqa: F401  (registers torch.ops.attnkit.*)
from . import nn  # noqa: F401  (attnkit.nn modules)
from .ops.dma import DynamicMask, dynamic_mask_attention, dynamic_mask_select, masked_bias_attention
from .ops.dma_kvcache import dynamic_mask_attention_with_kvcache
from .ops.lightning import lightning_attention, lightning_attention_decode, lightning_slopes
from .ops.moh import mixture_of_heads_attention
from .ops.routing import kmeans_assign, kmeans_ema_update_, kmeans_init, routing_assign, routing_attention, routing_commitment_loss
from .ops.sqa import sparse_query_attention, sparse_query_attention_varlen, sparse_query_attention_with_kvcache

try:
    __version__ = _metadata.version("attnkit")
except _metadata.PackageNotFoundError:  # running from a source tree (make dev)
    __version__ = "0.0.0+dev"

__all__ = [
    "DynamicMask",
    "__version__",
    "dynamic_mask_attention",
    "dynamic_mask_attention_with_kvcache",
    "dynamic_mask_select",
    "kmeans_assign",
    "kmeans_ema_update_",
    "kmeans_init",
    "lightning_attention",
    "lightning_attention_decode",
    "lightning_slopes",
    "masked_bias_attention",
    "mixture_of_heads_attention",
    "nn",
    "routing_assign",
    "routing_attention",
    "routing_commitment_loss",
    "sparse_query_attention",
    "sparse_query_attention_varlen",
    "sparse_query_attention_with_kvcache",
]
