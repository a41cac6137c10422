"""Read this when a run is stopped (a signal, a bad loss) or resumed, or when you touch the Trainer's data loading.

What train.py mixes into its Trainer so that a stopped run loses one step and resumes to the weights of an unbroken
one: a checkpoint at the end of the step a signal came in, data loader workers that leave the signals to the main
process, a length-grouped order drawn from seed + epoch, and the stop on a NaN or infinite loss. Also the output
folder rules (nothing overwritten unless asked) and W&B's resume. Every override of the Trainer's private API lives
here; docs/design-notes.md says why each exists.
"""

import functools
import json
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from multiprocessing import resource_tracker
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, get_last_checkpoint

from cli import InputError
from reranker import leave_process_group

logger = logging.getLogger("train")

STOP_NOTE = "saved_by_a_stop.txt"  # in a checkpoint saved only because a signal stopped the run: removed when it ends
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class NonFiniteLossError(RuntimeError):
    pass


class ResumableTrainer(Trainer):
    """The Trainer, stoppable at any step by SIGTERM or Ctrl-C and resumable to the same weights."""

    group_size = 1  # rows per training example: a grouped loss's query group stays whole in one batch

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)
        self.add_callback(LogOptimizerCallback())

    def train(self, *args, **kwargs):
        with self.stop_on_signal.catching_signals():
            return super().train(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.group_size > 1:
            sampler = EpochSeededGroupSampler(len(train_dataset or self.train_dataset), self.group_size, seed)
        else:
            sampler = super()._get_train_sampler(train_dataset)
            if not isinstance(sampler, LengthGroupedSampler) or sampler.generator is not None:
                return sampler
            sampler = EpochSeededLengthGroupedSampler(sampler, seed)
        self.pop_callback(SamplerEpochCallback)
        self.add_callback(SamplerEpochCallback(sampler))
        return sampler

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs
        )
        if self.state.global_step >= max_steps:  # resumed from the last step: the Trainer would train one more
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    def _get_dataloader(self, *args, **kwargs):
        dataloader = super()._get_dataloader(*args, **kwargs)
        loader = getattr(dataloader, "base_dataloader", dataloader)  # the one that accelerate's wrapper iterates
        if loader.num_workers > 0 and hasattr(signal, "pthread_sigmask"):  # not on Windows
            leave_stop_signals_to_the_main_process(loader)
        return dataloader

    def _get_eval_sampler(self, eval_dataset):
        # The validation set's own order: its metrics map predictions back to (query, doc) by position.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.state.global_step + 1}; stopped without saving "
                f"(the last good checkpoint in {self.args.output_dir} stays). Try a lower --learning_rate."
            )
        return result

    def train_or_exit(self, checkpoint):
        """train(), exiting 1 on a bad loss and 128 + signal after a stop's checkpoint (no final model then)."""
        try:
            result = self.train(resume_from_checkpoint=checkpoint)
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        stop = self.stop_on_signal
        if stop.stopped_at is not None:  # run_all.sh and a resume take a run without its final model for unfinished
            print(f"stopped by {stop.signal.name} at step {stop.stopped_at} of {self.state.max_steps}, saved in "
                  f"{stop.checkpoint(self.args.output_dir)}: --resume_from_checkpoint true continues the run",
                  file=sys.stderr)  # fmt: skip
            leave_process_group(self.accelerator.state)
            sys.exit(128 + stop.signal)
        return result


class StopOnSignal(TrainerCallback):
    """SIGTERM (a batch system's time limit, `kill`, run_all.sh) or Ctrl-C: a checkpoint at the end of the step under
    way, then stop. Several processes agree on the step and save together. Ctrl-C twice stops at once."""

    def __init__(self):
        self.signal = None  # the first signal received
        self.stopped_at = None  # the step a signal stopped training after (None: it ran to its last step)
        self.saved_anyway = False  # whether the save strategy saves that step too (an epoch's end, a --save_steps)

    @contextmanager
    def catching_signals(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        handlers = {signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (nohup, `&`)
            handlers[signal.SIGINT] = signal.default_int_handler
        for signum in handlers:
            signal.signal(signum, self.received)
        try:
            yield
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def received(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # Ctrl-C twice: now, without a checkpoint
        if self.signal is None:  # a batch system and a launcher may each send one
            self.signal = signal.Signals(signum)
            logger.warning("%s: saving a checkpoint at the end of this step, then stopping", self.signal.name)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signal is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor(float(stop), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = flag.item() > 0
            self.signal = self.signal or (signal.SIGTERM if stop else None)  # another process received it
        if stop and state.global_step < state.max_steps:  # at the last step the run ends (and saves) as it would
            epoch_end = args.save_strategy == SaveStrategy.EPOCH and float(state.epoch).is_integer()
            self.saved_anyway = control.should_save or epoch_end  # the Trainer's flow callback has set `steps` saves
            control.should_save, control.should_evaluate, control.should_training_stop = True, False, True
            self.stopped_at = state.global_step

    def checkpoint(self, output_dir):
        """The stop's checkpoint folder, as the Trainer names it."""
        return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_at}"

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at == state.global_step and not self.saved_anyway and state.is_world_process_zero:
            note = self.checkpoint(args.output_dir) / STOP_NOTE
            note.write_text(f"{self.signal.name} stopped the run after this step. This checkpoint is for resuming "
                            "only: train.py removes it when the run finishes.\n")  # fmt: skip

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint is saved; the epoch's evaluation would delay the exit
            control.should_save = control.should_evaluate = False


class LogOptimizerCallback(TrainerCallback):
    """Name the optimizer that really steps, through every wrapper (DeepSpeed's config could replace it)."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        chain = [optimizer]
        while hasattr(chain[-1], "optimizer"):
            chain.append(chain[-1].optimizer)
        logger.info("optimizer stepping: %s", " > ".join(type(o).__name__ for o in chain))


def leave_stop_signals_to_the_main_process(loader):
    """Make a data loader's workers ignore SIGTERM and SIGINT, which reach every process of a job: torch fails the main
    process at once when a worker dies, before the stop's checkpoint. The workers start with both signals blocked
    (a spawned worker imports torch for seconds before it can ignore them) and ignore them from worker_init_fn on."""
    get_iterator = loader._get_iterator
    start_method = (loader.multiprocessing_context or multiprocessing).get_start_method()

    def started_with_stop_signals_blocked():
        if start_method != "fork":
            resource_tracker.ensure_running()  # started later, it would unblock both signals in the workers (bpo-33613)
        blocked_before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked_before)

    loader._get_iterator = started_with_stop_signals_blocked
    loader.worker_init_fn = functools.partial(ignore_stop_signals, loader.worker_init_fn)  # picklable, for spawn


def ignore_stop_signals(worker_init_fn, worker_id):
    """A worker's start under leave_stop_signals_to_the_main_process, then the loader's own worker_init_fn."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # which also drops one that came while they were blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """The Trainer's length-grouped order, drawn from seed + epoch rather than the global RNG, which a resume restores
    only after it has drawn the interrupted epoch's order: pairs would be trained twice or never."""

    def __init__(self, sampler, seed):
        super().__init__(sampler.batch_size, lengths=sampler.lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class EpochSeededGroupSampler(torch.utils.data.Sampler):
    """Groups of `group_size` consecutive rows in an order drawn from seed + epoch, each group's rows together, so a
    batch of a multiple of group_size rows never splits one (nor do the processes, which take whole batches)."""

    def __init__(self, n_rows, group_size, seed):
        self.n_groups, self.group_size, self.seed, self.epoch = n_rows // group_size, group_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n_groups * self.group_size

    def __iter__(self):
        order = torch.randperm(self.n_groups, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter([group * self.group_size + i for group in order.tolist() for i in range(self.group_size)])


class SamplerEpochCallback(TrainerCallback):
    """Tell the sampler which epoch begins: accelerate's set_epoch does not reach it through the wrappers of several
    processes once a resume skips batches."""

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(math.floor(state.epoch))  # whole epochs done, as restored from a checkpoint


def remove_stop_checkpoints(output_dir):
    """A finished run's checkpoints saved only by a stop: they served its resume, and would pass for epochs of their
    own in `evaluate.py --models runs/*/checkpoint-*`. Renamed first, so a kill leaves no half checkpoint."""
    for note in sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*/{STOP_NOTE}")):
        doomed = note.parent.with_name(f".{note.parent.name}.removing")
        shutil.rmtree(doomed, ignore_errors=True)  # left by a kill during an earlier removal
        shutil.rmtree(note.parent.rename(doomed))
        logger.info("Removed %s: saved by a stop to resume from, and the run has finished", note.parent)


def prepare_run(script_args, training_args):
    """-> the checkpoint to resume from (None: a new run), with the output folder and W&B ready for it."""
    checkpoint = resume_checkpoint(training_args)
    prepare_output_dir(script_args, training_args, resuming=checkpoint is not None)
    configure_wandb(training_args, resuming=checkpoint is not None)
    return checkpoint


def prepare_output_dir(script_args, training_args, resuming=False):
    """Never overwrite a finished or running experiment unless asked; resuming (from a checkpoint found) is asked."""
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or not any(output_dir.iterdir()) or resuming:
        return
    if not script_args.overwrite_output_dir:
        if get_last_checkpoint(output_dir) is None:  # e.g. a run that failed before its first checkpoint
            raise InputError(f"{output_dir}: not empty, and no checkpoint to resume from; pass --overwrite_output_dir")
        raise InputError(
            f"{output_dir}: not empty; pass --resume_from_checkpoint true to continue, or --overwrite_output_dir"
        )
    if training_args.process_index == 0:
        shutil.rmtree(output_dir)


def resume_checkpoint(training_args):
    """--resume_from_checkpoint: a checkpoint folder, or 'true'/'last' for the newest in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", ""):
        return None
    if value.lower() in ("true", "last", "yes"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise InputError(f"{training_args.output_dir}: no checkpoint to resume from")
        return last
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise InputError(f"{value}: not a checkpoint folder (no trainer_state.json)")
    return value


def configure_wandb(training_args, resuming):
    """With report_to wandb but no account configured, log offline instead of failing. A resumed run continues its
    W&B run (its id is in run_config.json) rather than starting another at each resume."""
    if "wandb" not in (training_args.report_to or []):
        return
    os.environ.setdefault("WANDB_PROJECT", "lion-vs-adamw-rerankers")
    if "WANDB_RUN_ID" not in os.environ:
        try:
            config = json.loads((Path(training_args.output_dir) / "run_config.json").read_text()) if resuming else {}
        except (OSError, ValueError):  # none or unreadable: a new W&B run
            config = {}
        if config.get("wandb_run_id"):
            os.environ.setdefault("WANDB_RESUME", "allow")
        os.environ["WANDB_RUN_ID"] = config.get("wandb_run_id") or secrets.token_hex(6)
    netrc = Path.home() / ".netrc"
    logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not logged_in and "WANDB_MODE" not in os.environ:
        logger.warning("wandb: no API key configured, logging offline (WANDB_MODE=offline)")
        os.environ["WANDB_MODE"] = "offline"
