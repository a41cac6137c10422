"""train.py's registries: every optimizer the installed Trainer builds steps, an added one trains end to end, and the
listwise loss (lce) keeps each query's group in one batch, equals its hand computation and resumes exactly."""

import json
import math

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from conftest import DATA, needs_data, resumes_to_the_unbroken_run
from torch.utils.data import DataLoader
from transformers.training_args import OptimizerNames

import evaluate
import train


@pytest.fixture(autouse=True)
def forget_bitsandbytes_overrides():
    """The Trainer registers 32-bit state for embeddings of bitsandbytes' 8-bit optimizers in a process-wide manager,
    keyed by parameter id: a later model whose parameter reuses a freed id would inherit it in a later test."""
    import bitsandbytes as bnb

    yield
    bnb.optim.GlobalOptimManager.get_instance().initialize()


def trainer_for(model, tmp_path, *argv, pairs=16):
    """A RerankerTrainer on `pairs` tiny pairs, as train.main builds it."""
    script_args, args, _ = train.parse_args(["--model", model, "--output_dir", str(tmp_path / "out"),
                                             "--report_to", "none", "--eval_pairs", "0", *argv])  # fmt: skip
    network, tokenizer = train.load_model(model)
    examples = [(f"query {i // 4}", f"passage {i} about things", float(i % 4 == 0)) for i in range(pairs)]
    loss = train.LOSSES[script_args.loss]
    return train.RerankerTrainer(model=network, args=args, processing_class=tokenizer,
                                 train_dataset=train.tokenize_pairs(examples, tokenizer, 32),
                                 data_collator=train.collate_pairs(tokenizer), loss=loss,
                                 group_size=script_args.group_size if loss.grouped else 1)  # fmt: skip


def installed(name):
    """Whether the Trainer can build optimizer `name` here (its package is installed)."""
    try:
        train.parse_args(["--optim", name, "--eval_pairs", "0"])
        return True
    except train.InputError:
        return False


TRAINER_OPTIMIZERS = [name.value for name in OptimizerNames if name.value not in train.REFUSED_OPTIMIZERS]
NEEDS_A_GPU = {  # installed, but their step has no CPU path
    "stable_adamw": "torch-optimi's StableAdamW needs a GPU driver",
    "paged_ademamix_32bit": "bitsandbytes' paged AdEMAMix needs CUDA's managed memory",
    "paged_ademamix_8bit": "bitsandbytes' paged AdEMAMix needs CUDA's managed memory",
    "lomo": "lomo-optim keeps its state on CUDA", "adalomo": "lomo-optim keeps its state on CUDA",
}


@pytest.mark.parametrize("name", TRAINER_OPTIMIZERS)
def test_every_optimizer_the_trainer_builds_here_takes_a_step(tiny_bert, tmp_path, name):
    if not installed(name):
        pytest.skip(f"{name}: its package is not installed")
    if name in NEEDS_A_GPU and not torch.cuda.is_available():
        pytest.skip(NEEDS_A_GPU[name])
    trainer = trainer_for(tiny_bert, tmp_path, "--optim", name, "--max_steps", "1", "--save_strategy", "no",
                          "--warmup_steps", "0", "--learning_rate", "1e-3")  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 1
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    if name == "schedule_free_radam":  # RAdam's rectification holds its first steps back: it only keeps state
        assert trainer.optimizer.optimizer.state, f"{name} never stepped"
    else:
        assert "classifier.weight" in moved, f"{name} moved no weight of the head"


def test_an_optimizer_name_that_is_unknown_refused_or_missing_its_package_is_one_line_before_anything_loads():
    with pytest.raises(train.InputError, match=r"--optim nonsense: not one of adamw, lion, adamw_torch, .*adafactor"):
        train.parse_args(["--optim", "nonsense"])
    with pytest.raises(train.InputError, match="--optim lion_8bit: the Trainer's Lion uses AdamW's betas; use --optim"):
        train.parse_args(["--optim", "lion_8bit"])
    with pytest.raises(train.InputError, match="--optim galore_adamw: You need to install `galore_torch`"):
        train.parse_args(["--optim", "galore_adamw"])


@needs_data
def test_an_added_optimizer_and_a_trainer_optimizer_each_train_end_to_end_and_evaluate(
    minilm, tmp_path, monkeypatch, capsys, caplog
):
    """One OPTIMIZERS entry is all an optimizer needs (here SGD with Nesterov momentum); a name the Trainer knows
    (adafactor) needs none. Each trains, saves a model evaluate.py scores, and run_config.json names it."""
    nesterov = ("sgd", lambda args: (torch.optim.SGD, {"lr": args.learning_rate, "momentum": 0.9, "nesterov": True}))
    monkeypatch.setitem(train.OPTIMIZERS, "nesterov", nesterov)
    for name, stepping in [("nesterov", "SGD"), ("adafactor", "Adafactor")]:
        out = tmp_path / name
        with caplog.at_level("INFO", logger="train"):
            train.main(["--model", minilm, "--optim", name, "--train_data", f"{DATA}/msmarco-sample:train",
                        "--negatives_per_query", "1", "--max_steps", "3", "--warmup_steps", "1", "--max_length", "64",
                        "--output_dir", str(out), "--report_to", "none"])  # fmt: skip
        assert f"optimizer stepping: AcceleratedOptimizer > {stepping}" in caplog.text
        assert json.loads((out / "run_config.json").read_text())["optimizer"] == name
        assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
        monkeypatch.setattr("sys.argv", ["evaluate.py", "--models", str(out), "--data",
                                         f"{DATA}/msmarco-sample:test-graded", "--top_k", "5", "--max_length", "64",
                                         "--output_dir", str(tmp_path / f"eval-{name}")])  # fmt: skip
        evaluate.main()
        scored = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())
        assert 0 <= scored[f"{DATA}/msmarco-sample:test-graded"][name]["nDCG@10"] <= 1
        capsys.readouterr()


def test_lce_is_the_softmax_cross_entropy_of_each_groups_positive_by_hand():
    outputs = type("Outputs", (), {"logits": torch.tensor([[2.0], [1.0], [0.0], [-1.0], [0.5], [0.5], [0.5], [0.5]])})()
    labels = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0])
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1 + math.exp(-1)))  # 0.4402
    second = math.log(4)  # four equal logits
    mean = (first + second) / 2
    assert train.lce_loss(outputs, labels, group_size=4).item() == pytest.approx(mean, abs=1e-6)
    # In the Trainer's loop: these 2 groups of the 16 pairs (4 groups) of an optimizer step add half its mean
    assert train.lce_loss(outputs, labels, torch.tensor(16), group_size=4).item() == pytest.approx(mean / 2, abs=1e-6)


def test_groups_take_a_positive_and_its_querys_best_ranked_negatives_and_skip_queries_with_too_few(tmp_path, caplog):
    corpus = "".join(f"p{i}\tpassage {i}\n" for i in range(1, 7))
    run = "".join(f"q1 Q0 p{i} {i} {10 - i} bm25\n" for i in range(1, 7)) + "q2 Q0 p1 1 5 bm25\nq2 Q0 p2 2 4 bm25\n"
    qrels = "q1 0 p2 1\nq1 0 p5 1\nq2 0 p1 1\n"
    for name, text in [("corpus.tsv", corpus), ("queries.x.tsv", "q1\tfirst\nq2\tsecond\n"), ("qrels.x.txt", qrels),
                       ("run.x.trec", run)]:  # fmt: skip
        (tmp_path / name).write_text(text)
    groups = train.load_examples(f"{tmp_path}:x", group_size=3)
    negatives = [("first", "passage 1", 0.0), ("first", "passage 3", 0.0)]  # best-ranked non-relevant, every group
    assert groups == [[("first", "passage 2", 1.0), *negatives], [("first", "passage 5", 1.0), *negatives]]
    assert "1 of 2 queries skipped: fewer than --group_size - 1 = 2 negatives" in caplog.text  # q2 has one


def test_lce_keeps_each_querys_group_in_one_batch_on_every_process_in_an_order_drawn_from_seed_and_epoch(
    tiny_bert, tmp_path
):
    trainer = trainer_for(tiny_bert, tmp_path, "--loss", "lce", "--group_size", "4", "--per_device_train_batch_size",
                          "8", pairs=64)  # 16 groups of 4 rows  # fmt: skip
    sampler = trainer._get_train_sampler()

    def batches(epoch, process):  # as accelerate shares a loader's batches out between 2 processes
        loader = prepare_data_loader(DataLoader(list(range(64)), batch_size=8, sampler=sampler), num_processes=2,
                                     process_index=process, put_on_device=False)  # fmt: skip
        loader.set_epoch(epoch)  # as the Trainer does at each epoch's start
        return [batch.tolist() for batch in loader]

    for process in (0, 1):
        for batch in batches(0, process):
            assert len(batch) == 8 and [row // 4 for row in batch] == [batch[0] // 4] * 4 + [batch[4] // 4] * 4
            assert [row % 4 for row in batch] == [0, 1, 2, 3] * 2  # each group whole, its positive first
    assert batches(0, 0) == batches(0, 0) and batches(1, 0) != batches(0, 0)
    assert sorted(row for p in (0, 1) for batch in batches(0, p) for row in batch) == list(range(64))
    with pytest.raises(train.InputError, match="--per_device_train_batch_size 6: not a multiple of --group_size 4"):
        train.parse_args(["--loss", "lce", "--group_size", "4", "--per_device_train_batch_size", "6"])


@needs_data
def test_a_stopped_lce_run_resumes_to_the_weights_of_an_unbroken_one(minilm, tmp_path):
    # 12 groups of 4 (48 pairs), 3 groups a step: 4 steps an epoch, so checkpoint-2 is inside the first
    argv = ["--model", minilm, "--optim", "lion", "--loss", "lce", "--group_size", "4",
            "--per_device_train_batch_size", "12", "--train_data", f"{DATA}/msmarco-sample:train",
            "--negatives_per_query", "3", "--max_train_pairs", "48", "--max_steps", "6", "--warmup_steps", "1",
            "--max_length", "64", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
            "--report_to", "none"]  # fmt: skip
    resumes_to_the_unbroken_run(argv, tmp_path, "checkpoint-2")
