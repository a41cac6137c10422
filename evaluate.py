"""Rerank first-stage candidates with cross-encoders and score every run the way TREC does: the thesis's Table 5.1.

    # trained rerankers on TREC DL 2019 and MS MARCO dev small, reranking the official BM25 top-1000 (ir_datasets)
    python evaluate.py --models runs/minilm runs/gte runs/modernbert --data dl19 dev-small
    # the same, reranking a ranked run's top-1000 (here Pyserini's BM25, as the thesis did) instead of the official set
    python evaluate.py --models runs/minilm --data dl19 --candidates dl19=run.msmarco-v1-passage.bm25-default.dl19.txt
    # the protocol of the thesis's MRR@10 column: MS MARCO v1.1 validation, each query's ~10 given passages
    python evaluate.py --models runs/minilm --data msmarco-v1.1-val
    # local splits DIR:SPLIT (candidates from DIR/run.SPLIT.trec, else BM25 over DIR/corpus.tsv); minutes on a CPU
    python evaluate.py --models runs/minilm runs/gte \
        --data ../shared/data/msmarco-sample:test ../shared/data/msmarco-sample:test-graded
    # TREC run files as they are, no model
    python evaluate.py --run bm25.trec monobert.trec --data ../shared/data/trec-dl:dl19
    # several GPUs: the queries are split across processes and gathered on the main one, which writes
    accelerate launch evaluate.py --models runs/minilm --data dl19 dev-small

--data SPEC: `DIR:SPLIT`; `dl19`, `dl20`, `dev-small` (ir_datasets msmarco-passage/trec-dl-2019/judged,
msmarco-passage/trec-dl-2020/judged, msmarco-passage/dev/small with their official BM25 top-1000); `irds:<id>`
(any ir_datasets id with scoreddocs); `msmarco-v1.1-val` (Hugging Face microsoft/ms_marco v1.1 validation,
`is_selected` as the label: not the standard dev-small MRR@10). MS MARCO's official BM25 top-1000 comes shuffled and
unscored: those data sets get no BM25 row, and are reranked whole. `SPEC#sampleN`: a seeded sample of N of SPEC's
judged queries (seed 0; `-seedS` after it for another draw); `SPEC#restN`: the others. E.g. dev-small#sample500 to
choose settings on, dev-small#rest500 to report.

Writes to --output_dir: `metrics.json` (data spec -> system -> measure -> value, and the p-values), and per data a
folder with `SYSTEM.trec` (TREC run) and `SYSTEM.per_query.json`. A killed rerank leaves `SYSTEM.scored-RANK.jsonl`
(the queries already scored); the same command again scores only the rest, and writes the same run file. A finished
evaluation (its metrics.json) is replaced only with --overwrite_output_dir.
"""

import glob
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import ir_measures
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import HfArgumentParser
from transformers.utils.hub import cached_file

from data_specs import IRDS_NAMES, MSMARCO_V11, data_folder, load_data, parse_subset
from model_card import add_evaluations, candidate_source, evaluation_section
from reranker import (
    InputError,
    cpu_only,
    cross_encoder_parts,
    default_measures,
    evaluate_run,
    exit_on_input_error,
    fast_dtype,
    format_run,
    leave_process_group,
    load_cross_encoder,
    one_line,
    query_chunks,
    read_fields,
    read_run,
    relevance_level,
    reranks,
    to_inference_dtype,
    write_atomic,
)
from tables import (
    BASELINE_MARK,
    COLUMNS,
    DEV_SETS,
    FIRST_STAGE_MARK,
    add_significance,
    data_table,
    has_thesis_columns,
    legend,
    thesis_table,
)

logger = logging.getLogger(__name__)



@dataclass
class EvaluationArguments:
    data: list[str] = field(
        metadata={"help": "DIR:SPLIT, dl19, dl20, dev-small, irds:<ir_datasets id> or msmarco-v1.1-val (one or more); "
                         "SPEC#sampleN[-seedS] or SPEC#restN[-seedS]: a seeded part of its judged queries."}
    )
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Cross-encoder folders or hub ids; each is a system named after its folder (a checkpoint "
                          "after its run too: runs/minilm-lion/checkpoint-500 is minilm-lion-checkpoint-500)."},
    )
    run: list[str] = field(
        default_factory=list,
        metadata={"help": "Instead of --models: TREC run files to score as they are, against one --data."},
    )
    top_k: int = field(default=1000, metadata={"help": "Candidates reranked per query: TREC DL's BM25 top-1000."})
    candidates: list[str] = field(
        default_factory=list,
        metadata={"help": "SPEC=RUN_FILE: a ranked TREC run as the candidates of an ir_datasets SPEC instead of its "
                          "official ones, e.g. dl19=run.bm25.dl19.txt (Pyserini's BM25, as the thesis reranked)."},
    )  # fmt: skip
    batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Padded tokens per forward pass (default 4096 on a CPU, 65536 on a GPU); lower when out of "
                          "memory."},  # fmt: skip
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto: bf16 where the hardware is fast at it (CUDA GPUs, CPUs with AMX), else float32.",
            "choices": ["auto", "float32", "bfloat16"],
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Tokens per (query, passage) pair; MS MARCO passages fit in 512."}
    )
    output_dir: str = field(default="results/eval", metadata={"help": "Where run files and metrics.json go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the files of an evaluation finished in output_dir (never replaced otherwise)."},
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "System every other is tested against (default: the first model or run). BM25 always is."},
    )
    metrics: list[str] = field(
        default_factory=list,
        metadata={"help": "ir_measures names replacing the default set, e.g. nDCG@10 'AP(rel=2)' 'RR(rel=2)@10'."},
    )
    download_only: bool = field(
        default=False,
        metadata={"help": "Fetch --data (and hub --models) into the local caches and stop, writing nothing: for GPU "
                          "nodes without network, which then evaluate with HF_HUB_OFFLINE=1."},
    )  # fmt: skip

    def __post_init__(self):
        if (self.models and self.run) or not (self.models or self.run or self.download_only):
            raise InputError("give either --models or --run")
        self.candidates_of = {}  # SPEC -> RUN_FILE
        for pair in self.candidates:
            spec, _, path = pair.partition("=")
            if spec not in self.data or not path or spec in self.candidates_of:
                raise InputError(f"--candidates {pair}: expected SPEC=RUN_FILE, one per SPEC of --data")
            self.candidates_of[spec] = path
        if self.run and len(self.data) != 1:
            raise InputError("--run scores run files against exactly one --data")
        if self.top_k < 1 or (self.batch_tokens or 1) < 1 or self.max_length < 1:
            raise InputError("--top_k, --batch_tokens and --max_length must be positive")


# --------------------------------------------------------------------------------------------------------------------
# Data: every SPEC becomes a reranker.Split (queries, qrels, first-stage run, corpus).


def system_name(model):
    """A model's name in the tables and file names: its folder's, and its run's too for a checkpoint, so that the
    checkpoints of several runs (the thesis reported each run's best epoch) can be evaluated together."""
    path = Path(model.rstrip("/"))
    return f"{path.parent.name}-{path.name}" if path.name.startswith("checkpoint-") and path.parent.name else path.name


def first_stage_name(spec):
    return "given-order" if parse_subset(spec)[0] == MSMARCO_V11 else "BM25"


def read_checked_run(path, split):
    """A run file whose queries are all queries of `split`; for a SPEC#sampleN or #restN, its part of a SPEC's run."""
    run = read_run(path)
    if parse_subset(split.name)[1]:  # a run of all of SPEC, cut to the subset (a stray query id goes unnoticed)
        return {query_id: scores for query_id, scores in run.items() if query_id in split.queries}
    if any(query_id not in split.queries for query_id in run):
        for line_number, (query_id, *_) in read_fields(path, 6, sep=None):
            if query_id not in split.queries:
                raise InputError(f"{path}:{line_number}: query {query_id} is not a query of {split.name}")
    return run


# --------------------------------------------------------------------------------------------------------------------
# Models and the resumable rerank.


def fingerprint(model):
    """What tells one model's weights from another's at the same path: its files' sizes and modification times."""
    folder = Path(model)
    if not folder.is_dir():  # a hub id: the snapshot cross_encoder_parts cached, a folder named after the revision
        try:
            folder = Path(cached_file(model, "config.json", local_files_only=True)).parent
        except OSError:
            return "unknown"
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return hashlib.sha1(f"{folder.name} {stats}".encode()).hexdigest()[:16]


def load_to_score(model, device, dtype=torch.float32, parts=None):
    """A cross-encoder on `device`, in `dtype` with an fp32 head, and its tokenizer (`parts`: checked in step 3)."""
    network, tokenizer = load_cross_encoder(model, parts=parts)
    return to_inference_dtype(network.to(device), dtype), tokenizer


def side_files(stem):
    """The side files of a rerank, one per process: `STEM.scored-RANK.jsonl`."""
    return sorted(glob.glob(glob.escape(stem) + ".scored-*.jsonl"))


def read_scored(stem, key):
    """{chunk: run} that earlier, killed reranks with the same settings saved; a torn last line is skipped."""
    scored = {}
    for path in side_files(stem):
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry["key"] == key:
                    scored[entry["chunk"]] = entry["run"]
    return scored


def rerank_resumable(model, tokenizer, split, stem, key, args, state):
    """Rerank `split.run` chunk by chunk, appending each scored chunk to a side file; chunks saved before are kept.

    The chunks do not depend on what was saved, so every pair is scored in the same batch as in an unbroken run.
    """
    chunks = query_chunks(split.run)
    scored = {  # a chunk saved for other candidates (an edited run file) is scored anew
        i: run
        for i, run in read_scored(stem, key).items()
        if i < len(chunks) and {q: sorted(d) for q, d in run.items()} == {q: sorted(split.run[q]) for q in chunks[i]}
    }
    if scored:
        logger.info("%s: resuming, %d of %d chunks already scored", stem, len(scored), len(chunks))
    state.wait_for_everyone()  # every process has read the side files before any process appends to them
    todo = [i for i in range(len(chunks)) if i not in scored]
    new = {}
    with state.split_between_processes(todo) as mine:
        splits = [replace(split, run={query_id: split.run[query_id] for query_id in chunks[i]}) for i in mine]
        pairs = sum(len(docs) for part in splits for docs in part.run.values())
        description = f"{Path(stem).parent.name} {Path(stem).name}"
        with tqdm(total=pairs, unit="pair", desc=description, disable=not state.is_main_process) as progress:
            for i, run in zip(mine, reranks(model, tokenizer, splits, args.batch_tokens, args.max_length)):
                new[i] = run
                with open(f"{stem}.scored-{state.process_index}.jsonl", "a", encoding="utf-8") as side:
                    side.write("\n" + json.dumps({"key": key, "chunk": i, "run": run}))  # "\n" ends a torn line
                progress.update(sum(len(scores) for scores in run.values()))
    for part in gather_object([new]):
        scored.update(part)
    return {query_id: scores for i in sorted(scored) for query_id, scores in scored[i].items()}


def as_written(run):
    """Scores rounded as the run file writes them, so the metrics are those of the file (ties included)."""
    return {query_id: {doc_id: round(score, 6) for doc_id, score in scores.items()} for query_id, scores in run.items()}


# --------------------------------------------------------------------------------------------------------------------


@exit_on_input_error
def main():
    # 1. Arguments, and the process layout (several under `accelerate launch`)
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses()
    # Without a GPU, processes started by torchrun form a gloo group only when asked to run on the CPU (as train.py's
    # use_cpu does); otherwise each would score everything on its own.
    state = PartialState(cpu=cpu_only())
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO if state.is_main_process else logging.WARNING
    )
    finished = Path(args.output_dir) / "metrics.json"  # written last: a killed evaluation has none, and resumes
    if finished.exists() and not args.overwrite_output_dir and not args.download_only:
        raise InputError(f"{finished}: an evaluation is there; pass --overwrite_output_dir, or another --output_dir")
    try:
        chosen_measures = [ir_measures.parse_measure(name) for name in args.metrics]
    except (NameError, ValueError) as error:
        raise InputError(f"--metrics: {one_line(error)}") from None

    # 2. Data, all of it read and checked before anything is scored or written (downloaded and cached by the main
    #    process before the others read it: ir_datasets' downloads are not safe for several processes at once)
    with state.main_process_first():
        splits = {spec: load_data(spec, args.top_k, not args.run, args.candidates_of.get(spec)) for spec in args.data}
    if args.download_only:  # and the models, through the calls of 3 and 4, so a later offline run finds them
        for model in args.models:
            load_to_score(model, "cpu")
        logger.info("Cached %s", ", ".join(args.data + args.models))
        leave_process_group(state)
        return

    # 3. Systems: the given run files, or the first stage and each model (checked now, loaded in 4)
    folders = [data_folder(spec) for spec in args.data]
    if len(set(folders)) < len(folders):
        raise InputError(f"each --data writes to a folder named after it, and these clash: {', '.join(folders)}")
    names = [Path(path).stem for path in args.run] or [system_name(model) for model in args.models]
    first_stages = set() if args.run else {first_stage_name(spec) for spec, split in splits.items() if split.ranked}
    if len(set(names)) < len(names) or first_stages & set(names):
        raise InputError(f"systems are named after their folders or files, and these clash: {', '.join(names)}")
    baseline = args.baseline or names[0]
    if baseline not in names + sorted(first_stages):
        raise InputError(f"--baseline {baseline}: not one of {', '.join(sorted(first_stages) + names)}")
    parts = {model: cross_encoder_parts(model) for model in args.models}  # (tokenizer, config), checked
    runs = {spec: {} for spec in splits}  # spec -> system -> run
    for spec, split in splits.items():
        if args.run:
            runs[spec] = {name: read_checked_run(path, split) for name, path in zip(names, args.run)}
        elif split.ranked:
            runs[spec][first_stage_name(spec)] = as_written(split.run)
        else:
            logger.info("%s: its candidates come without a ranking (all scores tie): no %s row", spec,
                        first_stage_name(spec))  # fmt: skip
        checked = runs[spec] if args.run else {first_stage_name(spec): split.run}  # models answer its queries
        for name, run in checked.items():
            answered = len(set(run) & set(split.qrels))
            if not answered:
                raise InputError(f"{name}: no query of its run is judged in {spec}")
            if answered < len(split.qrels):
                logger.warning("%s: answers %d of the %d judged queries of %s; the others count as 0 (trec_eval -c)",
                               name, answered, len(split.qrels), spec)  # fmt: skip

    # 4. Rerank each data's candidates with each model; killed, it resumes from the side files
    output_dir = Path(args.output_dir)
    for model, name in zip(args.models, names):
        dtype = fast_dtype(state.device) if args.dtype == "auto" else getattr(torch, args.dtype)
        network, tokenizer = load_to_score(model, state.device, dtype, parts[model])
        weights = fingerprint(model)
        for spec, split in splits.items():
            stem = output_dir / data_folder(spec) / name
            stem.parent.mkdir(parents=True, exist_ok=True)
            settings = f"top_k={args.top_k} max_length={args.max_length} {dtype} {args.batch_tokens}"
            key = f"{model} {weights} {spec} {settings}"
            logger.info("Reranking %s with %s", spec, model)
            runs[spec][name] = as_written(rerank_resumable(network, tokenizer, split, str(stem), key, args, state))
        del network
    if not state.is_main_process:
        leave_process_group(state)
        return

    # 5. Metrics per query and system (judged queries only), and the paired tests against the baseline and BM25
    metrics, per_query, columns, marks = {}, {}, {}, {}
    for spec, split in splits.items():
        measures = chosen_measures or default_measures(split.qrels)
        names_shown = [str(m) for m in measures] if chosen_measures else COLUMNS
        columns[spec] = dict(zip(names_shown, map(str, measures)))
        metrics[spec], per_query[spec] = {}, {}
        for name, run in runs[spec].items():
            aggregate, per_query[spec][name] = evaluate_run(split.qrels, run, measures)
            metrics[spec][name] = {str(m): aggregate[str(m)] for m in measures}  # in the order of the columns
        first_stage = None if args.run else first_stage_name(spec)
        references = [r for r in dict.fromkeys([baseline, first_stage]) if r in runs[spec]]
        comparisons = [(s, r) for s in names for r in references if s != r]
        add_significance(metrics[spec], per_query[spec], comparisons, measures)
        tested_against = [r for r in references if any(reference == r for _, reference in comparisons)]
        marks[spec] = [(BASELINE_MARK if r == baseline else FIRST_STAGE_MARK, r) for r in tested_against]

    # 6. Write run files, per-query metrics and metrics.json (atomically), then drop the side files
    for spec in splits:
        folder = output_dir / data_folder(spec)
        for name, run in runs[spec].items():
            if not args.run:
                write_atomic(folder / f"{name}.trec", format_run(run, re.sub(r"\s+", "_", name)))
            write_atomic(folder / f"{name}.per_query.json", json.dumps(per_query[spec][name], indent=1) + "\n")
    write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    reranks = [output_dir / data_folder(spec) / name for spec in splits for name in names] if args.models else []
    for side_file in [path for stem in reranks for path in side_files(str(stem))]:
        Path(side_file).unlink()
    logger.info("Wrote %s", output_dir / "metrics.json")

    # 7. Each local model folder's card gets its metrics and the first stage's (model_card.py)
    for model, name in zip(args.models, names):
        sections = {}
        for spec, split in splits.items():
            rows = {s: metrics[spec][s] for s in (name, first_stage_name(spec)) if s in metrics[spec]}
            base = parse_subset(spec)[0]  # a subset's candidates are its SPEC's
            source = candidate_source(base, args.top_k, args.candidates_of.get(spec), IRDS_NAMES.get(base))
            scored_in = f"{str(dtype).removeprefix('torch.')} with --max_length {args.max_length}"  # step 4's dtype
            sections[spec] = evaluation_section(split, rows, columns[spec], source, scored_in)
        add_evaluations(model, sections)

    # 8. The tables, as markdown
    for spec, split in splits.items():
        judged = len(next(iter(per_query[spec].values())))
        qrels_kind = "graded qrels, relevant = grade >= 2" if relevance_level(split.qrels) == 2 else "binary qrels"
        print(f"\n## {spec} ({judged} judged queries, {qrels_kind})\n")
        print(data_table(metrics[spec], columns[spec], marks[spec]))
        if marks[spec]:
            print(f"\n{legend(marks[spec], len(metrics[spec]))}")
    for dev in [d for d in DEV_SETS if "dl19" in splits and d in splits]:
        if has_thesis_columns(columns["dl19"], columns[dev]):
            print(f"\n## Thesis layout: TREC DL 2019 and {dev}\n")
            print(thesis_table(metrics, columns, marks, dev))
    leave_process_group(state)


if __name__ == "__main__":
    main()
