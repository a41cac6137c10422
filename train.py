"""Fine-tune a cross-encoder reranker with binary cross-entropy, optimised by AdamW or Lion (bitsandbytes).

The thesis settings are the defaults: `--model minilm|gte|modernbert` picks Table 4.1 (model, learning rate, max
length, schedule), and Table 4.2 (batch 16, 3 epochs, weight decay 0.01, 1000 warmup steps, grad clip 1.0, AdamW betas
(0.9, 0.999) eps 1e-8, Lion betas (0.9, 0.99)) holds for all. Any explicit flag beats the preset; every
`TrainingArguments` flag works.

    # one GPU, or the CPU
    python train.py --model minilm --optim adamw --output_dir runs/minilm-adamw
    # all local GPUs with DeepSpeed ZeRO-2 (accelerate_config.yaml -> ds_config.json)
    accelerate launch --config_file accelerate_config.yaml train.py --model gte --optim lion
    # quick offline run on local data
    python train.py --model path/to/model --optim lion --train_data ../shared/data/msmarco-sample:train \
        --eval_data ../shared/data/msmarco-sample:test --negatives_per_query 3 --max_steps 60 --warmup_steps 6

Training data (`--train_data`): `sentence-transformers/msmarco` from the hub (default: its first 1 M triplets, one
positive and one negative pair each, 2 M pairs as in the thesis code, which held out 10,000 of them for the evaluation
loss), a local triples file `query<TAB>positive<TAB>negative`, or a local split `DIR:SPLIT` (positives from the
qrels, negatives from the run's other candidates).
"""

import functools
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path

import datasets
import ir_measures
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, get_last_checkpoint

from model_card import CheckpointCards, write_trainer_card
from reranker import (
    PRESETS,
    InputError,
    cpu_only,
    evaluate_run,
    exit_on_input_error,
    keep_freed_memory,
    leave_process_group,
    load_split,
    one_line,
    preset_for,
    quiet_downloads,
    ranking,
    read_fields,
    relevance_level,
    scores_from_logits,
    write_atomic,
)

logger = logging.getLogger("train")

MSMARCO_HUB = "sentence-transformers/msmarco"  # the thesis code's training data: configs triplets, corpus, queries
HUB_TRAIN_PAIRS = 2_000_000  # the thesis code's dataset_size: its first 1 M triplets (the hub has ~400 M)
HUB_EVAL_PAIRS = 10_000  # the thesis code's train_test_split(test_size=10_000) of those pairs: its evaluation loss
EVAL_PAIRS_STEPS = 0.05  # held-out pairs are cheap to evaluate: every 5% of the run, a curve of 20 points
HOLD_OUT_SEED = 0  # the same held-out pairs for every run, whatever its --seed, so their evaluation losses compare
STOP_NOTE = "saved_by_a_stop.txt"  # in a checkpoint saved only because a signal stopped the run: removed when it ends


@dataclass
class ScriptArguments:
    model: str = field(
        default="minilm",
        metadata={"help": f"Thesis preset ({', '.join(PRESETS)}) or any hub id / local model folder."},
    )
    train_data: str = field(
        default=MSMARCO_HUB,
        metadata={"help": f"'{MSMARCO_HUB}' (hub), a triples TSV file, or a local split DIR:SPLIT."},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "Validation split DIR:SPLIT: reranked at each evaluation (MRR@10, nDCG@10)."}
    )
    eval_top_k: int = field(default=100, metadata={"help": "Candidates per validation query to rerank."})
    eval_pairs: int | None = field(
        default=None,
        metadata={"help": f"Hold out this many training pairs (the same for every --seed) and log their BCE loss as "
                          f"eval_loss every 5%% of the run (default: {HUB_EVAL_PAIRS:,} of {MSMARCO_HUB} without "
                          "--eval_data, as the thesis code held out, at most a tenth of --max_train_pairs; else "
                          "none). Not with --eval_data."},
    )  # fmt: skip
    max_length: int | None = field(default=None, metadata={"help": "Max tokens per pair (preset: 512 or 8192)."})
    max_train_pairs: int | None = field(
        default=None,
        metadata={"help": f"Use at most this many training pairs (default: {HUB_TRAIN_PAIRS:,} of {MSMARCO_HUB}, "
                          "the thesis code's 1 M triplets; all pairs of other data)."},
    )  # fmt: skip
    negatives_per_query: int | None = field(
        default=None, metadata={"help": "DIR:SPLIT data: top-ranked non-relevant candidates per query (default all)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete a non-empty output_dir first (it is never overwritten otherwise)."}
    )
    download_only: bool = field(
        default=False,
        metadata={"help": "Fetch the model and the training data into the local caches and stop, writing nothing: "
                          "for GPU nodes without network, which then train with HF_HUB_OFFLINE=1."},
    )  # fmt: skip

    def __post_init__(self):
        for name in ("eval_top_k", "max_length", "max_train_pairs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name} must be at least 1")
        for name in ("negatives_per_query", "eval_pairs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InputError(f"--{name} must be 0 or more")


@dataclass
class RerankerTrainingArguments(TrainingArguments):
    """TrainingArguments with the thesis's shared settings (Table 4.2) as defaults, and the two optimizers."""

    optim: str = field(default="adamw", metadata={"help": "adamw or lion.", "choices": ["adamw", "lion"]})
    lion_bits: int = field(default=8, metadata={"help": "Lion state: 8 (Lion8bit) or 32 (Lion32bit).", "choices": [8, 32]})
    lion_beta1: float = field(default=0.9, metadata={"help": "Lion beta1 (thesis Table 4.2)."})
    lion_beta2: float = field(default=0.99, metadata={"help": "Lion beta2 (thesis Table 4.2)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size (thesis Table 4.2: 16)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size for evaluation."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (thesis Table 4.2: 3)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (thesis Table 4.2: 0.01)."})
    warmup_steps: float = field(default=1000, metadata={"help": "Linear warmup steps (thesis Table 4.2: 1000)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (thesis Table 4.2: 1.0)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (thesis Table 4.2)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (thesis Table 4.2)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon (thesis Table 4.2)."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint at each epoch ('steps' with save_steps)."})
    logging_steps: float = field(default=50, metadata={"help": "Log loss, lr and grad norm every N steps."})
    # Batches of pairs of similar length pad less; the order within the 50-batch groups stays random.
    train_sampling_strategy: str = field(
        default="group_by_length", metadata={"help": "random, sequential, group_by_length or batch_rebalance."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "Every weight of the cross-encoder gets a gradient each step, so multi-GPU DDP need not "
                          "search the autograd graph for unused ones at every step (the Trainer's default would)."},
    )  # fmt: skip
    fast_cpu_dropout: bool = field(
        default=True,
        metadata={"help": "On the CPU: dropout from 16 random bits per element (p rounded to 1/65536) and attention "
                          "dropout without SDPA's float32 fallback; ~1.4x faster steps. No effect on GPUs."},
    )  # fmt: skip

    def __post_init__(self):
        # Map our two names to the Trainer's own, so its optimizer-specific code paths see what runs.
        # Lion's betas are not the Trainer's (it would use adam_beta*): RerankerTrainer builds Lion itself.
        self.optim = {"adamw": "adamw_torch_fused", "lion": f"lion_{self.lion_bits}bit"}.get(self.optim, self.optim)
        super().__post_init__()


# --------------------------------------------------------------------------------------------------------------------
# Arguments: the preset's values become the parser's defaults, so --help shows them and an explicit flag wins.


def bad_flag(message):
    raise InputError(f"{message} (see python train.py --help)")


def parse_args(argv):
    parser = HfArgumentParser((ScriptArguments, RerankerTrainingArguments))
    parser.error = bad_flag
    first, _ = parser.parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])  # to find the preset
    preset = preset_for(first.model)
    run_name = f"{Path(first.model).name}-{first.optim}"
    defaults = {
        "learning_rate": preset.learning_rate,
        "lr_scheduler_type": preset.lr_scheduler_type,
        "max_length": preset.max_length,
        "output_dir": f"runs/{run_name}",
        "run_name": run_name,
    }
    if first.eval_data and first.eval_pairs:
        raise InputError("--eval_pairs and --eval_data: one validation set at a time")
    eval_pairs = first.eval_pairs
    if eval_pairs is None and first.train_data == MSMARCO_HUB and not first.eval_data:
        # the thesis code's 10,000, but at most a tenth of the pairs, so a short run (--max_train_pairs 5000) trains
        eval_pairs = min(HUB_EVAL_PAIRS, (first.max_train_pairs or HUB_TRAIN_PAIRS) // 10)
    eval_pairs = eval_pairs or 0
    defaults["eval_pairs"] = eval_pairs
    if first.eval_data:
        defaults["eval_strategy"] = "epoch"
    elif eval_pairs:
        defaults.update(eval_strategy="steps", eval_steps=EVAL_PAIRS_STEPS)
    if cpu_only():
        defaults["use_cpu"] = True  # CPU only: lets --bf16 run (as autocast; fast on CPUs with AMX)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if deepspeed and torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not first.fp16:
        defaults["bf16"] = True  # accelerate_config.yaml: DeepSpeed in bf16 (ds_config.json's "auto")
    parser.set_defaults(**defaults)
    try:
        script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks of flag combinations
        raise InputError(str(error).splitlines()[0]) from None
    if training_args.eval_strategy != "no" and not (script_args.eval_data or script_args.eval_pairs):
        raise InputError(
            f"--eval_strategy {training_args.eval_strategy.value} needs --eval_data (a DIR:SPLIT) or --eval_pairs"
        )
    metric = training_args.metric_for_best_model
    metrics = ("loss", "mrr@10", "ndcg@10") if script_args.eval_data else ("loss",)  # held-out pairs: a loss only
    if metric and metric.removeprefix("eval_") not in metrics:
        raise InputError(f"--metric_for_best_model {metric}: not one of {', '.join(metrics)}")
    return script_args, training_args, preset


# --------------------------------------------------------------------------------------------------------------------
# Training pairs: (query, passage, label) from one of three sources.


def pairs_from_split(spec, negatives_per_query=None):
    """Positives from the qrels; negatives = the run's candidates not judged relevant, best-ranked first."""
    split = load_split(spec, need_qrels_text=True)
    rel = relevance_level(split.qrels)
    pairs = []
    for query_id in sorted(split.qrels):
        positives = [d for d, r in split.qrels[query_id].items() if r >= rel]
        if not positives:
            continue
        judged = split.qrels[query_id]
        negatives = [d for d in ranking(split.run.get(query_id, {})) if judged.get(d, 0) < 1][:negatives_per_query]
        query = split.queries[query_id]
        pairs += [(query, split.corpus[d], 1.0) for d in positives]
        pairs += [(query, split.corpus[d], 0.0) for d in negatives]
    if not any(label for _, _, label in pairs):
        raise InputError(f"{spec}: no query has a relevant document in its qrels (relevance >= {rel})")
    return pairs


def pairs_from_triples(path):
    pairs = []
    for _, (query, positive, negative) in read_fields(path, 3):
        pairs += [(query, positive, 1.0), (query, negative, 0.0)]
    return pairs


def hub_datasets():
    """The thesis's data, sentence-transformers/msmarco: its configs triplets (of ids), corpus and queries, downloaded
    on first use and memory-mapped from the datasets cache."""
    try:
        with quiet_downloads():
            configs = ("triplets", "corpus", "queries")
            return [datasets.load_dataset(MSMARCO_HUB, config, split="train") for config in configs]
    except OSError as error:  # offline: ConnectionError
        raise InputError(f"{MSMARCO_HUB}: cannot load it from the hub: {one_line(error)}") from None


def pairs_from_hub(max_pairs):
    """The first max_pairs / 2 triplets of the hub data as (query, passage, label) pairs, with their texts."""
    triplets, corpus, queries = hub_datasets()
    first = triplets.with_format("arrow")[: math.ceil(max_pairs / 2)]
    query_ids, positive_ids, negative_ids = (first[c].to_pylist() for c in ("query_id", "positive_id", "negative_id"))
    passage = texts_by_id(corpus, "passage_id", "passage", positive_ids + negative_ids)
    query = texts_by_id(queries, "query_id", "query", query_ids)
    pairs = []
    for query_id, positive_id, negative_id in zip(query_ids, positive_ids, negative_ids):
        pairs += [(query[query_id], passage[positive_id], 1.0), (query[query_id], passage[negative_id], 0.0)]
    return pairs


def texts_by_id(dataset, id_column, text_column, ids):
    """{id: text} of a hub dataset's rows whose id is one of `ids`, picked out in Arrow: only those texts become Python
    strings. The whole corpus's 8.8 M passages, read into a dict, took minutes and GBs in every training process."""
    table = dataset.with_format("arrow")[:]  # memory-mapped, nothing read yet
    wanted = pa.array(list(set(ids)), type=table[id_column].type)
    rows = table.filter(pc.is_in(table[id_column], value_set=wanted))
    return dict(zip(rows[id_column].to_pylist(), rows[text_column].to_pylist()))


def load_pairs(source, max_pairs=None, negatives_per_query=None):
    if source == MSMARCO_HUB:
        pairs = pairs_from_hub(max_pairs or HUB_TRAIN_PAIRS)
    elif Path(source).is_file():
        pairs = pairs_from_triples(source)
    elif ":" in source:
        pairs = pairs_from_split(source, negatives_per_query)
    else:
        raise InputError(f"{source}: not a file, not DIR:SPLIT and not {MSMARCO_HUB}")
    if not pairs:
        raise InputError(f"{source}: no training pairs in it")
    return pairs[:max_pairs] if max_pairs else pairs


def hold_out(pairs, n, seed=HOLD_OUT_SEED):
    """-> (the training pairs, `n` others drawn at random for the evaluation loss), as the thesis code's
    train_test_split(test_size=10_000) held them out; the pairs keep their order."""
    if n >= len(pairs):
        raise InputError(f"--eval_pairs {n}: the training data has only {len(pairs)} pairs; hold out fewer (0: none)")
    held_out = set(random.Random(seed).sample(range(len(pairs)), n))
    return [p for i, p in enumerate(pairs) if i not in held_out], [pairs[i] for i in sorted(held_out)]


def tokenize_pairs(pairs, tokenizer, max_length):
    """Tokenize once; padding happens per batch in the collator."""
    dataset = datasets.Dataset.from_dict(
        {"query": [q for q, _, _ in pairs], "passage": [p for _, p, _ in pairs], "labels": [y for _, _, y in pairs]}
    )
    return dataset.map(
        lambda batch: tokenizer(batch["query"], batch["passage"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["query", "passage"],
        desc="tokenize",
    )


def validation_set(spec, top_k, tokenizer, max_length):
    """Every candidate of the split as a pair (label: judged relevant), sorted by length so eval batches pad little.

    Returns the dataset, the (query_id, doc_id) of each row in that order, and the qrels.
    """
    split = load_split(spec, top_k=top_k)
    rel = relevance_level(split.qrels)
    keys = [(q, d) for q in sorted(split.run) if q in split.qrels for d in split.run[q]]
    if not keys:
        raise InputError(f"{spec}: no query with candidates is judged in its qrels")
    pairs = [(split.queries[q], split.corpus[d], float(split.qrels[q].get(d, 0) >= rel)) for q, d in keys]
    dataset = tokenize_pairs(pairs, tokenizer, max_length)
    order = length_order(dataset)
    return dataset.select(order), [keys[i] for i in order], split.qrels


def length_order(dataset):
    """Row indices shortest first: evaluation batches of similar lengths pad little."""
    lengths = [len(ids) for ids in dataset["input_ids"]]  # one column read, not one row read per pair
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


# --------------------------------------------------------------------------------------------------------------------
# The CPU fast path. On the CPU, torch draws each dropout mask element from its Mersenne Twister through a Bernoulli
# (a quarter of a bf16 training step on this project's CPU), and SDPA with attention dropout falls back to a math path
# in float32. On GPUs neither is slow, and nothing here is used there.


class _FastDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        # One 64-bit draw serves four elements: each is dropped when its 16 bits fall below p * 2^16.
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n]
        dropped = round(p * 2**16)
        mask = (bits.view(x.shape) >= dropped - 2**15).to(x.dtype).mul_(2**16 / (2**16 - dropped))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_dropout(x, p, training=True):
    """F.dropout with p rounded to 1/65536, from a quarter of the generator's draws (CPU tensors)."""
    return _FastDropout.apply(x, p) if training and p > 0 else x


class FastDropout(nn.Dropout):
    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


def cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, but training with attention dropout runs the same math in the compute dtype, with fast_dropout."""
    if not (module.training and dropout > 0) or getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # sdpa_mask's: True = attend
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = fast_dropout(scores.softmax(-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("cpu_fast", cpu_attention)
AttentionMaskInterface.register("cpu_fast", sdpa_mask)


def use_cpu_fast_path(model):
    """Swap the model's dropouts for FastDropout and its attention for cpu_attention (weights and outputs alike)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p))
    model.set_attn_implementation("cpu_fast")


# --------------------------------------------------------------------------------------------------------------------
# Loss and optimizer.


def bce_loss(outputs, labels, num_items_in_batch=None):
    """Binary cross-entropy on the one logit (num_labels=1 with float labels would make HF use MSE), averaged over the
    pairs of the whole optimizer step.

    In training the Trainer passes num_items_in_batch, the pairs of every accumulation step and process, and takes a
    loss function's result as already averaged over them: a per-batch mean would come out multiplied by the
    accumulation steps and the process count (loss, gradient norm and clipping alike).
    """
    logits, labels = outputs.logits.float().reshape(-1), labels.float().reshape(-1)
    if num_items_in_batch is None:  # called outside the Trainer's loops
        return F.binary_cross_entropy_with_logits(logits, labels)
    if torch.is_tensor(num_items_in_batch):  # under DataParallel one count per GPU, and the Trainer multiplies the
        num_items_in_batch = num_items_in_batch.sum()  # loss by the GPU count: dividing by their sum undoes it
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / num_items_in_batch


class NonFiniteLossError(RuntimeError):
    pass


class LogOptimizerCallback(TrainerCallback):
    """Name the optimizer that really steps, through every wrapper (DeepSpeed would replace it if its config had one)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        chain = [optimizer]
        while hasattr(chain[-1], "optimizer"):
            chain.append(chain[-1].optimizer)
        logger.info("optimizer stepping: %s", " > ".join(type(o).__name__ for o in chain))


class StopOnSignal(TrainerCallback):
    """SIGTERM (a batch system's time limit or preemption, `kill`, run_all.sh stopping its runs) or Ctrl-C: a checkpoint
    at the end of the step under way, then stop. A resume then loses one step, not everything since the last
    checkpoint (up to an epoch: hours). Batch systems send SIGKILL some 30 s after SIGTERM, so no evaluation is started
    on the way out. Several processes agree on the step: they save the checkpoint together.

    Not the Trainer's --enable_jit_checkpoint: it saves before the optimizer step, after that step's dropout was drawn
    (no exact resume), and then lets the run end as if finished.
    """

    def __init__(self):
        self.signal = None  # the first signal received
        self.stopped_at = None  # the step a signal stopped training after (None: it ran to its last step)
        self.saved_anyway = False  # whether the save strategy saves that step too (an epoch's end, a --save_steps)

    @contextmanager
    def catching_signals(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        handlers = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (nohup, `&`)
            handlers[signal.SIGINT] = signal.default_int_handler
        for signum in handlers:
            signal.signal(signum, self.received)
        try:
            yield
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def received(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # Ctrl-C twice: now, without a checkpoint
        if self.signal is None:  # a batch system and a launcher may each send one
            self.signal = signal.Signals(signum)
            logger.warning("%s: saving a checkpoint at the end of this step, then stopping", self.signal.name)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signal is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor(float(stop), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = flag.item() > 0
            self.signal = self.signal or (signal.SIGTERM if stop else None)  # another process received it
        if stop and state.global_step < state.max_steps:  # at the last step the run ends (and saves) as it would
            epoch_end = args.save_strategy == SaveStrategy.EPOCH and float(state.epoch).is_integer()
            self.saved_anyway = control.should_save or epoch_end  # the Trainer's flow callback has set `steps` saves
            control.should_save, control.should_evaluate, control.should_training_stop = True, False, True
            self.stopped_at = state.global_step

    def checkpoint(self, output_dir):
        """The stop's checkpoint folder, as the Trainer names it."""
        return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_at}"

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at == state.global_step and not self.saved_anyway and state.is_world_process_zero:
            note = self.checkpoint(args.output_dir) / STOP_NOTE
            note.write_text(f"{self.signal.name} stopped the run after this step. This checkpoint is for resuming "
                            "only: train.py removes it when the run finishes.\n")  # fmt: skip

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint is saved; the epoch's evaluation would delay the exit
            control.should_save = control.should_evaluate = False


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def leave_stop_signals_to_the_main_process(loader):
    """Make a data loader's workers (`--dataloader_num_workers`) ignore SIGTERM and SIGINT. A batch system signals
    every process of a job, run_all.sh its run's process group and Ctrl-C the terminal's foreground group, and torch
    fails the main process at once when a worker dies, before StopOnSignal's checkpoint. The main process ends its
    workers itself, and a worker whose main process is gone ends too (torch's watchdog).

    The workers start (in `_get_iterator`) with both signals blocked in this thread, and ignore them from their
    worker_init_fn on: a spawned worker (the start method on macOS; `forkserver`, Python 3.14's default on Linux,
    starts them alike) imports torch for seconds first, and a TERM to the whole group in that time killed it; the main
    process then hung writing to the dead worker (spawn) or failed (forkserver). A blocked signal stays blocked across
    fork and exec. The main process loses nothing: another of its threads takes the signal, or this one once it
    unblocks.
    """
    get_iterator = loader._get_iterator
    start_method = (loader.multiprocessing_context or multiprocessing).get_start_method()

    def started_with_stop_signals_blocked():
        if start_method != "fork":
            # multiprocessing's resource tracker, which the first such worker starts, unblocks both signals after
            # its own start (CPython's fix of bpo-33613): started first, it leaves the workers' mask alone
            resource_tracker.ensure_running()
        blocked_before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked_before)

    loader._get_iterator = started_with_stop_signals_blocked
    loader.worker_init_fn = functools.partial(ignore_stop_signals, loader.worker_init_fn)  # picklable, for spawn


def ignore_stop_signals(worker_init_fn, worker_id):
    """A worker's start under leave_stop_signals_to_the_main_process, then the loader's own worker_init_fn."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # which also drops one that came while they were blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """The Trainer's length-grouped order, drawn from seed + epoch. The Trainer's own draws from the global RNG, which
    a resume restores only after it has drawn the interrupted epoch's order: pairs would be trained twice or never."""

    def __init__(self, sampler, seed):
        super().__init__(sampler.batch_size, lengths=sampler.lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class SamplerEpochCallback(TrainerCallback):
    """Tell the sampler which epoch begins. accelerate's set_epoch does not reach it under several processes once a
    resume has wrapped the batches to skip (DataLoaderShard > SkipBatchSampler > BatchSamplerShard > ... > sampler)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(math.floor(state.epoch))  # whole epochs done, as restored from a checkpoint


class RerankerTrainer(Trainer):
    """The Trainer with BCE and the thesis optimizers; the loop, schedule, checkpoints and logging are the Trainer's.

    AdamW is the Trainer's own (`adamw_torch_fused`). Lion is bitsandbytes' Lion8bit / Lion32bit with Lion's betas.
    The Trainer's parameter groups stay: no weight decay for biases and LayerNorm weights under either optimizer.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, compute_loss_func=bce_loss, **kwargs)
        self.add_callback(LogOptimizerCallback())
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)
        self.add_callback(CheckpointCards(self))  # each checkpoint gets its own model card
        if self.args.device.type == "cpu":
            keep_freed_memory()
            if self.args.fast_cpu_dropout:
                use_cpu_fast_path(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.args.optim in ("lion_8bit", "lion_32bit"):
            import bitsandbytes as bnb

            lion = bnb.optim.Lion8bit if self.args.optim == "lion_8bit" else bnb.optim.Lion32bit
            self.optimizer_cls_and_kwargs = (
                lion,
                {"lr": self.args.learning_rate, "betas": (self.args.lion_beta1, self.args.lion_beta2)},
            )
        return super().create_optimizer(model)

    def create_model_card(self, **kwargs):
        # push_to_hub calls this to write README.md: our card (model_card.py), not the Trainer's generic one
        if self.is_world_process_zero():
            write_trainer_card(self, self.args.output_dir)

    def train(self, *args, **kwargs):
        with self.stop_on_signal.catching_signals():
            return super().train(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = EpochSeededLengthGroupedSampler(sampler, seed)
            self.pop_callback(SamplerEpochCallback)
            self.add_callback(SamplerEpochCallback(sampler))
        return sampler

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs
        )
        if self.state.global_step >= max_steps:
            # Resumed from a checkpoint at --max_steps (a run killed while saving its final model): the Trainer
            # checks max_steps only after a step, so it would train one step more than asked. Nothing is left.
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    def _get_dataloader(self, *args, **kwargs):
        dataloader = super()._get_dataloader(*args, **kwargs)
        loader = getattr(dataloader, "base_dataloader", dataloader)  # the one that accelerate's wrapper iterates
        if loader.num_workers > 0 and hasattr(signal, "pthread_sigmask"):  # not on Windows
            leave_stop_signals_to_the_main_process(loader)
        return dataloader

    def _get_eval_sampler(self, eval_dataset):
        # Keep the validation set's order (already sorted by length): rerank_metrics maps predictions back to
        # (query, doc) by position, and group_by_length would shuffle evaluation batches too.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; stopped without saving "
                f"(the last good checkpoint in {self.args.output_dir} stays). Try a lower --learning_rate."
            )
        return result


# --------------------------------------------------------------------------------------------------------------------


def remove_stop_checkpoints(output_dir):
    """A finished run's checkpoints saved only by a stop (mid-epoch): they served its resume, and would otherwise
    cost disk and stand beside the epoch checkpoints as runs of their own (`evaluate.py --models runs/*/checkpoint-*`).
    Each is renamed before it is deleted, so a kill on the way leaves no half a checkpoint under its name."""
    for note in sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*/{STOP_NOTE}")):
        doomed = note.parent.with_name(f".{note.parent.name}.removing")
        shutil.rmtree(doomed, ignore_errors=True)  # left by a kill during an earlier removal
        shutil.rmtree(note.parent.rename(doomed))
        logger.info("Removed %s: saved by a stop to resume from, and the run has finished", note.parent)


def prepare_output_dir(script_args, training_args, resuming=False):
    """Never overwrite a finished or running experiment unless asked; resuming (from a checkpoint found) is asked."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or not any(output_dir.iterdir()) or resuming:
        return
    if not script_args.overwrite_output_dir:
        if get_last_checkpoint(output_dir) is None:  # e.g. a run that failed before its first checkpoint
            raise InputError(f"{output_dir}: not empty, and no checkpoint to resume from; pass --overwrite_output_dir")
        raise InputError(
            f"{output_dir}: not empty; pass --resume_from_checkpoint true to continue, or --overwrite_output_dir"
        )
    if training_args.process_index == 0:
        shutil.rmtree(output_dir)


def resume_checkpoint(training_args):
    """--resume_from_checkpoint: a checkpoint folder, or 'true'/'last' for the newest in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", ""):
        return None
    if value.lower() in ("true", "last", "yes"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise InputError(f"{training_args.output_dir}: no checkpoint to resume from")
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise InputError(f"{value}: not a checkpoint folder (no trainer_state.json)")
    return value


def warn_if_no_gpu_where_one_was_named(training_args):
    """A GPU named in CUDA_VISIBLE_DEVICES that torch cannot see (a wrong id, a CPU build of torch) would leave a run
    training on the CPU for days without a word."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if training_args.use_cpu and named not in ("", "-1") and not torch.cuda.is_available():
        logger.warning("CUDA_VISIBLE_DEVICES=%s names a GPU, but torch sees none: training on the CPU", named)


def configure_wandb(training_args, resuming):
    """With report_to wandb but no account configured, log offline instead of failing. A resumed run continues its
    W&B run (its id is in run_config.json) rather than starting another at each resume."""
    if "wandb" not in (training_args.report_to or []):
        return
    os.environ.setdefault("WANDB_PROJECT", "lion-vs-adamw-rerankers")
    if "WANDB_RUN_ID" not in os.environ:
        try:
            config = json.loads((Path(training_args.output_dir) / "run_config.json").read_text()) if resuming else {}
        except (OSError, ValueError):  # none or unreadable: a new W&B run
            config = {}
        if config.get("wandb_run_id"):
            os.environ.setdefault("WANDB_RESUME", "allow")
        os.environ["WANDB_RUN_ID"] = config.get("wandb_run_id") or secrets.token_hex(6)
    netrc = Path.home() / ".netrc"
    logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not logged_in and "WANDB_MODE" not in os.environ:
        logger.warning("wandb: no API key configured, logging offline (WANDB_MODE=offline)")
        os.environ["WANDB_MODE"] = "offline"


def load_model(name_or_path):
    """A one-logit sequence-classification head on the backbone's [CLS] token (thesis section 4)."""
    try:
        with quiet_downloads():
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            config = AutoConfig.from_pretrained(name_or_path, num_labels=1)
            if config.model_type == "modernbert":
                config.classifier_pooling = "cls"
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config)
    except (OSError, ValueError) as error:  # no such model / not a model transformers knows
        raise InputError(f"{name_or_path}: cannot load model ({one_line(error)})") from None
    return model, tokenizer


@exit_on_input_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # 1. Arguments: thesis preset, overridden by explicit flags.
    script_args, training_args, preset = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if script_args.download_only:  # what steps 2 and 3 fetch, through the same calls, so a later offline run finds it
        with training_args.main_process_first(desc="download"):
            load_model(preset.model_name_or_path)
            if script_args.train_data == MSMARCO_HUB:
                hub_datasets()  # not the pairs: their texts would take GBs of memory, on a login node too
            else:  # local data: read (and checked) now rather than on the GPU node
                load_pairs(script_args.train_data, script_args.max_train_pairs, script_args.negatives_per_query)
        logger.info("Cached %s and %s", preset.model_name_or_path, script_args.train_data)
        leave_process_group(training_args.distributed_state)
        return
    checkpoint = resume_checkpoint(training_args)
    prepare_output_dir(script_args, training_args, resuming=checkpoint is not None)
    configure_wandb(training_args, resuming=checkpoint is not None)
    warn_if_no_gpu_where_one_was_named(training_args)

    # 2. Model and tokenizer (seeded first: the new classification head is drawn from the RNG).
    set_seed(training_args.seed)
    model, tokenizer = load_model(preset.model_name_or_path)

    # 3. Data: tokenized once, padded per batch.
    with training_args.main_process_first(desc="training data"):
        pairs = load_pairs(script_args.train_data, script_args.max_train_pairs, script_args.negatives_per_query)
        eval_dataset, compute_metrics = None, None
        if script_args.eval_pairs:  # the evaluation loss on pairs held out of the training data
            pairs, held_out = hold_out(pairs, script_args.eval_pairs)
            eval_dataset = tokenize_pairs(held_out, tokenizer, script_args.max_length)
            eval_dataset = eval_dataset.select(length_order(eval_dataset))
        train_dataset = tokenize_pairs(pairs, tokenizer, script_args.max_length)
        if script_args.eval_data:
            eval_dataset, keys, qrels = validation_set(
                script_args.eval_data, script_args.eval_top_k, tokenizer, script_args.max_length
            )
            compute_metrics = rerank_metrics(keys, qrels)
    logger.info("%d training pairs (%d positive)%s", len(pairs), sum(label > 0 for _, _, label in pairs),
                f", {script_args.eval_pairs} held out for the evaluation loss" if script_args.eval_pairs else "")

    # 4. The resolved configuration, next to the checkpoints.
    if training_args.process_index == 0:
        config = {"script": asdict(script_args), "preset": asdict(preset), "training": training_args.to_dict()}
        if "wandb" in (training_args.report_to or []):
            config["wandb_run_id"] = os.environ["WANDB_RUN_ID"]
        write_atomic(Path(training_args.output_dir) / "run_config.json", json.dumps(config, indent=2, default=str))

    # 5. Train.
    trainer = RerankerTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        # Lengths padded to a multiple of 16: bf16 matrix units (AMX tiles, tensor cores) work in blocks of 16.
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=16),
        compute_metrics=compute_metrics,
    )
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    stop = trainer.stop_on_signal
    if stop.stopped_at is not None:  # no final model: run_all.sh and a resume take the run for unfinished
        print(f"stopped by {stop.signal.name} at step {stop.stopped_at} of {trainer.state.max_steps}, saved in "
              f"{stop.checkpoint(training_args.output_dir)}: --resume_from_checkpoint true continues the run",
              file=sys.stderr)  # fmt: skip
        leave_process_group(trainer.accelerator.state)
        sys.exit(128 + stop.signal)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)

    # 6. Save the final model (safetensors) and tokenizer at the root of output_dir.
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card()  # README.md: how this model was trained (model_card.py)
    if trainer.is_world_process_zero():
        remove_stop_checkpoints(training_args.output_dir)
    if eval_dataset is not None:  # the final model's validation metrics, evaluated once
        last = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
        reuse = last and not training_args.load_best_model_at_end
        metrics = {k: v for k, v in last[-1].items() if k.startswith("eval_")} if reuse else trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    leave_process_group(trainer.accelerator.state)


if __name__ == "__main__":
    main()
