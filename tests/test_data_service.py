"""The data service: equal shards, identical decisions on 2 gloo ranks, int64 indices, refresh, resume."""

import json

import pytest
import torch

from helpers import CONFIG, REPO, SMALL, comparable, metabolic, ok, records, stop_at_step, summary, torchrun
from metabolic.engine import data_service
from metabolic.engine.data_service import DataService, epoch_generator, shard
from metabolic.engine.policies import DifficultyDropout, InfoBatch, RandomDropout
from metabolic.engine.task import Scores

WORKER = REPO / "tests" / "workers" / "data_service_worker.py"


@pytest.mark.parametrize("n", [0, 1, 5, 64, 65, 1000])
@pytest.mark.parametrize("world,micro,accum", [(2, 4, 1), (2, 3, 2), (3, 5, 1)])
def test_shards_are_equal_whole_steps_and_cover_every_kept_sample(n, world, micro, accum):
    active = torch.arange(n, dtype=torch.int64) * 7 + 2**30
    weights = torch.rand(n)
    parts = [shard(active, weights, micro, accum, world, r, epoch_generator(0, 3)) for r in range(world)]
    shapes = {p[0].shape for p in parts}
    assert len(shapes) == 1  # every rank the same number of micro-batches
    rows = parts[0][0].shape[0]
    assert rows % accum == 0 and parts[0][0].shape[1] == micro
    assert rows == (0 if n == 0 else -(-n // (micro * accum * world)) * accum)
    got = torch.cat([p[0].flatten() for p in parts])
    assert set(got.tolist()) == set(active.tolist())  # wrap padding repeats samples, drops none
    lookup = dict(zip(active.tolist(), weights.tolist()))
    assert all(lookup[i] == w for p in parts for i, w in zip(p[0].flatten().tolist(), p[1].flatten().tolist()))


def _train_epoch(svc: DataService, epoch: int, start: int = 0, stop=None) -> None:
    plan = svc.plan_epoch(epoch, 4)
    g = torch.Generator().manual_seed(epoch)
    for m in range(plan.num_micro_batches):
        loss = torch.rand(plan.batches.shape[1], generator=g) * 2
        if start <= m < (stop if stop is not None else plan.num_micro_batches):
            svc.record(plan.batches[m], loss, (-loss).exp(), loss < 0.5, epoch)
            svc.sync()


def test_resume_mid_epoch_gives_the_same_decisions():
    def service():
        return DataService(300, InfoBatch(0.5, 0.875), seed=1, micro_batch=8, grad_accum=1)

    full = service()
    _train_epoch(full, 0)
    _train_epoch(full, 1)
    plan1 = full.plan_epoch(1, 4)
    _train_epoch(full, 2)
    plans = [full.plan_epoch(e, 4).active_hash for e in (2, 3)]

    cut = service()
    _train_epoch(cut, 0)
    _train_epoch(cut, 1, stop=10)  # stop after 10 micro-batches of epoch 1
    state = cut.state_dict()
    resumed = service()
    resumed.load_state_dict(state)
    again = resumed.plan_epoch(1, 4)  # the table moved during epoch 1, the plan must not
    assert again.active_hash == plan1.active_hash and torch.equal(again.batches, plan1.batches)
    assert torch.equal(again.weights, plan1.weights) and again.refreshed == 0
    _train_epoch(resumed, 1, start=10)
    _train_epoch(resumed, 2)
    assert [resumed.plan_epoch(e, 4).active_hash for e in (2, 3)] == plans
    assert torch.equal(resumed.table.loss, full.table.loss) and resumed.table.level_now == full.table.level_now


def test_batched_gathers_give_the_same_table_as_per_step_gathers():
    tables = []
    for every in (1, 5, 1000):
        svc = DataService(300, InfoBatch(0.5, 0.875), seed=1, micro_batch=8, grad_accum=1, sync_every=every)
        for epoch in range(3):
            _train_epoch(svc, epoch)
        svc.flush()
        tables.append(svc.table.state_dict())
    for t in tables[1:]:
        assert t["level_now"] == tables[0]["level_now"]
        assert all(torch.equal(t[k], tables[0][k]) for k in ("loss", "prob", "correct", "epoch", "level"))
    assert (tables[0]["level"] != tables[0]["level"][0]).any()  # rows carry their step's level


def test_refresh_scores_only_stale_samples_and_counts_them():
    svc = DataService(100, DifficultyDropout(0.5), seed=0, micro_batch=10, grad_accum=1)
    trained = torch.arange(0, 100, 4)
    svc.record(trained, torch.full((25,), 2.0), torch.full((25,), 0.1), torch.zeros(25), 0)
    svc.record(trained[:10], torch.full((10,), 0.1), torch.full((10,), 0.9), torch.ones(10), 1)
    svc.sync()
    calls = []

    def scorer(idx):
        calls.append(idx.clone())
        return Scores(loss=torch.full((idx.numel(),), 0.05), prob=torch.full((idx.numel(),), 0.95),
                      correct=torch.ones(idx.numel(), dtype=torch.bool))

    plan = svc.plan_epoch(2, 5, scorer=scorer, refresh_batch=32)
    stale = sorted(set(range(100)) - set(trained[:10].tolist()))  # everything not scored in epoch 1
    assert sorted(torch.cat(calls).tolist()) == stale and plan.refreshed == len(stale) == 90
    assert all(c.numel() <= 32 for c in calls)
    assert (svc.table.epoch[stale] == 1).all() and plan.num_active == 0  # all now easy: p = 0.95 >= tau
    assert svc.plan_epoch(2, 5, scorer=scorer).refreshed == 0 and len(calls) == 3  # planned once
    no_refresh = DataService(100, RandomDropout(0.5), seed=0, micro_batch=10, grad_accum=1)
    assert no_refresh.plan_epoch(2, 5, scorer=scorer).refreshed == 0 and len(calls) == 3


def test_a_sample_dropped_every_epoch_is_refreshed_before_every_epoch():
    svc = DataService(8, DifficultyDropout(0.5), seed=0, micro_batch=2, grad_accum=1)

    def scorer(idx):  # samples 0-3 always easy (dropped), 4-7 always hard (trained on)
        easy = idx < 4
        return Scores(loss=torch.where(easy, 0.05, 2.0), prob=torch.where(easy, 0.95, 0.1),
                      correct=easy)

    refreshed = []
    for epoch in range(5):
        plan = svc.plan_epoch(epoch, 5, scorer=scorer)
        refreshed.append(plan.refreshed)
        trained = plan.batches.flatten()
        trained = trained[trained >= 0]
        s = scorer(trained)
        svc.record(trained, s.loss, s.prob, s.correct, epoch)
        svc.sync()
    # Epoch 0 trains on everything; from epoch 2 on the 4 easy samples are dropped every epoch
    # and so must be re-scored before each one.
    assert refreshed == [0, 0, 4, 4, 4]


def test_table_beyond_replica_limit_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(data_service, "MAX_REPLICATED_SAMPLES", 1000)
    with pytest.raises(ValueError, match=r"1,001 training samples exceed .* data\.limit"):
        DataService(1001, RandomDropout(0.5), seed=0, micro_batch=4, grad_accum=1)


def test_two_gloo_ranks_take_identical_decisions(tmp_path):
    ok(torchrun(2, str(WORKER), str(tmp_path), timeout=180))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for name, a in r0["policies"].items():
        b = r1["policies"][name]
        assert a["table"] == b["table"], name  # same scores everywhere, though each rank scored its own shard
        assert [p["hash"] for p in a["plans"]] == [p["hash"] for p in b["plans"]], name
        assert [p["shape"] for p in a["plans"]] == [p["shape"] for p in b["plans"]], name  # equal shards
        assert [p["num_active"] for p in a["plans"]][3] == 1000, name  # revision epoch: all data
    assert [p["num_active"] for p in r0["policies"]["keep_zero"]["plans"]] == [1000, 0, 0, 1000]
    assert r0["policies"]["keep_zero"]["plans"][1]["shape"] == [0, 4]
    assert [p["num_active"] for p in r0["policies"]["keep_one"]["plans"]][:2] == [1000, 1]
    assert r0["policies"]["keep_one"]["plans"][1]["shape"] == [2, 4]  # one whole optimizer step per rank
    assert 0 < r0["policies"]["pdd_difficulty"]["plans"][1]["num_active"] < 1000
    # Refresh: the stale samples split equally, each scored exactly once over the two ranks.
    assert r0["refresh"]["forwards"] == r1["refresh"]["forwards"] == 333
    scored = r0["refresh"]["scored"] + r1["refresh"]["scored"]
    assert sorted(scored) == [i for i in range(1000) if i % 3]
    assert r0["refresh"]["table"] == r1["refresh"]["table"] and r0["refresh"]["hash"] == r1["refresh"]["hash"]
    # int64 indices above 2^24 (not representable in float32) arrive exactly on both ranks.
    for r in (r0, r1):
        assert r["big"] == {"scored": [2**24 + 1, 2**24 + 3], "loss": [1.5, 2.5], "epoch": [7, 7]}


def _plan(s):
    return [(e["epoch"], e["num_active"], e["micro_batches_per_rank"]) for e in s["epochs"]]


def test_two_ranks_finish_when_a_policy_keeps_zero_or_one_sample(tmp_path, fmnist):
    n, micro = 384, 32
    for gamma, kept in (("0.0", 0), ("0.001", 1)):
        out = tmp_path / f"g{gamma}"
        ok(torchrun(2, "-m", "metabolic", "train", str(CONFIG), f"output_dir={out}", *SMALL, "train.epochs=3",
                    "data.policy=pdd_random", f"data.gamma={gamma}", "data.revision_epochs=1", timeout=240))
        s = summary(out)
        steps = n // (2 * micro)
        # Epoch 1 keeps `kept` samples: zero steps, or one step whose micro-batches repeat the one sample.
        assert _plan(s) == [(0, n, steps), (1, kept, kept), (2, n, steps)]
        assert s["step"] == 2 * steps + kept
        assert s["data/samples_backward"] == 2 * n + kept * 2 * micro
        evals = [r for r in records(out) if "eval/accuracy" in r]
        assert [r["epoch"] for r in evals] == [1, 2, 3]  # the empty epoch still ends with an evaluation
        assert [r["data/kept_fraction"] for r in evals] == [1.0, kept / n, 1.0]
        assert s["data/effective_epochs"] == pytest.approx(s["data/samples_backward"] / n)


def test_resume_mid_epoch_with_refresh_equals_uninterrupted(tmp_path, fmnist):
    """InfoBatch with refreshed scores, cut by SIGUSR1 in the middle of the first pruned epoch."""
    args = [*SMALL, "train.epochs=3", "train.checkpoint_every=3", "data.policy=infobatch", "data.refresh=true",
            "data.prune_ratio=0.7", "data.anneal=1.0"]
    full = tmp_path / "full"
    ok(metabolic("train", str(CONFIG), f"output_dir={full}", *args))
    s_full = summary(full)
    n = s_full["dataset_size"]
    plan = _plan(s_full)
    assert plan[0][1] == n and all(a < n for _, a, _ in plan[1:])
    # Refresh forwards: before epoch e, the samples epoch e-1 did not train on.
    refreshed = sum(n - a for _, a, _ in plan[:-1])
    assert s_full["data/samples_forward"] - s_full["data/samples_backward"] == refreshed > 0
    per_sample = s_full["compute/forward_flops_per_sample"]
    assert s_full["compute/flops"] == pytest.approx(per_sample * (3 * s_full["data/samples_backward"] + refreshed))

    cut = tmp_path / "cut"
    stop_at_step([str(CONFIG), *args], cut, plan[0][2] + 3)  # a few steps into epoch 1
    stopped = records(cut)[-1]["step"]
    assert plan[0][2] < stopped < sum(p[2] for p in plan)
    ok(metabolic("train", str(CONFIG), f"output_dir={cut}", *args, "resume=true"))
    assert comparable(summary(cut)) == comparable(s_full)


def test_a_repeated_index_keeps_its_last_row():
    # wrap padding can put one sample twice into a step's rows: the later row wins, on every rank
    from metabolic.engine.score_table import ScoreTable

    table = ScoreTable(6)
    index = torch.tensor([2, 4, 2, 2, 5])
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    table.update(index, loss=loss, prob=torch.exp(-loss), correct=loss < 3.5, epoch=torch.zeros(5, dtype=torch.int32))
    assert table.loss[[2, 4, 5]].tolist() == [4.0, 2.0, 5.0] and not bool(table.correct[2])
    assert table.scored().tolist() == [False, False, True, False, True, True]
