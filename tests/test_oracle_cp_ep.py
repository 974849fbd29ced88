"""Context- and expert-parallel layouts against the fake-tensor oracle (calibration/data/oracle_grid.json,
traced on a fake process group of the plan's world size): the planner within 3 % of the traced peak,
and the pieces the oracle adds for them (calibration/ring_attention.py, expert sharding)."""

import pytest

from calibration.oracle_check import TOLERANCE, compare_point
from calibration.oracle_grid import load_grid

POINTS = [p for p in load_grid()["points"] if p["config"].get("cp", 1) > 1 or p["config"].get("ep", 1) > 1]


def test_the_grid_holds_cp_ep_and_their_combinations():
    configs = [p["config"] for p in POINTS]
    assert {c.get("cp", 1) for c in configs} >= {1, 2, 4} and {c.get("ep", 1) for c in configs} >= {1, 2, 4}
    assert any(c.get("cp", 1) > 1 and c.get("ep", 1) > 1 for c in configs)
    assert any(c.get("cp", 1) > 1 and c["tp"] > 1 for c in configs)
    assert any(c.get("cp", 1) > 1 and c["recompute"] == "none" for c in configs)


@pytest.mark.parametrize("point", POINTS, ids=[p["name"] for p in POINTS])
def test_cp_and_ep_layouts_predicted_within_3_percent_of_the_oracle(point):
    row = compare_point(point)
    assert abs(row.error) <= TOLERANCE, f"{row.error:+.2%}"
    assert all(abs(e) <= TOLERANCE for e in row.category_errors().values()), row.category_errors()


def test_ring_attention_stand_in_computes_the_local_attention_and_its_gradients():
    """The stand-in only adds the ring's buffers: outputs and gradients are the local flash kernel's."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from calibration.ring_attention import RingAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 16, 8, requires_grad=True) for h in (4, 2, 2))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with RingAttention(cp=4):
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert got.grad_fn is not None and "RingSDPA" in type(got.grad_fn).__name__
    got.sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    assert all(torch.allclose(t.grad, g, atol=1e-5) for t, g in zip((q, k, v), grads))
    with RingAttention(cp=4), pytest.raises(RuntimeError, match="without a mask"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(16, 16, dtype=torch.bool))


def test_expert_parallel_rank_holds_its_share_of_the_routed_experts():
    pytest.importorskip("transformers")
    from calibration.fake_model import hf_config
    from planner.api import Request, resolve

    r = resolve(Request(model="mixtral-8x7b", gpu="h100-sxm-80gb", gpus=8, seq_len=1024, global_batch=8))
    assert hf_config(r.spec, r.workload, 2).num_local_experts == 8
    config = hf_config(r.spec, r.workload, 2, ep=4)
    assert config.num_local_experts == 2 and config.num_experts_per_tok == 2  # divided once (num_experts aliases it)
