"""Hostile and careless inputs across every subcommand (issue 18): each one either exits 2 (invalid)
or 3 (nothing fits) with exactly one line on stderr and no "internal error", or exits 0 with an
answer that makes sense. Every case runs the CLI in its own process, the way people do, with a
timeout so that a hang fails instead of stalling the suite (design target: well under 5 s each).

Most cases are planner-only (no torch import); each costs about half a second of interpreter and
numpy start-up.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT

TIMEOUT_S = 20  # tolerates a loaded machine; the cases answer in about a second
# `train` cases that reach the launcher's preflight import torch and transformers (10 s of CPU alone):
# on two cores shared with the suite's training runs they take up to 20 s
TRAIN_PREFLIGHT_TIMEOUT_S = 90
BIG = str(2**62)
HUGE = str(2**63)

GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_head": 8, "n_layer": 2, "vocab_size": 1000, "n_positions": 1024}
LLAMA = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 2,
         "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 2048}
DEEP = "[" * 100_000 + "]" * 100_000


def _hardware() -> dict:
    return json.loads((ROOT / "planner" / "presets" / "hardware" / "h100-sxm-80gb.json").read_text())


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


def _hw(**changes) -> dict:
    return {**_hardware(), **changes}


def _peak(**changes) -> dict:
    hw = _hardware()
    hw["peak_flops"] = {**hw["peak_flops"], **changes}
    return hw


# file name -> content (dict/list: written as JSON, allowing NaN/Infinity as Python's json does; str: as is)
FILES: dict[str, object] = {
    "deep.json": DEEP,
    "empty.json": "",
    "list.json": [1, 2, 3],
    "bad-utf8.json": b"\xff\xfe{",
    "gpt2.json": GPT2,
    "gpt2-250.json": _with(GPT2, n_embd=250),
    "gpt2-pos64.json": _with(GPT2, n_positions=64),
    "gpt2-act.json": _with(GPT2, activation_function="no_such_act"),
    "gpt2-dropnan.json": _with(GPT2, resid_pdrop=float("nan")),
    "gpt2-drop2.json": _with(GPT2, attn_pdrop=2.0),
    "llama.json": LLAMA,
    "llama-h30.json": _with(LLAMA, hidden_size=2**30),
    "llama-h62.json": _with(LLAMA, hidden_size=2**62, intermediate_size=2**62),
    "llama-neg.json": _with(LLAMA, hidden_size=-256),
    "llama-bool.json": _with(LLAMA, num_hidden_layers=True),
    "llama-str.json": _with(LLAMA, hidden_size="256"),
    "llama-float.json": _with(LLAMA, hidden_size=256.5),
    "llama-nan.json": _with(LLAMA, hidden_size=float("nan")),
    "llama-vocab.json": _with(LLAMA, vocab_size=2**40),
    "llama-layers.json": _with(LLAMA, num_hidden_layers=10**9),
    "llama-oddhead.json": _with(LLAMA, hidden_size=264, num_attention_heads=8, head_dim=33),
    "llama-act.json": _with(LLAMA, hidden_act="not-an-activation"),
    "llama-dropinf.json": _with(LLAMA, attention_dropout=float("inf")),
    "llama-kv.json": _with(LLAMA, num_key_value_heads=3),
    "llama-nl.json": _with(LLAMA, _name_or_path="evil\n$(touch PWNED)"),
    "llama-cr.json": _with(LLAMA, _name_or_path="evil\rname"),
    "llama-nul.json": _with(LLAMA, _name_or_path="evil\x00name"),
    "llama-u2028.json": _with(LLAMA, _name_or_path="evil\u2028main_process_ip: attacker.example.com"),
    "llama-name-list.json": _with(LLAMA, _name_or_path=["a", "b"]),
    "llama-unknown-type.json": _with(LLAMA, model_type="bert"),
    "hw-nan.json": _peak(bf16=float("nan")),
    "hw-inf-mem.json": _hw(memory_bytes=float("inf")),
    "hw-nan-mem.json": _hw(memory_bytes=float("nan")),
    "hw-neginf.json": _hw(hbm_bandwidth_bytes_per_s=float("-inf")),
    "hw-zero-mem.json": _hw(memory_bytes=0),
    "hw-str-mem.json": _hw(memory_bytes="80GB"),
    "hw-bool-node.json": _hw(devices_per_node=True),
    "hw-huge-node.json": _hw(devices_per_node=2**40),
    "hw-host-nan.json": _hw(host_memory_bytes_per_node=float("nan")),
    "hw-host-neg.json": _hw(host_memory_bandwidth_bytes_per_s=-1),
    "hw-empty-peak.json": _hw(peak_flops={}),
    "hw-peak-str.json": _peak(bf16="fast"),
    "hw-huge-mem.json": _hw(memory_bytes=10**400),
    "hw-name-nl.json": _hw(name="evil\n$(touch PWNED)"),
    "hw-name-num.json": _hw(name=5),
    "hw-unknown-key.json": _hw(colour="green"),
    "hw-missing.json": {k: v for k, v in _hardware().items() if k != "memory_bytes"},
    "cases-nan.json": [{"model": "llama3-8b", "gpu": "h100-sxm-80gb", "gpus": float("nan")}],
    "cases-empty.json": [],
    "cases-str.json": "not a list",
    "profile-list.json": [1],
    "plan-list.json": [1],
    "runs-deep.jsonl": DEEP + "\n",
    "runs-deep.json": DEEP,
    "runs-bigcell.csv": "model,gpu,gpus,seq_len,global_batch\n" + "x" * 140_000 + ",h100-sxm-80gb,8,2048,8\n",
    "runs-nan.csv": "model,gpu,gpus,seq_len,global_batch,tokens_per_s\nllama3-8b,h100-sxm-80gb,8,2048,8,nan\n",
    "runs-inf.csv": "model,gpu,gpus,seq_len,global_batch,tokens_per_s\nllama3-8b,h100-sxm-80gb,8,2048,8,1e400\n",
    "runs-huge.csv": "model,gpu,gpus,seq_len,global_batch\nllama3-8b,h100-sxm-80gb," + HUGE + ",2048,8\n",
    "runs.txt": "hello",
    "a-file": "not a folder",
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    return make_hostile_dir(tmp_path_factory.mktemp("hostile"))


def make_hostile_dir(base: Path) -> Path:
    for name, content in FILES.items():
        path = base / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
    os.mkfifo(base / "fifo.json")
    os.mkfifo(base / "fifo.csv")
    (base / "fifo-run").mkdir()
    os.mkfifo(base / "fifo-run" / "summary.json")
    (base / "empty-dir").mkdir()
    (base / "model-dir").mkdir()
    (base / "model-dir" / "config.json").mkdir()  # a folder where the config file should be
    plan = _cli("predict", "--model", "llama-tiny", "--gpus", "2", "--global-batch", "4", "--seq-len", "256",
                "--dp", "2", "--save-plan", str(base / "plan.json"), cwd=base)
    assert plan.returncode == 0, plan.stderr
    cpu_plan = _cli("predict", "--model", "llama-tiny", "--gpu", "cpu", "--gpus", "1", "--global-batch", "2",
                    "--seq-len", "64", "--save-plan", str(base / "plan-cpu.json"), cwd=base)
    assert cpu_plan.returncode == 0, cpu_plan.stderr
    document = json.loads((base / "plan.json").read_text())
    for name, changes in (("plan-bert.json", {"model_type": "bert"}), ("plan-bigger.json", {"hidden_size": 512}),
                          ("plan-nan.json", {"rms_norm_eps": 1e-5, "attention_dropout": float("nan")})):
        edited = json.loads(json.dumps(document))
        edited["model"]["hf_config"].update(changes)
        (base / name).write_text(json.dumps(edited))
    _run_records(base)
    profile = json.loads((ROOT / "calibration" / "profiles" / "default.json").read_text())
    for name, value in (("profile-eff5.json", 5.0), ("profile-effnan.json", float("nan"))):
        edited = json.loads(json.dumps(profile))
        edited["compute"]["default"]["*"]["matmul_efficiency_max"] = value
        (base / name).write_text(json.dumps(edited))
    return base


RECORD_EDITS = {  # run@1 records (`runs import`) edited by hand: each must be rejected, none stored
    "record-hw-nan": lambda r: r["plan"]["hardware"]["peak_flops"].update(bf16=float("nan")),
    "record-hidden-str": lambda r: r["plan"]["model"].update(hidden_size="big"),
    "record-name-newline": lambda r: r["plan"]["model"].update(name="x\n$(touch PWNED)"),
    "record-model-name-newline": lambda r: r.update(model_name="x\n$(touch PWNED)"),
    "record-seq-2**62": lambda r: r["plan"]["workload"].update(seq_len=2**62),
    "record-gpus-2**63": lambda r: r["plan"]["cluster"].update(num_devices=2**63),
    "record-steps-10**400": lambda r: r["measured"].update(steps=10**400),
    "record-tokens-1e308": lambda r: r["measured"].update(tokens_per_s=1e308, tokens_per_s_per_device=1e308),
    "record-memory-1e308": lambda r: r["measured"].update(peak_reserved_bytes=1e308),
    "record-memory-nan": lambda r: r["measured"].update(peak_reserved_bytes=float("nan")),
}


def _run_records(base: Path) -> None:
    record = json.loads((ROOT / "calibration" / "data" / "h100_runs" / "executor-mbs4-compiled.json").read_text())
    for name, edit in RECORD_EDITS.items():
        edited = json.loads(json.dumps(record))
        edited["run_id"] = name
        edit(edited)
        (base / f"{name}.json").write_text(json.dumps(edited))


def _cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("PLANNER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env,
                          timeout=TRAIN_PREFLIGHT_TIMEOUT_S if args[0] == "train" else TIMEOUT_S)


def _json_ok(check: Callable[[object], bool]) -> Callable[[str], bool]:
    return lambda out: check(json.loads(out))


def _sane_prediction(p: dict) -> bool:
    t = p["time"]
    return (0 < t["mfu"] <= 1 and math.isfinite(t["step_s"]) and t["step_s"] > 0
            and math.isfinite(t["tokens_per_s"]) and t["tokens_per_s"] > 0)


@dataclass
class Case:
    name: str
    argv: tuple[str, ...]
    ok: Callable[[str], bool] | None = None  # None: must be refused (exit 2 or 3)
    env: dict[str, str] = field(default_factory=dict)


def C(name: str, *argv: str, ok=None, env=None) -> Case:
    return Case(name, argv, ok, env or {})


TINY = ("--model", "llama-tiny")
EXPLICIT = ("--dp", "1", "--micro-batch-size", "1")
PLAN = "{d}/plan.json"
TRAIN = ("train", "--plan", PLAN, "--data", "{d}/runs.txt", "--steps", "1", "--output", "{d}/r")

CASES = [
    # -- suggest: sizes and degrees ------------------------------------------------------------
    C("suggest seq 2**62", "suggest", *TINY, "--seq-len", BIG),
    C("suggest batch 2**62", "suggest", *TINY, "--global-batch", BIG),
    C("suggest gpus 2**63", "suggest", *TINY, "--gpus", HUGE),
    C("suggest gpus 2**40", "suggest", *TINY, "--gpus", str(2**40)),
    C("suggest gpus 2**40 batch 8", "suggest", *TINY, "--gpus", str(2**40), "--global-batch", "8"),
    C("suggest batch 2**61-1 (prime-ish)", "suggest", *TINY, "--global-batch", str(2**61 - 1)),
    C("suggest seq 0", "suggest", *TINY, "--seq-len", "0"),
    C("suggest seq negative", "suggest", *TINY, "--seq-len", "-5"),
    C("suggest seq text", "suggest", *TINY, "--seq-len", "abc"),
    C("suggest seq float", "suggest", *TINY, "--seq-len", "1e3"),
    C("suggest seq 10**400", "suggest", *TINY, "--seq-len", "1" + "0" * 400),
    C("suggest seq 5000 digits", "suggest", *TINY, "--seq-len", "9" * 5000),
    C("suggest gpus not whole nodes", "suggest", *TINY, "--gpus", "3", "--gpus-per-node", "2"),
    C("suggest gpus-per-node 2**62", "suggest", *TINY, "--gpus", "8", "--gpus-per-node", BIG),
    C("suggest margin nan", "suggest", *TINY, "--memory-margin", "nan"),
    C("suggest margin inf", "suggest", *TINY, "--memory-margin", "inf"),
    C("suggest margin negative", "suggest", *TINY, "--memory-margin", "-0.5"),
    C("suggest margin 1", "suggest", *TINY, "--memory-margin", "1"),
    C("suggest lora rank 2**40", "suggest", *TINY, "--method", "lora", "--lora-rank", str(2**40)),
    C("suggest loss chunks 2**40", "suggest", *TINY, "--loss-chunks", str(2**40)),
    C("suggest lora targets empty", "suggest", *TINY, "--method", "lora", "--lora-targets", ","),
    C("suggest top 0", "suggest", *TINY, "--top", "0"),
    C("suggest top 2**62", "suggest", *TINY, "--gpus", "2", "--top", BIG, "--json",
      ok=_json_ok(lambda r: r["feasible"] >= 1 and all(_sane_prediction(p) for p in r["candidates"]))),
    # the most divisors below the bounds (240 device counts, 448 micro-batches): searched, not hung
    C("suggest most divisors", "suggest", "--model", "llama3-8b", "--gpus", "720720", "--global-batch", "8648640",
      "--json", ok=_json_ok(lambda r: r["searched"] > 10**8 and all(_sane_prediction(p) for p in r["candidates"]))),
    C("suggest tp 2**62", "suggest", *TINY, "--tp", BIG),
    C("suggest pp 2**62", "suggest", *TINY, "--pp", BIG),
    C("suggest micro-batch 2**62", "suggest", *TINY, "--micro-batch-size", BIG),
    C("suggest vpp 2**62", "suggest", *TINY, "--vpp", BIG),
    C("suggest zero 7", "suggest", *TINY, "--zero", "7"),
    C("suggest unknown precision", "suggest", *TINY, "--precision", "fp4"),
    C("suggest seq 128k ok", "suggest", *TINY, "--seq-len", "131072", "--gpus", "8", "--json",
      ok=_json_ok(lambda r: all(_sane_prediction(p) for p in r["candidates"]))),
    C("suggest save-plan into folder", "suggest", *TINY, "--gpus", "1", "--save-plan", "{d}/empty-dir"),
    C("suggest save-plan missing folder", "suggest", *TINY, "--gpus", "1", "--save-plan", "{d}/nope/plan.json"),
    C("suggest save-plan under a file", "suggest", *TINY, "--gpus", "1", "--save-plan", "{d}/a-file/plan.json"),
    # -- models from files ---------------------------------------------------------------------
    C("model empty name", "suggest", "--model", ""),
    C("model unknown name", "suggest", "--model", "llama-99t"),
    C("model missing file", "suggest", "--model", "/nonexistent/config.json"),
    C("model fifo", "suggest", "--model", "{d}/fifo.json"),
    C("model folder without config", "suggest", "--model", "{d}/empty-dir"),
    C("model folder whose config is a folder", "suggest", "--model", "{d}/model-dir"),
    C("model deep json", "suggest", "--model", "{d}/deep.json"),
    C("model empty file", "suggest", "--model", "{d}/empty.json"),
    C("model list", "suggest", "--model", "{d}/list.json"),
    C("model bad utf-8", "suggest", "--model", "{d}/bad-utf8.json"),
    C("model hidden 2**30", "suggest", "--model", "{d}/llama-h30.json"),
    C("model hidden 2**62", "predict", "--model", "{d}/llama-h62.json", *EXPLICIT, "--gpus", "1"),
    C("model hidden negative", "suggest", "--model", "{d}/llama-neg.json"),
    C("model layers bool", "suggest", "--model", "{d}/llama-bool.json"),
    C("model hidden string", "suggest", "--model", "{d}/llama-str.json"),
    C("model hidden float", "suggest", "--model", "{d}/llama-float.json"),
    C("model hidden nan", "suggest", "--model", "{d}/llama-nan.json"),
    C("model vocab 2**40", "suggest", "--model", "{d}/llama-vocab.json"),
    C("model layers 10**9", "suggest", "--model", "{d}/llama-layers.json"),
    C("model odd rotary head_dim", "suggest", "--model", "{d}/llama-oddhead.json"),
    C("model unknown hidden_act", "suggest", "--model", "{d}/llama-act.json"),
    C("model dropout inf", "suggest", "--model", "{d}/llama-dropinf.json"),
    C("model kv heads not dividing", "suggest", "--model", "{d}/llama-kv.json"),
    C("model name with newline", "suggest", "--model", "{d}/llama-nl.json"),
    C("model name with CR", "suggest", "--model", "{d}/llama-cr.json"),
    C("model name with NUL", "suggest", "--model", "{d}/llama-nul.json"),
    C("model name with U+2028", "suggest", "--model", "{d}/llama-u2028.json"),
    C("model name a list", "suggest", "--model", "{d}/llama-name-list.json", "--gpus", "1", "--json",
      ok=_json_ok(lambda r: r["request"]["model"] == "['a', 'b']")),  # str() of it: printable, so kept
    C("model type bert", "suggest", "--model", "{d}/llama-unknown-type.json"),
    C("gpt2 hidden 250 heads 8", "suggest", "--model", "{d}/gpt2-250.json", "--seq-len", "128"),
    C("gpt2 positions 64 < seq 128", "suggest", "--model", "{d}/gpt2-pos64.json", "--seq-len", "128"),
    C("gpt2 positions 64 < seq 128 predict", "predict", "--model", "{d}/gpt2-pos64.json", "--seq-len", "128",
      "--gpus", "1", *EXPLICIT),
    C("gpt2 positions 64 < seq 128 fits", "fits", "--model", "{d}/gpt2-pos64.json", "--seq-len", "128"),
    C("gpt2 unknown activation", "suggest", "--model", "{d}/gpt2-act.json", "--seq-len", "128"),
    C("gpt2 dropout nan", "suggest", "--model", "{d}/gpt2-dropnan.json", "--seq-len", "128"),
    C("gpt2 dropout 2", "suggest", "--model", "{d}/gpt2-drop2.json", "--seq-len", "128"),
    C("gpt2 small fits", "fits", "--model", "{d}/gpt2.json", "--seq-len", "128", "--json",
      ok=_json_ok(lambda r: r["methods"][0]["fits"] and r["methods"][0]["fewest_devices"] == 1
                  and r["methods"][0]["longest_seq_len"] <= 1024)),
    # -- hardware files ------------------------------------------------------------------------
    C("hw bf16 nan", "suggest", *TINY, "--gpu", "{d}/hw-nan.json"),
    C("hw memory inf", "suggest", *TINY, "--gpu", "{d}/hw-inf-mem.json"),
    C("hw memory nan", "suggest", *TINY, "--gpu", "{d}/hw-nan-mem.json"),
    C("hw hbm -inf", "suggest", *TINY, "--gpu", "{d}/hw-neginf.json"),
    C("hw memory 0", "suggest", *TINY, "--gpu", "{d}/hw-zero-mem.json"),
    C("hw memory string", "suggest", *TINY, "--gpu", "{d}/hw-str-mem.json"),
    C("hw devices_per_node bool", "suggest", *TINY, "--gpu", "{d}/hw-bool-node.json"),
    C("hw devices_per_node 2**40", "suggest", *TINY, "--gpu", "{d}/hw-huge-node.json"),
    C("hw host memory nan", "suggest", *TINY, "--gpu", "{d}/hw-host-nan.json"),
    C("hw host bandwidth negative", "suggest", *TINY, "--gpu", "{d}/hw-host-neg.json"),
    C("hw empty peak", "suggest", *TINY, "--gpu", "{d}/hw-empty-peak.json"),
    C("hw peak string", "suggest", *TINY, "--gpu", "{d}/hw-peak-str.json"),
    C("hw memory 10**400", "suggest", *TINY, "--gpu", "{d}/hw-huge-mem.json"),
    C("hw name with newline", "suggest", *TINY, "--gpu", "{d}/hw-name-nl.json"),
    C("hw name a number", "suggest", *TINY, "--gpu", "{d}/hw-name-num.json"),
    C("hw unknown key", "suggest", *TINY, "--gpu", "{d}/hw-unknown-key.json"),
    C("hw missing key", "suggest", *TINY, "--gpu", "{d}/hw-missing.json"),
    C("hw deep json", "suggest", *TINY, "--gpu", "{d}/deep.json"),
    C("hw fifo", "suggest", *TINY, "--gpu", "{d}/fifo.json"),
    C("hw a list", "suggest", *TINY, "--gpu", "{d}/list.json"),
    C("hw unknown preset", "suggest", *TINY, "--gpu", "h900"),
    C("flavor unknown", "suggest", *TINY, "--flavor", "9xHuge"),
    C("flavor wrong size", "suggest", *TINY, "--flavor", "8xLarge.999GB"),
    C("calibration deep json", "suggest", *TINY, "--calibration", "{d}/deep.json"),
    C("calibration fifo", "suggest", *TINY, "--calibration", "{d}/fifo.json"),
    C("calibration a list", "suggest", *TINY, "--calibration", "{d}/profile-list.json"),
    C("calibration efficiency 5 (MFU over 100 %)", "suggest", *TINY, "--calibration", "{d}/profile-eff5.json"),
    C("calibration efficiency nan", "predict", *TINY, *EXPLICIT, "--gpus", "1", "--calibration", "{d}/profile-effnan.json"),
    C("calibration missing", "suggest", *TINY, "--calibration", "{d}/nope.json"),
    # -- predict -------------------------------------------------------------------------------
    C("predict dp not dividing", "predict", *TINY, "--gpus", "8", "--dp", "3"),
    C("predict tp 3", "predict", *TINY, "--gpus", "8", "--tp", "3"),
    C("predict batch not divisible", "predict", *TINY, "--gpus", "8", "--global-batch", "7"),
    C("predict vpp without pp", "predict", *TINY, "--gpus", "8", "--vpp", "2"),
    C("predict seq 2**62", "predict", *TINY, "--gpus", "1", *EXPLICIT, "--seq-len", BIG),
    C("predict batch 2**62", "predict", *TINY, "--gpus", "1", *EXPLICIT, "--global-batch", BIG),
    C("predict gpus 2**63", "predict", *TINY, "--gpus", HUGE, *EXPLICIT),
    C("predict micro-batch 2**40", "predict", *TINY, "--gpus", "1", "--dp", "1", "--micro-batch-size", str(2**40),
      "--global-batch", str(2**40)),
    C("predict sane", "predict", *TINY, "--gpus", "2", "--dp", "2", "--global-batch", "4", "--json",
      ok=_json_ok(_sane_prediction)),
    C("predict long sequence sane", "predict", "--model", "llama3-8b", "--gpus", "8", "--tp", "8", "--dp", "1",
      "--seq-len", "1048576", "--global-batch", "1", "--recompute", "full", "--json",
      ok=_json_ok(_sane_prediction)),
    C("predict fp32 tiny sane", "predict", *TINY, "--gpus", "1", *EXPLICIT, "--precision", "fp32",
      "--seq-len", "16", "--global-batch", "1", "--json", ok=_json_ok(_sane_prediction)),
    # -- fits ----------------------------------------------------------------------------------
    C("fits seq 2**62", "fits", *TINY, "--seq-len", BIG),
    C("fits gpus 2**40", "fits", *TINY, "--gpus", str(2**40)),
    C("fits batch 2**62", "fits", *TINY, "--global-batch", BIG),
    C("fits hw nan", "fits", *TINY, "--gpu", "{d}/hw-nan.json"),
    C("fits deep model", "fits", "--model", "{d}/deep.json"),
    # -- listings ------------------------------------------------------------------------------
    C("models json", "models", "--json",
      ok=_json_ok(lambda rows: len(rows) > 5 and all(r["params"] > 0 for r in rows))),
    C("models extra argument", "models", "extra"),
    C("hardware json", "hardware", "--json", ok=_json_ok(lambda rows: all(r["memory_bytes"] > 0 for r in rows))),
    C("hardware unknown option", "hardware", "--bogus"),
    C("no command", "bogus-command"),
    # -- validate / check / calibrate ------------------------------------------------------------
    C("validate deep cases", "validate", "--cases", "{d}/deep.json"),
    C("validate fifo cases", "validate", "--cases", "{d}/fifo.json"),
    C("validate missing cases", "validate", "--cases", "{d}/nope.json"),
    C("validate cases a string", "validate", "--cases", "{d}/cases-str.json"),
    C("validate calibration deep", "validate", "--calibration", "{d}/deep.json"),
    C("check deep cases", "check", "--cases", "{d}/deep.json"),
    C("check fifo cases", "check", "--cases", "{d}/fifo.json"),
    C("calibrate deep cases", "calibrate", "--cases", "{d}/deep.json", "--out", "{d}/out-profile.json"),
    C("calibrate fifo base", "calibrate", "--base", "{d}/fifo.json", "--out", "{d}/out-profile.json"),
    C("calibrate out is a folder", "calibrate", "--cases", "{d}/cases-empty.json", "--out", "{d}/empty-dir"),
    # -- runs ----------------------------------------------------------------------------------
    C("runs import deep json", "runs", "import", "{d}/runs-deep.json", "--store", "{d}/s1.sqlite"),
    C("runs import deep jsonl", "runs", "import", "{d}/runs-deep.jsonl", "--store", "{d}/s1.sqlite"),
    C("runs import csv cell > 131072", "runs", "import", "{d}/runs-bigcell.csv", "--store", "{d}/s1.sqlite"),
    C("runs import csv tokens nan", "runs", "import", "{d}/runs-nan.csv", "--store", "{d}/s1.sqlite"),
    C("runs import csv tokens 1e400", "runs", "import", "{d}/runs-inf.csv", "--store", "{d}/s1.sqlite"),
    C("runs import csv gpus 2**63", "runs", "import", "{d}/runs-huge.csv", "--store", "{d}/s1.sqlite"),
    *[C(f"runs import {name}", "runs", "import", f"{{d}}/{name}.json", "--store", "{d}/s2.sqlite")
      for name in RECORD_EDITS],
    C("runs list after rejected records", "runs", "list", "--store", "{d}/s2.sqlite", "--json",
      ok=lambda out: out.strip() in ("", "[]")),
    C("runs import fifo", "runs", "import", "{d}/fifo.csv", "--store", "{d}/s1.sqlite"),
    C("runs import folder with fifo summary", "runs", "import", "{d}/fifo-run", "--store", "{d}/s1.sqlite"),
    C("runs import unknown suffix", "runs", "import", "{d}/runs.txt", "--store", "{d}/s1.sqlite"),
    C("runs import store under a file", "runs", "import", "{d}/runs-nan.csv", "--store", "{d}/a-file/s.sqlite"),
    C("runs import PLANNER_STORE under a file", "runs", "import", "{d}/runs-nan.csv",
      env={"PLANNER_STORE": "{d}/a-file/s.sqlite"}),
    C("runs list PLANNER_STORE under a file", "runs", "list", env={"PLANNER_STORE": "{d}/a-file/s.sqlite"},
      ok=lambda out: out == ""),  # nothing stored there: says so on stderr
    C("runs list store not sqlite", "runs", "list", "--store", "{d}/runs.txt"),
    C("runs list store a folder", "runs", "list", "--store", "{d}/empty-dir"),
    C("runs export to a folder", "runs", "export", "--store", "{d}/s1.sqlite", "--output", "{d}/empty-dir"),
    C("runs export to a missing folder", "runs", "export", "--store", "{d}/s1.sqlite", "--output", "{d}/nope/x.csv"),
    C("runs export under a file", "runs", "export", "--store", "{d}/s1.sqlite", "--output", "{d}/a-file/x.csv"),
    # -- capacity ------------------------------------------------------------------------------
    C("capacity tokens nan", "capacity", *TINY, "--tokens", "nan"),
    C("capacity tokens 1e308", "capacity", *TINY, "--tokens", "1e308"),
    C("capacity max-gpus 2**62", "capacity", *TINY, "--tokens", "1e9", "--max-gpus", BIG),
    C("capacity price 1e308", "capacity", *TINY, "--tokens", "1e9", "--price-per-gpu-hour", "1e308", "--max-gpus", "2"),
    C("capacity deadline inf", "capacity", *TINY, "--tokens", "1e9", "--deadline-hours", "inf"),
    C("capacity budget nan", "capacity", *TINY, "--tokens", "1e9", "--budget", "nan"),
    C("capacity seq 2**62", "capacity", *TINY, "--tokens", "1e9", "--seq-len", BIG),
    C("capacity sane", "capacity", *TINY, "--tokens", "1e9", "--max-gpus", "2", "--json",
      ok=_json_ok(lambda r: all(o["hours"] > 0 and math.isfinite(o["hours"]) and 0 < o["mfu"] <= 1
                                for o in r["options"] if o["fits"]))),
    # -- export --------------------------------------------------------------------------------
    C("export -o a folder", "export", PLAN, "--format", "torchrun", "-o", "{d}/empty-dir"),
    C("export -o missing folder", "export", PLAN, "--format", "torchrun", "-o", "{d}/nope/x.sh"),
    C("export -o under a file", "export", PLAN, "--format", "torchrun", "-o", "{d}/a-file/x.sh"),
    C("export time limit 1e308", "export", PLAN, "--format", "slurm", "--time-limit-hours", "1e308"),
    C("export time limit nan", "export", PLAN, "--format", "slurm", "--time-limit-hours", "nan"),
    C("export steps 2**62", "export", PLAN, "--format", "slurm", "--steps", BIG),
    C("export port 99999", "export", PLAN, "--format", "torchrun", "--port", "99999"),
    C("export run-dir with newline", "export", PLAN, "--format", "torchrun", "--run-dir", "runs/a\nb"),
    C("export plan deep", "export", "{d}/deep.json", "--format", "torchrun"),
    C("export plan fifo", "export", "{d}/fifo.json", "--format", "torchrun"),
    C("export plan a list", "export", "{d}/plan-list.json", "--format", "torchrun"),
    C("export plan missing", "export", "{d}/nope.json", "--format", "torchrun"),
    C("export unknown format", "export", PLAN, "--format", "yaml"),
    C("export plan whose config is bert", "export", "{d}/plan-bert.json", "--format", "torchrun"),
    C("export plan whose config is bigger", "export", "{d}/plan-bigger.json", "--format", "deepspeed"),
    C("export plan whose config has NaN dropout", "export", "{d}/plan-nan.json", "--format", "slurm"),
    C("export deepspeed ok", "export", PLAN, "--format", "deepspeed",
      ok=lambda out: json.loads(out)["train_batch_size"] == 4),
    # -- train (planner side of the launcher: argument checks and --print-launch) ----------------
    C("train lr nan", *TRAIN, "--lr", "nan"),
    C("train lr inf", *TRAIN, "--lr", "inf"),
    C("train lr negative", *TRAIN, "--lr", "-1"),
    C("train weight decay nan", *TRAIN, "--weight-decay", "nan"),
    C("train bad fraction nan", *TRAIN, "--max-bad-fraction", "nan"),
    C("train steps 2**62", "train", "--plan", PLAN, "--data", "{d}/runs.txt", "--steps", BIG, "--output", "{d}/r"),
    C("train seed 2**70", *TRAIN, "--seed", str(2**70)),
    C("train print-launch sane", "train", "--plan", PLAN, "--data", "data.json", "--steps", "1", "--output", "runs/x",
      "--print-launch", ok=lambda out: "--nproc-per-node=2" in out and "'runs/x'" not in out),
    C("train plan whose config is bert", "train", "--plan", "{d}/plan-bert.json", "--data", "x", "--steps", "1",
      "--output", "{d}/r"),
    C("train plan whose config is bigger", "train", "--plan", "{d}/plan-bigger.json", "--data", "x", "--steps", "1",
      "--output", "{d}/r", "--print-launch"),
    # these reach the launcher's preflight, which reads --data (they import torch: a few seconds each)
    C("train data nested too deep", "train", "--plan", "{d}/plan-cpu.json", "--data", "{d}/deep.json", "--steps", "1",
      "--output", "{d}/r-deep", "--no-store", "--no-progress"),
    C("train data a fifo", "train", "--plan", "{d}/plan-cpu.json", "--data", "{d}/fifo.json", "--steps", "1",
      "--output", "{d}/r-fifo", "--no-store", "--no-progress"),
    C("train print-launch plan deep", "train", "--plan", "{d}/deep.json", "--data", "x", "--steps", "1",
      "--output", "{d}/r", "--print-launch"),
    C("train print-launch plan fifo", "train", "--plan", "{d}/fifo.json", "--data", "x", "--steps", "1",
      "--output", "{d}/r", "--print-launch"),
    # -- oracle --------------------------------------------------------------------------------
    C("oracle grid deep", "oracle", "--grid", "{d}/deep.json"),
    C("oracle grid fifo", "oracle", "--grid", "{d}/fifo.json"),
    C("oracle grid missing", "oracle", "--grid", "{d}/nope.json"),
    C("oracle grid a list", "oracle", "--grid", "{d}/list.json"),
]


def test_at_least_100_cases():
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, hostile_dir: Path):
    fill = lambda s: s.replace("{d}", str(hostile_dir))  # noqa: E731
    try:
        proc = _cli(*map(fill, case.argv), cwd=hostile_dir, env={k: fill(v) for k, v in case.env.items()})
    except subprocess.TimeoutExpired:
        pytest.fail(f"planner {' '.join(case.argv)[:200]} hung (over {TIMEOUT_S} s)")
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (hostile_dir / "PWNED").exists()
    if case.ok is None:
        assert proc.returncode in (2, 3), (proc.returncode, proc.stdout[-500:], proc.stderr[-500:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr[-2000:]
        assert len(lines[0]) < 2000
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert case.ok(proc.stdout), proc.stdout[-2000:]
