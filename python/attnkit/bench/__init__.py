"""attnkit's microbenchmark suite: ``python -m attnkit.bench`` (also ``attnkit-bench``).

``cases`` holds the case registry shared by the CLI and the pytest-benchmark files in ``bench/``;
``runner`` the correctness gate and timing; ``report`` the tables, results.json and --compare;
``plots`` the PNGs.
"""

from .cases import REGISTRY, Case, Impl, SuiteConfig, available_ops, build_suite  # noqa: F401
