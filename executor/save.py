"""The final model after training, in the Hugging Face format so that `from_pretrained` loads it:
safetensors (one file, or one per pipeline stage with an index) and config.json; for LoRA the
adapter as peft saves it (adapter_model.safetensors + adapter_config.json), and with --merge-lora
also the model with the adapter merged in (DIR/merged, peft's merge_and_unload + save_pretrained).
A tokenizer given as a folder is saved beside the weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from executor.checkpoint import full_state, save_adapter, save_index, save_model
from executor.mesh import Topology
from executor.options import RunOptions
from executor.setup import Prepared
from planner.specs import ModelSpec, Workload


def save_final(folder: Path, prepared: Prepared, spec: ModelSpec, workload: Workload, topo: Topology,
               options: RunOptions | None = None) -> None:
    """Collective. The first rank of each stage's data/tensor group writes that stage's part."""
    state = full_state(prepared.state_module)  # every rank takes part in the gathers
    if workload.method != "full":
        if topo.rank == 0:
            save_adapter(folder, prepared.peft_model, state)
            if options is not None and options.merge_lora:
                save_merged(options.output_dir / "merged", state, spec, workload)
                save_tokenizer(options.output_dir / "merged", options.tokenizer)
    else:
        _save_full(folder, state, spec, topo)
    if topo.rank == 0 and options is not None:
        save_tokenizer(folder, options.tokenizer)
    dist.barrier()


def _save_full(folder: Path, state: dict[str, torch.Tensor], spec: ModelSpec, topo: Topology) -> None:
    pp = topo.config.pp
    writer = topo.dp_rank == 0 and topo.tp_rank == 0
    file_name = "model.safetensors" if pp == 1 else f"model-{topo.pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    if writer:
        save_model(folder, state, spec.hf_config, file_name)
    if pp > 1:
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, (file_name, sorted(state)) if writer else None)
        if topo.rank == 0:
            save_index(folder, {file: keys for file, keys in filter(None, names)})


def save_merged(folder: Path, state: dict[str, torch.Tensor], spec: ModelSpec, workload: Workload) -> None:
    """A CPU copy of the model with the trained adapter, merged into the base weights (W + B A x
    alpha / r, peft's merge_and_unload), saved with save_pretrained as safetensors."""
    from transformers import AutoModelForCausalLM

    from executor.model import add_lora, hf_config, param_dtype

    with torch.device("cpu"):
        model = add_lora(AutoModelForCausalLM.from_config(hf_config(spec, workload), dtype=param_dtype(workload)),
                         workload)
    model.load_state_dict(state, strict=True)
    merged = model.merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)


def save_tokenizer(folder: Path, tokenizer: str | None) -> None:
    """A tokenizer folder's files beside the model (the built-in byte tokenizer has none)."""
    if tokenizer in (None, "bytes"):
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(Path(tokenizer).expanduser()), local_files_only=True).save_pretrained(str(folder))
