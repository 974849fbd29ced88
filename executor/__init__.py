"""The training backend: trains with a Plan exactly as it says, and records what happened.

`planner train --plan plan.json ...` (executor/commands/train.py) calls executor.launch, which starts
torchrun; each process runs `python -m executor.train` (executor/worker.py). Layout (torchtitan-style, one concept per module):
  launch.py      torchrun command line, fallback to runner-ups after an OOM
  checks.py      the Plan against what the executor implements and the world it finds
  mesh.py        DeviceMesh [pp][dp][tp] (Megatron's order: TP innermost)
  model.py       transformers model from the Plan's config.json or a local checkpoint; LoRA/QLoRA
  parallelize.py TP (+SP) -> activation checkpointing -> compile -> DDP / FSDP2, in that order
  pipeline.py    hand-split pipeline stages and their 1F1B / interleaved schedule
  data.py, tokenizer.py   Alpaca / ShareGPT rows -> packed sequences, loss on responses only
  optim.py       AdamW (foreach / fused / for-loop), SGD, 8-bit AdamW, ZeRO-1, optimizer-in-backward
  checkpoint.py  atomic sharded checkpoints (torch.distributed.checkpoint), resume, final safetensors
  measure.py     metrics.jsonl, memory, the run record (summary.json)
  train.py       the training loop; worker.py the per-process entry point

This package imports torch; planner/ never imports it (the Plan is the only thing they share).
"""
