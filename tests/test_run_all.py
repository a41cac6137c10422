"""run_all.sh --demo, shortened by pass-through train.py flags: the same code path ends with a table and figures, a
second run skips the finished work, a third resumes or restarts interrupted runs, side by side as on two GPUs, and
re-evaluates their models; a fourth has one run fail and the other finish."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


# On "GPUs" here: python that notes each script it runs (start, end, CUDA_VISIBLE_DEVICES, arguments), and
# `accelerate launch` that notes its own arguments and runs the script in one process of that python.
LOGGED_PYTHON = """#!/usr/bin/env bash
[[ "${1:-}" == *.py ]] && echo "start $(date +%s.%N) CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*" >> "$LAUNCHES"
"$REAL_PYTHON" "$@"
status=$?
[[ "${1:-}" == *.py ]] && echo "end $(date +%s.%N) CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*" >> "$LAUNCHES"
exit $status
"""
FAKE_ACCELERATE = """#!/usr/bin/env bash
echo "accelerate $*" >> "$LAUNCHES"
while [[ "$1" != *.py ]]; do shift; done
exec "$PYTHON" "$@"
"""


def run_all(output, *extra, gpus=None):
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", str(Path(os.sys.executable)))}
    flags = []
    if gpus:
        bin_dir = output.parent / "bin"
        bin_dir.mkdir(exist_ok=True)
        for name, text in [("python", LOGGED_PYTHON), ("accelerate", FAKE_ACCELERATE)]:
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        env.update(PATH=f"{bin_dir}:{env['PATH']}", LAUNCHES=str(output.parent / "launches.txt"),
                   REAL_PYTHON=env["PYTHON"], PYTHON=str(bin_dir / "python"))  # fmt: skip
        flags = ["--gpus", gpus]
    return subprocess.run(
        ["bash", "run_all.sh", "--demo", "--output", str(output), *flags, "--", *extra],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip


def launches(path):
    """The notes of LOGGED_PYTHON -> {output_dir or script: (start, end, CUDA_VISIBLE_DEVICES, arguments)}, and the
    argument lists accelerate was launched with."""
    calls, accelerate = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("accelerate "):
            accelerate.append(line.split()[1:])
            continue
        event, time, devices, *args = line.split()
        key = args[args.index("--output_dir") + 1] if "train.py" in args else next(a for a in args if a.endswith(".py"))
        start, end, _, _ = calls.get(key, (None, None, None, None))
        calls[key] = (float(time), end, devices, args) if event == "start" else (start, float(time), devices, args)
    return calls, accelerate


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
    third = run_all(output, *short, gpus="0 1")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"== {lion}: resuming on GPU " in third.stdout
    assert f"== {adamw}: no checkpoint, starting over on GPU " in third.stdout
    assert json.loads((lion / "trainer_state.json").read_text())["global_step"] == 4  # resumed: no 5th step
    for run in (adamw, lion):
        assert load_file(run / "model.safetensors").keys() == weights[run].keys()
        assert all(torch.equal(load_file(run / "model.safetensors")[k], v) for k, v in weights[run].items())
        log = (output / "logs" / f"{run.name}.log").read_text()  # each run's output in its own log, not here
        assert "optimizer stepping" in log and "optimizer stepping" not in third.stdout + third.stderr
    # One run per GPU, side by side, each one process of train.py (the thesis's batch of 16 on one GPU); evaluation
    # shared out over both GPUs by accelerate
    calls, accelerate = launches(output.parent / "launches.txt")
    (a_start, a_end, a_gpu, _), (l_start, l_end, l_gpu, _) = calls[str(adamw)], calls[str(lion)]
    assert {a_gpu, l_gpu} == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    assert a_start < l_end and l_start < a_end  # they overlapped
    assert calls["evaluate.py"][2] == "CUDA_VISIBLE_DEVICES=0,1"
    [eval_launch] = accelerate  # train.py runs without a launcher
    assert eval_launch[:3] == ["launch", "--num_processes", "2"] and "evaluate.py" in eval_launch
    assert "up to date, skipped" not in third.stdout
    assert (output / "eval" / "metrics.json").stat().st_mtime_ns > before[-1]
    assert (output / "table.md").read_text() == table  # the same models give the same numbers

    # A run that fails stops no other, and nothing is evaluated: exit 1, naming it
    evaluated = (output / "eval" / "metrics.json").stat().st_mtime_ns
    (adamw / "model.safetensors").unlink()  # resumes at its last step: saves its model again
    (lion / "model.safetensors").unlink()
    for checkpoint in lion.glob("checkpoint-*"):
        (checkpoint / "trainer_state.json").write_text("not json")
    fourth = run_all(output, *short, gpus="0 1")
    assert fourth.returncode == 1
    assert f"== {lion}: failed, see {output / 'logs' / lion.name}.log" in fourth.stdout
    assert fourth.stderr.strip().splitlines()[-1] == f"error: 1 run(s) failed, not evaluated: {lion}"
    assert (adamw / "model.safetensors").is_file() and not (lion / "model.safetensors").exists()
    assert (output / "eval" / "metrics.json").stat().st_mtime_ns == evaluated


def test_several_gpus_start_the_longest_runs_first(tmp_path):
    """Longest processing time first: ModernBERT's runs, then GTE's, then MiniLM's, so the last to start is short.
    Here train.py only notes that it ran (and takes a second, so the two workers' notes keep the queue's order)."""
    bin_dir, output = tmp_path / "bin", tmp_path / "grid"
    bin_dir.mkdir()
    noting_python = """#!/usr/bin/env bash
case "${1:-}" in
  train.py) args=("$@"); for i in "${!args[@]}"; do [ "${args[$i]}" = --output_dir ] && dir=${args[$((i + 1))]}; done
            echo "$(basename "$dir") CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >> "$LAUNCHES"; sleep 1 ;;
  *.py) ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""
    for name, text in [("python", noting_python), ("accelerate", FAKE_ACCELERATE)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCHES": str(tmp_path / "launches.txt"),
           "REAL_PYTHON": os.sys.executable, "PYTHON": str(bin_dir / "python")}  # fmt: skip
    done = subprocess.run(
        ["bash", "run_all.sh", "--models", "minilm gte modernbert", "--output", str(output), "--gpus", "0 1"],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    notes = (tmp_path / "launches.txt").read_text().splitlines()
    started = [line.split() for line in notes if not line.startswith("accelerate ")]
    assert [run.rsplit("-", 1)[0] for run, _ in started] == ["modernbert"] * 2 + ["gte"] * 2 + ["minilm"] * 2
    assert {run for run, _ in started} == {f"{m}-{o}" for m in ("minilm", "gte", "modernbert") for o in ("adamw", "lion")}
    assert {gpu for _, gpu in started[:2]} == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    [evaluation] = [line for line in notes if line.startswith("accelerate ")]  # the table keeps the order asked for
    assert [Path(m).name for m in evaluation.split("--models ")[1].split(" --")[0].split()] == [
        f"{m}-{o}" for m in ("minilm", "gte", "modernbert") for o in ("adamw", "lion")
    ]
