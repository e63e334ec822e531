"""attnkit: hand-written CUDA kernels for efficient attention, as torch ops with autograd.

Ops live in ``torch.ops.attnkit``; the checked public functions are re-exported here.
"""

from importlib import metadata as _metadata

import torch  # noqa: F401  (load torch's libraries before our extension)

from . import _C  # noqa: F401  (registers torch.ops.attnkit.*)
from . import _meta  # noqa: F401  (fake/meta implementations)
from . import _autograd  # noqa: F401  (autograd formulas)
from . import nn  # noqa: F401  (attnkit.nn modules)
from .ops import sparse_query_attention
from .ops import (  # routing attention
    kmeans_assign,
    kmeans_ema_update_,
    kmeans_init,
    routing_assign,
    routing_attention,
    routing_commitment_loss,
)
from .ops import DynamicMask, dynamic_mask_attention, dynamic_mask_select, masked_bias_attention  # DMA
from .ops import lightning_attention, lightning_attention_decode, lightning_slopes  # lightning attention

try:
    __version__ = _metadata.version("attnkit")
except _metadata.PackageNotFoundError:  # running from a source tree (make dev)
    __version__ = "0.0.0+dev"

__all__ = [
    "sparse_query_attention",
    "routing_assign",
    "routing_attention",
    "kmeans_assign",
    "kmeans_ema_update_",
    "kmeans_init",
    "routing_commitment_loss",
    "nn",
    "__version__",
]
__all__ += ["DynamicMask", "dynamic_mask_attention", "dynamic_mask_select", "masked_bias_attention"]  # DMA
__all__ += ["lightning_attention", "lightning_attention_decode", "lightning_slopes"]  # lightning attention
