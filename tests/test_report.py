"""report.py: the table over seeds (mean ± std), Lion vs AdamW significance, the thesis layout, the figures."""

import json
import re

import pytest

import report
from data_specs import data_folder

MEASURES = ["nDCG@10", "AP(rel=2)", "RR(rel=2)@10", "Rprec(rel=2)", "P(rel=2)@10"]  # evaluate.py's default set


def write_eval(results, spec, per_query, offset=0.0, eval_dir="eval"):
    """An evaluate.py output for `spec` from per-query values {system: {query: value}}: measure i of the five defaults
    gets value + offset + 0.01 i, so every column and data set has numbers of its own."""
    folder = results / eval_dir / data_folder(spec)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for system, values in per_query.items():
        rows = {q: {m: v + offset + 0.01 * i for i, m in enumerate(MEASURES)} for q, v in values.items()}
        (folder / f"{system}.per_query.json").write_text(json.dumps(rows))
        metrics[system] = {m: sum(row[m] for row in rows.values()) / len(rows) for m in MEASURES}
    return metrics


def write_run(results, name, backbone=None, optimizer=None, seed=1, **training):
    """A run folder with the run_config.json train.py writes: what it trained (the folder name is only a label). By
    default, backbone and optimizer are those of a run_all.sh name `BACKBONE-OPTIMIZER[-seedN]`."""
    named = re.fullmatch(r"(.+?)-([^-]+)(?:-seed(\d+))?", name)
    backbone, optimizer = backbone or named[1], optimizer or named[2]
    seed = int(named[3]) if named and named[3] else seed
    folder = results / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {"backbone": f"hub/{backbone}", "optimizer": optimizer, "loss": "bce", "script": {"model": backbone},
              "training": {"seed": seed, "learning_rate": 2e-5, **training}}  # fmt: skip
    (folder / "run_config.json").write_text(json.dumps(config))
    return folder


def test_table_shows_mean_and_std_over_seeds_marks_lion_vs_adamw_and_the_thesis_layout(tmp_path, capsys):
    queries = range(8)
    per_query = {
        "BM25": {f"q{i}": 0.3 for i in queries},
        # MiniLM: Lion better on every query once seeds are averaged (0.60 + 0.01 i against 0.60): p = 0.005
        "minilm-adamw-seed1": {f"q{i}": 0.5 for i in queries},
        "minilm-adamw-seed2": {f"q{i}": 0.7 for i in queries},
        "minilm-lion-seed1": {f"q{i}": 0.55 + 0.01 * i for i in queries},
        "minilm-lion-seed2": {f"q{i}": 0.65 + 0.01 * i for i in queries},
        # GTE: Lion's first seed beats AdamW on every query, its second loses as much: averaged, 0.5 +- 0.01
        # against 0.5, p = 1, no mark (a test of the first seed alone would mark it)
        "gte-adamw-seed1": {f"q{i}": 0.5 for i in queries},
        "gte-adamw-seed2": {f"q{i}": 0.5 for i in queries},
        "gte-lion-seed1": {f"q{i}": 0.6 + 0.01 * i for i in queries},
        "gte-lion-seed2": {f"q{i}": 0.4 - 0.01 * i + (0.02 if i % 2 == 0 else -0.02) for i in queries},
    }
    metrics = {"dl19": write_eval(tmp_path, "dl19", per_query)}
    metrics["dev-small"] = write_eval(tmp_path, "dev-small", per_query, offset=0.1)
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for run in [system for system in per_query if system != "BM25"]:
        write_run(tmp_path, run)
    for run, optimizer in (("minilm-adamw-seed1", "adamw"), ("minilm-lion-seed1", "lion")):
        history = [{"step": s, "loss": 0.7 - 0.01 * s, "learning_rate": 1e-5, "grad_norm": 1.0} for s in (5, 10, 15)]
        (tmp_path / "runs" / run / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    report.main(["--results", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert table in capsys.readouterr().out
    dl19 = table[table.index("## dl19") : table.index("## dev-small")]
    dev = table[table.index("## dev-small") :]
    thesis = table[table.index("## Thesis layout") : table.index("## dl19")]
    # Columns NDCG@10, MAP, MRR@10, R-Prec, P@10 = measures 0-4. AdamW seeds 0.5 and 0.7: 0.6 +- 0.1414 (sample std);
    # Lion seeds 0.585 and 0.685: 0.635 +- 0.0707; GTE Lion 0.635 and 0.365: 0.5 +- 0.1909.
    assert "| BM25 | 0.3000 | 0.3100 | 0.3200 | 0.3300 | 0.3400 |" in dl19
    assert "| minilm-adamw (2 seeds) | 0.6000 ± 0.1414 | 0.6100 ± 0.1414 | 0.6200 ± 0.1414 |" in dl19
    assert "| minilm-lion (2 seeds) | 0.6350 ± 0.0707‡ | 0.6450 ± 0.0707‡ | 0.6550 ± 0.0707‡ |" in dl19
    assert "| gte-adamw (2 seeds) | 0.5000 ± 0.0000 | 0.5100 ± 0.0000 |" in dl19
    assert "| gte-lion (2 seeds) | 0.5000 ± 0.1909 | 0.5100 ± 0.1909 | 0.5200 ± 0.1909 | 0.5300 ± 0.1909 |" in dl19
    assert "| BM25 | 0.4000 | 0.4100 | 0.4200 | 0.4300 | 0.4400 |" in dev
    assert "| minilm-lion (2 seeds) | 0.7350 ± 0.0707‡ |" in dev
    # The thesis layout: NDCG@10, MAP, R-Prec, P@10 of dl19 (measures 0, 1, 3, 4) and MRR@10 of dev-small (2)
    assert "| System | NDCG@10 (DL19) | MAP (DL19) | R-Prec (DL19) | P@10 (DL19) | MRR@10 (dev-small) |" in thesis
    assert "| BM25 | 0.3000 | 0.3100 | 0.3300 | 0.3400 | 0.4200 |" in thesis
    adamw = ["0.6000 ± 0.1414", "0.6100 ± 0.1414", "0.6300 ± 0.1414", "0.6400 ± 0.1414", "0.7200 ± 0.1414"]
    gte_lion = ["0.5000 ± 0.1909", "0.5100 ± 0.1909", "0.5300 ± 0.1909", "0.5400 ± 0.1909", "0.6200 ± 0.1909"]
    assert f"| minilm-adamw (2 seeds) | {' | '.join(adamw)} |" in thesis
    assert f"| gte-lion (2 seeds) | {' | '.join(gte_lion)} |" in thesis
    # The bar chart's values: means over seeds
    _, bars = report.data_table("dl19", metrics["dl19"], tmp_path / "eval")
    assert bars["minilm-adamw"]["NDCG@10"] == pytest.approx(0.6) and bars["gte-lion"]["P@10"] == pytest.approx(0.54)
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert figures == {"minilm-loss.png", "minilm-learning_rate.png", "minilm-grad_norm.png",
                       "metrics-dl19.png", "metrics-dev-small.png"}  # no eval loss logged: no eval-loss figure


def test_checkpoints_are_rows_per_configuration_and_epoch_with_lion_tested_against_adamw_at_the_same_epoch(tmp_path):
    """run_all.sh's eval-checkpoints/: checkpoint systems (`RUN-checkpoint-STEP`) become rows `CONFIGURATION epoch N`,
    over seeds, and `... step STEP` for a checkpoint inside an epoch; their first stage's row is the final table's."""
    queries = range(8)
    final = {"minilm-adamw-seed1": {f"q{i}": 0.6 for i in queries}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"dl19": write_eval(tmp_path, "dl19", final)}))
    epochs = {"minilm-adamw-seed1": {100: 1.0, 200: 2.0}, "minilm-adamw-seed2": {100: 1.0, 200: 2.0},
              "minilm-lion-seed1": {200: 2.0, 100: 1.0, 150: 1.5}}  # fmt: skip
    for run, steps in epochs.items():
        write_run(tmp_path, run)
        for step, epoch in steps.items():
            checkpoint = tmp_path / "runs" / run / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": epoch}))
    per_query = {
        "BM25": {f"q{i}": 0.3 for i in queries},
        # epoch 1: Lion better than AdamW on every query but one (0.50 + 0.01 i against 0.50): p = 0.005, marked
        "minilm-adamw-seed1-checkpoint-100": {f"q{i}": 0.5 for i in queries},
        "minilm-adamw-seed2-checkpoint-100": {f"q{i}": 0.5 for i in queries},
        "minilm-lion-seed1-checkpoint-100": {f"q{i}": 0.5 + 0.01 * i for i in queries},
        "minilm-lion-seed1-checkpoint-150": {f"q{i}": 0.55 for i in queries},
        # epoch 2: AdamW's seeds 0.5 and 0.7, Lion 0.6 on every query: p = 1, no mark
        "minilm-adamw-seed1-checkpoint-200": {f"q{i}": 0.5 for i in queries},
        "minilm-adamw-seed2-checkpoint-200": {f"q{i}": 0.7 for i in queries},
        "minilm-lion-seed1-checkpoint-200": {f"q{i}": 0.6 for i in queries},
    }
    metrics = {spec: write_eval(tmp_path, spec, per_query, eval_dir="eval-checkpoints")
               for spec in ("dl19", "msmarco-v1.1-val")}  # fmt: skip
    (tmp_path / "eval-checkpoints" / "metrics.json").write_text(json.dumps(metrics))

    report.main(["--results", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()

    final_table, checkpoints = table.split("## Thesis layout (Table 5.1): TREC DL 2019 and msmarco-v1.1-val, per ")
    assert "| minilm-adamw | 0.6000 |" in final_table and "epoch" not in final_table
    thesis, dl19 = checkpoints.split("## dl19, per checkpoint")
    dl19 = dl19.split("## msmarco-v1.1-val, per checkpoint")[0]
    rows = [line.split(" | ")[:2] for line in dl19.splitlines() if line.startswith("| minilm")]
    assert rows == [
        ["| minilm-adamw epoch 1 (2 seeds)", "0.5000 ± 0.0000"],
        ["| minilm-adamw epoch 2 (2 seeds)", "0.6000 ± 0.1414"],
        ["| minilm-lion epoch 1", "0.5350‡"],
        ["| minilm-lion step 150", "0.5500"],
        ["| minilm-lion epoch 2", "0.6000"],
    ]
    assert "BM25" not in checkpoints
    # NDCG@10, MAP, R-Prec, P@10 of dl19 (measures 0, 1, 3, 4) and MRR@10 of msmarco-v1.1-val (2)
    assert "| minilm-lion epoch 1 | 0.5350‡ | 0.5450‡ | 0.5650‡ | 0.5750‡ | 0.5550‡ |" in thesis


def test_measures_chosen_with_metrics_keep_their_own_names_and_there_is_no_thesis_layout(tmp_path):
    chosen = ["nDCG@20", "AP", "RR@10", "P@5", "R@100"]  # five, as many as the default set, but not it
    for spec in ("dl19", "dev-small"):
        folder = tmp_path / "eval" / data_folder(spec)
        folder.mkdir(parents=True)
        (folder / "BM25.per_query.json").write_text(json.dumps({"q1": {m: 0.5 for m in chosen}}))
    metrics = {spec: {"BM25": {m: 0.5 for m in chosen}} for spec in ("dl19", "dev-small")}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))

    report.main(["--results", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()

    assert "| System | nDCG@20 | AP | RR@10 | P@5 | R@100 |" in table and "NDCG@10" not in table
    assert "Thesis layout" not in table


def test_damaged_results_are_a_one_line_error_naming_the_file(tmp_path, capsys):
    write_eval(tmp_path, "dl19", {"BM25": {"q1": 0.5}})
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"dl19": {"BM25": {"nDCG@10": 0.5}}}))
    (tmp_path / "eval" / "dl19" / "BM25.per_query.json").write_text('{"q1": {"nDCG@10"')  # cut short
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--results", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "BM25.per_query.json: not complete JSON" in error
    assert len(error.strip().splitlines()) == 1


def test_figures_draw_each_runs_logged_curve_in_its_optimizers_colour_and_the_tables_means_as_bars(
    tmp_path, monkeypatch
):
    histories = {  # run -> (steps, training losses); Lion also logged an evaluation loss
        "minilm-adamw-seed1": ([5, 10, 15], [0.70, 0.60, 0.50]),
        "minilm-adamw-seed2": ([5, 10, 15], [0.72, 0.62, 0.52]),
        "minilm-lion-seed1": ([5, 10], [0.69, 0.65]),
    }
    for run, (steps, losses) in histories.items():
        write_run(tmp_path, run)
        history = [{"step": s, "loss": x, "learning_rate": s * 1e-6, "grad_norm": 1.0} for s, x in zip(steps, losses)]
        if "lion" in run:
            history.append({"step": 10, "eval_loss": 0.66})
        (tmp_path / "runs" / run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    per_query = {"BM25": {"q1": 0.2, "q2": 0.4}, "minilm-adamw-seed1": {"q1": 0.5, "q2": 0.7}}
    metrics = {"dl19": write_eval(tmp_path, "dl19", per_query)}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    drawn = {}  # figure title -> its axes, caught as report.py closes each figure
    monkeypatch.setattr(report.plt, "close", lambda figure: drawn.update({figure.axes[0].get_title(): figure.axes[0]}))

    report.main(["--results", str(tmp_path)])

    lines = {line.get_label(): line for line in drawn["minilm: Training loss"].get_lines()}
    assert set(lines) == set(histories)
    for run, (steps, losses) in histories.items():
        assert list(lines[run].get_xdata()) == steps and list(lines[run].get_ydata()) == losses
        assert lines[run].get_color() == ("tab:orange" if "lion" in run else "tab:blue")
    [eval_line] = drawn["minilm: Evaluation loss"].get_lines()
    assert eval_line.get_label() == "minilm-lion-seed1" and list(eval_line.get_ydata()) == [0.66]
    assert list(drawn["minilm: Learning rate"].get_lines()[0].get_ydata()) == pytest.approx([5e-6, 1e-5, 1.5e-5])
    bars = drawn["Reranking quality on dl19"]
    by_system = {}
    for container in bars.containers:  # one per system, a bar per column: the table's means
        by_system[container.get_label()] = [patch.get_height() for patch in container.patches]
    assert by_system["BM25"] == pytest.approx([0.3, 0.31, 0.32, 0.33, 0.34])
    assert by_system["minilm-adamw"] == pytest.approx([0.6, 0.61, 0.62, 0.63, 0.64])
    assert [label.get_text() for label in bars.get_xticklabels()] == ["NDCG@10", "MAP", "MRR@10", "R-Prec", "P@10"]


def test_runs_are_what_their_run_config_says_and_every_optimizer_is_tested_against_the_reference(tmp_path, monkeypatch):
    """Folder names are labels: two runs named `lr=5e-06 a` and `... b` are one Lion configuration over two seeds. A
    third optimizer (adafactor) gets its own row, test against AdamW and colour; --reference changes the reference."""
    queries = range(8)
    per_query = {
        "BM25": {f"q{i}": 0.3 for i in queries},
        "minilm-adamw": {f"q{i}": 0.5 for i in queries},
        "minilm-adafactor": {f"q{i}": 0.5 + 0.01 * i for i in queries},  # better on 7 of 8 queries: p = 0.005
        "lr=5e-06 a": {f"q{i}": 0.55 + 0.01 * i for i in queries},  # averaged over seeds: adafactor's values
        "lr=5e-06 b": {f"q{i}": 0.45 + 0.01 * i for i in queries},
    }
    metrics = {"dl19": write_eval(tmp_path, "dl19", per_query)}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for run in ("minilm-adamw", "minilm-adafactor"):
        write_run(tmp_path, run)
    for run, seed in (("lr=5e-06 a", 1), ("lr=5e-06 b", 2)):
        write_run(tmp_path, run, backbone="minilm", optimizer="lion", seed=seed, learning_rate=5e-6)
    for run in per_query:
        if run != "BM25":
            history = [{"step": s, "loss": 0.7 - 0.01 * s} for s in (5, 10)]
            (tmp_path / "runs" / run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    drawn = {}
    monkeypatch.setattr(report.plt, "close", lambda figure: drawn.update({figure.axes[0].get_title(): figure.axes[0]}))

    report.main(["--results", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert "| minilm-adamw | 0.5000 |" in table
    assert "| minilm-adafactor | 0.5350‡ |" in table
    assert "| lr=5e-06 a (2 seeds) | 0.5350 ± 0.0707‡ |" in table
    assert "‡ differs from adamw on the same backbone" in table
    colors = {line.get_label(): line.get_color() for line in drawn["minilm: Training loss"].get_lines()}
    assert colors["minilm-adamw"] == "tab:blue" and colors["lr=5e-06 a"] == colors["lr=5e-06 b"]
    assert len({colors["minilm-adamw"], colors["minilm-adafactor"], colors["lr=5e-06 a"]}) == 3

    report.main(["--results", str(tmp_path), "--reference", "adafactor"])
    table = (tmp_path / "table.md").read_text()
    assert "| minilm-adamw | 0.5000‡ |" in table and "| minilm-adafactor | 0.5350 |" in table
    assert "| lr=5e-06 a (2 seeds) | 0.5350 ± 0.0707 |" in table  # the same per-query means as adafactor: p = 1
