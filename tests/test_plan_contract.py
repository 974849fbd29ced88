"""The Plan contract: typed, derived values checked, strict loading, one table of rules, and a winner
that the chosen engine runs (the acceptance of the plan-contract issue)."""

import json

import pytest

from planner.api import Request, make_plan, predict, suggest
from planner.capabilities import TARGETS, runnable_reason
from planner.errors import InvalidRequest
from planner.layout import stage_layers
from planner.plan import PLAN_FORMAT, ParallelConfig, Plan, load_plan, save_plan
from planner.search import Pins

TINY = Request(model="llama-tiny", gpu="cpu", gpus=2, seq_len=64, global_batch=8)
TINY_CONFIG = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=1, num_micro_batches=4)

# the five requests of the acceptance
FIVE = [
    dict(model="llama3-70b", gpu="h100-sxm-80gb", gpus=64, seq_len=4096, global_batch=512),
    dict(model="mixtral-8x7b", gpu="h100-sxm-80gb", gpus=16, seq_len=4096, global_batch=256),
    dict(model="llama3-8b", gpu="a100-80gb", gpus=1, seq_len=4096, global_batch=16),
    dict(model="llama2-70b", gpu="rtx-a6000-48gb", gpus=1, seq_len=512, global_batch=4, method="qlora"),
    dict(model="llama3-8b", gpu="rtx4090-24gb", gpus=1, seq_len=2048, global_batch=8, method="lora"),
]


@pytest.fixture
def tiny_plan_file(tmp_path):
    path = tmp_path / "plan.json"
    save_plan(str(path), make_plan(TINY, predict(TINY, TINY_CONFIG)))
    return path


def edited(path, change) -> str:
    document = json.loads(path.read_text())
    change(document)
    out = path.with_name("edited.json")
    out.write_text(json.dumps(document))
    return str(out)


def test_micro_batches_that_do_not_make_the_global_batch_are_refused():
    """Through the API (it used to report 3.5x the real tokens/s) and in a plan file."""
    wrong = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1)
    with pytest.raises(InvalidRequest, match="does not make the global batch"):
        predict(TINY, wrong)


@pytest.mark.parametrize("change,words", [
    (lambda d: d["config"].update(num_micro_batches=1), "does not make the global batch"),
    (lambda d: d["config"].update(dp=4), "dp x tp x pp"),
    (lambda d: d["config"].update(pp=2, vpp=3, dp=1, num_micro_batches=8), "stages exceed the 4 layers"),
    (lambda d: d["config"].update(tp="2"), "config.tp must be a whole number"),
    (lambda d: d["config"].update(sequence_parallel=None), "must be true or false"),
    (lambda d: d["workload"].update(seq_len=64.0), "workload.seq_len must be a whole number"),
    (lambda d: d.update(colour="blue"), "unknown key"),
    (lambda d: d["config"].update(colour="blue"), "unknown key"),
    (lambda d: d["config"].pop("dp"), "missing key"),
    (lambda d: d.update(format="llm-planner/plan@99"), "newer than this planner reads"),
    (lambda d: d.update(format="something"), "is not a plan"),
    (lambda d: d["layout"].update(stages=[[0, 1], [2, 3]]), "layout .* contradicts"),
    (lambda d: d["dtypes"].update(trained="bfloat16"), "dtypes .* contradicts"),
    (lambda d: d["cluster"].update(num_nodes=3), "num_nodes .* contradicts"),
    (lambda d: d["cluster"].update(num_devices=0), "positive whole number"),
    (lambda d: d.update(target="vllm"), "target must be one of"),
    (lambda d: d.update(runner_ups=[1]), "runner_ups"),
])
def test_hand_edited_plans_are_one_line_errors(tiny_plan_file, change, words):
    with pytest.raises(InvalidRequest, match=words):
        load_plan(edited(tiny_plan_file, change))


@pytest.mark.parametrize("command", [["export", "{p}", "--format", "torchrun"], ["train", "--plan", "{p}", "--dry-run"]])
def test_every_command_that_reads_plans_refuses_them_with_exit_2(cli, tiny_plan_file, command):
    bad = edited(tiny_plan_file, lambda d: d["config"].update(num_micro_batches=3))
    proc = cli(*[w.format(p=bad) for w in command])
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "micro" in proc.stderr and "Traceback" not in proc.stderr


def test_plans_of_the_previous_format_still_load(tiny_plan_file):
    """plan@1 files had no layout, dtypes or target: they are derived."""
    def older(d):
        d["format"] = "llm-planner/plan@1"
        for key in ("layout", "dtypes", "target"):
            d.pop(key)
    plan = load_plan(edited(tiny_plan_file, older))
    assert plan.target == "executor" and plan.stages == [[0, 1, 2, 3]]


def test_a_saved_plan_round_trips_and_writes_its_derived_values(tiny_plan_file):
    document = json.loads(tiny_plan_file.read_text())
    assert document["format"] == PLAN_FORMAT
    assert document["layout"]["stages"] == [[0, 1, 2, 3]] and document["layout"]["rank_order"] == ["pp", "dp", "cp", "tp"]
    assert document["dtypes"] == {"trained": "float32", "frozen": "none", "compute": "bfloat16",
                                  "optimizer_state": "float32"}
    plan = load_plan(str(tiny_plan_file))
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("layers,pp,vpp,expected", [
    (4, 1, 1, [[0, 1, 2, 3]]), (5, 2, 1, [[0, 1], [2, 3, 4]]), (10, 4, 1, [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]),
    (8, 2, 2, [[0, 1], [2, 3], [4, 5], [6, 7]]),
])
def test_stage_layers_give_every_layer_once_and_the_first_stage_never_more(layers, pp, vpp, expected):
    stages = stage_layers(layers, pp, vpp)
    assert stages == expected
    assert sum(stages, []) == list(range(layers))


@pytest.mark.parametrize("request_fields", FIVE, ids=[f["model"] + "-" + f.get("method", "full") for f in FIVE])
def test_the_winner_runs_on_the_target_it_was_ranked_for(request_fields):
    """suggest --target T: every shown candidate is runnable by T (the capability table), for every target."""
    for target in TARGETS:
        request = Request(target=target, **request_fields)
        try:
            result = suggest(request, top=5)
        except Exception as exc:  # noqa: BLE001 - nothing T runs fits: an honest exit 3
            assert type(exc).__name__ == "Infeasible", exc
            continue
        for candidate in result["candidates"]:
            config = ParallelConfig.from_dict({k: v for k, v in candidate["config"].items()
                                               if k in ParallelConfig.__dataclass_fields__})
            plan = make_plan(request, candidate)
            assert runnable_reason(target, config, plan.model, plan.workload, plan.hardware) is None


def test_the_five_save_plan_then_dry_run_exit_0(cli, tmp_path):
    for i, fields in enumerate(FIVE):
        path = tmp_path / f"p{i}.json"
        args = [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
        proc = cli("suggest", *args, "--save-plan", str(path))
        assert proc.returncode == 0, proc.stderr
        proc = cli("train", "--plan", str(path), "--dry-run")
        assert proc.returncode == 0, (fields, proc.stderr)
        assert proc.stdout.startswith("planner train: the plan would run")


def test_dry_run_lists_the_reasons_a_plan_would_not_run(cli, tmp_path):
    request = Request(model="mixtral-8x7b", gpu="h100-sxm-80gb", gpus=16, seq_len=4096, global_batch=256,
                      precision="fp8", target="torchtitan")
    config = ParallelConfig(dp=4, tp=2, pp=2, micro_batch_size=1, num_micro_batches=64, zero=1, offload="optimizer")
    path = tmp_path / "p.json"
    save_plan(str(path), make_plan(request, {"config": config.to_dict()}))
    proc = cli("train", "--plan", str(path), "--dry-run")
    assert proc.returncode == 2
    assert "executor's tp runs" in proc.stderr and "executor's pp" in proc.stderr
    assert "fp8" in proc.stderr and "ZeRO-Offload" in proc.stderr


def test_suggest_json_prints_the_object_on_exit_3(cli):
    proc = cli("suggest", "--model", "llama3-70b", "--gpus", "1", "--seq-len", "2048", "--offload", "none", "--json")
    assert proc.returncode == 3
    result = json.loads(proc.stdout)
    assert result["candidates"] == [] and result["feasible"] == 0 and result["rejected"]["out of memory"] > 0
    assert "--method qlora" in result["ways_out"] and result["rejected_fixes"]["out of memory"]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_pinned_degree_that_cannot_divide_says_so(cli):
    proc = cli("suggest", "--model", "llama3-8b", "--gpus", "8", "--tp", "3")
    assert proc.returncode == 2 and "--tp 3 does not divide the 8 devices" in proc.stderr


def test_invalid_pairings_are_counted_apart_from_real_reasons():
    result = suggest(Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=64))
    assert "sequence parallel needs tp > 1" not in result["rejected"] and result["invalid_pairings"] > 0
    assert all(result["rejected_fixes"][reason] for reason in result["rejected"])


def test_zero_2_and_3_at_one_data_parallel_rank_are_shown_once():
    result = suggest(Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=1, seq_len=2048, global_batch=8), top=10)
    layouts = [(c["config"]["micro_batch_size"], c["config"]["recompute"], c["config"]["offload"],
                c["memory"]["peak_bytes"], round(c["time"]["step_s"], 9)) for c in result["candidates"]]
    assert len(layouts) == len(set(layouts))


def test_the_margin_note_names_the_faster_plan_it_ruled_out():
    request = Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=64)
    free = suggest(request, top=1)
    with_big_margin = suggest(Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=64,
                                      memory_margin=0.5), top=1)
    if with_big_margin["candidates"][0]["time"]["step_s"] > free["candidates"][0]["time"]["step_s"]:
        assert "memory margin" in with_big_margin["margin_note"] and "faster" in with_big_margin["margin_note"]
    assert suggest(Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=8, seq_len=4096, global_batch=64,
                           memory_margin=0.0), top=1)["margin_note"] is None


def test_the_request_holds_a_workload_and_the_cli_options_come_from_it():
    from dataclasses import fields

    from planner.cli import build_parser
    from planner.specs import Workload

    request = Request(model="llama-tiny", seq_len=128, method="lora")
    assert request.workload.seq_len == 128 and request.workload.method == "lora" and request.workload.global_batch is None
    parser = build_parser()
    suggest_parser = parser._subparsers._group_actions[0].choices["suggest"]
    options = {a.dest for a in suggest_parser._actions}
    assert {f.name for f in fields(Workload)} <= options


def test_plans_written_before_cp_keep_loading_and_still_have_their_mesh_checked(tiny_plan_file):
    """plan@2 files from before context parallelism wrote rank order (pp, dp, tp) and a 3-D mesh."""
    def before_cp(document):
        document["layout"]["rank_order"] = ["pp", "dp", "tp"]
        document["layout"]["mesh_shape"] = [s for k, s in zip(["pp", "dp", "cp", "tp"], document["layout"]["mesh_shape"])
                                            if k != "cp"]
    plan = load_plan(edited(tiny_plan_file, before_cp))
    assert plan.layout()["rank_order"] == ["pp", "dp", "cp", "tp"]

    def wrong_mesh(document):
        before_cp(document)
        document["layout"]["mesh_shape"][1] += 1
    with pytest.raises(InvalidRequest, match="contradicts"):
        load_plan(edited(tiny_plan_file, wrong_mesh))
