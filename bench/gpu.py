"""The speed table on a GPU, in bf16, with random-initialised models of the thesis's real shapes (no hub needed).

    python bench/gpu.py --tokenizer TOKENIZER_DIR            # about 5 minutes on one H100
    python bench/gpu.py --tokenizer TOKENIZER_DIR --smoke    # a seconds-long check of the script itself, CPU too

Prints markdown: rerank pairs/s over 43k pairs (TREC DL 2019's size) per backbone; training pairs/s, peak GPU memory
and MFU per backbone and optimizer (train.py's RerankerTrainer); train.py against CrossEncoderTrainer for MiniLM.
bench/gpu.sh adds a 20-step `accelerate launch` with DeepSpeed ZeRO-2 and Lion 8-bit. Pairs are built from
data/demo texts (a query with two passages, about MS MARCO's length), since a GPU machine here reaches no data hub.
"""

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, GteConfig, ModernBertConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from reranker import Split, encode_pairs, pad_batch, query_chunks, read_texts, reranks, score_encoded  # noqa: E402
from reranker import to_inference_dtype  # noqa: E402
from bench import MAX_LENGTH, flops_per_pair, ours_training, st_training, table  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM


def shapes(vocab_size, smoke):
    if smoke:
        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return {"MiniLM-L12-H384": BertConfig(vocab_size=vocab_size, **small)}
    return {
        "MiniLM-L12-H384": BertConfig(vocab_size=vocab_size, hidden_size=384, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=1536),
        "GTE-multilingual-base": GteConfig(vocab_size=vocab_size, type_vocab_size=2),
        "ModernBERT-base": ModernBertConfig(vocab_size=vocab_size, classifier_pooling="cls"),
    }  # fmt: skip


def demo_pairs(n):
    corpus = list(read_texts(REPO / "data/demo/corpus.tsv").values())
    queries = list(read_texts(REPO / "data/demo/queries.train.tsv").values())
    return [(queries[i % len(queries)], f"{corpus[i % len(corpus)]} {corpus[(7 * i + 3) % len(corpus)]}")
            for i in range(n)]  # fmt: skip


def demo_split(n_queries, per_query):
    """A split shaped like TREC DL 2019's rerank (43 queries x 1000 candidates) from demo_pairs' texts."""
    pairs = demo_pairs(n_queries * per_query)
    queries = {f"q{i}": pairs[i * per_query][0] for i in range(n_queries)}
    corpus = {f"d{i}": passage for i, (_, passage) in enumerate(pairs)}
    run = {f"q{i}": {f"d{j}": 0.0 for j in range(i * per_query, (i + 1) * per_query)} for i in range(n_queries)}
    return Split(queries, {}, run, corpus, "demo")


def rerank_like_evaluate(model, tokenizer, split, batch_tokens=None):
    """What evaluate.py does to a split, less the side file: chunks of queries through reranks."""
    chunks = [{query_id: split.run[query_id] for query_id in chunk} for chunk in query_chunks(split.run)]
    return list(reranks(model, tokenizer, [replace(split, run=run) for run in chunks], batch_tokens))


def pinned(pad):
    """pad_batch with its tensors in page-locked memory: a copy from pageable memory waits for the GPU's queue."""
    return lambda *args: {key: tensor.pin_memory() for key, tensor in pad(*args).items()}


def timed(work, *args):
    """-> (seconds, result) of work(*args), the GPU's queue included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def save_random_model(config, tokenizer, folder):
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def mean_tokens(tokenizer, pairs):
    encoded = tokenizer([q for q, _, _ in pairs], [p for _, p, _ in pairs], truncation=True, max_length=MAX_LENGTH)
    return statistics.mean(len(ids) for ids in encoded["input_ids"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a BERT uncased tokenizer folder (vocab 30522)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and counts: checks the script only")
    parser.add_argument("--rerank_only", action="store_true", help="only the reranking table")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    print(f"{name}, torch {torch.__version__}\n")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    steps = 4 if args.smoke else 40
    split = demo_split(4, 50) if args.smoke else demo_split(43, 1000)
    n_pairs = sum(map(len, split.run.values()))
    train_pairs = [(q, p, float(i % 4 == 0)) for i, (q, p) in enumerate(demo_pairs(16 * (steps + 10)))]
    tmp = Path(tempfile.mkdtemp())

    rerank_rows, train_rows = [], []
    for model_name, config in shapes(tokenizer.vocab_size, args.smoke).items():
        folder = tmp / model_name
        save_random_model(config, tokenizer, folder)
        # 1. Reranking: evaluate.py's path (bf16 with an fp32 head, token-budget batches)
        model = AutoModelForSequenceClassification.from_pretrained(folder).to(device)
        model = to_inference_dtype(model, torch.bfloat16)
        rerank_like_evaluate(model, tokenizer, demo_split(2, 1000))  # warm-up: kernels, allocator
        rate = n_pairs / timed(rerank_like_evaluate, model, tokenizer, split)[0]
        # Where the time goes: the tokenizer alone, and the model alone on pairs tokenized beforehand
        pairs = [(split.queries[q], split.corpus[d]) for q in split.run for d in split.run[q]]
        tokenizing, encoded = timed(encode_pairs, tokenizer, pairs, 512)
        scoring = timed(score_encoded, model, tokenizer, encoded)[0]
        rerank_rows.append([model_name, "default", f"{n_pairs}", f"{rate:,.0f}", f"{tokenizing:.2f} s",
                            f"{scoring:.2f} s ({n_pairs / scoring:,.0f} pairs/s)"])  # fmt: skip
        if model_name.startswith("MiniLM") and not args.smoke:  # is the default token budget the best one?
            for batch_tokens in (16384, 32768, 131072):
                rate = n_pairs / timed(rerank_like_evaluate, model, tokenizer, split, batch_tokens)[0]
                rerank_rows.append([model_name, f"{batch_tokens}", f"{n_pairs}", f"{rate:,.0f}", "", ""])
        if model_name.startswith("MiniLM"):  # two paths evaluate.py does not take, measured before it would
            if device == "cuda":
                with mock.patch("reranker.pad_batch", pinned(pad_batch)):
                    rate = n_pairs / timed(rerank_like_evaluate, model, tokenizer, split)[0]
                rerank_rows.append([f"{model_name}, pinned batches", "default", f"{n_pairs}", f"{rate:,.0f}", "", ""])
            compiled = torch.compile(model, dynamic=True)
            warm_up = timed(rerank_like_evaluate, compiled, tokenizer, split)[0]  # compiling, and recompiling
            rate = n_pairs / timed(rerank_like_evaluate, compiled, tokenizer, split)[0]
            scoring = timed(score_encoded, compiled, tokenizer, encoded)[0]
            name = f"{model_name}, torch.compile(dynamic=True) ({warm_up:.0f} s first pass)"
            rerank_rows.append([name, "default", f"{n_pairs}", f"{rate:,.0f}", "",
                                f"{scoring:.2f} s ({n_pairs / scoring:,.0f} pairs/s)"])  # fmt: skip
            del compiled
        del model
        if args.rerank_only:
            continue
        # 2. Training with each optimizer: pairs/s, peak memory, MFU (forward + backward = 3 forwards)
        flops = flops_per_pair(AutoModelForSequenceClassification.from_config(config), mean_tokens(tokenizer, train_pairs))
        for optim in ("adamw", "lion --lion_bits 32", "lion --lion_bits 8"):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rate, _ = ours_training(str(folder), train_pairs, steps, device == "cuda", tmp, optim)
            peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            mfu = 3 * flops * rate / peak_flops
            train_rows.append([model_name, optim.replace(" --lion_bits ", " "), f"{rate:,.0f}", f"{peak_gib:.2f}",
                               f"{mfu:.1%}"])  # fmt: skip
            if device == "cuda":
                torch.cuda.empty_cache()
    print("## Reranking as evaluate.py does, bf16 (fp32 head), token-budget batches, tokenizing ahead\n")
    print(table(["model (random init)", "batch tokens", "pairs", "pairs/s", "tokenizing alone", "model alone"],
                rerank_rows))  # fmt: skip
    if args.rerank_only:
        return
    print("\n## Training, bf16 autocast, batch 16, max length 256\n")
    print(table(["model (random init)", "optimizer", "pairs/s", "peak GPU memory (GiB)", "MFU"], train_rows))

    folder = tmp / "MiniLM-L12-H384"
    ours = ours_training(str(folder), train_pairs, steps, device == "cuda", tmp)[0]
    theirs = st_training(str(folder), train_pairs, steps, device == "cuda", tmp)[0]
    print("\n## MiniLM-L12 training: train.py vs CrossEncoderTrainer (bf16, AdamW, batch 16)\n")
    print(table(["trainer", "pairs/s", "ratio"], [["CrossEncoderTrainer", f"{theirs:,.0f}", "1.00x"],
                                                  ["train.py", f"{ours:,.0f}", f"{ours / theirs:.2f}x"]]))  # fmt: skip
    save_random_model(shapes(tokenizer.vocab_size, args.smoke)["MiniLM-L12-H384"], tokenizer, REPO / ".gpu/minilm")


if __name__ == "__main__":
    main()
