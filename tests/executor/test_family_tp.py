"""Tensor parallelism by a model's own transformers plan (config `base_model_tp_plan`): each
family the capability table lets the executor run with tp > 1 (planner/capabilities.py
EXECUTOR_PLAN_TP_FAMILIES) trains 20 steps of a tiny model under torchrun on CPU (gloo) with
tp 2, and its losses, gradient norms and learning rates are the single-process run's (the
tolerance of test_parallel_modes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.executor.conftest import SEQ_LEN, losses, metrics, model_argument, plan_and_train

STEPS = 20
# transformers' Gemma 2 has no sdpa path (attention logit soft-capping)
ATTENTION = {"gemma2": "eager"}
# tiny shapes of the families not in the catalog: hidden 64, 2 layers, 4 heads, 2 KV heads
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=320, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "qwen3": "tiny-qwen3",
    "gemma3_text": "tiny-sliding",
    # untied: the scaled embedding is split by vocabulary rows too
    "gemma2": {"model_type": "gemma2", **TINY, "sliding_window": 32, "tie_word_embeddings": False},
    "smollm3": {"model_type": "smollm3", **TINY, "no_rope_layer_interval": 2},
}


def _model(family: str, folder: Path) -> str:
    return model_argument(MODELS, family, folder)


def _run(folder: Path, model: str, gpus: int, attention: str, *options: str) -> Path:
    """`planner predict --attention ATTENTION OPTIONS --save-plan`, trained STEPS steps; the run folder."""
    return plan_and_train(folder, model, gpus, STEPS, "--attention", attention, *options)


def _assert_same_run(got: Path, reference: Path) -> None:
    mine, theirs = losses(got), losses(reference)
    assert sorted(mine) == list(range(1, STEPS + 1))
    assert mine[STEPS] < mine[1] - 0.5, f"the loss did not fall: {mine[1]:.3f} -> {mine[STEPS]:.3f}"
    assert abs(mine[STEPS] - theirs[STEPS]) < 1e-2, (mine[STEPS], theirs[STEPS])
    # in fp32 a right split agrees to ~1e-6 at every step; q/k norms left plain (each rank's weight
    # stepped with its own heads' gradient only) drift by ~7e-5 in the loss and ~5e-4 in the gradient
    # norm by step 20, under the step-20 tolerance above: every step is compared this tightly
    rows, reference_rows = metrics(got), metrics(reference)
    for step in range(1, STEPS + 1):
        assert abs(rows[step]["loss"] - reference_rows[step]["loss"]) < 1e-5, step
        assert rows[step]["grad_norm"] == pytest.approx(reference_rows[step]["grad_norm"], rel=1e-4), step
        assert rows[step]["lr"] == pytest.approx(reference_rows[step]["lr"], rel=1e-9), step


@pytest.mark.slow
@pytest.mark.parametrize("family", list(MODELS))
def test_tp_by_transformers_plan_matches_single_process(family, tmp_path):
    model, attention = _model(family, tmp_path), ATTENTION.get(family, "sdpa")
    reference = _run(tmp_path / "single", model, 1, attention, "--micro-batch-size", "4")
    tensor_parallel = _run(tmp_path / "tp", model, 2, attention, "--tp", "2", "--micro-batch-size", "4")
    _assert_same_run(tensor_parallel, reference)
    summary = json.loads((tensor_parallel / "summary.json").read_text())
    assert (summary["plan"]["config"]["tp"], summary["environment"]["world_size"]) == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("processes, options", [(2, ("--pp", "2", "--micro-batch-size", "2")),
                                                (4, ("--pp", "2", "--tp", "2", "--micro-batch-size", "2"))],
                         ids=["pp", "pp-tp"])
def test_qwen3_pipeline_matches_single_process(processes, options, tmp_path):
    """executor/pipeline.py's hand split calls Qwen3's layers as Llama's (2 stages, 1F1B), with and
    without its own tp plan inside the stages."""
    reference = _run(tmp_path / "single", "tiny-qwen3", 1, "sdpa", "--micro-batch-size", "4")
    _assert_same_run(_run(tmp_path / "pp", "tiny-qwen3", processes, "sdpa", *options), reference)


def test_llama_plan_translated_is_the_hand_written_one():
    """transformers' llama plan through the translation gives the executor's hand-written block
    plan (same paths, same torch styles and layouts), so llama-like families could take either."""
    from transformers import AutoConfig

    from executor.parallelize import layer_tp_plan, transformers_layer_plan

    translated = transformers_layer_plan(AutoConfig.for_model("llama").base_model_tp_plan)
    by_hand = layer_tp_plan(sequence_parallel=False)
    assert translated.keys() == by_hand.keys()
    for path, style in by_hand.items():
        assert type(translated[path]) is type(style) and vars(translated[path]) == vars(style), path


def test_replicating_plans_are_refused():
    """OLMo 2 / Phi-3 plans gather q/k/v (attention replicated on every rank): not the planner's split."""
    from transformers import AutoConfig

    from executor.parallelize import transformers_layer_plan
    from planner.errors import InvalidRequest

    for model_type in ("olmo2", "phi3"):
        with pytest.raises(InvalidRequest, match="--tp 1"):
            transformers_layer_plan(AutoConfig.for_model(model_type).base_model_tp_plan)


@pytest.mark.parametrize("model, config, refused", [
    ("tiny-qwen3", {"tp": 2}, None),
    ("tiny-sliding", {"tp": 2}, None),
    ("tiny-qwen3", {"pp": 2, "tp": 2}, None),
    ("tiny-sliding", {"pp": 2}, "executor's pp"),
    ("tiny-qwen3", {"tp": 2, "sequence_parallel": True}, "sequence parallelism is written for llama-like"),
    ("olmo-2-7b", {"tp": 2}, "executor's tp runs"),
    ("tiny-moe-shared", {"tp": 2}, "executor's tp runs"),
    ("llama-tiny", {"tp": 2, "sequence_parallel": True}, None),
    ("llama-tiny", {"pp": 2}, None),
])
def test_capability_table_says_what_the_executor_runs(model, config, refused):
    from planner.capabilities import runnable_reason
    from planner.layout import ParallelConfig
    from planner.models import load_model
    from planner.specs import Workload

    config = dict(config)
    tp, pp = config.pop("tp", 1), config.pop("pp", 1)
    parallel = ParallelConfig(dp=1, tp=tp, pp=pp, micro_batch_size=1, num_micro_batches=8, **config)
    reason = runnable_reason("executor", parallel, load_model(model), Workload(seq_len=SEQ_LEN, global_batch=8),
                             gpu=False)
    assert reason is None if refused is None else refused in reason, reason
