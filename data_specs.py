"""The one data-spec language of train.py (--eval_data) and evaluate.py (--data): a SPEC becomes a reranker.Split.

    DIR:SPLIT          DIR/queries.SPLIT.tsv, qrels.SPLIT.txt, corpus.tsv, run.SPLIT.trec (else BM25 over the corpus)
    dl19, dl20         ir_datasets msmarco-passage/trec-dl-2019/judged, .../trec-dl-2020/judged, official BM25 top-1000
    dev-small          ir_datasets msmarco-passage/dev/small, its official BM25 top-1000
    irds:<id>          any ir_datasets id with scoreddocs
    msmarco-v1.1-val   Hugging Face microsoft/ms_marco v1.1 validation, each query's ~10 given passages

    SPEC#sampleN       a seeded random sample of N of any SPEC's judged queries (seed 0); SPEC#sampleN-seedS another
    SPEC#restN         its complement: the other judged queries (-seedS as for #sampleN)

A new kind of data: one branch in load_base (and one in data_fingerprint, what evaluate.py --update compares).
train.py's training data also comes from the hub's MS MARCO triplets (queries_from_hub).
"""

import dataclasses
import fnmatch
import functools
import hashlib
import math
import random
import re
from pathlib import Path

import datasets
import huggingface_hub
import ir_datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cli import InputError, one_line
from reranker import (
    Split,
    first_stage_top,
    load_split,
    quiet_downloads,
    read_fields,
    read_run,
    read_topics,
    split_paths,
    top_candidates,
)

MSMARCO_HUB = "sentence-transformers/msmarco"  # the thesis code's training data: configs triplets, corpus, queries
HUB_TRAIN_PAIRS = 2_000_000  # the thesis code's first 1 M triplets, as pairs (the hub has ~400 M)
IRDS_NAMES = {
    "dl19": "msmarco-passage/trec-dl-2019/judged",
    "dl20": "msmarco-passage/trec-dl-2020/judged",
    "dev-small": "msmarco-passage/dev/small",
}
MSMARCO_V11 = "msmarco-v1.1-val"
MSMARCO_V11_HUB = "microsoft/ms_marco"
# no "=" or ":": --candidates SPEC=RUN_FILE splits on the first "=", DIR:SPLIT on the last ":"
SUBSET = re.compile(r"(?P<kind>sample|rest)(?P<n>[0-9]+)(?:-seed(?P<seed>[0-9]+))?")


def load_data(spec, top_k, with_candidates=True, candidates=None):
    """A SPEC's queries and qrels, and with_candidates its first-stage top_k (from the `candidates` run file where
    given) and their text; with a #sampleN or #restN suffix, only those queries."""
    base, subset = parse_subset(spec)
    if subset is not None and is_irds(base):  # cut before the candidates' text is read: dev-small's is 7 M passages
        keep = functools.partial(subset_query_ids, subset=subset, spec=spec)
        return dataclasses.replace(load_base(base, top_k, with_candidates, candidates, keep), name=spec)
    return subset_of(load_base(base, top_k, with_candidates, candidates), spec, subset)


def is_irds(spec):
    return spec in IRDS_NAMES or spec.startswith("irds:")


def load_training_split(spec):
    """train.py's DIR:SPLIT (with or without a subset suffix), with the text of every judged document: the positives."""
    base, subset = parse_subset(spec)
    return subset_of(load_split(base, need_qrels_text=True), spec, subset)


def load_base(spec, top_k, with_candidates=True, candidates=None, keep=None):
    """load_data of a SPEC without a subset suffix (ir_datasets data: only the judged queries `keep` keeps)."""
    if is_irds(spec):
        with quiet_downloads(all_warnings=True):
            dataset_id = IRDS_NAMES.get(spec, spec.removeprefix("irds:"))
            return load_irds(spec, dataset_id, top_k, with_candidates, candidates, keep)
    if candidates:
        raise candidates_of_irds_only(spec)
    if spec == MSMARCO_V11:
        with quiet_downloads(hub_id=MSMARCO_V11_HUB):
            return load_msmarco_v11(top_k)
    if ":" not in spec:
        raise unknown_data(spec)
    if with_candidates:
        return load_split(spec, top_k)
    queries, qrels = read_topics(split_paths(spec))  # run files need no corpus (../shared/data/trec-dl has none)
    return Split(queries, qrels, {}, {}, spec)


def load_irds(spec, dataset_id, top_k, with_candidates, candidates=None, keep=None):
    try:
        dataset = ir_datasets.load(dataset_id)
    except KeyError:
        raise InputError(f"{spec}: {dataset_id} is not an ir_datasets id") from None
    if with_candidates and not candidates and not dataset.has_scoreddocs():
        raise InputError(f"{spec}: {dataset_id} has no first-stage run (scoreddocs) to rerank; give --candidates")
    try:  # downloads on first use
        queries = {query.query_id: query.default_text() for query in dataset.queries_iter()}
        qrels = {}
        for qrel in dataset.qrels_iter():
            qrels.setdefault(qrel.query_id, {})[qrel.doc_id] = qrel.relevance
        if keep is not None:  # a #sampleN / #restN of the judged queries
            kept = keep(qrels)
            queries = {query_id: text for query_id, text in queries.items() if query_id in kept}
            qrels = {query_id: judged for query_id, judged in qrels.items() if query_id in kept}
        run, corpus, ranked = {}, {}, True
        if with_candidates and candidates:  # e.g. Pyserini's run for all 200 DL19 topics: dl19's 43 judged are kept
            run = {query_id: scores for query_id, scores in read_run(candidates).items() if query_id in queries}
            if not run:
                raise InputError(f"{candidates}: no query of {dataset_id} in it")
        elif with_candidates:
            for scored in dataset.scoreddocs_iter():
                if keep is None or scored.query_id in queries:
                    run.setdefault(scored.query_id, {})[scored.doc_id] = scored.score
        if with_candidates:
            # the official top-1000 of MS MARCO and TREC DL ranks nothing (all scores 0)
            instead = "give ranked ones (--candidates SPEC=RUN_FILE)"
            run, ranked = first_stage_top(run, top_k, candidates or spec, instead)
            needed = {doc_id for scores in run.values() for doc_id in scores}
            corpus = {doc.doc_id: doc.default_text() for doc in dataset.docs_store().get_many_iter(needed)}
            if candidates and needed - corpus.keys():
                for line_number, (_, _, doc_id, *_) in read_fields(candidates, 6, sep=None):
                    if doc_id in needed and doc_id not in corpus:
                        raise InputError(f"{candidates}:{line_number}: document {doc_id} is not in {dataset_id}")
    except (OSError, RuntimeError) as error:  # ir_datasets raises RuntimeError when every download source fails
        raise InputError(f"{spec}: cannot load {dataset_id} with ir_datasets: {one_line(error)}") from None
    except ValueError as error:  # ir_datasets.util.check_disk_free, before a download or a docstore (14.4 GB) build
        if not str(error).startswith("Insufficient disk space"):
            raise
        where, skip = f"IR_DATASETS_HOME ({ir_datasets.util.home_path()})", "IR_DATASETS_SKIP_DISK_FREE=true"
        raise InputError(
            f"{spec}: not enough disk space for {dataset_id} in {where}: {one_line(error)}; point "
            f"IR_DATASETS_HOME at a disk with that much free, or {skip} skips the check"
        ) from None
    return Split(queries, qrels, run, corpus, spec, ranked)


def load_msmarco_v11(top_k):
    """MS MARCO v1.1 validation: each query's given passages (in the given order) with `is_selected` as the label.

    Every query counts, those without a selected passage as 0, as the thesis's script (ms_marco_val_mrr.py) averaged
    its MRR@10 over all 10,047 (MS MARCO's official evaluation would leave those queries out).
    """
    try:
        rows = datasets.load_dataset(MSMARCO_V11_HUB, "v1.1", split="validation")
    except OSError as error:  # offline: ConnectionError; unknown name: DatasetNotFoundError
        raise InputError(f"{MSMARCO_V11}: cannot load microsoft/ms_marco v1.1: {one_line(error)}") from None
    queries, qrels, run, corpus = {}, {}, {}, {}
    for row_number, row in enumerate(rows):
        passages = row["passages"]
        query_id = str(row["query_id"])
        if query_id in queries:  # keyed by query_id: a second row would merge into the first unseen
            raise InputError(f"{MSMARCO_V11}: query_id {query_id} appears a second time (validation row {row_number})")
        queries[query_id] = row["query"]
        for i, (text, selected) in enumerate(zip(passages["passage_text"], passages["is_selected"])):
            doc_id = f"{query_id}-{i}"
            corpus[doc_id] = text
            qrels.setdefault(query_id, {})[doc_id] = int(selected)
            run.setdefault(query_id, {})[doc_id] = float(len(passages["passage_text"]) - i)  # the given order
    return Split(queries, qrels, top_candidates(run, top_k), corpus, MSMARCO_V11)


def unknown_data(spec):
    return InputError(f"{spec}: unknown data, expected DIR:SPLIT, dl19, dl20, dev-small, irds:<id> or {MSMARCO_V11}")


def candidates_of_irds_only(spec):
    return InputError(f"--candidates {spec}=...: only for ir_datasets data (a DIR:SPLIT has DIR/run.SPLIT.trec)")


def data_fingerprint(spec, candidates=None):
    """What a SPEC's data is, read without loading it: {"queries", "qrels", "run"} hashes, each of the whole SPEC
    string and its source; "run" covers the candidates and their text. evaluate.py --update compares them."""
    base = parse_subset(spec)[0]  # a subset (SPEC#sample500) reads the files of SPEC; the spec is hashed
    if is_irds(base):
        release = f"ir_datasets {ir_datasets.__version__} {IRDS_NAMES.get(base, base.removeprefix('irds:'))}"
        run = [release, file_sha1(candidates) if candidates else None]  # the docs store's text, of the release too
        sources = {"queries": release, "qrels": release, "run": run}
    elif candidates:
        raise candidates_of_irds_only(spec)
    elif base == MSMARCO_V11:  # the name alone: a hub revision would change with a first download, not the data
        sources = dict.fromkeys(("queries", "qrels", "run"), MSMARCO_V11_HUB)
    elif ":" in base:
        paths = split_paths(base)
        run = [file_sha1(paths["run"]), file_sha1(paths["corpus"])]  # no run file: BM25 over the corpus
        sources = {"queries": file_sha1(paths["queries"]), "qrels": file_sha1(paths["qrels"]), "run": run}
    else:
        raise unknown_data(spec)
    return {part: hashlib.sha1(f"{spec}\n{part}\n{source}".encode()).hexdigest()[:16] for part, source in sources.items()}


def file_sha1(path):
    """The sha1 of a file's bytes (None where there is no file), read in chunks: a corpus can be gigabytes."""
    if not Path(path).is_file():
        return None
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def data_folder(spec):
    """A folder name for a SPEC: `../shared/data/msmarco-sample:test#sample60` -> `msmarco-sample-test-sample60`."""
    base, subset = parse_subset(spec)
    directory, _, split = base.rpartition(":")
    name = f"{Path(directory).name}-{split}" if directory and directory != "irds" else re.sub(r"[^\w.-]+", "-", base)
    return f"{name}-{subset[0]}" if subset else name


# Subsets: SPEC#sampleN and SPEC#restN, a seeded draw of judged queries (e.g. validation and test parts of dev-small).


def parse_subset(spec):
    """`SPEC#sampleN[-seedS]` or `SPEC#restN[-seedS]` -> (SPEC, the suffix's SUBSET match); no suffix: (spec, None)."""
    base, sep, suffix = spec.rpartition("#")
    if not sep or "/" in suffix or ":" in suffix:  # a '#' in a DIR:SPLIT's folder names no subset
        return spec, None
    subset = SUBSET.fullmatch(suffix)
    if not subset:
        raise InputError(f"{spec}: expected SPEC#sampleN or SPEC#restN, optionally -seedS (e.g. dev-small#sample500)")
    return base, subset


def subset_query_ids(judged, subset, spec):
    """The ids of `judged` (query ids) that `subset` names: random.Random(S).sample(sorted(judged), N), or the rest."""
    judged, n, seed = sorted(judged), int(subset["n"]), int(subset["seed"] or 0)
    if not 1 <= n <= len(judged):
        raise InputError(f"{spec}: N must be from 1 to {len(judged)}, its number of judged queries, not {n}")
    sample = set(random.Random(seed).sample(judged, n))
    if subset["kind"] == "sample":
        return sample
    if n == len(judged):
        raise InputError(f"{spec}: #rest{n} leaves no query: all {n} judged queries are in #sample{n}")
    return set(judged) - sample


def subset_of(split, spec, subset):
    """`split` cut to the judged queries `subset` names (all of it where None): their queries, qrels and run, and the
    documents those name; named `spec`."""
    if subset is None:
        return split
    query_ids = subset_query_ids(split.qrels, subset, spec)
    tables = (split.queries, split.qrels, split.run)
    queries, qrels, run = ({query_id: v for query_id, v in table.items() if query_id in query_ids} for table in tables)
    needed = {doc_id for docs in [*run.values(), *qrels.values()] for doc_id in docs}
    corpus = {doc_id: text for doc_id, text in split.corpus.items() if doc_id in needed}
    return Split(queries, qrels, run, corpus, spec, split.ranked)


# Training data from the hub: sentence-transformers/msmarco, the thesis code's.


def hub_datasets(max_pairs=None):
    """The first max_pairs / 2 triplets (ids) of sentence-transformers/msmarco, from only the shards that hold them,
    and its corpus and queries, memory-mapped (the datasets cache). Offline: what an earlier run fetched."""
    rows = math.ceil((max_pairs or HUB_TRAIN_PAIRS) / 2)
    try:
        with quiet_downloads(hub_id=MSMARCO_HUB):
            triplets = first_rows(hub_files("triplets", rows), rows)
            return [triplets] + [datasets.load_dataset("parquet", data_files=hub_files(name), split="train")
                                 for name in ("corpus", "queries")]  # fmt: skip
    except OSError as error:  # offline and not cached: OfflineModeIsEnabled, LocalEntryNotFoundError
        raise InputError(f"{MSMARCO_HUB}: cannot load it from the hub: {one_line(error)}") from None


def hub_files(config, rows=None):
    """Local copies (the hub cache) of the train files of sentence-transformers/msmarco's CONFIG, as its card's
    `configs` name them, in the order datasets reads them (by name); with rows, only the first that hold that many."""
    readme = Path(huggingface_hub.hf_hub_download(MSMARCO_HUB, "README.md", repo_type="dataset"))
    snapshot = readme.parent  # snapshots/COMMIT: every file below comes from that commit
    configs = {entry["config_name"]: entry for entry in huggingface_hub.DatasetCard.load(readme).data.configs or []}
    data_files = configs.get(config, {}).get("data_files", f"{config}/*")
    patterns = []
    for entry in [data_files] if isinstance(data_files, str) else data_files:  # the card's forms of data_files
        if isinstance(entry, str):
            patterns.append(entry)
        elif entry.get("split", "train") == "train":
            patterns += [entry["path"]] if isinstance(entry["path"], str) else entry["path"]
    offline = huggingface_hub.constants.HF_HUB_OFFLINE  # the files of the cached snapshot, else of the commit
    if offline:
        names = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    else:
        names = huggingface_hub.list_repo_files(MSMARCO_HUB, repo_type="dataset", revision=snapshot.name)
    paths, held = [], 0
    for name in sorted(name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)):
        if rows is not None and held >= rows:
            break
        paths.append(huggingface_hub.hf_hub_download(MSMARCO_HUB, name, repo_type="dataset", revision=snapshot.name))
        held += pq.ParquetFile(paths[-1]).metadata.num_rows
    if not paths:
        raise InputError(f"{MSMARCO_HUB}: no files of its {config} config ({', '.join(patterns)}) found")
    if offline and rows is not None and held < rows:  # not a short config: fewer files fetched than this run needs
        raise InputError(f"{MSMARCO_HUB}: {held:,} {config} rows in the hub cache, {rows:,} wanted; fetch them with "
                         "network first (train.py --download_only with this run's --max_train_pairs)")  # fmt: skip
    return paths


def first_rows(paths, rows):
    """The first `rows` rows of Parquet files read one after the other, as an Arrow table; no more is read."""
    batches = []
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16):
            batches.append(batch)
            if sum(len(b) for b in batches) >= rows:
                return pa.Table.from_batches(batches).slice(0, rows)
    return pa.Table.from_batches(batches)


def queries_from_hub(max_pairs):
    """The first max_pairs / 2 triplets of the hub data, with their texts."""
    first, corpus, queries = hub_datasets(max_pairs)
    query_ids, positive_ids, negative_ids = (first[c].to_pylist() for c in ("query_id", "positive_id", "negative_id"))
    passage = texts_by_id(corpus, "passage_id", "passage", positive_ids + negative_ids)
    query = texts_by_id(queries, "query_id", "query", query_ids)
    return [(query[q], [passage[p]], [passage[n]]) for q, p, n in zip(query_ids, positive_ids, negative_ids)]


def texts_by_id(dataset, id_column, text_column, ids):
    """{id: text} of the rows whose id is in `ids`, picked out in Arrow: only those texts become Python strings."""
    table = dataset.with_format("arrow")[:]  # memory-mapped, nothing read yet
    rows = table.filter(pc.is_in(table[id_column], value_set=pa.array(list(set(ids)), type=table[id_column].type)))
    return dict(zip(rows[id_column].to_pylist(), rows[text_column].to_pylist()))
