"""The estimate path never predicts nonsense for valid input: over extreme-but-valid models, clusters,
workloads and hardware (at the bounds planner/validity.py lets through), every evaluated candidate
has a finite positive step time and 0 < MFU <= 1 (issue 18: `suggest --seq-len 2**62` printed
negative step times and MFU -11 %, one `predict` printed MFU 168.9 %). planner.cost.estimate
asserts the same invariants; this sweep checks them from outside, over every candidate the search
costs, not only those that fit."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from planner import validity
from planner.api import Request, resolve
from planner.errors import Infeasible, InvalidRequest
from planner.hardware import load_hardware
from planner.models import catalog, load_model, spec_from_hf_config
from planner.search import Pins, search
from planner.specs import Hardware


def _assert_sane(request: Request, pins: Pins | None = None) -> int:
    """Every costed candidate of each engine that runs some of them (the executor runs no baichuan,
    DeepSpeed no fp8, Accelerate no pipeline): finite, positive times and 0 < MFU <= 1."""
    return sum(_sane_for(request, pins, target) for target in ("executor", "deepspeed", "accelerate"))


def _sane_for(request: Request, pins: Pins | None, target: str) -> int:
    r = resolve(request)
    result = search(r.context, pins or Pins(), target)
    if result.estimates is None:
        return 0
    e = result.estimates
    assert np.all(np.isfinite(e.step_s)) and np.all(e.step_s > 0)
    assert np.all(np.isfinite(e.tokens_per_s)) and np.all(e.tokens_per_s > 0)
    assert np.all(e.mfu > 0) and np.all(e.mfu <= 1), float(e.mfu.max())
    for i in result.order[:3]:
        p = e.prediction(r.context, int(i))
        assert 0 < p["time"]["mfu"] <= 1 and p["time"]["step_s"] > 0
    return len(e.step_s)


def _largest_model() -> object:
    """A config at the model bounds that still loads (hidden 2**18 is not; 2**16 is)."""
    config = {"model_type": "llama", "hidden_size": 2**16, "num_attention_heads": 512, "num_hidden_layers": 2**10,
              "intermediate_size": 2**18, "vocab_size": 2**20, "max_position_embeddings": validity.MAX_SEQ_LEN}
    return spec_from_hf_config(config, name="huge")


def _extreme_hardware(**changes) -> Hardware:
    data = load_hardware("h100-sxm-80gb").to_dict()
    data.update(changes)
    return Hardware.from_dict(data)


SEQS = (1, 7, 4096, 2**20, validity.MAX_SEQ_LEN)


@pytest.mark.parametrize("model", sorted(catalog()))
def test_catalog_models_at_extreme_sequences(model):
    spec = load_model(model)
    evaluated = 0
    attention = "eager" if spec.family == "deepseek_v4" else "sdpa"  # transformers' V4 has no sdpa: all refuse it
    for seq in SEQS:
        if spec.positions == "learned" or spec.family in validity.BOUNDED_POSITION_FAMILIES:
            seq = min(seq, spec.max_position_embeddings)
        for method, precision in (("full", "bf16"), ("qlora", "fp16"), ("full", "fp32"), ("lora", "fp8")):
            request = Request(model=model, gpus=8, seq_len=seq, global_batch=8, method=method, precision=precision,
                              attention=attention)
            evaluated += _assert_sane(request)
    assert evaluated > 0


@pytest.mark.parametrize("gpus,per_node,global_batch", [
    (1, 8, 1), (1, 8, validity.MAX_GLOBAL_BATCH), (2**10, 8, 2**10), (2**20, 8, 2**20),
    (3 * 5 * 7 * 11 * 13, 1, 4 * 3 * 5 * 7 * 11 * 13)])
def test_extreme_clusters_and_batches(gpus, per_node, global_batch):
    request = Request(model="llama3-8b", gpus=gpus, gpus_per_node=per_node, seq_len=4096, global_batch=global_batch)
    assert _assert_sane(request, Pins(micro_batch_size=1, recompute="full")) > 0


def test_largest_loadable_model_and_longest_sequence():
    request = Request(model=_largest_model(), gpus=2**20, seq_len=validity.MAX_SEQ_LEN, global_batch=2**20)
    assert _assert_sane(request, Pins(micro_batch_size=1, recompute="full", zero=3)) > 0


@pytest.mark.parametrize("changes", [
    dict(memory_bytes=validity.MIN_MEMORY_BYTES),
    dict(memory_bytes=validity.MAX_DEVICE_MEMORY_BYTES),
    dict(peak_flops={"bf16": validity.MIN_PEAK_FLOPS, "fp32": validity.MIN_PEAK_FLOPS,
                     "fp16": validity.MIN_PEAK_FLOPS, "fp8": validity.MIN_PEAK_FLOPS}),
    dict(peak_flops={"bf16": validity.MAX_PEAK_FLOPS, "fp32": validity.MAX_PEAK_FLOPS,
                     "fp16": validity.MAX_PEAK_FLOPS, "fp8": validity.MAX_PEAK_FLOPS}),
    dict(hbm_bandwidth_bytes_per_s=validity.MIN_BANDWIDTH_BYTES_PER_S,
         intra_node_bandwidth_bytes_per_s=validity.MIN_BANDWIDTH_BYTES_PER_S,
         inter_node_bandwidth_bytes_per_s=validity.MIN_BANDWIDTH_BYTES_PER_S,
         pcie_bandwidth_bytes_per_s=validity.MIN_BANDWIDTH_BYTES_PER_S,
         host_memory_bandwidth_bytes_per_s=validity.MIN_BANDWIDTH_BYTES_PER_S),
    dict(hbm_bandwidth_bytes_per_s=validity.MAX_BANDWIDTH_BYTES_PER_S,
         intra_node_bandwidth_bytes_per_s=validity.MAX_BANDWIDTH_BYTES_PER_S,
         inter_node_bandwidth_bytes_per_s=validity.MAX_BANDWIDTH_BYTES_PER_S),
])
def test_hardware_at_its_bounds(changes, tmp_path):
    hardware = _extreme_hardware(**changes)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(hardware.to_dict()))
    for seq, precision in ((1, "bf16"), (8192, "fp8"), (2**20, "fp32")):
        request = Request(model="llama3-8b", gpu=str(path), gpus=16, seq_len=seq, global_batch=16, precision=precision)
        assert _assert_sane(request, Pins(micro_batch_size=1)) > 0


def test_just_beyond_the_bounds_is_refused_not_evaluated():
    base = Request(model="llama-tiny", gpus=1, seq_len=16, global_batch=1)
    for changes in (dict(seq_len=validity.MAX_SEQ_LEN + 1), dict(global_batch=validity.MAX_GLOBAL_BATCH + 1),
                    dict(gpus=validity.MAX_DEVICES + 1, global_batch=1)):
        with pytest.raises(InvalidRequest):
            resolve(replace(base, **changes))
    with pytest.raises((InvalidRequest, Infeasible)):
        search(resolve(base).context, Pins(vpp=validity.MAX_DEVICES + 1))
