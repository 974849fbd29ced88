"""More measured runs of the executor on one GPU, for calibration: several models, sequences,
methods and recomputation policies, a few steps each, each written as a run record.

    python benchmarks/gpu_runs.py --out DIR            # one H100, a few minutes
    python benchmarks/gpu_runs.py --out DIR --dry-run  # llama-tiny on CPU, the same code path

Each run: the planner's prediction for the plan (`planner predict`), then `planner train` with
it; the record (format llm-planner/run@1) holds both, so `planner runs import DIR/runs` stores
them and `planner calibrate` can fit to them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_executor_vs_hf import row, run_executor, table, write_data  # noqa: E402

# (model, seq_len, micro-batch, micro-batches, recompute, method, compile)
GPU_RUNS = [
    ("llama3.2-1b", 8192, 1, 2, "none", "full", False),
    ("llama3.2-1b", 8192, 2, 2, "full", "full", False),
    ("qwen2.5-0.5b", 2048, 8, 2, "none", "full", False),
    ("llama3.2-1b", 2048, 8, 2, "none", "lora", False),
    ("llama3.2-3b", 2048, 2, 2, "full", "full", False),
    ("llama3.2-1b", 2048, 8, 2, "selective", "full", True),
    ("qwen2.5-0.5b", 4096, 4, 2, "full", "full", True),
]
DRY_RUNS = [("llama-tiny", 128, 2, 2, "none", "full", False), ("llama-tiny", 128, 2, 2, "full", "lora", False)]


def plan(model: str, gpu: str, seq: int, mbs: int, micro: int, recompute: str, method: str, compile_: bool,
         precision: str, path: Path) -> dict:
    from planner import api
    from planner.plan import ParallelConfig, save_plan

    request = api.Request(model=model, gpu=gpu, gpus=1, gpus_per_node=1, seq_len=seq, global_batch=mbs * micro,
                          method=method, precision=precision, optimizer_impl="fused" if precision == "bf16" else "foreach",
                          compile=compile_)
    config = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=mbs, num_micro_batches=micro, recompute=recompute)
    document = api.make_plan(request, api.predict(request, config)).to_dict()
    save_plan(str(path), document)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--limit-s", type=float, default=75.0, help="time limit of one run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs, gpu, precision = (DRY_RUNS, "cpu", "fp32") if args.dry_run else (GPU_RUNS, "h100-sxm-80gb", "bf16")
    data = out / "data.json"
    write_data(data, 8192 * 4 * (args.steps + 2))
    rows = []
    for model, seq, mbs, micro, recompute, method, compile_ in runs:
        name = f"{model}-s{seq}-mbs{mbs}-{recompute}-{method}{'-compiled' if compile_ else ''}"
        document = plan(model, gpu, seq, mbs, micro, recompute, method, compile_, precision, out / f"{name}.plan.json")
        record = run_executor(out / f"{name}.plan.json", data, out / name, args.steps, 1e-5, args.limit_s)
        if "format" in record:
            (out / "runs" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        predicted = document["prediction"]["time"]
        mfu_per_token_per_s = predicted["mfu"] / predicted["tokens_per_s"]  # model FLOPs per token / peak FLOP/s
        rows.append(row(name[:28], record, mfu_per_token_per_s, 1.0))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
