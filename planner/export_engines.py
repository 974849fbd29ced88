"""The engine-specific exports of a Plan: a DeepSpeed JSON config, an Accelerate YAML, a torchtitan
0.3 configuration module and Megatron-LM's command-line arguments. What each engine can run at all
is planner/capabilities.py's table, checked by planner/export.py before these run; here each choice
of the plan is mapped to the engine's own key, or noted (on stderr) where it lives in training code.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from planner.capabilities import TORCHTITAN_LLAMA3_FLAVORS
from planner.export_base import LaunchOptions, _Plan, describe


# -- DeepSpeed ----------------------------------------------------------------------------------

def deepspeed_json(plan: _Plan, options: LaunchOptions) -> str:
    """DeepSpeed config JSON (https://www.deepspeed.ai/docs/config-json/). DeepSpeed checks
    train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x dp."""
    c, w = plan.config, plan.workload
    zero: dict[str, Any] = {"stage": c.zero}
    if c.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if c.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": w.global_batch,
        "train_micro_batch_size_per_gpu": c.micro_batch_size,
        "gradient_accumulation_steps": c.num_micro_batches,
        "bf16": {"enabled": w.precision == "bf16"},
        "fp16": {"enabled": w.precision == "fp16"},
        "zero_optimization": zero,
    }
    if c.tp > 1:
        config["tensor_parallel"] = {"autotp_size": c.tp}  # AutoTP training (DeepSpeed >= 0.16.4)
    if c.pp > 1:
        plan.notes.append(f"build the model as deepspeed.pipe.PipelineModule(num_stages={c.pp}); "
                          "the engine runs gradient_accumulation_steps micro-batches per step")
    if w.compile:
        plan.notes.append("torch.compile: call engine.compile() on the DeepSpeed engine in the training code")
    _training_code_notes(plan, "DeepSpeed")
    return json.dumps(config, indent=2) + "\n"


def _training_code_notes(plan: _Plan, engine: str) -> None:
    c = plan.config
    if c.recompute != "none":
        plan.notes.append(f"{c.recompute} activation recomputation is switched on in the training code, not in the {engine} config")


# -- Accelerate (FSDP2) ----------------------------------------------------------------------------

def accelerate_config(plan: _Plan) -> dict[str, Any]:
    """`accelerate launch --config_file` YAML keys (accelerate ClusterConfig and the
    --fsdp_* / --parallelism_config_* options of `accelerate launch`, accelerate >= 1.10)."""
    c, w, cluster = plan.config, plan.workload, plan.cluster
    doc: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0,
                           "num_machines": cluster.num_nodes, "num_processes": cluster.num_devices,
                           "mixed_precision": {"fp32": "no"}.get(w.precision, w.precision),
                           "rdzv_backend": "c10d" if cluster.num_nodes > 1 else "static", "same_network": True,
                           "main_training_function": "main", "use_cpu": False}
    if cluster.num_nodes > 1:
        doc.update(main_process_ip="MASTER_ADDR", main_process_port=29500)
        plan.notes.append("set main_process_ip to node 0's address and machine_rank to each node's rank")
    sharded = c.zero >= 1 or c.tp > 1
    doc["distributed_type"] = "FSDP" if sharded else ("MULTI_GPU" if cluster.num_devices > 1 else "NO")
    if sharded:
        doc["fsdp_config"] = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                              "fsdp_reshard_after_forward": c.zero == 3, "fsdp_offload_params": c.offload == "params",
                              "fsdp_activation_checkpointing": c.recompute == "full",
                              "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True}
        if c.zero == 1:
            plan.notes.append("FSDP has no ZeRO-1; zero 1 becomes reshard_after_forward false (ZeRO-2-like, less memory)")
        if c.zero == 0:
            plan.notes.append("zero 0 with tp: dp ranks replicate (dp_shard_size 1)")
    if c.tp > 1 or c.cp > 1:
        doc["parallelism_config"] = {"parallelism_config_dp_replicate_size": 1 if c.zero >= 1 else c.dp,
                                     "parallelism_config_dp_shard_size": c.dp if c.zero >= 1 else 1,
                                     "parallelism_config_tp_size": c.tp, "parallelism_config_cp_size": c.cp}
    if c.recompute == "selective":
        plan.notes.append("selective recomputation is switched on in the training code, not in the Accelerate config")
    if c.recompute == "full" and not sharded:
        plan.notes.append("full recomputation without FSDP: call model.gradient_checkpointing_enable() in the training code")
    if w.compile:  # accelerate's DynamoPlugin: `accelerate launch --dynamo_backend inductor`
        doc["dynamo_config"] = {"dynamo_backend": "INDUCTOR"}
    return doc


def accelerate_yaml(plan: _Plan, options: LaunchOptions) -> str:
    return f"# Plan: {describe(plan)}\n" + _yaml(accelerate_config(plan))


def _yaml(mapping: dict[str, Any], indent: int = 0) -> str:
    """Block mapping; scalars as JSON scalars (valid YAML 1.2 flow scalars)."""
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:\n" + _yaml(value, indent + 2).rstrip("\n"))
        else:
            lines.append(" " * indent + f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


# -- torchtitan 0.3 --------------------------------------------------------------------------------
# torchtitan 0.3.0 reads a Python function returning Trainer.Config, named with --module and --config
# (torchtitan/config/manager.py ConfigManager._load_config; torchtitan/config/README.md: TOML job files
# are gone). The pipeline's split is written out as parallelism.module_fqns_per_model_part, one list of
# module names per virtual stage, so torchtitan builds exactly the plan's stages
# (torchtitan/distributed/pipeline_parallel.py pipeline_llm uses it instead of its own arithmetic).

TORCHTITAN_RECOMPUTE = {"none": "None", "selective": "SelectiveAC.Config()", "full": "FullAC.Config()"}


def torchtitan_stage_modules(plan: _Plan) -> list[list[str]]:
    """Module FQNs of each virtual stage (torchtitan's Decoder: tok_embeddings, layers.<i>, norm, lm_head)."""
    stages = plan.plan.stages
    parts = [[f"layers.{i}" for i in layers] for layers in stages]
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "lm_head"]
    return parts


def torchtitan_settings(plan: _Plan, options: LaunchOptions) -> dict[str, dict[str, Any]]:
    """The Trainer.Config fields the plan sets, by section (torchtitan/config/configs.py)."""
    c, w = plan.config, plan.workload
    pipelined = c.pp > 1
    training = {"local_batch_size": c.micro_batch_size * (c.num_micro_batches if pipelined else 1),
                "global_batch_size": w.global_batch, "seq_len": w.seq_len,
                "mixed_precision_param": "float32" if w.precision == "fp32" else "bfloat16",
                "enable_cpu_offload": c.offload == "params"}
    if options.steps is not None:
        training["steps"] = options.steps
    parallelism: dict[str, Any] = {
        "data_parallel_replicate_degree": 1 if c.zero >= 1 else c.dp,
        "data_parallel_shard_degree": c.dp if c.zero >= 1 else 1,
        "fsdp_reshard_after_forward": "always" if c.zero == 3 else "never",
        "tensor_parallel_degree": c.tp, "enable_sequence_parallel": c.sequence_parallel or c.tp == 1,
        "pipeline_parallel_degree": c.pp, "context_parallel_degree": c.cp}
    if c.ep > 1:  # torchtitan 0.3: efsdp = dp_shard x cp x tp / ep (ParallelismConfig.expert_parallel_degree)
        parallelism["expert_parallel_degree"] = c.ep
    if pipelined:
        parallelism.update(pipeline_parallel_schedule="Interleaved1F1B" if c.vpp > 1 else "1F1B",
                           pipeline_parallel_microbatch_size=c.micro_batch_size,
                           module_fqns_per_model_part=torchtitan_stage_modules(plan))
    if c.zero == 1:
        plan.notes.append("FSDP has no ZeRO-1; zero 1 becomes fsdp_reshard_after_forward never (ZeRO-2-like)")
    if c.zero >= 2 and not c.shard_ends:
        plan.notes.append("torchtitan shards the embedding and the output as FSDP units of their own "
                          "(slightly less memory than planned)")
    return {"training": training, "parallelism": parallelism,
            "compile": {"enable": w.compile, "components": ["model", "loss"]}}


def torchtitan_module(plan: _Plan, options: LaunchOptions) -> str:
    spec, w = plan.spec, plan.workload
    flavor = TORCHTITAN_LLAMA3_FLAVORS[(spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads)]
    settings = torchtitan_settings(plan, options)
    converters = "[Float8LinearConverter.Config()]" if w.precision == "fp8" else "None"
    lines = [f"# torchtitan 0.3 configuration of the plan: {describe(plan)}",
             f"# Run: torchrun --nproc-per-node {plan.cluster.devices_per_node} -m torchtitan.train "
             "--module <this file's module name> --config plan",
             "from torchtitan.components.quantization import Float8LinearConverter",
             "from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig",
             "from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC",
             "from torchtitan.models.llama3 import model_registry",
             f"from torchtitan.models.llama3.config_registry import llama3_{flavor.lower()}",
             "", "",
             "def plan():",
             f"    config = llama3_{flavor.lower()}()",
             f"    config.model_spec = model_registry({flavor!r}, converters={converters})",
             f"    config.training = TrainingConfig(**{settings['training']!r})",
             f"    config.parallelism = ParallelismConfig(**{settings['parallelism']!r})",
             f"    config.activation_checkpoint = {TORCHTITAN_RECOMPUTE[plan.config.recompute]}",
             f"    config.compile = CompileConfig(**{settings['compile']!r})",
             f"    config.dump_folder = {options.output!r}",
             "    return config"]
    return "\n".join(lines) + "\n"


# -- Megatron-LM ---------------------------------------------------------------------------------
# Megatron-LM's pretrain_gpt.py arguments (megatron/training/arguments.py, core_r0.14).

def megatron_pipeline_layout(stages: list[list[int]]) -> str:
    """Megatron-Core's pipeline_model_parallel_layout string (transformer/pipeline_parallel_layer_layout.py:
    stages in virtual-stage order split by "|", "E" the embedding, "t" a decoder layer, "L" the loss)."""
    parts = ["t" * len(layers) for layers in stages]
    parts[0], parts[-1] = "E" + parts[0], parts[-1] + "L"
    return "|".join(parts)


def megatron_arguments(plan: _Plan, options: LaunchOptions) -> list[str]:
    c, w, s = plan.config, plan.workload, plan.spec
    args = ["--tensor-model-parallel-size", str(c.tp), "--pipeline-model-parallel-size", str(c.pp),
            "--micro-batch-size", str(c.micro_batch_size), "--global-batch-size", str(w.global_batch),
            "--seq-length", str(w.seq_len), "--max-position-embeddings", str(max(w.seq_len, s.max_position_embeddings)),
            "--num-layers", str(s.num_layers), "--hidden-size", str(s.hidden_size),
            "--num-attention-heads", str(s.num_heads), "--ffn-hidden-size", str(s.intermediate_size),
            "--kv-channels", str(s.head_dim), "--normalization", "RMSNorm" if s.norm == "rmsnorm" else "LayerNorm",
            "--position-embedding-type", "rope", "--swiglu", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights"]
    if s.tie_word_embeddings:
        args.remove("--untie-embeddings-and-output-weights")
    if s.qkv_bias:
        args.append("--add-qkv-bias")
    if s.num_kv_heads != s.num_heads:
        args += ["--group-query-attention", "--num-query-groups", str(s.num_kv_heads)]
    if s.is_moe:
        args += ["--num-experts", str(s.num_experts), "--moe-router-topk", str(s.experts_per_token)]
    if c.ep > 1:  # expert tensor parallelism stays Megatron-Core's default (= tp), as planned
        args += ["--expert-model-parallel-size", str(c.ep)]
        # DeepEP runs under Megatron-Core's flex dispatcher (docs: --moe-token-dispatcher-type=flex --moe-enable-deepep)
        args += (["--moe-token-dispatcher-type", "flex", "--moe-enable-deepep"] if w.expert_dispatcher == "deepep"
                 else ["--moe-token-dispatcher-type", "alltoall"])
    if c.cp > 1:  # TransformerEngine's ring attention; planned with torch's all-gather rotation (same volume)
        args += ["--context-parallel-size", str(c.cp), "--cp-comm-type", "p2p"]
    if s.num_layers % (c.pp * c.vpp):  # uneven stages: the plan's split, written out (it fixes vpp too)
        args += ["--pipeline-model-parallel-layout", megatron_pipeline_layout(plan.plan.stages)]
    elif c.vpp > 1:
        args += ["--num-layers-per-virtual-pipeline-stage", str(s.num_layers // (c.pp * c.vpp))]
    if c.sequence_parallel:
        args.append("--sequence-parallel")
    if c.zero == 1:
        args.append("--use-distributed-optimizer")
    if c.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif c.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    args += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp8": ["--bf16", "--fp8-format", "hybrid"], "fp32": []}[w.precision]
    if w.optimizer == "sgd":
        args += ["--optimizer", "sgd"]
    if w.attention == "fused-softmax":  # Megatron's fused scale-mask-softmax over materialised scores
        args += ["--attention-backend", "unfused"]
    if options.steps is not None:
        args += ["--train-iters", str(options.steps)]
    return args


def megatron_args(plan: _Plan, options: LaunchOptions) -> str:
    args = megatron_arguments(plan, options)
    plan.notes.append("tokenizer, data and checkpoint arguments are yours to add (--data-path, --tokenizer-type, --save)")
    lines = [f"# Plan: {describe(plan)}", "# Megatron-LM pretrain_gpt.py arguments (core_r0.14)",
             "MEGATRON_ARGS=(", *[f"  {shlex.quote(a)}" for a in args], ")",
             f"# torchrun --nproc-per-node {plan.cluster.devices_per_node} pretrain_gpt.py \"${{MEGATRON_ARGS[@]}}\""]
    return "\n".join(lines) + "\n"
