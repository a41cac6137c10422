"""run_all.sh --demo, shortened by pass-through train.py flags: the same code path ends with a table and figures, and
a second run skips the finished work, a third re-evaluates a model that changed."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_all(output, *extra):
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", str(Path(os.sys.executable)))}
    return subprocess.run(
        ["bash", "run_all.sh", "--demo", "--output", str(output), "--", *extra],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip


def test_demo_ends_with_the_table_and_figures_and_a_rerun_skips_finished_work(tmp_path):
    output = tmp_path / "demo"
    short = ["--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"]
    first = run_all(output, *short)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (output / "table.md").read_text()
    for row in ("| BM25 |", "| untrained |", "| minilm-l6-adamw |", "| minilm-l6-lion |"):
        assert row in table and row in first.stdout
    figures = {p.name for p in (output / "figures").glob("*.png")}
    assert {f"minilm-l6-{curve}.png" for curve in ("loss", "eval_loss", "learning_rate", "grad_norm")} <= figures
    assert "metrics-demo-test.png" in figures
    models = sorted((output / "runs").glob("*/model.safetensors"))
    assert len(models) == 3
    before = [m.stat().st_mtime_ns for m in models] + [(output / "eval" / "metrics.json").stat().st_mtime_ns]

    second = run_all(output, *short)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished, skipped") == 2 and "up to date, skipped" in second.stdout
    after = [m.stat().st_mtime_ns for m in models] + [(output / "eval" / "metrics.json").stat().st_mtime_ns]
    assert before == after
    assert (output / "table.md").read_text() == table

    os.utime(models[0])  # a model newer than the evaluation: evaluated again, replacing the old one
    third = run_all(output, *short)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "up to date, skipped" not in third.stdout
    assert (output / "eval" / "metrics.json").stat().st_mtime_ns > before[-1]
    assert (output / "table.md").read_text() == table  # the same models give the same numbers
