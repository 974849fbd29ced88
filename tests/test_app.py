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
    assert {"stages (pp)", "TP", "DP", "micro-batches", "batch per device", "recompute", "param distribution",
            "GiB per device", "tokens/s", "MFU"} <= set(top.columns)
    assert charts(app) >= 3  # memory bars, tokens/s and cost vs devices
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
    assert {"devices", "hours", "GPU-hours", "cost USD"} <= set(frame.columns)
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
