"""Model cards: read this when changing what the README.md of a trained model says, or how evaluate.py adds to it.

train.py writes a card into every model it saves: the final model and each `checkpoint-*/` (evaluate.py scores
checkpoints as models, and users publish them, so each says what it is on its own). It is written from what the run
did: run_config.json, the Trainer's arguments and its state (what trainer_state.json holds), the training pairs. Its
metadata is the hub's: `base_model`, `datasets`, `pipeline_tag: text-ranking`, `library_name: sentence-transformers`
(`CrossEncoder(path)` loads these folders as they are, and the hub lists rerankers under that library; the tag
`transformers` is there too), `license`, `tags`. `push_to_hub` writes it through RerankerTrainer.create_model_card.

evaluate.py adds one section per data set between the two EVALUATIONS markers, after its metrics.json. It changes
nothing outside them (the training part and the metadata), and replaces a data set's section only when that data set
is scored again. Folders without a card of train.py's (a hub id, a model downloaded or made elsewhere) are left alone.
"""

import dataclasses
import json
import logging
import re
from pathlib import Path

import pyarrow.compute as pc
import yaml
from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cli import write_atomic
from reranker import PRESETS, relevance_level, split_paths

logger = logging.getLogger(__name__)

CARD = "README.md"
EVALUATIONS_START = "<!-- evaluations: evaluate.py keeps one section per data set here; train.py writes the rest -->"
EVALUATIONS_END = "<!-- end of evaluations -->"
NO_EVALUATION_YET = "None yet: `python evaluate.py --models FOLDER --data SPEC` adds one section per data set here."
THESIS_URL = "https://arxiv.org/abs/2506.18297"
LION_URL = "https://arxiv.org/abs/2302.06675"
MS_MARCO_TERMS = "https://microsoft.github.io/msmarco/"
MS_MARCO_HUB = "microsoft/ms_marco"  # the hub's MS MARCO, named as the data of models trained on a local copy of it
# The presets' base models, as their hub cards say (the community GTE conversion: its original's, Alibaba-NLP's).
BASE_LICENSES = {
    "microsoft/MiniLM-L12-H384-uncased": "mit",
    "alibaba-nlp-community/gte-multilingual-base": "apache-2.0",
    "answerdotai/ModernBERT-base": "apache-2.0",
}
# Settings of thesis Table 4.2 (train.py's defaults) and Table 4.1 (the preset's) that a card lists when changed.
TABLE_4_2 = [
    "per_device_train_batch_size", "num_train_epochs", "max_steps", "weight_decay", "warmup_steps", "max_grad_norm",
    "adam_beta1", "adam_beta2", "adam_epsilon", "lion_bits", "lion_beta1", "lion_beta2",
]  # fmt: skip
TABLE_4_1 = ["learning_rate", "lr_scheduler_type"]
EXAMPLE_QUERY = "how many people live in berlin"
EXAMPLE_PASSAGES = [
    "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
    "Berlin is well known for its museums.",
]


# --------------------------------------------------------------------------------------------------------------------
# What the card says about the base model and the data.


def is_hub_id(name):
    """`org/name` or `name` that is no local path (a config's `_name_or_path` may be either)."""
    return bool(re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name)) and not Path(name).exists()


def local_card(folder):
    """The metadata of a local folder's own card ({} where it has none)."""
    path = Path(folder) / CARD
    try:
        return ModelCard.load(path).data.to_dict() if path.is_file() else {}
    except (ValueError, yaml.YAMLError):  # metadata that is no YAML mapping: as good as none
        return {}


def base_model_of(model):
    """The hub model `model` descends from: a preset's or a hub id itself; for a local folder, its card's base_model,
    else the hub id its config.json says it was saved from (transformers 4 wrote `_name_or_path`); else None."""
    if not Path(model).is_dir():
        return model
    base = local_card(model).get("base_model")
    if base:
        return base
    config = Path(model) / "config.json"
    saved_from = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
    return saved_from if saved_from and is_hub_id(saved_from) else None


def base_license_of(model):
    """The base model's licence, as far as we know it without asking the hub."""
    if Path(model).is_dir():
        return local_card(model).get("license", "unknown")
    return BASE_LICENSES.get(model, "unknown")


def is_ms_marco(train_data):
    return "msmarco" in re.sub(r"[-_ ]", "", train_data.lower())


def license_metadata(train_data, model):
    """MS MARCO is for non-commercial research only, and a model trained on it inherits that: `other`, with its terms.
    Other data: the base model's licence."""
    if is_ms_marco(train_data):
        return {"license": "other", "license_name": "ms-marco", "license_link": MS_MARCO_TERMS}
    return {"license": base_license_of(model)}


def hub_datasets(train_data):
    if not is_ms_marco(train_data):
        return None  # a local collection has no hub id
    return [train_data] if is_hub_id(train_data) else [MS_MARCO_HUB]


def licence_text(train_data, model):
    base = f"The base model's licence applies too: `{base_license_of(model)}`."
    if is_ms_marco(train_data):
        return (f"Trained on MS MARCO, which is for non-commercial research only ([its terms]({MS_MARCO_TERMS})): this "
                f"model inherits that restriction. {base}")  # fmt: skip
    if Path(train_data.rpartition(":")[0]).name == "demo":
        return f"Trained on `data/demo`, a collection written for this project (Apache-2.0). {base}"
    return f"The terms of the training data{f' `{train_data}`' if train_data else ''} apply. {base}"


def training_data_text(script):
    data = script.get("train_data")
    if not data:
        return "not recorded (no run_config.json in the run's folder)"
    if is_hub_id(data) and not Path(data).is_file():
        return f"`{data}` (hub; triplets: one relevant and one non-relevant passage per query)"
    if Path(data).is_file():
        return f"`{data}` (triples: query, relevant passage, non-relevant passage)"
    negatives = script.get("negatives_per_query")
    how_many = "all of them" if negatives is None else f"{negatives} per query"
    return (f"`{data}`: relevant passages from the qrels; negatives: the run's best-ranked candidates not judged "
            f"relevant ({how_many})")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The training part, from the run.


def value_of(setting):
    return getattr(setting, "value", setting)  # the Trainer's enums (optim, lr_scheduler_type) as plain strings


LOSS_TEXTS = {"bce": "binary cross-entropy on the logit", "lce": "localized contrastive estimation (softmax "
              "cross-entropy of a positive against its query's negatives)"}  # train.py's LOSSES


def loss_text(script):
    loss = script.get("loss", "bce")
    text = LOSS_TEXTS.get(loss, f"`{loss}`")
    return f"{text}, groups of {script['group_size']}" if loss == "lce" else text


def optimizer_text(args):
    optim = value_of(args.optim)
    if optim.startswith("lion"):
        bits = optim.removeprefix("lion_").removesuffix("bit")
        return f"Lion, {bits}-bit state (bitsandbytes `Lion{bits}bit`), betas ({args.lion_beta1}, {args.lion_beta2})"
    if optim.startswith("adamw"):
        return f"AdamW (`{optim}`), betas ({args.adam_beta1}, {args.adam_beta2}), eps {args.adam_epsilon}"
    return f"`{optim}`"


def precision_text(args):
    if args.bf16:
        return "bf16 mixed precision (autocast)"
    return "fp16 mixed precision" if args.fp16 else "fp32"


def changed_from_thesis(args, script, preset):
    """`--flag value (thesis: default)` for each Table 4.1 / 4.2 setting this run changed."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    defaults.update({name: preset[name] for name in TABLE_4_1})
    lion = value_of(args.optim).startswith("lion")
    names = [n for n in TABLE_4_2 + TABLE_4_1 if n.startswith("lion_") == lion or not n.startswith(("lion_", "adam_"))]
    changed = [(n, value_of(getattr(args, n)), value_of(defaults[n])) for n in names if hasattr(args, n)]
    changed.append(("max_length", script.get("max_length"), preset["max_length"]))
    shown = {-1: "none"}  # max_steps: the thesis trains 3 whole epochs
    return [f"`--{n} {plain(v)}` (thesis: {shown.get(d, d)})" for n, v, d in changed if v != d]


def plain(value):
    """1 for 1.0 (a float flag such as --warmup_steps, given as a whole number)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def markdown_table(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def four_decimals(value):
    return f"{value:.4f}"


def validation_text(script, args, state, folder):
    """The evaluations during training, as trainer_state.json logs them; None where the run had none."""
    logged = [e for e in state.log_history if "eval_loss" in e]
    if not logged:
        return None
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    measures = sorted({k for e in logged for k in e if k.startswith("eval_") and k not in timing},
                      key=lambda k: (k != "eval_loss", k))  # the loss first
    if script.get("eval_data"):
        what = f"`{script['eval_data']}`, its top {script['eval_top_k']} candidates per query reranked"
    else:
        what = f"{script.get('eval_pairs')} training pairs held out, their binary cross-entropy"
    rows = [[e["step"], round(e["epoch"], 4), *(four_decimals(e[m]) if m in e else "" for m in measures)]
            for e in logged]
    text = f"### Validation during training\n\n{what}:\n\n{markdown_table(['step', 'epoch', *measures], rows)}"
    best = state.best_model_checkpoint
    if args.load_best_model_at_end and best and Path(folder) == Path(args.output_dir):
        text += f"\n\nThis model is the best checkpoint by `{args.metric_for_best_model}`: `{Path(best).name}`."
    return text


def training_rows(script, args, state, pairs, positives):
    """The training table: each row a setting or a count of the run."""
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    held_out = f", {script['eval_pairs']} more held out for the evaluation loss" if script.get("eval_pairs") else ""
    warmup = args.get_warmup_steps(state.max_steps)
    rows = [
        ["training data", training_data_text(script)],
        ["training pairs", f"{pairs} ({positives} relevant){held_out}"],
        ["loss", loss_text(script)],
        ["optimizer", optimizer_text(args)],
        ["weight decay", f"{args.weight_decay} (not on biases and LayerNorm weights)"],
        ["learning rate", f"{args.learning_rate}, `{value_of(args.lr_scheduler_type)}`, {warmup} warmup step(s)"],
        ["batch size", f"{batch} pairs a step ({args.per_device_train_batch_size} per device, {args.world_size} "
                       f"device(s), gradient accumulation {args.gradient_accumulation_steps})"],  # fmt: skip
        ["steps", f"{state.global_step} of {state.max_steps}"],
        ["epochs", round(state.epoch, 4)],
        ["max length", f"{script['max_length']} tokens per pair" if script.get("max_length") else "not recorded"],
        ["gradient clipping", args.max_grad_norm],
        ["seed", args.seed],
        ["precision", precision_text(args)],
    ]
    losses = [e for e in state.log_history if "loss" in e]
    if losses:
        last = losses[-1]
        rows.append(["training loss", f"{four_decimals(last['loss'])} at step {last['step']}, the last logged"])
    mean = [e for e in state.log_history if "train_loss" in e]
    if mean:
        rows.append(["mean training loss", four_decimals(mean[-1]["train_loss"])])
    return rows


def usage_text(path, max_length):
    path, query = json.dumps(path), json.dumps(EXAMPLE_QUERY)  # Python string literals in double quotes
    passages = "".join(f"    {json.dumps(p)},\n" for p in EXAMPLE_PASSAGES)
    return f"""## Usage

With sentence-transformers (`pip install sentence-transformers`):

```python
from sentence_transformers import CrossEncoder

model = CrossEncoder({path})
query = {query}
passages = [
{passages}]
scores = model.predict([(query, passage) for passage in passages])
print(scores)  # one relevance probability per passage: rank by it, highest first
```

`predict` returns the sigmoid of the model's one logit: the relevance probability. evaluate.py ranks by the logit
itself, which orders passages the same (`CrossEncoder(..., activation_fn=torch.nn.Identity())` gives the logits).

With transformers alone:

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained({path})
tokenizer = AutoTokenizer.from_pretrained({path})
query = {query}
passages = [
{passages}]
batch = tokenizer([query] * len(passages), passages, padding=True, truncation=True, max_length={max_length},
                  return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits.squeeze(-1)
print(logits)  # what evaluate.py ranks by; torch.sigmoid(logits) is what CrossEncoder.predict returns
```"""


def training_card(folder, run_config, args, state, pairs, positives, usage_path):
    """The whole card of `folder` (a run's output_dir or one of its checkpoints), with no evaluation yet."""
    script, preset = run_config.get("script", {}), run_config.get("preset", {})
    model = preset.get("model_name_or_path") or script.get("model", "")
    train_data = script.get("train_data", "")
    optimizer = getattr(args, "optimizer", value_of(args.optim))  # train.py's name: adamw, lion, adafactor, ...
    metadata = ModelCardData(
        base_model=base_model_of(model),
        datasets=hub_datasets(train_data),
        library_name="sentence-transformers",
        pipeline_tag="text-ranking",
        tags=["cross-encoder", "reranker", "text-ranking", "sentence-transformers", "transformers", optimizer],
        **license_metadata(train_data, model),
    )
    folder, run = Path(folder), Path(args.output_dir)
    is_checkpoint = folder != run
    name = f"{run.resolve().name}-{folder.name}" if is_checkpoint else run.resolve().name
    origin = f"`{model}`" + (f" (thesis preset `{script['model']}`)" if script.get("model") in PRESETS else "")
    if base_model_of(model) not in (None, model):
        origin += f" (which descends from `{base_model_of(model)}`)"
    parts = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {name}",
        f"A cross-encoder reranker: a one-logit sequence classifier that scores a (query, passage) pair, higher for "
        f"more relevant. Fine-tuned from {origin} with {loss_text(script).split(' (')[0]} and "
        f"{optimizer_text(args).split(',')[0]}, "
        "by train.py of *Lion vs AdamW for cross-encoder rerankers*.",
    ]
    if is_checkpoint:
        parts.append(f"A checkpoint, at step {state.global_step} of {state.max_steps}, of the run in `{run}`, "
                     f"whose final model is that folder.")  # fmt: skip
    if script.get("model") in PRESETS:
        changed = changed_from_thesis(args, script, preset)
        parts.append(f"Its settings follow thesis Tables 4.1 and 4.2 ([arXiv:2506.18297]({THESIS_URL})), preset "
                     f"`{script['model']}`" + (f", except {', '.join(changed)}." if changed else "."))  # fmt: skip
    parts += [
        usage_text(usage_path, script.get("max_length") or 512),
        f"## Evaluation\n\n{EVALUATIONS_START}\n{NO_EVALUATION_YET}\n{EVALUATIONS_END}",
        "## Training\n\n" + markdown_table(["setting", "value"], training_rows(script, args, state, pairs, positives)),
    ]
    validation = validation_text(script, args, state, folder)
    if validation:
        parts.append(validation)
    parts += [
        f"## Licence\n\n{licence_text(train_data, model)}",
        f"## Citation\n\nThe training setup is that of S. Kumar, M. Pande and A. Y. Damle, *Comparative Analysis of "
        f"Lion and AdamW Optimizers for Cross-Encoder Reranking with MiniLM, GTE, and ModernBERT* ({THESIS_URL}). "
        f"Lion: X. Chen et al., *Symbolic Discovery of Optimization Algorithms* ({LION_URL}).",
    ]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# The evaluation part: kept when train.py rewrites the rest, extended by evaluate.py.


def evaluations_of(card):
    """The text between the EVALUATIONS markers (None: not a card of train.py's)."""
    start, end = card.find(EVALUATIONS_START), card.find(EVALUATIONS_END)
    return card[start + len(EVALUATIONS_START) : end] if 0 <= start < end else None


def with_evaluations(card, evaluations):
    start, end = card.index(EVALUATIONS_START) + len(EVALUATIONS_START), card.index(EVALUATIONS_END)
    return card[:start] + evaluations + card[end:]


def write_card(folder, card):
    """Write `card` into `folder`, keeping the evaluations of the card already there."""
    path = Path(folder) / CARD
    earlier = evaluations_of(path.read_text(encoding="utf-8")) if path.is_file() else None
    write_atomic(path, with_evaluations(card, earlier) if earlier else card)


def write_trainer_card(trainer, folder):
    """The card of `folder` (the trainer's output_dir or a checkpoint in it) from the run so far: train.py's
    RerankerTrainer calls it at each checkpoint (CheckpointCards) and for the final model (create_model_card)."""
    args, dataset = trainer.args, trainer.train_dataset
    config = Path(args.output_dir) / "run_config.json"
    run_config = json.loads(config.read_text()) if config.is_file() else {}
    run_config.setdefault("script", {}).setdefault("model", trainer.model.name_or_path)  # a Trainer made by hand
    labelled = dataset is not None and "labels" in dataset.column_names
    positives = int(pc.sum(dataset.with_format("arrow")["labels"]).as_py()) if labelled else 0
    pairs = len(dataset) if labelled else 0
    pushed = trainer.hub_model_id if Path(folder) == Path(args.output_dir) else None  # set by push_to_hub
    usage_path = pushed or str(folder)
    write_card(folder, training_card(folder, run_config, args, trainer.state, pairs, positives, usage_path))


class CheckpointCards(TrainerCallback):
    """Each checkpoint its own card, once the Trainer has saved it (its trainer_state.json too)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_trainer_card(self.trainer, folder)


def candidate_source(spec, top_k, candidates=None, irds_id=None):
    """What evaluate.py reranked for `spec`, in words."""
    if candidates:
        return f"the top {top_k} per query of the ranked run `{candidates}` (`--candidates`)"
    if spec.startswith("irds:"):
        return f"the top {top_k} per query of the first-stage run (scoreddocs) of ir_datasets `{irds_id or spec[5:]}`"
    if irds_id:
        return f"BM25 top-{top_k} from ir_datasets (`{irds_id}`, the official candidates)"
    if spec == "msmarco-v1.1-val":  # evaluate.MSMARCO_V11
        return "each query's given passages, in their given order (`microsoft/ms_marco` v1.1 validation)"
    run = split_paths(spec)["run"]
    if run.is_file():
        return f"up to {top_k} candidates per query from `{run}`"
    return f"BM25 top-{top_k} over `{run.parent / 'corpus.tsv'}`"


def evaluation_section(split, rows, columns, source, scored_in):
    """One data set's section: how it was reranked, and the metrics of `rows` ({system: metrics.json's values})
    under `columns` ({column: measure}), with evaluate.py's 4 decimals."""
    pairs = sum(len(docs) for docs in split.run.values())
    qrels = "graded qrels, relevant = grade >= 2" if relevance_level(split.qrels) == 2 else "binary qrels"
    cells = [[system, *(four_decimals(values[m]) for m in columns.values())] for system, values in rows.items()]
    table = markdown_table(["System", *columns], cells)
    return (f"### `{split.name}`\n\nReranking {source}: {len(split.qrels)} judged queries ({qrels}), {pairs} pairs; "
            f"evaluate.py, scored in {scored_in}.\n\n{table}")  # fmt: skip


def with_section(evaluations, spec, section):
    """The evaluations with `section` as `spec`'s: in place of its earlier one, else after the others."""
    start, end = f"<!-- evaluation of {spec} -->", f"<!-- end of {spec} -->"
    block = f"{start}\n{section}\n\n{end}\n"  # the blank line ends the section's table before the marker
    earlier = re.search(re.escape(start) + r"\n.*?" + re.escape(end) + r"\n", evaluations, re.S)
    if earlier:
        return evaluations[: earlier.start()] + block + evaluations[earlier.end() :]
    return evaluations.replace(f"{NO_EVALUATION_YET}\n", "") + block


def add_evaluations(model, sections):
    """Put each {spec: section} into the card of the local model folder `model` (evaluate.py, after metrics.json)."""
    path = Path(model) / CARD
    if not Path(model).is_dir():
        logger.info("%s: a hub id, whose card is the hub's: left alone", model)
        return
    card = path.read_text(encoding="utf-8") if path.is_file() else ""
    evaluations = evaluations_of(card)
    if evaluations is None:
        logger.info("%s: no model card of train.py's, left alone", model)
        return
    for spec, section in sections.items():
        evaluations = with_section(evaluations, spec, section)
    try:
        write_atomic(path, with_evaluations(card, evaluations))
    except OSError as error:  # a read-only model folder: the evaluation itself is done and written
        logger.warning("%s: cannot add the metrics to its card: %s", model, error)
        return
    logger.info("Added %s to %s", ", ".join(sections), path)
