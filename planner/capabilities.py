"""What each engine can run: one table, read by the search (`suggest --target T` ranks only what T
runs), by the exports (`export --format F` refuses what its engine cannot run) and by the
executor's own checks (STYLE.md lesson 11: a dict per target, not `if target == ...` about).

A rule is a Rule of planner/rules.py: a mask over candidates (numpy arrays or one configuration)
that is True where the engine cannot run the candidate as planned, with what to change. What an
engine runs differently but equivalently (a schedule it names otherwise, recomputation switched on
in training code) is not a rule: the export says it in a note.
"""

from __future__ import annotations

import numpy as np

from planner.errors import InvalidRequest
from planner.layout import OFFLOAD, ParallelConfig
from planner.rules import Rule, first_broken, rule_masks
from planner.cost.candidates import Candidates
from planner.specs import Hardware, ModelSpec, Workload

# families whose transformers modules carry Llama's names (model.layers[i].self_attn.q_proj,
# mlp.gate_proj, ...): the executor's tensor and pipeline parallelism are written against them
EXECUTOR_TP_PP_FAMILIES = ("llama", "mistral", "qwen2")
# transformers has no sdpa attention for these (MptForCausalLM; GptOssForCausalLM's attention sinks;
# DeepseekV4PreTrainedModel: eager only, _supports_sdpa = False): they run with eager attention (or
# flash/flex kernels the executor does not use)
SDPA_LESS_FAMILIES = ("mpt", "gpt_oss", "deepseek_v4")
# families the executor tensor-parallelises with their own transformers plan (config
# base_model_tp_plan: q/k/v and gate/up column-wise, o/down row-wise, per-head q/k norms replicated),
# verified against the single-process loss (tests/executor/test_family_tp.py); no sequence parallelism
EXECUTOR_PLAN_TP_FAMILIES = ("qwen3", "gemma3_text", "gemma2", "smollm3")
# executor/pipeline.py calls each decoder layer as LlamaModel does (one rotary embedding for all
# layers): these families' layers take that call (verified, tests/executor/test_family_tp.py); Gemma's
# per-layer-type rotary embeddings do not
EXECUTOR_PP_FAMILIES = EXECUTOR_TP_PP_FAMILIES + ("qwen3",)
# MoE families the executor runs with expert parallelism through their transformers ep plan
# (experts module `ep_dispatch_experts`, 3-D weights `grouped_gemm`; executor/expert_parallel.py),
# verified against the single-process loss (tests/executor/test_expert_parallel.py)
EXECUTOR_EP_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "gpt_oss")
# torchtitan 0.3.0 ships llama3 model code in these shapes (torchtitan/models/llama3/__init__.py:
# (hidden, layers, heads, kv heads) -> flavor)
TORCHTITAN_LLAMA3_FLAVORS = {(4096, 32, 32, 8): "8B", (8192, 80, 64, 8): "70B", (16384, 126, 128, 8): "405B"}
# Megatron-LM's GPTModel covers decoders with these shapes (--swiglu, --group-query-attention,
# --normalization RMSNorm, --position-embedding-type rope, --num-experts for Mixtral)
MEGATRON_FAMILIES = ("llama", "mistral", "mixtral", "qwen2")

_OPT = OFFLOAD.index("optimizer")


def _common(engine: str) -> tuple[Rule, ...]:
    """Options that only this project's cost model and executor describe."""
    return (
        Rule(f"{engine} has no attention with materialised fused-softmax scores (Megatron-LM's)",
             lambda c, s, w: w.attention == "fused-softmax", fix="--attention sdpa"),
        Rule(f"{engine}'s models do not return fp32 logits", lambda c, s, w: w.fp32_logits, fix="no --fp32-logits"),
        Rule(f"{engine}'s loss is not flash-attn's fused cross-entropy kernel", lambda c, s, w: w.fused_loss,
             fix="no --fused-loss"),
        Rule(f"{engine}'s norms are not torchtitan's fused RMSNorm kernel", lambda c, s, w: w.fused_norm,
             fix="no --fused-norm"),
        Rule(f"{engine} has no optimizer step in backward", lambda c, s, w: w.optimizer_in_backward,
             fix="no --optimizer-in-backward"),
        Rule(f"{engine} does not offload saved activations", lambda c, s, w: w.activation_offload,
             fix="no --activation-offload"),
        Rule(f"{engine} does not shard the embedding and head apart", lambda c, s, w: c.shard_ends,
             fix="no --shard-ends"),
    )


EXECUTOR_RULES: tuple[Rule, ...] = (
    Rule("model_type baichuan needs remote code, which the executor does not run",
         lambda c, s, w: s.family == "baichuan", fix="a llama-family config.json of the same shape"),
    Rule(f"the executor's tp runs llama-like models and {', '.join(EXECUTOR_PLAN_TP_FAMILIES)} (their transformers tp plan)",
         lambda c, s, w: (c.tp > 1) & (s.family not in EXECUTOR_TP_PP_FAMILIES + EXECUTOR_PLAN_TP_FAMILIES),
         fix="--tp 1"),
    Rule(f"the executor's pp calls decoder layers as LlamaModel does: llama-like models and {EXECUTOR_PP_FAMILIES[-1]} only",
         lambda c, s, w: (c.pp > 1) & (s.family not in EXECUTOR_PP_FAMILIES), fix="--pp 1"),
    Rule("the executor's sequence parallelism is written for llama-like models only",
         lambda c, s, w: c.sequence_parallel & (s.family not in EXECUTOR_TP_PP_FAMILIES), fix="no --sequence-parallel"),
    Rule("transformers runs this model type without sdpa attention",
         lambda c, s, w: (s.family in SDPA_LESS_FAMILIES) & (w.attention == "sdpa"), fix="--attention eager"),
    Rule("the executor's pipeline does not split tied embeddings", lambda c, s, w: (c.pp > 1) & s.tie_word_embeddings,
         fix="--pp 1"),
    Rule("the executor has no fp8 training", lambda c, s, w: w.precision == "fp8", fix="--precision bf16"),
    Rule("the executor has no fp16 gradient scaler", lambda c, s, w: w.precision == "fp16", fix="--precision bf16"),
    Rule("the executor gathers the logits (no loss_parallel)", lambda c, s, w: w.loss_parallel & (c.tp > 1),
         fix="no --loss-parallel"),
    Rule("the executor runs transformers' sdpa or eager attention", lambda c, s, w: w.attention == "fused-softmax",
         fix="--attention sdpa"),
    Rule("the executor's transformers models return logits in the compute dtype", lambda c, s, w: w.fp32_logits,
         fix="no --fp32-logits"),
    Rule("the executor's loss is transformers' ForCausalLMLoss, not a fused kernel", lambda c, s, w: w.fused_loss,
         fix="no --fused-loss"),
    Rule("the executor's norms are transformers' (no fused RMSNorm kernel)", lambda c, s, w: w.fused_norm,
         fix="no --fused-norm"),
    Rule("optimizer in backward runs only with dp = pp = 1 and one micro-batch",
         lambda c, s, w: w.optimizer_in_backward & ((c.dp > 1) | (c.pp > 1) | (c.num_micro_batches > 1)),
         fix="no --optimizer-in-backward"),
    # executor/model.py LORA_MODULES name Llama's projections: in DeepSeek-V4 they would catch the shared
    # expert's and the compressors' gate_proj but none of its attention (q_a/q_b/kv/o_a/o_b_proj)
    Rule("the executor's LoRA targets (q_proj ... down_proj) do not name DeepSeek-V4's attention projections",
         lambda c, s, w: (w.method != "full") & (s.family == "deepseek_v4"), fix="--method full"),
    Rule("LoRA/QLoRA with tp or pp is not implemented by the executor",
         lambda c, s, w: (w.method != "full") & ((c.tp > 1) | (c.pp > 1)), fix="--tp 1 --pp 1"),
    Rule("QLoRA under FSDP2 (zero 2/3) is not implemented by the executor",
         lambda c, s, w: (w.method == "qlora") & (c.zero >= 2), fix="--zero 0 or 1"),
    Rule("8-bit AdamW with sharded states is not implemented by the executor",
         lambda c, s, w: (w.optimizer == "adamw8bit") & ((c.zero >= 1) | (c.tp > 1)), fix="--zero 0 --tp 1"),
    Rule("the executor's context parallelism (torch's context_parallel) runs llama-like models with full causal "
         "attention, without pp", lambda c, s, w: (c.cp > 1) & ((s.family not in EXECUTOR_TP_PP_FAMILIES)
                                                              | _windowed(s, w) | (c.pp > 1)), fix="--cp 1"),
    # transformers runs DeepSeek-V3.2's indexer under no_grad, and DeepSeek-V4's returns integer indices only:
    # their weights get no gradient, which DDP refuses ("parameters that were not used in producing loss",
    # tried with tiny-dsa on 2 processes); FSDP2 trains the rest
    Rule("the executor's DDP (zero 0/1) needs a gradient for every weight; a DeepSeek-V3.2/V4 indexer gets none",
         lambda c, s, w: (s.index_topk > 0) & (c.dp > 1) & (c.zero <= 1) & (w.method == "full"), fix="--zero 2 or 3"),
    Rule(f"the executor's expert parallelism runs {', '.join(EXECUTOR_EP_FAMILIES)} (their transformers ep plan)",
         lambda c, s, w: (c.ep > 1) & (s.family not in EXECUTOR_EP_FAMILIES), fix="--ep 1"),
    Rule("the executor dispatches experts' tokens with all-to-all (transformers' ep plan), not DeepEP",
         lambda c, s, w: w.expert_dispatcher == "deepep", fix="--expert-dispatcher alltoall"),
    Rule("the executor's expert parallelism runs with full training, ZeRO 0, 2 or 3 and no tp, pp or cp",
         lambda c, s, w: (c.ep > 1) & ((c.tp > 1) | (c.pp > 1) | (c.cp > 1) | (c.zero == 1) | (w.method != "full")),
         fix="--ep 1"),
)

def _no_deepep(engine: str) -> Rule:
    return Rule(f"{engine} has no DeepEP expert dispatch", lambda c, s, w: w.expert_dispatcher == "deepep",
                fix="--expert-dispatcher alltoall")


# DeepSpeed and Accelerate train transformers' own classes: DeepSeek-V4 there is eager-only too
_DSV4_EAGER = Rule("transformers has no sdpa attention for DeepSeek-V4 (DeepseekV4PreTrainedModel)",
                   lambda c, s, w: (s.family == "deepseek_v4") & (w.attention == "sdpa"), fix="--attention eager")

DEEPSPEED_RULES: tuple[Rule, ...] = _common("DeepSpeed") + (_DSV4_EAGER,) + (
    _no_deepep("DeepSpeed"),
    Rule("DeepSpeed's config has no fp8 mode", lambda c, s, w: w.precision == "fp8", fix="--precision bf16"),
    Rule("DeepSpeed's pipeline engine runs with ZeRO 0/1 and no AutoTP",
         lambda c, s, w: (c.pp > 1) & ((c.zero > 1) | (c.tp > 1)), fix="--zero 1 --tp 1, or --pp 1"),
    Rule("DeepSpeed's pipeline has no interleaved schedule", lambda c, s, w: c.vpp > 1, fix="--vpp 1"),
    Rule("DeepSpeed's AutoTP runs with ZeRO 0-2", lambda c, s, w: (c.tp > 1) & (c.zero == 3), fix="--zero 2 or --tp 1"),
    Rule("DeepSpeed's AutoTP has no sequence parallelism", lambda c, s, w: c.sequence_parallel,
         fix="no --sequence-parallel"),
    Rule("DeepSpeed gathers the logits (no vocabulary-parallel loss)", lambda c, s, w: w.loss_parallel & (c.tp > 1),
         fix="no --loss-parallel"),
    Rule("DeepSpeed's Ulysses sequence parallelism is not ring cp", lambda c, s, w: c.cp > 1, fix="--cp 1"),
    Rule("DeepSpeed-MoE's expert parallelism needs its own model code (deepspeed.moe.layer.MoE), not this config",
         lambda c, s, w: c.ep > 1, fix="--ep 1"),
)

ACCELERATE_RULES: tuple[Rule, ...] = _common("Accelerate") + (_DSV4_EAGER,) + (
    _no_deepep("Accelerate"),
    Rule("Accelerate's FSDP has no pipeline parallelism", lambda c, s, w: c.pp > 1, fix="--pp 1"),
    Rule("FSDP offloads parameters, gradients and optimizer together, not the optimizer alone",
         lambda c, s, w: c.offload == _OPT, fix="--offload params or none"),
    Rule("Accelerate's tensor parallelism (transformers tp_plan) has no sequence parallelism",
         lambda c, s, w: c.sequence_parallel, fix="no --sequence-parallel"),
    Rule("Accelerate gathers the logits (no vocabulary-parallel loss)", lambda c, s, w: w.loss_parallel & (c.tp > 1),
         fix="no --loss-parallel"),
    # accelerate's ParallelismConfig: cp_size > 1 runs torch's context_parallel under FSDP2 only
    Rule("Accelerate's context parallelism runs with FSDP2 only", lambda c, s, w: (c.cp > 1) & (c.zero < 2),
         fix="--zero 2 or 3, or --cp 1"),
    Rule("Accelerate's parallelism_config has no expert parallelism", lambda c, s, w: c.ep > 1, fix="--ep 1"),
)

TORCHTITAN_RULES: tuple[Rule, ...] = _common("torchtitan") + (
    Rule("torchtitan ships llama3 model code in the 8B/70B/405B shapes only",
         lambda c, s, w: (s.family != "llama")
         | ((s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads) not in TORCHTITAN_LLAMA3_FLAVORS),
         fix="--target deepspeed or accelerate"),
    Rule("torchtitan trains full models only", lambda c, s, w: w.method != "full", fix="--method full"),
    Rule("torchtitan has no fp16 mixed precision", lambda c, s, w: w.precision == "fp16", fix="--precision bf16"),
    Rule("torchtitan (FSDP2) cannot offload the optimizer alone", lambda c, s, w: c.offload == _OPT,
         fix="--offload params or none"),
    Rule("torchtitan runs torch's AdamW", lambda c, s, w: w.optimizer != "adamw", fix="--optimizer adamw"),
    Rule("torchtitan's attention is sdpa/flex", lambda c, s, w: w.attention != "sdpa", fix="--attention sdpa"),
    Rule("the torchtitan export writes its all-to-all expert dispatch, not DeepEP",
         lambda c, s, w: w.expert_dispatcher == "deepep", fix="--expert-dispatcher alltoall"),
)

MEGATRON_RULES: tuple[Rule, ...] = _common("Megatron-LM") + (
    Rule("Megatron-LM's GPTModel args cover llama/mistral/mixtral/qwen2 shapes",
         lambda c, s, w: s.family not in MEGATRON_FAMILIES, fix="--target torchtitan or deepspeed"),
    Rule("Megatron-LM trains full models only", lambda c, s, w: w.method != "full", fix="--method full"),
    Rule("Megatron-LM shards only optimizer states (--use-distributed-optimizer)", lambda c, s, w: c.zero >= 2,
         fix="--zero 1 (or 0)"),
    Rule("Megatron-LM does not offload", lambda c, s, w: c.offload != 0, fix="--offload none"),
    Rule("Megatron-LM does not torch.compile", lambda c, s, w: w.compile, fix="no --compile"),
    Rule("Megatron-LM uses fused attention kernels", lambda c, s, w: w.attention == "eager", fix="--attention sdpa"),
    Rule("Megatron-LM runs AdamW or SGD in fp32 states", lambda c, s, w: w.optimizer == "adamw8bit",
         fix="--optimizer adamw"),
)

TARGETS: dict[str, tuple[Rule, ...]] = {
    "executor": EXECUTOR_RULES,
    "deepspeed": DEEPSPEED_RULES,
    "accelerate": ACCELERATE_RULES,
    "torchtitan": TORCHTITAN_RULES,
    "megatron": MEGATRON_RULES,
}
# the executor's own launchers run what the executor runs
FORMAT_TARGETS = {"torchrun": "executor", "slurm": "executor", "deepspeed": "deepspeed",
                  "accelerate": "accelerate", "torchtitan": "torchtitan", "megatron": "megatron"}


def _device_rules(target: str, on_gpu: bool) -> tuple[Rule, ...]:
    """Rules that depend on the device kind: the executor offloads the optimizer only on CPU runs,
    where device memory is host memory and nothing moves."""
    if target == "executor" and on_gpu:
        return (Rule("the executor has no ZeRO-Offload on GPUs", lambda c, s, w: c.offload == _OPT,
                     fix="--offload none, or --offload params with --zero 3"),)
    if target == "executor":
        return (Rule(CP_CPU_REFUSAL, lambda c, s, w: c.cp > 1, fix="--cp 1, or a GPU"),)
    return ()


# torch 2.13's ring attention (torch/distributed/tensor/experimental/_context_parallel/_attention.py,
# _sdpa_handler) dispatches only the CUDA flash, efficient and cuDNN SDPA kernels; tried with gloo on
# 2 processes, CPU SDPA stops with "Operator aten._scaled_dot_product_flash_attention_for_cpu.default
# does not have a sharding strategy registered"
CP_CPU_REFUSAL = ("torch 2.13's context_parallel has no CPU attention "
                  "(aten._scaled_dot_product_flash_attention_for_cpu has no ring-attention handler)")


def _windowed(s: ModelSpec, w: Workload) -> bool:
    """A sliding window shorter than the sequence: context_parallel runs full causal attention only
    (accelerate refuses such models for cp the same way, big_modeling._attach_context_parallel_hooks)."""
    config = s.hf_config or {}
    window = config.get("sliding_window")
    return bool(window) and config.get("use_sliding_window", True) is not False and w.seq_len > window


def on_gpu(hardware: Hardware) -> bool:
    return hardware.vendor != "cpu"


def rules_for(target: str, gpu: bool) -> tuple[Rule, ...]:
    if target not in TARGETS:
        raise InvalidRequest(f"--target must be one of {', '.join(TARGETS)}; got {target!r}")
    return TARGETS[target] + _device_rules(target, gpu)


def not_runnable(target: str, candidates: Candidates, spec: ModelSpec, workload: Workload,
                 hardware: Hardware) -> list[tuple[str, str, np.ndarray]]:
    """(reason, fix, mask) per rule of `target` over the candidates; reasons read
    'not runnable by T: <why>'."""
    return [(f"not runnable by {target}: {rule.reason}", rule.fix, mask)
            for rule, mask in rule_masks(rules_for(target, on_gpu(hardware)), candidates, spec, workload)]


def runnable_reason(target: str, config: ParallelConfig, spec: ModelSpec, workload: Workload,
                    hardware: Hardware | None = None, gpu: bool | None = None) -> str | None:
    """Why `target` cannot run this configuration as planned (with what to change), or None.
    The device kind comes from `hardware`, or `gpu` when the caller knows where it runs."""
    gpu = on_gpu(hardware) if gpu is None else gpu
    rule = first_broken(rules_for(target, gpu), config, spec, workload)
    if rule is None:
        return None
    return f"not runnable by {target}: {rule.reason}; plan with {rule.fix}" if rule.fix else \
        f"not runnable by {target}: {rule.reason}"
