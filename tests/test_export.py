"""Exports: each output loads with its format's own parser (json, yaml, tomllib, torchrun's and
accelerate's argparse) and names the plan's degrees; the keys are the engines' real ones."""

import json
import shlex
import shutil
import subprocess
import tomllib

import pytest
import yaml

from planner.api import Request, make_plan, suggest
from planner.errors import InvalidRequest
from planner.export import FORMATS, LaunchOptions, export_plan
from planner.plan import save_plan
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

# torchtitan job config keys: torchtitan v0.2.2 torchtitan/config/job_config.py (dataclasses Job, Model,
# Optimizer, Training, Parallelism, ActivationCheckpoint), https://github.com/pytorch/torchtitan/blob/v0.2.2/
TORCHTITAN = {
    "job": {"config_file", "dump_folder", "description", "print_config"},
    "model": {"name", "flavor", "hf_assets_path", "converters"},
    "optimizer": {"name", "lr", "beta1", "beta2", "eps", "weight_decay", "implementation"},
    "training": {"dataset", "local_batch_size", "global_batch_size", "seq_len", "max_norm", "steps",
                 "enable_cpu_offload", "dtype", "mixed_precision_param", "mixed_precision_reduce"},
    "parallelism": {"data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "tensor_parallel_degree", "pipeline_parallel_degree", "pipeline_parallel_schedule",
                    "pipeline_parallel_microbatch_size", "pipeline_parallel_layers_per_stage",
                    "context_parallel_degree", "expert_parallel_degree"},
    "activation_checkpoint": {"mode", "selective_ac_option"},
}


def plan_for(pins: Pins, model="llama3-8b", gpus=16, global_batch=64, **workload) -> dict:
    request = Request(model=model, gpu="h100-sxm-80gb", gpus=gpus, seq_len=4096, global_batch=global_batch, **workload)
    best = suggest(request, pins, top=1)["candidates"][0]
    return make_plan(request, best)


@pytest.fixture(scope="module")
def tp_plan():
    return plan_for(Pins(tp=2, pp=1, zero=3, offload="none", recompute="full"))


@pytest.fixture(scope="module")
def pp_plan():
    return plan_for(Pins(tp=1, pp=2, zero=1, offload="none"))


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
    cluster = three_d_plan["cluster"]
    assert (args.nnodes, int(args.nproc_per_node)) == (str(cluster["num_nodes"]), cluster["devices_per_node"])
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint.endswith(":29500") and "MASTER_ADDR" in args.rdzv_endpoint
    assert args.module and args.training_script == "executor.train"
    assert args.training_script_args == ["--plan", "p.json", "--data", "$DATA", "--output", "runs/llm-planner",
                                         "--steps", "50"]
    assert "dp 4, tp 2, pp 2" in text  # the comment names the plan's degrees


def test_deepspeed_json_batch_arithmetic_and_keys(tp_plan):
    config = json.loads(export_plan(tp_plan, "deepspeed").text)
    cfg, workload = tp_plan["config"], tp_plan["workload"]
    assert set(config) <= DEEPSPEED_TOP and set(config["zero_optimization"]) <= DEEPSPEED_ZERO
    assert config["train_micro_batch_size_per_gpu"] == cfg["micro_batch_size"]
    assert config["gradient_accumulation_steps"] == cfg["num_micro_batches"]
    # DeepSpeed's own check: train_batch_size = micro x accumulation x data-parallel world size
    assert config["train_batch_size"] == cfg["micro_batch_size"] * cfg["num_micro_batches"] * cfg["dp"] == workload["global_batch"]
    assert config["zero_optimization"]["stage"] == cfg["zero"] == 3
    assert config["tensor_parallel"] == {"autotp_size": 2}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}


def test_deepspeed_offload_sections():
    plan = plan_for(Pins(tp=1, pp=1, zero=3, offload="params"), gpus=8, global_batch=8)
    zero = json.loads(export_plan(plan, "deepspeed").text)["zero_optimization"]
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    assert set(zero["offload_param"]) <= DEEPSPEED_OFFLOAD
    plan = plan_for(Pins(tp=1, pp=1, zero=2, offload="optimizer"), gpus=8, global_batch=8)
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
    assert p["parallelism_config_tp_size"] == tp_plan["config"]["tp"] == 2
    assert p["parallelism_config_dp_shard_size"] * p["parallelism_config_dp_replicate_size"] == tp_plan["config"]["dp"]
    assert doc["fsdp_config"]["fsdp_reshard_after_forward"] is True  # zero 3
    assert doc["fsdp_config"]["fsdp_activation_checkpointing"] is True  # recompute full
    assert doc["mixed_precision"] == "bf16"


def test_accelerate_ddp_when_nothing_is_sharded():
    plan = plan_for(Pins(tp=1, pp=1, zero=0, offload="none"), model="llama-tiny", gpus=2, global_batch=8)
    doc = yaml.safe_load(export_plan(plan, "accelerate").text)
    assert doc["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in doc and doc["num_processes"] == 2


def test_torchtitan_toml_keys_and_degrees(three_d_plan):
    doc = tomllib.loads(export_plan(three_d_plan, "torchtitan", LaunchOptions(steps=7)).text)
    for section, keys in doc.items():
        assert set(keys) <= TORCHTITAN[section], (section, set(keys) - TORCHTITAN[section])
    par, cfg = doc["parallelism"], three_d_plan["config"]
    assert par["tensor_parallel_degree"] == 2 and par["pipeline_parallel_degree"] == 2
    assert par["data_parallel_shard_degree"] * par["data_parallel_replicate_degree"] == cfg["dp"]
    devices = (par["data_parallel_shard_degree"] * par["data_parallel_replicate_degree"]
               * par["tensor_parallel_degree"] * par["pipeline_parallel_degree"])
    assert devices == three_d_plan["cluster"]["num_devices"]
    assert par["pipeline_parallel_microbatch_size"] == cfg["micro_batch_size"]
    # with pipelining, torchtitan splits the local batch into local / microbatch micro-batches
    assert doc["training"]["local_batch_size"] // par["pipeline_parallel_microbatch_size"] == cfg["num_micro_batches"]
    assert doc["training"]["global_batch_size"] == three_d_plan["workload"]["global_batch"]
    assert doc["model"] == {"name": "llama3", "flavor": "8B"} and doc["training"]["steps"] == 7
    assert doc["activation_checkpoint"]["mode"] == cfg["recompute"]


def test_torchtitan_gradient_accumulation_without_pipeline(tp_plan):
    doc = tomllib.loads(export_plan(tp_plan, "torchtitan").text)
    cfg, training = tp_plan["config"], doc["training"]
    # torchtitan accumulates global / (local x dp) micro-batches when pp = 1
    assert training["global_batch_size"] // (training["local_batch_size"] * cfg["dp"]) == cfg["num_micro_batches"]


def test_slurm_script_is_valid_bash_and_launches_the_plan(three_d_plan):
    text = export_plan(three_d_plan, "slurm", LaunchOptions(steps=1000)).text
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n"], input=text, text=True).returncode == 0
    directives = dict((l.split(" ", 1)[1].lstrip("-").split("=", 1) + [""])[:2]
                      for l in text.splitlines() if l.startswith("#SBATCH"))
    assert int(directives["nodes"]) == three_d_plan["cluster"]["num_nodes"]
    assert int(directives["gpus-per-node"]) == three_d_plan["cluster"]["devices_per_node"]
    days, clock = directives["time"].split("-")
    hours, minutes, _ = map(int, clock.split(":"))
    predicted_s = three_d_plan["prediction"]["time"]["step_s"] * 1000
    assert (int(days) * 24 + hours) * 3600 + minutes * 60 >= predicted_s  # never below the prediction
    srun = [l for l in text.splitlines() if l.startswith("srun ")][0]
    args = torchrun_args(srun.removeprefix("srun "))
    assert args.nnodes == "$SLURM_NNODES" and args.training_script == "executor.train"


@pytest.mark.parametrize("fmt,words", [("accelerate", "pipeline"), ("torchtitan", "optimizer alone"),
                                       ("deepspeed", "pipeline engine")])
def test_refuses_what_the_engine_cannot_run(fmt, words):
    plan = plan_for(Pins(tp=2, pp=2, zero=3, offload="optimizer"))
    with pytest.raises(InvalidRequest, match=words):
        export_plan(plan, fmt)


def test_torchtitan_refuses_models_it_has_no_code_for():
    plan = plan_for(Pins(), model="llama-tiny", gpus=2, global_batch=8)
    with pytest.raises(InvalidRequest, match="torchtitan ships llama3"):
        export_plan(plan, "torchtitan")


def test_cli_writes_every_format(cli, tmp_path, tp_plan):
    path = tmp_path / "plan.json"
    save_plan(str(path), tp_plan)
    expected = {"torchrun": "--nnodes=2 --nproc-per-node=8", "deepspeed": '"autotp_size": 2',
                "accelerate": "parallelism_config_tp_size: 2", "torchtitan": "tensor_parallel_degree = 2",
                "slurm": "#SBATCH --nodes=2"}
    assert set(expected) == set(FORMATS)
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
