"""attnkit.nn: attention layers built on attnkit's ops. One module per mechanism."""

from .routing import RoutingAttention

__all__ = ["RoutingAttention"]
