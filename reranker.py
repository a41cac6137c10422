"""What train.py and evaluate.py share: the thesis model presets, the IR file formats, scoring and metrics.

Vocabulary (ir_measures', pyserini's): `qrels` = {query_id: {doc_id: relevance}}, `run` = {query_id: {doc_id: score}}.
A collection split `DIR:SPLIT` is `DIR/corpus.tsv`, `DIR/queries.SPLIT.tsv`, `DIR/qrels.SPLIT.txt` and
`DIR/run.SPLIT.trec` (else BM25 over the corpus): the layout of ../shared/data.
"""

import functools
import logging
import math
import os
from array import array
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bm25s
import datasets.config
import huggingface_hub
import ir_measures
import numpy as np
import Stemmer
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import PaddingStrategy

from cli import InputError, one_line

# --------------------------------------------------------------------------------------------------------------------
# Thesis presets (Table 4.1). Everything not listed here is shared by all three (Table 4.2) and lives in train.py.


@dataclass(frozen=True)
class Preset:
    model_name_or_path: str
    learning_rate: float
    max_length: int
    lr_scheduler_type: str


PRESETS = {
    "minilm": Preset("microsoft/MiniLM-L12-H384-uncased", 2e-5, 512, "constant_with_warmup"),  # thesis Table 4.1
    # gte-multilingual-base as converted for transformers' native GteModel (the Alibaba-NLP repo needs remote code,
    # which transformers 5 cannot run); same weights.
    "gte": Preset("alibaba-nlp-community/gte-multilingual-base", 2e-5, 8192, "constant_with_warmup"),  # Table 4.1
    "modernbert": Preset("answerdotai/ModernBERT-base", 2e-6, 8192, "cosine"),  # thesis Table 4.1
}


def preset_for(model: str) -> Preset:
    """The thesis preset named `model`, or MiniLM's settings for any other hub id or local folder."""
    if model in PRESETS:
        return PRESETS[model]
    return Preset(model, *[getattr(PRESETS["minilm"], f) for f in ("learning_rate", "max_length", "lr_scheduler_type")])


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and line, exit code 2, no traceback (cli.py).


@contextmanager
def quiet_downloads(all_warnings=False, hub_id=None):
    """The hub client's retry messages off: offline, the error is our one line. Other warnings (a model's missing
    weights) still show, unless all_warnings (ir_datasets logs each mirror it tries through loggers of its own).
    hub_id: a name the hub may be asked for (not a local folder): offline mode unless the hub answers."""
    if hub_id and not Path(hub_id).exists():
        offline_unless_the_hub_answers()
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    if all_warnings:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        hub.setLevel(level)
        if all_warnings:
            logging.disable(logging.NOTSET)


@functools.cache
def offline_unless_the_hub_answers(timeout=5):
    """HF_HUB_OFFLINE=1 for this process where one request to the hub gets no answer. Without a connection
    huggingface_hub retries each file for ~25 s (1 + 2 + 4 + 8 + 8 s; no setting turns that off) before it looks in
    its cache; offline mode looks in the cache at once: a cached model or data set still loads, anything else is our
    one-line error."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    try:
        huggingface_hub.utils.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # no name resolution, no route, refused, timed out (any answer, even a 5xx, is one)
        logging.getLogger("reranker").warning("%s did not answer (%s): offline mode, the caches only",
                                              huggingface_hub.constants.ENDPOINT, one_line(error))  # fmt: skip
        os.environ["HF_HUB_OFFLINE"] = "1"  # and for any process started from here
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True  # as read when imported


def leave_process_group(state):
    """At the end of a script run by several processes: wait for all of them, then leave their group. A process that
    exited while another still worked (the main one writing the model) aborted now and then at exit under gloo
    (SIGABRT, "terminate called without an active exception": 3 of 21 two-process runs here), and the launcher then
    fails a finished run. A no-op for one process."""
    state.wait_for_everyone()
    state.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# File formats.


def read_fields(path, n_columns, sep="\t", may_be_empty=()):
    """Yield (line_number, fields) of a text file with exactly `n_columns` fields per line, non-empty but for the
    columns (0-based) in `may_be_empty`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as lines:  # decoded line by line, so a bad byte has a line number
        for line_number, line in enumerate(lines, 1):
            try:
                line = line.decode("utf-8-sig" if line_number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{line_number}: not UTF-8 text") from None
            if not line.strip():
                continue
            fields = line.split(sep) if sep else line.split()
            if len(fields) != n_columns:
                raise InputError(f"{path}:{line_number}: expected {n_columns} columns, found {len(fields)}")
            if any(not field.strip() for column, field in enumerate(fields) if column not in may_be_empty):
                raise InputError(f"{path}:{line_number}: empty field")
            yield line_number, [field.strip() for field in fields]


def read_texts(path, keep=None, empty_text=False):
    """`doc_id<TAB>text` or `query_id<TAB>text` -> {id: text}; with `keep`, only those ids (a corpus can be large).

    empty_text: a text may be empty (a corpus: Cranfield has two empty abstracts); an id never.
    """
    texts = {}
    for line_number, (id_, text) in read_fields(path, 2, may_be_empty=(1,) if empty_text else ()):
        if keep is None or id_ in keep:
            if id_ in texts:
                raise InputError(f"{path}:{line_number}: {id_} appears a second time")
            texts[id_] = text
    return texts


def read_qrels(path):
    """TREC qrels `query_id 0 doc_id relevance` -> {query_id: {doc_id: relevance}}."""
    qrels = {}
    for line_number, (query_id, _, doc_id, relevance) in read_fields(path, 4, sep=None):
        try:
            relevance = int(relevance)
        except ValueError:
            raise InputError(f"{path}:{line_number}: relevance {relevance!r} is not an integer") from None
        if doc_id in qrels.setdefault(query_id, {}):  # trec_eval refuses these too
            raise InputError(f"{path}:{line_number}: document {doc_id} judged a second time for query {query_id}")
        qrels[query_id][doc_id] = relevance
    return qrels


def read_run(path):
    """TREC run `query_id Q0 doc_id rank score tag` -> {query_id: {doc_id: score}}."""
    run = {}
    for line_number, (query_id, _, doc_id, _, score, _) in read_fields(path, 6, sep=None):
        try:
            score = float(score)
        except ValueError:
            raise InputError(f"{path}:{line_number}: score {score!r} is not a number") from None
        if math.isnan(score):  # NaN does not sort: the ranking would follow the file's order
            raise InputError(f"{path}:{line_number}: score nan ranks nowhere")
        if doc_id in run.setdefault(query_id, {}):  # trec_eval refuses these too
            raise InputError(f"{path}:{line_number}: document {doc_id} ranked a second time for query {query_id}")
        run[query_id][doc_id] = score
    return run


def ranking(scores):
    """Doc ids best first, ties in trec_eval's order (doc id descending), so every tool sees the same ranking.

    Scores are compared as trec_eval holds them, in 32-bit floats: 20.000002 and 20.000001 tie there.
    """
    doc_ids = list(scores)
    as_float32 = array("f", scores.values())
    order = sorted(range(len(doc_ids)), key=lambda i: (as_float32[i], doc_ids[i]), reverse=True)
    return [doc_ids[i] for i in order]


def top_candidates(run, k):
    """The first `k` documents of each query's ranking."""
    return {query_id: {doc_id: scores[doc_id] for doc_id in ranking(scores)[:k]} for query_id, scores in run.items()}


def is_ranked(run):
    """False when every score ties: a candidate set, not a ranking. MS MARCO's official BM25 top-1000 files (dev, TREC
    DL) list each query's candidates shuffled and unscored (ir_datasets scores them all 0); trec_eval would rank
    such a run by doc id."""
    return len({score for scores in run.values() for score in scores.values()}) > 1


def first_stage_top(run, k, source, instead="give the run real scores"):
    """-> (`run`'s top `k` per query, whether `run` ranks at all), judged before the cut: a top 1 may well tie.
    An unranked run stays whole, as any top k of it would be arbitrary."""
    if is_ranked(run):
        return top_candidates(run, k), True
    most = max(map(len, run.values()), default=0)
    if k < most:
        raise InputError(
            f"--top_k {k}: {source} ranks none of its candidates (all scores tie), so a top {k} would be an arbitrary "
            f"subset; rerank them all (--top_k {most}) or {instead}"
        )
    return run, False


def format_run(run, tag):
    return "".join(
        f"{query_id} Q0 {doc_id} {rank} {run[query_id][doc_id]:.6f} {tag}\n"
        for query_id in sorted(run)
        for rank, doc_id in enumerate(ranking(run[query_id]), 1)
    )


# --------------------------------------------------------------------------------------------------------------------
# First stage, where a split has no run: BM25.

BM25_K1, BM25_B = 0.9, 0.4  # Anserini's defaults for MS MARCO passage
BM25_DEPTH = 1000  # candidates per query when no top_k is given: the TREC DL first stage


def bm25_run(corpus, queries, k):
    """BM25 top-k of every query over `corpus` ({doc_id: text}) -> run; documents sharing no term are left out.

    Lucene's BM25 (bm25s' default) with Anserini's k1 and b, on lowercased, Porter-stemmed word tokens without English
    stop words, as Anserini tokenizes.
    """
    doc_ids = list(corpus)
    retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B)
    stemmer = Stemmer.Stemmer("porter")
    doc_tokens = bm25s.tokenize([corpus[d] for d in doc_ids], stopwords="en", stemmer=stemmer, show_progress=False)
    retriever.index(doc_tokens, show_progress=False)
    query_ids = list(queries)
    tokens = bm25s.tokenize(
        [queries[q] for q in query_ids], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False
    )
    found, scores = retriever.retrieve(tokens, k=min(k, len(doc_ids)), show_progress=False)
    return {
        query_id: {doc_ids[i]: float(score) for i, score in zip(found[n], scores[n]) if score > 0}
        for n, query_id in enumerate(query_ids)
    }


# --------------------------------------------------------------------------------------------------------------------
# Collection splits.


@dataclass
class Split:
    queries: dict  # {query_id: text}
    qrels: dict  # {query_id: {doc_id: relevance}}
    run: dict  # first-stage candidates {query_id: {doc_id: score}}
    corpus: dict  # {doc_id: text}, only the documents the split needs
    name: str
    ranked: bool = True  # False: the run's scores all tie (is_ranked), so it gives candidates but no ranking


def split_paths(spec):
    """`DIR:SPLIT` -> the four file paths of that split."""
    directory, sep, split = spec.rpartition(":")
    if not sep or not directory or not split:
        raise InputError(f"{spec}: expected DIR:SPLIT, e.g. ../shared/data/msmarco-sample:train")
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such directory")
    return {
        "corpus": directory / "corpus.tsv",
        "queries": directory / f"queries.{split}.tsv",
        "qrels": directory / f"qrels.{split}.txt",
        "run": directory / f"run.{split}.trec",
    }


def load_split(spec, top_k=None, need_qrels_text=False):
    """Read a `DIR:SPLIT` with its run's top_k candidates per query and the text of every document it names.

    need_qrels_text: every judged document must have text too (training reads positives from the qrels).
    """
    paths = split_paths(spec)
    queries, qrels = read_topics(paths)
    if paths["run"].is_file():
        run = read_run(paths["run"])
        for query_id in run:
            if query_id not in queries:
                line = _line_of(paths["run"], query_id)
                raise InputError(f"{paths['run']}:{line}: query {query_id} not in {paths['queries']}")
    else:  # no first-stage run: BM25 over the whole corpus
        run = bm25_run(read_texts(paths["corpus"], empty_text=True), queries, top_k or BM25_DEPTH)
    run, ranked = first_stage_top(run, top_k, paths["run"]) if top_k else (run, is_ranked(run))
    needed = {doc_id for scores in run.values() for doc_id in scores}
    if need_qrels_text:
        needed |= {doc_id for judged in qrels.values() for doc_id in judged}
    corpus = read_texts(paths["corpus"], keep=needed, empty_text=True)
    for path, table in [(paths["run"], run)] + ([(paths["qrels"], qrels)] if need_qrels_text else []):
        for query_id, docs in table.items():
            for doc_id in docs:
                if doc_id not in corpus:
                    line = _line_of(path, query_id, doc_id)
                    raise InputError(f"{path}:{line}: document {doc_id} not in {paths['corpus']}")
    return Split(queries, qrels, run, corpus, spec, ranked)


def read_topics(paths):
    """A split's queries and qrels, every judged query one of its queries (it counts, answered or not)."""
    queries = read_texts(paths["queries"])
    if not queries:
        raise InputError(f"{paths['queries']}: no queries")
    qrels = read_qrels(paths["qrels"])
    for query_id in qrels:
        if query_id not in queries:
            line = _line_of(paths["qrels"], query_id)
            raise InputError(f"{paths['qrels']}:{line}: query {query_id} not in {paths['queries']}")
    return queries, qrels


def _line_of(path, *tokens):
    """Line number of the first line holding all `tokens` as fields (only used to point at an error)."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, 1):
            if all(token in line.split() for token in tokens):
                return line_number
    return "?"


# --------------------------------------------------------------------------------------------------------------------
# The model: a one-logit sequence classifier on the backbone's [CLS] token (thesis section 4; ModernBERT pools as its
# config says), loaded one way for training (a new head) and for scoring (every weight from the folder).


def cross_encoder_parts(name_or_path, new_head=False, classifier_pooling=None):
    """-> (tokenizer, config) of a model, checked before any weight loads: to score, it must be a one-logit
    ...ForSequenceClassification saved with its tokenizer, as train.py saves it. classifier_pooling (cls, mean)
    overrides the pooling of models with that setting (ModernBERT); else each pools as its config says."""
    path = Path(name_or_path)
    if not path.exists() and path.parent != Path(".") and path.parent.is_dir():
        raise InputError(f"{name_or_path}: no such folder")  # rather than a hub id: runs/minilm, not org/name
    try:
        with quiet_downloads(hub_id=name_or_path):
            config = AutoConfig.from_pretrained(name_or_path, **({"num_labels": 1} if new_head else {}))
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:  # no such model / not a model transformers knows
        raise InputError(f"{name_or_path}: cannot load model and tokenizer: {one_line(error)}") from None
    if len(tokenizer) < getattr(config, "vocab_size", 0) / 2:  # transformers 5 makes an empty one where none is saved
        found = f"{len(tokenizer)} tokens for {config.vocab_size}"
        raise InputError(f"{name_or_path}: no tokenizer saved with it ({found})")
    architectures = config.architectures or []
    classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    if not new_head and (config.num_labels != 1 or not classifier):
        raise InputError(
            f"{name_or_path}: not a cross-encoder ({', '.join(architectures) or 'no architecture'} with "
            f"{config.num_labels} labels; expected a ...ForSequenceClassification with 1 label, as train.py saves)"
        )
    if classifier_pooling and not hasattr(config, "classifier_pooling"):
        raise InputError(f"--classifier_pooling {classifier_pooling}: {name_or_path} ({config.model_type}) has no such "
                         "setting; only models that have it (ModernBERT) take it")  # fmt: skip
    if classifier_pooling:
        config.classifier_pooling = classifier_pooling
    return tokenizer, config


def load_cross_encoder(name_or_path, new_head=False, parts=None, classifier_pooling=None):
    """-> (model, tokenizer). new_head: a backbone with a fresh head, to train; else a cross-encoder whose every weight
    is in the folder, to score. `parts`: cross_encoder_parts' result, if checked already."""
    tokenizer, config = parts or cross_encoder_parts(name_or_path, new_head, classifier_pooling)
    try:
        with quiet_downloads(hub_id=name_or_path):
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, config=config, output_loading_info=True
            )
    except (OSError, ValueError) as error:
        raise InputError(f"{name_or_path}: cannot load model: {one_line(error)}") from None
    if loading["missing_keys"] and not new_head:
        raise InputError(f"{name_or_path}: no trained weights for {', '.join(sorted(loading['missing_keys']))}")
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Scoring: a pair's score is the logit of the one-logit sequence-classification head. Its sigmoid (sentence-transformers
# CrossEncoder score, the model's relevance probability) ranks the same, but rounds into ties near 1: a run file's 6
# decimals tie every logit above ~13.8, and trec_eval's 32-bit floats every one above ~16.6.


def scores_from_logits(logits):
    return torch.as_tensor(logits).float().reshape(-1).tolist()


PAD_MULTIPLE = 16  # bf16 matrix units (AMX tiles, tensor cores) work in blocks of 16: padding to it is faster


def cpu_only():
    """No CUDA GPU and no Apple GPU: the scripts ask accelerate for the CPU (for several processes a gloo group; for
    the Trainer, --bf16 as CPU autocast)."""
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def fast_dtype(device):
    """bf16 where the hardware multiplies it fast (CUDA GPUs with bf16, CPUs with AMX), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and torch._C._cpu._init_amx() else torch.float32


def bf16_gpu():
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def warn_if_no_gpu_where_one_was_named(training_args):
    """A GPU named in CUDA_VISIBLE_DEVICES that torch cannot see (a wrong id, a CPU build of torch) would leave a run
    training on the CPU for days without a word."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if training_args.use_cpu and named not in ("", "-1") and not torch.cuda.is_available():
        logging.getLogger("train").warning("CUDA_VISIBLE_DEVICES=%s names a GPU, but torch sees none: training on "
                                           "the CPU", named)  # fmt: skip


def to_inference_dtype(model, dtype):
    """The model in `dtype`, but its classification head in fp32.

    A bf16 logit has 8 significant bits: half the candidates of a query would tie. The head's fp32 sum over the
    hidden size gives scores as distinct as fp32 ones at nearly the same cost.
    """
    model = model.to(dtype)
    if dtype != torch.float32 and isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        model.classifier.float().register_forward_pre_hook(lambda _, inputs: tuple(x.float() for x in inputs))
    return model


def token_batches(lengths, batch_tokens):
    """Indices sorted by length, cut into batches of at most `batch_tokens` padded tokens (one pair at least).

    A token budget rather than a pair count: short pairs go in large batches, long ones in small, and each batch
    pads only to its own longest pair.
    """
    batches, batch = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = -(-lengths[i] // PAD_MULTIPLE) * PAD_MULTIPLE
        if batch and (len(batch) + 1) * padded > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def encode_pairs(tokenizer, pairs, max_length):
    """(query, passage) pairs -> {"input_ids": [...], "token_type_ids": [...] where the model takes them}, one
    unpadded list per pair, as tokenizer(queries, passages, truncation=True, max_length=...) encodes them.

    A fast tokenizer's Rust batch encoder is called directly: tokenizer(...) spends longer building its Python
    BatchEncoding, one pair at a time, than encoding (1.5 of 4.4 s for 43k pairs on 2 cores; the Rust part runs on all
    cores, so on a many-core GPU host the Python part is most of the time).
    """
    if not getattr(tokenizer, "is_fast", False):
        encoded = tokenizer([q for q, _ in pairs], [p for _, p in pairs], truncation=True, max_length=max_length)
        return {k: encoded[k] for k in ("input_ids", "token_type_ids") if k in encoded}
    tokenizer.set_truncation_and_padding(
        PaddingStrategy.DO_NOT_PAD, TruncationStrategy.LONGEST_FIRST, max_length, 0, None, None
    )
    encodings = tokenizer.backend_tokenizer.encode_batch_fast([tuple(pair) for pair in pairs])
    encoded = {"input_ids": [e.ids for e in encodings]}
    if "token_type_ids" in tokenizer.model_input_names:
        encoded["token_type_ids"] = [e.type_ids for e in encodings]
    return encoded


def pad_batch(encoded, rows, pad_token_id, padding_side="right"):
    """The tensors of `rows` of encode_pairs' output, padded to a multiple of PAD_MULTIPLE, with the attention mask.

    What tokenizer.pad does, without its per-example Python overhead (on a GPU it was half the rerank time).
    """
    lengths = np.array([len(encoded["input_ids"][i]) for i in rows])
    width = -(-lengths.max() // PAD_MULTIPLE) * PAD_MULTIPLE
    batch = {}
    for key, values in encoded.items():
        array = np.full((len(rows), width), pad_token_id if key == "input_ids" else 0, dtype=np.int64)
        for row, (i, length) in enumerate(zip(rows, lengths)):
            if padding_side == "left":
                array[row, width - length :] = values[i]
            else:
                array[row, :length] = values[i]
        batch[key] = torch.from_numpy(array)
    positions = np.arange(width)[None, :]
    real = positions >= width - lengths[:, None] if padding_side == "left" else positions < lengths[:, None]
    batch["attention_mask"] = torch.from_numpy(real.astype(np.int64))
    return batch


def collate_pairs(tokenizer):
    """The Trainer's data collator: a batch of tokenized pairs (and labels) padded by pad_batch. A partial, not a
    closure, so that spawned data loader workers can unpickle it."""
    return functools.partial(collate_rows, pad_token_id=tokenizer.pad_token_id, padding_side=tokenizer.padding_side)


def collate_rows(rows, pad_token_id, padding_side):
    encoded = {key: [row[key] for row in rows] for key in rows[0] if key != "labels"}
    batch = pad_batch(encoded, range(len(rows)), pad_token_id, padding_side)
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=torch.float32)
    return batch


@torch.inference_mode()
def score_encoded(model, tokenizer, encoded, batch_tokens=None):
    """Cross-encoder scores (logits) of encode_pairs' output, in input order, in the model's own dtype.

    batch_tokens: padded tokens per forward pass (default 4096 on a CPU, where that fits the caches; 65536 on a GPU).
    """
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cpu":
        from cpu_fast_path import (
            keep_freed_memory,  # imported here: its transformers imports cost a start 1.5 s
        )

        keep_freed_memory()
    batch_tokens = batch_tokens or (65536 if device.type == "cuda" else 4096)
    batches = token_batches([len(ids) for ids in encoded["input_ids"]], batch_tokens)
    logits = []
    for batch_ids in batches:  # the logits stay on the device until the end: a GPU never waits for the CPU's padding
        batch = pad_batch(encoded, batch_ids, tokenizer.pad_token_id, tokenizer.padding_side)
        logits.append(model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).logits.reshape(-1))
    scores = [0.0] * len(encoded["input_ids"])
    order = [i for batch_ids in batches for i in batch_ids]
    for i, score in zip(order, scores_from_logits(torch.cat(logits)) if logits else []):
        scores[i] = score
    return scores


CHUNK_PAIRS = 4096  # pairs scored between two saves of evaluate.py's side file: the most a killed rerank loses


def query_chunks(run):
    """The run's query ids, sorted, cut into chunks of about CHUNK_PAIRS pairs: the unit evaluate.py saves and shares
    out between processes, and reranks() tokenizes ahead."""
    chunks, pairs = [[]], 0
    for query_id in sorted(run):
        if pairs >= CHUNK_PAIRS:
            chunks, pairs = chunks + [[]], 0
        chunks[-1].append(query_id)
        pairs += len(run[query_id])
    return [chunk for chunk in chunks if chunk]


def reranks(model, tokenizer, splits, batch_tokens=None, max_length=512, encode_ahead=None):
    """For each split in turn, its run reranked: every candidate of `split.run` scored with the model.

    encode_ahead (default: on a GPU): a thread tokenizes the next split while the model scores this one (the Rust
    tokenizer lets go of the GIL). On a GPU tokenizing was half the rerank time; on this project's 2-core CPU the
    thread took the model's cores and reranking went 5% slower.
    """

    def encode(split):
        keys = [(query_id, doc_id) for query_id in sorted(split.run) for doc_id in ranking(split.run[query_id])]
        pairs = [(split.queries[query_id], split.corpus[doc_id]) for query_id, doc_id in keys]
        return keys, encode_pairs(tokenizer, pairs, max_length)

    splits = list(splits)
    if encode_ahead is None:
        encode_ahead = next(model.parameters()).device.type != "cpu"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(encode, splits[0]) if encode_ahead and splits else None
        for i, split in enumerate(splits):
            keys, encoded = pending.result() if encode_ahead else encode(split)
            if encode_ahead and i + 1 < len(splits):
                pending = pool.submit(encode, splits[i + 1])
            run = {}
            for (query_id, doc_id), score in zip(keys, score_encoded(model, tokenizer, encoded, batch_tokens)):
                run.setdefault(query_id, {})[doc_id] = score
            yield run


def rerank(model, tokenizer, split, batch_tokens=None, max_length=512):
    """Score every candidate of `split.run` with the model -> a new run."""
    [run] = reranks(model, tokenizer, [split], batch_tokens, max_length)
    return run


# --------------------------------------------------------------------------------------------------------------------
# Metrics, the TREC way.


def relevance_level(qrels):
    """TREC DL counts grade >= 2 as relevant for binary measures when qrels are graded 0-3; binary qrels use 1."""
    return 2 if max((rel for docs in qrels.values() for rel in docs.values()), default=1) > 1 else 1


def default_measures(qrels):
    return measures_at(relevance_level(qrels))


def measures_at(rel):
    """The thesis's measures, binary ones counting relevance >= rel."""
    return [
        ir_measures.nDCG @ 10,
        ir_measures.AP(rel=rel),
        ir_measures.RR(rel=rel) @ 10,
        ir_measures.Rprec(rel=rel),
        ir_measures.P(rel=rel) @ 10,
    ]


def evaluate_run(qrels, run, measures=None):
    """-> ({str(measure): mean}, {query_id: {str(measure): value}}) over every judged query: one the run does not
    answer scores 0 (`trec_eval -c`, and MS MARCO's official MRR@10), so a run cannot gain by leaving out hard queries.
    Queries without judgments are left out.

    Scores are replaced by ranks in trec_eval's tie order first: ir_measures hands some measures (RR@10) to providers
    that break ties differently, and a ranking must have one score.
    """
    measures = measures or default_measures(qrels)
    ranked = {
        query_id: {doc_id: float(-rank) for rank, doc_id in enumerate(ranking(scores))}
        for query_id, scores in run.items()
        if query_id in qrels
    }
    results = ir_measures.calc(measures, qrels, ranked)
    values = {}
    for metric in results.per_query:
        values.setdefault(metric.query_id, {})[str(metric.measure)] = metric.value
    names = [str(m) for m in measures]  # ir_measures' own order follows string hashes, which differ process to process
    per_query = {q: {name: values[q][name] for name in names if name in values[q]} for q in sorted(values)}
    return {str(m): v for m, v in results.aggregated.items()}, per_query
