"""report.py: the table over seeds (mean ± std), Lion vs AdamW significance, the thesis layout, the figures."""

import json

import pytest

import report
from evaluate import data_folder


def write_eval(results, spec, per_query):
    """An evaluate.py output for `spec`: per-query values {system: {query: value}} of the five default measures."""
    measures = ["nDCG@10", "AP(rel=2)", "RR(rel=2)@10", "Rprec(rel=2)", "P(rel=2)@10"]
    folder = results / "eval" / data_folder(spec)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for system, values in per_query.items():
        (folder / f"{system}.per_query.json").write_text(
            json.dumps({q: {m: v for m in measures} for q, v in values.items()})
        )
        metrics[system] = {m: sum(values.values()) / len(values) for m in measures}
    return metrics


def test_table_shows_mean_and_std_over_seeds_marks_lion_vs_adamw_and_the_thesis_layout(tmp_path, capsys):
    queries = [f"q{i}" for i in range(8)]
    adamw = {q: 0.5 for q in queries}
    lion = {q: 0.5 + 0.1 + 0.01 * i for i, q in enumerate(queries)}  # consistently better: significant
    per_query = {
        "BM25": {q: 0.3 for q in queries},
        "minilm-adamw-seed1": adamw, "minilm-adamw-seed2": {q: 0.7 for q in queries},
        "minilm-lion-seed1": lion, "minilm-lion-seed2": {q: v + 0.2 for q, v in lion.items()},
    }  # fmt: skip
    metrics = {spec: write_eval(tmp_path, spec, per_query) for spec in ("dl19", "dev-small")}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    for run, optimizer in (("minilm-adamw-seed1", "adamw"), ("minilm-lion-seed1", "lion")):
        (tmp_path / "runs" / run).mkdir(parents=True)
        history = [{"step": s, "loss": 0.7 - 0.01 * s, "learning_rate": 1e-5, "grad_norm": 1.0} for s in (5, 10, 15)]
        (tmp_path / "runs" / run / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    report.main(["--results", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    assert table in capsys.readouterr().out
    # adamw seeds: 0.5 and 0.7 -> 0.6000 ± 0.1414; lion: 0.635 and 0.835 -> 0.7350 ± 0.1414, marked
    assert "| minilm-adamw (2 seeds) | 0.6000 ± 0.1414 | 0.6000 ± 0.1414 |" in table
    assert "| minilm-lion (2 seeds) | 0.7350 ± 0.1414‡ |" in table
    assert "| BM25 | 0.3000 | 0.3000 |" in table
    assert "## Thesis layout (Table 5.1): TREC DL 2019 and dev-small" in table
    assert "| System | NDCG@10 (DL19) | MAP (DL19) | R-Prec (DL19) | P@10 (DL19) | MRR@10 (dev-small) |" in table
    figures = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert figures == {"minilm-loss.png", "minilm-learning_rate.png", "minilm-grad_norm.png",
                       "metrics-dl19.png", "metrics-dev-small.png"}  # no eval loss logged: no eval-loss figure


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
