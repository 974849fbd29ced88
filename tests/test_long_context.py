"""The longest sequence QLoRA fine-tunes on one GPU (`planner fits`, max seq) against published
maxima whose configuration is stated (public cases c153, c154)."""

from __future__ import annotations

import pytest

from calibration.cases import load_cases
from calibration.validate import predict_case
from planner.api import Request
from planner.search import Pins
from planner.whatfits import longest_sequence

# unsloth.ai/blog/llama3-3 (2024-12): HF + FlashAttention-2, 4-bit QLoRA on all linear layers,
# rank 32, batch 1, gradient checkpointing, on one 80 GB A100: Llama 3.1 8B reaches 28,000 tokens
HF_FA2_LLAMA31_8B_MAX_TOKENS = 28_000


@pytest.mark.parametrize("case_id", ["c153", "c154"])
def test_the_published_maximum_context_runs_are_predicted_to_fit(case_id):
    """A run at the published maximum length trained: the planner must not say it does not fit."""
    case = {c.id: c for c in load_cases()}[case_id]
    assert predict_case(case).fits


def test_planner_fits_max_sequence_is_near_the_published_hf_maximum():
    """`planner fits` (13 % headroom, micro-batch 1, any recompute) for the same QLoRA: within
    -10 % / +15 % of HF + FA2's 28,000 (the logits dominate at that length: 128,256 entries a token
    in bf16, their fp32 upcast and log-softmax)."""
    request = Request(model="llama3.1-8b", gpu="a100-80gb", gpus=1, seq_len=4096, method="qlora", lora_rank=32,
                      optimizer="adamw8bit")
    longest = longest_sequence(request, Pins(), 131072)
    assert 0.9 * HF_FA2_LLAMA31_8B_MAX_TOKENS <= longest <= 1.15 * HF_FA2_LLAMA31_8B_MAX_TOKENS
