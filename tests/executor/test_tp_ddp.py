"""dp x tp under ZeRO 0/1 (torch's TP + DDP recipe, which turns the TP weights into local shards):
the final model is saved whole and equals the single process's, and checkpoints are refused with
a clear error rather than failing at the first one. (Its gradient norm and losses are checked with
the other layouts in test_parallel_modes.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.executor.conftest import make_plan, train


@pytest.mark.slow  # two runs, one of 4 processes: ~1-3 min on 2 shared cores
def test_dp_x_tp_saves_the_whole_model_of_the_single_process(tmp_path):
    from transformers import AutoModelForCausalLM

    reference = make_plan(tmp_path / "one.json", 1, micro_batch_size=4)
    train(reference, tmp_path / "one", 2)
    plan = make_plan(tmp_path / "plan.json", 4, dp=2, tp=2, zero=0, micro_batch_size=2)
    train(plan, tmp_path / "run", 2)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final", local_files_only=True).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", local_files_only=True).state_dict()
    assert sorted(got) == sorted(expected)
    # Adam's first steps move a weight by ~lr (1e-3) whatever its gradient's size, so an element with
    # a near-zero gradient may differ by a few 1e-5; a wrong or missing shard differs by ~init std (0.02)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow  # ~25 s: starts 4 processes before the refusal
def test_dp_x_tp_checkpoints_are_refused(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 4, dp=2, tp=2, zero=1, micro_batch_size=2)
    proc = train(plan, tmp_path / "run", 2, "--checkpoint-every", "1", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--zero 2 or 3" in proc.stderr and "Traceback" not in proc.stderr
