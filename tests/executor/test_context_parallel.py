"""Context parallelism in the executor: torch 2.13's context_parallel refuses CPU attention (so the
executor refuses cp on CPU, naming the op); with torch's ring attention given the CPU flash kernel
(tests/executor/cp_cpu_shim, slow) and on two or more GPUs, cp trains the single-process model."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from executor import checks
from planner.capabilities import CP_CPU_REFUSAL
from planner.plan import load_plan
from tests.executor.conftest import losses, make_plan, train

CPU_OP = "aten._scaled_dot_product_flash_attention_for_cpu"


def _ring_attention_on_cpu(rank: int, world: int, port: int, errors) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
        q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        errors.put((rank, None))
    except Exception as exc:  # noqa: BLE001 - the refusal is what is measured
        errors.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def test_torch_context_parallel_has_no_cpu_attention():
    """What the capability table's CPU rule says, checked against torch itself (gloo, 2 processes):
    when a torch release adds a CPU ring-attention handler this fails, and the rule should go."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    errors = context.Queue()
    mp.start_processes(_ring_attention_on_cpu, args=(2, port, errors), nprocs=2, join=True, start_method="spawn")
    found = dict(errors.get(timeout=60) for _ in range(2))
    assert all(error and "NotImplementedError" in error and CPU_OP in error for error in found.values()), found
    assert CPU_OP.split(".", 1)[1] in CP_CPU_REFUSAL


def test_cpu_plan_with_cp_is_refused_before_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("EXECUTOR_TEST_CPU_RING", raising=False)
    plan = make_plan(tmp_path / "p.json", 2, {"precision": "bf16"}, dp=1, cp=2, micro_batch_size=1)
    loaded = load_plan(str(plan))
    spec, w, c = loaded.model, loaded.workload, loaded.config
    assert CPU_OP.split(".", 1)[1] in checks.unsupported_reason(spec, w, c, on_cuda=False)
    assert checks.unsupported_reason(spec, w, c, on_cuda=True) is None
    proc = train(plan, tmp_path / "run", 2, check=False)
    assert proc.returncode == 2 and "--cp 1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _gpu_plan(path, gpus: int, **config):
    """llama-tiny planned for H100s (the executor checks the visible GPUs against the plan's)."""
    from planner import api
    from planner.plan import ParallelConfig, save_plan
    from tests.executor.conftest import GLOBAL_BATCH, SEQ_LEN

    request = api.Request(model="llama-tiny", gpu="h100-sxm-80gb", gpus=gpus, gpus_per_node=gpus, seq_len=SEQ_LEN,
                          global_batch=GLOBAL_BATCH, precision="bf16")
    dp, mbs = config.pop("dp"), config.pop("micro_batch_size")
    parallel = ParallelConfig(dp=dp, tp=1, pp=1, micro_batch_size=mbs, num_micro_batches=GLOBAL_BATCH // (dp * mbs),
                              **config)
    save_plan(str(path), api.make_plan(request, api.predict(request, parallel)))
    return path


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism needs 2 CUDA devices (no CPU ring attention)")
@pytest.mark.parametrize("config", [{"dp": 1, "cp": 2, "zero": 0}, {"dp": 1, "cp": 2, "zero": 3}])
def test_cp2_on_gpus_matches_one_process(tmp_path, config):
    """cp = 2 (DDP, FSDP2 over dp x cp) against one process, same data and seed (bf16: 2e-2)."""
    def run(name: str, gpus: int, **parallel) -> dict[int, float]:
        train(_gpu_plan(tmp_path / f"{name}.json", gpus, **parallel), tmp_path / name, 20, "--no-save")
        return losses(tmp_path / name)

    reference = run("one", 1, dp=1, micro_batch_size=4)
    got = run("cp2", 2, micro_batch_size=4, **config)
    assert got[20] < got[1] - 1.0
    assert abs(got[20] - reference[20]) < 2e-2, (got[20], reference[20])


SHIM = __import__("pathlib").Path(__file__).parent / "cp_cpu_shim"


@pytest.mark.slow  # minutes: torchrun with 2 and 4 processes, 20 steps each
@pytest.mark.parametrize("config", [{"dp": 1, "cp": 2, "zero": 0}, {"dp": 2, "cp": 2, "zero": 3}],
                         ids=["cp2-ddp", "dp2xcp2-fsdp2"])
def test_cp_path_matches_one_process_with_the_ring_on_cpu_kernels(tmp_path, config, single_process_losses,
                                                                   monkeypatch):
    """The executor's cp path end to end on CPU (gloo): torch's own ring attention with the CPU flash
    kernel per block (tests/executor/cp_cpu_shim: the one thing torch lacks on CPU), the sequence
    split with shifted labels and positions, gradients averaged over dp x cp; the loss is the
    single process's (fp32: 1e-2, the parallel-mode tolerance)."""
    monkeypatch.setenv("EXECUTOR_TEST_CPU_RING", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]))
    processes = config["dp"] * config["cp"]
    plan = make_plan(tmp_path / "plan.json", processes, micro_batch_size=4 // config["dp"], **config)
    train(plan, tmp_path / "run", 20, "--no-save")
    got = losses(tmp_path / "run")
    assert got[20] < got[1] - 1.0
    assert abs(got[20] - single_process_losses[20]) < 1e-2, (got[20], single_process_losses[20])
