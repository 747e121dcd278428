"""The data service: which samples each rank trains on, epoch by epoch, identical on every rank.

Each epoch a policy (see policies.py) returns the active global indices and their loss
weights from the score table; the service shuffles them with a generator seeded by
(seed, epoch) and cuts them into EQUAL per-rank shards of whole micro-batches, so every rank
takes the same number of steps and no rank waits on another's backward. Per-sample scores
recorded on each rank travel to every rank over a gloo group with int64 indices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metabolic.engine.policies import DataPolicy, ScoreTable


@dataclass
class EpochPlan:
    """What this rank trains on in one epoch."""

    epoch: int
    batches: torch.Tensor
    """[micro_batches, micro_batch_size] int64 global indices for this rank."""
    weights: torch.Tensor
    """[micro_batches, micro_batch_size] float32 per-sample loss weights."""
    num_active: int
    """Distinct samples the policy kept (global)."""
    kept_fraction: float
    """num_active / dataset size."""
    active_hash: str
    """sha1 of the sorted active index list: equal on every rank, compared by tests."""

    @property
    def num_micro_batches(self) -> int:
        return self.batches.shape[0]


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator derived from (seed, epoch, salt), identical on every rank and on resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt * 104_729) % (2**63 - 1))


def shard(active: torch.Tensor, weights: torch.Tensor, micro: int, accum: int, world: int, rank: int,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle, pad by wrapping to whole optimizer steps, and take this rank's equal shard.

    Layout [steps, accum, world, micro]: each optimizer step gives every rank `accum` micro-batches.
    Wrapping repeats the first shuffled samples so no kept sample is dropped; zero kept samples
    give zero steps on every rank alike.
    """
    n = active.numel()
    if n == 0:
        empty = torch.empty(0, micro, dtype=torch.int64)
        return empty, empty.float()
    order = torch.randperm(n, generator=generator)
    group = micro * accum * world
    steps = -(-n // group)
    take = torch.arange(steps * group) % n
    idx = active[order][take].view(steps, accum, world, micro)
    w = weights[order][take].view(steps, accum, world, micro)
    mine = (slice(None), slice(None), rank)
    return idx[mine].reshape(-1, micro).contiguous(), w[mine].reshape(-1, micro).contiguous()


class DataService:
    """Plans epochs with a policy and keeps the score table in sync across ranks."""

    def __init__(self, num_samples: int, policy: DataPolicy, seed: int, micro_batch: int, grad_accum: int,
                 rank: int = 0, world_size: int = 1, group=None) -> None:
        self.table = ScoreTable(num_samples)
        self.policy = policy
        self.seed, self.micro, self.accum = seed, micro_batch, grad_accum
        self.rank, self.world_size, self.group = rank, world_size, group
        self._pending: list[torch.Tensor] = []

    def plan_epoch(self, epoch: int, num_epochs: int) -> EpochPlan:
        """The epoch's active set from the policy, sharded for this rank."""
        active, weights = self.policy.select(self.table, epoch, num_epochs,
                                             epoch_generator(self.seed, epoch, salt=1))
        active = active.to(torch.int64)
        digest = hashlib.sha1(torch.sort(active).values.numpy().tobytes()).hexdigest()
        batches, w = shard(active, weights.float(), self.micro, self.accum, self.world_size, self.rank,
                           epoch_generator(self.seed, epoch))
        return EpochPlan(epoch, batches, w, active.numel(), active.numel() / max(len(self.table), 1), digest)

    def record(self, indices: torch.Tensor, losses: torch.Tensor, probs: torch.Tensor,
               correct: torch.Tensor, epoch: int) -> None:
        """Buffer this rank's per-sample scores; `sync` publishes them to every rank."""
        vals = torch.stack([losses.detach().float().cpu(), probs.detach().float().cpu(),
                            correct.detach().float().cpu(), torch.full_like(losses, float(epoch)).float().cpu()],
                           dim=1)
        # Pack as int64 rows [index, (loss, prob), (correct, epoch)] so indices stay exact above 2^24.
        row = torch.cat([indices.cpu().to(torch.int64)[:, None], vals.contiguous().view(torch.int64)], dim=1)
        self._pending.append(row)

    def sync(self) -> None:
        """All-gather buffered scores (equal counts on every rank by construction) into the table."""
        if not self._pending:
            return
        local = torch.cat(self._pending)
        self._pending = []
        if dist.is_initialized() and self.world_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local, group=self.group)
            local = torch.cat(parts)
        vals = local[:, 1:].contiguous().view(torch.float32)
        self.table.update(local[:, 0], loss=vals[:, 0], prob=vals[:, 1], correct=vals[:, 2] > 0.5,
                          epoch=vals[:, 3].to(torch.int32))

    def state_dict(self) -> dict:
        return {"table": self.table.state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.table.load_state_dict(state["table"])
        self.policy.load_state_dict(state["policy"])
