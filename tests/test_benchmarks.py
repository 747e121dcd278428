"""The optimizer-step benchmark keeps its JSON contract and its profile mode runs (CPU, tiny)."""

import json
import sys

from helpers import REPO, ok, run

BENCH = str(REPO / "benchmarks" / "optimizer_step.py")


def test_optimizer_step_json_contract():
    proc = ok(run([sys.executable, BENCH, "--params", "50000", "--device", "cpu", "--rules", "dense,topk",
                   "--warmup", "1", "--repeats", "3", "--json"], timeout=300))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["params"] == 50000 and res["device"] == "cpu" and res["fused_adamw_ms"] > 0
    assert set(res["rules"]) == {"dense", "topk"}
    for r in res["rules"].values():
        assert r["ms"] > 0 and r["ratio"] > 0
        assert abs(r["gbps"] - 28 * 50000 / r["ms"] / 1e6) <= 0.05 + 0.01 * r["gbps"]
    assert 0.05 < res["rules"]["topk"]["fraction"] < 0.15 and res["rules"]["dense"]["fraction"] == 1.0


def test_optimizer_step_profile_names_the_rule_and_refuses_unknown_rules():
    proc = ok(run([sys.executable, BENCH, "--params", "50000", "--device", "cpu", "--profile", "topk"], timeout=300))
    assert "20 masked topk steps" in proc.stdout and "MaskedAdamW.step" in proc.stdout
    bad = run([sys.executable, BENCH, "--profile", "ledger"], timeout=120)
    assert bad.returncode == 2 and "--profile" in bad.stderr
