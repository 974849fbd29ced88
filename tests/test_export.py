"""Exports: each output loads with its format's own parser (json, yaml, Python's compile, torchrun's
and accelerate's argparse) and names the plan's degrees; the keys are the engines' real ones; what
an engine cannot run is refused with the capability table's words."""

import json
import shlex
import shutil
import subprocess

import pytest
import yaml

from planner.api import Request, make_plan, suggest
from planner.errors import InvalidRequest
from planner.export import FORMATS, LaunchOptions, export_plan
from planner.plan import ParallelConfig, save_plan
from planner.search import Pins

# DeepSpeed config keys: https://www.deepspeed.ai/docs/config-json/ ("Batch Size related parameters",
# "BFLOAT16 training options", "FP16 training options", "ZeRO Optimizations for FP16 Training",
# "Parameter offloading", "Optimizer offloading"); AutoTP training: deepspeed v0.19.8
# deepspeed/runtime/tensor_parallel/config.py (TPTrainingConfig.autotp_size under "tensor_parallel").
DEEPSPEED_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16",
                 "zero_optimization", "tensor_parallel"}
DEEPSPEED_ZERO = {"stage", "offload_optimizer", "offload_param", "overlap_comm", "contiguous_gradients",
                  "reduce_bucket_size", "allgather_bucket_size"}
DEEPSPEED_OFFLOAD = {"device", "pin_memory", "nvme_path", "buffer_count"}

# torchtitan 0.3.0 dataclass fields (torchtitan/config/configs.py TrainingConfig, ParallelismConfig,
# CompileConfig), https://github.com/pytorch/torchtitan/tree/v0.3.0
TORCHTITAN_FIELDS = {
    "training": {"local_batch_size", "global_batch_size", "seq_len", "steps", "enable_cpu_offload",
                 "mixed_precision_param", "mixed_precision_reduce", "max_norm", "dataset"},
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "tensor_parallel_degree", "enable_sequence_parallel", "pipeline_parallel_degree",
                    "module_fqns_per_model_part", "pipeline_parallel_schedule", "pipeline_parallel_microbatch_size",
                    "pipeline_parallel_layers_per_stage", "context_parallel_degree"},
    "compile": {"enable", "components", "enable_async_tensor_parallel"},
}


def plan_for(pins: Pins, model="llama3-8b", gpus=16, global_batch=64, target="executor", **workload):
    request = Request(model=model, gpu="h100-sxm-80gb", gpus=gpus, seq_len=4096, global_batch=global_batch,
                      target=target, **workload)
    best = suggest(request, pins, top=1)["candidates"][0]
    return make_plan(request, best)


@pytest.fixture(scope="module")
def tp_plan():
    return plan_for(Pins(tp=2, pp=1, zero=3, offload="none", recompute="full", sequence_parallel=False))


@pytest.fixture(scope="module")
def deepspeed_tp_plan():
    return plan_for(Pins(tp=2, pp=1, zero=2, offload="none", recompute="full"), target="deepspeed")


@pytest.fixture(scope="module")
def pp_plan():
    return plan_for(Pins(tp=1, pp=2, zero=1, offload="none"), target="deepspeed")


@pytest.fixture(scope="module")
def three_d_plan():
    return plan_for(Pins(tp=2, pp=2, zero=3, offload="none"))


def torchrun_args(line: str):
    """Parse a torchrun command line with torchrun's own parser (torch.distributed.run)."""
    run = pytest.importorskip("torch.distributed.run")
    words = shlex.split(line)
    assert words[0] == "torchrun"
    return run.get_args_parser().parse_args(words[1:])


def test_torchrun_line_parses_with_torchrun(three_d_plan):
    text = export_plan(three_d_plan, "torchrun", LaunchOptions(plan_path="p.json", steps=50)).text
    line = [l for l in text.splitlines() if l.startswith("torchrun")][0]
    args = torchrun_args(line)
    cluster = three_d_plan.cluster
    assert (args.nnodes, int(args.nproc_per_node)) == (str(cluster.num_nodes), cluster.devices_per_node)
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint.endswith(":29500") and "MASTER_ADDR" in args.rdzv_endpoint
    assert args.module and args.training_script == "executor.train"
    assert args.training_script_args == ["--plan", "p.json", "--data", "$DATA", "--output", "runs/llm-planner",
                                         "--steps", "50"]
    assert "dp 4, tp 2, pp 2" in text  # the comment names the plan's degrees


def test_deepspeed_json_batch_arithmetic_and_keys(deepspeed_tp_plan):
    config = json.loads(export_plan(deepspeed_tp_plan, "deepspeed").text)
    cfg, workload = deepspeed_tp_plan.config, deepspeed_tp_plan.workload
    assert set(config) <= DEEPSPEED_TOP and set(config["zero_optimization"]) <= DEEPSPEED_ZERO
    assert config["train_micro_batch_size_per_gpu"] == cfg.micro_batch_size
    assert config["gradient_accumulation_steps"] == cfg.num_micro_batches
    # DeepSpeed's own check: train_batch_size = micro x accumulation x data-parallel world size
    assert config["train_batch_size"] == cfg.micro_batch_size * cfg.num_micro_batches * cfg.dp == workload.global_batch
    assert config["zero_optimization"]["stage"] == cfg.zero == 2
    assert config["tensor_parallel"] == {"autotp_size": 2}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}


def test_deepspeed_offload_sections():
    plan = plan_for(Pins(tp=1, pp=1, zero=3, offload="params"), gpus=8, global_batch=8, target="deepspeed")
    zero = json.loads(export_plan(plan, "deepspeed").text)["zero_optimization"]
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    assert set(zero["offload_param"]) <= DEEPSPEED_OFFLOAD
    plan = plan_for(Pins(tp=1, pp=1, zero=2, offload="optimizer"), gpus=8, global_batch=8, target="deepspeed")
    zero = json.loads(export_plan(plan, "deepspeed").text)["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero


def test_deepspeed_pipeline_notes_stages(pp_plan):
    result = export_plan(pp_plan, "deepspeed")
    assert json.loads(result.text)["zero_optimization"]["stage"] == 1
    assert any("num_stages=2" in note for note in result.notes)


def test_accelerate_yaml_loads_with_accelerate(tp_plan, tmp_path):
    text = export_plan(tp_plan, "accelerate").text
    doc = yaml.safe_load(text)
    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    cluster = config_args.ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    assert cluster.distributed_type.value == "FSDP" and cluster.num_processes == 16 and cluster.num_machines == 2
    # every fsdp_* / parallelism_config_* key is an option of `accelerate launch`
    launch = pytest.importorskip("accelerate.commands.launch")
    options = {a.dest for a in launch.launch_command_parser()._actions}
    nested = {**doc["fsdp_config"], **doc["parallelism_config"]}
    assert set(nested) <= options, set(nested) - options
    p = doc["parallelism_config"]
    assert p["parallelism_config_tp_size"] == tp_plan.config.tp == 2
    assert p["parallelism_config_dp_shard_size"] * p["parallelism_config_dp_replicate_size"] == tp_plan.config.dp
    assert doc["fsdp_config"]["fsdp_reshard_after_forward"] is True  # zero 3
    assert doc["fsdp_config"]["fsdp_activation_checkpointing"] is True  # recompute full
    assert doc["mixed_precision"] == "bf16"


def test_accelerate_ddp_when_nothing_is_sharded():
    plan = plan_for(Pins(tp=1, pp=1, zero=0, offload="none"), model="llama-tiny", gpus=2, global_batch=8)
    doc = yaml.safe_load(export_plan(plan, "accelerate").text)
    assert doc["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in doc and doc["num_processes"] == 2


def torchtitan_settings(plan, steps=None):
    """The exported module compiles, and the settings it passes are torchtitan 0.3 fields."""
    from planner.export_base import _Plan
    from planner.export_engines import torchtitan_settings as settings

    text = export_plan(plan, "torchtitan", LaunchOptions(steps=steps)).text
    compile(text, "job.py", "exec")  # valid Python: torchtitan imports it with --module
    values = settings(_Plan(plan), LaunchOptions(steps=steps))
    for section, keys in values.items():
        assert set(keys) <= TORCHTITAN_FIELDS[section], (section, set(keys) - TORCHTITAN_FIELDS[section])
        assert f"ParallelismConfig(**{values['parallelism']!r})" in text
    return text, values


def torchtitan_virtual_stages(parts: list[list[str]], num_layers: int, pp: int, schedule: str) -> int:
    """torchtitan 0.3.0's checks of an explicit split (torchtitan/distributed/pipeline_parallel.py
    pipeline_llm / _get_pipeline_metadata): every layer once, in order, the parts a multiple of pp;
    a single-stage schedule (1F1B) needs one part per rank, a looped one (Interleaved1F1B) two or more."""
    layers = [m for part in parts for m in part if m.startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(num_layers)]
    assert parts[0][0] == "tok_embeddings" and parts[-1][-2:] == ["norm", "lm_head"]
    assert len(parts) % pp == 0
    per_rank = len(parts) // pp
    assert per_rank == 1 if schedule == "1F1B" else per_rank >= 2
    return len(parts)


def test_torchtitan_module_degrees_and_batches(three_d_plan):
    text, values = torchtitan_settings(three_d_plan, steps=7)
    par, cfg, training = values["parallelism"], three_d_plan.config, values["training"]
    assert par["tensor_parallel_degree"] == 2 and par["pipeline_parallel_degree"] == 2
    assert par["data_parallel_shard_degree"] * par["data_parallel_replicate_degree"] == cfg.dp
    assert par["pipeline_parallel_microbatch_size"] == cfg.micro_batch_size
    # with pipelining, torchtitan splits the local batch into local / microbatch micro-batches
    assert training["local_batch_size"] // par["pipeline_parallel_microbatch_size"] == cfg.num_micro_batches
    assert training["global_batch_size"] == three_d_plan.workload.global_batch and training["steps"] == 7
    assert "llama3_8b()" in text and f"{cfg.recompute.capitalize()}AC" in text or cfg.recompute == "none"
    torchtitan_virtual_stages(par["module_fqns_per_model_part"], 32, cfg.pp, par["pipeline_parallel_schedule"])


def test_torchtitan_interleaved_pipeline_is_one_torchtitan_builds():
    """llama3-70b pp 8 vpp 2: the old TOML said pipeline_parallel_layers_per_stage = 5, from which
    torchtitan counts ceil((80 + 1 + 1) / 5) = 17 virtual stages, not divisible by 8; the plan's own
    split is now written out, 16 parts of 5 layers."""
    plan = plan_for(Pins(tp=8, pp=8, vpp=2, zero=1), model="llama3-70b", gpus=64, global_batch=512,
                    target="torchtitan")
    _, values = torchtitan_settings(plan)
    par = values["parallelism"]
    assert par["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert torchtitan_virtual_stages(par["module_fqns_per_model_part"], 80, 8, "Interleaved1F1B") == 16
    assert [len(p) for p in par["module_fqns_per_model_part"]][1:-1] == [5] * 14


def test_torchtitan_gradient_accumulation_without_pipeline(tp_plan):
    _, values = torchtitan_settings(tp_plan)
    cfg, training = tp_plan.config, values["training"]
    # torchtitan accumulates global / (local x dp) micro-batches when pp = 1
    assert training["global_batch_size"] // (training["local_batch_size"] * cfg.dp) == cfg.num_micro_batches


def test_megatron_arguments_parse_as_megatron_names_them(three_d_plan):
    from planner.export_base import _Plan
    from planner.export_engines import megatron_arguments

    plan = plan_for(Pins(tp=2, pp=2, zero=1, sequence_parallel=True), target="megatron")
    args = megatron_arguments(_Plan(plan), LaunchOptions(steps=10))
    values = dict(zip(args, args[1:]))
    assert values["--tensor-model-parallel-size"] == "2" and values["--pipeline-model-parallel-size"] == "2"
    assert values["--num-query-groups"] == "8" and "--sequence-parallel" in args and "--use-distributed-optimizer" in args
    assert int(values["--global-batch-size"]) == plan.workload.global_batch
    text = export_plan(plan, "megatron").text
    assert subprocess.run([shutil.which("bash"), "-n"], input=text, text=True).returncode == 0


def test_slurm_script_is_valid_bash_and_launches_the_plan(three_d_plan):
    text = export_plan(three_d_plan, "slurm", LaunchOptions(steps=1000)).text
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n"], input=text, text=True).returncode == 0
    directives = dict((l.split(" ", 1)[1].lstrip("-").split("=", 1) + [""])[:2]
                      for l in text.splitlines() if l.startswith("#SBATCH"))
    assert int(directives["nodes"]) == three_d_plan.cluster.num_nodes
    assert int(directives["gpus-per-node"]) == three_d_plan.cluster.devices_per_node
    days, clock = directives["time"].split("-")
    hours, minutes, _ = map(int, clock.split(":"))
    predicted_s = three_d_plan.prediction["time"]["step_s"] * 1000
    assert (int(days) * 24 + hours) * 3600 + minutes * 60 >= predicted_s  # never below the prediction
    srun = [l for l in text.splitlines() if l.startswith("srun ")][0]
    args = torchrun_args(srun.removeprefix("srun "))
    assert args.nnodes == "$SLURM_NNODES" and args.training_script == "executor.train"


@pytest.mark.parametrize("fmt,words", [("accelerate", "not runnable by accelerate: .*pipeline"),
                                       ("deepspeed", "not runnable by deepspeed: .*pipeline engine"),
                                       ("megatron", "not runnable by megatron: .*optimizer states"),
                                       ("torchrun", "not runnable by executor: .*ZeRO-Offload")])
def test_refuses_what_the_engine_cannot_run(fmt, words):
    """A plan made for no engine in particular (ZeRO-3 + optimizer offload with tp and pp)."""
    request = Request(model="llama3-8b", gpu="h100-sxm-80gb", gpus=16, seq_len=4096, global_batch=64)
    config = ParallelConfig(dp=4, tp=2, pp=2, micro_batch_size=1, num_micro_batches=16, zero=3, offload="optimizer")
    plan = make_plan(request, {"config": config.to_dict()})
    with pytest.raises(InvalidRequest, match=words):
        export_plan(plan, fmt)


@pytest.mark.parametrize("target", ["executor", "deepspeed", "accelerate", "torchtitan", "megatron"])
def test_what_suggest_ranks_for_a_target_its_export_accepts(target):
    """suggest --target T ranks only what T runs: each of the five best exports without refusal."""
    fmt = {"executor": "torchrun"}.get(target, target)
    for model, gpus, batch in (("llama3-70b", 64, 512), ("llama3-8b", 16, 64)):
        request = Request(model=model, gpu="h100-sxm-80gb", gpus=gpus, seq_len=4096, global_batch=batch, target=target)
        for candidate in suggest(request, top=5)["candidates"]:
            export_plan(make_plan(request, candidate), fmt)


def test_torchtitan_refuses_models_it_has_no_code_for():
    plan = plan_for(Pins(), model="llama-tiny", gpus=2, global_batch=8)
    with pytest.raises(InvalidRequest, match="torchtitan ships llama3"):
        export_plan(plan, "torchtitan")


def test_cli_writes_every_format(cli, tmp_path, tp_plan):
    path = tmp_path / "plan.json"
    save_plan(str(path), tp_plan)
    expected = {"torchrun": "--nnodes=2 --nproc-per-node=8", "accelerate": "parallelism_config_tp_size: 2",
                "torchtitan": "'tensor_parallel_degree': 2", "slurm": "#SBATCH --nodes=2"}
    assert set(expected) | {"deepspeed", "megatron"} == set(FORMATS)
    for fmt, text in expected.items():
        proc = cli("export", str(path), "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        assert text in proc.stdout, (fmt, proc.stdout)


def test_cli_errors_are_one_line(cli, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    proc = cli("export", str(bad), "--format", "deepspeed")
    assert proc.returncode == 2 and "not a plan" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    proc = cli("export", str(tmp_path / "missing.json"), "--format", "slurm")
    assert proc.returncode == 2 and "cannot read plan" in proc.stderr and "Traceback" not in proc.stderr


def test_paths_with_spaces_survive_the_shell(tp_plan):
    options = LaunchOptions(plan_path="my plans/p.json", data="/data/my corpus", output="runs/$USER")
    line = export_plan(tp_plan, "torchrun", options).text.splitlines()[-1]
    args = torchrun_args(line).training_script_args
    assert args[:6] == ["--plan", "my plans/p.json", "--data", "/data/my corpus", "--output", "runs/$USER"]
    # a $ next to quotes is no plain variable: single-quoted, it reaches the program verbatim (no expansion)
    line = export_plan(tp_plan, "torchrun", LaunchOptions(data='$HOME/"x')).text.splitlines()[-1]
    assert torchrun_args(line).training_script_args[3] == '$HOME/"x'


@pytest.mark.parametrize("fmt", ["deepspeed", "accelerate"])
def test_no_workload_choice_is_dropped_silently(fmt):
    """compile, LoRA and eager attention: mapped into the engine's config, or a note says where they go."""
    plan = plan_for(Pins(tp=1, pp=1, zero=2), gpus=8, global_batch=8, target=fmt, method="lora", compile=True,
                    attention="eager")
    result = export_plan(plan, fmt)
    said = " ".join(result.notes) + result.text
    assert "lora" in said and "eager" in said
    assert "compile" in said or "INDUCTOR" in result.text


FIVE = [  # the plan-contract issue's acceptance requests
    dict(model="llama3-70b", gpu="h100-sxm-80gb", gpus=64, seq_len=4096, global_batch=512),
    dict(model="mixtral-8x7b", gpu="h100-sxm-80gb", gpus=16, seq_len=4096, global_batch=256),
    dict(model="llama3-8b", gpu="a100-80gb", gpus=1, seq_len=4096, global_batch=16),
    dict(model="llama2-70b", gpu="rtx-a6000-48gb", gpus=1, seq_len=512, global_batch=4, method="qlora"),
    dict(model="llama3-8b", gpu="rtx4090-24gb", gpus=1, seq_len=2048, global_batch=8, method="lora"),
]


def _load_with_the_tool(fmt: str, text: str, plan, tmp_path) -> None:
    if fmt == "deepspeed":
        config = json.loads(text)
        # deepspeed/runtime/config.py DeepSpeedConfig._batch_assertion (v0.19.8):
        # train_batch_size == train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size / mp
        world = plan.num_devices // (plan.config.tp * plan.config.pp)
        assert config["train_batch_size"] == (config["train_micro_batch_size_per_gpu"]
                                              * config["gradient_accumulation_steps"] * world)
        assert set(config) <= DEEPSPEED_TOP
    elif fmt == "accelerate":
        path = tmp_path / "accelerate.yaml"
        path.write_text(text)
        config_args = pytest.importorskip("accelerate.commands.config.config_args")
        cluster = config_args.ClusterConfig.from_yaml_file(str(path))
        assert cluster.num_processes == plan.num_devices
    else:
        compile(text, "job.py", "exec")


@pytest.mark.parametrize("fmt", ["deepspeed", "accelerate", "torchtitan"])
@pytest.mark.parametrize("fields", FIVE, ids=[f["model"] + "-" + f.get("method", "full") for f in FIVE])
def test_the_five_export_for_each_engine_or_exit_3_honestly(fields, fmt, tmp_path):
    from planner.errors import Infeasible

    request = Request(target=fmt, **fields)
    try:
        best = suggest(request, top=1)["candidates"][0]
    except Infeasible as exc:  # nothing that engine runs fits (torchtitan has no Mixtral, no LoRA)
        assert "not runnable by" in str(exc) or "out of memory" in str(exc)
        return
    plan = make_plan(request, best)
    _load_with_the_tool(fmt, export_plan(plan, fmt).text, plan, tmp_path)
