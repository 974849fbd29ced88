"""Checkpoints in one process (a gloo world of one): everything saved loads with weights_only, a
planted pickle runs nothing, a damaged newest checkpoint gives way to the one before, a full disk
is one line. The end-to-end versions through `planner train` are in test_run_ownership.py."""

from __future__ import annotations

import errno
import os
import pickle
import socket

import pytest

torch = pytest.importorskip("torch")
dist = torch.distributed

from executor import checkpoint  # noqa: E402
from executor.optim import Optimizers  # noqa: E402
from planner.errors import InvalidRequest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trained(seed: int) -> tuple[torch.nn.Module, Optimizers]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, Optimizers(optimizer)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_saved_checkpoint_loads_with_weights_only_and_restores_everything(tmp_path):
    model, optimizers = _trained(0)
    torch.manual_seed(123)
    checkpoint.save(tmp_path, 4, model, optimizers, {"seed": 0})
    expected_draw = torch.rand(3)
    for name in (tmp_path / "checkpoints" / "step-00000004").iterdir():
        if name.suffix == ".pt":
            torch.load(name, weights_only=True)  # raises on any pickled object that is not allowed
    saved = _weights(model)

    other, other_optimizers = _trained(1)
    assert not torch.equal(_weights(other)[0], saved[0])
    assert checkpoint.load_newest(tmp_path, other, other_optimizers, {"seed": 0}) == 4
    assert all(torch.equal(a, b) for a, b in zip(_weights(other), saved))
    state = other_optimizers.main.state_dict()["state"]
    assert state and all(float(s["step"]) == 1 for s in state.values())
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the save left it


def test_checkpoint_of_another_plan_is_refused(tmp_path):
    model, optimizers = _trained(0)
    checkpoint.save(tmp_path, 2, model, optimizers, {"seed": 0})
    with pytest.raises(InvalidRequest, match="seed"):
        checkpoint.load_newest(tmp_path, model, optimizers, {"seed": 1})


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PLANTED",))


def test_planted_pickles_run_nothing(tmp_path, monkeypatch, capsys):
    """A rank file or DCP metadata replaced by a pickle that would run a command: the checkpoint
    is skipped with a warning for the previous one, and the command never runs."""
    monkeypatch.chdir(tmp_path)
    model, optimizers = _trained(0)
    checkpoint.save(tmp_path, 2, model, optimizers, {"seed": 0})
    checkpoint.save(tmp_path, 4, model, optimizers, {"seed": 0})
    newest = tmp_path / "checkpoints" / "step-00000004"
    for target in (newest / "rank-00000.pt", newest / ".metadata"):
        original = target.read_bytes()
        planted = pickle.dumps(_Planted())
        target.write_bytes(planted)
        _fix_manifest(newest, target.name, len(planted))
        assert checkpoint.load_newest(tmp_path, model, optimizers, {"seed": 0}) == 2
        assert not (tmp_path / "PLANTED").exists()
        assert "skipping checkpoint step-00000004" in capsys.readouterr().out
        target.write_bytes(original)
        _fix_manifest(newest, target.name, len(original))


def _fix_manifest(folder, name: str, size: int) -> None:
    import json

    marker = folder / "complete.json"
    meta = json.loads(marker.read_text())
    meta["files"][name] = size
    marker.write_text(json.dumps(meta))


def test_truncated_newest_is_skipped_and_all_damaged_is_refused(tmp_path, capsys):
    model, optimizers = _trained(0)
    for step in (2, 4):
        checkpoint.save(tmp_path, step, model, optimizers, {"seed": 0})
    shard = next((tmp_path / "checkpoints" / "step-00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert checkpoint.load_newest(tmp_path, model, optimizers, {"seed": 0}) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "step-00000004" in out[0] and "manifest" in out[0]
    (tmp_path / "checkpoints" / "step-00000002" / "complete.json").write_text("{not json")
    with pytest.raises(InvalidRequest, match="no checkpoint .* can be loaded"):
        checkpoint.load_newest(tmp_path, model, optimizers, {"seed": 0})


def test_full_disk_while_saving_is_one_line_and_publishes_nothing(tmp_path, monkeypatch):
    model, optimizers = _trained(0)
    checkpoint.save(tmp_path, 2, model, optimizers, {"seed": 0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(InvalidRequest, match="disk is full") as caught:
        checkpoint.save(tmp_path, 4, model, optimizers, {"seed": 0})
    assert "\n" not in str(caught.value) and "step-00000004" in str(caught.value)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2]


def test_a_full_disk_anywhere_in_training_is_refused_not_internal():
    from executor.worker import EXIT_FAILED, EXIT_REFUSED, _outcome

    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.jsonl")
        except OSError as exc:
            raise RuntimeError("while writing metrics") from exc
    except RuntimeError as wrapped:
        status, error, code = _outcome(wrapped)
    assert (status, code) == ("failed", EXIT_REFUSED) and error.startswith("the disk is full") and "\n" not in error
    assert _outcome(ValueError("something else"))[2] == EXIT_FAILED
