"""The study's results table and training-dynamics figures, from what run_all.sh left in its output folder.

    python report.py --results results                     # every optimizer tested against AdamW
    python report.py --results results --reference lion    # ... against Lion

Reads results/eval/metrics.json and each run's run_config.json (what it trained: backbone, optimizer, loss,
settings; its folder name is only a label) and trainer_state.json. Writes `results/table.md` (per data: a row per
configuration, mean ± standard deviation over seeds; every optimizer tested against the reference optimizer on the same
backbone; the same per checkpoint where run_all.sh evaluated them into results/eval-checkpoints/) and
`results/figures/*.png`: per backbone, the optimizers overlaid for training loss, evaluation loss, learning rate and
gradient norm (thesis Figures 5.1-5.10), and a bar chart of the table's metrics.
"""

import functools
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from cli import InputError, exit_on_input_error, write_atomic  # noqa: E402
from data_specs import data_folder  # noqa: E402
from reranker import measures_at  # noqa: E402
from tables import (  # noqa: E402
    ALPHA,
    COLUMNS,
    DEV_SETS,
    has_thesis_columns,
    markdown_table,
    paired_p_value,
    thesis_layout,  # noqa: E402
)

REFERENCE_MARK = "‡"
CURVES = {  # trainer_state.json key -> (figure title, y label)
    "loss": ("Training loss", "BCE loss"),
    "eval_loss": ("Evaluation loss", "BCE loss"),
    "learning_rate": ("Learning rate", "learning rate"),
    "grad_norm": ("Gradient norm (before clipping)", "L2 norm"),
}
PALETTE = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
# What makes two runs one configuration, seeds apart: run_config.json's settings of the experiment
SETTINGS = {"training": ["optim", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
                         "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                         "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "lion_bits", "lion_beta1",
                         "lion_beta2", "optim_args"],
            "script": ["train_data", "max_train_pairs", "max_length", "negatives_per_query", "group_size"]}  # fmt: skip
TRAINER_NAMES = {"adamw_torch_fused": "adamw", "lion_8bit": "lion", "lion_32bit": "lion"}  # runs before "optimizer"


@dataclass
class ReportArguments:
    results: str = field(default="results", metadata={"help": "run_all.sh's --output folder."})
    reference: str = field(default="adamw", metadata={"help": "The optimizer every other one is tested against."})


@dataclass
class Configuration:
    """One row of the table: what its runs trained (None for a first stage or a model without run_config.json), and
    its runs over seeds (one system each)."""

    name: str
    backbone: str | None = None
    optimizer: str | None = None
    loss: str | None = None
    when: str = ""  # for checkpoints: their place in the runs (`epoch 1`, `step 500`)
    systems: list = field(default_factory=list)


def group_name(configuration, when=""):
    return f"{configuration} {when}".rstrip()


def run_description(run_dir):
    """(backbone, optimizer, loss, settings) from a run's run_config.json, or None where it has none."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        return None
    config = read_json(path)
    training = config.get("training", {})
    optimizer = config.get("optimizer") or TRAINER_NAMES.get(training.get("optim"), training.get("optim"))
    backbone = config.get("backbone") or config.get("preset", {}).get("model_name_or_path")
    settings = json.dumps({part: {k: config.get(part, {}).get(k) for k in keys} for part, keys in SETTINGS.items()})
    return backbone, optimizer, config.get("loss", "bce"), settings


def configurations(system_names, runs_dir, checkpoints=None):
    """Group the systems whose runs (runs_dir/SYSTEM) trained the same settings but for the seed; others (BM25,
    untrained) stand alone. `checkpoints` {system: (run, when)} groups checkpoints per configuration and place."""
    groups, labels = {}, {}
    for system in system_names:
        run, when = (checkpoints or {}).get(system, (system, ""))
        description = run_description(runs_dir / run)
        key = (description or run, when)
        label = labels.setdefault(description or run, re.sub(r"-seed\d+$", "", run))  # a label, nothing more
        name = group_name(label, when)
        trained = (description or (None, None, None))[:3]  # backbone, optimizer, loss
        groups.setdefault(key, Configuration(name, *trained, when)).systems.append(system)
    return list(groups.values())


def groups_by_name(systems, runs_dir, checkpoints=None):
    """{row name: Configuration} of one data spec's systems, or of the checkpoints among them where given."""
    return {group.name: group for group in configurations(list(checkpoints or systems), runs_dir, checkpoints)}


def reference_of(group, groups, reference):
    """The reference optimizer's configuration on the same backbone, loss and place, if any."""
    if group.optimizer in (None, reference):
        return None
    wanted = (group.backbone, group.loss, group.when, reference)
    same = [g for g in groups.values() if (g.backbone, g.loss, g.when, g.optimizer) == wanted]
    return same[0] if same else None


def checkpoint_places(systems, runs_dir):
    """{system: (run, when)} for evaluate.py's checkpoint systems (`RUN-checkpoint-STEP`), in the order of run and
    step: `epoch N` where the checkpoint ends an epoch (its trainer_state.json says so), else `step STEP`."""
    places = {}
    for system in [s for s in systems if "-checkpoint-" in s]:  # not the first stage's row (BM25)
        run, _, step = system.rpartition("-checkpoint-")
        places[system] = (run, checkpoint_place(runs_dir / run, step))
    runs = list(dict.fromkeys(run for run, _ in places.values()))
    order = sorted(places, key=lambda system: (runs.index(places[system][0]), int(system.rpartition("-")[2])))
    return {system: places[system] for system in order}


@functools.cache
def checkpoint_place(run_dir, step):
    """`epoch N` where checkpoint-STEP ends an epoch (its trainer_state.json says so), else `step STEP`."""
    state = Path(run_dir) / f"checkpoint-{step}" / "trainer_state.json"
    epoch = read_json(state).get("epoch") if state.is_file() else None
    return f"epoch {int(epoch)}" if epoch and float(epoch).is_integer() else f"step {step}"


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def seed_averaged(per_query_runs):
    """Per-query values averaged over seeds: {query_id: {measure: mean}}, over the queries all seeds have."""
    queries = set.intersection(*(set(run) for run in per_query_runs))
    return {
        query_id: {m: statistics.mean(run[query_id][m] for run in per_query_runs) for m in per_query_runs[0][query_id]}
        for query_id in queries
    }


def measure_columns(metrics):
    """{table column: ir_measures name} of one data spec's metrics: the table's names for the default set (evaluate.py
    writes it in COLUMNS order), ir_measures' own for a set chosen with --metrics."""
    measures = [m for m in next(iter(metrics.values())) if not m.startswith("p ")]
    defaults = [[str(m) for m in measures_at(rel)] for rel in (1, 2)]
    return dict(zip(COLUMNS, measures)) if measures in defaults else {m: m for m in measures}


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (written by evaluate.py / train.py)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not complete JSON ({error})") from None


def read_per_query(spec, metrics, eval_dir):
    return {s: read_json(eval_dir / data_folder(spec) / f"{s}.per_query.json") for s in metrics}


def config_cell(group, groups, metrics, per_query, measure, reference):
    """mean (± std over seeds) of a configuration, marked where it differs from the reference optimizer's."""
    text = mean_std([metrics[s][measure] for s in group.systems])
    other = reference_of(group, groups, reference)
    if other is not None:
        p = paired_p_value(
            seed_averaged([per_query[s] for s in group.systems]),
            seed_averaged([per_query[s] for s in other.systems]),
            measure,
        )
        text += REFERENCE_MARK if p is not None and p < ALPHA else ""
    return text


def row_name(group):
    return group.name + (f" ({len(group.systems)} seeds)" if len(group.systems) > 1 else "")


def data_table(spec, metrics, eval_dir, checkpoints=None, reference="adamw"):
    """Markdown table of one data spec, and the bar chart's values {configuration: {column: mean}}."""
    columns, per_query = measure_columns(metrics), read_per_query(spec, metrics, eval_dir)
    groups = groups_by_name(metrics, eval_dir.parent / "runs", checkpoints)
    rows = [
        [row_name(g)] + [config_cell(g, groups, metrics, per_query, m, reference) for m in columns.values()]
        for g in groups.values()
    ]
    bars = {g.name: {c: statistics.mean(metrics[s][m] for s in g.systems) for c, m in columns.items()}
            for g in groups.values()}  # fmt: skip
    heading = f"{spec}, per checkpoint" if checkpoints else spec
    return f"## {heading}\n\n{markdown_table(['System', *columns], rows)}\n", bars


def thesis_table(metrics, eval_dir, dev, checkpoints=None, reference="adamw"):
    """The thesis's Table 5.1 layout: NDCG@10, MAP, R-Prec, P@10 on TREC DL 2019 and MRR@10 on a dev set."""
    specs = ("dl19", dev)
    columns = {spec: measure_columns(metrics[spec]) for spec in specs}
    per_query = {spec: read_per_query(spec, metrics[spec], eval_dir) for spec in specs}
    groups = {spec: groups_by_name(metrics[spec], eval_dir.parent / "runs", checkpoints) for spec in specs}

    def text(name):
        return lambda spec, column: config_cell(groups[spec][name], groups[spec], metrics[spec], per_query[spec],
                                                columns[spec][column], reference)  # fmt: skip

    rows = {row_name(g): text(name) for name, g in groups["dl19"].items() if name in groups[dev]}
    heading = f"Thesis layout (Table 5.1): TREC DL 2019 and {dev}" + (", per checkpoint" if checkpoints else "")
    return f"## {heading}\n\n{thesis_layout(rows, dev)}\n"


def sections(metrics, eval_dir, checkpoints=None, reference="adamw"):
    """The tables of one evaluate.py output (the thesis layout first, where it can be shown), and the bar charts'
    values per data spec."""
    tables, bars = [], {}
    for spec, systems in metrics.items():
        table, bars[spec] = data_table(spec, systems, eval_dir, checkpoints, reference)
        tables.append(table)
    for dev in [d for d in DEV_SETS if "dl19" in metrics and d in metrics]:
        if has_thesis_columns(measure_columns(metrics["dl19"]), measure_columns(metrics[dev])):
            tables.insert(0, thesis_table(metrics, eval_dir, dev, checkpoints, reference))
    return tables, bars


def training_curves(runs_dir):
    """{backbone label: {optimizer: [(run name, log_history)]}} from every run's trainer_state.json."""
    curves = {}
    for state_file in sorted(runs_dir.glob("*/trainer_state.json")):
        [group] = configurations([state_file.parent.name], runs_dir)
        if group.optimizer:
            label = group.name.removesuffix(f"-{group.optimizer}") if group.name.endswith(f"-{group.optimizer}") else (
                Path(group.backbone).name)  # fmt: skip
            history = read_json(state_file).get("log_history", [])
            curves.setdefault(label, {}).setdefault(group.optimizer, []).append((state_file.parent.name, history))
    return curves


def colors(optimizers, reference):
    """An optimizer's colour, the same in every figure: the reference's blue, the others in order of appearance."""
    others = [o for o in dict.fromkeys(optimizers) if o != reference]
    return {reference: "tab:blue", **{o: PALETTE[i % len(PALETTE)] for i, o in enumerate(others)}}


def plot_curves(curves, figures_dir, reference="adamw"):
    written = []
    color = colors([optimizer for by_optimizer in curves.values() for optimizer in by_optimizer], reference)
    for backbone, by_optimizer in curves.items():
        for key, (title, ylabel) in CURVES.items():
            lines = [
                (optimizer, name, [(e["step"], e[key]) for e in history if key in e])
                for optimizer, runs in by_optimizer.items()
                for name, history in runs
            ]
            lines = [line for line in lines if line[2]]
            if not lines:
                continue  # not logged: no empty figure
            figure, axes = plt.subplots(figsize=(6.4, 4))
            for optimizer, name, points in lines:
                steps, values = zip(*points)
                axes.plot(steps, values, color=color[optimizer], label=name, marker="o" if len(points) < 8 else None)
            axes.set(title=f"{backbone}: {title}", xlabel="training step", ylabel=ylabel)
            axes.grid(alpha=0.3)
            axes.legend()
            path = figures_dir / f"{backbone}-{key}.png"
            figure.tight_layout()
            figure.savefig(path, dpi=120)
            plt.close(figure)
            written.append(path)
    return written


def plot_bars(spec, bars, figures_dir):
    names, columns = list(bars), list(next(iter(bars.values())))
    width = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(max(6.4, 1.4 * len(columns) + 0.3 * len(names)), 4))
    for i, name in enumerate(names):
        positions = [c + (i - (len(names) - 1) / 2) * width for c in range(len(columns))]
        axes.bar(positions, [bars[name][c] for c in columns], width, label=name)
    axes.set_xticks(range(len(columns)), columns)
    axes.set(title=f"Reranking quality on {spec}", ylabel="score (mean over seeds)", ylim=(0, 1))
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    path = figures_dir / f"metrics-{data_folder(spec)}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@exit_on_input_error
def main(argv=None):
    # 1. Arguments and inputs
    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses(args=argv)
    results = Path(args.results)
    metrics_file = results / "eval" / "metrics.json"
    if not metrics_file.is_file():
        raise InputError(f"{metrics_file}: no such file (run evaluate.py --output_dir {results / 'eval'} first)")
    metrics = read_json(metrics_file)
    if not metrics or not all(metrics.values()):
        raise InputError(f"{metrics_file}: no results in it")
    figures_dir = results / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)

    # 2. The tables of the final models, per data spec, and their bar charts
    tables, bars = sections(metrics, results / "eval", reference=args.reference)
    figures = [plot_bars(spec, values, figures_dir) for spec, values in bars.items()]

    # 3. The same per checkpoint, where run_all.sh evaluated them: the thesis tracked its three epochs and reported
    #    each run's best
    checkpoints_file = results / "eval-checkpoints" / "metrics.json"
    if checkpoints_file.is_file():
        per_checkpoint = read_json(checkpoints_file)
        places = checkpoint_places(list(next(iter(per_checkpoint.values()), {})), results / "runs")
        tables += sections(per_checkpoint, results / "eval-checkpoints", places, args.reference)[0]
    seeds_note = ", per-query values averaged over seeds" if "seeds)" in "".join(tables) else ""
    note = f"{REFERENCE_MARK} differs from {args.reference} on the same backbone, p < {ALPHA} (two-sided paired t-test"
    note += " over queries"
    table = "# Results\n\n" + "\n".join(tables) + f"\n{note}{seeds_note}).\n"
    if checkpoints_file.is_file():  # the thesis's protocol reads each run's best checkpoint off these rows
        table += ("Per checkpoint: a best checkpoint picked from these rows is selected on the test set: optimistic "
                  "(a study with validation data chooses there instead: results/study.md).\n")
    write_atomic(results / "table.md", table)

    # 4. Training dynamics
    figures += plot_curves(training_curves(results / "runs"), figures_dir, args.reference)
    print(table)
    print(f"Wrote {results / 'table.md'} and {len(figures)} figures in {figures_dir}")


if __name__ == "__main__":
    main()
