"""The hub and ir_datasets loaders on tiny local replicas of the published data, through the real libraries.

Each replica has the published layout and schema (the source is named at each builder) and is loaded by the project's
unchanged code: `datasets` finds a hub id's replica as a local folder of that name under the working directory (its
documented rule: a local directory shadows the hub id), the offline cache stays in a temporary HF_DATASETS_CACHE.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_specs
import reranker
from reranker import InputError


@pytest.fixture
def hub_replicas(tmp_path, monkeypatch):
    """A working directory where hub ids resolve to local replicas, and a cache of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_specs.datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    return tmp_path


# microsoft/ms_marco, as converted to Parquet (hub commit a47ee7a, "Convert dataset to Parquet (#5)", January 2024):
# v1.1/{train,validation,test}-00000-of-00001.parquet, features as in the card's dataset_info.
MS_MARCO_CARD = """---
dataset_info:
- config_name: v1.1
  features:
  - name: answers
    sequence: string
  - name: passages
    sequence:
    - name: is_selected
      dtype: int32
    - name: passage_text
      dtype: string
    - name: url
      dtype: string
  - name: query
    dtype: string
  - name: query_id
    dtype: int32
  - name: query_type
    dtype: string
  - name: wellFormedAnswers
    sequence: string
configs:
- config_name: v1.1
  data_files:
  - split: validation
    path: v1.1/validation-*
  - split: train
    path: v1.1/train-*
  - split: test
    path: v1.1/test-*
---
"""
MS_MARCO_SCHEMA = pa.schema([
    ("answers", pa.list_(pa.string())),
    ("passages", pa.struct([("is_selected", pa.list_(pa.int32())), ("passage_text", pa.list_(pa.string())),
                            ("url", pa.list_(pa.string()))])),
    ("query", pa.string()), ("query_id", pa.int32()), ("query_type", pa.string()),
    ("wellFormedAnswers", pa.list_(pa.string())),
])  # fmt: skip


def ms_marco_v11_replica(root, rows):
    """microsoft/ms_marco with the given validation rows (query_id, query, [(passage, is_selected)])."""
    folder = root / "microsoft" / "ms_marco"
    (folder / "v1.1").mkdir(parents=True)
    (folder / "README.md").write_text(MS_MARCO_CARD)
    columns = {
        "answers": [[] for _ in rows],
        "passages": [{"is_selected": [s for _, s in passages], "passage_text": [p for p, _ in passages],
                      "url": [f"http://example.com/{i}" for i in range(len(passages))]} for _, _, passages in rows],
        "query": [query for _, query, _ in rows], "query_id": [query_id for query_id, _, _ in rows],
        "query_type": ["DESCRIPTION" for _ in rows], "wellFormedAnswers": [[] for _ in rows],
    }  # fmt: skip
    first = {name: values[:1] for name, values in columns.items()}
    for split, table in [("validation", columns), ("train", first), ("test", first)]:
        pq.write_table(pa.table(table, schema=MS_MARCO_SCHEMA), folder / "v1.1" / f"{split}-00000-of-00001.parquet")


def test_msmarco_v11_validation_ranks_each_querys_given_passages_in_their_given_order(hub_replicas):
    ms_marco_v11_replica(
        hub_replicas, [(5, "what is a", [("p0", 0), ("p1", 1), ("p2", 0)]), (6, "no answer", [("x", 0)])]
    )

    split = data_specs.load_data("msmarco-v1.1-val", top_k=2)

    assert split.queries == {"5": "what is a", "6": "no answer"}
    assert split.qrels == {"5": {"5-0": 0, "5-1": 1, "5-2": 0}, "6": {"6-0": 0}}
    assert split.run == {"5": {"5-0": 3.0, "5-1": 2.0}, "6": {"6-0": 1.0}}  # the given order, cut at top_k
    assert split.corpus == {"5-0": "p0", "5-1": "p1", "5-2": "p2", "6-0": "x"}
    # query 6, with no selected passage, counts as 0, as in the thesis's mean over all queries: (1/2 + 0) / 2
    assert reranker.evaluate_run(split.qrels, split.run)[0]["RR@10"] == 0.25


def test_msmarco_v11_rows_sharing_a_query_id_are_refused_naming_it(hub_replicas):
    ms_marco_v11_replica(hub_replicas, [(5, "a", [("p0", 1)]), (7, "b", [("p1", 1)]), (5, "c", [("p2", 0)])])
    with pytest.raises(InputError, match=r"^msmarco-v1.1-val: query_id 5 appears a second time \(validation row 2\)$"):
        data_specs.load_data("msmarco-v1.1-val", top_k=10)
