"""Helpers for the executor's tests: Plans for llama-tiny on CPU "devices", and `planner train`
run as people run it (a separate process that starts torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
ALPACA = DATA / "alpaca_sample.json"
SHAREGPT = DATA / "sharegpt_sample.jsonl"
SEQ_LEN, GLOBAL_BATCH = 64, 8


def make_plan(path: Path, gpus: int, workload: dict | None = None, model: str = "llama-tiny", **config) -> Path:
    """A Plan for llama-tiny (or `model`) on `gpus` CPU processes, as `planner predict --save-plan` writes it."""
    from planner import api
    from planner.plan import ParallelConfig, save_plan

    w = {"seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH, "precision": "fp32", **(workload or {})}
    request = api.Request(model=model, gpu="cpu", gpus=gpus, gpus_per_node=gpus, **w)
    tp, pp = config.pop("tp", 1), config.pop("pp", 1)
    dp = config.pop("dp", gpus // (tp * pp))
    mbs = config.pop("micro_batch_size", 1)
    parallel = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs,
                              num_micro_batches=w["global_batch"] // (dp * mbs), **config)
    save_plan(str(path), api.make_plan(request, api.predict(request, parallel)))
    return path


def train(plan: Path, output: Path, steps: int = 20, *extra: str, data: Path = ALPACA,
          check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLANNER_STORE": str(Path(output).parent / "runs.sqlite")}
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "train", "--plan", str(plan), "--data", str(data),
                           "--steps", str(steps), "--output", str(output), "--lr", "1e-3", "--no-progress", *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"planner train failed ({proc.returncode}): {proc.stderr[-2000:]}\n{proc.stdout[-2000:]}")
    return proc


def model_argument(models: dict[str, str | dict], family: str, folder: Path) -> str:
    """What --model takes for `family`: its catalog name, or its tiny transformers config written to
    FOLDER/FAMILY.json."""
    model = models[family]
    if isinstance(model, str):
        return model
    path = folder / f"{family}.json"
    path.write_text(json.dumps(model))
    return str(path)


def predict_plan(folder: Path, model: str, gpus: int, *options: str) -> Path:
    """`planner predict ... --save-plan FOLDER/plan.json` as a user runs it, fp32 on `gpus` CPU
    processes (SEQ_LEN, GLOBAL_BATCH); the plan's path."""
    plan = folder / "plan.json"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "planner.cli", "predict", "--model", model, "--gpu", "cpu", "--gpus", str(gpus),
               "--gpus-per-node", str(gpus), "--seq-len", str(SEQ_LEN), "--global-batch", str(GLOBAL_BATCH),
               "--precision", "fp32", "--save-plan", str(plan), *options]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return plan


def plan_and_train(folder: Path, model: str, gpus: int, steps: int, *options: str) -> Path:
    """predict_plan(folder, model, gpus, *options) trained `steps` steps without checkpoints; the run folder."""
    train(predict_plan(folder, model, gpus, *options), folder / "run", steps, "--no-save")
    return folder / "run"


def pytest_collection_modifyitems(config, items):
    """Multi-minute torchrun matrices are marked slow: they run with `-m slow` (or any -m), not by default."""
    if config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords and Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def metrics(output: Path) -> dict[int, dict]:
    """Every row of DIR/metrics.jsonl by step."""
    return {row["step"]: row for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="session")
def single_process_run(tmp_path_factory) -> Path:
    """The reference: the same model, data and seed in one process (dp = tp = pp = 1); its run folder."""
    folder = tmp_path_factory.mktemp("reference")
    plan = make_plan(folder / "plan.json", 1, micro_batch_size=4)
    train(plan, folder / "run", 20, "--no-save")
    return folder / "run"


@pytest.fixture(scope="session")
def single_process_losses(single_process_run) -> dict[int, float]:
    return losses(single_process_run)
