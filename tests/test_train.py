"""train.py: the thesis optimizers, schedules, loss and presets, training data, validation and bad input. Stopping and
resuming: test_stop_and_resume.py; the CPU fast path: test_cpu_fast_path.py; the registries: test_registries.py."""

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest
import torch
from conftest import DATA, REPO, TWO_PROCESSES, load_pairs, make_trainer, needs_data, tiny_dataset
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GteConfig,
    ModernBertConfig,
)

import data_specs
import stop_and_resume
import train
from cli import InputError
from reranker import PRESETS, Preset, evaluate_run, load_split, rerank


def state_bytes_per_parameter(optimizer, model):
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return state / sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Optimizers


def test_lion_32bit_takes_the_thesis_update_equations_4_6_to_4_8():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lr, beta1, beta2, weight_decay = 1e-3, 0.9, 0.99, 0.01
    param = torch.nn.Parameter(torch.randn(64, 96))
    optimizer = bnb.optim.Lion32bit([param], lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    momentum = torch.zeros_like(param)
    for _ in range(5):
        theta, grad = param.detach().clone(), torch.randn_like(param)
        param.grad = grad.clone()
        optimizer.step()
        update = torch.sign(beta1 * momentum + (1 - beta1) * grad)  # (4.6) c_t = b1 m + (1 - b1) g; sign
        theta = theta - lr * (update + weight_decay * theta)  # (4.7) theta -= lr (sign(c_t) + lambda theta)
        momentum = beta2 * momentum + (1 - beta2) * grad  # (4.8) m_t = b2 m + (1 - b2) g
        # Equal up to float32 rounding (a wrong sign would be off by 2 lr = 2e-3).
        torch.testing.assert_close(param.detach(), theta, rtol=0, atol=1e-6)
    torch.testing.assert_close(optimizer.state[param]["state1"], momentum, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "argv, max_bytes, min_bytes",
    [(["--optim", "lion", "--lion_bits", "8"], 1.1, 0.9), (["--optim", "lion", "--lion_bits", "32"], 4.01, 3.99),
     (["--optim", "adamw"], 8.01, 7.99)],
)  # fmt: skip
def test_optimizer_state_bytes_per_parameter(minilm, tmp_path, argv, max_bytes, min_bytes):
    trainer = make_trainer(minilm, tmp_path, argv)
    optimizer = trainer.create_optimizer()
    loss = trainer.model(**trainer.data_collator([trainer.train_dataset[0]])).logits.sum()
    loss.backward()
    optimizer.step()
    assert min_bytes <= state_bytes_per_parameter(optimizer, trainer.model) <= max_bytes


@pytest.mark.parametrize(
    "argv, expected_class, betas, eps",
    [(["--optim", "lion"], "Lion8bit", (0.9, 0.99), None), (["--optim", "lion", "--lion_bits", "32"], "Lion32bit",
      (0.9, 0.99), None), (["--optim", "adamw"], "AdamW", (0.9, 0.999), 1e-8),
     (["--optim", "lion", "--lion_beta1", "0.95", "--lion_beta2", "0.98"], "Lion8bit", (0.95, 0.98), None)],
)  # fmt: skip
def test_the_trainer_steps_the_requested_optimizer_with_thesis_settings(
    minilm, tmp_path, argv, expected_class, betas, eps
):
    trainer = make_trainer(minilm, tmp_path, [*argv, "--max_steps", "1", "--save_strategy", "no"])
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper -> the optimizer that stepped
    assert type(optimizer).__name__ == expected_class
    assert optimizer.state, "the optimizer never stepped"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == betas and decay["initial_lr"] == 2e-5
    if eps is not None:
        assert decay["eps"] == eps and decay.get("fused")
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    decay_names = [names[id(p)] for p in decay["params"]]
    assert "bert.embeddings.LayerNorm.weight" in no_decay_names and "classifier.bias" in no_decay_names
    assert all("bias" not in n and "LayerNorm" not in n for n in decay_names)
    assert "classifier.weight" in decay_names
    assert len(no_decay_names) + len(decay_names) == len(names)


@pytest.mark.parametrize("model, schedule", [("minilm", "constant"), ("gte", "constant"), ("modernbert", "cosine")])
def test_learning_rate_follows_the_preset_schedule(minilm, tmp_path, monkeypatch, model, schedule):
    """Steps 0, 500, 1000 and the last of 3000: linear warmup over 1000 steps, then constant or cosine to 0."""
    monkeypatch.setitem(PRESETS, model, Preset(minilm, *[getattr(PRESETS[model], f) for f in
                                                          ("learning_rate", "max_length", "lr_scheduler_type")]))  # fmt: skip
    trainer = make_trainer(model, tmp_path)
    peak = PRESETS[model].learning_rate
    trainer.create_optimizer_and_scheduler(num_training_steps=3000)
    learning_rates = []
    for step in range(3000):
        learning_rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert learning_rates[0] == 0.0
    assert learning_rates[500] == pytest.approx(peak / 2)
    assert learning_rates[1000] == pytest.approx(peak)
    cosine_end = peak * 0.5 * (1 + math.cos(math.pi * 1999 / 2000))  # step 2999 of a 1000..3000 cosine
    assert learning_rates[-1] == pytest.approx(peak if schedule == "constant" else cosine_end, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Loss


def test_loss_is_binary_cross_entropy_on_the_logit_not_mse(minilm, tmp_path):
    trainer = make_trainer(minilm, tmp_path, labels=[1.0, 0.0])
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    trainer.model.eval()  # no dropout: the loss must match the logits computed here
    logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.reshape(-1).tolist()
    by_hand = (math.log(1 + math.exp(-logits[0])) + math.log(1 + math.exp(logits[1]))) / 2  # -log s(x), -log(1-s(x))
    mse = ((logits[0] - 1) ** 2 + logits[1] ** 2) / 2
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert loss == pytest.approx(by_hand, abs=1e-6)
    assert abs(loss - mse) > 1e-3


def test_bce_loss_on_two_examples_by_hand():
    outputs = type("Outputs", (), {"logits": torch.tensor([[2.0], [-1.0]])})()
    mean = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert train.bce_loss(outputs, torch.tensor([1.0, 0.0])).item() == pytest.approx(mean, abs=1e-7)
    # In the Trainer's loop: these 2 pairs of the 8 of an optimizer step add a quarter of the step's mean loss
    share = train.bce_loss(outputs, torch.tensor([1.0, 0.0]), num_items_in_batch=torch.tensor(8))
    assert share.item() == pytest.approx(mean / 4, abs=1e-7)
    # DataParallel on 2 GPUs: one count per GPU, and the Trainer multiplies the loss by 2 afterwards
    per_gpu = torch.tensor(8).expand(2, 1)
    assert 2 * train.bce_loss(outputs, torch.tensor([1.0, 0.0]), per_gpu).item() == pytest.approx(mean / 4, abs=1e-7)


@pytest.fixture(scope="module")
def minilm_without_dropout(minilm, tmp_path_factory):
    """The packaged MiniLM with a saved one-logit head and no dropout: two forward passes give the same loss."""
    folder = tmp_path_factory.mktemp("no-dropout")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(
        minilm, num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def test_loss_and_gradient_norm_are_the_means_over_the_step_however_it_is_split(minilm_without_dropout, tmp_path):
    logged = []
    for batch, accumulation in [(16, 1), (8, 2), (4, 4)]:  # 16 pairs a step: one batch, or two or four accumulated
        argv = ["--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation, "--max_steps", 1,
                "--logging_steps", 1, "--warmup_steps", 0, "--train_sampling_strategy", "sequential",
                "--save_strategy", "no"]  # fmt: skip
        trainer = make_trainer(minilm_without_dropout, tmp_path / str(batch), list(map(str, argv)))
        trainer.train()
        [entry] = [e for e in trainer.state.log_history if "loss" in e]
        logged.append((entry["loss"], entry["grad_norm"]))
    model = AutoModelForSequenceClassification.from_pretrained(minilm_without_dropout).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_without_dropout)
    dataset = tiny_dataset(tokenizer, (1.0, 0.0) * 8)
    batch = train.collate_pairs(tokenizer)([dataset[i] for i in range(16)])
    labels = batch.pop("labels")
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch).logits.reshape(-1), labels).item()

    assert logged[0][0] == pytest.approx(by_hand, rel=1e-4)  # the mean over the 16 pairs, not a multiple of it
    for loss, grad_norm in logged[1:]:
        assert loss == pytest.approx(logged[0][0], rel=1e-4) and grad_norm == pytest.approx(logged[0][1], rel=1e-3)


def test_two_processes_of_8_pairs_a_step_train_as_one_process_of_16(minilm_without_dropout, tmp_path):
    """`accelerate launch --multi_gpu` DDP (gloo on this CPU, NCCL on GPUs): the loss and gradient are means over the
    16 pairs of the step however the processes split them, every weight gets a gradient each step, as
    ddp_find_unused_parameters=False needs (DDP stops with an error otherwise), and the validation rerank, its
    600 pairs shared out unevenly (10 batches of up to 64), gives the metrics of one process."""
    argv = ["--model", str(minilm_without_dropout), "--optim", "adamw", "--train_data", f"{REPO}/data/demo:train",
            "--negatives_per_query", "4", "--max_steps", "2", "--warmup_steps", "0", "--logging_steps", "1",
            "--max_length", "128", "--train_sampling_strategy", "sequential", "--save_strategy", "no",
            "--eval_data", f"{REPO}/data/demo:test", "--eval_top_k", "30", "--eval_strategy", "steps",
            "--eval_steps", "2", "--per_device_eval_batch_size", "64", "--report_to", "none"]  # fmt: skip
    train.main([*argv, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "one")])
    command = [*TWO_PROCESSES, str(REPO / "train.py"), *argv, "--per_device_train_batch_size", "8", "--output_dir",
               str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    logged = {}
    for run in ("one", "two"):
        history = json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        logged[run] = [value for e in history if "loss" in e for value in (e["loss"], e["grad_norm"])]
    assert len(logged["one"]) == 4 and logged["two"] == pytest.approx(logged["one"], rel=1e-5)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    one, two = (json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("one", "two"))
    assert (two["eval_mrr@10"], two["eval_ndcg@10"]) == (one["eval_mrr@10"], one["eval_ndcg@10"])
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert "find_unused_parameters=True" not in done.stderr


# --------------------------------------------------------------------------------------------------------------------
# Presets


def test_presets_are_the_thesis_tables():
    assert PRESETS["minilm"] == Preset("microsoft/MiniLM-L12-H384-uncased", 2e-5, 512, "constant_with_warmup")
    assert PRESETS["gte"] == Preset("alibaba-nlp-community/gte-multilingual-base", 2e-5, 8192, "constant_with_warmup")
    assert PRESETS["modernbert"] == Preset("answerdotai/ModernBERT-base", 2e-6, 8192, "cosine")
    for model in PRESETS:
        script_args, args, preset = train.parse_args(["--model", model, "--optim", "lion"])
        assert (args.learning_rate, script_args.max_length) == (preset.learning_rate, preset.max_length)
        assert args.lr_scheduler_type.value == preset.lr_scheduler_type
        assert args.per_device_train_batch_size == 16 and args.num_train_epochs == 3  # Table 4.2
        assert args.weight_decay == 0.01 and args.warmup_steps == 1000 and args.max_grad_norm == 1.0
        assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
        assert (args.lion_beta1, args.lion_beta2, args.optim) == (0.9, 0.99, "lion_8bit")
        assert args.output_dir == f"runs/{model}-lion"


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "report.py"])
def test_help_lists_the_options_and_their_defaults(script):
    """--help exits 0 (argparse formats every help text with %: a bare percent sign breaks it); train.py's shows the
    chosen preset's values as the defaults."""
    argv = ["--model", "modernbert", "--help"] if script == "train.py" else ["--help"]
    result = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    if script == "train.py":
        text = " ".join(result.stdout.split())
        assert "The initial learning rate for the optimizer. (default: 2e-06)" in text
        assert "every 5% of the run" in text and "(default: 10000)" in text


def test_an_explicit_flag_beats_the_preset():
    script_args, args, _ = train.parse_args(
        ["--model", "modernbert", "--learning_rate", "1e-4", "--max_length", "128", "--lr_scheduler_type", "linear",
         "--per_device_train_batch_size", "8"]
    )  # fmt: skip
    assert (args.learning_rate, script_args.max_length, args.lr_scheduler_type.value) == (1e-4, 128, "linear")
    assert args.per_device_train_batch_size == 8
    _, args, preset = train.parse_args(["--model", "some/hub-model"])  # not a preset: MiniLM's settings
    assert (preset.model_name_or_path, args.learning_rate) == ("some/hub-model", 2e-5)


# --------------------------------------------------------------------------------------------------------------------
# GTE and ModernBERT through train.py's own loading and training path, on tiny random models.


def save_tiny(minilm, folder, config_class, **settings):
    """A tiny random model of `config_class` with MiniLM's tokenizer, saved as a local folder."""
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = config_class(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, num_labels=1,
        **settings,
    )  # fmt: skip
    config.type_vocab_size = 2  # the BERT tokenizer used here marks the passage with token type 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config


@needs_data
@pytest.mark.parametrize(
    "config_class, settings, flags, pooling",
    [(GteConfig, {}, [], None),
     # the default is the model's own pooling (answerdotai/ModernBERT-base's hub config says "mean"), not forced
     (ModernBertConfig, {"classifier_pooling": "mean"}, [], "mean"),
     (ModernBertConfig, {"classifier_pooling": "mean"}, ["--classifier_pooling", "cls"], "cls")],
)  # fmt: skip
def test_tiny_gte_and_modernbert_train_through_train_py(minilm, tmp_path, config_class, settings, flags, pooling):
    config = save_tiny(minilm, tmp_path / "tiny", config_class, **settings)
    out = tmp_path / "out"
    train.main(
        ["--model", str(tmp_path / "tiny"), "--optim", "lion", "--train_data", f"{DATA}/msmarco-sample:train",
         "--negatives_per_query", "1", "--max_train_pairs", "48", "--max_steps", "3", "--warmup_steps", "1",
         "--max_length", "64", "--logging_steps", "1", "--output_dir", str(out), "--report_to", "none", *flags]
    )  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in history if "loss" in e)
    saved = AutoModelForSequenceClassification.from_pretrained(out)
    assert saved.config.model_type == config.model_type and saved.config.num_labels == 1
    assert getattr(saved.config, "classifier_pooling", None) == pooling
    initial = load_file(tmp_path / "tiny" / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    # The whole encoder trains, not just the head: Lion moves every element whose update has a sign by the learning
    # rate (a one-element bias can come back to exactly where it was when its two updates have opposite signs).
    unchanged = [k for k in initial if initial[k].numel() > 1 and torch.equal(initial[k], trained[k])]
    assert unchanged == [] and len(initial) > 15


@pytest.mark.parametrize("saved, flag", [("cls", "mean"), ("mean", "cls"), ("cls", None), ("mean", None)])
def test_classifier_pooling_overrides_a_modernbert_configs_own_both_ways(minilm, tmp_path, saved, flag):
    save_tiny(minilm, tmp_path / "tiny", ModernBertConfig, classifier_pooling=saved)
    model, tokenizer = train.load_model(str(tmp_path / "tiny"), classifier_pooling=flag)
    assert model.config.classifier_pooling == (flag or saved)
    # and the head pools that way: [CLS]'s state, or the mean over the unpadded tokens
    pair = tokenizer(["a query", "another"], ["a passage", "a longer passage than that"], return_tensors="pt",
                     padding=True, return_token_type_ids=False)  # fmt: skip
    with torch.no_grad():
        hidden = model.eval().model(**pair).last_hidden_state
        mask = pair["attention_mask"].unsqueeze(-1)
        pooled = hidden[:, 0] if (flag or saved) == "cls" else (hidden * mask).sum(1) / mask.sum(1)
        assert torch.allclose(model(**pair).logits, model.classifier(model.head(pooled)), atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [(["--classifier_pooling", "mean"],
      r"--classifier_pooling mean: .*model \(bert\) has no such setting; only models that have it \(ModernBERT\)"),
     (["--classifier_pooling", "max"],
      r"argument --classifier_pooling/--classifier-pooling: invalid choice: 'max' \(choose from 'cls', 'mean'\)")],
)  # fmt: skip
def test_classifier_pooling_on_a_model_without_it_is_a_one_line_error(minilm, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model", minilm, "--check_only", "--train_data", str(tmp_path / "t.tsv"), *argv])
    errors = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(errors) == 1 and re.match(f"error: {message}", errors[0]), errors


# --------------------------------------------------------------------------------------------------------------------
# Training batches


def test_training_batches_group_pairs_of_similar_length(minilm, tmp_path):
    trainer = make_trainer(minilm, tmp_path)
    rnd = random.Random(0)
    pairs = [("a query", " ".join(["word"] * rnd.randint(5, 100)), 0.0) for _ in range(480)]
    trainer.train_dataset = train.tokenize_pairs(pairs, trainer.processing_class, 128)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]

    def padding_efficiency(order):  # real tokens / tokens computed, batches of 16 padded to their longest
        batches = [order[i : i + 16] for i in range(0, len(order), 16)]
        return sum(lengths) / sum(16 * max(lengths[i] for i in batch) for batch in batches)

    grouped = list(trainer._get_train_sampler())
    assert sorted(grouped) == list(range(480))  # every pair once
    assert padding_efficiency(grouped) > 0.85  # sorted within megabatches of 7 batches here (0.89)
    assert padding_efficiency(list(torch.randperm(480, generator=torch.Generator().manual_seed(0)))) < 0.7  # 0.57


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and line), exit code 2, no traceback.


def write_split(directory, corpus="d1\tfirst passage\nd2\tsecond passage\n", queries="q1\ta question\n",
                qrels="q1 0 d1 1\n", run="q1 Q0 d1 1 2.0 bm25\nq1 Q0 d2 2 1.0 bm25\n"):  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in [("corpus.tsv", corpus), ("queries.x.tsv", queries), ("qrels.x.txt", qrels), ("run.x.trec", run)]:
        (directory / name).write_text(text)
    return f"{directory}:x"


def test_training_pairs_label_positives_1_and_take_the_best_ranked_unjudged_or_non_relevant_negatives(tmp_path):
    (tmp_path / "triples.tsv").write_text("a query\tits positive\tits negative\n")
    assert load_pairs(str(tmp_path / "triples.tsv")) == [
        ("a query", "its positive", 1.0), ("a query", "its negative", 0.0)
    ]  # fmt: skip
    # Graded qrels (relevant from grade 2): p3 is the positive; p1 (grade 1) is neither a positive nor a negative;
    # negatives follow the run's ranking: p2 (unjudged), then p4 (judged 0), then p5.
    corpus = "".join(f"p{i}\tpassage {i}\n" for i in range(1, 6))
    run = "".join(f"q1 Q0 p{i} {rank} {10 - rank} bm25\n" for rank, i in enumerate([1, 2, 3, 4, 5], 1))
    spec = write_split(tmp_path / "graded", corpus=corpus, qrels="q1 0 p3 3\nq1 0 p1 1\nq1 0 p4 0\n", run=run)
    query = "a question"
    assert load_pairs(spec, negatives_per_query=2) == [
        (query, "passage 3", 1.0), (query, "passage 2", 0.0), (query, "passage 4", 0.0)
    ]  # fmt: skip
    assert len(load_pairs(spec)) == 1 + 3  # all negatives: p2, p4, p5
    assert load_pairs(spec, max_pairs=2) == [(query, "passage 3", 1.0), (query, "passage 2", 0.0)]


def test_download_only_fetches_the_model_and_the_hub_data_and_writes_nothing(
    minilm, tmp_path, monkeypatch, msmarco_hub_cache
):
    """--download_only (for GPU nodes without network): the model and the hub dataset's three configs go through the
    calls training makes, so they are in the caches (here the hub cache already holds them: offline, it must find
    them there); for the triplets only the files that hold the pairs asked for; the output folder, even a finished
    run's, is not touched."""
    fetched, hub_files = [], data_specs.hub_files
    monkeypatch.setattr(data_specs, "hub_files", lambda config, rows=None: fetched.append((config, rows)) or
                        hub_files(config, rows))  # fmt: skip
    models, load_model = [], train.load_model
    monkeypatch.setattr(train, "load_model", lambda name, **kw: models.append(name) or load_model(name, **kw))
    finished = tmp_path / "run"
    finished.mkdir()
    (finished / "model.safetensors").write_text("a finished run")

    train.main(["--model", minilm, "--download_only", "--max_train_pairs", "6", "--output_dir", str(finished)])

    assert fetched == [("triplets", 3), ("corpus", None), ("queries", None)] and models == [minilm]
    assert [p.name for p in finished.iterdir()] == ["model.safetensors"]


def bad_input_cases(tmp_path):
    return {
        "unknown optimizer": (["--optim", "nonsense"], "--optim nonsense: not one of adamw, lion, adamw_torch,"),
        "unknown preset": (["--model", str(tmp_path / "no-such-model")], "no-such-model: no such folder"),
        "missing data file": (["--train_data", f"{tmp_path}/nothing:train"], "nothing: no such directory"),
        "wrong column count": (["--train_data", write_split(tmp_path / "a", corpus="d1\tfirst\textra\n")],
                               "corpus.tsv:1: expected 2 columns, found 3"),
        "empty text": (["--train_data", write_split(tmp_path / "b", queries="q1\t \n")], "queries.x.tsv:1: empty field"),
        "qrels doc missing from corpus": (["--train_data", write_split(tmp_path / "c", qrels="q1 0 d1 1\nq1 0 d9 1\n")],
                                          "qrels.x.txt:2: document d9 not in"),
        "no positives": (["--train_data", write_split(tmp_path / "d", qrels="q1 0 d1 0\n")],
                         "no query has a relevant document"),
        "triples with two columns": (["--train_data", str(tmp_path / "triples.tsv")], "triples.tsv:2: expected 3"),
        "hub data out of reach": (["--train_data", "sentence-transformers/msmarco"],
                                  "sentence-transformers/msmarco: cannot load it from the hub"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(bad_input_cases(Path("/x"))))
def test_bad_input_gets_a_one_line_error_and_exit_code_2(minilm, tmp_path, case):
    (tmp_path / "triples.tsv").write_text("a query\ta positive\ta negative\nonly\ttwo\n")
    argv, message = bad_input_cases(tmp_path)[case]
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--model", minilm, "--output_dir", str(tmp_path / "out"), *argv],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train_data", "t.tsv", "--eval_strategy", "steps"], "--eval_strategy steps needs --eval_data"),
        (["--eval_pairs", "5", "--eval_data", "x:y"], "--eval_pairs and --eval_data: one validation set at a time"),
        (["--eval_pairs", "5", "--metric_for_best_model", "mrr@10"], "mrr@10: not one of loss$"),
        (["--eval_pairs", "-1"], "--eval_pairs must be 0 or more"),
        (["--eval_data", "x:y", "--metric_for_best_model", "ndcg"], "ndcg: not one of loss, mrr@10, ndcg@10"),
        (["--max_length", "0"], "--max_length must be at least 1"),
        (["--max_train_pairs", "0"], "--max_train_pairs must be at least 1"),
        (["--negatives_per_query", "-1"], "--negatives_per_query must be 0 or more"),
    ],
)
def test_flags_that_would_fail_late_or_mean_something_else_are_refused_at_once(argv, message):
    with pytest.raises(InputError, match=message):
        train.parse_args(argv)


def test_bad_training_or_checkpoint_input_is_a_one_line_error(tmp_path):
    (tmp_path / "triples.tsv").write_text("\n")
    with pytest.raises(InputError, match="triples.tsv: no training pairs"):
        load_pairs(str(tmp_path / "triples.tsv"))
    (tmp_path / "not-a-checkpoint").mkdir()
    _, training_args, _ = train.parse_args(["--resume_from_checkpoint", str(tmp_path / "not-a-checkpoint")])
    with pytest.raises(InputError, match="not a checkpoint folder"):
        stop_and_resume.resume_checkpoint(training_args)


# --------------------------------------------------------------------------------------------------------------------
# accelerate + DeepSpeed: ds_config.json has no optimizer block, so ZeRO-2 steps train.py's Lion (here on the CPU).


@needs_data
def test_deepspeed_zero2_steps_our_lion_under_accelerate_launch(minilm, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml", "train.py",
         "--model", minilm, "--optim", "lion", "--train_data", f"{DATA}/msmarco-sample:train",
         "--negatives_per_query", "1", "--max_steps", "2", "--warmup_steps", "1", "--max_length", "64",
         "--report_to", "none", "--use_cpu", "true", "--output_dir", str(tmp_path / "ds")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer stepping: DeepSpeedOptimizerWrapper > DeepSpeedZeroOptimizer > Lion8bit" in result.stderr
    assert json.loads((tmp_path / "ds" / "trainer_state.json").read_text())["global_step"] == 2
    cost = json.loads((tmp_path / "ds" / "cost.json").read_text())  # run_cost.py reaches the state inside ZeRO's
    assert cost["optimizer"] == "Lion8bit" and 1 <= cost["optimizer_state_bytes_per_param"] < 1.03


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_gpu_named_but_not_seen_is_warned_about(monkeypatch, caplog):
    _, training_args, _ = train.parse_args([])  # no GPU seen: the CPU
    for visible, warned in [("3", True), ("", False), ("-1", False)]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        caplog.clear()
        train.warn_if_no_gpu_where_one_was_named(training_args)
        assert ("CUDA_VISIBLE_DEVICES=3 names a GPU, but torch sees none" in caplog.text) == warned


def validated_training(minilm, out, *extra, eval_split="test"):
    """train.main on msmarco-sample:train, validated on the top 4 candidates of msmarco-sample:EVAL_SPLIT."""
    train.main(
        ["--model", minilm, "--train_data", f"{DATA}/msmarco-sample:train", "--eval_data",
         f"{DATA}/msmarco-sample:{eval_split}", "--eval_top_k", "4", "--negatives_per_query", "1", "--warmup_steps",
         "1", "--max_length", "96", "--output_dir", str(out), "--report_to", "none", *extra]
    )  # fmt: skip


@needs_data
def test_validation_metrics_equal_a_rerank_of_the_same_candidates(minilm, tmp_path):
    """The Trainer's eval_mrr@10 / eval_ndcg@10 are evaluate.py's numbers for the same model and candidates."""
    out = tmp_path / "out"
    validated_training(minilm, out, "--max_steps", "2")
    logged = json.loads((out / "eval_results.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(out)
    split = load_split(f"{DATA}/msmarco-sample:test", top_k=4)
    aggregate, _ = evaluate_run(split.qrels, rerank(model, AutoTokenizer.from_pretrained(out), split, max_length=96))
    assert logged["eval_mrr@10"] == pytest.approx(aggregate["RR@10"], abs=1e-6)
    assert logged["eval_ndcg@10"] == pytest.approx(aggregate["nDCG@10"], abs=1e-6)


@needs_data
def test_validation_mrr_on_graded_qrels_counts_grade_2_and_up_as_relevant_as_evaluate_py_does(minilm, tmp_path):
    """On graded qrels (TREC DL, the demo's data/demo:test) eval_mrr@10 is RR(rel=2)@10, the table's MRR@10."""
    out = tmp_path / "out"
    validated_training(minilm, out, "--max_steps", "1", eval_split="test-graded")
    logged = json.loads((out / "eval_results.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(out)
    split = load_split(f"{DATA}/msmarco-sample:test-graded", top_k=4)
    run = rerank(model, AutoTokenizer.from_pretrained(out), split, max_length=96)
    aggregate, _ = evaluate_run(split.qrels, run, [ir_measures.RR(rel=2) @ 10, ir_measures.RR @ 10])
    assert aggregate["RR@10"] - aggregate["RR(rel=2)@10"] > 0.01  # grade 1 ranks above grade 2 somewhere: they differ
    assert logged["eval_mrr@10"] == pytest.approx(aggregate["RR(rel=2)@10"], abs=1e-6)


@needs_data
def test_load_best_model_at_end_keeps_the_checkpoint_with_the_best_validation_mrr(minilm, tmp_path):
    out = tmp_path / "out"
    validated_training(minilm, out, "--max_steps", "4", "--learning_rate", "1e-3", "--eval_strategy", "steps",
                       "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end",
                       "--metric_for_best_model", "mrr@10", "--save_only_model", "true")  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    mrr = {e["step"]: e["eval_mrr@10"] for e in state["log_history"] if "eval_mrr@10" in e and e["step"] <= 4}
    best_step = max(mrr, key=lambda step: (mrr[step], -step))  # the first step to reach the best value
    assert sorted(mrr) == [1, 2, 3, 4]
    assert best_step < 4, f"{mrr}: the last step is the best, so keeping it proves nothing; try another learning rate"
    assert state["best_metric"] == mrr[best_step]
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"
    final, best = load_file(out / "model.safetensors"), load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    for name in best:
        torch.testing.assert_close(final[name], best[name], rtol=0, atol=0, msg=name)
    assert json.loads((out / "eval_results.json").read_text())["eval_mrr@10"] == pytest.approx(mrr[best_step])


# --------------------------------------------------------------------------------------------------------------------
# The thesis's evaluation loss: pairs held out of the training data (its train_test_split(test_size=10_000)).


def test_the_hub_data_holds_out_the_thesis_codes_10000_pairs_for_an_evaluation_loss():
    script_args, training_args, _ = train.parse_args([])  # sentence-transformers/msmarco
    assert script_args.eval_pairs == 10_000
    assert (training_args.eval_strategy, training_args.eval_steps) == ("steps", 0.05)  # 20 points a run
    for max_pairs, held_out in [(100_000, 10_000), (99_999, 9_999), (5_000, 500), (9, 0)]:  # a tenth at most
        script_args, training_args, _ = train.parse_args(["--max_train_pairs", str(max_pairs)])
        assert (script_args.eval_pairs, training_args.eval_strategy == "steps") == (held_out, held_out > 0)
    script_args, _, _ = train.parse_args(["--max_train_pairs", "5000", "--eval_pairs", "4999"])  # asked: as asked
    assert script_args.eval_pairs == 4999
    script_args, training_args, _ = train.parse_args(["--eval_data", "x:y"])  # a reranked validation split instead
    assert (script_args.eval_pairs, training_args.eval_strategy) == (0, "epoch")
    script_args, training_args, _ = train.parse_args(["--train_data", "t.tsv"])  # local data: none unless asked
    assert (script_args.eval_pairs, training_args.eval_strategy) == (0, "no")

    pairs = [(f"q{i}", f"p{i}", float(i % 2)) for i in range(10)]
    kept, held_out = train.hold_out(pairs, 3, seed=42)
    assert len(kept) == 7 and len(held_out) == 3 and sorted(kept + held_out) == sorted(pairs)
    assert kept == [pair for pair in pairs if pair not in held_out]  # in their order
    assert train.hold_out(pairs, 3, seed=42) == (kept, held_out)
    assert {train.hold_out(pairs, 3, seed)[1][0] for seed in range(10)} != {held_out[0]}  # drawn from the seed
    with pytest.raises(InputError, match="--eval_pairs: the training data has only 10 examples to hold out 10 of"):
        train.hold_out(pairs, 10, seed=42)


@needs_data
def test_the_evaluation_loss_is_the_bce_of_the_model_on_pairs_it_never_trained_on(minilm, tmp_path, caplog):
    out, spec = tmp_path / "out", f"{DATA}/msmarco-sample:train"
    with caplog.at_level("INFO", logger="train"):
        train.main(["--model", minilm, "--train_data", spec, "--negatives_per_query", "1", "--eval_pairs", "12",
                    "--max_steps", "40", "--warmup_steps", "1", "--max_length", "96", "--save_strategy", "no",
                    "--output_dir", str(out), "--report_to", "none", "--seed", "7"])  # fmt: skip
    pairs = load_pairs(spec, negatives_per_query=1)
    kept, held_out = train.hold_out(pairs, 12)  # whatever the run's --seed
    assert f"{len(kept)} training pairs" in caplog.text and len(kept) == len(pairs) - 12
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == list(range(2, 41, 2))

    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    batch = tokenizer([q for q, _, _ in held_out], [p for _, p, _ in held_out], truncation=True, max_length=96,
                      padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        logits = model(**batch).logits.reshape(-1)
    labels = torch.tensor([label for _, _, label in held_out])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == pytest.approx(expected, abs=1e-5)


@needs_data
def test_check_only_reads_flags_data_and_model_and_writes_nothing(minilm, tmp_path, capsys):
    """What run_all.sh asks before a grid trains: exit 0 for a configuration that would start, else its one line."""
    out = tmp_path / "out"
    argv = ["--model", minilm, "--optim", "adafactor", "--train_data", f"{DATA}/msmarco-sample:train",
            "--eval_data", f"{DATA}/msmarco-sample:test", "--output_dir", str(out), "--check_only"]  # fmt: skip
    train.main(argv)
    assert not out.exists()
    for bad, message in [(["--eval_data", f"{DATA}/msmarco-sample:nothing"], "queries.nothing.tsv: no such file"),
                         (["--model", str(tmp_path / "missing")], "missing: no such folder")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            train.main([*argv, *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()
