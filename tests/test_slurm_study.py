"""run_all.sh --slurm and --status (slurm_jobs.py, slurm_task.sh): a study on a real single-node Slurm (the `slurm`
fixture), where every run finishes, one stopped by its time limit requeues itself and resumes to the weights of an
unbroken run, the evaluation job runs after the array and writes the table, a second call submits nothing twice and
--status is right at each stage; a cancelled task is not requeued. Without a real Slurm: the sbatch lines for GPUs
(a stand-in sbatch notes them), the states --status names, and the refused options."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slurm_jobs
import study
import train
from cli import InputError
from test_run_all import PYTHON, bash_run_all

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"train_data": "data/demo:train", "negatives_per_query": 4, "max_length": 64, "logging_steps": 500,
         "warmup_steps": 0, "save_strategy": "steps", "save_steps": 100000}  # fmt: skip


def run_all(*args, env=None):
    return bash_run_all(*args, **(env or {}))


def status_of(output_lines):
    """--status's lines -> {run folder or "evaluation": state}."""
    return dict(line.split(": ", 1) for line in output_lines.splitlines() if not line.startswith("== "))


def steps_per_second(model, tmp_path):
    """This machine's training speed on one thread, for a run that outlasts the time limit's signal here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.monotonic()
        train.main(["--model", model, "--optim", "adamw", "--max_steps", "300", "--output_dir", str(tmp_path / "speed"),
                    "--report_to", "none", *study.as_flags(TRAIN)])  # fmt: skip
        return 300 / (time.monotonic() - start)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slurm
def test_a_study_on_slurm_finishes_every_run_resumes_a_time_limited_one_exactly_and_evaluates_after_the_array(
    slurm, tiny_bert, tmp_path
):
    # The long run: 50 s of steps on one thread here, so that the signal, 20-50 s after its start (below), stops it;
    # the two others take seconds
    t0 = time.monotonic()
    long_steps = max(1000, int(round(steps_per_second(tiny_bert, tmp_path) * 50, -2)))
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps({"models": [tiny_bert], "seeds": [1], "train": TRAIN, "selection": "test",
                                "optimizers": {"adamw": {"max_steps": [long_steps, 40]}, "lion": {"max_steps": [40]}},
                                "test": ["data/demo:test"], "top_k": 30}))  # fmt: skip
    output = tmp_path / "out"
    plan = study.plan(study.load_study(str(spec)), str(output))
    runs = [run.dir for run in plan]
    assert [Path(run).name.split("-")[-2:] for run in runs] == [["adamw", f"max_steps{long_steps}"],
                                                                ["adamw", "max_steps40"], ["lion", "max_steps40"]]
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # the jobs get this environment
    study_options = ["--study", spec, "--output", output]

    # 1. Submitted while the node is busy: every task waits, the evaluation after them; a second call adds nothing.
    # --time=1 with TERM@10: slurmctld signals at its first 30-s check with at most 10 + 30 s left, 20-50 s in.
    busy = slurm.sbatch("--exclusive", f"--output={tmp_path}/busy.out", "--wrap=sleep 600")
    slurm.wait(busy, until=("RUNNING",))
    slurm_options = ["--slurm", "--sbatch", "--time=1 --signal=B:TERM@10 --mem=1G", "--eval_sbatch", "--time=10"]
    first = run_all(*study_options, *slurm_options, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    array = re.search(r"the training, job (\d+) \(3 tasks", first.stdout).group(1)
    evaluation = re.search(r"the evaluation, job (\d+) \(after job (\d+)\)", first.stdout).groups()
    assert evaluation[1] == array
    evaluation = evaluation[0]
    print(f"{time.monotonic() - t0:.0f} s\n" + first.stdout)
    queued = run_all(*study_options, "--status", env=env)
    print(f"{time.monotonic() - t0:.0f} s\n" + queued.stdout)
    assert status_of(queued.stdout) == {**{run: f"queued (job {array}_{i})" for i, run in enumerate(runs)},
                                        "evaluation": f"queued (job {evaluation})"}  # fmt: skip
    again = run_all(*study_options, *slurm_options, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    print(again.stdout)
    assert "== 3 runs: 0 finished, 3 queued or running (job " + array + "), 0 to submit" in again.stdout
    assert f"== nothing new to submit: the evaluation is queued (job {evaluation})" in again.stdout
    assert "sbatch" not in again.stdout
    queue = slurm("squeue", "--me", "--array", "--noheader", "--format=%i").split()
    assert sorted(queue) == sorted([busy, evaluation, *(f"{array}_{i}" for i in range(3))])

    # 2. Running: the long run in its first start, then stopped by its time limit and requeued to resume
    slurm("scancel", busy)
    slurm.wait(f"{array}_0", until=("RUNNING",))
    running = run_all(*study_options, "--status", env=env)  # before the signal, unless this machine is very slow
    print(f"{time.monotonic() - t0:.0f} s\n" + running.stdout)
    assert re.fullmatch(rf"running \(job {array}_0\)(, checkpoint at step \d+ of {long_steps})?",
                        status_of(running.stdout)[runs[0]])  # fmt: skip
    long_log = output / "logs" / f"{Path(runs[0]).name}.log"
    deadline = time.monotonic() + 90
    while "requeued to resume" not in long_log.read_text():
        assert time.monotonic() < deadline, long_log.read_text()[-3000:]
        time.sleep(0.2)
    # One stop makes the point: the rest of the run in one go, and beside it the same run unbroken (one thread, as
    # each task)
    slurm("scontrol", "update", f"JobId={array}_0", "TimeLimit=10")
    unbroken_args = [str(tmp_path / "unbroken") if arg == runs[0] else arg for arg in plan[0].args]
    unbroken = subprocess.Popen([PYTHON, "train.py", *unbroken_args, "--report_to", "none"], cwd=REPO,
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    requeued = run_all(*study_options, "--status", env=env)
    print(f"{time.monotonic() - t0:.0f} s\n" + requeued.stdout)
    assert re.fullmatch(rf"(queued|running) \(job {array}_0\), checkpoint at step \d+ of {long_steps}",
                        status_of(requeued.stdout)[runs[0]])  # fmt: skip

    # 3. The evaluation job, after every task (the requeued one too), and the table of the three runs
    assert slurm.wait(array, timeout=400) == {f"{array}_{i}": "COMPLETED" for i in range(3)}
    assert slurm.wait(evaluation, timeout=300) == {evaluation: "COMPLETED"}
    evaluation_log = (output / "logs" / "evaluation.log").read_text()
    assert all(f"== {run}: finished, skipped" in evaluation_log for run in runs)
    table = (output / "table.md").read_text()
    assert all(f"| {Path(run).name} |" in table for run in runs)
    done = run_all(*study_options, "--status", env=env)
    print(f"{time.monotonic() - t0:.0f} s\n" + done.stdout)
    assert status_of(done.stdout) == {**{run: "finished" for run in runs}, "evaluation": f"done ({output}/table.md)"}
    assert done.stdout.splitlines()[-1] == "== 3 runs: 3 finished"

    # 4. The long run stopped and resumed (each start in its log), to the weights of the unbroken run
    log = long_log.read_text()
    starts = re.findall(r"^== .*: (training|resuming from step \d+) \(Slurm job (\d+_0), start (\d+)", log, re.M)
    assert [(what.split(" step")[0], task, start) for what, task, start in starts] == [
        ("training", f"{array}_0", "1"), ("resuming from", f"{array}_0", "2")]  # fmt: skip
    print(f"long run: {long_steps} steps, {len(starts)} starts: {[s[0] for s in starts]}")
    assert unbroken.wait(timeout=300) == 0
    expected, resumed = (load_file(Path(d) / "model.safetensors") for d in (tmp_path / "unbroken", runs[0]))
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.slurm
def test_a_cancelled_task_is_not_requeued_and_the_evaluation_names_its_run_and_reports_the_others(
    slurm, tiny_bert, tmp_path
):
    """scancel TERMs the whole job, the task's shell too: a task that requeued itself then could never be cancelled.
    The evaluation job, after the array however it ended, evaluates the run that finished and names the other."""
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({"models": [tiny_bert], "seeds": [1], "train": TRAIN, "selection": "test",
                                "optimizers": {"adamw": {"max_steps": [100000, 40]}},
                                "test": ["data/demo:test"], "top_k": 30}))  # fmt: skip
    output = tmp_path / "out"
    long_run, short_run = (run.dir for run in study.plan(study.load_study(str(spec)), str(output)))
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    submitted = run_all("--study", spec, "--output", output, "--slurm", "--sbatch", "--mem=1G", env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    array, evaluation = re.search(r"the training, job (\d+) .* the evaluation, job (\d+)", submitted.stdout).groups()
    log = output / "logs" / f"{Path(long_run).name}.log"
    deadline = time.monotonic() + 60
    while "optimizer stepping" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, slurm.states(array)
        time.sleep(0.2)
    slurm.wait(f"{array}_1")
    slurm("scancel", f"{array}_0")
    assert slurm.wait(array) == {f"{array}_0": "CANCELLED", f"{array}_1": "COMPLETED"}
    assert slurm.wait(evaluation, timeout=120) == {evaluation: "FAILED"}  # it ran, and says what it left out
    assert slurm.states(array)[f"{array}_0"] == "CANCELLED"  # not back in the queue (a requeue takes 6 s here)
    assert "Restarts=0" in slurm("scontrol", "show", "job", f"{array}_0").split()
    assert re.search(r"^== .*: stopped at step \d+; the job is \w+ \(cancelled or preempted\): not requeued$",
                     log.read_text(), re.M)  # fmt: skip
    evaluation_log = (output / "logs" / "evaluation.log").read_text()
    assert re.search(rf"^{long_run}: checkpoint at step \d+ of 100000$", evaluation_log, re.M)
    assert evaluation_log.splitlines()[-1] == f"error: 1 run(s) not finished, not evaluated: {long_run}"
    table = (output / "table.md").read_text()
    assert f"| {Path(short_run).name} |" in table and f"| {Path(long_run).name} |" not in table
    status = status_of(run_all("--study", spec, "--output", output, "--status", env=env).stdout)
    assert re.fullmatch(r"checkpoint at step \d+ of 100000", status[long_run])
    assert (status[short_run], status["evaluation"]) == ("finished", f"done ({output}/table.md)")


# Stand-ins for Slurm's commands where no Slurm runs: sbatch notes its arguments (a line each) and answers job ids
# from 101; squeue lists $STANDIN/queue; sinfo shows a GPU node; scontrol notes what it is asked
STANDINS = {
    "sbatch": 'n=$(( $(cat "$STANDIN/ids" 2> /dev/null || echo 100) + 1 )); echo $n > "$STANDIN/ids"\n'
              'printf "%s\\n" "$@" > "$STANDIN/sbatch-$n"; echo $n\n',
    "squeue": 'cat "$STANDIN/queue" 2> /dev/null; true\n',
    "sinfo": 'echo "gpu:h100:8(S:0-1)"\n',
    "scontrol": 'echo "$*" >> "$STANDIN/scontrol"\n',
}  # fmt: skip


def stand_in_slurm(folder):
    (folder / "bin").mkdir(parents=True)
    for name, text in STANDINS.items():
        (folder / "bin" / name).write_text("#!/usr/bin/env bash\n" + text)
        (folder / "bin" / name).chmod(0o755)
    return {"PATH": f"{folder / 'bin'}:{os.environ['PATH']}", "STANDIN": str(folder)}


def test_slurm_submits_the_thesis_grid_as_an_array_of_one_gpu_task_per_run_then_its_evaluation(tmp_path):
    env = stand_in_slurm(tmp_path)
    out = tmp_path / "results"
    done = run_all("--output", out, "--slurm", "--sbatch", "--partition=gpu --account=proj --time=24:00:00",
                   "--eval_sbatch", "--gpus-per-task=4 --cpus-per-task=32 --time=8:00:00", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    runs = [f"{model}-{optim}" for model in ("minilm", "gte", "modernbert") for optim in ("adamw", "lion")]
    assert done.stdout.splitlines()[:3] == [
        "== 6 runs: 0 finished, 0 queued or running, 6 to submit",
        f"== sbatch --parsable --hold --array=0-5 --requeue --output={out}/logs/slurm/%A_%a.log --open-mode=append "
        "--job-name=study-thesis --ntasks=1 --gpus-per-task=1 --mem=32G --signal=B:TERM@300 --partition=gpu "
        f"--account=proj --time=24:00:00 slurm_task.sh {out}/logs/slurm {PYTHON} none",
        f"== sbatch --parsable --dependency=afterany:101 --output={out}/logs/evaluation.log --open-mode=append "
        "--job-name=study-thesis-eval --ntasks=1 --mem=32G --partition=gpu --account=proj --gpus-per-task=4 "
        f"--cpus-per-task=32 --time=8:00:00 '--wrap=env PYTHON={PYTHON} bash run_all.sh --output {out} --no_training'",
    ]  # fmt: skip
    assert (tmp_path / "sbatch-101").read_text().splitlines()[-4:] == ["slurm_task.sh", f"{out}/logs/slurm", PYTHON,
                                                                       "none"]  # fmt: skip
    # Task K trains line K + 1 of the plan, its output in the run's log; released once both are written
    plan = (out / "logs" / "slurm" / "101.plan").read_text().splitlines()
    assert [line.split()[0] for line in plan] == [f"{out}/runs/{run}" for run in runs]
    assert plan[1] == (f"{out}/runs/minilm-lion minilm --model minilm --optim lion --seed 42 --output_dir "
                       f"{out}/runs/minilm-lion --run_name minilm-lion")  # fmt: skip
    assert [os.readlink(out / "logs" / "slurm" / f"101_{k}.log") for k in range(6)] == [f"../{r}.log" for r in runs]
    assert (tmp_path / "scontrol").read_text() == "release 101\n"
    assert f"   bash run_all.sh --output {out} --status" in done.stdout.splitlines()

    # Again, with two tasks in the queue, one run finished and one failed: the other three go, the evaluation after
    # the first array, the second and the evaluation queued before (they would write the same files)
    (tmp_path / "queue").write_text("101 0 RUNNING\n101 1 PENDING\n102 N/A PENDING\n")
    (out / "runs" / "gte-adamw").mkdir(parents=True)
    (out / "runs" / "gte-adamw" / "model.safetensors").write_bytes(b"")
    (out / "logs" / "gte-lion.log").write_text("== training\nRuntimeError: CUDA out of memory.\n")
    again = run_all("--output", out, "--slurm", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[0] == "== 6 runs: 1 finished, 2 queued or running (job 101), 3 to submit"
    assert (tmp_path / "sbatch-103").read_text().splitlines()[2] == "--array=0-2"
    assert [line.split()[0] for line in (out / "logs" / "slurm" / "103.plan").read_text().splitlines()] == [
        f"{out}/runs/{run}" for run in ("gte-lion", "modernbert-adamw", "modernbert-lion")]  # fmt: skip
    assert "--dependency=afterany:101:103:102" in (tmp_path / "sbatch-104").read_text().splitlines()


@pytest.mark.parametrize(
    "change, message",
    [({"validation": "data/demo:test#sample5"}, "validation data/demo:test#sample5 and test data/demo:test share 5 "
      "queries (e.g. "),
     ({"optimizers": {"adamw": {"learning_rat": [1e-5]}}}, "optimizers.adamw.learning_rat: not a train.py flag"),
     ({"train": {"max_steps": "ten"}}, 'train.max_steps: "ten" is not a valid int')],
)  # fmt: skip
def test_slurm_checks_the_runs_left_before_submitting_anything_without_loading_a_model(tmp_path, change, message):
    env = stand_in_slurm(tmp_path)  # "minilm": a hub id not in this machine's caches, never loaded
    spec = {"models": ["minilm"], "seeds": [1], "optimizers": {"adamw": {"learning_rate": [1e-5]}},
            "validation": "data/demo:train#sample5", "test": ["data/demo:test"], **change}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = run_all("--study", tmp_path / "spec.json", "--output", tmp_path / "out", "--slurm", env=env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and errors[0].startswith(f"error: {tmp_path / 'spec.json'}: {message}"), done.stderr
    assert (len(errors), list(tmp_path.glob("sbatch-*"))) == (1, [])  # one line, nothing submitted


def test_slurm_with_every_run_finished_submits_the_evaluation_alone_then_nothing_once_it_is_done(
    tmp_path, monkeypatch, capsys
):
    for name, value in stand_in_slurm(tmp_path).items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "results"
    runs = [(f"{out}/runs/{name}", f"{out}/runs/{name} m --seed 1") for name in ("a", "b")]
    for run_dir, _ in runs:
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "model.safetensors").write_bytes(b"")
    submit = [runs, out, "test", "s", "py", "none", [], [], ["--output", str(out)]]
    slurm_jobs.submit(*submit)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["== 2 runs: 2 finished, 0 queued or running, 0 to submit",
                         f"== sbatch --parsable --output={out}/logs/evaluation.log --open-mode=append "
                         "--job-name=study-s-eval --ntasks=1 --gpus-per-task=1 --mem=32G "
                         f"'--wrap=env PYTHON=py bash run_all.sh --output {out} --no_training'",
                         "== submitted: the evaluation, job 101"]  # fmt: skip
    (out / "table.md").write_text("the report\n")  # what the evaluation job writes last
    slurm_jobs.submit(*submit)
    assert capsys.readouterr().out.splitlines() == [
        "== 2 runs: 2 finished, 0 queued or running, 0 to submit",
        "== every run has finished and the evaluation is up to date: nothing to submit"]  # fmt: skip
    assert not (tmp_path / "sbatch-102").exists()


def test_status_names_each_runs_state_with_or_without_slurm(tmp_path, monkeypatch):
    out = tmp_path / "results"
    names = ["finished", "stopped", "failed", "failed-then-resumed", "queued", "running", "untouched"]
    runs = [(f"{out}/runs/{name}", "") for name in names]

    def checkpoint(name, step, of=60):
        (out / "runs" / name / f"checkpoint-{step}").mkdir(parents=True)
        state = {"global_step": step, "max_steps": of}
        (out / "runs" / name / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))

    (out / "runs" / "finished").mkdir(parents=True)
    (out / "runs" / "finished" / "model.safetensors").write_bytes(b"")
    checkpoint("stopped", 10)
    checkpoint("stopped", 30)
    checkpoint("failed", 20)
    checkpoint("failed-then-resumed", 40)
    checkpoint("running", 50)
    (out / "logs" / "slurm").mkdir(parents=True)
    (out / "logs" / "failed.log").write_text("== x: resuming from step 20\nTraceback (most recent call last):\n"
                                             "  ...\nRuntimeError: CUDA out of memory.\n")  # fmt: skip
    (out / "logs" / "failed-then-resumed.log").write_text("== x: training\nerror: no space left\n== x: resuming\n"
                                                          "== x: stopped at step 40, requeued to resume\n")  # fmt: skip
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: no Slurm
    without = slurm_jobs.status(runs, out, "validation", slurm_jobs.read_queue(required=False))
    assert without == [
        f"{out}/runs/finished: finished",
        f"{out}/runs/stopped: checkpoint at step 30 of 60",
        f"{out}/runs/failed: failed (checkpoint at step 20 of 60): RuntimeError: CUDA out of memory.",
        f"{out}/runs/failed-then-resumed: checkpoint at step 40 of 60",
        f"{out}/runs/queued: not started",
        f"{out}/runs/running: checkpoint at step 50 of 60",
        f"{out}/runs/untouched: not started",
        "evaluation: not run",
        "== 7 runs: 1 finished, 3 with a checkpoint, 1 failed, 2 not started",
    ]
    # With Slurm: array 7's tasks 0 and 1 are the runs "queued" and "running" (its plan file), job 8 the evaluation
    (out / "logs" / "slurm" / "7.plan").write_text(f"{out}/runs/queued q --seed 1\n{out}/runs/running r --seed 1\n")
    (out / "logs" / "slurm" / "8.evaluation").write_text("after 7\n")
    queue = [("7", "0", "PENDING"), ("7", "1", "RUNNING"), ("8", "N/A", "PENDING"), ("9", "0", "RUNNING")]
    with_slurm = slurm_jobs.status(runs, out, "validation", queue)
    assert with_slurm[4:8] == [f"{out}/runs/queued: queued (job 7_0)",
                               f"{out}/runs/running: running (job 7_1), checkpoint at step 50 of 60",
                               f"{out}/runs/untouched: not started", "evaluation: queued (job 8)"]  # fmt: skip
    (out / "study.md").write_text("the report\n")
    assert slurm_jobs.status(runs, out, "validation", [])[7] == f"evaluation: done ({out}/study.md)"


def test_sbatch_options_come_as_words_or_a_file_and_those_slurm_sets_are_refused(tmp_path):
    assert slurm_jobs.sbatch_options("-p gpu --account=proj --time 24:00:00", "--sbatch") == [
        "-p", "gpu", "--account=proj", "--time", "24:00:00"]  # fmt: skip
    options = tmp_path / "cluster.sbatch"
    options.write_text("# our cluster\n#SBATCH --partition=gpu\n--account=proj --qos=normal  # in the queue\n")
    assert slurm_jobs.options_file(options) == ["--partition=gpu", "--account=proj", "--qos=normal"]
    for text, message in [("--array=0-9", "--sbatch: --array=0-9: run_all.sh --slurm sets it (docs/slurm.md)"),
                          ("-o x.out", "--sbatch: -o: run_all.sh --slurm sets it (docs/slurm.md)"),
                          ("partition=gpu", "--sbatch: partition=gpu: not an sbatch option (e.g. --partition=gpu)")]:
        with pytest.raises(InputError, match=re.escape(message)):
            slurm_jobs.sbatch_options(text, "--sbatch")
    # a GPU, memory or name option of the user's replaces ours; the evaluation drops --signal and takes its own last
    array = slurm_jobs.array_command("s", 2, "out", ["--gres=gpu:a100:1", "--mem-per-cpu=8G"], True, "py", "none")
    assert array[7:-4] == ["--job-name=study-s", "--ntasks=1", "--signal=B:TERM@300", "--gres=gpu:a100:1",
                           "--mem-per-cpu=8G"]  # fmt: skip
    evaluation = slurm_jobs.evaluation_command("s", [], "out", ["-p", "gpu", "--signal", "B:TERM@600", "-t", "5"],
                                               ["--time=60"], False, "py", ["--study", "s.json"])  # fmt: skip
    assert evaluation[1:-1] == ["--parsable", "--output=out/logs/evaluation.log", "--open-mode=append",
                                "--job-name=study-s-eval", "--ntasks=1", "--mem=32G", "-p", "gpu", "--time=60"]
    assert evaluation[-1] == "--wrap=env PYTHON=py bash run_all.sh --study s.json --no_training"


@pytest.mark.parametrize(
    "args, message",
    [(["--slurm", "--status"], "--slurm and --status: one at a time"),
     (["--sbatch", "--mem=8G"], "--sbatch, --sbatch_file and --eval_sbatch: only with --slurm"),
     (["--slurm", "--sbatch_file", "no-such.sbatch"], "--sbatch_file no-such.sbatch: no such file"),
     (["--slurm", "--gpus", "0"], "--gpus: not with --slurm (a Slurm job trains on the GPUs Slurm gives it)"),
     (["--status", "--download"], "--status: not with --download or --no_training")],
)  # fmt: skip
def test_bad_slurm_options_are_one_line_and_exit_2(tmp_path, args, message):
    done = run_all("--output", tmp_path / "out", *args)
    assert (done.returncode, done.stderr) == (2, f"error: {message} (see the top of run_all.sh)\n")


def test_slurm_without_sbatch_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dirname").symlink_to("/usr/bin/dirname")
    done = run_all("--slurm", env={"PATH": str(tmp_path / "bin")})
    assert (done.returncode, done.stderr) == (
        2, "error: --slurm: sbatch not found (run it where Slurm's commands are) (see the top of run_all.sh)\n")
