"""The executor against the Hugging Face Trainer on one GPU, and measured memory against the planner.

    python benchmarks/gpu_executor_vs_hf.py --out DIR            # one H100, ~5-8 minutes
    python benchmarks/gpu_executor_vs_hf.py --out DIR --dry-run  # the same code paths on CPU, llama-tiny

(a) the executor trains the `llama3.2-1b` catalog shape (random init, bf16 mixed precision over fp32
    master weights, full fine-tune, sequence 2048, fused AdamW, SDPA, torch.compile of the decoder
    layers and the loss as the Plan says) through `planner train`;
(b) the Hugging Face Trainer trains the same model at the same micro-batch, accumulation, sequence,
    optimizer and learning rate (bf16=True, sdpa, adamw_torch_fused, no clipping, constant LR);
(c) a memory sweep of the executor (eager) over micro-batch and recomputation, next to
    `planner predict`'s allocated_peak_bytes and peak_bytes for the same configuration;
(d) every run as a run record (format llm-planner/run@1) under DIR/runs/, and a table last.

MFU = tokens/s x model FLOPs per token / peak, model FLOPs as the planner counts them
(planner/cost/compute.py: 6N + 12·L·H·Q·T, PaLM App. B) against 989.4 TFLOP/s dense bf16 (H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the model learns to plan memory and time for training large language models on many devices "
         "while pipeline stages exchange activations and optimizer states shard across data parallel ranks").split()
# time limits (s) of the executor run with compilation, the HF Trainer run, and each sweep run
GPU = {"model": "llama3.2-1b", "gpu": "h100-sxm-80gb", "seq_len": 2048, "global_batch": 16, "steps": 30,
       "precision": "bf16", "impl": "fused", "sweep_steps": 4, "lr": 1e-5, "limits_s": (210, 150, 60)}
DRY = {"model": "llama-tiny", "gpu": "cpu", "seq_len": 128, "global_batch": 4, "steps": 4,
       "precision": "fp32", "impl": "foreach", "sweep_steps": 3, "lr": 1e-3, "limits_s": (300, 300, 300)}
SWEEP = [(1, "none"), (2, "none"), (4, "none"), (4, "full"), (4, "selective")]
DRY_SWEEP = [(1, "none"), (2, "selective")]


def request(setup: dict, compile_: bool):
    from planner import api

    return api.Request(model=setup["model"], gpu=setup["gpu"], gpus=1, gpus_per_node=1, seq_len=setup["seq_len"],
                       global_batch=setup["global_batch"], precision=setup["precision"],
                       optimizer_impl=setup["impl"], compile=compile_)


def plan_for(setup: dict, mbs: int, recompute: str, compile_: bool, path: Path) -> dict:
    from planner import api
    from planner.plan import ParallelConfig, save_plan

    req = request(setup, compile_)
    config = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=mbs, num_micro_batches=setup["global_batch"] // mbs,
                            recompute=recompute)
    document = api.make_plan(req, api.predict(req, config)).to_dict()
    save_plan(str(path), document)
    return document


def largest_fitting_micro_batch(setup: dict, headroom: float = 0.9) -> int:
    """The largest micro-batch (dividing the global batch) the planner says fits with 10% to spare."""
    from planner import api
    from planner.plan import ParallelConfig

    req = request(setup, True)
    capacity = api.resolve(req).hardware.memory_bytes
    for mbs in (8, 4, 2, 1):
        if setup["global_batch"] % mbs:
            continue
        config = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=mbs, num_micro_batches=setup["global_batch"] // mbs)
        if api.predict(req, config)["memory"]["peak_bytes"] <= headroom * capacity:
            return mbs
    return 1


def flops_per_token(setup: dict) -> tuple[float, float]:
    """(the planner's model FLOPs per token, the device's dense peak FLOP/s)."""
    from planner import api
    from planner.cost.compute import model_flops_per_token

    resolved = api.resolve(request(setup, False))
    dtype = "bf16" if setup["precision"] == "bf16" else "fp32"
    return model_flops_per_token(resolved.context, resolved.context.regime(False)), resolved.hardware.peak(dtype)


def write_data(path: Path, tokens: int, seed: int = 0) -> None:
    """Synthetic Alpaca rows (the byte tokenizer makes one token per character)."""
    rng = random.Random(seed)
    rows, total = [], 0
    while total < tokens:
        instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
        output = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))
        rows.append({"instruction": instruction, "input": "", "output": output})
        total += len(instruction) + len(output) + 120
    path.write_text(json.dumps(rows))


def run_executor(plan: Path, data: Path, out: Path, steps: int, lr: float, timeout_s: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "planner.cli", "train", "--plan", str(plan), "--data", str(data), "--steps", str(steps),
           "--output", str(out), "--lr", str(lr), "--no-save", "--no-store", "--no-progress"]
    started = time.perf_counter()
    proc = _run(cmd, env, timeout_s)
    if out.exists():
        (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    record = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else \
        {"status": "failed", "error": proc.stderr[-500:], "measured": {}}
    record.setdefault("details", {})["wall_s"] = time.perf_counter() - started
    return record


# -- the Hugging Face Trainer (run in its own process: `--hf PLAN`) ------------------------------

def hf_main(plan_path: Path, data: Path, out: Path, steps: int, lr: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from executor.data import PackedData, load_examples
    from executor.measure import Recorder, environment, run_record, write_json
    from executor.model import hf_config
    from executor.tokenizer import ByteTokenizer
    from planner.plan import load_plan

    document = load_plan(str(plan_path))
    spec, workload, config = document.model, document.workload, document.config
    cuda = torch.cuda.is_available() and document.hardware.vendor != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = ByteTokenizer()
    examples, _ = load_examples(str(data), tokenizer, 0.1)
    packed = PackedData(examples, workload.seq_len, workload.global_batch, 0, tokenizer.pad_id)
    ids, labels = packed.sequences(0, workload.global_batch * steps)
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(spec, workload), dtype=torch.float32,
                                                 attn_implementation=workload.attention)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.num_micro_batches, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        optim="adamw_torch_fused" if workload.optimizer_impl == "fused" else "adamw_torch",
        bf16=workload.precision == "bf16", gradient_checkpointing=config.recompute == "full",
        logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, use_cpu=not cuda)
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                     callbacks=[StepTimer()]).train()
    recorder = Recorder(workload.tokens_per_step, 1)
    for step, seconds in enumerate(times, start=1):
        recorder.add(step, float("nan"), seconds)
    if cuda:
        recorder.note_memory(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
    measured = recorder.measured()
    measured["loss_last"] = float(result.training_loss)
    measured["loss_first"] = None
    record = run_record("finished", None, document.to_dict(), measured, environment(device, 1),
                        {"runner": "huggingface-trainer", "note": "origin 'user': the same plan run by the HF Trainer"})
    record["origin"] = "user"
    write_json(out / "summary.json", record)


def _run(cmd: list[str], env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """A child with a time limit, so that one hung run cannot eat the whole budget."""
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return subprocess.CompletedProcess(cmd, 124, text(exc.stdout), text(exc.stderr) + f"\ntimed out after {timeout_s:.0f} s")


def run_hf(plan: Path, data: Path, out: Path, steps: int, lr: float, timeout_s: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf", str(plan), "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--lr", str(lr)]
    proc = _run(cmd, env, timeout_s)
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    return {"status": "failed", "error": proc.stderr[-500:], "measured": {}}


# -- the whole benchmark ---------------------------------------------------------------------------

def row(name: str, record: dict, flops: float, peak: float) -> dict:
    m, prediction = record.get("measured") or {}, (record.get("plan") or {}).get("prediction") or {}
    tps = m.get("tokens_per_s")
    return {"run": name, "status": record.get("status"), "error": record.get("error"), "tokens_per_s": tps,
            "mfu": tps * flops / peak if tps else None,
            "peak_allocated_bytes": m.get("peak_allocated_bytes"), "peak_reserved_bytes": m.get("peak_reserved_bytes"),
            "predicted_tokens_per_s": prediction.get("time", {}).get("tokens_per_s"),
            "predicted_mfu": prediction.get("time", {}).get("mfu"),
            "predicted_allocated_bytes": prediction.get("memory", {}).get("allocated_peak_bytes"),
            "predicted_peak_bytes": prediction.get("memory", {}).get("peak_bytes")}


def table(rows: list[dict]) -> str:
    def gib(v):
        return f"{v / 2**30:.2f}" if v else "-"

    def num(v, fmt):
        return fmt.format(v) if v is not None else "-"

    lines = [f"{'run':28}{'status':>9}{'tok/s':>10}{'MFU':>7}{'alloc':>8}{'resv':>8}{'pred tok/s':>11}"
             f"{'pred MFU':>9}{'pred alloc':>11}{'pred resv':>10}"]
    for r in rows:
        lines.append(f"{r['run']:28}{r['status'] or '-':>9}{num(r['tokens_per_s'], '{:,.0f}'):>10}"
                     f"{num(r['mfu'], '{:.1%}'):>7}{gib(r['peak_allocated_bytes']):>8}{gib(r['peak_reserved_bytes']):>8}"
                     f"{num(r['predicted_tokens_per_s'], '{:,.0f}'):>11}{num(r['predicted_mfu'], '{:.1%}'):>9}"
                     f"{gib(r['predicted_allocated_bytes']):>11}{gib(r['predicted_peak_bytes']):>10}")
    return "\n".join(lines) + "\n(memory in GiB: measured max_memory_allocated / max_memory_reserved; CPU: MemTracker)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for data, runs and results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, llama-tiny, a few steps: the same code paths")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-main", action="store_true", help="only the memory sweep (c)")
    parser.add_argument("--micro-batch", type=int, help="micro-batch for (a) and (b) (default: the largest the "
                        "planner says fits with 10%% to spare; the HF Trainer may need a smaller one)")
    parser.add_argument("--hf", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.hf:
        hf_main(Path(args.hf), Path(args.data), out, args.steps, args.lr)
        return 0
    setup, sweep = (DRY, DRY_SWEEP) if args.dry_run else (GPU, SWEEP)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    data = out / "data.json"
    write_data(data, setup["seq_len"] * setup["global_batch"] * (setup["steps"] + 2))
    flops, peak = flops_per_token(setup)
    mbs = args.micro_batch or largest_fitting_micro_batch(setup)
    rows, records = [], {}
    limit_executor, limit_hf, limit_sweep = setup["limits_s"]
    if not args.skip_main:
        plan_c = plan_for(setup, mbs, "none", not args.dry_run, out / "plan-executor.json")
        records["executor"] = run_executor(out / "plan-executor.json", data, out / "executor", setup["steps"],
                                           setup["lr"], limit_executor)
        plan_for(setup, mbs, "none", False, out / "plan-hf.json")
        records["hf-trainer"] = run_hf(out / "plan-hf.json", data, out / "hf", setup["steps"], setup["lr"], limit_hf)
        rows += [row(f"executor mbs{mbs} compile={plan_c['workload']['compile']}", records["executor"], flops, peak),
                 row(f"hf-trainer mbs{mbs}", records["hf-trainer"], flops, peak)]
    for sweep_mbs, recompute in ([] if args.skip_sweep else sweep):
        name = f"sweep-mbs{sweep_mbs}-{recompute}"
        if setup["global_batch"] % sweep_mbs:
            continue
        plan_for(setup, sweep_mbs, recompute, False, out / f"plan-{name}.json")
        records[name] = run_executor(out / f"plan-{name}.json", data, out / name, setup["sweep_steps"], setup["lr"],
                                     limit_sweep)
        rows.append(row(name, records[name], flops, peak))
    for name, record in records.items():
        if "format" in record:
            (out / "runs" / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    ours, theirs = (rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]) if not args.skip_main else (None, None)
    result = {"setup": setup, "micro_batch_size": mbs, "model_flops_per_token": flops, "peak_flops": peak,
              "speedup_vs_hf": ours / theirs if ours and theirs else None, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    if result["speedup_vs_hf"]:
        print(f"executor / HF Trainer tokens/s: {result['speedup_vs_hf']:.2f}x (target >= 1.3x; MFU target >= 45%)")
    return 0 if all(r["status"] == "finished" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
