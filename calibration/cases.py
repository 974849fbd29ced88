"""Published measured runs (validation/cases.json) turned into planner requests.

Each case's notes were read; the rules below encode what they say (see the comments). A case
the planner cannot represent is kept with `excluded` saying why, so reports count it honestly
instead of dropping it silently. Pure Python: no torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from calibration.case import Case, fraction_of_peak, memory_floor_bytes
from calibration.case_stack import (attention_of, expert_dispatcher_of, framework_of, fused_norm_of, loss_parallel_of,
                                    megatron_options, recompute_modules_of)
from planner.errors import InvalidRequest, read_json
from planner.models import spec_from_hf_config
from planner.plan import ParallelConfig
from planner.specs import RECOMPUTE_MODULES, ModelSpec, Workload

SHIPPED_CASES = Path(__file__).parent / "data" / "public_cases.json"
GIB = 2**30


def case_from_run(run) -> Case:
    """A stored run (planner/runrecord.py) as a Case, so fitting and validation treat measured runs
    of every origin alike."""
    measured = run.measured
    memory_kind = "reserved" if measured.peak_reserved_bytes else "allocated"
    return Case(id=run.run_id, source=run.source or run.origin, model=run.model_name, spec=run.spec,
                hardware=run.hardware, devices=run.num_devices or 0, devices_per_node=run.devices_per_node,
                workload=run.workload, config=run.config, tokens_per_s_per_device=measured.tokens_per_s_per_device,
                memory_bytes=measured.peak_reserved_bytes or measured.peak_allocated_bytes, memory_kind=memory_kind,
                excluded=None if run.usable else (run.excluded or f"status {run.status}"), framework=run.origin)


def load_cases(path: str | Path | None = None) -> list[Case]:
    target = Path(path) if path else SHIPPED_CASES
    data = read_json(target, "cases file")
    rows = data["cases"] if isinstance(data, dict) and "cases" in data else data
    if not isinstance(rows, list):
        raise InvalidRequest(f"{target}: expected a list of cases or an object with 'cases'")
    return adapt_all(rows)


def adapt_all(rows: list[Any]) -> list[Case]:
    """Every row of a cases file as a Case, with the checks that need the whole file: what
    validation, fitting and `planner runs import` all see."""
    cases = [adapt(row) if isinstance(row, dict) else Case(id="?", source="?", model="?", excluded="not an object")
             for row in rows]
    # a table reports one kind of memory: a note on some of its rows says which for all of them
    allocated_tables = {row.get("source") for row in rows
                        if isinstance(row, dict) and "Peak Memory Active" in (row.get("notes") or "")}
    for case, row in zip(cases, rows, strict=True):
        if case.memory_bytes and isinstance(row, dict) and row.get("source") in allocated_tables:
            case.memory_kind = "allocated"
        case.excluded = case.excluded or _impossible_memory(case)
    return cases


def _impossible_memory(case: Case) -> str | None:
    """A memory claim below what the stated configuration must hold: the configuration that ran
    was another one (its throughput too), so the case is kept, flagged, out of the statistics."""
    floor = memory_floor_bytes(case) if case.memory_bytes else None
    if floor is None or floor <= case.memory_bytes:
        return None
    return (f"impossible memory claim: {case.memory_bytes / GIB:.1f} GiB is below the {floor / GIB:.1f} GiB its "
            "stated configuration holds at the end of the forward pass (weights, layer inputs, logits)")


def adapt(row: dict[str, Any]) -> Case:
    case = Case(id=str(row.get("id")), source=f"{row.get('source', '')} — {row.get('source_detail', '')}",
                model=str(row.get("model")), framework=str(row.get("framework") or ""))
    try:
        _fill(case, row)
    except (KeyError, TypeError, ValueError, InvalidRequest) as exc:
        case.excluded = case.excluded or f"could not read the case: {exc}"
    return case


def _fill(case: Case, row: dict[str, Any]) -> None:
    measured, derived = row.get("measured") or {}, row.get("derived") or {}
    hardware, per_gcd = _hardware(row["hardware"])
    case.hardware = hardware
    case.devices = int(row["n_gpus"] or 0) * (2 if per_gcd else 1)
    tps = measured.get("tokens_per_s_per_gpu") or derived.get("tokens_per_s_per_gpu")
    case.tokens_per_s_per_device = tps / 2 if (tps and per_gcd) else tps
    case.tflops_per_device = measured.get("tflops_per_gpu")
    if case.tokens_per_s_per_device is None and case.tflops_per_device and "Megatron" in row["framework"]:
        case.tokens_per_s_per_device = _megatron_tokens_per_s(row)
        case.assumptions.append("tokens/s derived from achieved TFLOP/s with Narayanan et al. 2021 Eq. 3")
    if measured.get("peak_memory_gib_per_gpu"):
        case.memory_bytes = measured["peak_memory_gib_per_gpu"] * GIB
        notes = (row.get("notes") or "")
        case.memory_kind = "allocated" if "Peak Memory Active" in notes else "reserved"
    if derived.get("memory_upper_bound_gb"):
        case.memory_upper_bound_bytes = derived["memory_upper_bound_gb"] * 1e9
    reported_total = derived.get("reported_tokens_per_s_total")
    case.claimed_tokens_per_s_per_device = case.tokens_per_s_per_device or (
        reported_total / case.devices if reported_total and case.devices else None)
    if (row.get("model_shape") or {}).get("hidden"):
        case.spec = _model(row)
    case.excluded = _unmodelled(row)
    if case.excluded:
        return
    case.paged_optimizer = "paged" in str(row.get("optimizer")).lower()
    case.workload, notes = _workload(row)
    case.assumptions += notes
    case.config = _config(row, case)
    case.excluded = _refused(case)
    if "Paged" in str(row.get("optimizer")) and case.config.recompute == "none":
        case.excluded = ("a paged optimizer beside un-checkpointed activations: its states (in CUDA managed memory, "
                         "which torch's counters do not see) page to host memory, which is not modelled")


def _refused(case: Case) -> str | None:
    """A published configuration the planner cannot run as stated (e.g. Megatron's uneven virtual
    pipeline stages, which count the embedding and the loss as layers): kept, excluded with the
    reason, as calibration/ingest.py stores it."""
    from planner.hardware import load_hardware, make_cluster
    from planner.plan import check_config

    try:
        cluster = make_cluster(load_hardware(case.hardware), case.devices, case.devices_per_node)
    except InvalidRequest:
        return None
    try:
        check_config(case.spec, case.workload, cluster, case.config)
    except InvalidRequest as exc:
        return f"the planner refuses the configuration: {exc}"
    return None


def _hardware(text: str) -> tuple[str, bool]:
    """(preset, counts MI250 packages): the case's GPU string to a preset."""
    t = text.lower()
    rules = [("mi250", "mi250-gcd-64gb"), ("h100 sxm 96gb", "h100-sxm-96gb-500w"), ("h200", "h200-141gb"),
             ("b200", "b200-180gb"),
             ("h100", "h100-sxm-80gb"), ("a100 40gb", "a100-40gb"), ("a100", "a100-80gb"),
             ("rtx 4090", "rtx4090-24gb"), ("rtx a6000", "rtx-a6000-48gb"), ("rtx 3090", "rtx3090-24gb"),
             ("48 gb gpu", "rtx-a6000-48gb")]
    for needle, preset in rules:
        if needle in t:
            return preset, preset == "mi250-gcd-64gb"
    raise ValueError(f"no hardware preset for {text!r}")


def _unmodelled(row: dict[str, Any]) -> str | None:
    """Why a case cannot be represented (kept in the report, excluded from error statistics)."""
    par, notes, peft = row["parallelism"], (row.get("notes") or ""), str(row.get("peft") or "")
    shape = row.get("model_shape") or {}
    if not shape or "hidden" not in shape:
        return "architecture not modelled (encoder-decoder, multimodal or unknown shape)"
    if "implied_fraction_of_peak_6N" in (row.get("derived") or {}):
        return "physically impossible throughput claim (above the hardware's peak FLOP/s)"
    if row.get("seq_len") is None and "default 8192" not in notes:
        return "sequence length not published"
    if row.get("global_batch") is None and row.get("micro_batch") is None:
        return "batch size not published"
    if "NormBias" in peft:
        return "norm/bias tuning (LLaMA2-Accessory) is not a modelled method"
    if "packed=False" in notes:
        return "unpacked sequences (shorter than seq_len) are not modelled"
    if "Paged" in str(row.get("optimizer")) and "4090" in row["hardware"]:
        return "a paged optimizer spilling its states to host memory is not modelled"
    return None


def _compiled(row: dict[str, Any]) -> bool:
    """Whether the run compiled the model AND its loss, which is what `compile` means here.
    torchtune's compile flag does both (the rows say compile=True/False, or "torch.compile on");
    torchtitan compiled only the transformer blocks until 2025, the loss too from then on."""
    notes, framework, source = row.get("notes") or "", str(row.get("framework") or ""), str(row.get("source") or "")
    if "torchtune" in framework:
        return "compile=True" in notes or "torch.compile on" in notes or ", compile," in notes
    if "torchtitan" in framework and "2025" in source:
        text = notes + str(row["parallelism"].get("notes")) + str(row.get("precision"))
        return "compile" in text or "float8" in text
    return False


def _torchtune_features(row: dict[str, Any]) -> dict[str, Any]:
    """torchtune trains in pure bf16 (dtype: bf16; no fp32 master weights). Its README tables name
    chunked cross-entropy, activation offloading and optimizer_in_bwd per row; the 2024-09 table
    (c113-c120) used the Llama 3.1 configs of that commit, whose loss is CEWithChunkedOutputLoss."""
    notes, optimizer = row.get("notes") or "", str(row.get("optimizer") or "")
    explicit = "chunked CE" in notes
    chunked = ("chunked CE=True" in notes or "chunked CE, " in notes) if explicit else True
    # without chunked output its TransformerDecoder returns `self.output(h).float()` (torchtune 0.4
    # modules/transformer.py); the chunked loss upcasts each chunk itself
    return {"master_dtype": "bf16", "loss_chunks": 8 if chunked else 1, "fp32_logits": not chunked,
            "activation_offload": "activation offloading=True" in notes or "activation offloading on" in notes,
            "optimizer_in_backward": "optimizer_in_bwd" in optimizer and "no optimizer_in_bwd" not in notes}


def _model(row: dict[str, Any]) -> ModelSpec:
    """A config.json for the published shape, in the family its name says; the catalog's config.json
    where the case names one (`model_preset`: MoE and MLA models, whose shape the table cannot hold)."""
    if row.get("model_preset"):
        from dataclasses import replace

        from planner.models import load_model

        return replace(load_model(row["model_preset"]), name=row["model"])
    shape, name = row["model_shape"], row["model"]
    seq = row.get("seq_len") or 8192
    if name.startswith("MPT"):
        config = {"model_type": "mpt", "d_model": shape["hidden"], "n_heads": shape["heads"],
                  "n_layers": shape["layers"], "expansion_ratio": shape["ffn"] / shape["hidden"],
                  "vocab_size": shape["vocab"], "max_seq_len": seq, "learned_pos_emb": True,
                  "attn_config": {"alibi": False}}
    elif name.startswith("GPT-"):
        # Megatron GPT: learned positions, GELU MLP, dropout 0.1 (Narayanan et al. 2021 §5)
        config = {"model_type": "gpt2", "n_embd": shape["hidden"], "n_layer": shape["layers"],
                  "n_head": shape["heads"], "n_inner": shape["ffn"], "vocab_size": shape["vocab"],
                  "n_positions": seq, "activation_function": "gelu", "tie_word_embeddings": True}
    else:
        config = {"model_type": "llama", "hidden_size": shape["hidden"], "intermediate_size": shape["ffn"],
                  "num_attention_heads": shape["heads"], "num_hidden_layers": shape["layers"],
                  "num_key_value_heads": shape.get("kv_heads") or shape["heads"], "vocab_size": shape["vocab"],
                  "max_position_embeddings": max(seq, 8192),
                  "tie_word_embeddings": bool(shape.get("tied_embeddings", False))}
    return spec_from_hf_config(config, name=name, source=f"validation case {row['id']}")


def _workload(row: dict[str, Any]) -> tuple[Workload, list[str]]:
    peft, precision_text = str(row.get("peft") or "none").lower(), str(row.get("precision") or "bf16").lower()
    optimizer_text = str(row.get("optimizer") or "").lower()
    method, rank, targets, notes = "full", 16, ("q", "k", "v", "o", "gate", "up", "down"), []
    if peft.startswith("lora") or peft.startswith("qlora"):
        method = "qlora" if peft.startswith("qlora") else "lora"
        found = re.search(r"\br(\d+)", peft)
        rank = int(found.group(1)) if found else 8
        if re.search(r"on q,\s*v\b", peft):
            targets = ("q", "v")
        elif re.search(r"on q,k,v\b", peft) and "mlp" not in peft:
            targets = ("q", "k", "v")
        elif "q,v,o + mlp" in peft:
            targets = ("q", "v", "o", "gate", "up", "down")
    if "fp8" in precision_text or "float8" in precision_text:
        precision = "fp8"
    elif "fp16" in precision_text and "bf16" not in precision_text:
        precision = "fp16"
    else:
        precision = "bf16"
    optimizer = "adamw8bit" if "8bit" in optimizer_text or "adamw8bit" in optimizer_text else "adamw"
    impl = "fused" if "fused" in optimizer_text else "foreach"
    if "torchtune" in str(row.get("framework")) and optimizer_text.startswith("adamw (torch)"):
        # torchtune's configs build torch.optim.AdamW with `fused: True`; the table's own figures agree:
        # its '+ Activation Checkpointing' row (24.9 GiB) has no room for foreach AdamW's temporary
        # (one more copy of the 3B parameters, 6 GiB, on top of 23.9 GiB of weights, grads and moments)
        impl = "fused"
        notes.append("fused AdamW (torchtune configs: torch.optim.AdamW with fused: True)")
    seq = row.get("seq_len") or 8192
    if row.get("seq_len") is None:
        notes.append("sequence length 8192 (torchtitan default named in the notes)")
    global_batch = row.get("global_batch") or (row["micro_batch"] * (row["parallelism"].get("dp") or 1))
    extras = _torchtune_features(row) if "torchtune" in str(row.get("framework")) else {}
    extras["compile"] = _compiled(row)
    if "llm-foundry" in str(row.get("framework")):
        # MPT's loss_fn defaults to fused_crossentropy: flash_attn.losses.cross_entropy.CrossEntropyLoss
        # (llm-foundry llm_foundry/models/mpt/modeling_mpt.py ComposerMPTCausalLM)
        extras["fused_loss"] = True
        notes.append("fused cross-entropy (MPT's default loss_fn fused_crossentropy, flash-attn's kernel)")
    if "Megatron-Bridge" in str(row.get("framework")):
        # Megatron-Bridge's GPT provider fuses the cross-entropy (src/megatron/bridge/models/gpt_provider.py:180
        # cross_entropy_loss_fusion = True at 97ad8cc6f; its performance recipes run TE's kernel in place,
        # scripts/performance/utils/overrides.py:55 cross_entropy_fusion_impl = "te")
        extras["fused_loss"] = True
        notes.append("fused cross-entropy (Megatron-Bridge: cross_entropy_loss_fusion, Transformer Engine's kernel)")
    extras["loss_parallel"] = loss_parallel_of(row)
    extras["fused_norm"] = fused_norm_of(row)
    if extras["fused_norm"]:
        notes.append("fused RMSNorm (torchtitan's fused_rmsnorm: norm_type of the train config at that commit)")
    extras["expert_dispatcher"] = expert_dispatcher_of(row)
    if extras["expert_dispatcher"] == "deepep":
        notes.append("DeepEP dispatch (a token sent once per destination rank)")
    extras["attention"] = attention_of(row)
    if extras["attention"] != "sdpa":
        notes.append("attention scores materialised (Megatron-LM 2021: fused scale-mask-softmax, no flash kernel)")
    if extras.get("loss_chunks", 1) > 1 and "chunked CE" not in (row.get("notes") or ""):
        notes.append("chunked cross-entropy (torchtune Llama 3.1 configs of that commit)")
    extras["framework"] = row.get("planner_framework") or framework_of(row)
    if extras["framework"] == "megatron":
        extras.update(megatron_options(row, optimizer_text, notes))
    return Workload(seq_len=seq, global_batch=global_batch, method=method, precision=precision,
                    optimizer=optimizer, optimizer_impl=impl, lora_rank=rank, lora_targets=targets, **extras), notes


def _config(row: dict[str, Any], case: Case) -> ParallelConfig:
    par = row["parallelism"]
    dp, tp, pp = par.get("dp") or 1, par.get("tp") or 1, par.get("pp") or 1
    cp, ep = par.get("cp") or 1, _planner_ep(par, case)
    if dp * cp * tp * pp != case.devices:
        dp = case.devices // (cp * tp * pp)
        case.assumptions.append(f"dp set to {dp} so that dp x cp x tp x pp equals the {case.devices} devices")
    gb = case.workload.global_batch
    mbs = row.get("micro_batch")
    if mbs is None:
        # torchtitan's default n_microbatches is the pipeline degree
        mbs = max(gb // (dp * pp), 1)
        case.assumptions.append(f"micro-batch {mbs}: torchtitan's default of pp micro-batches per step")
    fsdp = str(par.get("fsdp") or "")
    if par.get("zero_stage") is not None:
        zero = int(par["zero_stage"])
    elif "SHARD_GRAD_OP" in fsdp:
        zero = 2
    elif fsdp or "distribute_param true" in str(par.get("notes")):
        zero = 3 if dp * cp > 1 or "over 1" not in fsdp else 0  # torchtitan's FSDP shards over dp x cp
    else:
        zero = 0
    recompute_text = str(row.get("activation_recompute") or "").lower()
    if not recompute_text and "torchtune" in str(row.get("framework")):
        recompute_text = _torchtune_checkpointing(case)
    recompute = "full" if recompute_text.startswith("full") else "selective" if "selective" in recompute_text else "none"
    if recompute_text in ("none", "null", "moai default"):
        recompute = "none"
    modules = recompute_modules_of(row)
    if modules is not None:
        # Megatron-Core's selective recomputation of named modules (Megatron-LM transformer_config.py
        # recompute_modules: core_attn, moe_act, mla_up_proj, ...) is not the planner's selective policy
        # (torchtitan's per-op list): the Workload's recompute_modules where the planner models them,
        # else what those modules recompute is counted as kept, an upper bound
        recompute = "none"
        if not set(modules) <= set(RECOMPUTE_MODULES):
            case.assumptions.append(f"Megatron-Core recompute_modules {list(modules)} not modelled: what they "
                                    "recompute is counted as kept (an upper bound on memory)")
    offload = "params" if "cpu offload" in str(row.get("optimizer")).lower() and zero == 3 else "none"
    # torchtune's 70B and 405B configs shard the embedding and the output projection on their own
    # (custom_sharded_layers: ['tok_embeddings', 'output'], "useful for large vocab size models")
    shard_ends = "torchtune" in str(row.get("framework")) and zero == 3 and (row["model_shape"].get("params_b") or 0) >= 70
    if shard_ends:
        case.assumptions.append("embedding and output sharded as FSDP units of their own (torchtune 70B/405B "
                                "configs: custom_sharded_layers)")
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs, num_micro_batches=max(gb // (dp * mbs), 1),
                          recompute=recompute, zero=zero, offload=offload,
                          sequence_parallel=_sequence_parallel(row, tp), vpp=par.get("vpp") or 1, shard_ends=shard_ends,
                          cp=cp, ep=ep)


def _planner_ep(par: dict[str, Any], case: Case) -> int:
    """The planner's ep for a row's expert layout. The planner splits each expert over the TP ranks
    (expert-tensor parallelism = tp, Megatron-Core's default), so tp x ep ranks hold disjoint shares
    of the experts and the ep group spans them. A Megatron run with a smaller expert-TP size (MoE
    parallel folding, --expert-tensor-parallel-size) spreads the experts over etp x ep ranks
    instead: the same share per rank, the same span, is the planner's ep = etp x ep / tp."""
    ep, tp, etp = par.get("ep") or 1, par.get("tp") or 1, par.get("etp")
    if etp is None or etp == tp or (etp * ep) % tp:
        return ep
    folded = etp * ep // tp
    case.assumptions.append(f"expert-TP {etp} x EP {ep} with TP {tp}: the planner's ep {folded} (experts split over "
                            f"tp; the same experts per rank and the same {etp * ep}-rank all-to-all group)")
    return folded


def _torchtune_checkpointing(case: Case) -> str:
    """The row does not say: torchtune's llama3_1 single-device configs enable activation checkpointing,
    unless the claimed tokens/s could not have been reached with it. Recomputation adds a forward
    (2N FLOPs per token) to 6N (full) or 4N (LoRA: no weight gradients of the base)."""
    needed = fraction_of_peak(case, (6 if case.workload.method == "full" else 4) + 2)
    if needed > 1:
        case.assumptions.append(f"activation checkpointing off: with it the claimed tokens/s would need "
                                f"{needed:.0%} of the GPU's peak bf16 FLOP/s")
        return "none"
    case.assumptions.append("activation checkpointing on (the recipe config's default; the row does not say)")
    return "full"


def _sequence_parallel(row: dict[str, Any], tp: int) -> bool:
    """torchtitan's TP plan always shards norms along the sequence (SequenceParallel) and uses
    loss_parallel (torchtitan parallelize_llama.py apply_tp)."""
    if tp == 1:
        return False
    return bool(row["parallelism"].get("sp")) or "torchtitan" in str(row.get("framework"))


def _megatron_tokens_per_s(row: dict[str, Any]) -> float:
    """Narayanan et al. 2021 Eq. 3: 96·B·s·l·h²·(1 + s/6h + V/16lh) FLOPs per iteration, with
    recomputation; per token divide by B·s."""
    shape = row["model_shape"]
    l, h, v, s = shape["layers"], shape["hidden"], shape["vocab"], row["seq_len"]
    per_token = 96 * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    return row["measured"]["tflops_per_gpu"] * 1e12 / per_token
