"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .lightning import LightningAttention

__all__ = ["LightningAttention"]
