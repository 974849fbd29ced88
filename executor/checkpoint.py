"""Checkpoints that are never loaded half-written, loaded without running code, and the final model.

A checkpoint is written to `checkpoints/step-NNNNNNNN.tmp/` by every rank (model and optimizer
through torch.distributed.checkpoint: each rank writes its own shards; ZeRO-1's optimizer shard,
which DCP does not know, and each rank's RNG states as per-rank files of tensors), then rank 0
writes `complete.json` (the metadata and a manifest of every file and its size), fsyncs and
renames the folder to `step-NNNNNNNN/`. Only renamed folders whose files match their manifest
are loaded, newest first; one that fails to load is skipped for the one before it. A crash at
any moment leaves at worst a `.tmp` folder, which the next save removes.

Nothing is unpickled freely: the per-rank files load with `torch.load(weights_only=True)`, DCP's
non-tensor items the same way, and DCP's `.metadata` through an unpickler that admits only
DCP's own metadata classes (torch 2.13's FileSystemReader would `pickle.load` it).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from executor.optim import Optimizers
from executor.parallelize import dtensor_parameters
from planner.errors import InvalidRequest

STEP_DIR = re.compile(r"^step-(\d{8})$")
KEEP = 2  # complete checkpoints kept on disk
MARKER = "complete.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def complete_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """The checkpoints renamed into place with their completion marker, newest first."""
    found = []
    root = checkpoint_root(output)
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def latest_complete(output: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose folder was renamed into place with its completion marker."""
    found = complete_checkpoints(output)
    return found[0] if found else None


def damage_reason(path: Path) -> str | None:
    """Why a renamed checkpoint cannot be whole (unreadable marker, a file missing or of another
    size than its manifest says), or None. Files only: no torch, no collectives."""
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {MARKER} is unreadable ({type(exc).__name__})"
    for name, size in (meta.get("files") or {}).items() if isinstance(meta, dict) else ():
        target = path / name
        if not target.is_file():
            return f"{name} is missing"
        if target.stat().st_size != size:
            return f"{name} has {target.stat().st_size} bytes, its manifest says {size}"
    return None if isinstance(meta, dict) else f"its {MARKER} is not an object"


def skipped_damaged(output: Path, warn: Callable[[str], None]) -> list[tuple[int, Path]]:
    """The complete checkpoints newest first, the damaged ones left out with a warning each."""
    usable = []
    for step, path in complete_checkpoints(output):
        reason = damage_reason(path)
        if reason:
            warn(f"skipping checkpoint {path.name}: {reason}")
        else:
            usable.append((step, path))
    return usable


def _state(module: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
    if optimizers.is_zero1 or not optimizers.all:
        return {"model": get_model_state_dict(module)}
    model_sd, optim_sd = get_state_dict(module, optimizers.all)
    return {"model": model_sd, "optim": optim_sd}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _inject_disk_full(step: int) -> None:
    """Fault injection for the full-disk test: EXECUTOR_INJECT_ENOSPC=K makes the checkpoint of
    step K fail after DCP wrote its shards, as a full disk would."""
    if os.environ.get("EXECUTOR_INJECT_ENOSPC") == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def is_disk_full(exc: BaseException | None, depth: int = 0) -> bool:
    """An ENOSPC/EDQUOT anywhere in the error, its causes, or DCP's per-rank failures."""
    if exc is None or depth > 8:
        return False
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    failures = getattr(exc, "failures", None) or {}  # torch.distributed.checkpoint's CheckpointException
    nested = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return any(is_disk_full(e, depth + 1) for e in [exc.__cause__, exc.__context__, *nested]
               if isinstance(e, BaseException))


class RankFailure(RuntimeError):
    """A checkpoint action failed on some rank; every rank raises it."""

    def __init__(self, message: str, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def _agreed(action: Callable[[], None], what: str) -> None:
    """Collective: run `action` on this rank; if it failed on any rank, every rank raises
    RankFailure, so that no rank waits in a collective for one that gave up."""
    error: str | None = None
    disk_full = False
    try:
        action()
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - shared with the other ranks, raised below
        error, disk_full = f"{type(exc).__name__}: {exc}", is_disk_full(exc)
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (error, disk_full))
    failed = [(rank, e, full) for rank, (e, full) in enumerate(reports) if e]
    if not failed:
        return
    rank, message, _ = failed[0]
    raise RankFailure(f"{what} failed on rank {rank}: {message}", any(full for _, _, full in failed))


def save(output: Path, step: int, module: nn.Module, optimizers: Optimizers, meta: dict[str, Any]) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    rank = dist.get_rank()
    root = checkpoint_root(output)
    tmp, final = root / f"step-{step:08d}.tmp", root / f"step-{step:08d}"
    what = f"writing checkpoint {final.name} in {root}"

    def prepare() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write() -> None:
        dcp.save(_state(module, optimizers), checkpoint_id=str(tmp))
        _inject_disk_full(step)
        extra: dict[str, Any] = {"rng": _rng_state(), **optimizers.extra_state()}
        if optimizers.is_zero1:
            extra["zero1_optimizer"] = optimizers.main.optim.state_dict()  # this rank's partition
        torch.save(extra, tmp / f"rank-{rank:05d}.pt")

    def publish() -> None:
        if rank == 0:
            _publish(tmp, final, {**meta, "step": step, "world_size": dist.get_world_size()})
            _prune(root)

    try:
        for action in (prepare, write, publish):
            _agreed(action, what)
    except RankFailure as exc:
        if exc.disk_full:
            raise InvalidRequest(f"the disk is full: {what} failed; free space or give an --output on a "
                                 "larger disk, then add --resume") from None
        raise
    return final


def _publish(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    marker = tmp / MARKER
    with open(marker, "w") as f:
        json.dump({**meta, "files": files}, f)
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


# -- loading without running code -------------------------------------------------------------

# what DCP's `.metadata` pickles besides its own metadata classes (torch 2.13)
METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
                    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
                    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
                    ("torch", "Size"): torch.Size, ("pathlib", "PosixPath"): PosixPath,
                    ("pathlib", "PurePosixPath"): PurePosixPath}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch dtypes and sizes, and paths load; nothing else does."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in METADATA_GLOBALS:
            return METADATA_GLOBALS[(module, name)]
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"{path} holds no checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's non-tensor items (optimizer hyperparameters, step counts) through weights_only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load(path: Path, module: nn.Module, optimizers: Optimizers, expected: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a complete checkpoint; returns its metadata."""
    meta = json.loads((path / MARKER).read_text())
    for key, value in expected.items():
        if meta.get(key) != value:
            raise InvalidRequest(f"checkpoint {path} was written with {key} = {meta.get(key)!r}, this run has "
                                 f"{value!r}; resume with the same plan, or use a new --output")
    state = _state(module, optimizers)
    extra: dict[str, Any] = {}

    def read() -> None:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
        extra.update(torch.load(path / f"rank-{dist.get_rank():05d}.pt", weights_only=True))

    _agreed(read, f"loading checkpoint {path.name}")
    if "optim" in state:
        set_state_dict(module, optimizers.all, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(module, state["model"])
    if optimizers.is_zero1:
        optimizers.main.optim.load_state_dict(extra["zero1_optimizer"])
    optimizers.load_extra_state(extra)
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return meta


def load_newest(output: Path, module: nn.Module, optimizers: Optimizers, expected: dict[str, Any]) -> int | None:
    """Collective: restore the newest checkpoint that is whole and loads; returns its step, or
    None when there is none. A damaged or unloadable one is skipped with a one-line warning
    (rank 0, on stdout: the launcher keeps the workers' stderr in its log); when every one
    fails, the run is refused (starting over would silently discard them)."""
    def warn(line: str) -> None:
        if dist.get_rank() == 0:
            print(f"planner train: warning: {line}", flush=True)

    found = complete_checkpoints(output)
    for step, path in skipped_damaged(output, warn):
        try:
            load(path, module, optimizers, expected)  # a checkpoint of another plan is refused, not skipped
            return step
        except RankFailure as exc:
            warn(f"skipping checkpoint {path.name}: {str(exc).splitlines()[0]}")
    if found:
        raise InvalidRequest(f"no checkpoint in {checkpoint_root(output)} can be loaded; start a new run "
                             "with a new --output")
    return None


# -- the final model ---------------------------------------------------------------------------

def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded state of `module` on every rank, on the CPU."""
    with dtensor_parameters(module):
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
