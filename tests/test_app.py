"""The Streamlit page, driven headless with streamlit.testing.v1.AppTest, and the plain-Python
views behind it."""

import json
from pathlib import Path

import pytest

from planner.errors import InvalidRequest
from planner import views

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

APP = str(ROOT / "app.py")


def charts(at) -> int:
    return len(at.get("vega_lite_chart"))


@pytest.fixture
def app():
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def widget(elements, label):
    return next(e for e in elements if e.label == label)


def test_defaults_render_a_verdict_tables_and_charts(app):
    assert app.success[0].value.startswith("Fits.") and "GiB" in app.success[0].value
    assert len(app.dataframe) == 2  # top candidates and rejected by reason
    top = app.dataframe[0].value
    assert {"DP", "TP", "PP", "CP", "EP", "VPP", "SP", "ZeRO", "offload", "recompute", "micro-batch", "micro-batches",
            "GiB per device", "tokens/s", "MFU"} <= set(top.columns)
    assert charts(app) >= 3  # memory bars, tokens/s and cost vs devices
    specs = [json.loads(c.proto.spec) for c in app.get("vega_lite_chart")]
    with_error_bars = [s for s in specs if "errorbar" in json.dumps(s)]
    assert len(with_error_bars) >= 2  # the memory chart and the tokens/s scaling chart
    assert {m.label for m in app.metric} >= {"Largest micro-batch that fits", "Longest sequence (micro-batch 1)"}
    assert [b.proto.label for b in app.get("download_button")] == ["Plan JSON", "Launch command"]
    assert "torchrun" in app.code[0].value


def test_infeasible_choice_shows_a_clear_message(app):
    widget(app.sidebar.selectbox, "Model name").set_value("llama3-70b")
    widget(app.sidebar.selectbox, "Device").set_value("rtx4090-24gb")
    widget(app.sidebar.number_input, "Devices").set_value(1)
    app.run()
    assert not app.exception
    message = app.error[0].value
    assert message.startswith("Does not fit.") and "would fit" in message and "Traceback" not in message


def test_changed_widget_changes_the_result(app):
    before = app.success[0].value, app.dataframe[0].value.to_dict()
    widget(app.sidebar.number_input, "Devices").set_value(16)
    app.run()
    assert not app.exception
    after = app.success[0].value, app.dataframe[0].value.to_dict()
    assert after != before
    assert app.title[0].value.startswith("llama3-8b on 16 x")


def test_lora_shows_rank_and_targets(app):
    widget(app.sidebar.radio, "Method").set_value("lora")
    app.run()
    assert not app.exception and widget(app.sidebar.number_input, "LoRA rank").value == 16
    assert app.success[0].value.startswith("Fits.")


def test_bad_input_is_an_error_not_a_traceback(app):
    widget(app.sidebar.selectbox, "Precision").set_value("fp8")
    widget(app.sidebar.selectbox, "Device").set_value("a100-80gb")
    app.run()
    assert not app.exception and "fp8" in app.error[0].value


def test_capacity_page(app):
    widget(app.sidebar.radio, "Page").set_value("Capacity planning")
    app.run()
    assert not app.exception
    assert app.success[0].value.startswith("Recommended")
    frame = app.dataframe[0].value
    assert {"devices", "time", "GPU-hours", "cost USD"} <= set(frame.columns)
    assert frame["time"].str.contains(r" (?:ms|s|min|h|days)$").all() or (frame["time"] == "-").any()
    assert charts(app) >= 1  # time and cost against devices
    widget(app.number_input, "Deadline (hours, 0 = none)").set_value(0.001)
    app.run()
    assert not app.exception and "No option meets it" in app.warning[0].value


def test_moai_flavor(app):
    widget(app.sidebar.radio, "Hardware").set_value("MoAI flavor")
    app.run()
    assert not app.exception and "64 x mi250-gcd-64gb" in app.title[0].value


def test_uploaded_config_becomes_the_model():
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 512,
              "_name_or_path": "my-tiny"}
    fields = {"gpu": "cpu", "gpus": 2, "seq_len": 128, "global_batch": 8, "method": "full", "precision": "fp32"}
    page = views.what_fits_page(fields, json.dumps(config))
    assert page["model"] == "my-tiny" and page["plan"]["model"]["hf_config"]["hidden_size"] == 256
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        views.what_fits_page(fields, "{oops")


def test_first_paint_has_the_request_before_the_result():
    """The header and the request in words are drawn before the computation (they need no cost model)."""
    fields = {"model": "llama3-8b", "gpu": "h100-sxm-80gb", "gpus": 8, "seq_len": 4096, "global_batch": 64,
              "method": "lora", "lora_rank": 8, "lora_targets": ["q", "v"], "precision": "bf16"}
    assert views.headline(fields) == "llama3-8b on 8 x h100-sxm-80gb"
    assert views.headline({**fields, "flavor": "8xLarge.4096GB"}) == "llama3-8b on 64 x mi250-gcd-64gb"
    summary = views.request_summary(fields)
    assert "4,096 tokens" in summary and "global batch 64" in summary and "rank 8 on q, v" in summary
    source = Path(APP).read_text()
    assert source.index("HEADER.title(views.headline") < source.index("what_fits(json.dumps")


def _candidate(**config):
    base = {"dp": 2, "tp": 2, "pp": 2, "micro_batch_size": 1, "num_micro_batches": 4, "recompute": "full", "zero": 1,
            "offload": "optimizer", "sequence_parallel": True, "vpp": 2}
    memory = {"peak_bytes": 10 * 2**30, "peak_bytes_range": [9 * 2**30, 12 * 2**30], "breakdown": {"params": 10 * 2**30}}
    return {"config": {**base, **config}, "memory": memory,
            "time": {"tokens_per_s": 1000.0, "tokens_per_s_range": [800.0, 1300.0], "mfu": 0.4}}


def test_candidate_rows_show_the_full_layout_and_intervals():
    row = views.candidate_rows([_candidate()])[0]
    assert (row["DP"], row["TP"], row["PP"], row["CP"], row["EP"], row["VPP"]) == (2, 2, 2, 1, 1, 2)
    assert row["SP"] == "yes" and row["offload"] == "optimizer" and row["ZeRO"].startswith("1")
    assert row["GiB per device"] == "10.0 (9.0–12.0)" and row["tokens/s"] == "1,000 (800–1.3k)"
    later = views.candidate_rows([_candidate(cp=4, ep=8)])[0]
    assert (later["CP"], later["EP"]) == (4, 8)
    interval = views.memory_interval_rows([_candidate()])[0]
    assert interval["low GiB"] == 9 and interval["high GiB"] == 12 and interval["peak GiB"] == 10


def _option(gpus, hours, fits=True, flavor=None):
    return {"gpus": gpus, "flavor": flavor, "fits": fits, "hours": hours if fits else None,
            "gpu_hours": hours * gpus if fits else None, "cost": hours * gpus * 2.5 if fits else None,
            "tokens_per_s": 1e4 * gpus if fits else None, "mfu": 0.41 if fits else None,
            "peak_bytes": 40 * 2**30 if fits else None, "reason": None if fits else "out of memory"}


def test_capacity_rows_have_units_and_no_raw_floats():
    result = {"options": [_option(1, 0.0, fits=False), _option(1, 1234.5678), _option(8, 160.25)],
              "recommendation": None, "rule": "least cost"}
    result["recommendation"] = result["options"][1]
    rows = views.capacity_rows(result)
    assert rows[0]["option"] == "1 device" and rows[2]["option"] == "8 devices"
    assert rows[0]["time"] == "-" and rows[0]["why not"] == "out of memory"
    assert rows[1]["GPU-hours"] == "1,235" and rows[1]["cost USD"] == "3,086" and rows[1]["MFU"] == "41.0%"
    assert rows[1]["time"].endswith("days") and rows[2]["time"].endswith("days")
    for row in rows:
        assert not any(isinstance(v, float) for v in row.values()), row
    text = views.recommendation_text(result)
    assert "1 device —" in text and "1 devices" not in text
    chart = views.capacity_chart_rows(result)
    assert {r["measure"] for r in chart} == {"time (hours)", "cost (USD)"} and len(chart) == 4


def test_scaling_rows_carry_the_interval_and_linear_reference():
    curve = {"options": [_option(1, 10.0), _option(2, 5.0), _option(4, 3.0, fits=False)]}
    rows = views.scaling_rows(curve, 2.0, (-0.2, 0.3))
    assert [r["devices"] for r in rows] == [1, 2]
    assert rows[1]["linear"] == 2 * rows[0]["tokens/s"] and rows[1]["tokens/s per device"] == 1e4
    assert rows[0]["tokens/s low"] < rows[0]["tokens/s"] < rows[0]["tokens/s high"]
    assert views.scaling_rows(curve, None)[0]["tokens/s low"] is None


def test_target_engine_select_only_when_the_request_takes_one(app):
    labels = [s.label for s in app.sidebar.selectbox]
    assert ("Target engine" in labels) == views.has_target()


def test_streamlit_config_keeps_the_watcher_off_the_checkout():
    import tomllib

    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["fileWatcherType"] in ("poll", "none")  # watchdog recursively watches .venv too


def test_framework_select_changes_the_prediction_and_flags_an_uncalibrated_one(app):
    """The software stack is an input (issue 17): the sidebar's framework reaches the planner, and a
    framework no measured run calibrated is flagged on the page, as in the CLI's tables."""
    from planner.profile import load_profile

    calibrated = set(load_profile().data["fitted_on"]["frameworks"])
    missing = next(f for f in views.FRAMEWORK_WORDS if f not in calibrated)
    before = app.dataframe[0].value.to_dict()
    assert not app.warning  # llama3-8b on H100 under the executor: both calibrated
    widget(app.sidebar.selectbox, "Framework").set_value(missing)
    app.run()
    assert not app.exception
    assert app.dataframe[0].value.to_dict() != before
    assert any("Uncalibrated" in w.value and f"framework {missing}" in w.value for w in app.warning)


def test_upload_hint_lists_every_family_the_planner_reads():
    from planner.models import SUPPORTED_TYPES

    hint = views.upload_hint()
    assert all(t in hint for t in SUPPORTED_TYPES) and "qwen3_moe" in hint
