"""SPEC#sampleN and SPEC#restN: a fixed, seeded part of a data spec's judged queries, and its complement."""

import json
import random
import re
import shutil
import sys

import pytest

import data_specs
import evaluate  # the repo's evaluate.py, not Hugging Face's package
import model_card
import train
from conftest import DATA, needs_data
from cli import InputError

TEST = f"{DATA}/msmarco-sample:test"  # 191 queries, 174 of them judged
TRAIN = f"{DATA}/msmarco-sample:train"  # 317 queries, 279 judged, each with a positive


@pytest.fixture(scope="module")
def whole():
    return data_specs.load_data(TEST, top_k=20)


@needs_data
def test_sample_and_rest_are_disjoint_and_together_every_judged_query(whole):
    sample, rest = data_specs.load_data(f"{TEST}#sample60", top_k=20), data_specs.load_data(f"{TEST}#rest60", top_k=20)

    assert len(whole.queries) == 191 and len(whole.qrels) == 174
    assert len(sample.qrels) == 60 and len(rest.qrels) == 174 - 60
    assert set(sample.qrels) == set(random.Random(0).sample(sorted(whole.qrels), 60))
    assert not set(sample.qrels) & set(rest.qrels)
    assert set(sample.qrels) | set(rest.qrels) == set(whole.qrels)
    assert (sample.name, rest.name) == (f"{TEST}#sample60", f"{TEST}#rest60")


@needs_data
def test_a_subset_keeps_its_queries_qrels_and_run_as_they_were_and_only_the_documents_they_name(whole):
    sample = data_specs.load_data(f"{TEST}#sample60", top_k=20)

    assert set(sample.queries) == set(sample.qrels) == set(sample.run)  # every judged test query has candidates
    assert all(text == whole.queries[query_id] for query_id, text in sample.queries.items())
    assert all(sample.qrels[query_id] == whole.qrels[query_id] for query_id in sample.qrels)
    assert all(sample.run[query_id] == whole.run[query_id] for query_id in sample.run)
    named = {doc_id for table in (sample.run, sample.qrels) for docs in table.values() for doc_id in docs}
    assert sample.corpus == {doc_id: whole.corpus[doc_id] for doc_id in named if doc_id in whole.corpus}
    assert sample.ranked == whole.ranked


def draw(judged, suffix):
    return data_specs.subset_query_ids(judged, data_specs.SUBSET.fullmatch(suffix), f"x:y#{suffix}")


def test_the_same_seed_draws_the_same_queries_and_another_seed_another_draw():
    judged = [f"q{i}" for i in range(10)]  # sorted already

    assert draw(judged, "sample3") == draw(judged, "sample3-seed0") == {"q6", "q9", "q0"}  # random.Random(0).sample
    assert draw(judged, "sample3-seed1") == {"q2", "q1", "q4"}
    assert draw(judged, "rest3-seed1") == {"q0", "q3", "q5", "q6", "q7", "q8", "q9"}
    assert draw(judged[::-1], "sample3") == {"q6", "q9", "q0"}  # the ids decide, not the order they come in


@needs_data
def test_without_candidates_a_subset_is_its_queries_and_qrels():
    split = data_specs.load_data(f"{TEST}#sample5-seed2", top_k=20, with_candidates=False)
    qrels = data_specs.load_data(TEST, top_k=20, with_candidates=False).qrels

    assert sorted(split.qrels) == sorted(random.Random(2).sample(sorted(qrels), 5)) == sorted(split.queries)
    assert (split.run, split.corpus) == ({}, {})


@needs_data
def test_train_py_trains_on_a_subset_of_a_split():
    whole = data_specs.load_training_split(TRAIN)
    sampled = random.Random(0).sample(sorted(whole.qrels), 20)
    assert all(1 in whole.qrels[query_id].values() for query_id in sampled)  # each has a positive: all 20 train

    examples = train.load_examples(f"{TRAIN}#sample20")

    queries = {query for example in examples for query, _, label in example if label == 1.0}
    assert queries == {query for example in examples for query, _, _ in example}
    assert queries == {whole.queries[query_id] for query_id in sampled} and len(queries) == 20


@needs_data
def test_evaluate_py_scores_a_run_file_on_a_subset_only(tmp_path, monkeypatch):
    spec = f"{TEST}#rest150"
    argv = ["--run", f"{DATA}/msmarco-sample/run.test.trec", "--data", spec, "--output_dir", tmp_path]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
    evaluate.main()

    per_query = json.loads((tmp_path / "msmarco-sample-test-rest150" / "run.test.per_query.json").read_text())
    assert len(per_query) == 174 - 150
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == [spec]


@needs_data
def test_a_reranked_subset_is_named_in_the_model_card_with_its_specs_candidates(tiny_bert, tmp_path, monkeypatch):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_bert, model)
    (model / "README.md").write_text(f"## Evaluation\n\n{model_card.EVALUATIONS_START}\n{model_card.EVALUATIONS_END}\n")
    spec = f"{TEST}#sample3"
    argv = ["--models", model, "--data", spec, "--top_k", "5", "--dtype", "float32", "--output_dir", tmp_path / "eval"]
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv)])
    evaluate.main()

    card = (model / "README.md").read_text()
    assert f"### `{spec}`\n\nReranking up to 5 candidates per query from `{DATA}/msmarco-sample/run.test.trec`: " \
           "3 judged queries (binary qrels), 15 pairs;" in card
    assert (tmp_path / "eval" / "msmarco-sample-test-sample3" / "tiny.trec").read_text().count("\n") == 15


def test_folder_names_are_readable_and_tell_subsets_apart():
    assert data_specs.data_folder(f"{DATA}/msmarco-sample:test#sample60") == "msmarco-sample-test-sample60"
    assert data_specs.data_folder("dev-small#sample500") == "dev-small-sample500"
    assert data_specs.data_folder("dev-small#rest500-seed1") == "dev-small-rest500-seed1"
    assert data_specs.data_folder("irds:msmarco-passage/dev#sample5") == "irds-msmarco-passage-dev-sample5"
    assert data_specs.data_folder("runs#2/data:test") == "data-test"  # a '#' in a folder is no suffix


def test_a_subset_of_msmarco_v11_keeps_its_given_order_row():
    assert evaluate.first_stage_name("msmarco-v1.1-val#sample100") == "given-order"
    assert evaluate.first_stage_name("dev-small#sample100") == "BM25"


def test_candidates_of_a_subset_spec_are_given_as_for_any_spec():
    args = evaluate.EvaluationArguments(data=["dl19#sample5"], models=["m"], candidates=["dl19#sample5=bm25.txt"])
    assert args.candidates_of == {"dl19#sample5": "bm25.txt"}


@needs_data
@pytest.mark.parametrize(
    "suffix, message",
    [
        ("#foo", "expected SPEC#sampleN or SPEC#restN, optionally -seedS (e.g. dev-small#sample500)"),
        ("#sample5-seed", "expected SPEC#sampleN or SPEC#restN, optionally -seedS (e.g. dev-small#sample500)"),
        ("#sample0", "N must be from 1 to 174, its number of judged queries, not 0"),
        ("#sample175", "N must be from 1 to 174, its number of judged queries, not 175"),
        ("#rest175", "N must be from 1 to 174, its number of judged queries, not 175"),
        ("#rest174", "#rest174 leaves no query: all 174 judged queries are in #sample174"),
    ],
)
def test_bad_subsets_are_one_line_errors(suffix, message):
    with pytest.raises(InputError, match=f"^{re.escape(f'{TEST}{suffix}: {message}')}$"):
        data_specs.load_data(f"{TEST}{suffix}", top_k=20, with_candidates=False)


def test_a_bad_subset_is_refused_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--run", "x.trec", "--data", "dev-small#foo", "--output_dir",
                                      str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        evaluate.main()

    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: dev-small#foo: expected SPEC#sampleN or SPEC#restN, optionally -seedS (e.g. dev-small#sample500)\n"
    )
