"""`planner train` end to end on CPU: suggest -> plan -> train, the run record, refusals,
kill -9 and --resume, the final model, and the OOM fallback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.executor.conftest import ALPACA, ROOT, SHAREGPT, losses, make_plan, train


def test_suggest_then_train_end_to_end(tmp_path):
    plan = tmp_path / "p.json"
    subprocess.run([sys.executable, "-m", "planner.cli", "suggest", "--model", "llama-tiny", "--gpu", "cpu",
                    "--gpus", "2", "--seq-len", "64", "--global-batch", "8", "--precision", "fp32",
                    "--save-plan", str(plan)], check=True, capture_output=True, cwd=ROOT)
    proc = train(plan, tmp_path / "run", 12, "--eval-every", "6", "--eval-data", str(ALPACA), data=SHAREGPT)
    assert "Predicted vs measured" in proc.stdout and "tokens/s" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "tokens_per_s", "step_s", "peak_memory_bytes"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12] and rows[-1]["eval_loss"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["format"] == "llm-planner/run@1" and summary["status"] == "finished"
    assert summary["origin"] == "executor" and summary["error"] is None
    assert summary["plan"] == json.loads(plan.read_text())
    measured = summary["measured"]
    assert measured["steps"] == 12 and measured["tokens_per_s"] > 0
    assert measured["tokens_per_s_per_device"] == pytest.approx(measured["tokens_per_s"] / 2)
    assert measured["loss_last"] < measured["loss_first"]
    # CPU: MemTracker's tensor bytes, of the order the planner predicts (not RSS: that would be ~1 GB)
    predicted = summary["plan"]["prediction"]["memory"]["allocated_peak_bytes"]
    assert 0.5 * predicted < measured["peak_allocated_bytes"] < 2 * predicted
    assert summary["environment"]["world_size"] == 2 and summary["environment"]["torch"]
    assert summary["details"]["data"] == {"rows": 14, "bad_rows": 0, "first_errors": []}
    assert summary["details"]["compile"] is False and summary["details"]["parameters"]["total"] == 3_164_416
    _final_model_reproduces_loss(tmp_path / "run" / "final")
    from planner.runstore import iter_runs

    stored = list(iter_runs(tmp_path / "runs.sqlite"))
    assert [r.run_id for r in stored] == [summary["run_id"]] and stored[0].status == "finished"


def _final_model_reproduces_loss(folder: Path) -> None:
    """The saved safetensors load in plain transformers with the model's parameter names."""
    import torch
    from transformers import AutoModelForCausalLM

    from planner.models import load_model

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    spec = load_model("llama-tiny")
    assert sum(p.numel() for p in model.parameters()) == 3_164_416  # planner models: llama-tiny
    assert model.config.hidden_size == spec.hidden_size
    ids = torch.randint(3, 200, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_refuses_plan_for_missing_gpus(tmp_path):
    plan = tmp_path / "gpu.json"
    subprocess.run([sys.executable, "-m", "planner.cli", "suggest", "--model", "llama-tiny", "--gpu", "h100-sxm-80gb",
                    "--gpus", "1", "--seq-len", "64", "--global-batch", "8", "--save-plan", str(plan)],
                   check=True, capture_output=True, cwd=ROOT)
    proc = train(plan, tmp_path / "run", 2, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CUDA device" in proc.stderr and "--gpu cpu" in proc.stderr


def test_refuses_bad_data_before_starting(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"instruction": "Say hi.", "output": "Hi."})] * 3 + ["{not json", json.dumps({"foo": 1})]
    bad.write_text("\n".join(rows) + "\n")
    plan = make_plan(tmp_path / "plan.json", 1)
    proc = train(plan, tmp_path / "run", 2, data=bad, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "2 of 5 rows" in proc.stderr and "line 4: invalid JSON" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    proc = train(plan, tmp_path / "run", 2, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.slow  # ~65 s: a run killed and resumed
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, single_process_losses):
    """FSDP2 on 2 processes (sharded DCP checkpoints): the uninterrupted run matches the single
    process; then kill -9 the whole run after step 10, with a complete checkpoint at step 8 and
    decoys of half-written ones; --resume continues from 8 and steps 9..20 have the uninterrupted
    run's losses."""
    plan = make_plan(tmp_path / "plan.json", 2, zero=3, micro_batch_size=2)
    train(plan, tmp_path / "reference", 20, "--checkpoint-every", "4", "--no-save")
    reference = losses(tmp_path / "reference")
    assert reference[20] < reference[1] - 1.0
    assert abs(reference[20] - single_process_losses[20]) < 1e-2

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLANNER_STORE": str(tmp_path / "runs.sqlite")}
    cmd = [sys.executable, "-m", "planner.cli", "train", "--plan", str(plan), "--data", str(ALPACA), "--steps", "20",
           "--output", str(run), "--lr", "1e-3", "--no-progress", "--no-save", "--checkpoint-every", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(run / "metrics.jsonl", 10, proc)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step-00000008" / "complete.json").exists()
    # decoys: a half-written checkpoint and a folder without its completion marker
    (checkpoints / "step-00000012.tmp").mkdir()
    (checkpoints / "step-00000012.tmp" / "complete.json").write_text("{}")
    (checkpoints / "step-00000016").mkdir()
    train(plan, run, 20, "--checkpoint-every", "4", "--no-save", "--resume")
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(9, 21):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert not (checkpoints / "step-00000012.tmp").exists()


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came (exit {proc.poll()})")


@pytest.mark.slow
def test_lora_saves_only_the_adapter(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 2, {"method": "lora", "lora_rank": 8, "lora_targets": ("q", "v")},
                     zero=3, micro_batch_size=2)
    train(plan, tmp_path / "run", 6)
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert len(adapter) == 4 * 2 * 2  # 4 layers x (q, v) x (A, B)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.slow
def test_oom_is_recorded_and_fallback_runs_the_runner_up(tmp_path):
    plan = tmp_path / "p.json"
    subprocess.run([sys.executable, "-m", "planner.cli", "suggest", "--model", "llama-tiny", "--gpu", "cpu",
                    "--gpus", "2", "--seq-len", "64", "--global-batch", "8", "--precision", "fp32", "--zero", "1",
                    "--save-plan", str(plan)], check=True, capture_output=True, cwd=ROOT)
    document = json.loads(plan.read_text())
    first = document["config"]
    env_oom = json.dumps({"micro_batch_size": first["micro_batch_size"], "recompute": first["recompute"],
                          "offload": first["offload"]})
    os.environ["EXECUTOR_INJECT_OOM"] = env_oom
    try:
        failed = train(plan, tmp_path / "failed", 4, "--no-save", check=False)
        assert failed.returncode == 1 and "out of memory" in failed.stderr
        record = json.loads((tmp_path / "failed" / "summary.json").read_text())
        assert record["status"] == "oom" and record["plan"]["config"] == first and record["measured"]["steps"] == 1
        train(plan, tmp_path / "fallback", 4, "--no-save", "--fallback")
    finally:
        del os.environ["EXECUTOR_INJECT_OOM"]
    final = json.loads((tmp_path / "fallback" / "summary.json").read_text())
    assert final["status"] == "finished" and final["plan"]["config"] != first
    archived = json.loads((tmp_path / "fallback" / "attempts" / "1" / "summary.json").read_text())
    assert archived["status"] == "oom"


@pytest.mark.slow
@pytest.mark.parametrize("workload,expect_adapter", [({"method": "qlora", "lora_rank": 8}, True),
                                                     ({"optimizer": "adamw8bit"}, False)])
def test_bitsandbytes_methods_train_on_cpu(tmp_path, workload, expect_adapter):
    pytest.importorskip("bitsandbytes")
    plan = make_plan(tmp_path / "plan.json", 1, workload, micro_batch_size=4)
    train(plan, tmp_path / "run", 6)
    got = losses(tmp_path / "run")
    assert got[6] < got[1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    predicted = summary["plan"]["prediction"]["memory"]["allocated_peak_bytes"]
    assert 0.8 * predicted < summary["measured"]["peak_allocated_bytes"] < 1.25 * predicted
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists() == expect_adapter
