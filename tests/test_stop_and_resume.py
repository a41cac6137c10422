"""stop_and_resume.py: a signal saves a checkpoint at the end of the step under way, a resume reaches the weights of an
unbroken run (SIGKILL too, from the last checkpoint; inside any epoch), a bad loss stops the run, an output folder is
never overwritten unless asked, and W&B continues its run."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO, TWO_PROCESSES, make_trainer, needs_data, resumes_to_the_unbroken_run
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

import stop_and_resume
import train
from cli import InputError
from reranker import load_split, rerank


def wait_for_checkpoint(process, checkpoint):
    """Until `process` has saved `checkpoint` (its trainer_state.json, written last), at most 5 minutes."""
    deadline = time.time() + 300
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)


def stoppable_run(minilm, output_dir, *extra):
    """train.py and its flags for a 200-step run on data/demo, checkpointed every 5 steps, to be stopped by a signal."""
    return [str(REPO / "train.py"), "--model", minilm, "--optim", "adamw", "--train_data", f"{REPO}/data/demo:train",
            "--negatives_per_query", "4", "--max_steps", "200", "--warmup_steps", "1", "--max_length", "64",
            "--save_strategy", "steps", "--save_steps", "5", "--report_to", "none", "--disable_tqdm", "true",
            "--output_dir", str(output_dir), *extra]  # fmt: skip


STOPPED_AT = r"stopped by SIGTERM at step (\d+) of 200, saved in "  # stoppable_run's stop line


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_with_their_checkpoint(minilm, tmp_path):
    """Under DDP the processes save a checkpoint together: a signal that reaches only one of them (here the second)
    stops both after the same step. Else one would save while the other waited for it in the next step's all-reduce."""
    out = tmp_path / "out"
    command = [*TWO_PROCESSES, *stoppable_run(minilm, out, "--per_device_train_batch_size", "8")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "stderr", "w") as file:  # a file, not a pipe that fills up while nobody reads it
        launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=file, env=env)
        wait_for_checkpoint(launcher, out / "checkpoint-5")
        workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        workers = [pid for pid in workers if "train.py" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        os.kill(int(workers[1]), signal.SIGTERM)
        try:
            launcher.wait(timeout=120)
        finally:
            launcher.kill()
    stderr = (tmp_path / "stderr").read_text()
    stops = re.findall(STOPPED_AT, stderr)  # one line from each process
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    step = int(stops[0])
    assert 5 < step < 200 and launcher.returncode != 0
    checkpoint = out / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    saved = {path.name for path in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"} <= saved
    assert not (out / "model.safetensors").exists()


def test_sigterm_to_the_whole_process_group_stops_a_run_with_data_loader_workers_after_its_checkpoint(
    minilm, tmp_path
):
    """A batch system's TERM (and run_all.sh's) reaches every process of the run, its data loader workers too. A
    worker killed by it made torch fail the main process at once (`DataLoader worker ... is killed by signal`),
    without the checkpoint of the step under way."""
    out = tmp_path / "out"
    command = [sys.executable, *stoppable_run(minilm, out, "--dataloader_num_workers", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stderr", "w") as file:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=file, env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            wait_for_checkpoint(process, out / "checkpoint-5")
            workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            assert workers, "no data loader worker running"
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            process.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 143, stderr[-3000:]
    [step] = re.findall(STOPPED_AT, stderr)
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == int(step)
    assert not (out / "model.safetensors").exists()
    time.sleep(1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a data loader worker outlived its run"


def live_processes_in_group(group):
    """The pids of the processes, zombies left out, whose process group is `group`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(process_group) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.parametrize("start_method, processes", [("spawn", 3), ("forkserver", 4)])
def test_sigterm_to_the_whole_process_group_while_spawned_workers_start_still_stops_after_a_checkpoint(
    minilm, tmp_path, start_method, processes
):
    """A spawned worker (macOS's start method; forkserver is Python 3.14's default on Linux) imports torch for
    seconds before its worker_init_fn can ignore TERM. Killed by a TERM in that time, it hung the main process
    (spawn: writing to the dead worker) or failed it (forkserver: BrokenPipeError), without a checkpoint. The TERM
    is sent as soon as the worker exists: beside the main process, the resource tracker, (the fork server) and it."""
    out = tmp_path / "out"
    extra = ["--dataloader_num_workers", "1", "--dataloader_multiprocessing_context", start_method]
    command = [sys.executable, *stoppable_run(minilm, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stderr", "w") as file:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=file, env=env,
                                   start_new_session=True)  # fmt: skip
        try:
            deadline = time.time() + 120
            while len(live_processes_in_group(process.pid)) < processes and process.poll() is None:
                assert time.time() < deadline
                time.sleep(0.01)
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
            time.sleep(1)
            outlived = live_processes_in_group(process.pid)
        finally:
            for pid in live_processes_in_group(process.pid):
                os.kill(pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 143, stderr[-3000:]
    [step] = re.findall(STOPPED_AT, stderr)
    assert step == "1"  # the first step, whose batch the starting worker was to make
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    assert not outlived, "a worker, the resource tracker or the fork server outlived the run"


@pytest.mark.parametrize("stop_after, for_resuming_only", [(2, True), (4, False)])
def test_a_stop_inside_an_epoch_saves_a_checkpoint_removed_when_the_run_finishes_and_one_at_its_end_is_kept(
    minilm, tmp_path, stop_after, for_resuming_only
):
    """With --save_strategy epoch (the default), checkpoint-4 is the first epoch's: a stop after step 4 saves it as
    usual, a stop after step 2 saves checkpoint-2 only to resume from. Kept, the thesis's best-epoch evaluation
    (`evaluate.py --models runs/*/checkpoint-*`) would take it for an epoch."""
    argv = ["--optim", "adamw", "--num_train_epochs", "2", "--save_strategy", "epoch", "--warmup_steps", "0"]
    trainer = make_trainer(minilm, tmp_path, argv, labels=[1.0, 0.0] * 32)  # 64 pairs: 4 steps an epoch

    class SignalDuringStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.add_callback(SignalDuringStep())
    trainer.train()
    assert trainer.stop_on_signal.stopped_at == stop_after
    checkpoint = tmp_path / "out" / f"checkpoint-{stop_after}"
    assert (checkpoint / "trainer_state.json").exists()
    assert (checkpoint / stop_and_resume.STOP_NOTE).exists() == for_resuming_only
    stop_and_resume.remove_stop_checkpoints(tmp_path / "out")  # as train.py does once a run has finished
    assert checkpoint.exists() != for_resuming_only
    assert [path.name for path in (tmp_path / "out").iterdir() if "checkpoint" in path.name] == (
        [] if for_resuming_only else ["checkpoint-4"])  # fmt: skip


def test_a_nan_loss_stops_training_with_a_clear_error(minilm, tmp_path):
    trainer = make_trainer(minilm, tmp_path, ["--max_steps", "2", "--save_strategy", "no"], labels=[float("nan")] * 4)
    with pytest.raises(stop_and_resume.NonFiniteLossError, match="loss became nan at step 1"):
        trainer.train()


def test_an_infinite_loss_stops_training_like_a_nan_one_with_its_value_in_the_message(minilm, tmp_path, monkeypatch):
    """An inf loss has inf gradients that would step the weights to nan: it stops the run at once, as nan does."""
    real_loss = train.bce_loss
    infinite = train.Loss(lambda *args, **kwargs: real_loss(*args, **kwargs) * float("inf"))  # BCE > 0
    monkeypatch.setitem(train.LOSSES, "bce", infinite)
    trainer = make_trainer(minilm, tmp_path, ["--max_steps", "2", "--save_strategy", "no"])
    with pytest.raises(stop_and_resume.NonFiniteLossError, match="loss became inf at step 1"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_nan_loss_exits_1_with_one_error_line_and_keeps_earlier_checkpoints(minilm, tmp_path, monkeypatch, capsys):
    (tmp_path / "triples.tsv").write_text("".join(f"query {i}\tpassage {i}\tother passage {i}\n" for i in range(40)))
    calls, real_loss = [], train.bce_loss

    def loss_turning_nan_at_step_3(outputs, labels, num_items_in_batch=None, group_size=1):
        calls.append(1)
        loss = real_loss(outputs, labels, num_items_in_batch, group_size)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setitem(train.LOSSES, "bce", train.Loss(loss_turning_nan_at_step_3))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", minilm, "--train_data", str(tmp_path / "triples.tsv"), "--max_steps", "4",
                    "--warmup_steps", "1", "--max_length", "32", "--save_strategy", "steps", "--save_steps", "2",
                    "--output_dir", str(out), "--report_to", "none"])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 1 and len(errors) == 1 and "loss became nan at step 3" in errors[0]
    assert (out / "checkpoint-2" / "model.safetensors").is_file() and not (out / "model.safetensors").exists()


def train_command(minilm, output_dir, *extra):
    return [
        sys.executable, str(REPO / "train.py"), "--model", minilm, "--optim", "lion",
        "--train_data", f"{DATA}/msmarco-sample:train", "--negatives_per_query", "3", "--max_steps", "30",
        "--warmup_steps", "3", "--max_length", "128", "--save_strategy", "steps", "--save_steps", "10",
        "--logging_steps", "5", "--seed", "7", "--report_to", "none", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def start_and_signal_after_checkpoint_10(command, output_dir, signum, env):
    """Run `command`, send it `signum` half a second after it saved checkpoint-10 -> (exit code, stderr)."""
    stderr = output_dir.parent / f"{output_dir.name}.stderr"
    with open(stderr, "w") as file:  # a file, not a pipe that fills up while nobody reads it
        process = subprocess.Popen(command, env=env, cwd=output_dir.parent, stdout=subprocess.DEVNULL, stderr=file)
        wait_for_checkpoint(process, output_dir / "checkpoint-10")
        time.sleep(0.5)
        process.send_signal(signum)
        process.wait()
    assert not (output_dir / "model.safetensors").exists(), "the run finished before the signal"
    return process.returncode, stderr.read_text()


@needs_data
def test_cli_trains_30_steps_and_resumes_exactly_after_sigkill_or_sigterm(minilm, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    full = tmp_path / "full"
    subprocess.run(train_command(minilm, full), check=True, env=env, capture_output=True, cwd=tmp_path)
    state = json.loads((full / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    logged = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == [5, 10, 15, 20, 25, 30]
    assert all({"learning_rate", "grad_norm"} <= e.keys() for e in logged)
    config = json.loads((full / "run_config.json").read_text())  # what ran: the preset (MiniLM's) and the flags
    training = config["training"]
    assert (training["learning_rate"], training["lr_scheduler_type"]) == (2e-5, "constant_with_warmup")
    assert (training["optim"], training["seed"]) == ("lion_8bit", 7)
    assert config["script"]["max_length"] == 128

    # SIGKILL: resumed from checkpoint-10. SIGTERM (a batch system's time limit, run_all.sh's Ctrl-C): a checkpoint
    # at the end of the step under way, no final model, exit 128 + 15, resumed from that checkpoint.
    for signum in (signal.SIGKILL, signal.SIGTERM):
        stopped = tmp_path / signum.name
        code, stderr = start_and_signal_after_checkpoint_10(train_command(minilm, stopped), stopped, signum, env)
        checkpoints = sorted(int(c.name.split("-")[1]) for c in stopped.glob("checkpoint-*"))
        if signum == signal.SIGTERM:
            step = checkpoints[-1]
            assert 10 < step < 30 and code == 143, stderr[-2000:]
            state = json.loads((stopped / f"checkpoint-{step}" / "trainer_state.json").read_text())
            assert state["global_step"] == step
            assert stderr.splitlines()[-1] == (
                f"stopped by SIGTERM at step {step} of 30, saved in {stopped}/checkpoint-{step}: "
                "--resume_from_checkpoint true continues the run"
            )
            # a checkpoint between those of --save_steps 10 is for the resume only
            assert (stopped / f"checkpoint-{step}" / stop_and_resume.STOP_NOTE).exists() == (step != 20)
        resumed = subprocess.run(train_command(minilm, stopped, "--resume_from_checkpoint", "true"), env=env,
                                 capture_output=True, cwd=tmp_path)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
        assert sorted(path.name for path in stopped.iterdir() if "checkpoint" in path.name) == [
            "checkpoint-10", "checkpoint-20", "checkpoint-30"]  # fmt: skip
        expected, actual = load_file(full / "model.safetensors"), load_file(stopped / "model.safetensors")
        assert expected.keys() == actual.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=f"{signum.name}: {name}")

    # The saved folder: plain AutoModelForSequenceClassification and sentence-transformers' CrossEncoder agree.
    from sentence_transformers import CrossEncoder

    model = AutoModelForSequenceClassification.from_pretrained(full)
    tokenizer = AutoTokenizer.from_pretrained(full)
    split = load_split(f"{DATA}/msmarco-sample:test", top_k=2)
    split.run = {q: split.run[q] for q in sorted(split.run)[:3]}
    run = rerank(model, tokenizer, split, max_length=128)
    keys = [(q, d) for q in run for d in run[q]]
    predicted = CrossEncoder(str(full), max_length=128).predict([(split.queries[q], split.corpus[d]) for q, d in keys])
    logits = torch.tensor([run[q][d] for q, d in keys])  # rerank's scores are logits; CrossEncoder's their sigmoid
    assert torch.sigmoid(logits).tolist() == pytest.approx(predicted.tolist(), abs=1e-5)


def test_the_sampler_learns_its_epoch_through_the_wrappers_of_several_processes_and_a_resume(minilm, tmp_path):
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader
    from transformers import TrainerControl

    trainer = make_trainer(minilm, tmp_path, labels=[1.0, 0.0] * 32)  # 64 pairs, batch 16

    def loader():  # as accelerate prepares it for the first of 2 processes, anew in each process
        data = DataLoader(list(range(64)), batch_size=4, sampler=trainer._get_train_sampler())
        return prepare_data_loader(data, num_processes=2, process_index=0, put_on_device=False)

    def run_epoch(dataloader, epoch_so_far, skip=0):  # what Trainer.train does at an epoch's start
        trainer.state.epoch = epoch_so_far  # whole epochs done, and the fraction of this one (a resume)
        trainer.callback_handler.on_epoch_begin(trainer.args, trainer.state, TrainerControl())
        dataloader = skip_first_batches(dataloader, skip) if skip else dataloader
        dataloader.set_epoch(math.floor(epoch_so_far))  # reaches the sampler only when no batch is skipped
        return [batch.tolist() for batch in dataloader]

    expected = run_epoch(loader(), 2.0)
    assert run_epoch(loader(), 2 + 3 / 8, skip=3) == expected[3:]  # killed after 3 batches of the third epoch
    assert run_epoch(loader(), 1.0) != expected  # another epoch, another order
    callbacks = trainer.callback_handler.callbacks
    assert len([c for c in callbacks if isinstance(c, stop_and_resume.SamplerEpochCallback)]) == 1


@needs_data
def test_resuming_inside_a_later_epoch_trains_the_same_pairs_in_the_same_order(minilm, tmp_path):
    """Batches grouped by length (the default) are drawn per epoch from the seed, not from the global RNG that a
    resume restores only after the interrupted epoch's order is drawn."""
    # 48 pairs: 3 steps an epoch, so checkpoint-4 is inside the second
    argv = ["--model", minilm, "--optim", "lion", "--train_data", f"{DATA}/msmarco-sample:train",
            "--negatives_per_query", "1", "--max_train_pairs", "48", "--max_steps", "8", "--warmup_steps", "2",
            "--max_length", "64", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "4",
            "--report_to", "none"]  # fmt: skip
    resumes_to_the_unbroken_run(argv, tmp_path, "checkpoint-4")


def test_a_folder_without_a_checkpoint_is_not_offered_for_resuming(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_config.json").write_text("{}")  # a run that failed, or is still before its checkpoint
    script_args, training_args, _ = train.parse_args(["--output_dir", str(tmp_path / "out")])
    with pytest.raises(InputError, match="no checkpoint to resume from; pass --overwrite_output_dir"):
        stop_and_resume.prepare_output_dir(script_args, training_args)
    assert (tmp_path / "out" / "run_config.json").exists()


def test_a_non_empty_output_dir_is_not_overwritten_unless_asked(minilm, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("a finished result")
    script_args, training_args, _ = train.parse_args(["--output_dir", str(tmp_path / "out")])
    with pytest.raises(InputError, match="not empty"):
        stop_and_resume.prepare_output_dir(script_args, training_args)
    # --resume_from_checkpoint false resumes nothing, so it asks for nothing either
    argv = ["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "false"]
    script_args, training_args, _ = train.parse_args(argv)
    checkpoint = stop_and_resume.resume_checkpoint(training_args)
    assert checkpoint is None
    with pytest.raises(InputError, match="not empty"):
        stop_and_resume.prepare_output_dir(script_args, training_args, resuming=checkpoint is not None)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "a finished result"
    script_args, training_args, _ = train.parse_args(["--output_dir", str(tmp_path / "out"), "--overwrite_output_dir"])
    stop_and_resume.prepare_output_dir(script_args, training_args)
    assert not (tmp_path / "out").exists()


@needs_data
def test_report_to_wandb_without_an_account_logs_offline_and_a_resume_continues_the_same_run(minilm, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    for steps, resume in [("2", []), ("3", ["--resume_from_checkpoint", "true"])]:
        result = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--model", minilm, "--train_data", f"{DATA}/msmarco-sample:train",
             "--negatives_per_query", "1", "--max_steps", steps, "--warmup_steps", "1", "--max_length", "64",
             "--logging_steps", "1", "--report_to", "wandb", "--output_dir", str(tmp_path / "out"), *resume],
            cwd=tmp_path, capture_output=True, text=True, env={**env, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "logging offline" in result.stderr
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))  # offline-run-<time>-<run id>
    assert len(runs) == 2 and all(list(run.glob("*.wandb")) for run in runs)
    run_id = json.loads((tmp_path / "out" / "run_config.json").read_text())["wandb_run_id"]
    assert [run.name.rsplit("-", 1)[1] for run in runs] == [run_id, run_id]
