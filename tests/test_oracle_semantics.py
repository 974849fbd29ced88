"""The oracle applies the executor's semantics (calibration/oracle.py): checked on a small Llama
against bytes derived by hand from the PyTorch code the semantics name."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402

from calibration.cuda_behaviour import CudaBehaviour  # noqa: E402
from calibration.oracle import _check_attention_kernel, check_traceable, trace_layers, uses_autocast  # noqa: E402
from planner.errors import InvalidRequest  # noqa: E402
from planner.graph import count_params  # noqa: E402
from planner.models import load_model, spec_from_hf_config  # noqa: E402
from planner.plan import ParallelConfig  # noqa: E402
from planner.specs import Workload  # noqa: E402

SMALL = spec_from_hf_config({"model_type": "llama", "hidden_size": 128, "intermediate_size": 344,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                             "vocab_size": 512, "max_position_embeddings": 1024}, name="small-llama")
N = count_params(SMALL)
PARAM_TENSORS = 2 * 9 + 3  # per layer: 7 linears + 2 norms; embedding, final norm, head
LINEAR_WEIGHTS = 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344) + 512 * 128  # layers' linears + LM head


def run(workload_options=None, **config_options):
    config = ParallelConfig(**{"dp": 1, "tp": 1, "pp": 1, "micro_batch_size": 1, "num_micro_batches": 1,
                               **config_options})
    workload = Workload(seq_len=64, global_batch=config.dp * config.num_micro_batches, **(workload_options or {}))
    return trace_layers(SMALL, workload, config, SMALL.num_layers).phases


def test_foreach_adamw_step_holds_states_and_one_param_sized_temporary():
    """Steady state: fp32 params (4 B), grads (4 B), exp_avg + exp_avg_sq (8 B) and a 0-dim fp32
    `step` per tensor exist before the step; _multi_tensor_adam's torch._foreach_sqrt(exp_avg_sqs)
    adds one fp32 copy of all parameters (torch/optim/adam.py)."""
    step = run({"precision": "fp32"})["optimizer-step"]["categories"]
    assert step["Parameter"] == 4 * N
    assert step["Gradient"] == 4 * N
    assert step["Optstate"] == 8 * N + 4 * PARAM_TENSORS
    assert step["Optimizer temp"] == 4 * N


def test_fused_adamw_has_no_temporaries():
    step = run({"precision": "fp32", "optimizer_impl": "fused"})["optimizer-step"]["categories"]
    assert "Optimizer temp" not in step


def test_autocast_caches_a_bf16_copy_of_every_linear_weight():
    """torch.autocast caches each weight's bf16 cast for the whole forward (autocast_mode.cpp,
    cached_cast); at the LM head every linear's copy is alive, the embedding's never is."""
    forward_head = run()["forward head"]["categories"]
    assert forward_head["Param copy"] == 2 * LINEAR_WEIGHTS


def test_lora_base_is_frozen_in_bf16_and_only_adapters_train():
    """peft LoRA r=8 on q and v: A is r x in, B is out x r, upcast to fp32 (autocast_adapter_dtype)."""
    adapters = 2 * 8 * ((128 + 128) + (128 + 64))
    step = run({"method": "lora", "lora_rank": 8, "lora_targets": ("q", "v")})["optimizer-step"]["categories"]
    assert step["Parameter"] == 2 * N + 4 * adapters
    assert step["Gradient"] == 4 * adapters
    assert step["Optimizer temp"] == 4 * adapters


def test_fsdp_shards_fp32_parameters_over_the_data_parallel_ranks():
    """fully_shard on 4 fake ranks: each rank keeps a quarter of every fp32 parameter (all dims
    here divide by 4, so no padding), and a quarter of grads and states."""
    step = run(dp=4, zero=3)["optimizer-step"]["categories"]
    assert step["Sharded Param"] == N
    assert step["Sharded Grad"] == N


def test_gradients_are_held_while_micro_batches_accumulate():
    held = run(num_micro_batches=2)["forward layer:first"]["categories"]
    fresh = run()["forward layer:first"]["categories"]
    assert held["Gradient"] == 4 * N
    assert "Gradient" not in fresh


def test_cuda_fp32_policy_upcasts_pow_under_autocast_only():
    """CUDA autocast runs pow in fp32 (autocast_mode.cpp fp32 list); CPU autocast does not."""
    x = torch.ones(4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.pow(x, 3.0).dtype == torch.bfloat16
        with CudaBehaviour():
            assert torch.pow(x, 3.0).dtype == torch.float32
            assert torch.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16
    with CudaBehaviour():
        assert torch.pow(x, 3.0).dtype == torch.bfloat16


def test_dropout_keeps_a_boolean_mask_as_the_fused_cuda_kernel_does():
    """CPU F.dropout multiplies by a noise tensor in the input's dtype and keeps it; CUDA's fused
    native_dropout keeps a one-byte mask (aten/src/ATen/native/Dropout.cpp)."""
    x = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    with CudaBehaviour():
        y = torch.nn.functional.dropout(x, 0.1, training=True)
    assert type(y.grad_fn).__name__ == "NativeDropoutBackward0"
    assert y.grad_fn._saved_result1.dtype == torch.bool


FLASH = "aten._scaled_dot_product_flash_attention_for_cpu.default"


@pytest.mark.parametrize("ops, calls", [
    (["aten._scaled_dot_product_attention_math.default"], {(4, 2, False)}),  # the math kernel
    ([FLASH], {(4, 4, True)}),  # a materialised causal mask, k and v repeated per head
])
def test_a_trace_unlike_the_gpu_flash_kernel_is_refused(ops, calls):
    workload = Workload(seq_len=64, global_batch=1)
    config = ParallelConfig(1, 1, 1, 1, 1)
    _check_attention_kernel([FLASH], {(4, 2, False)}, SMALL, workload, config)  # the GPU's way passes
    with pytest.raises(RuntimeError, match="flash kernel"):
        _check_attention_kernel(ops, calls, SMALL, workload, config)


@pytest.mark.parametrize("options, config, fragment", [
    ({}, {"pp": 2}, "pipeline"),
    ({}, {"dp": 2, "zero": 0}, "without FSDP"),
    ({"activation_offload": True}, {}, "activation offload"),
    ({"method": "qlora"}, {}, "QLoRA"),
    ({"optimizer": "adamw8bit"}, {}, "8-bit"),
])
def test_what_the_oracle_cannot_trace_is_named(options, config, fragment):
    full = {"dp": 1, "tp": 1, "pp": 1, "micro_batch_size": 1, "num_micro_batches": 1, **config}
    workload = Workload(seq_len=64, global_batch=full["dp"], **options)
    with pytest.raises(InvalidRequest, match=fragment):
        check_traceable(load_model("llama3-8b"), workload, ParallelConfig(**full))


@pytest.mark.parametrize("workload, config, expected", [
    ({}, {}, True),  # one device: autocast over fp32 weights
    ({}, {"dp": 8, "zero": 3}, False),  # FSDP2 casts by its MixedPrecisionPolicy
    ({"method": "lora"}, {}, True),  # LoRA: autocast over the bf16 base and fp32 adapters
    ({"precision": "fp32"}, {}, False),
    ({"master_dtype": "bf16"}, {}, False),
])
def test_autocast_follows_the_executor(workload, config, expected):
    """executor/train.py _forward_context."""
    full = {"dp": 1, "tp": 1, "pp": 1, "micro_batch_size": 1, "num_micro_batches": 1, **config}
    assert uses_autocast(Workload(seq_len=64, global_batch=full["dp"], **workload), ParallelConfig(**full)) is expected
