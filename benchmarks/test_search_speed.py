"""Speed targets, measured with pytest-benchmark (run: .venv/bin/python -m pytest benchmarks).

Goals (issue 2): the search for llama3-70b on 64 H100 well under a second; llama3.1-405b on
16,384 devices under 5 s. The whole `planner suggest` process is timed with hyperfine in README.
"""

from planner.api import Request, suggest


def test_search_llama3_70b_64_h100(benchmark):
    request = Request(model="llama3-70b", gpu="h100-sxm-80gb", gpus=64, seq_len=4096, global_batch=512)
    result = benchmark(suggest, request)
    assert result["evaluated"] >= 5000


def test_search_llama31_405b_16384_h100(benchmark):
    request = Request(model="llama3.1-405b", gpu="h100-sxm-80gb", gpus=16384, seq_len=8192, global_batch=16384)
    result = benchmark.pedantic(suggest, args=(request,), rounds=3, iterations=1)
    assert result["feasible"] > 0
