"""run_all.sh --demo, shortened by pass-through train.py flags: the same code path ends with a table and figures, a
second run skips the finished work, a third resumes or restarts interrupted runs and re-evaluates their models."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run_all(output, *extra):
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", str(Path(os.sys.executable)))}
    return subprocess.run(
        ["bash", "run_all.sh", "--demo", "--output", str(output), "--", *extra],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip


def test_demo_ends_with_table_and_figures_a_rerun_skips_finished_work_and_resumes_interrupted_runs(tmp_path):
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

    # Interrupted runs: Lion's ended after its last checkpoint (resumed from it), AdamW's before its first (started
    # over). Both end with the weights they had; their models are newer than the evaluation, which runs again.
    adamw, lion = output / "runs" / "minilm-l6-adamw", output / "runs" / "minilm-l6-lion"
    weights = {run: load_file(run / "model.safetensors") for run in (adamw, lion)}
    (lion / "model.safetensors").unlink()
    (adamw / "model.safetensors").unlink()
    for checkpoint in adamw.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    third = run_all(output, *short)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"== {lion}: resuming" in third.stdout and f"== {adamw}: no checkpoint, starting over" in third.stdout
    assert json.loads((lion / "trainer_state.json").read_text())["global_step"] == 4  # resumed: no 5th step
    for run in (adamw, lion):
        assert load_file(run / "model.safetensors").keys() == weights[run].keys()
        assert all(torch.equal(load_file(run / "model.safetensors")[k], v) for k, v in weights[run].items())
    assert "up to date, skipped" not in third.stdout
    assert (output / "eval" / "metrics.json").stat().st_mtime_ns > before[-1]
    assert (output / "table.md").read_text() == table  # the same models give the same numbers
