"""The cross-entropy's memory (planner.cost.memory.loss_bytes_per_token) against torch's own ops.

The eager loss on a model's fp32 logits (torchtune without chunked output) is run forward and
backward under a dispatch mode that counts the bytes of every live tensor. For
vocabulary-sharded logits, torch.distributed.tensor.parallel.loss replaces aten._log_softmax and nll_loss_backward on
vocabulary-sharded logits by decompositions on the local shard (loss.py `_log_softmax` and
`_nll_loss_and_log_softmax_backward`). Those are run here, on a fake process group of two ranks,
under the same mode, and their peaks are compared with loss_bytes_per_token(vocab_parallel=True).
"""

import weakref

import pytest

torch = pytest.importorskip("torch")

from planner.cost.loss import loss_bytes_per_token  # noqa: E402

TOKENS, LOCAL_VOCAB, BF16 = 256, 1000, 2


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages alive at once, counting `held` tensors and every op's outputs."""

    def __init__(self, *held):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.peak_bytes = 0
        for tensor in held:
            self._add(tensor)
        self._update()

    def _add(self, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return
        entry = self.live.setdefault(storage._cdata, [storage.nbytes(), 0])
        entry[1] += 1
        weakref.finalize(tensor, self._drop, storage._cdata)

    def _drop(self, key: int) -> None:
        self.live[key][1] -= 1
        if self.live[key][1] == 0:
            del self.live[key]

    def _update(self) -> None:
        self.peak_bytes = max(self.peak_bytes, sum(size for size, _ in self.live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        self._update()
        return out


@pytest.fixture(scope="module")
def mesh():
    from calibration.fake_model import fake_world

    fake_world(2)
    return torch.distributed.device_mesh.init_device_mesh("cpu", (2,))


def per_entry(peak_bytes: int) -> float:
    return peak_bytes / (TOKENS * LOCAL_VOCAB)


def test_forward_holds_the_fp32_copy_shifted_and_exp_beside_the_logits(mesh):
    from torch.distributed.tensor.parallel import loss

    logits = torch.randn(TOKENS, LOCAL_VOCAB, dtype=torch.bfloat16)
    with LiveBytes(logits) as tracker:
        upcast = logits.float()  # torchtitan's cross_entropy(pred.flatten(0, 1).float(), ...)
        loss._log_softmax(upcast, 1, False, mesh, 0)
    predicted = loss_bytes_per_token(BF16, 1, phase="forward", vocab_parallel=True)
    assert per_entry(tracker.peak_bytes) == pytest.approx(predicted, rel=0.01)
    assert predicted > loss_bytes_per_token(BF16, 1, phase="forward")  # the fused kernel holds less


def test_backward_holds_zeros_exp_sum_and_product_beside_the_saved_output(mesh):
    from torch.distributed.tensor.parallel import loss

    saved = torch.randn(TOKENS, LOCAL_VOCAB).log_softmax(1)
    targets = torch.randint(0, 2 * LOCAL_VOCAB, (TOKENS,))
    with LiveBytes(saved) as tracker:
        loss._nll_loss_and_log_softmax_backward(
            torch.tensor(1.0), saved, targets, None, 1, -100, torch.tensor(float(TOKENS)),
            torch.Size([TOKENS, 2 * LOCAL_VOCAB]), 1, mesh, 0)
    predicted = loss_bytes_per_token(BF16, 1, phase="backward", vocab_parallel=True)
    assert per_entry(tracker.peak_bytes) == pytest.approx(predicted, rel=0.01)
    assert predicted > loss_bytes_per_token(BF16, 1, phase="backward")


def test_fp32_logits_from_the_model_need_no_upcast_copy():
    hidden = torch.randn(TOKENS, LOCAL_VOCAB, requires_grad=True)
    targets = torch.randint(0, LOCAL_VOCAB, (TOKENS,))
    with LiveBytes() as tracker:
        logits = hidden * 1.0  # the model's fp32 output (torchtune: self.output(h).float())
        loss = torch.nn.functional.cross_entropy(logits, targets)
        del logits  # torchtune's recipes free the logits before backward
        forward_peak, tracker.peak_bytes = tracker.peak_bytes, 0
        loss.backward()
    assert per_entry(forward_peak) == pytest.approx(
        loss_bytes_per_token(BF16, 1, phase="forward", fp32_logits=True), rel=0.01)
    assert per_entry(tracker.peak_bytes) == pytest.approx(
        loss_bytes_per_token(BF16, 1, phase="backward", fp32_logits=True), rel=0.01)
    assert loss_bytes_per_token(BF16, 1, phase="forward", fp32_logits=True) < loss_bytes_per_token(
        BF16, 1, phase="forward")  # no bf16 logits beside their fp32 copy
