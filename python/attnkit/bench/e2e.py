"""``python -m attnkit.bench.e2e``: tokens/s and peak memory of small Llama-, Doge- and MiniMax-shaped
transformers models (prefill and a full training step), attnkit vs the models' default attention.
See :mod:`attnkit.bench.cases.models`."""

from .cases.models import main

if __name__ == "__main__":
    raise SystemExit(main())
