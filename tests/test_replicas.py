"""The hub and ir_datasets loaders on tiny local replicas of the published data, through the real libraries.

Each replica has the published layout and schema (its source is named where it is built) and is loaded by the
project's unchanged code, offline:
- microsoft/ms_marco: datasets.load_dataset(hub id) offline reads only datasets' own Arrow cache, so the replica is a
  local folder of the hub id's name under the working directory (datasets' documented rule: a local directory
  shadows the hub id), the cache a temporary HF_DATASETS_CACHE;
- sentence-transformers/msmarco: train.py fetches its files through the hub cache, so the replica is that cache
  (conftest.msmarco_hub_cache);
- the ir_datasets ids: ir_datasets' own files under a temporary IR_DATASETS_HOME.
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_specs
import reranker
from conftest import REPO
from cli import InputError


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


# --------------------------------------------------------------------------------------------------------------------
# ir_datasets' own cache under IR_DATASETS_HOME, as ir_datasets 0.6.3 lays it out for msmarco-passage
# (ir_datasets/datasets/msmarco_passage.py, _init: the Cache(...) paths; etc/downloads.json: each download's
# cache_path). A file in place is used as it is; what is missing would be downloaded. ir_datasets fixes these paths
# when it is imported, so each run is a process of its own.

MSMARCO_PASSAGE_FILES = {
    "irds_version.txt": "v2",  # the collection's encoding migration, done
    "collection.tsv": "0\tcats purr\n1\tdogs bark\n2\tbirds sing\n3\tfish swim\n",  # pid, passage
    # trec-dl-2019: qrels (TREC), queries (qid, text), the official top-1000 as ExtractQidPid leaves it (qid, pid)
    "trec-dl-2019/qrels": "19a Q0 0 3\n19a Q0 1 0\n",
    "trec-dl-2019/queries.tsv": "19a\twhat purrs\n19x\tnot judged\n",
    "trec-dl-2019/ms.run": "19a\t1\n19a\t0\n19a\t2\n19x\t3\n",
    "trec-dl-2020/qrels": "20a Q0 3 2\n",
    "trec-dl-2020/queries.tsv.gz": "20a\twhat swims\n",  # read from the download itself (gzip)
    "trec-dl-2020/ms.run": "20a\t3\n20a\t2\n",
    "dev/small/queries.tsv": "5\twhat barks\n",
    "dev/small/qrels": "5\t0\t1\t1\n",  # qrels.dev.small.tsv
    "dev/ms.run": "5\t0\n5\t1\n",  # the whole dev top-1000; dev/small keeps its queries'
}


def msmarco_passage_replica(home, files=MSMARCO_PASSAGE_FILES):
    for name, text in files.items():
        path = home / "msmarco-passage" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    return home


def run_python(code, home, check_disk=False):
    env = {**os.environ, "IR_DATASETS_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    # the replicas are kilobytes; ir_datasets would still ask for the real docstore's 14.4 GB free
    if not check_disk:
        env["IR_DATASETS_SKIP_DISK_FREE"] = "true"
    else:
        env.pop("IR_DATASETS_SKIP_DISK_FREE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)  # fmt: skip


def test_dl19_dl20_and_dev_small_load_from_ir_datasets_own_cache_layout(tmp_path):
    home = msmarco_passage_replica(tmp_path / "irds")
    code = """import json, data_specs
splits = {spec: data_specs.load_data(spec, top_k=10) for spec in ("dl19", "dl20", "dev-small")}
print(json.dumps({spec: [s.queries, s.qrels, s.run, s.corpus] for spec, s in splits.items()}))"""
    result = run_python(code, home)
    assert result.returncode == 0, result.stderr[-3000:]
    splits = json.loads(result.stdout.splitlines()[-1])
    # judged queries only; every candidate scores 0 (the official top-1000 ranks nothing); texts from the docstore
    assert splits["dl19"] == [{"19a": "what purrs"}, {"19a": {"0": 3, "1": 0}}, {"19a": {"1": 0.0, "0": 0.0, "2": 0.0}},
                              {"0": "cats purr", "1": "dogs bark", "2": "birds sing"}]  # fmt: skip
    assert splits["dl20"] == [{"20a": "what swims"}, {"20a": {"3": 2}}, {"20a": {"3": 0.0, "2": 0.0}},
                              {"2": "birds sing", "3": "fish swim"}]  # fmt: skip
    assert splits["dev-small"] == [{"5": "what barks"}, {"5": {"1": 1}}, {"5": {"0": 0.0, "1": 0.0}},
                                   {"0": "cats purr", "1": "dogs bark"}]  # fmt: skip


def test_dl19_sample_and_rest_through_ir_datasets_with_official_or_given_candidates(tmp_path):
    dl19 = {  # three judged queries and an unjudged one
        "trec-dl-2019/qrels": "19a Q0 0 3\n19b Q0 1 2\n19c Q0 2 1\n",
        "trec-dl-2019/queries.tsv": "19a\twhat purrs\n19b\twhat barks\n19c\twhat sings\n19x\tnot judged\n",
        "trec-dl-2019/ms.run": "19a\t1\n19a\t0\n19b\t1\n19c\t2\n19c\t3\n19x\t3\n",
    }
    home = msmarco_passage_replica(tmp_path / "irds", {**MSMARCO_PASSAGE_FILES, **dl19})
    (tmp_path / "bm25.trec").write_text("19a Q0 2 1 9 bm25\n19b Q0 3 1 9 bm25\n19c Q0 0 1 9 bm25\n19x Q0 1 1 9 bm25\n")
    code = f"""import json, data_specs
splits = [data_specs.load_data("dl19#sample2", top_k=10), data_specs.load_data("dl19#rest2", top_k=10),
          data_specs.load_data("dl19#sample2", top_k=10, candidates={str(tmp_path / "bm25.trec")!r})]
print(json.dumps([[s.queries, s.qrels, s.run, s.corpus, s.name] for s in splits]))"""
    result = run_python(code, home)
    assert result.returncode == 0, result.stderr[-3000:]
    sample, rest, given = json.loads(result.stdout.splitlines()[-1])
    # random.Random(0).sample(["19a", "19b", "19c"], 2) == ["19b", "19c"]
    assert sample == [{"19b": "what barks", "19c": "what sings"}, {"19b": {"1": 2}, "19c": {"2": 1}},
                      {"19b": {"1": 0.0}, "19c": {"2": 0.0, "3": 0.0}},
                      {"1": "dogs bark", "2": "birds sing", "3": "fish swim"}, "dl19#sample2"]  # fmt: skip
    assert rest == [{"19a": "what purrs"}, {"19a": {"0": 3}}, {"19a": {"1": 0.0, "0": 0.0}},
                    {"0": "cats purr", "1": "dogs bark"}, "dl19#rest2"]  # fmt: skip
    assert given[2] == {"19b": {"3": 9.0}, "19c": {"0": 9.0}}  # the run file's, for the sampled queries alone
    assert given[3] == {"0": "cats purr", "3": "fish swim"}  # the candidates' text alone: cut before it is read


def test_too_little_disk_for_the_docstore_is_one_line_naming_the_space_the_place_and_the_skip(tmp_path):
    """ir_datasets' own check (util.check_disk_free: 14.4 GB for the passage docstore) on a disk that reports 2 GB
    free: shutil.disk_usage, which it calls, is the one thing replaced."""
    home = msmarco_passage_replica(tmp_path / "irds")
    code = f"""import runpy, shutil, sys
shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 2 * 10**9, 2 * 10**9)
sys.argv = ["evaluate.py", "--data", "dl19", "--download_only", "--output_dir", {str(tmp_path / "out")!r}]
runpy.run_path("evaluate.py", run_name="__main__")"""
    result = run_python(code, home, check_disk=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: dl19: not enough disk space for msmarco-passage/trec-dl-2019/judged in IR_DATASETS_HOME ({home}): "
        f"Insufficient disk space: {home}/msmarco-passage/collection.tsv.pklz4 requires 14.4GB but only 2.0GB is "
        "available (12.4GB more needed); point IR_DATASETS_HOME at a disk with that much free, or "
        "IR_DATASETS_SKIP_DISK_FREE=true skips the check"
    ], result.stderr[-3000:]

    skip = code.replace("import runpy", "import os; os.environ['IR_DATASETS_SKIP_DISK_FREE'] = 'true'; import runpy")
    result = run_python(skip, home, check_disk=True)  # as the line says: the check skipped, the docstore built
    assert result.returncode == 0, result.stderr[-3000:]
    assert (home / "msmarco-passage" / "collection.tsv.pklz4").is_dir()


# --------------------------------------------------------------------------------------------------------------------
# sentence-transformers/msmarco in the hub cache (conftest.msmarco_hub_cache): the training pairs.


def test_hub_pairs_are_the_first_triplets_read_from_only_the_files_that_hold_them(msmarco_hub_cache):
    """By default the thesis code's first 1 M triplets (2 M pairs), not all ~398 M: here 5 triplets (10 pairs) of 12,
    in 3 files of 4. Only the first 2 files are read, and the pairs are those (and in the order) of the whole
    config as datasets loads it."""
    import train

    pairs = [pair for example in train.load_examples(train.MSMARCO_HUB, max_pairs=10) for pair in example]

    assert pairs == [(f"Q{i}", text, label) for i in range(1, 6) for text, label in ((f"P{i}", 1.0), (f"N{i}", 0.0))]
    files = [Path(path).name for path in data_specs.hub_files("triplets", rows=5)]
    assert files == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet"]
    whole = data_specs.datasets.load_dataset(str(msmarco_hub_cache), "triplets", split="train")  # what train.py read
    assert whole["query_id"][:5] == [f"q{i}" for i in range(1, 6)]
    # the corpus stays in datasets' memory-mapped cache: only the passages asked for become Python strings
    _, corpus, _ = data_specs.hub_datasets(max_pairs=2)
    assert corpus.cache_files and data_specs.texts_by_id(corpus, "passage_id", "passage", ["p2", "n1", "p2"]) == {
        "p2": "P2", "n1": "N1"}  # fmt: skip


def test_offline_a_run_wanting_more_triplets_than_were_fetched_is_refused_not_cut_short(msmarco_hub_cache):
    (msmarco_hub_cache / "triplets" / "train-00002-of-00003.parquet").unlink()  # --download_only fetched 2 of 3 files
    with pytest.raises(InputError, match=r"^sentence-transformers/msmarco: 8 triplets rows in the hub cache, 9 wanted; "
                                         r"fetch them with network first \(train.py --download_only with this run's "
                                         r"--max_train_pairs\)$"):  # fmt: skip
        data_specs.hub_datasets(max_pairs=18)
    assert len(data_specs.hub_datasets(max_pairs=16)[0]) == 8
