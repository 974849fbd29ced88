"""Speed targets of the app (issue 6): a widget change answers in well under a second, so the
uncached work behind one page (search, largest micro-batch and sequence, fewest devices, Plan,
launch line, scaling curve) must too. Run: .venv/bin/python -m pytest benchmarks"""

from planner import views

FIELDS = {"model": "llama3-70b", "gpu": "h100-sxm-80gb", "gpus": 64, "seq_len": 4096, "global_batch": 512,
          "method": "full", "precision": "bf16"}


def test_what_fits_page_llama3_70b_64_h100(benchmark):
    page = benchmark.pedantic(views.what_fits_page, args=(FIELDS,), rounds=5, iterations=1)
    assert page["verdict"].startswith("Fits.")


def test_scaling_curve_llama3_70b_64_h100(benchmark):
    rows = benchmark.pedantic(views.scaling_page, args=(FIELDS, None, 2.0), rounds=5, iterations=1)
    assert rows and rows[-1]["devices"] == 256


def test_capacity_llama3_70b_h100_2e9_tokens(benchmark):
    result = benchmark.pedantic(views.capacity_page, args=(FIELDS, None, 2e9, None, None, None, 1024, False),
                                rounds=3, iterations=1)
    assert result["recommendation"] is not None
