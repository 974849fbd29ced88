"""Every parallel layout trains the same model: 20 steps of llama-tiny under torchrun on CPU
(gloo), the loss falls, and step 20 matches the single-process run within 1e-2 (the issue's
acceptance; in fp32 they agree to ~1e-6). The global gradient norm (clipped at 1.0 by default)
and the learning rate of the first steps are the single process's too."""

from __future__ import annotations

import json

import pytest

from tests.executor.conftest import losses, make_plan, metrics, train

MODES = {
    # name: (processes, config, workload)
    "ddp": (2, {"zero": 0, "micro_batch_size": 2}, {}),
    "zero1": (2, {"zero": 1, "micro_batch_size": 4}, {}),
    "fsdp2-zero2": (2, {"zero": 2, "micro_batch_size": 2}, {}),
    "fsdp2-zero3": (2, {"zero": 3, "micro_batch_size": 1}, {}),
    "tp": (2, {"tp": 2, "micro_batch_size": 4}, {}),
    "tp-sequence-parallel": (2, {"tp": 2, "micro_batch_size": 4, "sequence_parallel": True}, {}),
    "pp-1f1b": (2, {"pp": 2, "micro_batch_size": 2}, {}),
    "pp-interleaved": (2, {"pp": 2, "vpp": 2, "micro_batch_size": 2}, {}),
    "ddpxtp": (4, {"dp": 2, "tp": 2, "zero": 0, "micro_batch_size": 2}, {}),
    "zero1xtp": (4, {"dp": 2, "tp": 2, "zero": 1, "micro_batch_size": 2}, {}),
    "fsdp2xtp": (4, {"dp": 2, "tp": 2, "zero": 3, "micro_batch_size": 2}, {}),
    "ddp-full-checkpointing": (2, {"zero": 0, "micro_batch_size": 2, "recompute": "full"}, {}),
    "fsdp2-selective-checkpointing": (2, {"zero": 3, "micro_batch_size": 2, "recompute": "selective"}, {}),
    "fsdp2-shard-ends": (2, {"zero": 3, "micro_batch_size": 2, "shard_ends": True}, {}),
    "pp-fsdp2-checkpointing": (4, {"dp": 2, "pp": 2, "zero": 3, "micro_batch_size": 1, "recompute": "full"}, {}),
}
# the default run keeps one layout of each mechanism (pp, dp x tp with its DDP and grad norm); the rest with -m slow
FAST = ("pp-1f1b", "ddpxtp")


def _mode_params():
    for name in MODES:
        marks = () if name in FAST else (pytest.mark.slow,)
        yield pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(_mode_params()))
def test_layout_matches_single_process(name, tmp_path, single_process_losses, single_process_run):
    processes, config, workload = MODES[name]
    plan = make_plan(tmp_path / "plan.json", processes, workload, **config)
    train(plan, tmp_path / "run", 20, "--no-save")
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 21))
    assert got[20] < got[1] - 1.0, f"the loss did not fall: {got[1]:.3f} -> {got[20]:.3f}"
    assert abs(got[20] - single_process_losses[20]) < 1e-2, (got[20], single_process_losses[20])
    rows, reference = metrics(tmp_path / "run"), metrics(single_process_run)
    for step in (1, 2, 3):
        assert rows[step]["grad_norm"] > 1.0, "the default clipping at 1.0 is not exercised"
        assert rows[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4), step
        assert rows[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9), step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["plan"]["config"] == json.loads(plan.read_text())["config"]
    assert summary["environment"]["world_size"] == processes


@pytest.mark.slow
def test_interleaved_stages_that_do_not_divide_the_layers_train_as_one_process(tmp_path):
    """A 6-layer llama-tiny on pp 2 x vpp 2: virtual stages of 1, 2, 2 and 1 layers (planner/layout.py
    stage_layers, Megatron's account-for-embedding/loss split) train to the single process's loss."""
    from planner.models import load_model

    config = dict(load_model("llama-tiny").hf_config, num_hidden_layers=6)
    model = tmp_path / "config.json"
    model.write_text(json.dumps(config))
    reference = make_plan(tmp_path / "one.json", 1, model=str(model), micro_batch_size=4)
    train(reference, tmp_path / "one", 20, "--no-save")
    plan = make_plan(tmp_path / "pp.json", 2, model=str(model), pp=2, vpp=2, micro_batch_size=2)
    assert [len(s) for s in json.loads(plan.read_text())["layout"]["stages"]] == [1, 2, 2, 1]
    train(plan, tmp_path / "pp", 20, "--no-save")
    got, want = losses(tmp_path / "pp"), losses(tmp_path / "one")
    assert got[20] < got[1] - 1.0 and abs(got[20] - want[20]) < 1e-2, (got[20], want[20])
