"""Report helpers that need no run: the eval metric at equal energy, per-epoch fractions."""

import json

import pytest

from metabolic.engine.report import at_energy_table, compare, epoch_fractions, load_run, metric_at

RECORDS = [
    {"step": 10, "energy/metabolic": 50.0},  # a training record: no evaluation
    {"step": 20, "energy/metabolic": 100.0, "eval/accuracy": 0.5},
    {"step": 40, "energy/metabolic": 300.0, "eval/accuracy": 0.7},
    {"step": 60, "energy/metabolic": 400.0, "eval/accuracy": 0.9},
]


def test_metric_at_interpolates_between_evaluations_in_energy():
    assert metric_at(RECORDS, 200.0) == pytest.approx(0.6)
    assert metric_at(RECORDS, 300.0) == pytest.approx(0.7)
    assert metric_at(RECORDS, 375.0) == pytest.approx(0.85)
    assert metric_at(RECORDS, 1e6) == 0.9  # the run stopped below that energy: its last value stands
    assert metric_at(RECORDS, 99.0) is None  # before the first evaluation nothing was measured
    assert metric_at(RECORDS, 30.0, xkey="step") == pytest.approx(0.6)


def test_at_energy_table_names_runs_and_levels():
    lm = [{"energy/metabolic": 10.0, "eval/loss": 5.0}, {"energy/metabolic": 30.0, "eval/loss": 4.0}]
    text = at_energy_table([("a", RECORDS), ("b", RECORDS[:2])], [200.0, 50.0])
    lines = text.splitlines()
    assert lines[0].split() == ["run", "eval/accuracy", "at", "M=200", "eval/accuracy", "at", "M=50"]
    assert lines[2].split() == ["a", "0.6", "-"] and lines[3].split() == ["b", "0.5", "-"]
    assert at_energy_table([("lm", lm)], [20.0]).splitlines()[2].split() == ["lm", "4.5"]


def test_epoch_fractions_measure_each_epoch_between_its_boundaries():
    """Records carry the epoch count reached, so epoch 0's end is the FIRST record with epoch 1;
    later records of epoch 1's training also say 1 and must not be taken for that boundary."""
    def rec(step, epoch, changed, backward):
        return {"step": step, "epoch": epoch, "energy/changed_weights": changed, "energy/num_weights": 100,
                "data/samples_backward": backward}
    records = [rec(5, 0, 500, 50), rec(10, 1, 1000, 100),  # epoch 0 ends at step 10
               rec(12, 1, 1100, 110), rec(15, 2, 1250, 130),  # epoch 1 ends at step 15
               rec(16, 2, 1260, 131)]
    summary = {"dataset_size": 100, "epochs": [{"epoch": 0, "kept_fraction": 1.0}, {"epoch": 1, "kept_fraction": 0.5}]}
    fr = epoch_fractions(summary, records)
    assert [f["kept_fraction"] for f in fr] == [1.0, 0.5]
    assert [f["trained_fraction"] for f in fr] == [1.0, 0.3]  # screened: trained below the plan
    assert [f["changed_fraction"] for f in fr] == [1.0, 0.5]  # 1000 / (10 * 100), 250 / (5 * 100)


def test_compare_refuses_runs_of_different_tasks(tmp_path):
    # an LM run's loss and a classifier's accuracy would share one column and one axis
    for name, key, value in (("lm", "eval/loss", 4.0), ("cnn", "eval/accuracy", 0.8)):
        (tmp_path / name).mkdir()
        rec = {"step": 5, "epoch": 1, "energy/metabolic": 100.0, "data/samples_backward": 10, key: value}
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"lm \(unfinished, step 5\): eval/loss, cnn \(unfinished, step 5\): eval/accuracy"):
        compare([tmp_path / "lm", tmp_path / "cnn"], out=tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_an_unfinished_run_rebuilds_its_per_epoch_plan_from_the_records(tmp_path):
    def rec(step, epoch, plan, kept, backward):
        return {"step": step, "epoch": epoch, "data/plan_epoch": plan, "data/kept_fraction": kept,
                "data/samples_backward": backward, "data/effective_epochs": backward / 100}
    # the epoch-end record of epoch 0 already says epoch 1 but still carries plan 0's fraction
    records = [rec(5, 0, 0, 1.0, 50), rec(10, 1, 0, 1.0, 100), rec(12, 1, 1, 0.4, 120)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary, _ = load_run(tmp_path)
    assert summary["status"] == "unfinished" and summary["dataset_size"] == 100
    assert summary["epochs"] == [{"epoch": 0, "kept_fraction": 1.0}, {"epoch": 1, "kept_fraction": 0.4}]


def test_compare_gives_each_figure_as_a_ratio_to_the_first_run(tmp_path):
    runs = {"dense": (0.90, 1000.0, 600), "sparse": (0.88, 250.0, 300)}
    for name, (acc, m, bwd) in runs.items():
        (tmp_path / name).mkdir()
        summary = {"step": 10, "eval/accuracy": acc, "energy/metabolic": m, "data/samples_backward": bwd}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        rec = {"step": 10, "epoch": 1, "energy/metabolic": m, "data/samples_backward": bwd, "eval/accuracy": acc}
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    text = compare([tmp_path / "dense", tmp_path / "sparse"], out=tmp_path / "c.png")
    sparse = next(line for line in text.splitlines() if line.startswith("sparse"))
    assert "0.88 (0.98x)" in sparse and "250 (0.25x)" in sparse and "300 (0.50x)" in sparse
    dense = next(line for line in text.splitlines() if line.startswith("dense"))
    assert "1000 (1.00x)" in dense and (tmp_path / "c.png").is_file()
