"""Plain-PyTorch float64 implementations of every attnkit op, written from the papers' formulas and
independent of the kernels: the test oracle and a readable statement of the semantics, not fast paths.
One module per op; every oracle is also importable from ``attnkit.reference``."""

# ruff: noqa: F401

from .dma import dynamic_mask_attention, dynamic_mask_dense, masked_bias_attention
from .dma_kvcache import dma_kvcache_reference
from .lightning import lightning_attention_decode_reference, lightning_attention_reference, lightning_slopes_reference
from .routing import (
    ROUTING_SELF_SCORE,
    kmeans_assign_ref,
    kmeans_ema_update_ref,
    routing_assign_ref,
    routing_attention_ref,
    routing_commitment_loss_ref,
    routing_membership_ref,
    routing_scores_ref,
    routing_topw_ref,
)
from .moh import mixture_of_heads_attention_ref, moh_gate_dense
from .sqa import full_attention_ref, sqa_head_mapping, sqa_kvcache_reference, sqa_reference, sqa_varlen_reference
