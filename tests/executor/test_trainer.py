"""The trainer's pieces in one process: boolean options, the learning-rate schedule, gradient
clipping by the global norm."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from executor.clip import clip_grad_norm_, global_grad_norm
from executor.options import RunOptions, default_warmup_steps, parse_bool
from executor.schedule import build_schedulers

REQUIRED = ["--plan", "p.json", "--data", "d.json", "--steps", "10", "--output", "out"]


@pytest.mark.parametrize("words, expected", [(("true", "True", "1", "yes", "on"), True),
                                             (("false", "FALSE", "0", "no", "off"), False)])
def test_boolean_words(words, expected):
    assert all(parse_bool(word) is expected for word in words)


def test_boolean_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="true or false"):
        parse_bool("maybe")


@pytest.mark.parametrize("argv, expected", [([], False), (["--resume"], True), (["--resume", "true"], True),
                                            (["--resume", "True"], True), (["--resume", "1"], True),
                                            (["--resume", "no"], False), (["--resume", "False"], False)])
def test_worker_reads_resume_forms(argv, expected):
    assert RunOptions.parse(REQUIRED + argv).resume is expected


def test_worker_refuses_an_unclear_boolean(capsys):
    with pytest.raises(SystemExit):
        RunOptions.parse(REQUIRED + ["--resume", "perhaps"])
    assert "true or false" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [(["--resume", "true"], True), (["--resume"], True),
                                            (["--resume", "0"], False), ([], False)])
def test_cli_reads_resume_forms(argv, expected):
    from planner.cli import build_parser

    args = build_parser().parse_args(["train"] + REQUIRED + argv)
    assert args.resume is expected


def test_new_options_survive_the_worker_command_line():
    options = RunOptions(plan="p", data="d", steps=9, output="o", lr_schedule="linear", warmup_steps=None,
                         min_lr_ratio=0.0, max_grad_norm=0.5, merge_lora=True, tensorboard=False, document_mask=False)
    assert RunOptions.parse(options.to_argv()) == options


def test_default_warmup_is_three_percent_capped_at_100():
    assert default_warmup_steps(1000) == 30 and default_warmup_steps(100_000) == 100
    assert default_warmup_steps(20) == 1  # never zero for a short run


def _lrs(schedule: str, steps: int, warmup: int, min_ratio: float, peak: float = 2e-3) -> list[float]:
    """The lr of every optimizer step, read from the optimizer as the training loop does."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=peak)
    scheduler, = build_schedulers([optimizer], steps, warmup, schedule, min_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_warms_up_then_decays_to_the_floor():
    peak, steps, warmup, floor = 2e-3, 50, 5, 0.1
    lrs = _lrs("cosine", steps, warmup, floor, peak)
    assert lrs[:warmup] == pytest.approx([peak * (k + 1) / warmup for k in range(warmup)])
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * floor)
    middle = warmup + (steps - 1 - warmup) / 2  # half-way through the decay: cos(pi/2) = 0
    if middle.is_integer():
        assert lrs[int(middle)] == pytest.approx(peak * (floor + (1 - floor) / 2))
    decay = lrs[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    t = 10 / (steps - 1 - warmup)
    assert lrs[warmup + 10] == pytest.approx(peak * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2))


def test_linear_and_constant_schedules():
    linear = _lrs("linear", 11, 0, 0.0, 1.0)
    assert linear == pytest.approx([1 - k / 10 for k in range(11)])
    assert _lrs("constant", 8, 2, 0.1, 1.0) == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])


def test_an_unknown_schedule_is_refused():
    from planner.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="cosine, linear or constant"):
        _lrs("step", 5, 0, 0.1)


def _model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model(torch.randn(5, 8)).square().sum().mul(10).backward()
    return model


def test_global_norm_is_torchs_and_clipping_scales_to_the_limit():
    model, twin = _model_with_grads(), _model_with_grads()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm=0.5)
    params = list(model.parameters())
    norm = clip_grad_norm_(params, 0.5, torch.device("cpu"))
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6) and norm.item() > 0.5
    for mine, theirs in zip(params, twin.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)
    assert global_grad_norm(params, torch.device("cpu")).item() == pytest.approx(0.5, rel=1e-5)


def test_no_clipping_below_the_limit_or_when_off():
    model = _model_with_grads()
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm_(list(model.parameters()), 0.0, torch.device("cpu"))
    assert norm.item() > 0
    for grad, kept in zip(before, model.parameters()):
        torch.testing.assert_close(kept.grad, grad)
    clip_grad_norm_(list(model.parameters()), norm.item() * 2, torch.device("cpu"))
    for grad, kept in zip(before, model.parameters()):
        torch.testing.assert_close(kept.grad, grad)
