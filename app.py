""""What fits?" — the planner in a page: pick a model and hardware, see what fits, how fast, and
what it costs. Thin over planner.views (which calls planner.api); no cost-model code here.

    streamlit run app.py        (from the repository root: .streamlit/config.toml sets the file watcher)

The header, the request in words and a spinner are drawn before anything slow (the planner's import,
pandas and altair, the cold search), so the first paint carries content.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any

import streamlit as st

st.set_page_config(page_title="llm-planner: what fits?", layout="wide")
HEADER = st.empty()  # the page's title: drawn now, refined once the request and then the answer are known
HEADER.title("llm-planner: what fits?")

from planner import views  # noqa: E402  (after the first paint: the import takes a second cold)
from planner.api import list_hardware, list_models  # noqa: E402
from planner.errors import Infeasible, PlannerError  # noqa: E402
from planner.hardware import MOAI_FLAVORS  # noqa: E402

if TYPE_CHECKING:
    import altair as alt

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LOG2 = {"type": "log", "base": 2}


@st.cache_data(show_spinner=False)
def catalog() -> tuple[list[str], list[str]]:
    return [m["name"] for m in list_models()], [h["name"] for h in list_hardware()]


@st.cache_data(show_spinner=False)
def what_fits(fields_json: str, config_text: str | None) -> dict[str, Any]:
    return views.what_fits_page(json.loads(fields_json), config_text)


@st.cache_data(show_spinner=False)
def scaling(fields_json: str, config_text: str | None, price: float | None) -> list[dict[str, Any]]:
    return views.scaling_page(json.loads(fields_json), config_text, price)


@st.cache_data(show_spinner=False)
def capacity(fields_json: str, config_text: str | None, *args: Any) -> dict[str, Any]:
    return views.capacity_page(json.loads(fields_json), config_text, *args)


def sidebar() -> tuple[str, dict[str, Any], str | None]:
    models, hardware = catalog()
    page = st.sidebar.radio("Page", ["What fits?", "Capacity planning"])
    fields: dict[str, Any] = {}
    config_text = None
    if st.sidebar.radio("Model", ["catalog", "upload a config.json"], horizontal=True) == "catalog":
        fields["model"] = st.sidebar.selectbox("Model name", models, index=models.index("llama3-8b"))
    else:
        upload = st.sidebar.file_uploader("Hugging Face config.json", type="json")
        if upload is None:
            st.info(views.upload_hint())
            st.stop()
        config_text, fields["upload_name"] = upload.getvalue().decode("utf-8", "replace"), upload.name
    if st.sidebar.radio("Hardware", ["preset", "MoAI flavor"], horizontal=True) == "preset":
        fields["gpu"] = st.sidebar.selectbox("Device", hardware, index=hardware.index("h100-sxm-80gb"))
        if page == "What fits?":
            fields["gpus"] = int(st.sidebar.number_input("Devices", min_value=1, max_value=16384, value=8))
    else:
        fields["gpu"] = "mi250-gcd-64gb"
        fields["flavor"] = st.sidebar.selectbox("Flavor", MOAI_FLAVORS, index=MOAI_FLAVORS.index("8xLarge.4096GB"))
    fields["seq_len"] = int(st.sidebar.number_input("Sequence length", min_value=1, value=4096, step=512))
    fields["global_batch"] = int(st.sidebar.number_input("Global batch (sequences)", min_value=1, value=64))
    fields["method"] = st.sidebar.radio("Method", ["full", "lora", "qlora"], horizontal=True)
    if fields["method"] != "full":
        fields["lora_rank"] = int(st.sidebar.number_input("LoRA rank", min_value=1, value=16))
        fields["lora_targets"] = st.sidebar.multiselect("LoRA targets", LORA_TARGETS, default=list(LORA_TARGETS))
    fields["precision"] = st.sidebar.selectbox("Precision", ["bf16", "fp16", "fp8", "fp32"])
    if views.has_target():  # shown once planner.api.Request takes a target engine
        fields["target"] = st.sidebar.selectbox("Target engine", views.TARGET_ENGINES,
                                                help="the training stack the plan is written for")
    fields["framework"] = st.sidebar.selectbox("Framework", list(views.FRAMEWORK_WORDS),
                                               format_func=views.FRAMEWORK_WORDS.get,
                                               help="the software stack that will train: its calibrated speed")
    return page, fields, config_text


def show_what_fits(fields: dict[str, Any], config_text: str | None) -> None:
    HEADER.title(views.headline(fields, config_text))
    st.caption(views.request_summary(fields))
    with st.spinner("Searching every layout that fits…", show_time=True):
        page = what_fits(json.dumps(fields, sort_keys=True), config_text)
    HEADER.title(f"{page['model']} on {page['gpus']} x {page['hardware']}")
    limits = page["limits"]
    if "infeasible" in page:
        st.error(f"Does not fit. {page['infeasible']}")
        st.caption(f"Fewest devices that hold it with {fields['method']}: {limits['fewest_devices'] or 'more than 16384'}")
        st.stop()
    st.success(page["verdict"])
    if page["uncalibrated"]:
        st.warning(page["uncalibrated"])
    st.caption(page["summary"])
    cols = st.columns(3)
    cols[0].metric("Largest micro-batch that fits", limits["largest_micro_batch"] or "none")
    cols[1].metric("Longest sequence (micro-batch 1)", f"{limits['longest_seq_len']:,} tokens" if limits["longest_seq_len"] else "none")
    cols[2].metric("Fewest devices", f"{limits['fewest_devices']:,}" if limits["fewest_devices"] else "> 16384")
    st.subheader("Top candidates")
    st.dataframe(frame(page["candidates"]), hide_index=True, width="stretch",
                 column_config=right_aligned("GiB per device", "tokens/s", "MFU", widths={"tokens/s": 150}))
    st.caption("In brackets: the ~80 % interval, from the calibration's cross-validated errors.")
    st.subheader("Memory per device, by category")
    st.altair_chart(memory_chart(page["memory"], page.get("memory_intervals", []), page["capacity_bytes"] / 2**30),
                    width="stretch")
    st.subheader("Rejected candidates, by reason")
    st.dataframe(frame(page["rejected"]), hide_index=True, width="stretch")
    show_scaling(fields, config_text, page["hardware"])
    st.subheader("Take it with you")
    st.code(page["launch"], language="bash")
    left, right = st.columns(2)
    left.download_button("Plan JSON", json.dumps(page["plan"], indent=2), file_name="plan.json", mime="application/json")
    right.download_button("Launch command", page["launch"], file_name="launch.sh", mime="text/x-shellscript")


def right_aligned(*columns: str, widths: dict[str, int] | None = None) -> dict[str, Any]:
    """Formatted numbers (text) aligned like numbers, where this streamlit can (alignment and widths in
    pixels: 1.50+); `widths` fixes a column's pixels (the grid keeps the width it sized on the first run)."""
    if "alignment" not in inspect.signature(st.column_config.Column).parameters:
        return {}
    return {c: st.column_config.Column(alignment="right", width=(widths or {}).get(c)) for c in columns}


def frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def memory_chart(rows: list[dict[str, Any]], intervals: list[dict[str, Any]], capacity_gib: float) -> alt.LayerChart:
    import altair as alt

    title = f"GiB per device (red line: the device's {capacity_gib:.1f} GiB; black: the peak's ~80 % interval)"
    order = list(dict.fromkeys(r["candidate"] for r in rows))  # #1, #2, ... top down in every layer
    bars = alt.Chart(frame(rows)).mark_bar().encode(
        x=alt.X("sum(GiB):Q", title=title), y=alt.Y("candidate:N", title=None, sort=order),
        color=alt.Color("category:N", title=None), tooltip=["candidate", "category", alt.Tooltip("GiB:Q", format=".1f")])
    capacity = alt.Chart(frame([{"capacity GiB": capacity_gib}]))
    layers = [bars, capacity.mark_rule(color="red", strokeWidth=2).encode(x="capacity GiB:Q", tooltip=["capacity GiB"])]
    if intervals:
        layers.append(alt.Chart(frame(intervals)).mark_errorbar(ticks=True, color="black", thickness=2).encode(
            x=alt.X("low GiB:Q", title=title), x2="high GiB:Q", y=alt.Y("candidate:N", sort=order),
            tooltip=["candidate", alt.Tooltip("peak GiB:Q", format=".1f"), alt.Tooltip("low GiB:Q", format=".1f"),
                     alt.Tooltip("high GiB:Q", format=".1f")]).properties(name="interval"))
    return alt.layer(*layers)


def throughput_chart(rows: list[dict[str, Any]]) -> alt.LayerChart:
    """tokens/s against devices on log-log axes (linear scaling is a straight line, dashed for reference),
    with the prediction's ~80 % interval as error bars."""
    import altair as alt

    data = alt.Chart(frame(rows))
    x = alt.X("devices:Q", scale=alt.Scale(**LOG2))

    def y(field: str) -> alt.Y:
        return alt.Y(field, scale=alt.Scale(type="log"), axis=alt.Axis(format="~s"),
                     title="tokens/s (log; dashed: linear scaling)")

    tips = ["devices", alt.Tooltip("tokens/s:Q", format=",.0f"), alt.Tooltip("tokens/s per device:Q", format=",.0f")]
    layers = [data.mark_line(strokeDash=[4, 4], color="gray").encode(x=x, y=y("linear:Q")),
              data.mark_line(point=True).encode(x=x, y=y("tokens/s:Q"), tooltip=tips)]
    if rows and rows[0]["tokens/s low"] is not None:
        layers.append(data.mark_errorbar(ticks=True).encode(x=x, y=y("tokens/s low:Q"), y2="tokens/s high:Q")
                      .properties(name="interval"))
    return alt.layer(*layers)


def show_scaling(fields: dict[str, Any], config_text: str | None, hardware: str) -> None:
    import altair as alt

    st.subheader("Scaling: tokens/s and cost per million tokens vs device count")
    default, hint = views.price_hint(hardware)
    price = st.number_input("Price per device-hour (USD)", min_value=0.0, value=default or 0.0, help=hint)
    rows = scaling(json.dumps(fields, sort_keys=True), config_text, price or None)
    if not rows:
        st.info("No larger device count fits either.")
        return
    cost = "USD per M tokens" if price else "GPU-hours per M tokens"
    left, right = st.columns(2)
    left.altair_chart(throughput_chart(rows), width="stretch")
    right.altair_chart(alt.Chart(frame(rows)).mark_line(point=True).encode(
        x=alt.X("devices:Q", scale=alt.Scale(**LOG2)), y=alt.Y(f"{cost}:Q"),
        tooltip=["devices", alt.Tooltip(f"{cost}:Q", format=",.3f")]), width="stretch")


def show_capacity(fields: dict[str, Any], config_text: str | None) -> None:
    HEADER.title("Capacity planning")
    st.caption(f"{fields.get('model') or fields.get('upload_name')} on {fields.get('flavor') or fields.get('gpu')}: "
               f"{views.request_summary(fields)}")
    cols = st.columns(5)
    tokens = cols[0].number_input("Tokens to train (billions)", min_value=0.001, value=2.0) * 1e9
    default, hint = views.price_hint(fields.get("gpu") or "h100-sxm-80gb")
    price = cols[1].number_input("USD per device-hour", min_value=0.0, value=default or 0.0, help=hint) or None
    deadline = cols[2].number_input("Deadline (hours, 0 = none)", min_value=0.0, value=0.0) or None
    budget = cols[3].number_input("Budget (USD, 0 = none)", min_value=0.0, value=0.0) or None
    max_gpus = int(cols[4].number_input("Most devices", min_value=1, value=1024))
    moai = "flavor" in fields
    with st.spinner("Planning every device count…", show_time=True):
        result = capacity(json.dumps(fields, sort_keys=True), config_text, tokens, price, deadline, budget, max_gpus, moai)
    best = views.recommendation_text(result)
    if best is None:
        st.warning(f"No option meets it: {result['unmet']}")
    else:
        st.success(best)
        st.caption(result["recommendation"]["summary"])
    flag = views.uncalibrated_warning(result.get("uncalibrated"))
    if flag:
        st.warning(flag)
    st.altair_chart(capacity_chart(views.capacity_chart_rows(result)), width="stretch")
    st.dataframe(frame(views.capacity_rows(result)), hide_index=True, width="stretch",
                 column_config=right_aligned("time", "GPU-hours", "cost USD", "tokens/s", "MFU", "GiB per device"))


def capacity_chart(rows: list[dict[str, Any]]) -> alt.FacetChart:
    """Time and cost (or GPU-hours) against devices, side by side, log-log."""
    import altair as alt

    return alt.Chart(frame(rows)).mark_line(point=True).encode(
        x=alt.X("devices:Q", scale=alt.Scale(**LOG2)), y=alt.Y("value:Q", scale=alt.Scale(type="log"), title=None),
        tooltip=["option", "measure", alt.Tooltip("value:Q", format=",.1f")],
    ).properties(width=420, height=260).facet(
        column=alt.Column("measure:N", title=None, sort=["time (hours)"])).resolve_scale(y="independent")


def main() -> None:
    page, fields, config_text = sidebar()
    try:
        if page == "What fits?":
            show_what_fits(fields, config_text)
        else:
            show_capacity(fields, config_text)
    except Infeasible as exc:
        st.error(f"Does not fit. {exc}")
    except PlannerError as exc:
        st.error(str(exc))


main()
