"""Read this when you run a study on Slurm (`run_all.sh --slurm`), ask where its runs stand (`run_all.sh --status`), or
change what gets submitted. docs/slurm.md has the commands, the options and why a task requeues itself.

run_all.sh hands over its plan, a line per run (its folder, label and train.py arguments, shell-quoted), on stdin:

    python slurm_jobs.py status --output results --selection test < plan
    python slurm_jobs.py submit --output results --selection test --name thesis --python python --report_to none \
        [--sbatch=OPTIONS] [--sbatch_file=FILE] [--eval_sbatch=OPTIONS] -- RUN_ALL_OPTIONS < plan

`submit` sends the runs that are neither finished nor queued nor running as one job array (a task per run, each
slurm_task.sh), then the evaluation job after it (run_all.sh with the same options and --no_training). Each array's
plan stays in OUTPUT/logs/slurm/<array job id>.plan, line K for task K: that is how a queued task is known to be a
given run, here and in a later call. A task's output goes to OUTPUT/logs/<run>.log, through the link
OUTPUT/logs/slurm/<array job id>_<task>.log that Slurm's --output names.
"""

import argparse
import getpass
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cli import InputError, exit_on_input_error

SIGNAL_SECONDS = 300  # TERM this long before the time limit: the step under way, its checkpoint, Slurm's 30-s check
MEMORY = "32G"  # asked for by every job: without --mem a job may hold a whole node's memory (docs/slurm.md)
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}  # waiting; squeue's other states are on a node
SET_HERE = {"array", "dependency", "output", "error", "open-mode", "wrap", "chdir"}  # sbatch options --slurm sets
SHORT = {"a": "array", "d": "dependency", "o": "output", "e": "error", "D": "chdir", "J": "job-name", "G": "gpus",
         "p": "partition", "n": "ntasks", "H": "hold", "t": "time"}  # fmt: skip
GPU_OPTIONS = {"gpus", "gpus-per-task", "gpus-per-node", "gpus-per-socket", "gres"}
MEMORY_OPTIONS = {"mem", "mem-per-cpu", "mem-per-gpu"}
ERROR_LINE = re.compile(r"error:|Error\b")  # our one-line errors, Slurm's, a traceback's last line


# 1. Where each run stands


def plan_runs(lines):
    """The plan's lines -> [(run folder, line)]."""
    return [(shlex.split(line)[0], line) for line in lines if line.strip()]


def read_queue(required):
    """This user's queued and running jobs, [(array or job id, task index or "N/A", state)]; None without squeue (or
    where it fails, unless `required`: then it is an error, since nothing may be submitted twice)."""
    if not shutil.which("squeue"):
        if required:
            raise InputError("--slurm: squeue not found: cannot tell which runs are queued, so nothing was submitted")
        return None
    command = ["squeue", f"--user={getpass.getuser()}", "--array", "--noheader", "--format=%F %K %T"]  # %A: a task's id
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        why = failure(done)
        if required:
            raise InputError(f"--slurm: squeue failed ({why}): cannot tell which runs are queued, nothing submitted")
        print(f"note: squeue failed ({why}): queued and running jobs not shown", file=sys.stderr)
        return None
    return [tuple(line.split()[:3]) for line in done.stdout.splitlines() if len(line.split()) >= 3]


def failure(done):
    """A failed Slurm command's last word on it: its stderr's last line, else its exit code."""
    return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]


def read_jobs(output, queue):
    """{run folder: (task id, "queued" or "running")} and [(evaluation job id, state)] of the queued and running jobs
    this output's plan files and evaluation notes name."""
    slurm_logs = Path(output) / "logs" / "slurm"
    tasks = {}  # (array id, task index) -> run folder
    for plan in slurm_logs.glob("*.plan"):
        for index, (run_dir, _) in enumerate(plan_runs(plan.read_text().splitlines())):
            tasks[(plan.stem, str(index))] = run_dir
    evaluations = {path.stem for path in slurm_logs.glob("*.evaluation")}
    runs, evaluation = {}, []
    for job, index, state in queue or []:
        word = "queued" if state in QUEUED else "running"
        if (job, index) in tasks:
            runs[tasks[(job, index)]] = (f"{job}_{index}", word)
        elif job in evaluations:
            evaluation.append((job, word))
    return runs, evaluation


def checkpoint_progress(run_dir):
    """`checkpoint at step N of M` for the run's last checkpoint, or None."""
    steps = [int(path.name.removeprefix("checkpoint-")) for path in Path(run_dir).glob("checkpoint-*")
             if path.name.removeprefix("checkpoint-").isdigit()]  # fmt: skip
    if not steps:
        return None
    state = Path(run_dir) / f"checkpoint-{max(steps)}" / "trainer_state.json"
    state = json.loads(state.read_text()) if state.is_file() else {}
    return f"checkpoint at step {state.get('global_step', max(steps))} of {state.get('max_steps', '?')}"


def last_error(log):
    """The last error line of a log since its last `== ` line (where each attempt of a task starts and ends), or
    None."""
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    since = max((i for i, line in enumerate(lines) if line.startswith("== ")), default=-1)
    errors = [line.strip() for line in lines[since + 1 :] if ERROR_LINE.search(line)]
    return errors[-1] if errors else None


def run_state(run_dir, output, job):
    """finished, queued or running (its job), failed (its log's last error line), checkpoint at step N of M, started
    without a checkpoint, or not started."""
    if (Path(run_dir) / "model.safetensors").is_file():
        return "finished"
    progress = checkpoint_progress(run_dir)
    log = Path(output) / "logs" / f"{Path(run_dir).name}.log"
    if job:
        return f"{job[1]} (job {job[0]})" + (f", {progress}" if progress else "")
    if error := last_error(log):
        return "failed" + (f" ({progress})" if progress else "") + f": {error}"
    if progress:
        return progress
    return "started, no checkpoint" if Path(run_dir).exists() or log.exists() else "not started"


def report_path(output, selection):
    return Path(output) / ("table.md" if selection == "test" else "study.md")


def evaluation_state(output, selection, run_dirs, evaluation):
    """Queued or running (its job), done (the report newer than every finished run), failed, out of date, not run."""
    if evaluation:
        return ", ".join(f"{state} (job {job})" for job, state in evaluation)
    report = report_path(output, selection)
    models = [Path(d) / "model.safetensors" for d in run_dirs if (Path(d) / "model.safetensors").is_file()]
    if report.is_file() and all(report.stat().st_mtime >= m.stat().st_mtime for m in models):
        return f"done ({report})"
    if error := last_error(Path(output) / "logs" / "evaluation.log"):
        return f"failed: {error}"
    return f"out of date ({report} is older than a finished run)" if report.is_file() else "not run"


def status(runs, output, selection, queue):
    """A line per run, `FOLDER: STATE`, the evaluation's line, then a count of each state."""
    jobs, evaluation = read_jobs(output, queue)
    states = {run_dir: run_state(run_dir, output, jobs.get(run_dir)) for run_dir, _ in runs}
    lines = [f"{run_dir}: {state}" for run_dir, state in states.items()]
    lines.append(f"evaluation: {evaluation_state(output, selection, list(states), evaluation)}")
    counts = Counter(re.match(r"finished|queued|running|failed|checkpoint|started|not started", state).group()
                     for state in states.values())  # fmt: skip
    names = {"checkpoint": "with a checkpoint", "started": "started without a checkpoint"}
    lines.append(f"== {len(runs)} runs: " + ", ".join(f"{n} {names.get(w, w)}" for w, n in counts.items()))
    return lines


# 2. The jobs


def sbatch_options(text, where, comments=False):
    """sbatch options as words; refused where --slurm sets them."""
    words = shlex.split(text, comments=comments)
    if words and not words[0].startswith("-"):
        raise InputError(f"{where}: {words[0]}: not an sbatch option (e.g. --partition=gpu)")
    for word in words:
        if option_name(word) in SET_HERE:
            raise InputError(f"{where}: {word}: run_all.sh --slurm sets it (docs/slurm.md)")
    return words


def options_file(path):
    """An sbatch options file: options on any number of lines (`#SBATCH ` before them allowed), `#` comments."""
    words = []
    for line in Path(path).read_text().splitlines():
        line = line.strip().removeprefix("#SBATCH").strip()
        if line and not line.startswith("#"):
            words += sbatch_options(line, f"--sbatch_file {path}", comments=True)
    return words


def option_name(word):
    """`--mem=32G` -> mem, `-p` -> partition; None for a value."""
    if word.startswith("--"):
        return word[2:].split("=", 1)[0]
    if word.startswith("-") and len(word) > 1:
        return SHORT.get(word[1], word[1])
    return None


def option_value(words, name):
    """The value the options give `name` last (`--partition=gpu`, `--partition gpu`, `-p gpu`, `-pgpu`), or None."""
    value = None
    for i, word in enumerate(words):
        if option_name(word) == name:
            if "=" in word and word.startswith("--"):
                value = word.split("=", 1)[1]
            elif not word.startswith("--") and len(word) > 2:
                value = word[2:]
            elif i + 1 < len(words):
                value = words[i + 1]
    return value


def cluster_has_gpus(options):
    """Whether sinfo lists a GPU (gres) in the partition asked for, or any; where sinfo cannot tell: yes."""
    partition = option_value(options, "partition")
    command = ["sinfo", "--noheader", "--format=%G", *([f"--partition={partition}"] if partition else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError:
        return True
    return done.returncode != 0 or "gpu" in done.stdout


def with_defaults(defaults, options):
    """Our defaults but those the user's options give (any memory option replaces ours, any GPU option too), then
    theirs."""
    given = {option_name(word) for word in options}

    def replaced(default):
        name = option_name(default)
        return name in given or any(name in group and group & given for group in (MEMORY_OPTIONS, GPU_OPTIONS))

    return [default for default in defaults if not replaced(default)] + options


def array_command(name, count, output, options, gpus, python, report_to):
    """sbatch for the training array: a task per run, held until its plan file is written."""
    defaults = [f"--job-name=study-{name}", "--ntasks=1", *(["--gpus-per-task=1"] if gpus else []), f"--mem={MEMORY}",
                f"--signal=B:TERM@{SIGNAL_SECONDS}"]  # fmt: skip
    return ["sbatch", "--parsable", "--hold", f"--array=0-{count - 1}", "--requeue",
            f"--output={output}/logs/slurm/%A_%a.log", "--open-mode=append", *with_defaults(defaults, options),
            "slurm_task.sh", f"{output}/logs/slurm", python, report_to]  # fmt: skip


def evaluation_command(name, after, output, options, eval_options, gpus, python, run_all_args):
    """sbatch for the evaluation job: run_all.sh --no_training once every job it waits for has ended, however."""
    defaults = [f"--job-name=study-{name}-eval", "--ntasks=1", *(["--gpus-per-task=1"] if gpus else []),
                f"--mem={MEMORY}"]  # fmt: skip
    # every job's options but --signal (it does not requeue: a signal would only end it early), then its own
    common = without(options, {"signal"} | {option_name(word) for word in eval_options})
    again = with_option(run_all_args, "--no_training")
    return ["sbatch", "--parsable", *([f"--dependency=afterany:{':'.join(after)}"] if after else []),
            f"--output={output}/logs/evaluation.log", "--open-mode=append",
            *with_defaults(defaults, common + eval_options),
            f"--wrap={shlex.join(['env', f'PYTHON={python}', 'bash', 'run_all.sh', *again])}"]  # fmt: skip


def without(options, names):
    """The options but those named, and their values given as the next word (`-p gpu`, `--mem 32G`)."""
    kept, value_next = [], False
    for word in options:
        if value_next and not word.startswith("-"):
            value_next = False
            continue
        value_next = option_name(word) in names and "=" not in word and (word.startswith("--") or len(word) == 2)
        if option_name(word) not in names:
            kept.append(word)
    return kept


def with_option(run_all_args, option):
    """run_all.sh's options with one more, before the train.py flags that follow `--` (if any follow)."""
    split = run_all_args.index("--") if "--" in run_all_args else len(run_all_args)
    return [*run_all_args[:split], option, *(run_all_args[split:] if run_all_args[split + 1 :] else [])]


def sbatch(command, what):
    """Submits, saying the command first -> the job id; a refusal is sbatch's last line, exit 2."""
    print("== " + shlex.join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise InputError(f"sbatch refused {what}: {failure(done)}")
    return done.stdout.strip().split(";")[0]


def submit(runs, output, selection, name, python, report_to, options, eval_options, run_all_args):
    """Submits the array of the runs left and the evaluation after it (or the evaluation alone, or nothing), and
    says what it submitted and how to follow it."""
    queue = read_queue(required=True)
    jobs, evaluation = read_jobs(output, queue)
    finished = [d for d, _ in runs if (Path(d) / "model.safetensors").is_file()]
    todo = [(d, line) for d, line in runs if d not in finished and d not in jobs]
    active = sorted({job.split("_")[0] for job, _ in jobs.values()}, key=int)
    print(f"== {len(runs)} runs: {len(finished)} finished, {len(jobs)} queued or running"
          + (f" (job {', '.join(active)})" if active else "") + f", {len(todo)} to submit", flush=True)  # fmt: skip
    gpus = cluster_has_gpus(options)
    if not gpus:
        print("== the cluster lists no GPUs (sinfo): the jobs ask for none", flush=True)
    slurm_logs = Path(output) / "logs" / "slurm"
    slurm_logs.mkdir(parents=True, exist_ok=True)
    array, submitted = None, []
    if todo:
        array = sbatch(array_command(name, len(todo), output, options, gpus, python, report_to), "the training array")
        try:  # the tasks wait (--hold) until they can read their runs, and their output goes to each run's log
            (slurm_logs / f"{array}.plan").write_text("".join(line + "\n" for _, line in todo))
            for index, (run_dir, _) in enumerate(todo):
                link = slurm_logs / f"{array}_{index}.log"
                link.unlink(missing_ok=True)
                link.symlink_to(f"../{Path(run_dir).name}.log")
        except OSError:
            subprocess.run(["scancel", array])
            raise
        if "hold" in {option_name(word) for word in options}:
            print(f"== held, as --sbatch asks: scontrol release {array}", flush=True)
        else:
            subprocess.run(["scontrol", "release", array], check=True)
        submitted.append(f"the training, job {array} ({len(todo)} tasks: task K trains line K + 1 of "
                         f"{slurm_logs}/{array}.plan)")  # fmt: skip
        active.append(array)
    if not todo and evaluation:
        print(f"== nothing new to submit: the evaluation is {', '.join(f'{s} (job {j})' for j, s in evaluation)}",
              flush=True)  # fmt: skip
    elif not todo and not active and evaluation_state(output, selection, finished, []).startswith("done"):
        print("== every run has finished and the evaluation is up to date: nothing to submit", flush=True)
        return
    else:  # after the arrays with runs queued or running, and after any evaluation queued (they write the same files)
        after = active + [job for job, _ in evaluation]
        job = sbatch(evaluation_command(name, after, output, options, eval_options, gpus, python, run_all_args),
                     "the evaluation job")  # fmt: skip
        (slurm_logs / f"{job}.evaluation").write_text(f"after {' '.join(after) or 'nothing'}\n")
        submitted.append(f"the evaluation, job {job}" + (f" (after job {', '.join(after)})" if after else ""))
        evaluation.append((job, "queued"))
    if submitted:
        print("== submitted: " + "; ".join(submitted), flush=True)
    follow = [f"squeue --me --jobs={','.join(active + [job for job, _ in evaluation])}",
              shlex.join(["bash", "run_all.sh", *with_option(run_all_args, "--status")])]  # fmt: skip
    if todo:
        follow.append(f"tail -f {output}/logs/{Path(todo[0][0]).name}.log   # each run's: {output}/logs/RUN.log")
    follow.append(f"tail -f {output}/logs/evaluation.log")
    print("== follow them:\n" + "\n".join(f"   {command}" for command in follow), flush=True)


# 3. The command line, for run_all.sh


@exit_on_input_error
def main(argv=None):
    parser = argparse.ArgumentParser(description="run_all.sh --status and --slurm (see the docstring)")
    parser.add_argument("command", choices=["status", "submit"])
    parser.add_argument("--output", required=True)
    parser.add_argument("--selection", default="test")
    parser.add_argument("--name", default="study")
    parser.add_argument("--python", default="python")
    parser.add_argument("--report_to", default="none")
    parser.add_argument("--sbatch", default="")
    parser.add_argument("--sbatch_file", default="")
    parser.add_argument("--eval_sbatch", default="")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # after it: run_all.sh's options, for the evaluation job
    args, run_all_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    runs = plan_runs(sys.stdin.read().splitlines())
    if args.command == "status":
        print("\n".join(status(runs, args.output, args.selection, read_queue(required=False))))
        return
    options = (options_file(args.sbatch_file) if args.sbatch_file else []) + sbatch_options(args.sbatch, "--sbatch")
    eval_options = sbatch_options(args.eval_sbatch, "--eval_sbatch")
    python = shutil.which(args.python)  # by its path: the jobs' PATH may differ from this shell's
    python = str(Path(python).absolute()) if python else args.python
    submit(runs, args.output, args.selection, args.name, python, args.report_to, options, eval_options, run_all_args)


if __name__ == "__main__":
    main()
