"""The grid of configurations the planner's memory model is held to, and the driver that traces
it into calibration/data/oracle_grid.json (with the torch / transformers / peft versions).

Each point names a model from the catalog, the workload options of `planner predict` and the
parallel configuration; the global batch is dp x micro-batch x micro-batches, the device count
dp x tp. The normal test run compares the planner with the stored traces; re-tracing is
`python -m calibration.oracle_grid` (all points, about ten minutes) or a `slow` test (a sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from planner.progress import add_flag, bars, progress

GRID_FILE = Path(__file__).parent / "data" / "oracle_grid.json"
GRID_FORMAT = "llm-planner/oracle-grid@1"
GPU = "h100-sxm-80gb"  # allocated bytes do not depend on it; the reserved peak (not traced) does


def _point(name: str, model: str, seq: int, mbs: int, recompute: str = "none", dp: int = 1, tp: int = 1,
           zero: int = 0, m: int = 1, sp: bool = False, ends: bool = False, cp: int = 1, ep: int = 1,
           **workload: Any) -> dict[str, Any]:
    config = {"dp": dp, "tp": tp, "pp": 1, "micro_batch_size": mbs, "num_micro_batches": m,
              "recompute": recompute, "zero": zero, "sequence_parallel": sp}
    if ends:
        config["shard_ends"] = True
    config.update({k: v for k, v in (("cp", cp), ("ep", ep)) if v > 1})
    return {"name": name, "model": model, "workload": {"seq_len": seq, **workload}, "config": config}


ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

GRID: list[dict[str, Any]] = [
    # one device: autocast over fp32 parameters, foreach AdamW unless stated
    _point("llama3-8b 1x1024", "llama3-8b", 1024, 1),
    _point("llama3-8b 2x2048 full", "llama3-8b", 2048, 2, "full"),
    _point("llama3-8b 1x4096 selective", "llama3-8b", 4096, 1, "selective"),
    _point("llama3-8b 2x2048 accumulate 4", "llama3-8b", 2048, 2, m=4),
    _point("llama3-8b fp32 1x1024", "llama3-8b", 1024, 1, precision="fp32"),
    _point("llama3-8b fused 1x2048 full", "llama3-8b", 2048, 1, "full", optimizer_impl="fused"),
    _point("llama3-8b forloop 1x2048 selective", "llama3-8b", 2048, 1, "selective", optimizer_impl="forloop"),
    _point("llama3-8b master-bf16 1x2048", "llama3-8b", 2048, 1, master_dtype="bf16"),
    _point("llama3.2-1b 8x512", "llama3.2-1b", 512, 8),
    _point("llama3.2-1b 4x2048 selective", "llama3.2-1b", 2048, 4, "selective"),
    _point("llama3.2-3b 2x4096 full", "llama3.2-3b", 4096, 2, "full"),
    _point("mistral-7b 1x4096", "mistral-7b", 4096, 1),
    _point("mistral-7b 2x2048 selective", "mistral-7b", 2048, 2, "selective"),
    _point("qwen2.5-0.5b 8x1024", "qwen2.5-0.5b", 1024, 8),
    _point("qwen2.5-0.5b 4x4096 full", "qwen2.5-0.5b", 4096, 4, "full"),
    _point("qwen2.5-7b 1x2048", "qwen2.5-7b", 2048, 1),
    _point("qwen2.5-7b 2x4096 selective", "qwen2.5-7b", 4096, 2, "selective"),
    _point("gpt2-xl 8x1024", "gpt2-xl", 1024, 8),
    _point("gpt2-xl 4x1024 full", "gpt2-xl", 1024, 4, "full"),
    _point("gpt2-xl 2x512 selective", "gpt2-xl", 512, 2, "selective"),
    # LoRA: frozen bf16 base, fp32 adapters
    _point("llama3-8b lora r8 q,v 2x2048", "llama3-8b", 2048, 2, method="lora", lora_rank=8, lora_targets=("q", "v")),
    _point("llama3-8b lora r16 all 1x4096 full", "llama3-8b", 4096, 1, "full", method="lora", lora_rank=16,
           lora_targets=ALL_TARGETS),
    _point("llama3-70b lora r64 all 1x1024 full", "llama3-70b", 1024, 1, "full", method="lora", lora_rank=64,
           lora_targets=ALL_TARGETS),
    _point("mistral-7b lora r32 attn 1x4096", "mistral-7b", 4096, 1, method="lora", lora_rank=32,
           lora_targets=("q", "k", "v", "o")),
    _point("qwen2.5-7b lora r16 mlp 2x2048", "qwen2.5-7b", 2048, 2, method="lora", lora_rank=16,
           lora_targets=("gate", "up", "down")),
    _point("llama3.2-1b lora r64 all 1x8192 full", "llama3.2-1b", 8192, 1, "full", method="lora", lora_rank=64,
           lora_targets=ALL_TARGETS),
    _point("mixtral-8x7b lora r8 q,v 1x2048", "mixtral-8x7b", 2048, 1, method="lora", lora_rank=8,
           lora_targets=("q", "v")),
    # FSDP2 over 8 ranks (ZeRO 3 unless stated)
    _point("llama3-8b fsdp8 1x4096", "llama3-8b", 4096, 1, dp=8, zero=3),
    _point("llama3-8b fsdp8 2x2048 full", "llama3-8b", 2048, 2, "full", dp=8, zero=3),
    _point("llama3-70b fsdp8 1x4096 full", "llama3-70b", 4096, 1, "full", dp=8, zero=3),
    _point("llama3-70b fsdp8 1x8192 selective", "llama3-70b", 8192, 1, "selective", dp=8, zero=3),
    _point("mistral-7b fsdp8 4x1024 selective", "mistral-7b", 1024, 4, "selective", dp=8, zero=3),
    _point("qwen2.5-7b fsdp8 2x4096 full", "qwen2.5-7b", 4096, 2, "full", dp=8, zero=3),
    _point("gpt2-xl fsdp8 8x1024", "gpt2-xl", 1024, 8, dp=8, zero=3),
    _point("mixtral-8x7b fsdp8 1x4096 full", "mixtral-8x7b", 4096, 1, "full", dp=8, zero=3),
    _point("llama3.2-3b zero2 fsdp8 4x2048", "llama3.2-3b", 2048, 4, dp=8, zero=2),
    _point("llama3-8b fsdp8 1x2048 full accumulate 2", "llama3-8b", 2048, 1, "full", dp=8, zero=3, m=2),
    # FSDP2 over 64 ranks
    _point("llama3-70b fsdp64 1x4096 full", "llama3-70b", 4096, 1, "full", dp=64, zero=3),
    # the embedding and the LM head as FSDP units of their own (shard_ends)
    _point("llama3-8b fsdp8 1x4096 shard-ends", "llama3-8b", 4096, 1, dp=8, zero=3, ends=True),
    _point("llama3-70b fsdp64 2x4096 full fused shard-ends", "llama3-70b", 4096, 2, "full", dp=64, zero=3, ends=True,
           optimizer_impl="fused"),
    _point("llama3-8b fsdp8 1x2048 full accumulate 2 shard-ends", "llama3-8b", 2048, 1, "full", dp=8, zero=3, m=2,
           ends=True),
    _point("llama3-70b fsdp64 2x8192 full", "llama3-70b", 8192, 2, "full", dp=64, zero=3),
    _point("llama3-8b fsdp64 4x4096 selective", "llama3-8b", 4096, 4, "selective", dp=64, zero=3),
    _point("mixtral-8x7b fsdp64 2x4096 full", "mixtral-8x7b", 4096, 2, "full", dp=64, zero=3),
    _point("qwen2.5-7b fsdp64 1x8192", "qwen2.5-7b", 8192, 1, dp=64, zero=3),
    _point("qwen2.5-0.5b fsdp64 8x2048", "qwen2.5-0.5b", 2048, 8, dp=64, zero=3),
    # tensor parallel (DTensor), alone and under FSDP2
    _point("llama3-8b tp2 1x2048", "llama3-8b", 2048, 1, tp=2),
    _point("llama3-8b tp4 2x4096 full", "llama3-8b", 4096, 2, "full", tp=4),
    _point("mistral-7b tp2 1x4096 selective", "mistral-7b", 4096, 1, "selective", tp=2),
    _point("qwen2.5-7b tp4 1x2048", "qwen2.5-7b", 2048, 1, tp=4),
    _point("llama3-8b tp4 sequence-parallel 1x4096 full", "llama3-8b", 4096, 1, "full", tp=4, sp=True),
    _point("llama3-70b tp4 fsdp16 1x4096 full", "llama3-70b", 4096, 1, "full", dp=16, tp=4, zero=3),
    _point("llama3-8b tp2 fsdp4 2x2048 selective", "llama3-8b", 2048, 2, "selective", dp=4, tp=2, zero=3),
    # context parallelism (each rank traces seq_len / cp tokens with the ring attention's buffers,
    # calibration/ring_attention.py; FSDP2 over dp x cp) and expert parallelism (each rank's
    # experts / ep routed experts, FSDP2 over dp x cp / ep; calibration/fake_model.py hf_config)
    _point("llama3.2-1b cp2 fsdp2 1x8192", "llama3.2-1b", 8192, 1, dp=2, zero=3, cp=2),
    _point("llama3-8b cp2 fsdp4 1x16384", "llama3-8b", 16384, 1, dp=4, zero=3, cp=2),
    _point("llama3-8b cp4 fsdp2 1x32768 full", "llama3-8b", 32768, 1, "full", dp=2, zero=3, cp=4),
    _point("llama3-8b tp2 cp2 fsdp2 1x8192 selective", "llama3-8b", 8192, 1, "selective", dp=2, tp=2, zero=3, cp=2),
    _point("mixtral-8x7b ep4 fsdp8 1x4096 full", "mixtral-8x7b", 4096, 1, "full", dp=8, zero=3, ep=4),
    _point("mixtral-8x7b ep2 fsdp16 2x4096 selective", "mixtral-8x7b", 4096, 2, "selective", dp=16, zero=3, ep=2),
    _point("mixtral-8x7b ep2 cp2 fsdp4 1x8192 full", "mixtral-8x7b", 8192, 1, "full", dp=4, zero=3, cp=2, ep=2),
]


def request_and_config(point: dict[str, Any]):
    """The planner Request and ParallelConfig of a grid point (what `planner predict` would get)."""
    from planner.api import Request
    from planner.plan import ParallelConfig

    config = ParallelConfig(**point["config"])
    workload = dict(point["workload"])
    if "lora_targets" in workload:
        workload["lora_targets"] = tuple(workload["lora_targets"])
    global_batch = config.dp * config.micro_batch_size * config.num_micro_batches
    model = point["model"]
    shipped = Path(__file__).resolve().parents[1] / model  # a config.json shipped in the repository
    if model.endswith(".json") and shipped.is_file():
        model = str(shipped)
    request = Request(model=model, gpu=GPU, gpus=config.devices, global_batch=global_batch, **workload)
    return request, config


def trace_point(point: dict[str, Any]) -> dict[str, Any]:
    from calibration.oracle import trace
    from planner.api import resolve

    request, config = request_and_config(point)
    resolved = resolve(request)
    return {**point, "oracle": trace(resolved.spec, resolved.workload, config)}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def load_grid(path: str | Path | None = None) -> dict[str, Any]:
    from planner.errors import InvalidRequest, read_json

    target = Path(path) if path else GRID_FILE
    document = read_json(target, "oracle grid")
    if not isinstance(document, dict) or document.get("format") != GRID_FORMAT:
        raise InvalidRequest(f"{target} is not an oracle grid ({GRID_FORMAT}); write one with "
                             "`python -m calibration.oracle_grid`")
    return document


def _write(target: Path, points: list[dict[str, Any] | None]) -> None:
    document = {"format": GRID_FORMAT, **versions(), "points": [p for p in points if p is not None]}
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    tmp.replace(target)


def _trace_all(points: list[dict[str, Any]], jobs: int, advance: Callable[[], None]):
    """Each point in a fresh process (no fake process group or DTensor cache carried over);
    `advance` is called as each one ends, failed or not."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(trace_point, point): point["name"] for point in points}
        for future in as_completed(futures):
            advance()
            try:
                traced = future.result()
            except Exception as exc:  # one failed point must not lose the others' traces
                print(f"{futures[future]}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            print(f"{traced['name']}: {traced['oracle']['peak_bytes'] / 2**30:.2f} GiB "
                  f"({traced['oracle']['trace_seconds']:.0f} s)", file=sys.stderr, flush=True)
            yield traced["name"], traced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration.oracle_grid",
                                     description="trace the oracle grid into calibration/data/oracle_grid.json")
    parser.add_argument("--only", action="append", default=[], help="trace only points whose name contains this")
    parser.add_argument("--output", default=str(GRID_FILE), help="where to write (points not traced are kept)")
    parser.add_argument("--jobs", type=int, default=2, help="processes tracing in parallel (default 2)")
    add_flag(parser)
    args = parser.parse_args(argv)
    target = Path(args.output)
    previous = {p["name"]: p for p in load_grid(target)["points"]} if target.exists() else {}
    chosen = [p for p in GRID if not args.only or any(part in p["name"] for part in args.only)]
    traced: dict[str, dict[str, Any]] = {}
    with bars(not args.no_progress), progress(len(chosen), "tracing the oracle grid") as advance:
        for name, point in _trace_all(chosen, args.jobs, advance):
            traced[name] = point
            _write(target, [traced.get(p["name"], previous.get(p["name"])) for p in GRID])  # after each point
    missing = len(chosen) - len(traced)
    if missing:
        print(f"{missing} point(s) failed; the others are written to {target}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
