"""`planner train` with the trainer's options, one process each: the schedule and clipping as
recorded, TensorBoard, a chat-template dataset, LoRA saved as peft saves it and merged."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.executor.conftest import SHAREGPT, make_plan, metrics, train
from tests.executor.test_data_features import make_chat_tokenizer


def test_schedule_and_clipping_as_recorded(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    proc = train(plan, tmp_path / "run", 8, "--no-save", "--lr-schedule", "linear", "--warmup-steps", "2",
                 "--min-lr-ratio", "0", "--max-grad-norm", "0.5")
    rows = metrics(tmp_path / "run")
    peak = 1e-3  # conftest.train's --lr
    expected = [peak * (k + 1) / 2 for k in range(2)] + [peak * (1 - (k - 2) / 5) for k in range(2, 8)]
    assert [rows[k + 1]["lr"] for k in range(8)] == pytest.approx(expected)
    assert all(rows[k]["grad_norm"] > 0 for k in rows) and rows[1]["grad_norm"] > 0.5
    options = json.loads((tmp_path / "run" / "summary.json").read_text())["details"]["options"]
    assert options["max_grad_norm"] == 0.5 and options["lr_schedule"] == "linear"
    if importlib.util.find_spec("tensorboard") is None:
        assert proc.stdout.count("tensorboard is not installed") == 1
        assert not (tmp_path / "run" / "tensorboard").exists()
    else:
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_chat_template_dataset_trains_and_the_tokenizer_is_saved(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = make_chat_tokenizer(tmp_path / "tokenizer")
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    train(plan, tmp_path / "run", 10, "--tokenizer", str(tokenizer), data=SHAREGPT)
    rows = metrics(tmp_path / "run")
    assert rows[10]["loss"] < rows[1]["loss"] - 0.5, (rows[1]["loss"], rows[10]["loss"])
    final = tmp_path / "run" / "final"
    saved = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert saved.chat_template and saved.eos_token == "<|end|>"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    ids = saved.apply_chat_template([{"role": "user", "content": "Which city is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def _base_model(folder):
    from transformers import AutoModelForCausalLM

    from executor.model import hf_config
    from planner.models import load_model
    from planner.specs import Workload

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(hf_config(load_model("llama-tiny"), Workload(seq_len=64, global_batch=8)))
    model.save_pretrained(folder)
    return folder


def test_lora_adapter_and_merged_model_reload_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base_model(tmp_path / "base")
    plan = make_plan(tmp_path / "plan.json", 1, {"method": "lora", "lora_rank": 8, "lora_targets": ("q", "v")},
                     micro_batch_size=4)
    train(plan, tmp_path / "run", 4, "--init-from", str(base), "--merge-lora", "--lr", "1e-2")
    ids = torch.arange(3, 67).view(1, -1)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        before = plain(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(plain, tmp_path / "run" / "final").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()(input_ids=ids).logits
    assert (tmp_path / "run" / "merged" / "model.safetensors").exists()
    assert not torch.allclose(before, adapted, atol=1e-3), "the adapter did not train"
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_merge_lora_is_refused_for_a_full_fine_tune(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    proc = train(plan, tmp_path / "run", 2, "--merge-lora", "true", check=False)
    assert proc.returncode == 2 and "--merge-lora applies to LoRA runs only" in proc.stderr


@pytest.mark.slow  # ~20 s: a training run; the schedule itself is checked by test_schedule_and_clipping_as_recorded
def test_optimizer_in_backward_follows_the_schedule_without_clipping(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1, {"optimizer_in_backward": True}, micro_batch_size=8)
    proc = train(plan, tmp_path / "run", 4, "--no-save", "--lr-schedule", "linear", "--warmup-steps", "0",
                 "--min-lr-ratio", "0.5")
    rows = metrics(tmp_path / "run")
    assert [rows[k]["lr"] for k in (1, 2, 3, 4)] == pytest.approx([1e-3 * (1 - 0.5 * k / 3) for k in range(4)])
    assert all(rows[k]["grad_norm"] is None for k in rows) and "no gradient clipping" in proc.stdout
