"""Nemotron 3's latent MoE (moe_latent_size): the routed experts run at the latent width between
fc1_latent_proj and fc2_latent_proj (transformers modeling_nemotron_h.py NemotronHMoE), and the
expert-parallel all-to-all moves latent-wide tokens."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from planner.api import Request, resolve
from planner.cost import cpep
from planner.cost.candidates import Candidates
from planner.graph import build_graph
from planner.layout import ParallelConfig
from planner.models import spec_from_hf_config
from planner.ops import Numerics
from planner.specs import Workload

HIDDEN, LATENT, MOE_I, TOP_K, EXPERTS = 256, 64, 96, 2, 8
CONFIG = {"model_type": "nemotron_h", "hidden_size": HIDDEN, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 64, "vocab_size": 128, "hybrid_override_pattern": "M*E", "mamba_num_heads": 8,
          "mamba_head_dim": 32, "ssm_state_size": 16, "n_groups": 2, "n_routed_experts": EXPERTS,
          "num_experts_per_tok": TOP_K, "moe_intermediate_size": MOE_I, "moe_shared_expert_intermediate_size": 128,
          "intermediate_size": 128, "moe_latent_size": LATENT}


def moe_ops(spec) -> dict:
    graph = build_graph(spec, Workload(seq_len=1, global_batch=1), Numerics(2, 2, False))
    ops = next(ops for ops, _ in graph.kind_ops() if any(op.name == "experts" for op in ops))
    return {op.name: op for op in ops}


def test_latent_expert_flops_are_k_up_and_down_at_the_latent_plus_the_two_projections():
    spec = spec_from_hf_config(CONFIG, name="latent")
    ops = moe_ops(spec)
    # relu2 experts: up (latent -> I) and down (I -> latent), 2 FLOPs per multiply-add, for each of the k copies
    assert ops["experts"].flops_per_token == TOP_K * 2 * 2 * LATENT * MOE_I
    assert ops["experts"].params == EXPERTS * 2 * LATENT * MOE_I
    assert ops["fc1_latent_proj"].flops_per_token + ops["fc2_latent_proj"].flops_per_token == 2 * 2 * HIDDEN * LATENT
    assert ops["fc1_latent_proj"].gemm == (HIDDEN, LATENT) and ops["fc2_latent_proj"].gemm == (LATENT, HIDDEN)
    # the router and the shared expert still read the hidden states: unchanged by the latent
    plain = moe_ops(replace(spec, moe_latent_size=0))
    assert "fc1_latent_proj" not in plain and plain["experts"].flops_per_token == TOP_K * 2 * 2 * HIDDEN * MOE_I
    for name in ("router", "shared_up_proj", "shared_down_proj"):
        assert ops[name].flops_per_token == plain[name].flops_per_token
    # the tokens the experts keep (the gathered input, the down output) are latent-wide
    saved = {t.key: t.bytes_per_token for t in ops["experts"].saved}
    plain_saved = {t.key: t.bytes_per_token for t in plain["experts"].saved}
    assert saved["experts.in"] == plain_saved["experts.in"] * LATENT / HIDDEN


def ep_context(spec):
    request = Request(model=spec, gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=64, target="megatron")
    return resolve(request).context


def test_ep_traffic_scales_with_latent_over_hidden(monkeypatch):
    spec = spec_from_hf_config(CONFIG, name="latent")
    c = Candidates.from_configs([ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=8, ep=8,
                                                zero=1)])
    latent_ctx, hidden_ctx = ep_context(spec), ep_context(replace(spec, moe_latent_size=0))
    real = [cpep.ep_seconds(ctx, ctx.regime(False), c)[0] for ctx in (latent_ctx, hidden_ctx)]
    assert 0 < real[0] < real[1]
    # with a link time linear in the bytes (no latency), the whole exchange scales as latent / hidden
    moved = []
    monkeypatch.setattr(cpep, "all_to_all_seconds", lambda ctx, nbytes, ep, tp: moved.append(nbytes) or nbytes / 1e11)
    linear = [cpep.ep_seconds(ctx, ctx.regime(False), c)[0] for ctx in (latent_ctx, hidden_ctx)]
    assert linear[0] == pytest.approx(linear[1] * LATENT / HIDDEN, rel=1e-12)
    assert np.asarray(moved[0]) == pytest.approx(np.asarray(moved[1]) * LATENT / HIDDEN, rel=1e-12)


def test_relu2_experts_keep_relu_output_and_square_not_a_gate_up_triple():
    """Non-gated experts (transformers integrations/moe.py grouped_mm_experts_forward, has_gate=False):
    relu keeps its result and torch.square its input, the same tensor; the second grouped_mm keeps the
    square; up's output is kept by nothing. Gated experts keep gate_up (2 I), act and the product."""
    spec = replace(spec_from_hf_config(CONFIG, name="latent"), moe_latent_size=0)
    c = 2

    def intermediate(ops):
        return sum(t.bytes_per_token for t in ops["experts"].saved
                   if t.key not in ("experts.index", "experts.in", "experts.down_out"))

    plain, gated = moe_ops(spec), moe_ops(replace(spec, gated_mlp=True))
    assert intermediate(plain) == TOP_K * 2 * c * MOE_I
    assert intermediate(gated) == TOP_K * 4 * c * MOE_I
    assert {t.key for t in plain["experts"].saved} >= {"experts.relu", "experts.prod"}
    assert "experts.gate_up" not in {t.key for t in plain["experts"].saved}
    # the memory-bound passes: one intermediate write and read fewer (6 I against 8 I)
    assert gated["experts"].io_bytes_per_token - plain["experts"].io_bytes_per_token == TOP_K * 2 * c * MOE_I
