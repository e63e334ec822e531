"""Bridges from attnkit's ops to other libraries.

Each bridge is its own submodule and imports its library only when it is imported itself, so
``import attnkit`` never pulls in an optional dependency:

- :mod:`attnkit.integrations.transformers`: Hugging Face transformers 5.x (an ``"attnkit"``
  attention implementation, and :func:`~attnkit.integrations.transformers.patch` for Doge and MiniMax).
"""
