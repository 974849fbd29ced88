"""Expert parallelism in the executor (executor/expert_parallel.py): a tiny MoE planned with
`planner predict --dp 2 --ep 2 --save-plan` trains 20 steps under torchrun on CPU (gloo
all-to-alls) with the single-process run's losses and gradient norms, for each family the
capability table lets the executor run with ep > 1 (planner/capabilities.py EXECUTOR_EP_FAMILIES)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.executor.conftest import SEQ_LEN, metrics, model_argument, plan_and_train

STEPS = 20
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=320, max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0,
             bos_token_id=1, eos_token_id=2, num_experts_per_tok=2)
# 4 routed experts top-2 per token; "tiny-moe-shared" (catalog) adds a dense first layer and a shared expert
MODELS = {
    "mixtral": {"model_type": "mixtral", **SMALL, "intermediate_size": 64, "num_local_experts": 4},
    "qwen3_moe": {"model_type": "qwen3_moe", **SMALL, "moe_intermediate_size": 32, "num_experts": 4,
                  "norm_topk_prob": True},
    "qwen2_moe": "tiny-moe-shared",
    # multi-head latent attention, group-limited routing, a dense first layer and a shared expert
    "deepseek_v3": {"model_type": "deepseek_v3", **{k: v for k, v in SMALL.items() if k != "head_dim"},
                    "num_key_value_heads": 4, "moe_intermediate_size": 32,
                    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "n_group": 1, "topk_group": 1},
    # experts with biases (sharded with them), attention sinks (eager attention), sliding layers
    "gpt_oss": {"model_type": "gpt_oss", **SMALL, "intermediate_size": 32, "num_local_experts": 4, "sliding_window": 32,
                "layer_types": ["sliding_attention", "full_attention"]},
}
ATTENTION = {"gpt_oss": "eager"}  # transformers has no sdpa path for gpt_oss (planner/capabilities.py)


def _model(family: str, folder: Path) -> str:
    return model_argument(MODELS, family, folder)


def _run(folder: Path, model: str, gpus: int, *options: str) -> Path:
    return plan_and_train(folder, model, gpus, STEPS, *options)


def _assert_same_run(got: Path, reference: Path) -> None:
    """Per step, as tests/executor/test_family_tp.py compares: in fp32 the all-to-all dispatch only
    reorders the experts' sums (~5e-7 in the loss, ~5e-7 relative in the gradient norm)."""
    rows, reference_rows = metrics(got), metrics(reference)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert rows[STEPS]["loss"] < rows[1]["loss"] - 0.5, "the loss did not fall"
    for step in range(1, STEPS + 1):
        assert abs(rows[step]["loss"] - reference_rows[step]["loss"]) < 1e-5, step
        assert rows[step]["grad_norm"] == pytest.approx(reference_rows[step]["grad_norm"], rel=1e-4), step


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MODELS))
def test_expert_parallel_matches_single_process(family, tmp_path):
    model, attention = _model(family, tmp_path), ("--attention", ATTENTION.get(family, "sdpa"))
    reference = _run(tmp_path / "single", model, 1, "--micro-batch-size", "4", *attention)
    experts = _run(tmp_path / "ep", model, 2, "--dp", "2", "--ep", "2", "--zero", "0", "--micro-batch-size", "4",
                   *attention)
    _assert_same_run(experts, reference)
    summary = json.loads((experts / "summary.json").read_text())
    assert (summary["plan"]["config"]["ep"], summary["environment"]["world_size"]) == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("dp, zero, micro_batch_size", [(4, 0, 1), (4, 2, 1), (2, 3, 2)],
                         ids=["ddp-edp2", "fsdp-edp2", "fsdp-edp1"])
def test_expert_data_parallel_matches_single_process(dp, zero, micro_batch_size, tmp_path):
    """dp 4 = 2 expert-data-parallel replicas x ep 2: the expert gradients are reduced over the
    replicas only (by hand after DDP, or by FSDP2 on the edp mesh), the dense ones over all of dp;
    every case accumulates 2 micro-batches per step."""
    model = _model("mixtral", tmp_path)
    reference = _run(tmp_path / "single", model, 1, "--micro-batch-size", "4")
    experts = _run(tmp_path / "ep", model, dp, "--dp", str(dp), "--ep", "2", "--zero", str(zero),
                   "--micro-batch-size", str(micro_batch_size))
    _assert_same_run(experts, reference)


@pytest.mark.parametrize("family", list(MODELS))
def test_each_moe_layer_has_its_experts_in_the_plan(family, tmp_path):
    """The expanded ep plan names every MoE layer's experts module and its weights (and biases),
    stacked by expert, and no dense layer (tiny-moe-shared's and the DeepSeek's first are dense)."""
    from transformers import AutoModelForCausalLM

    from executor.expert_parallel import DISPATCH_STYLE, expert_plan
    from executor.model import hf_config
    from planner.models import load_model
    from planner.specs import Workload

    spec = load_model(_model(family, tmp_path))
    model = AutoModelForCausalLM.from_config(hf_config(spec, Workload(seq_len=SEQ_LEN, global_batch=8)))
    plan = expert_plan(model)
    modules = [name for name, style in plan.items() if style == DISPATCH_STYLE]
    expected = [name for name, module in model.named_modules() if name.endswith("mlp.experts")]
    assert modules == expected and len(modules) == sum(spec.layer_kind(i).mlp == "sparse" for i in range(spec.num_layers))
    for name in modules:
        weights = [n for n in plan if n.startswith(f"{name}.")]
        assert weights and {model.get_parameter(n).shape[0] for n in weights} == {spec.num_experts}  # Shard(0)
    assert list(plan.values()).index(DISPATCH_STYLE) == len(plan) - len(modules)  # weights before hooks


@pytest.mark.parametrize("model, config, refused", [
    ("tiny-moe-shared", {"dp": 2, "ep": 2}, None),
    ("tiny-moe-shared", {"dp": 2, "ep": 2, "zero": 3}, None),
    ("mixtral-8x7b", {"dp": 2, "ep": 2}, None),
    ("qwen3-30b-a3b", {"dp": 2, "ep": 2, "zero": 2}, None),
    ("tiny-moe-shared", {"dp": 2, "ep": 2, "zero": 1}, "ZeRO 0, 2 or 3"),
    ("mixtral-8x7b", {"dp": 2, "ep": 2, "tp": 2}, "executor's tp runs"),
    ("qwen3-next-80b-a3b", {"dp": 2, "ep": 2}, "expert parallelism runs mixtral"),
])
def test_capability_table_says_where_the_executor_runs_ep(model, config, refused):
    from planner.capabilities import runnable_reason
    from planner.layout import ParallelConfig
    from planner.models import load_model
    from planner.specs import Workload

    config = dict(config)
    dp, tp = config.pop("dp"), config.pop("tp", 1)
    parallel = ParallelConfig(dp=dp, tp=tp, pp=1, micro_batch_size=1, num_micro_batches=8 // dp, **config)
    reason = runnable_reason("executor", parallel, load_model(model), Workload(seq_len=SEQ_LEN, global_batch=8),
                             gpu=False)
    assert reason is None if refused is None else refused in reason, reason


def _one_step_on_two_ranks(rank: int, port: int, config_json: str, results: dict) -> None:
    """Rank `rank` of 2 (gloo): the tiny Mixtral with ep 2 over dp 2 runs its half of a batch;
    the same model unsharded runs the whole batch in this process as the reference."""
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from executor.expert_parallel import apply_expert_parallel
    from planner.layout import ParallelConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    values = json.loads(config_json)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    reference, model = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(3, config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    reference(input_ids=ids, labels=ids).loss.backward()
    experts = apply_expert_parallel(model, ParallelConfig(dp=2, tp=1, pp=1, ep=2, micro_batch_size=2,
                                                          num_micro_batches=1), torch.device("cpu"))
    mine = ids[2 * rank:2 * rank + 2]
    items = torch.tensor(ids[:, 1:].numel() / 2)  # executor/loss.py items_per_rank
    model(input_ids=mine, labels=mine, num_items_in_batch=items).loss.backward()
    experts.reduce_gradients()
    gate = model.model.layers[0].mlp.gate.weight.grad.clone()
    dist.all_reduce(gate)  # what DDP does for a dense gradient: the mean over dp
    local = model.model.layers[0].mlp.experts.gate_up_proj.grad.to_local()
    whole = reference.model.layers[0].mlp.experts.gate_up_proj.grad
    results[rank] = {"experts": (local - whole[2 * rank:2 * rank + 2]).abs().max().item(),
                     "gate": (gate / 2 - reference.model.layers[0].mlp.gate.weight.grad).abs().max().item(),
                     "local_experts": local.shape[0], "scale": whole.abs().max().item()}
    dist.destroy_process_group()


def test_all_to_all_dispatch_gives_the_whole_batch_gradients():
    """Two gloo ranks (all_to_all_single on CPU): each holds 2 of the 4 experts, and its expert
    gradients (reduced over edp, divided by dp) and the router's (averaged over dp) are the
    single-process gradients of the whole batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_one_step_on_two_ranks, args=(port, json.dumps(MODELS["mixtral"]), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank]["local_experts"] == 2
        assert results[rank]["scale"] > 1e-4
        assert results[rank]["experts"] < 1e-6 and results[rank]["gate"] < 1e-6, results[rank]
