"""Read this when you need what a training run cost (pairs/s, peak memory, optimizer state, device-hours) or change it.

RunCost, a callback train.py adds to its Trainer, measures the run while it trains and writes OUTPUT_DIR/cost.json at
each checkpoint and at the end. The totals so far travel in each checkpoint (trainer_state.json's stateful_callbacks),
so a stopped and resumed run adds its sessions up: the steps a kill loses after the last checkpoint are not counted,
the resumed session trains them again and counts them then. docs/training.md describes the fields.
"""

import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from cli import write_atomic

logger = logging.getLogger("train")

COST_FILE = "cost.json"
SUMMED = ("train_pairs", "train_seconds", "wall_seconds", "device_hours")  # added up over sessions


class RunCost(TrainerCallback, ExportableState):
    """The run's cost, measured while it trains; totals over every session of a stopped and resumed run."""

    def __init__(self):
        self.before = {}  # totals of the sessions before this one: the checkpoint's, restored at train begin
        self.started = self.mark = None  # this session's start and its last step's end (perf_counter)
        self.pairs, self.seconds = 0, 0.0  # this session's
        self.device, self.processes = None, 1

    def state(self):  # saved into each checkpoint's trainer_state.json
        return {"args": {}, "attributes": {"before": self.totals()}}

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name) if state.global_step else None  # resumed: the checkpoint's totals
        if state.global_step and saved is None:
            logger.warning("The checkpoint holds no cost totals (saved before run_cost.py): counting from here")
        self.before = dict(saved["attributes"]["before"]) if saved else {}
        self.pairs, self.seconds, self.device, self.processes = 0, 0.0, args.device, args.world_size
        self.started = self.mark = time.perf_counter()
        state.stateful_callbacks.setdefault(name, self.state())  # without it the Trainer's next save fails (KeyError)

    def on_step_end(self, args, state, control, **kwargs):
        # A step's seconds run from the end of the last step, or of the evaluation or save after it, to the end of
        # this one: its data loading counts, evaluating and checkpointing do not. The GPU finishes its queue first.
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
        now = time.perf_counter()
        self.seconds += now - self.mark
        self.mark = now
        # the Trainer's batch (--auto_find_batch_size's too) x accumulation x processes
        self.pairs += state.train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_evaluate(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()  # evaluating is not training

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write(args, state, **kwargs)
        self.mark = time.perf_counter()  # nor is saving

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            cost = self.write(args, state, **kwargs)
            logger.info("cost: %(train_pairs)d pairs in %(train_seconds).1f s, %(pairs_per_second).1f pairs/s, peak "
                        "memory %(peak_memory_bytes)d bytes (%(memory_kind)s)", cost)  # fmt: skip

    def totals(self):
        """The summed totals and the peak memory of every session so far, this one's up to now."""
        if self.started is None:
            return dict(self.before)
        wall = time.perf_counter() - self.started
        session = {"train_pairs": self.pairs, "train_seconds": self.seconds, "wall_seconds": wall,
                   "device_hours": wall * self.processes / 3600}  # fmt: skip
        totals = {key: self.before.get(key, 0) + session[key] for key in SUMMED}
        peak, kind = peak_memory(self.device)
        if self.before.get("memory_kind") == kind:  # a session on another kind of device is not comparable
            peak = max(peak, self.before["peak_memory_bytes"])
        return {**totals, "peak_memory_bytes": peak, "memory_kind": kind}

    def write(self, args, state, model, optimizer, **kwargs):
        """OUTPUT_DIR/cost.json; -> what it holds."""
        optimizer = innermost(optimizer)
        state_bytes = optimizer_state_bytes(optimizer)
        parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        totals = self.totals()
        cost = {
            **totals,
            "pairs_per_second": totals["train_pairs"] / totals["train_seconds"] if totals["train_seconds"] else 0.0,
            "steps": state.global_step,
            "optimizer": type(optimizer).__name__,
            "optimizer_state_bytes": state_bytes,  # this process's: ZeRO-2 splits it between the processes
            "parameters": parameters,
            "optimizer_state_bytes_per_param": state_bytes / parameters,
            "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else args.device.type,
            "processes": args.world_size,
        }
        write_atomic(Path(args.output_dir) / COST_FILE, json.dumps(cost, indent=2) + "\n")
        return cost


def innermost(optimizer):
    """The optimizer that holds the state, inside accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(optimizer):
    """Bytes of every tensor in the optimizer's state, each once: bitsandbytes' 8-bit quantization map is one tensor
    that all its parameters share. Scalars count too (fused AdamW's 4-byte `step` per parameter tensor)."""
    tensors = {t.data_ptr(): t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    return sum(tensors.values())


def peak_memory(device):
    """-> (peak bytes, kind): the GPU's most allocated by torch, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "gpu"
    if sys.platform == "win32":  # no resource module
        import psutil  # accelerate's requirement

        return psutil.Process().memory_info().peak_wset, "cpu_rss"
    import resource

    kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib, "cpu_rss"
