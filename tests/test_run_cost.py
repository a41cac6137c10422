"""run_cost.py: every training run writes OUTPUT_DIR/cost.json, measured while it trains: pairs, seconds in training
steps, pairs/s, peak memory, optimizer state bytes per parameter; a stopped and resumed run adds its sessions up."""

import json
import os
import shutil
import signal
import time

import pytest
from conftest import make_trainer
from transformers import TrainerCallback

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: small batches run faster on one thread


def cost(output_dir):
    return json.loads((output_dir / "cost.json").read_text())


def lion8bit_state_bytes(model):
    """bitsandbytes' rule: a tensor of 4096 elements or more keeps 1 byte per element and a float32 absmax per block of
    256; a smaller one stays 32-bit. The 256-entry float32 quantization map is shared by all."""
    sizes = [p.numel() for p in model.parameters()]
    return sum(n + 4 * -(-n // 256) if n >= 4096 else 4 * n for n in sizes) + 256 * 4


@pytest.mark.parametrize(
    "argv, state_bytes",
    [(["--optim", "adamw"], lambda model: sum(8 * p.numel() + 4 for p in model.parameters())),  # + a float32 step
     (["--optim", "lion", "--lion_bits", "32"], lambda model: sum(4 * p.numel() for p in model.parameters())),
     (["--optim", "lion", "--lion_bits", "8"], lion8bit_state_bytes)], ids=["AdamW", "Lion32bit", "Lion8bit"],
)  # fmt: skip
def test_cost_json_holds_pairs_per_second_peak_memory_and_optimizer_state_bytes_per_parameter(
    minilm, tmp_path, argv, state_bytes
):
    trainer = make_trainer(minilm, tmp_path, [*argv, "--max_steps", "3", "--per_device_train_batch_size", "4",
                                              "--save_strategy", "no", "--warmup_steps", "0"])  # fmt: skip
    trainer.train()
    run = cost(tmp_path / "out")
    assert (run["steps"], run["train_pairs"], run["processes"], run["device"]) == (3, 3 * 4, 1, "cpu")
    assert 0 < run["train_seconds"] <= run["wall_seconds"]
    assert run["pairs_per_second"] == run["train_pairs"] / run["train_seconds"]
    assert run["device_hours"] == pytest.approx(run["wall_seconds"] / 3600)
    assert run["memory_kind"] == "cpu_rss" and 50e6 < run["peak_memory_bytes"] < 64e9
    parameters = sum(p.numel() for p in trainer.model.parameters())
    assert run["parameters"] == parameters == 22_713_601  # MiniLM-L6 and its one-logit head
    assert run["optimizer_state_bytes"] == state_bytes(trainer.model)
    assert run["optimizer_state_bytes_per_param"] == run["optimizer_state_bytes"] / parameters
    expected = {"AdamW": (8, 8.0001), "Lion32bit": (4, 4), "Lion8bit": (1, 1.03)}[run["optimizer"]]
    assert expected[0] <= run["optimizer_state_bytes_per_param"] <= expected[1]


def test_seconds_spent_evaluating_and_saving_checkpoints_are_not_training_seconds(tiny_bert, tmp_path):
    """4 steps, an evaluation after steps 2 and 4, a save after 3 and 4, each made half a second longer: none of that
    half second is in train_seconds (4 steps of the tiny model take well under it)."""
    trainer = make_trainer(tiny_bert, tmp_path, ["--max_steps", "4", "--per_device_train_batch_size", "4",
                                                 "--save_strategy", "steps", "--save_steps", "3"])  # fmt: skip
    trainer.args.eval_strategy, trainer.args.eval_steps, trainer.eval_dataset = "steps", 2, trainer.train_dataset

    def slowed(method):
        return lambda *args, **kwargs: time.sleep(0.5) or method(*args, **kwargs)

    trainer.evaluate, trainer._save_checkpoint = slowed(trainer.evaluate), slowed(trainer._save_checkpoint)
    trainer.train()
    run = cost(tmp_path / "out")
    assert run["train_seconds"] < 0.5 and run["wall_seconds"] > run["train_seconds"] + 4 * 0.5
    assert run["train_pairs"] == 4 * 4 and run["pairs_per_second"] == 16 / run["train_seconds"]


def saved_totals(checkpoint):
    """The cost totals a checkpoint carries in its trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["RunCost"]["attributes"]["before"]


def test_a_stopped_and_resumed_run_adds_up_its_sessions_without_counting_a_step_twice(tiny_bert, tmp_path):
    """Unbroken: 6 steps of 4 pairs, checkpoints every 2. Stopped by SIGTERM after step 3 and resumed; and resumed from
    a copy of the unbroken run's checkpoint-2, which carries its own totals, not those of the whole run."""
    argv = ["--max_steps", "6", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
            "--warmup_steps", "0"]  # fmt: skip
    make_trainer(tiny_bert, tmp_path / "unbroken", argv).train()
    unbroken = cost(tmp_path / "unbroken" / "out")
    assert unbroken["train_pairs"] == 6 * 4
    assert saved_totals(tmp_path / "unbroken" / "out" / "checkpoint-2")["train_pairs"] == 2 * 4

    class SignalDuringStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    stopped = make_trainer(tiny_bert, tmp_path / "stopped", argv)
    stopped.add_callback(SignalDuringStep3())
    stopped.train()
    first = cost(tmp_path / "stopped" / "out")
    assert (first["steps"], first["train_pairs"]) == (3, 3 * 4)
    make_trainer(tiny_bert, tmp_path / "stopped", argv).train(str(tmp_path / "stopped" / "out" / "checkpoint-3"))
    resumed = cost(tmp_path / "stopped" / "out")
    assert (resumed["steps"], resumed["train_pairs"]) == (6, unbroken["train_pairs"])
    assert resumed["train_seconds"] > first["train_seconds"] and resumed["wall_seconds"] > first["wall_seconds"]

    # A copy of checkpoint-2 whose totals say 1000 s in training, a 1 TB peak: the resumed run adds to them.
    copy = tmp_path / "copy" / "out" / "checkpoint-2"
    shutil.copytree(tmp_path / "unbroken" / "out" / "checkpoint-2", copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    state["stateful_callbacks"]["RunCost"]["attributes"]["before"].update(train_seconds=1000.0, peak_memory_bytes=1e12)
    (copy / "trainer_state.json").write_text(json.dumps(state))
    make_trainer(tiny_bert, tmp_path / "copy", argv).train(str(copy))
    copied = cost(tmp_path / "copy" / "out")
    assert copied["train_pairs"] == unbroken["train_pairs"]
    assert 1000 < copied["train_seconds"] < 1000 + copied["wall_seconds"] - saved_totals(copy)["wall_seconds"]
    assert copied["peak_memory_bytes"] == 1e12  # the peak of every session


def test_a_checkpoint_saved_before_run_cost_resumes_and_counts_from_the_resume(tiny_bert, tmp_path, caplog):
    """Its trainer_state.json has no RunCost entry: the Trainer's next save would fail on it (KeyError)."""
    argv = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]
    make_trainer(tiny_bert, tmp_path, argv).train()
    old = tmp_path / "old" / "out" / "checkpoint-2"
    shutil.copytree(tmp_path / "out" / "checkpoint-2", old)
    state = json.loads((old / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["RunCost"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    make_trainer(tiny_bert, tmp_path / "old", argv).train(str(old))
    assert cost(tmp_path / "old" / "out")["train_pairs"] == 2 * 4
    assert "holds no cost totals" in caplog.text
    assert saved_totals(tmp_path / "old" / "out" / "checkpoint-4")["train_pairs"] == 2 * 4
