"""Report helpers that need no run: the eval metric at equal energy."""

import pytest

from metabolic.engine.report import at_energy_table, metric_at

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
