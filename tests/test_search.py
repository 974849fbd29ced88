"""Search: candidate count, pins, rejection reasons, ranking."""

import json

import pytest

from planner.api import Request, suggest
from planner.errors import Infeasible
from planner.search import Pins

REQ = Request(model="llama3-70b", gpu="h100-sxm-80gb", gpus=64, seq_len=4096, global_batch=512)


def test_seventy_b_on_64_h100_costs_over_5000_candidates():
    result = suggest(REQ)
    assert result["evaluated"] >= 5000
    assert result["feasible"] + sum(result["rejected"].values()) + result["invalid_pairings"] == result["searched"]
    assert result["rejected"]["tp does not divide kv heads"] > 0  # 8 kv heads: tp 16, 32, 64 rejected
    assert result["rejected"]["out of memory"] > 0
    steps = [c["time"]["step_s"] for c in result["candidates"]]
    assert steps == sorted(steps)
    assert all(c["fits"] for c in result["candidates"])
    best = result["candidates"][0]["config"]
    assert best["dp"] * best["tp"] * best["pp"] == 64
    assert best["num_micro_batches"] * best["dp"] * best["micro_batch_size"] == 512


@pytest.mark.parametrize("pins,key,value", [
    (Pins(tp=1), "tp", 1), (Pins(recompute="full"), "recompute", "full"), (Pins(pp=4), "pp", 4),
    (Pins(zero=3), "zero", 3), (Pins(micro_batch_size=2), "micro_batch_size", 2),
])
def test_pins_hold_for_every_candidate(pins, key, value):
    result = suggest(REQ, pins, top=10)
    assert all(c["config"][key] == value for c in result["candidates"])


def test_pinning_only_narrows_the_search():
    free, pinned = suggest(REQ), suggest(REQ, Pins(tp=8))
    assert pinned["evaluated"] < free["evaluated"]
    assert pinned["candidates"][0]["time"]["step_s"] >= free["candidates"][0]["time"]["step_s"]


def test_nothing_fits_raises_infeasible_with_a_way_out():
    request = Request(model="llama3-70b", gpu="rtx4090-24gb", gpus=1, seq_len=4096, global_batch=1)
    with pytest.raises(Infeasible) as info:
        suggest(request)
    message = str(info.value)
    assert "devices instead of 1" in message or "--method" in message


def test_cli_suggest_json_contract(cli):
    proc = cli("suggest", "--model", "llama3-8b", "--gpus", "8", "--seq-len", "2048", "--global-batch", "64",
               "--top", "3", "--json", check=True)
    data = json.loads(proc.stdout)
    for key in ("searched", "feasible", "seconds", "rejected", "candidates"):
        assert key in data
    assert len(data["candidates"]) == 3
    c = data["candidates"][0]
    assert set(c) >= {"fits", "reason", "config", "memory", "time"}
    assert set(c["memory"]["breakdown"]) >= {"params", "grads", "optimizer", "activations", "logits", "buffers", "overhead"}
    assert set(c["time"]["breakdown"]) >= {"compute", "recompute", "tp_comm", "dp_comm", "pp_bubble", "offload", "optimizer"}


def test_cli_suggest_infeasible_exits_3(cli):
    proc = cli("suggest", "--model", "llama3.1-405b", "--gpu", "rtx3090-24gb", "--gpus", "1", "--seq-len", "4096")
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_save_plan_round_trips(cli, tmp_path):
    from planner.plan import load_plan
    path = tmp_path / "plan.json"
    cli("suggest", "--model", "llama-tiny", "--gpu", "cpu", "--gpus", "2", "--seq-len", "128", "--global-batch", "8",
        "--save-plan", str(path), "--json", check=True)
    plan = load_plan(str(path))
    spec, hardware, cluster, workload, config = plan.model, plan.hardware, plan.cluster, plan.workload, plan.config
    assert spec.name == "llama-tiny" and hardware.name == "cpu" and cluster.num_devices == 2
    assert config.dp * config.tp * config.pp == 2 and workload.seq_len == 128
