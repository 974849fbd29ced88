"""Checkpoints that are never loaded half-written, and the final model.

A checkpoint is written to `checkpoints/step-NNNNNNNN.tmp/` by every rank (model and optimizer
through torch.distributed.checkpoint: each rank writes its own shards; ZeRO-1's optimizer shard,
which DCP does not know, and each rank's RNG states as per-rank files), then rank 0 writes
`complete.json`, fsyncs and renames the folder to `step-NNNNNNNN/`. Only renamed folders holding
`complete.json` are ever loaded; a crash at any moment leaves at worst a `.tmp` folder, which
the next save or resume removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from executor.optim import Optimizers
from planner.errors import InvalidRequest

STEP_DIR = re.compile(r"^step-(\d{8})$")
KEEP = 2  # complete checkpoints kept on disk


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def latest_complete(output: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose folder was renamed into place with its completion marker."""
    found = []
    root = checkpoint_root(output)
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / "complete.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def _state(module: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
    if optimizers.is_zero1 or not optimizers.all:
        return {"model": get_model_state_dict(module)}
    model_sd, optim_sd = get_state_dict(module, optimizers.all)
    return {"model": model_sd, "optim": optim_sd}


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(output: Path, step: int, module: nn.Module, optimizers: Optimizers, meta: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    rank = dist.get_rank()
    root = checkpoint_root(output)
    tmp, final = root / f"step-{step:08d}.tmp", root / f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(module, optimizers), checkpoint_id=str(tmp))
    extra = {"rng": _rng_state(), **optimizers.extra_state()}
    if optimizers.is_zero1:
        extra["zero1_optimizer"] = optimizers.main.optim.state_dict()  # this rank's partition
    torch.save(extra, tmp / f"rank-{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _publish(tmp, final, {**meta, "step": step, "world_size": dist.get_world_size()})
        _prune(root)
    dist.barrier()
    return final


def _publish(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    marker = tmp / "complete.json"
    with open(marker, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path) -> None:
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob("*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


def load(path: Path, module: nn.Module, optimizers: Optimizers, expected: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a complete checkpoint; returns its metadata."""
    meta = json.loads((path / "complete.json").read_text())
    for key, value in expected.items():
        if meta.get(key) != value:
            raise InvalidRequest(f"checkpoint {path} was written with {key} = {meta.get(key)!r}, this run has "
                                 f"{value!r}; resume with the same plan, or use a new --output")
    state = _state(module, optimizers)
    dcp.load(state, checkpoint_id=str(path))
    if "optim" in state:
        set_state_dict(module, optimizers.all, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(module, state["model"])
    extra = torch.load(path / f"rank-{dist.get_rank():05d}.pt", weights_only=False)
    if optimizers.is_zero1:
        optimizers.main.optim.load_state_dict(extra["zero1_optimizer"])
    optimizers.load_extra_state(extra)
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return meta


# -- the final model ---------------------------------------------------------------------------

def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded state of `module` on every rank, on the CPU."""
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_model(folder: Path, state: dict[str, torch.Tensor], hf_config: dict[str, Any], file_name: str) -> None:
    """transformers-loadable safetensors (a tied LM head is left out, as transformers saves it)."""
    from safetensors.torch import save_file

    if hf_config.get("tie_word_embeddings"):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (file_name + ".tmp")
    save_file({k: v.clone() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / file_name)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def save_index(folder: Path, names_by_file: dict[str, list[str]]) -> None:
    """model.safetensors.index.json for a model saved in several files (one per pipeline stage)."""
    weight_map = {name: file for file, names in names_by_file.items() for name in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2) + "\n")


def save_adapter(folder: Path, peft_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """LoRA: only the adapter (adapter_model.safetensors + adapter_config.json), as peft saves it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(peft_model, state_dict=state)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in adapter.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(folder))
