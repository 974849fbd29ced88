"""Test-only: lets torch's context_parallel run its ring attention on CPU, so that the executor's cp
path (executor/context_parallel.py, the dp x cp mesh, the loss normalisation) can be checked with gloo.

torch 2.13's ring attention (_templated_ring_attention and its backward) is used as it is; only the
per-block kernel is the CPU flash kernel (aten._scaled_dot_product_flash_attention_for_cpu), for
which torch registers neither a context-parallel handler nor a sharding rule: both are added here,
copied from torch's flash-attention ones. The capability table's CPU refusal is lifted in these
processes only. Imported at interpreter start (PYTHONPATH) by the test's training processes."""

import os

if os.environ.get("EXECUTOR_TEST_CPU_RING") == "1":
    import torch
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._op_schema import OpStrategy
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
    from torch.distributed.tensor.experimental._context_parallel import _attention

    import planner.capabilities as capabilities

    aten = torch.ops.aten
    FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
    BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    def _strategy(outputs: int, first_input: int):
        def strategy(op_schema) -> OpStrategy:
            tensors = sum(isinstance(a, OpStrategy) for a in op_schema.args_schema)
            placements = [Shard(2)] * (outputs + tensors)
            return expand_to_full_mesh_op_strategy(op_schema.get_mesh_from_args(validate=False), op_schema,
                                                   [placements], input_index=first_input)
        return strategy

    register_op_strategy(FORWARD)(_strategy(2, 2))
    register_op_strategy(BACKWARD)(_strategy(3, 3))

    def _forward(mesh, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        return _attention._templated_ring_attention(mesh.get_group(), 2, FORWARD, query=query, key=key, value=value,
                                                    is_causal=is_causal, dropout_p=dropout_p, scale=scale)

    def _backward(mesh, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                  scale=None):
        return _attention._templated_ring_attention_backward(
            mesh.get_group(), 2, BACKWARD, grad_out=grad_out, grad_out_name="grad_out", query=query, key=key,
            value=value, out=out, logsumexp=logsumexp, is_causal=is_causal, dropout_p=dropout_p, scale=scale)

    def _handler(op_call, args, kwargs):  # torch's _sdpa_handler with the CPU kernels
        info = DTensor._op_dispatcher.unwrap_to_op_info(op_call, args, kwargs)
        DTensor._op_dispatcher.sharding_propagator.propagate(info)
        run = _forward if op_call is FORWARD else _backward
        local = run(info.compute_mesh, *info.local_args, **info.local_kwargs)
        return DTensor._op_dispatcher.wrap(local, info.output_sharding.output_spec)

    _attention.custom_ops.update({FORWARD: _handler, BACKWARD: _handler})
    original_rules = capabilities._device_rules
    capabilities._device_rules = lambda target, on_gpu: tuple(
        r for r in original_rules(target, on_gpu) if r.reason != capabilities.CP_CPU_REFUSAL)
