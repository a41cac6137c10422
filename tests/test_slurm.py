"""What run_all.sh --slurm relies on, proven on a real single-node Slurm (tests/slurm_cluster.py): a job array's tasks
each run once with their index; a task signalled before its time limit passes the signal on and requeues itself (by
ARRAYID_TASK: $SLURM_JOB_ID can mean the whole array), which needs --requeue; a job that depends on an array starts
after it; squeue finds queued jobs by name. Where Slurm is missing they skip, unless REQUIRE_SLURM=1 (CI): then fail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("require, outcome", [("", "1 skipped"), ("1", "1 error")])
def test_without_slurm_its_tests_skip_saying_why_but_fail_with_require_slurm_1(tmp_path, require, outcome):
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO / "tests"), "REQUIRE_SLURM": require}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                           "-p", "slurm_cluster", f"{__file__}::test_a_job_array_runs_each_task_once_with_its_index"],
                          cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert "Slurm is not installed (sbatch not found): apt-get install slurm-wlm munge" in done.stdout
    assert outcome in done.stdout.splitlines()[-1]


@pytest.mark.slurm
def test_a_job_array_runs_each_task_once_with_its_index(slurm, tmp_path):
    array = slurm.sbatch("--array=0-2", f"--output={tmp_path}/%A_%a.out",
                         f"--wrap=echo $SLURM_ARRAY_TASK_ID > {tmp_path}/task-$SLURM_ARRAY_TASK_ID")  # fmt: skip
    assert slurm.wait(array) == {f"{array}_{i}": "COMPLETED" for i in range(3)}
    assert {i: (tmp_path / f"task-{i}").read_text() for i in range(3)} == {i: f"{i}\n" for i in range(3)}


# A training run's stand-in: its child (train.py there, `sleep` here) gets the TERM Slurm sends the batch shell
# (B:) before the time limit; when the child has ended, the task requeues itself and its second run finds
# SLURM_RESTART_COUNT=1. The trap ignores the further TERM that the requeue itself sends, or it would run twice.
SELF_REQUEUEING = """#!/bin/bash
log={folder}/$SLURM_ARRAY_TASK_ID.log
echo "start ${{SLURM_RESTART_COUNT:-0}} $(date +%s.%N)" >> $log
[ -n "$SLURM_RESTART_COUNT" ] && exit 0
sleep 300 &
child=$!
trap 'trap "" TERM; echo "term $(date +%s.%N)" >> $log; kill -TERM $child; wait $child; echo "child $?" >> $log
      scontrol requeue ${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID; exit 0' TERM
wait $child  # in `wait`, not in a foreground command, bash runs the trap at once
"""


@pytest.mark.slurm
def test_a_task_signalled_before_its_time_limit_stops_its_child_and_requeues_itself_to_run_again(slurm, tmp_path):
    script = tmp_path / "task.sh"
    script.write_text(SELF_REQUEUEING.format(folder=tmp_path))
    # slurmctld checks time limits every 30 s: TERM comes at the first check at least 5 s into the minute
    array = slurm.sbatch("--array=0-1", "--time=1", "--signal=B:TERM@55", "--requeue", f"--output={tmp_path}/%A_%a.out",
                         str(script))  # fmt: skip
    slurm.wait(array, until=("RUNNING",))
    slurm.wait(array, until=("PENDING",), timeout=60)
    # between its two runs a requeued task is still in the queue, under its own id, waiting for its begin time
    queue = slurm("squeue", "--me", "--array", "--noheader", "--format=%i %T %r", f"--jobs={array}").splitlines()
    assert sorted(queue) == [f"{array}_0 PENDING BeginTime", f"{array}_1 PENDING BeginTime"]
    assert slurm.wait(array) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}
    for task in ("0", "1"):
        (_, first, started), (_, signalled), (_, child_status), (_, second, restarted) = (
            line.split() for line in (tmp_path / f"{task}.log").read_text().splitlines())  # fmt: skip
        assert (first, second, child_status) == ("0", "1", "143")  # 143: the child ended by TERM
        assert float(signalled) - float(started) < 60  # before the time limit
        assert float(restarted) > float(signalled)
        assert "Restarts=1" in slurm("scontrol", "show", "job", f"{array}_{task}").split()


@pytest.mark.slurm
def test_requeueing_slurm_job_id_from_the_task_holding_the_arrays_id_requeues_every_task(slurm, tmp_path):
    # one task (the last to start) keeps the array's own job id: `scontrol requeue $SLURM_JOB_ID` there means the array
    script = tmp_path / "task.sh"
    script.write_text(f"""#!/bin/bash
echo "${{SLURM_RESTART_COUNT:-0}}" >> {tmp_path}/$SLURM_ARRAY_TASK_ID.log
sleep 1
[ -z "$SLURM_RESTART_COUNT" ] && [ "$SLURM_JOB_ID" = "$SLURM_ARRAY_JOB_ID" ] && scontrol requeue $SLURM_JOB_ID
sleep 2
""")
    array = slurm.sbatch("--array=0-1", "--requeue", f"--output={tmp_path}/%A_%a.out", str(script))
    assert slurm.wait(array) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}
    assert [(tmp_path / f"{task}.log").read_text() for task in "01"] == ["0\n1\n", "0\n1\n"]


@pytest.mark.slurm
def test_requeue_is_refused_for_a_job_submitted_without_requeue_where_jobrequeue_is_0(slurm, tmp_path):
    job = slurm.sbatch(f"--output={tmp_path}/out", "--wrap=scontrol requeue $SLURM_JOB_ID")
    assert slurm.wait(job) == {job: "FAILED"}
    assert "Requested operation is presently disabled" in (tmp_path / "out").read_text()


@pytest.mark.slurm
def test_a_job_depending_afterany_on_an_array_starts_when_every_task_has_ended_failed_or_not(slurm, tmp_path):
    task = f"sleep 2; echo ended > {tmp_path}/task-$SLURM_ARRAY_TASK_ID; exit $SLURM_ARRAY_TASK_ID"  # task 1 fails
    array = slurm.sbatch("--array=0-1", f"--output={tmp_path}/%A_%a.out", f"--wrap={task}")
    after = slurm.sbatch(f"--dependency=afterany:{array}", f"--output={tmp_path}/after.out",
                         f"--wrap=cat {tmp_path}/task-0 {tmp_path}/task-1 > {tmp_path}/after")  # fmt: skip
    assert slurm("squeue", "--noheader", "--format=%T %r", f"--jobs={after}") == "PENDING Dependency"
    assert slurm.wait(array) == {f"{array}_0": "COMPLETED", f"{array}_1": "FAILED"}
    assert slurm.wait(after) == {after: "COMPLETED"}
    assert (tmp_path / "after").read_text() == "ended\nended\n"


@pytest.mark.slurm
def test_squeue_finds_queued_and_running_jobs_by_name_and_an_arrays_tasks_by_index(slurm, tmp_path):
    running = slurm.sbatch("--job-name=grid", "--array=0-1", f"--output={tmp_path}/%A_%a.out", "--wrap=sleep 60")
    held = slurm.sbatch("--job-name=lion-seed-2", "--hold", f"--output={tmp_path}/%j.out", "--wrap=true")
    try:
        slurm.wait(running, until=("RUNNING",))
        queue = slurm("squeue", "--me", "--array", "--noheader", "--format=%i %j %K %T").splitlines()
        assert sorted(queue) == sorted([f"{running}_0 grid 0 RUNNING", f"{running}_1 grid 1 RUNNING",
                                        f"{held} lion-seed-2 N/A PENDING"])  # fmt: skip
        assert slurm("squeue", "--me", "--name=lion-seed-2", "--noheader", "--format=%i") == held
    finally:
        slurm("scancel", running, held)
