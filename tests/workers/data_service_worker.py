"""2-rank worker: the data service over real gloo, without a model.

Usage: torchrun --nproc_per_node 2 data_service_worker.py OUT_DIR
Each rank records DIFFERENT scores (its own shard of the plan), the service all-gathers them,
and every policy plans the next epochs. Each rank writes OUT_DIR/rank{R}.json with its table
checksum, per-policy active hashes, shard shapes, the rows it read back for indices above
2^24, and its refresh forward counts; the test compares the ranks.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from metabolic.engine.data_service import DataService
from metabolic.engine.policies import (DifficultyDropout, FullData, InfoBatch, MatchedRandomDropout,
                                       PriceThreshold, RandomDropout)
from metabolic.engine.task import Scores

BIG = 2**24 + 6  # table size: indices 2^24 + 1 and 2^24 + 3 are not representable in float32
MICRO, ACCUM = 4, 2


def table_digest(table) -> str:
    h = hashlib.sha1()
    for t in (table.loss, table.prob, table.correct, table.epoch, table.level):
        h.update(t.numpy().tobytes())
    h.update(repr(table.level_now).encode())
    return h.hexdigest()


def policies():
    return {"full": FullData(1), "pdd_difficulty": DifficultyDropout(0.5, 1), "lazy": DifficultyDropout(0.0, 1),
            "pdd_random": RandomDropout(0.5, 1), "pdd_matched": MatchedRandomDropout(0.5, 1),
            "infobatch": InfoBatch(0.5, 0.875, 1), "price": PriceThreshold(0.3, "gap", 1),
            "keep_zero": RandomDropout(0.0, 1), "keep_one": RandomDropout(1e-6, 1)}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")
    result = {"rank": rank, "policies": {}}
    n = 1000
    for name, policy in policies().items():
        svc = DataService(n, policy, seed=3, micro_batch=MICRO, grad_accum=ACCUM, rank=rank, world_size=world,
                          group=group)
        plans = []
        for epoch in range(4):
            plan = svc.plan_epoch(epoch, 4)
            plans.append({"hash": plan.active_hash, "num_active": plan.num_active,
                          "shape": list(plan.batches.shape), "weights_sum": float(plan.weights.sum())})
            # "Train": every rank scores its own micro-batches with rank-dependent values, one sync per step.
            gen = torch.Generator().manual_seed(1000 * rank + 10 * epoch)
            for m in range(plan.num_micro_batches):
                idx = plan.batches[m]
                loss = torch.rand(idx.numel(), generator=gen) * 3
                svc.record(idx, loss, (-loss).exp(), loss < 0.7, epoch)
                if (m + 1) % ACCUM == 0:
                    svc.sync()
        svc.flush()  # scores are gathered every sync_every steps; read the table after the last gather
        result["policies"][name] = {"plans": plans, "table": table_digest(svc.table)}

    # Refresh splits the stale samples equally over the ranks; every stale sample gets scored once.
    svc = DataService(n, DifficultyDropout(0.5), seed=3, micro_batch=MICRO, grad_accum=ACCUM, rank=rank,
                      world_size=world, group=group)
    seen = []

    def scorer(idx):
        seen.append(idx.clone())
        loss = (idx.float() % 7) / 7
        return Scores(loss=loss, prob=(-loss).exp(), correct=loss < 0.5)

    keep = torch.arange(0, n, 3)
    svc.record(keep, torch.ones(keep.numel()), torch.full((keep.numel(),), 0.3), torch.zeros(keep.numel()), 1)
    svc.sync()  # both ranks recorded the same rows (trained in epoch 1): not stale at epoch 2
    plan = svc.plan_epoch(2, 4, scorer=scorer, refresh_batch=64)  # the never-scored rest is refreshed
    result["refresh"] = {"forwards": plan.refreshed, "scored": torch.cat(seen).tolist(), "hash": plan.active_hash,
                         "table": table_digest(svc.table)}

    # int64 indices above 2^24 travel exactly.
    svc = DataService(BIG, FullData(), seed=0, micro_batch=2, grad_accum=1, rank=rank, world_size=world,
                      group=group)
    mine = torch.tensor([2**24 + 1 + 2 * rank], dtype=torch.int64)  # rank 0: 2^24+1, rank 1: 2^24+3
    svc.record(mine, torch.tensor([1.5 + rank]), torch.tensor([0.25]), torch.tensor([True]), 7)
    svc.sync()
    svc.flush()
    scored = svc.table.scored().nonzero().squeeze(1)
    result["big"] = {"scored": scored.tolist(), "loss": svc.table.loss[scored].tolist(),
                     "epoch": svc.table.epoch[scored].tolist()}
    del svc

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
