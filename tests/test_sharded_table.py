"""The owner-sharded score table: hashed draws, equal shards from owned samples, and the same
decisions as the replicated table on real gloo ranks; a sharded run resumes as uninterrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from helpers import CONFIG, REPO, SMALL, comparable, env, free_port, ok, records, summary, torchrun
from metabolic.engine import data_service
from metabolic.engine.data_service import DataService, epoch_generator, owner_split, owner_take
from metabolic.engine.policies import FullData, RandomDropout
from metabolic.engine.sharded_table import ShardedScoreTable, hashed_keys, mix64

WORKER = REPO / "tests" / "workers" / "sharded_table_worker.py"


def _splitmix_finaliser(x: int) -> int:
    """splitmix64's finaliser in Python's exact integers, as published (reference for mix64)."""
    m = 2**64 - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_mix64_wraps_like_unsigned_64_bit_arithmetic():
    values = [0, 1, 2, 12345, 2**31, 2**32 + 7, 2**62 + 5, 2**63 - 1, -1, -(2**63), -987654321]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()  # in place on its argument
    assert [g & (2**64 - 1) for g in got] == [_splitmix_finaliser(v) for v in values]


def test_hashed_draws_are_uniform_and_depend_only_on_seed_and_index():
    index = torch.arange(200_000, dtype=torch.int64)
    keys = hashed_keys(7, index)
    assert bool((keys >= 0).all()) and keys.unique().numel() == index.numel()
    assert torch.equal(hashed_keys(7, index[1::3]), keys[1::3])  # a rank's rows get the same draws
    assert not torch.equal(hashed_keys(8, index), keys)
    u = ShardedScoreTable(200_000, 0, 1).uniform(torch.Generator().manual_seed(0))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float((counts - 20_000).abs().max()) < 5 * 20_000 ** 0.5  # each decile within 5 sigma


@pytest.mark.parametrize("k", [0, 1, 37, 500, 999, 1000])
def test_random_subset_takes_exactly_k_sorted_and_reproducibly(k):
    table = ShardedScoreTable(1000, 0, 1)
    a = table.random_subset(k, torch.Generator().manual_seed(4))
    b = table.random_subset(k, torch.Generator().manual_seed(4))
    assert a.numel() == k and torch.equal(a, b) and bool((a[1:] > a[:-1]).all())
    if 0 < k < 1000:
        assert not torch.equal(a, table.random_subset(k, torch.Generator().manual_seed(5)))


def test_a_rank_holds_and_writes_only_the_rows_it_owns():
    table = ShardedScoreTable(10, rank=1, world=3)  # owns 1, 4, 7
    assert table.indices().tolist() == [1, 4, 7] and len(table) == 10 and table.loss.numel() == 3
    index = torch.tensor([0, 1, 2, 7, 4, 7])
    loss = torch.tensor([9.0, 1.0, 9.0, 2.0, 3.0, 4.0])
    table.update(index, loss=loss, prob=(-loss).exp(), correct=loss < 2.5, epoch=torch.full((6,), 5))
    assert table.loss.tolist() == [1.0, 3.0, 4.0]  # the later row of sample 7 wins
    assert table.correct.tolist() == [True, False, False] and table.epoch.tolist() == [5, 5, 5]
    assert table.global_index(table.scored().nonzero().squeeze(1)).tolist() == [1, 4, 7]


@pytest.mark.parametrize("counts", [[0, 0, 0], [5, 0, 0], [1, 0, 0], [30, 2, 9], [16, 16, 16], [17, 16, 16],
                                    [0, 40, 1]])
def test_owner_shards_are_equal_whole_steps_that_cover_every_kept_sample(counts):
    micro, accum, world = 4, 2, len(counts)
    actives = [torch.arange(c, dtype=torch.int64) * world + r for r, c in enumerate(counts)]
    weights = [torch.full((c,), 1.0 + r) for r, c in enumerate(counts)]
    splits = [owner_split(a, w, counts, micro, accum, epoch_generator(0, 1, salt=r))
              for r, (a, w) in enumerate(zip(actives, weights))]
    offers = [s[2] for s in splits]
    parts = [owner_take(s[0], s[1], offers, counts, r, micro, accum) for r, s in enumerate(splits)]
    total = sum(counts)
    steps = -(-total // (micro * accum * world))
    assert {tuple(p[0].shape) for p in parts} == {(steps * accum, micro)}
    got = torch.cat([p[0].flatten() for p in parts])
    assert set(got.tolist()) == set(torch.cat(actives).tolist())  # padding repeats samples, drops none
    repeats = sum(c - 1 for c in Counter(got.tolist()).values())
    assert repeats == world * steps * accum * micro - total
    for p in parts:  # every sample keeps its owner's weight
        assert torch.equal(p[1], 1.0 + (p[0] % world).float())
    if total and max(counts) <= steps * accum * micro:  # no surplus: a rank trains only what it owns...
        for r, p in enumerate(parts):
            mine = [i for i in p[0].flatten().tolist() if i % world == r]
            assert len(set(mine)) == counts[r]  # ...all of it, and the rest is padding


def test_auto_layout_shards_only_past_the_replica_limit(monkeypatch):
    monkeypatch.setattr(data_service, "MAX_REPLICATED_SAMPLES", 1000)
    small = DataService(1000, FullData(), seed=0, micro_batch=4, grad_accum=1, rank=1, world_size=2)
    assert not small.sharded and small.table.loss.numel() == 1000
    big = DataService(1999, FullData(), seed=0, micro_batch=4, grad_accum=1, rank=1, world_size=2)
    assert big.sharded and big.table.loss.numel() == 999 and big.table.indices()[:2].tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"1,999 training samples .* 'data\.score_table': sharded"):
        DataService(1999, FullData(), seed=0, micro_batch=4, grad_accum=1, rank=1, world_size=2,
                    score_table="replicated")
    too_many = r"3,001 training samples .*\(2 ranks of the sharded .* use more ranks, data\.limit"
    with pytest.raises(ValueError, match=too_many):
        DataService(3001, RandomDropout(0.5), seed=0, micro_batch=4, grad_accum=1, rank=0, world_size=2)


def test_three_gloo_ranks_take_the_replicated_tables_decisions(tmp_path):
    ok(torchrun(3, str(WORKER), str(tmp_path), timeout=240))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    micro, accum, world = 4, 2, 3
    for name, first in ranks[0]["policies"].items():
        for e in range(4):
            sharded = [r["policies"][name]["epochs"][e]["sharded"] for r in ranks]
            replicated = [r["policies"][name]["epochs"][e]["replicated"] for r in ranks]
            alone = first["epochs"][e]["alone"]
            assert len({tuple(s["shape"]) for s in sharded}) == 1, name
            kept = sorted(set().union(*(s["samples"] for s in sharded)))
            n = sharded[0]["num_active"]
            assert len(kept) == n, (name, e)
            steps = -(-n // (micro * accum * world))
            assert sum(s["entries"] for s in sharded) == world * steps * accum * micro, (name, e)
            # The world size does not change a decision, random ones included, nor a sample's weight.
            pairs = sorted({tuple(p) for s in sharded for p in s["pairs"]})
            assert kept == alone["samples"] and n == alone["num_active"], (name, e)
            assert pairs == [tuple(p) for p in alone["pairs"]], (name, e)
            if name in ("full", "pdd_difficulty", "lazy", "price"):  # deterministic rules: the replicated set
                assert pairs == sorted({tuple(p) for s in replicated for p in s["pairs"]}), (name, e)
            if name == "pdd_random":  # the same number of random samples
                assert n == replicated[0]["num_active"], e
        if name in ("full", "pdd_difficulty", "lazy", "price"):
            for r in ranks:  # each owner's rows hold what the replicated table holds for them
                p = r["policies"][name]
                assert p["rows"] == p["replicated_rows"], name
    assert [ranks[0]["policies"]["keep_zero"]["epochs"][e]["sharded"]["num_active"] for e in range(4)] == \
        [1000, 0, 0, 1000]
    assert ranks[0]["policies"]["keep_one"]["epochs"][1]["sharded"]["shape"] == [2, 4]  # one step per rank
    assert 0 < ranks[0]["policies"]["pdd_difficulty"]["epochs"][1]["sharded"]["num_active"] < 1000
    assert 0 < ranks[0]["policies"]["infobatch"]["epochs"][1]["sharded"]["num_active"] < 1000
    assert len({r["relative"]["level_now"] for r in ranks}) == 1 and ranks[0]["relative"]["level_now"] > 0
    # Refresh: 600-999 were never scored; each owner scores its own, padded to the largest share.
    owned_stale = [sum(1 for i in range(600, 1000) if i % world == r) for r in range(world)]
    assert [r["refresh"]["forwards"] for r in ranks] == [max(owned_stale)] * world
    real = [[i for i in r["refresh"]["scored"] if i >= 600] for r in ranks]  # padding rows score sample 0
    assert sorted(sum(real, [])) == list(range(600, 1000))
    assert all(i % world == r for r, mine in enumerate(real) for i in mine)
    assert all(r["refresh"]["stale_after"] == 0 for r in ranks)
    assert all(r["resumed_same_plans"] == [True] * 3 and r["resumed_same_table"] for r in ranks)
    assert all("'data.score_table'" in r["layout_error"] and "is sharded" in r["layout_error"] for r in ranks)
    big = sorted((i, loss) for r in ranks for i, loss in zip(r["big"]["scored"], r["big"]["loss"]))
    assert big == [(2**24 + 1 + r, 1.5 + r) for r in range(world)]


def test_two_rank_sharded_run_resumes_as_uninterrupted(tmp_path, fmnist):
    # ZeRO-3: every forward gathers the weights, so the ranks' refresh passes must line up although
    # each owns a different number of stale samples.
    args = [str(CONFIG), *SMALL, "train.epochs=3", "data.score_table=sharded", "data.policy=infobatch",
            "deepspeed.zero_stage=3", "data.refresh=true", "data.prune_ratio=0.7", "data.anneal=1.0"]

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "metabolic", "train", *args, f"output_dir={out}", *extra]
        return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    full = tmp_path / "full"
    ok(torchrun(2, "-m", "metabolic", "train", *args, f"output_dir={full}", timeout=300))
    s_full = summary(full)
    kept = [e["num_active"] for e in s_full["epochs"]]
    assert kept[0] == 384 and all(k < 384 for k in kept[1:])  # pruned epochs after the first
    refreshed = s_full["data/samples_forward"] - s_full["data/samples_backward"]
    assert refreshed % 2 == 0 and refreshed >= 384 - kept[1]  # both ranks ran as many, every stale one scored
    saved = sorted((full / "checkpoints").glob("step_*"))[-1]
    assert len(list(saved.glob("rank_state_rank*.pt"))) == 2
    shards = [torch.load(p, weights_only=True)["service"]["table"]["loss"].numel()
              for p in sorted(saved.glob("rank_state_rank*.pt"))]
    assert shards == [192, 192]  # each rank's file holds its own half of the table

    cut = tmp_path / "cut"
    proc = launch(cut)
    try:
        first_epoch = 384 // 64
        end = time.time() + 240
        while proc.poll() is None and time.time() < end:  # stop a few steps into epoch 1, where it prunes
            path = cut / "metrics.jsonl"
            if path.is_file() and any(json.loads(l)["step"] >= first_epoch + 2 for l in path.read_text().splitlines()):
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=240)
    finally:
        proc.kill()
    stopped = records(cut)[-1]["step"]
    assert first_epoch < stopped < s_full["step"] and not (cut / "summary.json").exists()
    ok(torchrun(2, "-m", "metabolic", "train", *args, f"output_dir={cut}", "resume=true", timeout=300))
    assert comparable(summary(cut)) == comparable(s_full)
