"""Options shared by several commands (INTERFACE.md: common options, explicit configuration)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from planner.specs import ATTENTION_IMPLS

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # also over 4300 digits: the echo is cut to stay one readable line
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text[:40]!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text[:40]!r}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text[:40]!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text[:40]!r}")
    return value


def lora_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise argparse.ArgumentTypeError(f"takes a comma list of {','.join(LORA_TARGETS)}; got {text!r}")
    return targets


def add_model_hardware(parser: argparse.ArgumentParser, need_model: bool = True) -> None:
    parser.add_argument("--model", required=need_model,
                        help="catalog name (see `planner models`), a config.json, or a folder holding one")
    parser.add_argument("--gpu", help="hardware preset (see `planner hardware`) or a hardware JSON (default h100-sxm-80gb)")
    parser.add_argument("--gpus", type=positive_int, help="total number of devices (default: one node)")
    parser.add_argument("--gpus-per-node", type=positive_int, help="devices per node (default from the preset)")
    parser.add_argument("--flavor", help="a MoAI flavor such as 8xLarge.4096GB (sets --gpu and --gpus)")


def add_workload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=positive_int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--global-batch", type=positive_int, help="sequences per optimizer step (default: one per device)")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), default="full")
    parser.add_argument("--lora-rank", type=positive_int, default=16)
    parser.add_argument("--lora-targets", type=lora_targets, default=LORA_TARGETS,
                        help="comma list of q,k,v,o,gate,up,down (default all)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp8", "fp32"), default="bf16")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw")
    parser.add_argument("--optimizer-impl", choices=("foreach", "fused", "forloop"), default="foreach",
                        help="PyTorch AdamW implementation (default foreach, the GPU default)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLS, default="sdpa",
                        help="sdpa (flash / memory-efficient kernels, default), eager (transformers' materialised "
                             "scores) or fused-softmax (Megatron-LM's before FlashAttention)")
    parser.add_argument("--master-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 master weights and AdamW moments (default), or bf16 for all (torchtune's default)")
    parser.add_argument("--loss-chunks", type=positive_int, default=1,
                        help="cross-entropy in this many chunks (torchtune's chunked loss uses 8)")
    parser.add_argument("--activation-offload", action="store_true", help="keep saved activations in host memory")
    parser.add_argument("--optimizer-in-backward", action="store_true",
                        help="step each parameter as soon as its gradient is ready (needs one micro-batch)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (fused elementwise ops and loss)")
    parser.add_argument("--loss-parallel", action="store_true",
                        help="cross-entropy on TP vocabulary shards (torch's loss_parallel, as torchtitan; Megatron's "
                             "in-place one holds less); the executor gathers logits")
    parser.add_argument("--fp32-logits", action="store_true",
                        help="the model returns fp32 logits (torchtune without chunked loss); default: the loss upcasts")
    parser.add_argument("--calibration", help="a calibration profile JSON instead of the shipped default")
    parser.add_argument("--memory-margin", type=float, metavar="FRACTION",
                        help="headroom to keep free (default: from the profile's cross-validated memory errors)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout, nothing else")


def add_config(parser: argparse.ArgumentParser, required: bool) -> None:
    """Explicit configuration; for `suggest` every option pins that dimension."""
    parser.add_argument("--dp", type=positive_int, required=False)
    parser.add_argument("--tp", type=positive_int, required=False)
    parser.add_argument("--pp", type=positive_int, required=False)
    parser.add_argument("--micro-batch-size", type=positive_int)
    parser.add_argument("--recompute", choices=("none", "selective", "full"))
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    parser.add_argument("--offload", choices=("none", "optimizer", "params"))
    parser.add_argument("--sequence-parallel", action="store_true", default=None)
    parser.add_argument("--vpp", type=positive_int)
    parser.add_argument("--shard-ends", action="store_true", default=None,
                        help="zero 3: the embedding and the LM head as FSDP units of their own (less memory)")


def request_from(args: argparse.Namespace):
    from planner.api import Request

    return Request(model=args.model, gpu=args.gpu, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                   flavor=args.flavor, **workload_options(args))


def workload_options(args: argparse.Namespace) -> dict:
    """The Request fields add_workload parses (everything but the model and the hardware)."""
    return dict(seq_len=args.seq_len, global_batch=args.global_batch, method=args.method,
                lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets), precision=args.precision,
                optimizer=args.optimizer, optimizer_impl=args.optimizer_impl, attention=args.attention,
                master_dtype=args.master_dtype, loss_chunks=args.loss_chunks,
                activation_offload=args.activation_offload, optimizer_in_backward=args.optimizer_in_backward,
                compile=args.compile, loss_parallel=args.loss_parallel,
                fp32_logits=args.fp32_logits, calibration=args.calibration,
                memory_margin=args.memory_margin)


def pins_from(args: argparse.Namespace):
    from planner.search import Pins

    return Pins(dp=args.dp, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                recompute=args.recompute, zero=args.zero, offload=args.offload,
                sequence_parallel=args.sequence_parallel, vpp=args.vpp, shard_ends=args.shard_ends)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
