# make demo: offline demo on the bundled data (packaged MiniLM, CPU is fine)
# make test: the CPU test suite (what CI runs)
# make test-floors: every requirements floor at once, in a second environment, and smoke tests there (CI runs it too)
# Each target builds its own virtual environment from nothing on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

FLOORS ?= .venv-floors
# a training run of each architecture (Lion8bit on the CPU), the hub and ir_datasets loaders on their replicas,
# scoring against CrossEncoder, trec_eval's measures, BM25 with stemming, the t-test, the report's and the study's
# tables and figures
SMOKE := tests/test_train.py::test_tiny_gte_and_modernbert_train_through_train_py tests/test_replicas.py \
	tests/test_evaluate.py::test_run_mode_matches_trec_eval_with_relevance_level_2_on_trec_dl \
	tests/test_evaluate.py::test_rerank_scores_are_the_logits_whose_sigmoid_is_sentence_transformers_cross_encoder_predict \
	tests/test_evaluate.py::test_bm25_on_cranfield_lands_where_bm25_with_porter_stemming_does_and_gives_the_same_run_twice \
	tests/test_evaluate.py::test_paired_t_test_and_holm_correction_match_hand_computed_values \
	tests/test_report.py::test_table_shows_mean_and_std_over_seeds_marks_lion_vs_adamw_and_the_thesis_layout \
	tests/test_study.py::test_report_writes_selection_json_the_headline_table_with_holm_the_figure_and_the_cost

.PHONY: demo test test-floors clean

$(VENV)/installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/installed
	PATH=$(abspath $(VENV))/bin:$$PATH bash run_all.sh --demo

test: $(VENV)/installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# uv resolves each direct requirement to its lowest allowed version (their dependencies to the newest that fit)
test-floors:
	rm -rf $(FLOORS)
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install -q uv
	$(FLOORS)/bin/uv pip install -q --python $(FLOORS)/bin/python --resolution lowest-direct \
		-r requirements.txt -r requirements-test.txt
	HF_HUB_OFFLINE=1 $(FLOORS)/bin/python -m pytest -q -p no:cacheprovider $(SMOKE)

clean:
	rm -rf $(VENV) $(FLOORS) results runs
