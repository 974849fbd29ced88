"""The training loop of one process: data position -> micro-batches -> forward/backward as the
Plan says -> optimizer step -> one logged loss (the only host sync) -> metrics, checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from executor import checkpoint
from executor.clip import clip_grad_norm_
from executor.context_parallel import sequence_split, shard_inputs
from executor.data import PackedData, load_examples
from executor.loss import items_per_rank
from executor.measure import CpuMemoryProbe, Recorder, cuda_peaks
from executor.mesh import Topology
from executor.model import compute_dtype
from executor.options import RunOptions, check_options
from executor.report import StepReport
from executor.schedule import build_schedulers
from executor.setup import Prepared
from executor.tokenizer import load_tokenizer
from planner.plan import ParallelConfig
from planner.specs import ModelSpec, Workload


class Trainer:
    def __init__(self, spec: ModelSpec, workload: Workload, config: ParallelConfig, topo: Topology,
                 device: torch.device, options: RunOptions, prepared: Prepared, recorder: Recorder) -> None:
        self.spec, self.workload, self.config, self.topo = spec, workload, config, topo
        self.device, self.options, self.p, self.recorder = device, options, prepared, recorder
        check_options(options, workload, config)
        self.data_ranks = config.dp * config.cp  # the ranks over which gradients are averaged
        if workload.optimizer_in_backward and options.max_grad_norm > 0 and topo.rank == 0:
            print("note: no gradient clipping: the optimizer steps inside backward, before the global norm is known")
        tokenizer = load_tokenizer(options.tokenizer, spec.vocab_size)
        examples, self.data_report = load_examples(options.data, tokenizer, options.max_bad_fraction,
                                                   options.chat_template)
        self.data = PackedData(examples, workload.seq_len, workload.global_batch, options.seed, tokenizer.pad_id)
        self.eval_data = self._eval_data(tokenizer)
        self.report = StepReport(options.output_dir, options.steps, topo.rank == 0, options.progress,
                                 options.tensorboard)
        prepared.optimizers.schedulers = build_schedulers(prepared.optimizers.all, options.steps, options.warmup,
                                                          options.lr_schedule, options.min_lr_ratio)
        self.probe = CpuMemoryProbe([prepared.forward_module], prepared.optimizers.all)

    def _eval_data(self, tokenizer) -> PackedData | None:
        if not self.options.eval_every:
            return None
        examples, _ = load_examples(self.options.eval_data, tokenizer, self.options.max_bad_fraction,
                                    self.options.chat_template)
        return PackedData(examples, self.workload.seq_len, self.workload.global_batch, self.options.seed,
                          tokenizer.pad_id)

    # -- one step --------------------------------------------------------------------------------

    def _local(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This data-parallel rank's rows of the global batch: [micro-batches x micro-batch, S]."""
        rows = self.config.micro_batch_size * self.config.num_micro_batches
        start = self.topo.dp_rank * rows
        return tuple(t[start:start + rows].to(self.device, non_blocking=True) for t in tensors)

    def _positions(self, data: PackedData, step: int) -> torch.Tensor | None:
        """This rank's position ids (restarting per document) with --document-mask, else None."""
        return self._local(data.position_ids(step))[0] if self.options.document_mask else None

    def _inputs(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None, m: int) -> dict:
        """The model's keyword arguments for micro-batch m."""
        rows = slice(m * self.config.micro_batch_size, (m + 1) * self.config.micro_batch_size)
        inputs = {"input_ids": ids[rows], "labels": labels[rows]}
        if positions is not None:  # transformers then keeps attention inside each packed document
            inputs["position_ids"] = positions[rows]
        return inputs

    def _split(self, inputs: dict) -> contextlib.AbstractContextManager[dict]:
        """The micro-batch as this rank runs it: whole, or (cp > 1) its share of each sequence with
        SDPA as the ring attention, for the forward and the backward (executor/context_parallel.py)."""
        if self.config.cp == 1:
            return contextlib.nullcontext(inputs)
        return sequence_split(self.topo.cp_mesh, shard_inputs(inputs))

    def _forward_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        w = self.workload
        # autocast over fp32 weights for DDP / ZeRO-1 and LoRA; FSDP2 casts by its policy instead
        if w.precision != "fp32" and (w.master_dtype == "fp32" and (self.config.zero <= 1 or w.method != "full")):
            stack.enter_context(torch.autocast(self.device.type, dtype=compute_dtype(w)))
        if w.activation_offload:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda"))
        return stack

    def _micro_batches(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
                       items: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        model = self.p.forward_module
        for m in range(self.config.num_micro_batches):
            last = m == self.config.num_micro_batches - 1
            sync = contextlib.nullcontext() if (last or not self.p.uses_ddp) else model.no_sync()
            with sync, self._split(self._inputs(ids, labels, positions, m)) as inputs:
                with self._forward_context():
                    loss = model(**inputs, num_items_in_batch=items).loss
                loss.backward()
            total += loss.detach().float()
        return total

    def _pipeline(self, ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
                  items: torch.Tensor) -> torch.Tensor:
        self.p.loss_holder["items"] = items
        losses: list[torch.Tensor] = []
        if positions is None:  # one document per row: positions count from 0 (executor/pipeline.py)
            positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids).contiguous()
        args = (ids, positions) if self.p.has_first_stage else ()
        kwargs = {"target": labels, "losses": losses} if self.p.has_last_stage else {}
        with self._forward_context():
            self.p.schedule.step(*args, **kwargs)
        return torch.stack([l.detach().float() for l in losses]).sum() if losses else torch.zeros((), device=self.device)

    def _clip(self) -> torch.Tensor | None:
        """The global gradient norm before clipping; None when the optimizer ran inside backward
        (the gradients are gone: nothing to measure or clip, as torchtune refuses it)."""
        if self.workload.optimizer_in_backward:
            return None
        pp_group = self.topo.pp_group if self.config.pp > 1 else None
        if self.p.experts is not None:  # DDP left the experts' gradients out (executor/expert_parallel.py)
            self.p.experts.reduce_gradients()
        return clip_grad_norm_(self.p.optimizers.params, self.options.max_grad_norm, self.device, pp_group)

    def train_step(self, step: int) -> tuple[float, float | None]:
        """One optimizer step on the global batch of `step`: (the global token-mean loss, the
        gradient norm before clipping)."""
        if step == 1 and _inject_oom(self.config):
            raise torch.OutOfMemoryError("injected by EXECUTOR_INJECT_OOM")
        ids, labels = self.data.batch(step)
        items = items_per_rank(labels, self.data_ranks, self.device)
        local_ids, local_labels = self._local(ids, labels)
        run = self._pipeline if self.config.pp > 1 else self._micro_batches
        local = run(local_ids, local_labels, self._positions(self.data, step), items)
        norm = self._clip()
        self.p.optimizers.step()
        contribution = local if self.topo.logs_loss else torch.zeros_like(local)
        # one all-reduce and one host sync for both: every rank holds the norm, rank 0 adds it
        own_norm = norm if norm is not None and self.topo.rank == 0 else torch.zeros_like(local)
        values = torch.stack([contribution, own_norm])
        dist.all_reduce(values)
        loss_sum, norm_value = values.tolist()
        return loss_sum / self.data_ranks, (norm_value if norm is not None else None)

    @torch.no_grad()
    def evaluate(self, batches: int = 2) -> float:
        model, total = self.p.forward_module, 0.0
        model.eval()
        for step in range(batches):
            ids, labels = self.eval_data.batch(step)
            items = items_per_rank(labels, self.data_ranks, self.device)
            local_ids, local_labels = self._local(ids, labels)
            positions = self._positions(self.eval_data, step)
            local = torch.zeros((), device=self.device)
            for m in range(self.config.num_micro_batches):
                with self._split(self._inputs(local_ids, local_labels, positions, m)) as inputs, \
                        self._forward_context():
                    local += model(**inputs, num_items_in_batch=items).loss.float()
            contribution = local if self.topo.logs_loss else torch.zeros_like(local)
            dist.all_reduce(contribution)
            total += contribution.item() / self.data_ranks
        model.train()
        return total / batches

    # -- the run ---------------------------------------------------------------------------------

    def resume_step(self, plan_config: dict) -> int:
        output = self.options.output_dir
        step = checkpoint.load_newest(output, self.p.state_module, self.p.optimizers,
                                      self._checkpoint_meta(plan_config)) if self.options.resume else None
        if step is None:
            self.report.metrics.reset()
            return 0
        self.report.metrics.truncate_after(step)
        return step

    def _checkpoint_meta(self, plan_config: dict) -> dict:
        return {"config": plan_config, "seed": self.options.seed, "data": str(Path(self.options.data).resolve())}

    def run(self, plan_config: dict) -> None:
        start = self.resume_step(plan_config)
        self.report.start(start)
        for step in range(start, self.options.steps):
            lr = self.p.optimizers.lr
            started = time.perf_counter()
            if self._probe_memory(step, start):
                (loss, norm), allocated = self._tracked_step(step)
            else:
                (loss, norm), allocated = self.train_step(step), None
            seconds = time.perf_counter() - started
            self._record(step + 1, {"loss": loss, "grad_norm": norm, "lr": lr}, seconds, allocated)
            if self.options.checkpoint_every and (step + 1) % self.options.checkpoint_every == 0 \
                    and step + 1 < self.options.steps:
                checkpoint.save(self.options.output_dir, step + 1, self.p.state_module, self.p.optimizers,
                                self._checkpoint_meta(plan_config))
        self.report.close()

    def _tracked_step(self, step: int) -> tuple[tuple[float, float | None], int | None]:
        """A training step under MemTracker: ((loss, gradient norm), tensor bytes at the peak)."""
        box: dict = {}
        allocated = self.probe.track(lambda: box.setdefault("loss", self.train_step(step)))
        if "loss" not in box:  # the tracker failed before the step finished: run it untracked, track no more
            for optimizer in self.p.optimizers.all:
                optimizer.zero_grad(set_to_none=True)
            self.options = replace(self.options, memory_every=0)
            box["loss"] = self.train_step(step)
        return box["loss"], allocated

    def _probe_memory(self, step: int, start: int) -> bool:
        # on GPUs the allocator counts; a pipeline interleaves micro-batches, which MemTracker cannot follow
        if self.device.type == "cuda" or self.options.memory_every <= 0 or self.config.pp > 1:
            return False
        first = min(start + 2, self.options.steps - 1)
        return step == first or (step > first and (step - first) % self.options.memory_every == 0)

    def _record(self, step: int, values: dict, seconds: float, cpu_allocated: int | None) -> None:
        allocated, reserved = cuda_peaks(self.device)
        if cpu_allocated is not None:
            allocated = self._max_over_ranks(cpu_allocated)
        self.recorder.add(step, values["loss"], seconds)
        self.recorder.note_memory(allocated, reserved)
        record = {"step": step, **values, "tokens_per_s": self.workload.tokens_per_step / seconds, "step_s": seconds,
                  "peak_memory_bytes": self.recorder.peak_allocated_bytes,
                  "peak_reserved_bytes": self.recorder.peak_reserved_bytes}
        if self.eval_data is not None and step % self.options.eval_every == 0:
            record["eval_loss"] = self.evaluate(self.options.eval_batches)
        self.report.write(record)

    def _max_over_ranks(self, value: int) -> int:
        """The most loaded device decides (as the planner's peak does)."""
        tensor = torch.tensor(value, dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())


def _inject_oom(config: ParallelConfig) -> bool:
    """Fault injection for the OOM-and-fallback test: EXECUTOR_INJECT_OOM='{"zero": 1}' makes the
    second step of any plan whose config has those values fail as an out-of-memory error would."""
    wanted = os.environ.get("EXECUTOR_INJECT_OOM")
    if not wanted:
        return False
    return all(getattr(config, key) == value for key, value in json.loads(wanted).items())


if __name__ == "__main__":  # `python -m executor.train`: one training process, as torchrun and `planner export` start it
    from executor.worker import main

    sys.exit(main(Trainer))
