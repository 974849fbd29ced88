"""Chat templates, Parquet rows and packing that keeps documents apart, in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from executor.data import IGNORE_INDEX, PackedData, load_examples, read_rows
from executor.tokenizer import ByteTokenizer, HFTokenizer
from tests.executor.conftest import ALPACA, SHAREGPT

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_chat_tokenizer(folder: Path) -> Path:
    """A byte-level BPE trained on the test data, with a chat template; no hub access."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([ALPACA.read_text(), SHAREGPT.read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    return make_chat_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _trained_text(example, tok: HFTokenizer) -> str:
    return tok._tok.decode([i for i, keep in zip(example.ids, example.trained) if keep])


def test_chat_template_formats_rows_and_trains_on_assistant_turns_only(chat_tokenizer):
    tok = HFTokenizer(str(chat_tokenizer))
    examples, report = load_examples(str(SHAREGPT), tok, 0.0)
    rows = [json.loads(line) for line in SHAREGPT.read_text().splitlines() if line.strip()]
    assert report.bad == 0 and len(examples) == len(rows)
    first, row = examples[0], rows[0]
    text = tok._tok.decode(first.ids)
    assert text.startswith("<s><|user|>\n" + row["conversations"][0]["value"] + "<|end|>\n<|assistant|>\n")
    assert first.ids.count(tok.bos_id) == 1  # the template's bos, not a second one
    answers = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
    assert _trained_text(first, tok) == "".join(a + "<|end|>\n" for a in answers)
    alpaca, _ = load_examples(str(ALPACA), tok, 0.0)
    assert _trained_text(alpaca[0], tok) == json.loads(ALPACA.read_text())[0]["output"] + "<|end|>\n"


def test_without_a_template_the_instruction_format_stays(chat_tokenizer):
    tok = HFTokenizer(str(chat_tokenizer))
    examples, _ = load_examples(str(ALPACA), tok, 0.0, chat_template=False)
    assert "### Instruction:" in tok._tok.decode(examples[0].ids)
    assert "### Instruction:" in ByteTokenizer().decode(load_examples(str(ALPACA), ByteTokenizer(), 0.0)[0][0].ids)


def test_messages_rows_and_parquet_files(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe")]
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert [row for _, row in read_rows(str(tmp_path / "chat.parquet"))] == rows
    examples, report = load_examples(str(tmp_path / "chat.parquet"), ByteTokenizer(), 0.0)
    assert report.rows == 3 and report.bad == 0
    trained = [ByteTokenizer().decode([i for i, k in zip(e.ids, e.trained) if k]) for e in examples]
    assert trained == [" yes", " no", " maybe"]


# -- packing -----------------------------------------------------------------------------------

def _tiny_model(attention: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from executor.model import hf_config
    from planner.models import load_model
    from planner.specs import Workload

    torch.manual_seed(0)
    config = hf_config(load_model("llama-tiny"), Workload(seq_len=64, global_batch=1))
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The loss of predicting each next token (S - 1 values) of one row."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")


def _packed_row() -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    examples, _ = load_examples(str(ALPACA), ByteTokenizer(), 0.0)
    examples = examples[:3]
    total = sum(len(e.ids) for e in examples)
    data = PackedData(examples, seq_len=total + 5, global_batch=1, seed=0, pad_id=0)
    ids, labels, positions = data.sequences(0, 1, positions=True)
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    spans = list(zip(starts, starts[1:]))[:3]  # the three documents (the padding is the fourth)
    assert labels[0, spans[0][0]] == IGNORE_INDEX and all(positions[0, s] == 0 for s, _ in spans)
    return ids, positions, spans


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_documents_have_the_loss_they_have_alone(attention):
    model = _tiny_model(attention)
    ids, positions, spans = _packed_row()
    packed = _token_losses(model(input_ids=ids, position_ids=positions).logits, ids)
    crossing = _token_losses(model(input_ids=ids).logits, ids)
    for start, end in spans:
        alone_ids = ids[:, start:end]
        alone = _token_losses(model(input_ids=alone_ids).logits, alone_ids)
        torch.testing.assert_close(packed[start:end - 1], alone, rtol=1e-4, atol=1e-5)
    later = spans[1]
    assert not torch.allclose(crossing[later[0]:later[1] - 1], packed[later[0]:later[1] - 1], atol=1e-3), \
        "without position ids the documents should see each other"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_pipeline_stage_masks_documents_as_transformers_does(attention):
    from executor.pipeline import StageModel

    model = _tiny_model(attention)
    ids, positions, _ = _packed_row()
    stage = StageModel(model, list(range(model.config.num_hidden_layers)), first=True, last=True, document_mask=True)
    torch.testing.assert_close(stage(ids, positions), model(input_ids=ids, position_ids=positions).logits,
                               rtol=1e-4, atol=1e-5)
