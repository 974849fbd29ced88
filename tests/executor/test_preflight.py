"""executor/preflight.py: what transformers would refuse or run as nonsense is refused before any
process starts, in one line; every preset model passes, its meta-built parameter count equal to
the planner's."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

pytest.importorskip("transformers")

from executor.options import RunOptions  # noqa: E402
from executor.preflight import preflight_reason  # noqa: E402
from planner.capabilities import SDPA_LESS_FAMILIES  # noqa: E402
from planner.models import catalog, load_model  # noqa: E402
from planner.plan import ParallelConfig  # noqa: E402
from planner.specs import Workload  # noqa: E402

WORKLOAD = Workload(seq_len=64, global_batch=8)
CONFIG = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, num_micro_batches=8)


def _with_config(name: str, **changes) -> object:
    """The preset's spec with `changes` in the config.json it carries (as a hand-edited plan, or one
    from a config the planner took at its word)."""
    spec = load_model(name)
    return replace(spec, hf_config={**spec.hf_config, **changes})


def _options(**changes) -> RunOptions:
    return RunOptions(plan="p.json", data="d.json", steps=1, output="out", **changes)


@pytest.mark.parametrize("name", sorted(catalog()))
def test_every_preset_passes_and_counts_as_the_planner_does(name):
    spec = load_model(name)
    attention = "eager" if spec.family in SDPA_LESS_FAMILIES else "sdpa"  # transformers runs them eager
    assert preflight_reason(spec, replace(WORKLOAD, attention=attention), CONFIG, _options()) is None


def test_mpt_with_sdpa_is_what_transformers_cannot_build():
    reason = preflight_reason(load_model("mpt-7b"), WORKLOAD, CONFIG)
    assert reason and "attention" in reason and "\n" not in reason


@pytest.mark.parametrize("changes,expected", [
    ({"n_embd": 250, "n_head": 8}, "not divisible by 8 attention heads"),
    ({"n_positions": 32}, "exceeds the model's 32 learned positions"),
    ({"activation_function": "swishy"}, "'swishy' is not an activation"),
    ({"attn_pdrop": math.nan}, "attn_pdrop is nan"),
    ({"resid_pdrop": 1.0}, "resid_pdrop is 1.0"),
])
def test_gpt2_configs_transformers_cannot_build_or_run(changes, expected):
    reason = preflight_reason(_with_config("gpt2", **changes), WORKLOAD, CONFIG)
    assert reason is not None and expected in reason and "\n" not in reason, reason


def test_llama_with_an_unknown_activation_or_nan_dropout():
    assert "'bogus' is not an activation" in preflight_reason(_with_config("llama-tiny", hidden_act="bogus"),
                                                              WORKLOAD, CONFIG)
    assert "attention_dropout is nan" in preflight_reason(_with_config("llama-tiny", attention_dropout=math.nan),
                                                          WORKLOAD, CONFIG)


def test_rotary_positions_have_no_table_to_run_past():
    spec = _with_config("llama-tiny", max_position_embeddings=32)
    assert preflight_reason(spec, WORKLOAD, CONFIG) is None


def test_hf_config_that_is_not_the_spec_is_refused():
    spec = load_model("llama-tiny")
    bert = replace(spec, hf_config={"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": 256})
    assert "model_type 'bert'" in preflight_reason(bert, WORKLOAD, CONFIG)
    wider = replace(spec, hf_config={**spec.hf_config, "intermediate_size": 4 * spec.intermediate_size})
    reason = preflight_reason(wider, WORKLOAD, CONFIG)
    assert "parameters but its model spec" in reason and f"{3_164_416:,}" in reason


def test_micro_batches_that_do_not_add_up_to_the_global_batch():
    config = replace(CONFIG, num_micro_batches=3)
    assert "is 3 rows, not its global batch 8" in preflight_reason(load_model("llama-tiny"), WORKLOAD, config)


@pytest.mark.parametrize("lr", [math.nan, math.inf, 0.0, -1e-3])
def test_learning_rate_must_be_finite_and_positive(lr):
    reason = preflight_reason(load_model("llama-tiny"), WORKLOAD, CONFIG, _options(lr=lr))
    assert reason and reason.startswith("--lr must be a finite positive number")


@pytest.mark.parametrize("edit,extra,expected", [
    ({"hidden_act": "bogus"}, (), "'bogus' is not"),
    ({"model_type": "bert"}, (), "model_type 'bert'"),
    ({}, ("--lr", "nan"), "--lr must be a finite positive number"),
])
def test_planner_train_refuses_before_torchrun_starts(tmp_path, edit, extra, expected):
    import json

    from tests.executor.conftest import make_plan, train

    plan = make_plan(tmp_path / "plan.json", 1)
    document = json.loads(plan.read_text())
    document["model"]["hf_config"].update(edit)
    plan.write_text(json.dumps(document))
    proc = train(plan, tmp_path / "run", 2, *extra, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
