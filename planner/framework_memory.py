"""How each training framework (planner/specs.py FRAMEWORKS) holds memory where it differs from the
executor's FSDP2 / transformers path, which the fake-tensor oracle traces exactly. One table, read
by the graph's numerics (planner/graph.py numerics_for) and the memory model (planner/cost/memory.py);
the executor's row changes nothing.

qlora_fp32_norms — peft's prepare_model_for_kbit_training (peft/utils/other.py 204-209: "cast all
    non INT8 parameters to fp32": every fp16/bf16 parameter that is not a Params4bit) runs for any
    k-bit model that HF Trainer / TRL fine-tunes (trl v0.12.2 sft_trainer.py 250-260). TRL then casts
    the embedding and the LM head back to bf16 under `bf16=True` but keeps every norm in fp32
    (trl/trainer/utils.py 842-849, peft_module_casting_to_bf16). An fp32 norm weight makes the norm's
    output fp32 (transformers LlamaRMSNorm.forward: `self.weight * hidden_states.to(input_dtype)`),
    and bitsandbytes' Linear4bit returns its input's dtype (bitsandbytes/nn/modules.py 626-637:
    `inp_dtype = x.dtype ... matmul_4bit(...).to(inp_dtype)`): the MLP's output and so the residual
    stream are fp32 from the first layer on, and every checkpointed layer input is 4 bytes a value.
    That is the planner's autocast regime (Numerics(compute 2, residual 4, autocast)): linears cast
    their fp32 input to bf16 under the Trainer's autocast (accelerate/accelerator.py 1791-1801).

zero3 — how ZeRO-3 gathers parameters and buffers gradients:
    "layer": FSDP2 (torch fully_shard on each decoder layer, the root holding embedding and head):
        a layer gathered whole, the next one prefetched, its gradients reduce-scattered as a unit.
    "module": DeepSpeed's partitioned parameter coordinator (deepspeed/runtime/zero/
        partitioned_param_coordinator.py fetch_sub_module / release_sub_module): parameters are
        gathered per leaf module as it runs and released after it; the prefetch of upcoming modules
        stops once `prefetch_bucket_size` elements are in flight (it overshoots by at most one
        tensor) or `max_live_parameters` are available; tensors of at most
        `param_persistence_threshold` elements stay gathered for the whole step. Gradients are
        copied, as each is made, into a contiguous bucket of `reduce_bucket_size` elements
        (stage3.py 731-735, allocated once in the compute dtype) and reduce-scattered when it fills;
        a tensor larger than the bucket is reduced on its own.

megatron_mixed_precision — Megatron-Core's mixed precision (Megatron-LM megatron/core/transformer/
    module.py Float16Module: the whole model is cast to bf16/fp16 and runs without autocast, the
    residual stream included; fp32_residual_connection off by default): parameters in the compute
    dtype, their gradients in the DDP's contiguous grad buffer (megatron/core/distributed/
    param_and_grad_buffer.py: `grad_dtype = torch.float if ddp_config.grad_reduce_in_fp32 else
    param_dtype`; DistributedDataParallelConfig.grad_reduce_in_fp32 defaults to False and the
    Megatron-Bridge performance recipes set it False, e.g. scripts/performance/configs/qwen/
    qwen3_llm_pretrain.py set_qwen3_common_configs at commit 97ad8cc6f), and the optimizer's fp32
    main parameters beside its fp32 Adam moments (megatron/core/optimizer/optimizer.py
    Float16OptimizerWithFloat16Params; the distributed optimizer, distrib_optimizer.py, shards main
    parameters and moments over the data-parallel ranks, the experts' over the expert-data-parallel
    ones): 2 + 2 + 12 / dp bytes per parameter instead of the executor's 4 + 4 + 8 / dp.
float8_saves_fp8_inputs — Transformer Engine's fp8 linears (te.Linear, te.LayerNormLinear,
    te.GroupedLinear inside fp8_autocast) quantize their input once and keep that fp8 copy for the
    weight gradient (transformer_engine/pytorch/module/linear.py _Linear.forward: `saved_inputmat`
    is the quantized input when fp8), one byte per element, where torchao's Float8Linear keeps the
    bf16 input.
te_norms — Transformer Engine's RMSNorm / LayerNorm (te.RMSNorm, the norm of te.LayerNormLinear)
    keeps its input and the inverse RMS for backward, not an fp32 copy nor the normalised output
    (transformer_engine/pytorch/ops/basic/rmsnorm.py: `ctx.save_for_backward(x, rstdevs)`): the
    planner's fused-norm kernel.
megatron_moe — Megatron-Core's TEGroupedMLP (Megatron-LM megatron/core/transformer/moe/experts.py
    842-986 at 92c8482e6d, the Megatron-LM of Megatron-Bridge 97ad8cc6f): fc1 over the permuted tokens
    (te.GroupedLinear keeps its input), the routing weights applied inside the fused weighted SwiGLU
    (weighted_bias_swiglu_impl keeps fc1's output and the probabilities), fc2 keeps its input; the
    token dispatcher's unpermute then sums the expert outputs without weights (moe_utils.unpermute
    keeps its index map only), so neither act(gate) nor the experts' outputs are kept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeepSpeedZero3:
    """DeepSpeed's documented ZeRO-3 defaults (deepspeed/runtime/zero/config.py: stage3_prefetch_bucket_size
    5e7, stage3_max_live_parameters 1e9, stage3_param_persistence_threshold 1e5, reduce_bucket_size 5e8,
    contiguous_gradients True), in elements."""

    prefetch_bucket_size: float = 5e7
    max_live_parameters: float = 1e9
    param_persistence_threshold: float = 1e5
    reduce_bucket_size: float = 5e8


@dataclass(frozen=True)
class FrameworkMemory:
    qlora_fp32_norms: bool = False
    zero3: str = "layer"  # "layer" (FSDP2 units) | "module" (DeepSpeed's coordinator)
    deepspeed: DeepSpeedZero3 | None = None
    # the model is transformers' own modeling code (not the framework's reimplementation): its
    # per-family implementation choices hold, e.g. Llama 4's experts run on every token (moe_graph.py)
    transformers_modeling: bool = False
    megatron_mixed_precision: bool = False
    float8_saves_fp8_inputs: bool = False
    te_norms: bool = False
    megatron_moe: bool = False


FRAMEWORK_MEMORY: dict[str, FrameworkMemory] = {
    "executor": FrameworkMemory(transformers_modeling=True),  # builds transformers' classes (executor/model.py)
    "torchtitan": FrameworkMemory(),  # FSDP2 fully_shard per TransformerBlock (parallelize_llama.py apply_fsdp)
    "torchtune": FrameworkMemory(),  # FSDP2; its QLoRA is torchao NF4 without peft's upcast
    "llm-foundry": FrameworkMemory(),  # Composer FSDP (FULL_SHARD per block): the layer units
    # distributed optimizer (ZeRO 1); no ZeRO 3 in the cases; Transformer Engine layers
    "megatron": FrameworkMemory(megatron_mixed_precision=True, float8_saves_fp8_inputs=True, te_norms=True,
                                megatron_moe=True),
    "deepspeed": FrameworkMemory(zero3="module", deepspeed=DeepSpeedZero3()),
    "hf": FrameworkMemory(qlora_fp32_norms=True, transformers_modeling=True),
}


def framework_memory(framework: str) -> FrameworkMemory:
    return FRAMEWORK_MEMORY[framework]
