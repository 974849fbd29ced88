""""What fits?" — the planner in a page: pick a model and hardware, see what fits, how fast, and
what it costs. Thin over planner.views (which calls planner.api); no cost-model code here.

    streamlit run app.py
"""

from __future__ import annotations

import json
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from planner import views
from planner.api import list_hardware, list_models
from planner.errors import Infeasible, PlannerError
from planner.hardware import MOAI_FLAVORS

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

st.set_page_config(page_title="llm-planner: what fits?", layout="wide")


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
            st.info("Upload a Hugging Face config.json (llama, mistral, mixtral, qwen2, baichuan, gpt2, gpt_neox, mpt).")
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
    return page, fields, config_text


def show_what_fits(fields: dict[str, Any], config_text: str | None) -> None:
    page = what_fits(json.dumps(fields, sort_keys=True), config_text)
    st.title(f"{page['model']} on {page['gpus']} x {page['hardware']}")
    limits = page["limits"]
    if "infeasible" in page:
        st.error(f"Does not fit. {page['infeasible']}")
        st.caption(f"Fewest devices that hold it with {fields['method']}: {limits['fewest_devices'] or 'more than 16384'}")
        st.stop()
    st.success(page["verdict"])
    st.caption(page["summary"])
    cols = st.columns(3)
    cols[0].metric("Largest micro-batch that fits", limits["largest_micro_batch"] or "none")
    cols[1].metric("Longest sequence (micro-batch 1)", limits["longest_seq_len"] or "none")
    cols[2].metric("Fewest devices", limits["fewest_devices"] or "> 16384")
    st.subheader("Memory per device, by category")
    st.altair_chart(memory_chart(page["memory"], page["capacity_bytes"] / 2**30), width="stretch")
    st.subheader("Top candidates")
    st.dataframe(pd.DataFrame(page["candidates"]), hide_index=True, width="stretch")
    st.subheader("Rejected candidates, by reason")
    st.dataframe(pd.DataFrame(page["rejected"]), hide_index=True, width="stretch")
    show_scaling(fields, config_text, page["hardware"])
    st.subheader("Take it with you")
    st.code(page["launch"], language="bash")
    left, right = st.columns(2)
    left.download_button("Plan JSON", json.dumps(page["plan"], indent=2), file_name="plan.json", mime="application/json")
    right.download_button("Launch command", page["launch"], file_name="launch.sh", mime="text/x-shellscript")


def memory_chart(rows: list[dict[str, Any]], capacity_gib: float) -> alt.LayerChart:
    title = f"GiB per device (red line: the device's {capacity_gib:.1f} GiB)"
    bars = alt.Chart(pd.DataFrame(rows)).mark_bar().encode(
        x=alt.X("sum(GiB):Q", title=title), y=alt.Y("candidate:N", title=None, sort=None),
        color=alt.Color("category:N", title=None), tooltip=["candidate", "category", alt.Tooltip("GiB:Q", format=".1f")])
    capacity = alt.Chart(pd.DataFrame({"capacity GiB": [capacity_gib]}))
    return bars + capacity.mark_rule(color="red", strokeWidth=2).encode(x="capacity GiB:Q", tooltip=["capacity GiB"])


def show_scaling(fields: dict[str, Any], config_text: str | None, hardware: str) -> None:
    st.subheader("Scaling: tokens/s and cost per million tokens vs device count")
    default, hint = views.price_hint(hardware)
    price = st.number_input("Price per device-hour (USD)", min_value=0.0, value=default or 0.0, help=hint)
    rows = scaling(json.dumps(fields, sort_keys=True), config_text, price or None)
    if not rows:
        st.info("No larger device count fits either.")
        return
    frame = pd.DataFrame(rows)
    cost = "USD per M tokens" if price else "GPU-hours per M tokens"
    left, right = st.columns(2)
    left.altair_chart(alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("devices:Q", scale=alt.Scale(type="log", base=2)), y="tokens/s:Q"), width="stretch")
    right.altair_chart(alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("devices:Q", scale=alt.Scale(type="log", base=2)), y=alt.Y(f"{cost}:Q")), width="stretch")


def show_capacity(fields: dict[str, Any], config_text: str | None) -> None:
    st.title("Capacity planning")
    cols = st.columns(5)
    tokens = cols[0].number_input("Tokens to train (billions)", min_value=0.001, value=2.0) * 1e9
    default, hint = views.price_hint(fields.get("gpu") or "h100-sxm-80gb")
    price = cols[1].number_input("USD per device-hour", min_value=0.0, value=default or 0.0, help=hint) or None
    deadline = cols[2].number_input("Deadline (hours, 0 = none)", min_value=0.0, value=0.0) or None
    budget = cols[3].number_input("Budget (USD, 0 = none)", min_value=0.0, value=0.0) or None
    max_gpus = int(cols[4].number_input("Most devices", min_value=1, value=1024))
    moai = "flavor" in fields
    result = capacity(json.dumps(fields, sort_keys=True), config_text, tokens, price, deadline, budget, max_gpus, moai)
    best = result["recommendation"]
    if best is None:
        st.warning(f"No option meets it: {result['unmet']}")
    else:
        cost = "" if best["cost"] is None else f", {best['cost']:,.0f} USD"
        st.success(f"Recommended ({result['rule']}): {best['flavor'] or best['gpus']} devices — {best['hours']:,.1f} h, "
                   f"{best['gpu_hours']:,.0f} GPU-hours{cost}")
        st.caption(best["summary"])
    frame = pd.DataFrame([{"option": o["flavor"] or o["gpus"], "devices": o["gpus"], "fits": o["fits"],
                           "hours": o["hours"], "GPU-hours": o["gpu_hours"], "cost USD": o["cost"],
                           "tokens/s": o["tokens_per_s"], "why not": o["reason"]} for o in result["options"]])
    st.dataframe(frame, hide_index=True, width="stretch")
    fitting = frame[frame["fits"]]
    st.altair_chart(alt.Chart(fitting).mark_line(point=True).encode(
        x=alt.X("devices:Q", scale=alt.Scale(type="log", base=2)), y=alt.Y("hours:Q", scale=alt.Scale(type="log")),
        tooltip=["option", "hours", "GPU-hours", "cost USD"]), width="stretch")


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
