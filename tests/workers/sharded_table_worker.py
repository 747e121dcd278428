"""Multi-rank worker: the owner-sharded score table over real gloo, against the replicated one.

Usage: torchrun --nproc_per_node W sharded_table_worker.py OUT_DIR
Every policy plans four epochs three ways side by side: the replicated table on W ranks, the
sharded table on W ranks, and the sharded table on one rank (this process alone). A sample's
score is a fixed function of (index, epoch), so two layouts that train on the same samples hold
the same scores. Each rank writes OUT_DIR/rank{R}.json: per policy and epoch, the distinct
samples its batches hold with their weights, their shapes and counts, and its owned table rows
next to the replicated table's; then a refresh, a preemption and resume, and indices above 2^24.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from metabolic.engine.config import ConfigError
from metabolic.engine.data_service import DataService
from metabolic.engine.policies import (DifficultyDropout, FullData, InfoBatch, MatchedRandomDropout,
                                       PriceThreshold, RandomDropout)
from metabolic.engine.task import Scores

N, MICRO, ACCUM, EPOCHS = 1000, 4, 2, 4


def policies():
    return {"full": FullData(1), "pdd_difficulty": DifficultyDropout(0.5, 1), "lazy": DifficultyDropout(0.0, 1),
            "price": PriceThreshold(0.3, "gap", 1), "pdd_random": RandomDropout(0.5, 1),
            "pdd_matched": MatchedRandomDropout(0.5, 1), "infobatch": InfoBatch(0.5, 0.875, 1),
            "keep_zero": RandomDropout(0.0, 1), "keep_one": RandomDropout(1e-6, 1)}


def scores(idx: torch.Tensor, epoch: int) -> Scores:
    loss = ((idx * 2654435761 + epoch * 97) % 1000).float() / 1000 * 3
    return Scores(loss=loss, prob=(-loss).exp(), correct=loss < 0.7)


def train_epoch(svc: DataService, epoch: int, start: int = 0, stop: int | None = None) -> dict:
    """Plan the epoch and train on its micro-batches start..stop (a resume, a preemption)."""
    plan = svc.plan_epoch(epoch, EPOCHS)
    for m in range(start, plan.num_micro_batches if stop is None else stop):
        s = scores(plan.batches[m], epoch)
        svc.record(plan.batches[m], s.loss, s.prob, s.correct, epoch)
        if (m + 1) % ACCUM == 0:
            svc.sync()
    flat = plan.batches.flatten()
    pairs = sorted(set(zip(flat.tolist(), plan.weights.flatten().tolist())))
    return {"samples": sorted(set(flat.tolist())), "entries": flat.numel(), "shape": list(plan.batches.shape),
            "num_active": plan.num_active, "hash": plan.active_hash, "pairs": pairs,
            "batches": plan.batches.tolist()}


def rows(table, index: torch.Tensor) -> list:
    return [table.loss[index].tolist(), table.prob[index].tolist(), table.correct[index].tolist(),
            table.epoch[index].tolist()]


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")
    result = {"rank": rank, "world": world, "policies": {}}

    def service(policy, layout: str, ranks: int = world, relative: bool = False, n: int = N) -> DataService:
        return DataService(n, policy, seed=3, micro_batch=MICRO, grad_accum=ACCUM, rank=rank if ranks > 1 else 0,
                           world_size=ranks, group=group, relative_scores=relative, score_table=layout)

    for name in policies():
        replicated, sharded = service(policies()[name], "replicated"), service(policies()[name], "sharded")
        alone = service(policies()[name], "sharded", ranks=1)
        epochs = []
        for epoch in range(EPOCHS):
            epochs.append({"replicated": train_epoch(replicated, epoch), "sharded": train_epoch(sharded, epoch),
                           "alone": train_epoch(alone, epoch)})
        for svc in (replicated, sharded, alone):
            svc.flush()
        owned = sharded.table.indices()
        result["policies"][name] = {"epochs": epochs, "rows": rows(sharded.table, slice(None)),
                                    "replicated_rows": rows(replicated.table, owned)}

    # With relative scores, the running loss level comes from every rank's rows: the same everywhere.
    svc = service(InfoBatch(0.5, 0.875, 1), "sharded", relative=True)
    for epoch in range(EPOCHS):
        train_epoch(svc, epoch)
    svc.flush()
    result["relative"] = {"level_now": svc.table.level_now}

    # Refresh: each rank scores the stale rows it owns, padded to the most any rank owns.
    svc = service(DifficultyDropout(0.5), "sharded")
    seen = []

    def scorer(idx):
        seen.append(idx.clone())
        return scores(idx, 1)

    trained = torch.arange(0, 600, dtype=torch.int64)  # every rank records all of them: each keeps its own
    s = scores(trained, 1)
    svc.record(trained, s.loss, s.prob, s.correct, 1)
    svc.sync()
    plan = svc.plan_epoch(2, EPOCHS, scorer=scorer, refresh_batch=32)
    result["refresh"] = {"forwards": plan.refreshed, "scored": torch.cat(seen).tolist(),
                         "stale_after": svc.stale(2).numel(), "hash": plan.active_hash}

    # Preempted in the middle of epoch 1 and resumed: the rest of the run takes the same decisions.
    def infobatch():
        return service(InfoBatch(0.5, 0.875, 1), "sharded", relative=True)

    full, cut = infobatch(), infobatch()
    plans = [train_epoch(full, epoch) for epoch in range(EPOCHS)]
    train_epoch(cut, 0)
    train_epoch(cut, 1, stop=6)  # the table moves during the epoch; the saved plan must not
    shared, own = cut.state_dict(), cut.rank_state_dict()
    resumed = infobatch()
    resumed.load_state_dict(shared, own)
    rest = [train_epoch(resumed, epoch, start=6 if epoch == 1 else 0) for epoch in range(1, EPOCHS)]
    result["resumed_same_plans"] = [a["batches"] == b["batches"] and a["pairs"] == b["pairs"]
                                    for a, b in zip(plans[1:], rest)]
    resumed.flush()
    full.flush()
    result["resumed_same_table"] = bool(torch.equal(resumed.table.loss, full.table.loss)
                                        and resumed.table.level_now == full.table.level_now)
    try:
        service(FullData(), "replicated").load_state_dict(shared, own)
        result["layout_error"] = None
    except ConfigError as err:
        result["layout_error"] = str(err)

    # int64 indices above 2^24 reach their owners exactly.
    big = 2**24 + 6
    svc = service(FullData(), "sharded", n=big)
    mine = torch.tensor([2**24 + 1 + rank], dtype=torch.int64)
    svc.record(mine, torch.tensor([1.5 + rank]), torch.tensor([0.25]), torch.tensor([True]), 7)
    svc.sync()
    svc.flush()
    scored = svc.table.scored().nonzero().squeeze(1)
    result["big"] = {"scored": svc.table.global_index(scored).tolist(), "loss": svc.table.loss[scored].tolist()}

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
