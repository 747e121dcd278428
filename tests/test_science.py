"""The science benchmark's quick mode runs end to end and its table keeps its contract."""

import json
import subprocess
import sys

import pytest

from helpers import CONFIG, REPO, SMALL, env, ok, run

METHODS = ["dense", "pdd_difficulty", "pdd_random", "infobatch", "topk", "random_weights", "joint_low",
           "joint_high", "dense_matched", "dense_energy_low", "dense_energy_high"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_science_benchmark(tmp_path, fmnist):
    proc = ok(run([sys.executable, str(REPO / "benchmarks" / "science.py"), "--quick", "--json",
                   "--out", str(tmp_path)], timeout=1500))
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for task, metric in (("fmnist", "eval/accuracy"), ("lm_tiny", "eval/loss")):
        by = {r["method"]: r for r in rows if r["task"] == task}
        assert list(by) == METHODS
        assert all(r["energy/metabolic"] >= r["energy/metabolic_min"] > 0 for r in by.values())
        assert all(r[metric] is not None for r in by.values())
        for row in by.values():  # every ratio is the row's figure over dense's
            assert row["ratio/energy/metabolic"] == pytest.approx(row["energy/metabolic"] / by["dense"]["energy/metabolic"])
        # The fair baseline takes as many optimizer steps as the low-budget joint run.
        assert by["dense_matched"]["step"] == by["joint_low"]["step"]
        # Dense at about the joint runs' energy: that share of its steps.
        for level in ("low", "high"):
            share = by[f"joint_{level}"]["energy/metabolic"] / by["dense"]["energy/metabolic"]
            assert by[f"dense_energy_{level}"]["step"] == max(1, round(share * by["dense"]["step"]))
        # A 10% mask changes about a tenth of the weights per step; data policies never back-propagate more.
        for m in ("topk", "random_weights"):
            ratio = by[m]["energy/changed_weights"] / by["dense"]["energy/changed_weights"]
            assert 0.05 < ratio < 0.15, (m, ratio)
        for m in ("pdd_difficulty", "pdd_random", "infobatch"):
            assert by[m]["data/samples_backward"] <= by["dense"]["data/samples_backward"]
        if task == "fmnist":  # gamma 0.65 prunes (lm_tiny's 0.95 is padded back to whole micro-batches)
            assert by["pdd_random"]["data/samples_backward"] < by["dense"]["data/samples_backward"]
        # The controller spends less at the lower budget.
        assert by["joint_low"]["energy/metabolic"] < by["joint_high"]["energy/metabolic"] < by["dense"]["energy/metabolic"]


@pytest.mark.parametrize("name, select, residual, decay, count_price", [
    ("topk 0.1", "topk", False, 1.0, 0.0),
    ("hard 1e-05+res0.9", "hard", True, 0.9, 0.0),
    ("soft 0.03/c1e-6+res", "soft", True, 1.0, 1e-6),
])
def test_weight_sweep_settings_are_valid_configs(name, select, residual, decay, count_price):
    # every setting name the sweep accepts turns into overrides the config loader accepts
    sys.path.insert(0, str(REPO / "benchmarks"))
    from weight_sweep import parse_setting
    from helpers import CONFIG
    from metabolic.engine.config import load_config

    label, flags = parse_setting(name)
    o = load_config(CONFIG, flags).optimizer
    assert label == name and o.name == "masked_adamw" and o.select == select
    assert (o.residual, o.residual_decay, o.count_price) == (residual, decay, count_price)


def test_resume_continues_a_method_that_was_cut_short(tmp_path, fmnist):
    # A method folder that already holds a run (cut short, or finished but not yet in rows.jsonl)
    # is continued with --resume instead of refused.
    code = f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("science", {str(REPO / "benchmarks" / "science.py")!r})
science = importlib.util.module_from_spec(spec); spec.loader.exec_module(science)
from pathlib import Path
from metabolic.engine.distributed import init_distributed
info, out, args = init_distributed(), Path({str(tmp_path / "dense")!r}), {[*SMALL, "train.epochs=1"]!r}
first = science.run_method(info, Path({str(CONFIG)!r}), args, out)
try:
    science.run_method(info, Path({str(CONFIG)!r}), args, out)
    print("refused: no")
except ValueError as err:
    print("refused:", "already holds a run" in str(err))
again = science.run_method(info, Path({str(CONFIG)!r}), args, out, resume=True)
print("same:", again["step"] == first["step"] and again["energy/metabolic"] == first["energy/metabolic"])
"""
    proc = ok(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=300))
    lines = proc.stdout.strip().splitlines()
    assert "refused: True" in lines and "same: True" in lines, proc.stdout[-2000:]
