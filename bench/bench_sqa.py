"""Sparse Query Attention on the GPU, side by side with torch SDPA's backends.

bf16, D=128, B*L = 32k tokens, L in {4k, 8k, 16k, 32k}, MHA 16/16 and xSQA 4/4, causal and not,
forward and forward+backward (the cases are ``attnkit.bench.cases.sqa.sqa_perf_cases``). Targets: MHA at
L >= 4k: forward >= 1.0x the fastest SDPA backend, backward >= 0.9x (TFLOP/s, 4*B*H*L^2*D forward,
halved when causal); xSQA at L=32k >= 3.5x faster than MHA.

    pytest bench/bench_sqa.py --benchmark-only --benchmark-group-by=param:case
"""

import pytest

from attnkit.bench.cases import case_params
from attnkit.bench.cases.sqa import sqa_perf_cases

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("case,impl_name", [pytest.param(c, i, id=n) for c, i, n in case_params(sqa_perf_cases())])
def test_sqa(benchmark, run_bench, case, impl_name):
    run_bench(benchmark, case, impl_name)
