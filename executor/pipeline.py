"""Pipeline parallelism with torch.distributed.pipelining, split by hand (transformers models do
not trace: TORCH-NOTES.md). A stage holds a run of decoder layers, the first also the embedding,
the last also the final norm and LM head; it calls each layer as LlamaModel does.

Layers per stage are the Plan's (planner/layout.py stage_layers): stages 1..rest get one extra
layer, never the first. With vpp > 1 each rank holds vpp chunks of equal size, chunk c of rank r
being virtual stage c * pp + r (the "looped" order ScheduleInterleaved1F1B expects).

Parameter names stay those of the transformers model (model.layers.7.self_attn.q_proj.weight, ...)
because every stage's modules live at their original paths inside a per-rank container.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from executor.model import unwrap
from planner.layout import stage_layers


def layers_per_stage(num_layers: int, pp: int, vpp: int) -> list[list[int]]:
    """Layer indices of each virtual stage, in stage order: the Plan's layout (planner/layout.py
    stage_layers, the one definition; a Plan file whose written stages differ is refused on load)."""
    return stage_layers(num_layers, pp, vpp)


def stage_indices(pp_rank: int, pp: int, vpp: int) -> list[int]:
    return [chunk * pp + pp_rank for chunk in range(vpp)]


class StageModel(nn.Module):
    """One pipeline stage with the transformers model's attribute paths (model.*, lm_head)."""

    def __init__(self, causal_lm: nn.Module, layer_ids: list[int], first: bool, last: bool,
                 document_mask: bool = False) -> None:
        super().__init__()
        inner = causal_lm.model
        self.model = nn.Module()
        self.model.embed_tokens = inner.embed_tokens if first else None
        self.model.layers = nn.ModuleDict({str(i): inner.layers[i] for i in layer_ids})
        self.model.norm = inner.norm if last else None
        self.model.rotary_emb = inner.rotary_emb
        self.lm_head = causal_lm.lm_head if last else None
        self.eager = causal_lm.config._attn_implementation == "eager"
        self.document_mask = document_mask

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x: token ids (B, S) on the first stage, hidden states (B, S, H) elsewhere; positions (B, S)
        # restart at 0 per packed document and travel with the activations to the next stage
        hidden = self.model.embed_tokens(x) if self.model.embed_tokens is not None else x
        rotary = self.model.rotary_emb(hidden, position_ids=positions)
        mask = _attention_mask(positions, hidden, self.eager, self.document_mask)
        for layer in self.model.layers.values():
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        if self.lm_head is not None:
            return self.lm_head(self.model.norm(hidden))  # logits (B, S, V)
        return hidden, positions


def _attention_mask(positions: torch.Tensor, like: torch.Tensor, eager: bool,
                    document_mask: bool) -> torch.Tensor | None:
    """None (SDPA's causal kernel) without document masks; else the causal mask within each packed
    document (a new one wherever the positions do not count up by one, as transformers'
    masking_utils.find_packed_sequence_indices): boolean for SDPA, additive for eager attention."""
    if not eager and not document_mask:
        return None
    seq = positions.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=like.device).tril()[None, None]  # (1, 1, S, S)
    if document_mask:
        document = (torch.diff(positions, dim=-1, prepend=positions[:, :1] - 1) != 1).cumsum(-1)
        allowed = allowed & (document[:, :, None] == document[:, None, :])[:, None]  # (B, 1, S, S)
    if not eager:
        return allowed
    blocked = torch.full((), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return torch.where(allowed, torch.zeros((), dtype=like.dtype, device=like.device), blocked)


def build_stages(model: nn.Module, pp_rank: int, pp: int, vpp: int,
                 document_mask: bool = False) -> tuple[nn.Module, list[tuple[int, StageModel]]]:
    """(container with this rank's modules at their original paths, [(stage index, stage)])."""
    causal_lm = unwrap(model)
    plan = layers_per_stage(causal_lm.config.num_hidden_layers, pp, vpp)
    stages = []
    for index in stage_indices(pp_rank, pp, vpp):
        stages.append((index, StageModel(causal_lm, plan[index], first=index == 0, last=index == pp * vpp - 1,
                                         document_mask=document_mask)))
    container = nn.Module()
    container.model = nn.Module()
    container.model.layers = nn.ModuleDict({k: v for _, s in stages for k, v in s.model.layers.items()})
    for _, stage in stages:
        for name in ("embed_tokens", "norm"):
            if getattr(stage.model, name) is not None:
                setattr(container.model, name, getattr(stage.model, name))
        if stage.lm_head is not None:
            container.lm_head = stage.lm_head
    return container, stages


def build_schedule(stages: list[tuple[int, nn.Module]], num_stages: int, device: torch.device, pp_group,
                   n_microbatches: int, loss_fn: Callable) -> object:
    """Schedule1F1B for one stage per rank, ScheduleInterleaved1F1B for several. Gradients are not
    rescaled by the schedule: the loss is already normalised over the global batch (executor/loss.py)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    pipeline_stages = [PipelineStage(module, index, num_stages, device, group=pp_group) for index, module in stages]
    if len(pipeline_stages) == 1:
        return Schedule1F1B(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleaved1F1B(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
