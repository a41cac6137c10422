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
evaluation (its metrics.json) is replaced only with --overwrite_output_dir (all of it) or --update, which redoes only
what changed since (`fingerprints.json`: each data's files, each model's weights and settings) and else does nothing.
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

from cli import InputError, exit_on_input_error, one_line, write_atomic
from data_specs import IRDS_NAMES, MSMARCO_V11, data_fingerprint, data_folder, file_sha1, load_data, parse_subset
from model_card import add_evaluations, candidate_source, evaluation_section
from reranker import (
    cpu_only,
    cross_encoder_parts,
    default_measures,
    evaluate_run,
    fast_dtype,
    format_run,
    leave_process_group,
    load_cross_encoder,
    query_chunks,
    read_fields,
    read_run,
    relevance_level,
    reranks,
    to_inference_dtype,
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
FINGERPRINTS = "fingerprints.json"  # what the evaluation in an output_dir was made from; beside metrics.json


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
        metadata={"help": "Redo an evaluation finished in output_dir whole (else refused; --update: what changed)."},
    )
    update: bool = field(
        default=False,
        metadata={"help": "Bring the evaluation in output_dir up to date: rerank only with the models whose weights "
                          "or settings changed, or on data whose queries or candidates changed, and recompute the "
                          "metrics of data whose qrels or systems changed; where nothing changed, do nothing."},
    )  # fmt: skip
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
        if self.update and self.overwrite_output_dir:
            raise InputError("--update redoes what changed, --overwrite_output_dir everything: give one of them")
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
    """A cross-encoder on `device`, in `dtype` with an fp32 head, and its tokenizer (`parts`: checked in step 4)."""
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
# What an evaluation was made from (OUTPUT_DIR/fingerprints.json), so that --update redoes only what changed.


def evaluation_fingerprints(args, names, dtype):
    """{spec: {"data": its data_fingerprint, "metrics": measures and baseline, "systems": {name: the model's path,
    weights and scoring settings (the side files' key), or with --run the run file's sha1}}}."""
    settings = f"top_k={args.top_k} max_length={args.max_length} {dtype} {args.batch_tokens}"
    if args.run:
        systems = {name: {"run": path, "sha1": file_sha1(path)} for name, path in zip(names, args.run)}
    else:
        systems = {name: {"model": model, "weights": fingerprint(model), "settings": settings}
                   for name, model in zip(names, args.models)}  # fmt: skip
    metrics = {"measures": args.metrics, "baseline": args.baseline or next(iter(names), None)}
    return {spec: {"data": data_fingerprint(spec, args.candidates_of.get(spec)), "metrics": metrics, "systems": systems}
            for spec in args.data}  # fmt: skip


def read_fingerprints(output_dir):
    """Those of the evaluation finished in output_dir; {} where none is (one killed before it wrote them is redone)."""
    path = output_dir / FINGERPRINTS
    if not (output_dir / "metrics.json").is_file() or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # not as written (atomically): trusted no more than none
        return {}


def out_of_date(now, before, output_dir):
    """-> ({spec: the models to rerank it with}, the specs whose metrics are to be computed again): a model reranks
    anew when it, its settings, or the queries or candidates changed, or its run file is gone; metrics are recomputed
    when anything of their spec changed, its qrels or its list of systems included."""
    rescore, stale = {}, set()
    for spec, current in now.items():
        previous = before.get(spec, {"data": {}, "systems": {}})
        folder = output_dir / data_folder(spec)
        anew = any(value != previous["data"].get(part) for part, value in current["data"].items() if part != "qrels")
        rescore[spec] = [
            name
            for name, system in current["systems"].items()
            if "model" in system
            and (anew or system != previous["systems"].get(name) or not (folder / f"{name}.trec").is_file())
        ]
        if rescore[spec] or json.dumps(current) != json.dumps(previous):  # as text: the systems' order counts too
            stale.add(spec)
    return rescore, stale


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
    output_dir = Path(args.output_dir)
    finished = output_dir / "metrics.json"  # written after the run files: a killed evaluation has none, and resumes
    if finished.exists() and not (args.overwrite_output_dir or args.update) and not args.download_only:
        raise InputError(f"{finished}: an evaluation is there; pass --update (redo what changed), "
                         "--overwrite_output_dir (redo all), or another --output_dir")  # fmt: skip
    try:
        chosen_measures = [ir_measures.parse_measure(name) for name in args.metrics]
    except (NameError, ValueError) as error:
        raise InputError(f"--metrics: {one_line(error)}") from None

    # 2. What to do: everything, or with --update what changed since the evaluation in output_dir, judged from the
    #    fingerprints alone (no data or model is loaded for an evaluation that is up to date)
    names = [Path(path).stem for path in args.run] or [system_name(model) for model in args.models]
    dtype = fast_dtype(state.device) if args.dtype == "auto" else getattr(torch, args.dtype)
    fingerprints = evaluation_fingerprints(args, names, dtype)
    before = read_fingerprints(output_dir) if args.update else {}
    rescore, stale = out_of_date(fingerprints, before, output_dir)
    if not stale and list(before) == list(fingerprints) and not args.download_only:
        if state.is_main_process:
            print(f"{finished}: up to date, skipped")
        leave_process_group(state)
        return

    # 3. Data, all of it read and checked before anything is scored or written (downloaded and cached by the main
    #    process before the others read it: ir_datasets' downloads are not safe for several processes at once); the
    #    candidates' text only where a model reranks them
    with state.main_process_first():
        splits = {
            spec: load_data(spec, args.top_k, not args.run and bool(rescore[spec] or args.download_only),
                            args.candidates_of.get(spec))
            for spec in args.data
        }  # fmt: skip
    if args.download_only:  # and the models, through the calls of 4 and 5, so a later offline run finds them
        for model in args.models:
            load_to_score(model, "cpu")
        logger.info("Cached %s", ", ".join(args.data + args.models))
        leave_process_group(state)
        return

    # 4. Systems: the given run files, or the first stage and each model (checked now, loaded in 5)
    folders = [data_folder(spec) for spec in args.data]
    if len(set(folders)) < len(folders):
        raise InputError(f"each --data writes to a folder named after it, and these clash: {', '.join(folders)}")
    first_stages = set() if args.run else {first_stage_name(spec) for spec, split in splits.items() if split.ranked}
    if len(set(names)) < len(names) or first_stages & set(names):
        raise InputError(f"systems are named after their folders or files, and these clash: {', '.join(names)}")
    baseline = args.baseline or names[0]
    if baseline not in names + sorted(first_stages):
        raise InputError(f"--baseline {baseline}: not one of {', '.join(sorted(first_stages) + names)}")
    to_load = [model for model, name in zip(args.models, names) if any(name in rescore[spec] for spec in splits)]
    parts = {model: cross_encoder_parts(model) for model in to_load}  # (tokenizer, config), checked
    runs = {spec: {} for spec in splits}  # spec -> system -> run
    for spec, split in splits.items():
        first_stage = output_dir / data_folder(spec) / f"{first_stage_name(spec)}.trec"
        if args.run:
            runs[spec] = {name: read_checked_run(path, split) for name, path in zip(names, args.run)}
        elif not rescore[spec]:  # its candidates not loaded: the first stage's row as written before, if it had one
            runs[spec] = {first_stage.stem: read_run(first_stage)} if first_stage.is_file() else {}
        elif split.ranked:
            runs[spec][first_stage_name(spec)] = as_written(split.run)
        else:
            logger.info("%s: its candidates come without a ranking (all scores tie): no %s row", spec,
                        first_stage_name(spec))  # fmt: skip
        # the candidates (or, not loaded, the first stage's run read back) against the qrels: the models answer those
        checked = runs[spec] if args.run or not rescore[spec] else {first_stage_name(spec): split.run}
        for name, run in checked.items():
            answered = len(set(run) & set(split.qrels))
            if not answered:
                raise InputError(f"{name}: no query of its run is judged in {spec}")
            if answered < len(split.qrels):
                logger.warning("%s: answers %d of the %d judged queries of %s; the others count as 0 (trec_eval -c)",
                               name, answered, len(split.qrels), spec)  # fmt: skip

    # 5. Rerank each data's candidates with each model, where step 2 found them out of date (else its run file is
    #    read back: the scores as written, so the same metrics); killed, a rerank resumes from the side files
    for model, name in zip(args.models, names):
        system = fingerprints[args.data[0]]["systems"][name]  # the same for every spec
        for spec in [spec for spec in splits if name not in rescore[spec]]:
            runs[spec][name] = read_run(output_dir / data_folder(spec) / f"{name}.trec")
        if model not in parts:
            continue
        network, tokenizer = load_to_score(model, state.device, dtype, parts[model])
        for spec in [spec for spec in splits if name in rescore[spec]]:
            stem = output_dir / data_folder(spec) / name
            stem.parent.mkdir(parents=True, exist_ok=True)
            key = f"{model} {system['weights']} {spec} {system['settings']}"
            logger.info("Reranking %s with %s", spec, model)
            reranked = rerank_resumable(network, tokenizer, splits[spec], str(stem), key, args, state)
            runs[spec][name] = as_written(reranked)
        del network
    if not state.is_main_process:
        leave_process_group(state)
        return

    # 6. Metrics per query and system (judged queries only), and the paired tests against the baseline and BM25
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

    # 7. Write what was redone: run files, per-query metrics, metrics.json, then fingerprints.json (each atomically),
    #    and drop the side files
    (output_dir / FINGERPRINTS).unlink(missing_ok=True)  # the files below are no longer those it describes
    for spec in [spec for spec in splits if spec in stale]:
        folder = output_dir / data_folder(spec)
        for name, run in runs[spec].items():
            if name in rescore[spec] or (rescore[spec] and name not in names):  # or the first stage, loaded anew
                write_atomic(folder / f"{name}.trec", format_run(run, re.sub(r"\s+", "_", name)))
            write_atomic(folder / f"{name}.per_query.json", json.dumps(per_query[spec][name], indent=1) + "\n")
    write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_atomic(output_dir / FINGERPRINTS, json.dumps(fingerprints, indent=2) + "\n")
    reranks = [output_dir / data_folder(spec) / name for spec in splits for name in names] if args.models else []
    for side_file in [path for stem in reranks for path in side_files(str(stem))]:
        Path(side_file).unlink()
    logger.info("Wrote %s", output_dir / "metrics.json")

    # 8. Each local model folder's card gets its metrics and the first stage's (model_card.py), where they changed
    for model, name in zip(args.models, names):
        sections = {}
        for spec, split in [(spec, split) for spec, split in splits.items() if spec in stale]:
            rows = {s: metrics[spec][s] for s in (name, first_stage_name(spec)) if s in metrics[spec]}
            base = parse_subset(spec)[0]  # a subset's candidates are its SPEC's
            source = candidate_source(base, args.top_k, args.candidates_of.get(spec), IRDS_NAMES.get(base))
            scored_in = f"{str(dtype).removeprefix('torch.')} with --max_length {args.max_length}"  # step 5's dtype
            scored = replace(split, run=runs[spec][name])  # its candidates, loaded or not
            sections[spec] = evaluation_section(scored, rows, columns[spec], source, scored_in)
        if sections:
            add_evaluations(model, sections)

    # 9. The tables, as markdown
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
