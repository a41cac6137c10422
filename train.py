"""Fine-tune a cross-encoder reranker: a backbone with a one-logit head, a loss and an optimizer from the registries.

    python train.py --model minilm --optim adamw                     # thesis preset; one GPU, or the CPU
    accelerate launch --config_file accelerate_config.yaml train.py --model gte --optim lion  # DeepSpeed ZeRO-2
    python train.py --model path/to/model --optim adafactor --loss lce --group_size 4 \
        --train_data ../shared/data/msmarco-sample:train --eval_data ../shared/data/msmarco-sample:test --max_steps 60

`--model minilm|gte|modernbert` picks thesis Table 4.1 (model, learning rate, max length, schedule), the defaults are
Table 4.2; an explicit flag beats both, and every TrainingArguments flag works. Data: the hub's sentence-transformers/
msmarco (the thesis code's), a triples TSV, or DIR:SPLIT. A new optimizer or loss is one entry in OPTIMIZERS or LOSSES.
"""

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.training_args import OptimizerNames

import stop_and_resume
from cli import InputError, exit_on_input_error, one_line, write_atomic
from cpu_fast_path import keep_freed_memory, use_cpu_fast_path
from data_specs import HUB_TRAIN_PAIRS, MSMARCO_HUB, hub_datasets, load_data, load_training_split, queries_from_hub
from model_card import CheckpointCards, write_trainer_card
from reranker import (PRESETS, bf16_gpu, collate_pairs, cpu_only, cross_encoder_parts, leave_process_group,
                      load_cross_encoder, preset_for, ranking, read_fields, relevance_level,
                      warn_if_no_gpu_where_one_was_named)  # fmt: skip
from run_cost import RunCost
from validation import hold_out, length_order, rerank_metrics, tokenize_pairs, validation_set

logger = logging.getLogger("train")

HUB_EVAL_PAIRS = 10_000  # the thesis code's train_test_split(test_size=10_000): its evaluation loss


@dataclass
class ScriptArguments:
    model: str = field(default="minilm", metadata={"help": f"Preset ({', '.join(PRESETS)}), hub id or folder."})
    train_data: str = field(default=MSMARCO_HUB, metadata={"help": f"{MSMARCO_HUB}, a triples TSV or DIR:SPLIT."})
    eval_data: str | None = field(default=None, metadata={"help": "Validation data, any evaluate.py --data spec."})
    eval_top_k: int = field(default=100, metadata={"help": "Candidates per validation query to rerank."})
    eval_pairs: int | None = field(default=None, metadata={"help": "Pairs held out: eval_loss every 5%% of the run."})
    max_length: int | None = field(default=None, metadata={"help": "Max tokens per pair (preset: 512 or 8192)."})
    max_train_pairs: int | None = field(default=None, metadata={"help": f"At most (hub: {HUB_TRAIN_PAIRS:,})."})
    negatives_per_query: int | None = field(default=None, metadata={"help": "DIR:SPLIT: best-ranked negatives kept."})
    loss: str = field(default="bce", metadata={"help": "A LOSSES entry: bce (the thesis's) or lce (listwise)."})
    group_size: int = field(default=8, metadata={"help": "Grouped losses: a positive, group_size - 1 negatives."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete a non-empty output_dir first."})
    download_only: bool = field(default=False, metadata={"help": "Fill the caches for offline nodes, write nothing."})
    check_only: bool = field(default=False, metadata={"help": "Check flags, data and model: exit 0 or 2."})
    classifier_pooling: str | None = field(default=None, metadata={"help": "ModernBERT's head pools cls or mean "
                                           "(default: as its config says).", "choices": ["cls", "mean"]})  # fmt: skip

    def __post_init__(self):
        for name, least in [("eval_top_k", 1), ("max_length", 1), ("max_train_pairs", 1), ("negatives_per_query", 0),
                            ("eval_pairs", 0)]:  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < least:
                raise InputError(f"--{name} must be {'at least 1' if least else '0 or more'}")
        if self.loss not in LOSSES:
            raise InputError(f"--loss {self.loss}: not one of {', '.join(LOSSES)}")
        if LOSSES[self.loss].grouped and self.group_size < 2:
            raise InputError(f"--group_size {self.group_size}: a group needs a positive and a negative at least")


@dataclass
class RerankerTrainingArguments(TrainingArguments):
    optim: str = field(default="adamw", metadata={"help": "adamw, lion, or any optimizer name the Trainer knows."})
    lion_bits: int = field(default=8, metadata={"help": "Lion state: 8 (Lion8bit) or 32 bits.", "choices": [8, 32]})
    lion_beta1: float = field(default=0.9, metadata={"help": "Lion beta1 (thesis Table 4.2)."})
    lion_beta2: float = field(default=0.99, metadata={"help": "Lion beta2 (thesis Table 4.2)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Pairs a step (thesis Table 4.2: 16)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Pairs per evaluation batch."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (thesis Table 4.2: 3)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Weight decay (thesis Table 4.2: 0.01)."})
    warmup_steps: float = field(default=1000, metadata={"help": "Linear warmup steps (thesis Table 4.2: 1000)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (thesis Table 4.2: 1.0)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (thesis Table 4.2)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (thesis Table 4.2)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon (thesis Table 4.2)."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint each epoch ('steps': save_steps)."})
    logging_steps: float = field(default=50, metadata={"help": "Log loss, lr and grad norm every N steps."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={"help": "Batches of similar lengths."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "Every weight gets a gradient."})
    fast_cpu_dropout: bool = field(default=True, metadata={"help": "CPU only: cpu_fast_path.py's faster dropout."})

    def __post_init__(self):
        self.optimizer = self.optim  # the name asked for; `optim` becomes the Trainer's name for what steps
        trainer_name, _ = OPTIMIZERS.get(self.optim, (self.optim, None))
        self.optim = trainer_name.format(lion_bits=self.lion_bits)
        if self.optimizer in REFUSED_OPTIMIZERS:
            raise InputError(f"--optim {self.optimizer}: {REFUSED_OPTIMIZERS[self.optimizer]}")
        if self.optim not in set(OptimizerNames):
            raise InputError(f"--optim {self.optimizer}: not one of {', '.join([*OPTIMIZERS, *OptimizerNames])}")
        super().__post_init__()
        try:  # a missing package is one line, before anything loads
            Trainer.get_optimizer_cls_and_kwargs(self)
        except (ImportError, ValueError) as error:  # not one that only needs the model (LOMO)
            if isinstance(error, ImportError) or any(w in str(error).lower() for w in ("install", "import")):
                raise InputError(f"--optim {self.optimizer}: {one_line(error)}") from None


def bad_flag(message):
    raise InputError(f"{message} (see python train.py --help)")


def parse_args(argv):
    """The preset's values become the parser's defaults, so --help shows them and an explicit flag wins."""
    parser = HfArgumentParser((ScriptArguments, RerankerTrainingArguments))
    parser.error = bad_flag
    first, _ = parser.parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])
    preset = preset_for(first.model)
    run_name = f"{Path(first.model).name}-{first.optim}"
    defaults = dict(learning_rate=preset.learning_rate, lr_scheduler_type=preset.lr_scheduler_type,
                    max_length=preset.max_length, output_dir=f"runs/{run_name}", run_name=run_name)  # fmt: skip
    if first.eval_data and first.eval_pairs:
        raise InputError("--eval_pairs and --eval_data: one validation set at a time")
    eval_pairs = first.eval_pairs
    if eval_pairs is None and first.train_data == MSMARCO_HUB and not first.eval_data:
        eval_pairs = min(HUB_EVAL_PAIRS, (first.max_train_pairs or HUB_TRAIN_PAIRS) // 10)  # a short run still trains
    defaults["eval_pairs"] = eval_pairs = eval_pairs or 0
    if first.eval_data:
        defaults["eval_strategy"] = "epoch"
    elif eval_pairs:
        defaults.update(eval_strategy="steps", eval_steps=0.05)  # cheap: a curve of 20 points
    if cpu_only():
        defaults["use_cpu"] = True  # lets --bf16 run as CPU autocast (fast with AMX)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and bf16_gpu() and not first.fp16:
        defaults["bf16"] = True  # accelerate_config.yaml: ds_config.json's "auto" precision
    parser.set_defaults(**defaults)
    try:
        script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks of flag combinations
        raise InputError(str(error).splitlines()[0]) from None
    if training_args.eval_strategy != "no" and not (script_args.eval_data or script_args.eval_pairs):
        raise InputError(f"--eval_strategy {training_args.eval_strategy.value} needs --eval_data or --eval_pairs")
    metrics = ("loss", "mrr@10", "ndcg@10") if script_args.eval_data else ("loss",)
    metric = training_args.metric_for_best_model
    if metric and metric.removeprefix("eval_") not in metrics:
        raise InputError(f"--metric_for_best_model {metric}: not one of {', '.join(metrics)}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if LOSSES[script_args.loss].grouped and getattr(training_args, name) % script_args.group_size:
            raise InputError(f"--{name} {getattr(training_args, name)}: not a multiple of --group_size "
                             f"{script_args.group_size}, so a batch would split a query's group")  # fmt: skip
    return script_args, training_args, preset


# 1. Training data: per query its positives and negatives, in the source's order.


def queries_from_split(spec, negatives_per_query=None):
    """Positives from the qrels; negatives = the run's candidates not judged relevant, best-ranked first."""
    split = load_training_split(spec)  # SPEC#sampleN: only those queries
    rel = relevance_level(split.qrels)
    entries = []
    for query_id in sorted(split.qrels):
        judged = split.qrels[query_id]
        positives = [split.corpus[d] for d, r in judged.items() if r >= rel]
        negatives = [d for d in ranking(split.run.get(query_id, {})) if judged.get(d, 0) < 1][:negatives_per_query]
        if positives:
            entries.append((split.queries[query_id], positives, [split.corpus[d] for d in negatives]))
    if not entries:
        raise InputError(f"{spec}: no query has a relevant document in its qrels (relevance >= {rel})")
    return entries


def load_queries(source, max_pairs=None, negatives_per_query=None):
    if source == MSMARCO_HUB:
        return queries_from_hub(max_pairs or HUB_TRAIN_PAIRS)
    if Path(source).is_file():
        return [(query, [positive], [negative]) for _, (query, positive, negative) in read_fields(source, 3)]
    if ":" in source:
        return queries_from_split(source, negatives_per_query)
    raise InputError(f"{source}: not a file, not DIR:SPLIT and not {MSMARCO_HUB}")


def as_pairs(entries):
    """Pointwise examples, a pair each: a query's positives labelled 1, then its negatives 0."""
    return [[pair] for query, positives, negatives in entries
            for pair in [(query, p, 1.0) for p in positives] + [(query, n, 0.0) for n in negatives]]  # fmt: skip


def as_groups(entries, group_size):
    """One group per positive: it, then its query's first group_size - 1 negatives (the same every epoch). Triplets
    of one query pool their negatives; a query with too few is skipped, with a count."""
    pooled = {}  # query -> its positives and negatives, as ordered sets
    for query, positives, negatives in entries:
        pooled.setdefault(query, ({}, {}))[0].update(dict.fromkeys(positives))
        pooled[query][1].update(dict.fromkeys(negatives))
    kept = {q: (p, list(n)[: group_size - 1]) for q, (p, n) in pooled.items() if len(n) >= group_size - 1}
    if len(kept) < len(pooled):
        logger.warning("%d of %d queries skipped: fewer than --group_size - 1 = %d negatives", len(pooled) - len(kept),
                       len(pooled), group_size - 1)  # fmt: skip
    return [[(q, p, 1.0)] + [(q, n, 0.0) for n in negatives] for q, (positives, negatives) in kept.items()
            for p in positives]  # fmt: skip


def load_examples(source, max_pairs=None, negatives_per_query=None, group_size=1):
    """Training examples, each a list of (query, passage, label): single pairs, or groups for grouped losses."""
    entries = load_queries(source, max_pairs, negatives_per_query)
    examples = as_groups(entries, group_size) if group_size > 1 else as_pairs(entries)
    if not examples:
        raise InputError(f"{source}: no training pairs in it")
    return examples[: max_pairs // group_size] if max_pairs else examples


# 2. Losses: name -> Loss. Each gets the logits, the labels and the number of pairs in the whole optimizer step
#    (every accumulation step and process), and returns this batch's share of the step's mean.


def bce_loss(outputs, labels, num_items_in_batch=None, group_size=1):
    """Binary cross-entropy on the one logit (num_labels=1 with float labels would make HF use MSE), per pair."""
    logits, labels = outputs.logits.float().reshape(-1), labels.float().reshape(-1)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / step_count(num_items_in_batch, logits)


def lce_loss(outputs, labels, num_items_in_batch=None, group_size=8):
    """Localized contrastive estimation (Gao et al. 2021): softmax cross-entropy of each group's positive, its first
    pair, against the group's negatives, per group."""
    logits = outputs.logits.float().reshape(-1, group_size)
    losses = -logits.log_softmax(-1)[:, 0]
    return losses.sum() / (step_count(num_items_in_batch, logits.reshape(-1)) / group_size)


def step_count(num_items_in_batch, logits):
    if num_items_in_batch is None:  # called outside the Trainer's loops: this batch alone
        return logits.numel()
    if torch.is_tensor(num_items_in_batch):  # under DataParallel one count per GPU, and the Trainer multiplies the
        return num_items_in_batch.sum()  # loss by the GPU count: dividing by their sum undoes it
    return num_items_in_batch


@dataclass(frozen=True)
class Loss:
    compute: Callable  # (outputs, labels, num_items_in_batch, group_size) -> loss
    grouped: bool = False  # trains on groups of a positive and group_size - 1 negatives, each group in one batch


LOSSES = {"bce": Loss(bce_loss), "lce": Loss(lce_loss, grouped=True)}


# 3. Optimizers: name -> (the Trainer's name for it, a builder args -> (class, kwargs), or None: the Trainer builds it).
#    Any other name the Trainer knows works as it builds it.


def lion(args):
    """bitsandbytes' Lion, 8- or 32-bit state, with Lion's own betas (thesis Table 4.2)."""
    import bitsandbytes as bnb

    optimizer = bnb.optim.Lion8bit if args.lion_bits == 8 else bnb.optim.Lion32bit
    return optimizer, {"lr": args.learning_rate, "betas": (args.lion_beta1, args.lion_beta2)}


OPTIMIZERS = {
    "adamw": ("adamw_torch_fused", None),  # torch's fused AdamW with adam_beta1/2 and adam_epsilon
    "lion": ("lion_{lion_bits}bit", lion),
}
REFUSED_OPTIMIZERS = {  # the Trainer's Lion would step with adam_beta1/2, not Lion's betas
    name: "the Trainer's Lion uses AdamW's betas; use --optim lion (--lion_bits 8|32)"
    for name in ("lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit")
}


class RerankerTrainer(stop_and_resume.ResumableTrainer):
    """The Trainer with a loss and an optimizer from the registries; stop_and_resume.py makes it stoppable and
    resumable, cpu_fast_path.py fast on the CPU. The Trainer's parameter groups stay: no decay for biases, norms."""

    def __init__(self, *args, loss=None, group_size=1, **kwargs):
        loss = loss or LOSSES["bce"]
        super().__init__(*args, compute_loss_func=functools.partial(loss.compute, group_size=group_size), **kwargs)
        self.group_size = group_size if loss.grouped else 1
        self.eval_with_bce = loss.grouped and self.compute_metrics is not None  # reranked candidates come ungrouped
        self.add_callback(CheckpointCards(self))  # each checkpoint gets its own model card
        self.add_callback(RunCost())  # OUTPUT_DIR/cost.json: pairs/s, peak memory, optimizer state (run_cost.py)
        if self.args.device.type == "cpu":
            keep_freed_memory()
            if self.args.fast_cpu_dropout:
                use_cpu_fast_path(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training or not self.eval_with_bce:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        loss = bce_loss(outputs, inputs["labels"])  # the validation candidates' eval_loss: the BCE
        return (loss, outputs) if return_outputs else loss

    def create_model_card(self, **kwargs):  # push_to_hub calls it: our card (model_card.py), not the Trainer's
        if self.is_world_process_zero():
            write_trainer_card(self, self.args.output_dir)

    def create_optimizer(self, model=None):
        _, build = OPTIMIZERS.get(self.args.optimizer, (None, None))
        if self.optimizer is None and build is not None:
            self.optimizer_cls_and_kwargs = build(self.args)
        return super().create_optimizer(model)


load_model = functools.partial(load_cross_encoder, new_head=True)  # a new one-logit head (thesis section 4)


@exit_on_input_error
def main(argv=None):
    # 1. Arguments: thesis preset, overridden by explicit flags.
    script_args, training_args, preset = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    loss = LOSSES[script_args.loss]
    group_size = script_args.group_size if loss.grouped else 1
    data = (script_args.train_data, script_args.max_train_pairs, script_args.negatives_per_query, group_size)
    if script_args.download_only or script_args.check_only:  # through the calls of 2 and 3, writing nothing
        with training_args.main_process_first(desc="download"):
            load = load_model if script_args.download_only else functools.partial(cross_encoder_parts, new_head=True)
            load(preset.model_name_or_path, classifier_pooling=script_args.classifier_pooling)
            if script_args.train_data != MSMARCO_HUB:
                load_examples(*data)
            elif script_args.download_only:  # not the pairs: their texts would take GBs of memory, on a login node too
                hub_datasets(script_args.max_train_pairs)
            if script_args.eval_data:
                load_data(script_args.eval_data, script_args.eval_top_k)
        logger.info("%s %s and %s", "Cached" if script_args.download_only else "Checked", preset.model_name_or_path,
                    script_args.train_data)  # fmt: skip
        return leave_process_group(training_args.distributed_state)
    checkpoint = stop_and_resume.prepare_run(script_args, training_args)  # the one to resume from, if any
    warn_if_no_gpu_where_one_was_named(training_args)

    # 2. Model and tokenizer (seeded first: the new classification head is drawn from the RNG).
    set_seed(training_args.seed)
    model, tokenizer = load_model(preset.model_name_or_path, classifier_pooling=script_args.classifier_pooling)

    # 3. Data: examples (pairs, or groups kept together), tokenized once, padded per batch.
    with training_args.main_process_first(desc="training data"):
        examples = load_examples(*data)
        eval_dataset, compute_metrics = None, None
        if script_args.eval_pairs:  # the evaluation loss on examples held out of the training data
            examples, held_out = hold_out(examples, max(1, script_args.eval_pairs // group_size))
            eval_dataset = tokenize_pairs([pair for example in held_out for pair in example], tokenizer,
                                          script_args.max_length)  # fmt: skip
            eval_dataset = eval_dataset if loss.grouped else eval_dataset.select(length_order(eval_dataset))
        pairs = [pair for example in examples for pair in example]
        train_dataset = tokenize_pairs(pairs, tokenizer, script_args.max_length)
        if script_args.eval_data:
            eval_dataset, keys, qrels = validation_set(script_args.eval_data, script_args.eval_top_k, tokenizer,
                                                       script_args.max_length)  # fmt: skip
            compute_metrics = rerank_metrics(keys, qrels)
    logger.info("%d training pairs (%d positive), %d for evaluation", len(pairs), sum(y > 0 for _, _, y in pairs),
                len(eval_dataset or []))  # fmt: skip

    # 4. The resolved configuration, next to the checkpoints: what the run is, whatever its folder is called.
    if training_args.process_index == 0:
        config = {"backbone": preset.model_name_or_path, "optimizer": training_args.optimizer,
                  "loss": script_args.loss, "script": asdict(script_args), "preset": asdict(preset),
                  "training": training_args.to_dict()}  # fmt: skip
        if "wandb" in (training_args.report_to or []):
            config["wandb_run_id"] = os.environ["WANDB_RUN_ID"]
        write_atomic(Path(training_args.output_dir) / "run_config.json", json.dumps(config, indent=2, default=str))

    # 5. Train (a stop's checkpoint or a bad loss exits here).
    trainer = RerankerTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              processing_class=tokenizer, data_collator=collate_pairs(tokenizer),
                              compute_metrics=compute_metrics, loss=loss, group_size=group_size)  # fmt: skip
    result = trainer.train_or_exit(checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)

    # 6. Save the final model (safetensors) and tokenizer at the root of output_dir, and its validation metrics.
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card()  # README.md: how this model was trained, for the hub (model_card.py)
    if trainer.is_world_process_zero():
        stop_and_resume.remove_stop_checkpoints(training_args.output_dir)
    if eval_dataset is not None:  # evaluated at the last step already, unless the best model was loaded
        last = [e for e in trainer.state.log_history if "eval_runtime" in e and e["step"] == trainer.state.global_step]
        reuse = last and not training_args.load_best_model_at_end
        metrics = {k: v for k, v in last[-1].items() if k.startswith("eval_")} if reuse else trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    leave_process_group(trainer.accelerator.state)


if __name__ == "__main__":
    main()
