"""The final model after training: transformers-loadable safetensors (one file, or one per
pipeline stage with an index), or for LoRA only the adapter in peft's layout."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from executor.checkpoint import full_state, save_adapter, save_index, save_model
from executor.mesh import Topology
from executor.setup import Prepared
from planner.specs import ModelSpec, Workload


def save_final(folder: Path, prepared: Prepared, spec: ModelSpec, workload: Workload, topo: Topology) -> None:
    """Collective. The first rank of each stage's data/tensor group writes that stage's part."""
    state = full_state(prepared.state_module)  # every rank takes part in the gathers
    writer = topo.dp_rank == 0 and topo.tp_rank == 0
    pp = topo.config.pp
    if workload.method != "full":
        if topo.rank == 0:
            save_adapter(folder, prepared.peft_model, state)
        dist.barrier()
        return
    file_name = "model.safetensors" if pp == 1 else f"model-{topo.pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    if writer:
        save_model(folder, state, spec.hf_config, file_name)
    if pp > 1:
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, (file_name, sorted(state)) if writer else None)
        if topo.rank == 0:
            save_index(folder, {file: keys for file, keys in filter(None, names)})
    dist.barrier()
