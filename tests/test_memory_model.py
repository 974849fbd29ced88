"""The memory model per category against hand-derived values from cited formulas."""

from dataclasses import replace

import pytest

from planner.api import Request, predict
from planner.cost.summary import summarize
from planner.graph import build_graph, count_params, numerics_for
from planner.models import load_model
from planner.plan import ParallelConfig
from planner.specs import Workload

LLAMA8B = count_params(load_model("llama3-8b"))


def config(dp=1, tp=1, pp=1, mbs=1, m=1, **kw):
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs, num_micro_batches=m, **kw)


def state_bytes(p):
    b = p["memory"]["breakdown"]
    return b["params"] + b["grads"] + b["optimizer"]


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stages_shard_the_16_bytes_per_parameter(zero):
    """ZeRO (Rajbhandari et al. 2020 §3.1): mixed-precision Adam needs 2+2+12 = 16 bytes per
    parameter. PyTorch keeps fp32 params (4), fp32 grads (4) and two fp32 moments (8): the same
    16. Stage 1 shards the moments, 2 and 3 (FSDP2) shard all of it. With two micro-batches the
    gradients are held at both candidate peaks, so the three categories are comparable."""
    n = 8
    request = Request(model="llama3-8b", gpu="h200-141gb", gpus=n, seq_len=16, global_batch=2 * n,
                      optimizer_impl="fused")
    p = predict(request, config(dp=n, m=2, zero=zero))
    expected = {0: 16 * LLAMA8B, 1: 8 * LLAMA8B + 8 * LLAMA8B / n, 2: 16 * LLAMA8B / n, 3: 16 * LLAMA8B / n}[zero]
    assert state_bytes(p) == pytest.approx(expected, rel=1e-6)
    if zero == 2:
        # FSDP2 without resharding after forward: when the forward ends every layer is still gathered in
        # bf16, where ZeRO 3 keeps only the root module and the layer prefetched for the backward
        zero3 = predict(request, config(dp=n, m=2, zero=3))
        spec = load_model("llama3-8b")
        per_layer = (LLAMA8B - 2 * spec.vocab_size * spec.hidden_size - spec.hidden_size) / spec.num_layers
        extra = p["memory"]["moments"]["forward head"] - zero3["memory"]["moments"]["forward head"]
        assert extra == pytest.approx(2 * (spec.num_layers - 1) * per_layer, rel=1e-6)


def test_foreach_adamw_adds_one_fp32_copy_of_the_parameters():
    """torch.optim.AdamW(foreach=True): _multi_tensor_adam allocates sqrt(exp_avg_sq) for every
    parameter at once (TORCH-NOTES: +13 GiB on 8B bf16 = exactly one param-sized list)."""
    base = Request(model="llama3-8b", gpu="h200-141gb", gpus=1, seq_len=16, global_batch=1)
    fused = predict(Request(**{**base.__dict__, "optimizer_impl": "fused"}), config())
    foreach = predict(base, config())
    assert foreach["memory"]["breakdown"]["optimizer"] - fused["memory"]["breakdown"]["optimizer"] == pytest.approx(4 * LLAMA8B)


def gpt_layer_saved(tp=1, sp=False, recompute="none"):
    # Megatron's GPT uses the exact GeLU (one saved tensor); gpt2's gelu_new keeps four
    spec = replace(load_model("gpt2-xl"), activation="gelu")
    workload = Workload(seq_len=1024, global_batch=1, attention="eager", precision="fp16")
    numerics = numerics_for(workload, params_sharded=True)  # parameters in fp16: no autocast casts
    layer, _, _ = summarize(build_graph(spec, workload, numerics))
    return spec, layer.saved[recompute]


@pytest.mark.parametrize("tp,sp", [(1, False), (4, False), (4, True)])
def test_gpt_layer_activations_match_korthikanti(tp, sp):
    """Korthikanti et al. 2022 (arXiv 2205.05198) Eq. 1-3: a GPT layer keeps
    s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes with TP (34/t + 5as/ht with sequence parallelism).
    transformers' eager GPT-2 attention adds what Megatron fuses away: the fp32 softmax output
    (4·a·s²·b) and LayerNorm's fp32 mean/rstd (2 x 8 bytes per token)."""
    spec, saved = gpt_layer_saved(tp, sp)
    s, b, h, a = 1024, 2, spec.hidden_size, spec.num_heads
    ours = saved.evaluate(s * b, s, tp, tp if sp else 1)
    korthikanti = s * b * h * ((10 / (tp if sp else 1)) + 24 / tp + 5 * a * s / (h * tp))
    hf_extras = 4 * a * s * s * b / tp + 16 * s * b / (tp if sp else 1)
    assert ours == pytest.approx(korthikanti + hf_extras)


def test_full_recompute_keeps_the_layer_input():
    """Korthikanti et al. 2022 §4.2: with full recomputation a layer keeps only its input, 2sbh."""
    spec, saved = gpt_layer_saved(recompute="full")
    s, b = 1024, 2
    assert saved.evaluate(s * b, s, 1, 1) == 2 * s * b * spec.hidden_size


def test_logits_and_loss_on_the_last_stage_only():
    """transformers ForCausalLMLoss: 12 bytes per vocabulary entry per token at the start of
    backward (fp32 log_softmax output, its incoming and outgoing gradients), sharded by TP."""
    request = Request(model="llama3-8b", gpu="h200-141gb", gpus=8, seq_len=4096, global_batch=8,
                      optimizer_impl="fused")
    p = predict(request, config(dp=2, tp=2, pp=2, m=4))
    vocab = load_model("llama3-8b").vocab_size
    assert p["memory"]["peak_phase"] == "forward-backward"
    assert p["memory"]["breakdown"]["logits"] in (0, pytest.approx(12 * vocab * 4096 / 2))


def test_one_f_one_b_keeps_p_micro_batches_on_the_first_stage():
    """PipeDream-Flush / 1F1B: stage i holds min(m, p - i) micro-batches of activations; the
    interleaved schedule multiplies the first stage's by 1 + (p-1)/(p·v) (Korthikanti §4.2.3)."""
    from planner.cost.candidates import Candidates
    from planner.cost.context import stage_layout
    c = Candidates.from_configs([config(dp=1, pp=4, m=16), config(dp=1, pp=4, m=2), config(pp=4, m=16, vpp=2)])
    layout = stage_layout(32, c)
    assert list(layout.in_flight["first"]) == [4 * 8, 2 * 8, pytest.approx(32 * (1 + 3 / 8))]
    assert list(layout.in_flight["last"])[:2] == [8, 8]


def test_lora_freezes_the_base_in_bf16():
    request = Request(model="llama3-8b", gpu="h200-141gb", gpus=1, seq_len=16, global_batch=1, method="lora",
                      lora_rank=16, lora_targets=("q", "v"), optimizer_impl="fused")
    p = predict(request, config())
    spec = load_model("llama3-8b")
    adapters = spec.num_layers * 16 * ((spec.hidden_size + spec.q_dim) + (spec.hidden_size + spec.kv_dim))
    b = p["memory"]["breakdown"]
    assert b["grads"] in (0, pytest.approx(4 * adapters))
    assert b["params"] == pytest.approx(2 * LLAMA8B + 4 * adapters)


def test_qlora_stores_base_linears_in_nf4():
    """QLoRA (Dettmers et al. 2023 §3): 4-bit NormalFloat with double-quantised constants costs
    0.5 + 0.127/8 bytes per parameter; embeddings, norms and the head stay bf16."""
    spec = load_model("llama3-8b")
    request = Request(model="llama3-8b", gpu="h200-141gb", gpus=1, seq_len=16, global_batch=1, method="qlora",
                      lora_rank=8, lora_targets=("q",), optimizer_impl="fused")
    p = predict(request, config())
    norms = spec.num_layers * 2 * spec.hidden_size + spec.hidden_size
    embed_head = 2 * spec.vocab_size * spec.hidden_size
    linears = LLAMA8B - norms - embed_head
    adapters = spec.num_layers * 8 * (spec.hidden_size + spec.q_dim)
    expected = linears * (0.5 + 0.127 / 8) + 2 * (norms + embed_head) + 4 * adapters
    assert p["memory"]["breakdown"]["params"] == pytest.approx(expected)


def test_tensor_parallel_shards_linears_not_norms():
    spec = load_model("llama3-8b")
    base = Request(model="llama3-8b", gpu="h200-141gb", gpus=4, seq_len=16, global_batch=1, optimizer_impl="fused")
    p = predict(base, config(tp=4))
    norms = spec.num_layers * 2 * spec.hidden_size + spec.hidden_size
    assert p["memory"]["breakdown"]["params"] == pytest.approx(4 * ((LLAMA8B - norms) / 4 + norms))
