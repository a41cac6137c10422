"""Read this to change how a run is validated while it trains: the Trainer's evaluation reranks a data spec's
candidates (MRR@10, nDCG@10, as evaluate.py scores them), or scores pairs held out of the training data (eval_loss).
"""

import random

import datasets
import ir_measures

from cli import InputError
from data_specs import load_data
from reranker import encode_pairs, evaluate_run, relevance_level, scores_from_logits

HOLD_OUT_SEED = 0  # the same held-out pairs for every --seed, so their evaluation losses compare


def tokenize_pairs(pairs, tokenizer, max_length):
    """(query, passage, label) pairs tokenized once (reranker.encode_pairs, as evaluate.py does), padded per batch by
    reranker.collate_pairs."""
    encoded = encode_pairs(tokenizer, [(q, p) for q, p, _ in pairs], max_length)
    return datasets.Dataset.from_dict({**encoded, "labels": [label for _, _, label in pairs]})


def validation_set(spec, top_k, tokenizer, max_length):
    """Every candidate of the data as a pair, sorted by length -> (dataset, (query_id, doc_id) per row, qrels)."""
    split = load_data(spec, top_k)
    rel = relevance_level(split.qrels)
    keys = [(q, d) for q in sorted(split.run) if q in split.qrels for d in split.run[q]]
    if not keys:
        raise InputError(f"{spec}: no query with candidates is judged in its qrels")
    dataset = tokenize_pairs([(split.queries[q], split.corpus[d], float(split.qrels[q].get(d, 0) >= rel))
                              for q, d in keys], tokenizer, max_length)  # fmt: skip
    order = length_order(dataset)
    return dataset.select(order), [keys[i] for i in order], split.qrels


def length_order(dataset):
    """Row indices shortest first: evaluation batches of similar lengths pad little."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def rerank_metrics(keys, qrels):
    """compute_metrics for the Trainer: the eval predictions rerank the validation candidates."""
    mrr, ndcg = ir_measures.RR(rel=relevance_level(qrels)) @ 10, ir_measures.nDCG @ 10

    def compute_metrics(prediction):
        run = {}
        for (query_id, doc_id), score in zip(keys, scores_from_logits(prediction.predictions)):
            run.setdefault(query_id, {})[doc_id] = score
        aggregate, _ = evaluate_run(qrels, run, [mrr, ndcg])
        return {"mrr@10": aggregate[str(mrr)], "ndcg@10": aggregate[str(ndcg)]}

    return compute_metrics


def hold_out(examples, n, seed=HOLD_OUT_SEED):
    """-> (the training examples, `n` others drawn at random for the evaluation loss), both in their order."""
    if n >= len(examples):
        raise InputError(f"--eval_pairs: the training data has only {len(examples)} examples to hold out {n} of")
    held_out = set(random.Random(seed).sample(range(len(examples)), n))
    return [e for i, e in enumerate(examples) if i not in held_out], [examples[i] for i in sorted(held_out)]
