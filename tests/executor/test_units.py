"""The executor's pieces in one process: data, loss normalisation, stage split, mesh order,
checks, checkpoint selection, activation checkpointing, launch lines."""

from __future__ import annotations

import json

import pytest
import torch

from executor import checks
from executor.checkpoint import latest_complete
from executor.data import IGNORE_INDEX, PackedData, load_examples, row_segments, tokenize
from executor.launch import print_launch, runner_up_plans
from executor.loss import causal_lm_loss, items_per_rank
from executor.mesh import coordinates
from executor.options import RunOptions
from executor.pipeline import layers_per_stage
from executor.tokenizer import ByteTokenizer
from planner.errors import InvalidRequest
from planner.plan import ParallelConfig, Plan, load_plan
from tests.executor.conftest import SHAREGPT, make_plan

TOK = ByteTokenizer()


def test_alpaca_trains_on_the_response_only():
    example = tokenize(row_segments({"instruction": "Add.", "input": "2 and 3", "output": "5"}), TOK)
    trained = TOK.decode([t for t, keep in zip(example.ids, example.trained) if keep])
    prompt = TOK.decode([t for t, keep in zip(example.ids, example.trained) if not keep])
    assert trained == " 5" and example.ids[-1] == TOK.eos_id and example.trained[-1]
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:")


def test_sharegpt_trains_on_every_assistant_turn():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]}
    example = tokenize(row_segments(row), TOK)
    trained = TOK.decode([t for t, keep in zip(example.ids, example.trained) if keep])
    assert trained == " Hello Ciao"


def test_bad_rows_are_counted_and_too_many_stop(tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi."}] * 18 + [{"instruction": "x"}, {"conversations": []}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    examples, report = load_examples(str(path), TOK, max_bad_fraction=0.1)
    assert (len(examples), report.rows, report.bad) == (18, 20, 2)
    assert report.first_errors[0] == "row 19: missing or empty 'output'"
    with pytest.raises(InvalidRequest, match="2 of 20 rows .* malformed"):
        load_examples(str(path), TOK, max_bad_fraction=0.05)


def test_packing_is_a_pure_function_of_the_step():
    examples, _ = load_examples(str(SHAREGPT), TOK, 0.1)
    data = PackedData(examples, seq_len=64, global_batch=8, seed=3, pad_id=TOK.pad_id)
    again = PackedData(examples, seq_len=64, global_batch=8, seed=3, pad_id=TOK.pad_id)
    far = data.sequences_per_epoch // 8 + 2  # a step in the second epoch
    for step in (0, 1, far):
        ids, labels = data.batch(step)
        assert ids.shape == labels.shape == (8, 64)
        assert torch.equal(ids, again.batch(step)[0]) and torch.equal(labels, again.batch(step)[1])
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept]) and 0 < kept.sum() < kept.numel()
    assert not torch.equal(data.epoch(0)[0], data.epoch(1)[0])  # reshuffled per epoch


def test_loss_is_the_global_token_mean_whatever_the_split():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 16, 32), torch.randint(0, 32, (4, 16))
    labels[:, :5] = IGNORE_INDEX
    whole = causal_lm_loss(logits, labels, 32, items_per_rank(labels, 1, torch.device("cpu")))
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1))
    assert whole.item() == pytest.approx(reference.item(), rel=1e-5)
    # two dp ranks x two micro-batches, averaged over dp as DDP/FSDP do, chunked or not
    items = items_per_rank(labels, 2, torch.device("cpu"))
    parts = [causal_lm_loss(logits[i:i + 1], labels[i:i + 1], 32, items, chunks=c) for i, c in zip(range(4), (1, 4, 2, 1))]
    assert (sum(parts) / 2).item() == pytest.approx(whole.item(), rel=1e-5)


def test_stages_mirror_the_planner_layout():
    assert layers_per_stage(4, 2, 1) == [[0, 1], [2, 3]]
    assert layers_per_stage(5, 3, 1) == [[0], [1, 2], [3, 4]]  # the first stage never takes the extra layer
    assert layers_per_stage(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_mesh_order_is_tp_innermost_then_dp_then_pp():
    config = ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=1, num_micro_batches=2)
    assert [coordinates(r, config) for r in range(8)] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (0, 1, 0, 1), (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 0, 1)]


def test_cp_ranks_sit_between_dp_and_tp():
    """torchtitan's order (ParallelDims: pp, dp_replicate, dp_shard, cp, tp): a cp group is tp apart."""
    config = ParallelConfig(dp=2, tp=2, pp=1, micro_batch_size=1, num_micro_batches=1, cp=2)
    coords = [coordinates(r, config) for r in range(8)]
    assert coords[:4] == [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1)]
    assert coords[4] == (0, 1, 0, 0) and len(set(coords)) == 8


@pytest.mark.parametrize("workload,config,needle", [
    ({"precision": "fp16"}, {}, "fp16"),
    ({"method": "lora"}, {"tp": 2}, "LoRA/QLoRA with tp or pp"),
    ({"optimizer_in_backward": True}, {"micro_batch_size": 4}, "optimizer in backward runs only with dp = pp = 1"),
])
def test_unsupported_options_are_refused_by_name(tmp_path, workload, config, needle):
    plan = json.loads(make_plan(tmp_path / "p.json", 2, {"precision": "bf16", **workload}, **config).read_text())
    parsed = Plan.from_dict(plan)
    spec, w, c = parsed.model, parsed.workload, parsed.config
    assert needle in checks.unsupported_reason(spec, w, c, on_cuda=False)


def test_a_hand_edited_plan_with_invalid_degrees_is_refused(tmp_path):
    """The executor runs the planner's own checks: a pipeline with more virtual stages than layers
    would otherwise run empty stages."""
    plan = json.loads(make_plan(tmp_path / "p.json", 2, {"precision": "bf16"}, dp=1, pp=2).read_text())
    plan["config"]["vpp"] = 3
    with pytest.raises(InvalidRequest, match="stages exceed the 4 layers"):
        Plan.from_dict(plan)  # the Plan checks its own layout when it is read


def test_a_plan_for_a_model_returning_fp32_logits_is_refused(tmp_path):
    """The executor's transformers models upcast in the loss; a plan priced for fp32 logits from
    the model (torchtune's) would be trained with a different memory profile than predicted."""
    plan = json.loads(make_plan(tmp_path / "p.json", 2, {"precision": "bf16"}).read_text())
    plan["workload"]["fp32_logits"] = True
    parsed = Plan.from_dict(plan)
    spec, w, c = parsed.model, parsed.workload, parsed.config
    assert "no --fp32-logits" in checks.unsupported_reason(spec, w, c, on_cuda=False)


def test_a_plan_priced_for_megatrons_attention_is_refused(tmp_path):
    """fused-softmax prices Megatron-LM's attention, which transformers has no implementation of."""
    plan = json.loads(make_plan(tmp_path / "p.json", 2, {"precision": "bf16"}).read_text())
    plan["workload"]["attention"] = "fused-softmax"
    parsed = Plan.from_dict(plan)
    spec, w, c = parsed.model, parsed.workload, parsed.config
    assert "plan with --attention sdpa" in checks.unsupported_reason(spec, w, c, on_cuda=False)


def test_world_mismatch_is_refused_with_the_fix(tmp_path):
    plan = json.loads(make_plan(tmp_path / "p.json", 2).read_text())
    parsed = Plan.from_dict(plan)
    cluster, config = parsed.cluster, parsed.config
    checks.check_world(cluster, config, 2)
    with pytest.raises(InvalidRequest, match="needs 2 processes .* but 4 were started"):
        checks.check_world(cluster, config, 4)


def test_only_complete_checkpoints_are_found(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-00000004", True), ("step-00000008", False), ("step-00000012.tmp", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "complete.json").write_text("{}")
    assert latest_complete(tmp_path) == (4, root / "step-00000004")
    assert latest_complete(tmp_path / "nothing") is None


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recomputation_gives_the_same_gradients(recompute):
    from executor.model import build_model, decoder_layers
    from executor.parallelize import apply_activation_checkpointing
    from planner.models import load_model
    from planner.specs import Workload

    spec, workload = load_model("llama-tiny"), Workload(seq_len=32, global_batch=2, precision="fp32")
    ids = torch.randint(3, 259, (2, 32))

    def grads(policy: str) -> list[torch.Tensor]:
        model = build_model(spec, workload, torch.device("cpu"), seed=1)
        apply_activation_checkpointing(decoder_layers(model), policy)
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters()]

    for plain, recomputed in zip(grads("none"), grads(recompute)):
        torch.testing.assert_close(plain, recomputed)


def test_options_survive_the_worker_command_line():
    options = RunOptions(plan="p.json", data="d.json", steps=7, output="out", resume=True, lr=1e-3, tokenizer=None)
    assert RunOptions.parse(options.to_argv()) == options


def test_print_launch_for_several_nodes(tmp_path):
    from planner import api
    from planner.plan import save_plan

    request = api.Request(model="llama-tiny", gpu="cpu", gpus=4, gpus_per_node=2, seq_len=64, global_batch=8,
                          precision="fp32")
    config = ParallelConfig(dp=4, tp=1, pp=1, micro_batch_size=1, num_micro_batches=2)
    save_plan(str(tmp_path / "p.json"), api.make_plan(request, api.predict(request, config)))
    text = print_launch(RunOptions(plan=str(tmp_path / "p.json"), data="d.json", steps=5, output="out"))
    assert "--nnodes=2" in text and "--nproc-per-node=2" in text and "--node-rank=${NODE_RANK}" in text
    assert "-m executor.train" in text and "--plan" in text


def test_runner_ups_become_plans(tmp_path):
    from planner.cli import main

    assert main(["suggest", "--model", "llama-tiny", "--gpu", "cpu", "--gpus", "2", "--seq-len", "64",
                 "--global-batch", "8", "--precision", "fp32", "--save-plan", str(tmp_path / "p.json")]) == 0
    document = json.loads((tmp_path / "p.json").read_text())
    plans = runner_up_plans(load_plan(str(tmp_path / "p.json")))
    assert len(plans) == len(document["runner_ups"]) >= 2
    assert plans[0].config.to_dict() == {k: v for k, v in document["runner_ups"][0]["config"].items()
                                         if k in ParallelConfig.__dataclass_fields__}
    assert list(plans[0].runner_ups) == document["runner_ups"][1:]
