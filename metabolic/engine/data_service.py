"""The data service: which samples each rank trains on, epoch by epoch, identical on every rank.

Each epoch a policy (see policies.py) returns the active global indices and their loss
weights from the score table; the service shuffles them with a generator seeded by
(seed, epoch) and cuts them into EQUAL per-rank shards of whole micro-batches, so every rank
takes the same number of steps and no rank waits on another's backward. Per-sample scores
recorded on each rank travel to every rank over a gloo group with int64 indices, gathered every
`sync_every` optimizer steps and whenever an epoch is planned or a checkpoint taken.

Before planning an epoch, a policy that asks for it gets the scores of samples that were not
trained on in the previous epoch refreshed by no-grad forwards, split equally over the ranks
(`refresh`); the caller counts those forwards. The epoch's plan (active set and weights) is
kept and saved in checkpoints, so a run resumed mid-epoch trains on exactly the same plan.

Memory per rank: the replicated score table takes 17 bytes per sample (BYTES_PER_SAMPLE); a
plan holds 12 bytes per active sample (int64 index + float32 weight) plus this rank's shard;
planning briefly needs about 20 more bytes per active sample. The owner-sharded table
(sharded_table.py; data.score_table) divides all of that by the world size: each rank plans the
samples it owns, and `owner_split` / `owner_take` even out the ranks' shares with one all-gather.
No rank holds more than MAX_REPLICATED_SAMPLES rows (see docs/data_service.md for the
measurements behind the limit).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from metabolic.engine.config import ConfigError
from metabolic.engine.policies import DataPolicy
from metabolic.engine.score_table import BYTES_PER_SAMPLE, ScoreTable
from metabolic.engine.sharded_table import ShardedScoreTable

MAX_REPLICATED_SAMPLES = 200_000_000
"""Most score-table rows on one rank (3.2 GiB, ~10-20 s to plan an epoch on one core); past it
data.score_table=auto shards the table over the ranks."""


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
    """sha1 of the sorted active index list (sharded table: of every rank's count and sha1 of its
    part, in rank order): equal on every rank, compared by tests; equal between layouts only with
    the replicated table."""
    refreshed: int = 0
    """No-grad scoring forwards THIS rank ran to refresh stale scores before this plan (0 when the
    plan was restored from a checkpoint or already made)."""

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
    # Positions of the padded shuffled list that belong to this rank; only those are gathered
    # (1/world of the random-access work, which dominates planning for large tables).
    starts = torch.arange(steps * accum, dtype=torch.int64) * (world * micro) + rank * micro
    pos = (starts[:, None] + torch.arange(micro, dtype=torch.int64)[None, :]).reshape(-1)
    src = order[pos % n if steps * group > n else pos]
    # `active` sorted with n == its table size would be arange: then src already is the index.
    idx = src if _is_arange(active) else active[src]
    w = torch.full((src.numel(),), float(weights[0])) if _is_constant(weights) else weights[src]
    return idx.view(-1, micro).contiguous(), w.view(-1, micro).contiguous()


def _is_arange(active: torch.Tensor) -> bool:
    n = active.numel()
    return bool(active[0] == 0) and bool(active[-1] == n - 1) and bool((active[1:] - active[:-1] == 1).all())


def _is_constant(weights: torch.Tensor) -> bool:
    return bool((weights == weights[0]).all())


def active_digest(active: torch.Tensor) -> str:
    """sha1 of the (sorted) int64 active index list."""
    return hashlib.sha1(memoryview(active.contiguous().numpy())).hexdigest()


Scorer = Callable[[torch.Tensor], "object"]
"""No-grad scoring of a batch of global indices -> an object with .loss, .prob, .correct tensors."""


def _quota(counts: list[int], micro: int, accum: int) -> tuple[int, int]:
    """(samples every rank trains on: whole optimizer steps for all ranks' kept samples, padding
    that makes world * quota)."""
    world, total = len(counts), sum(counts)
    quota = -(-total // (micro * accum * world)) * micro * accum
    return quota, world * quota - total


def owner_split(active: torch.Tensor, weights: torch.Tensor, counts: list[int], micro: int, accum: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With the sharded table, the first half of equal shards: this rank's kept samples, shuffled,
    split into what it trains on itself and what it offers to ranks that own fewer.

    Every rank trains on `quota` samples (whole optimizer steps for the whole active set). A rank
    that owns more offers its surplus; when the ranks together own fewer than world * quota, each
    also offers its first min(count, padding) shuffled samples to pad with (wrapping, as `shard`
    repeats samples rather than drop any). Returns (kept, kept weights, offer [k, 2] int64 rows of
    index and weight bits).
    """
    quota, pad = _quota(counts, micro, accum)
    order = torch.randperm(active.numel(), generator=generator)
    idx, w = active[order], weights[order]
    offer = torch.cat([idx[quota:], idx[:min(idx.numel(), pad)]])
    offer_w = torch.cat([w[quota:], w[:min(w.numel(), pad)]])
    rows = torch.stack([offer, offer_w.float().view(torch.int32).to(torch.int64)], dim=1)
    return idx[:quota], w[:quota], rows


def owner_take(kept: torch.Tensor, kept_w: torch.Tensor, offers: list[torch.Tensor], counts: list[int], rank: int,
               micro: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half: fill this rank's shortfall from every rank's offer, in rank order, and cut
    its quota into [micro-batches, micro] (the offers and counts are the same on every rank)."""
    if sum(counts) == 0:
        empty = torch.empty(0, micro, dtype=torch.int64)
        return empty, empty.float()
    quota, pad = _quota(counts, micro, accum)
    surplus = [o[:max(c - quota, 0)] for o, c in zip(offers, counts)]
    heads = torch.cat([o[max(c - quota, 0):] for o, c in zip(offers, counts)])
    pool = torch.cat(surplus + [heads.repeat(-(-pad // max(heads.shape[0], 1)), 1)[:pad]])
    short = [quota - min(c, quota) for c in counts]
    start = sum(short[:rank])
    got = pool[start:start + short[rank]]
    # Appended, not shuffled in: `kept` is already in random order and what arrives is other ranks'
    # random surplus and padding (the replicated `shard` too puts its padding last).
    idx = torch.cat([kept, got[:, 0]])
    w = torch.cat([kept_w.float(), got[:, 1].to(torch.int32).view(torch.float32)])
    return idx.view(-1, micro), w.view(-1, micro)


class DataService:
    """Plans epochs with a policy and keeps the score table in sync across ranks."""

    def __init__(self, num_samples: int, policy: DataPolicy, seed: int, micro_batch: int, grad_accum: int,
                 rank: int = 0, world_size: int = 1, group=None, relative_scores: bool = True,
                 sync_every: int = 16, score_table: str = "auto") -> None:
        self.sharded = score_table == "sharded" or (score_table == "auto" and world_size > 1
                                                    and num_samples > MAX_REPLICATED_SAMPLES)
        """Owner-sharded table (each rank holds 1/world of the rows) instead of a replica on every rank."""
        rows = -(-num_samples // world_size) if self.sharded else num_samples
        if rows > MAX_REPLICATED_SAMPLES:
            if self.sharded:
                layout, fix = f"{world_size} ranks of the sharded table hold up to {rows:,} rows each", "more ranks, "
            else:
                layout, fix = "the replicated table holds every row on every rank", (
                    "config key 'data.score_table': sharded (or auto) to split the rows over the ranks, "
                    if world_size > 1 else "more ranks with the sharded table, ")
            raise ValueError(
                f"data service: {num_samples:,} training samples exceed the score table's limit of "
                f"{MAX_REPLICATED_SAMPLES:,} rows per rank ({layout}; {BYTES_PER_SAMPLE} bytes per row, "
                f"{rows * BYTES_PER_SAMPLE / 2**30:.1f} GiB here): use {fix}data.limit, "
                "or data.policy=full with a streaming source")
        self.table = (ShardedScoreTable(num_samples, rank, world_size, group, relative=relative_scores)
                      if self.sharded else ScoreTable(num_samples, relative=relative_scores))
        self.policy = policy
        self.seed, self.micro, self.accum = seed, micro_batch, grad_accum
        self.rank, self.world_size, self.group = rank, world_size, group
        self.sync_every = max(1, sync_every)
        """Optimizer steps of score rows gathered per all-gather (scores are read only when planning)."""
        self._pending: list[torch.Tensor] = []  # rows of the current step
        self._steps: list[torch.Tensor] = []  # closed steps not yet gathered
        self._current: Optional[dict] = None  # the planned epoch: epoch, active, weights, hash (this rank's
        # own part of them with the sharded table, with every rank's count)

    # -- planning ---------------------------------------------------------------------------------
    def stale(self, epoch: int) -> torch.Tensor:
        """Global indices held here whose score predates the previous epoch (never scored included), sorted."""
        if epoch <= 0:
            return torch.empty(0, dtype=torch.int64)
        return self.table.global_index((self.table.epoch < epoch - 1).nonzero().squeeze(1))

    def plan_epoch(self, epoch: int, num_epochs: int, scorer: Optional[Scorer] = None,
                   refresh_batch: int = 256) -> EpochPlan:
        """The epoch's active set from the policy, sharded for this rank.

        The first call for an epoch refreshes stale scores (when the policy asks and a scorer is
        given) and asks the policy; later calls, and calls after a resume, return the same plan.
        """
        refreshed = 0
        self.flush()  # collective: every rank plans at the same point
        if self._current is None or self._current["epoch"] != epoch:
            if getattr(self.policy, "refresh", False) and scorer is not None:
                refreshed = self.refresh(epoch, scorer, refresh_batch)
            active, weights = self.policy.select(self.table, epoch, num_epochs,
                                                 epoch_generator(self.seed, epoch, salt=1))
            active = active.to(torch.int64)
            if active.numel() > 1 and not bool((active[1:] > active[:-1]).all()):
                order = torch.argsort(active)
                active, weights = active[order], weights[order]
            digest, counts = active_digest(active), [active.numel()]
            if self.sharded:  # every rank's count and digest; the plan's digest is of them all, in rank order
                parts = torch.cat(self._gather_rows(torch.tensor([[active.numel(), *bytes.fromhex(digest)]])))
                counts = parts[:, 0].tolist()
                digest = hashlib.sha1(parts.numpy().tobytes()).hexdigest()
            self._current = {"epoch": epoch, "active": active, "weights": weights.float().contiguous(),
                             "hash": digest, "counts": counts}
        cur = self._current
        batches, w = (self._owner_shard(cur) if self.sharded else
                      shard(cur["active"], cur["weights"], self.micro, self.accum, self.world_size, self.rank,
                            epoch_generator(self.seed, epoch)))
        n = sum(cur["counts"])
        return EpochPlan(epoch, batches, w, n, n / max(len(self.table), 1), cur["hash"], refreshed)

    def _owner_shard(self, cur: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Equal shards of the sharded table's plan: each rank trains on the samples it owns, and
        ranks owning more than their share hand the surplus to those owning less (one all-gather)."""
        counts, epoch = cur["counts"], cur["epoch"]
        kept, kept_w, offer = owner_split(cur["active"], cur["weights"], counts, self.micro, self.accum,
                                          epoch_generator(self.seed, epoch, salt=-1 - self.rank))
        offers = self._gather_rows(offer) if sum(counts) else [offer]
        return owner_take(kept, kept_w, offers, counts, self.rank, self.micro, self.accum)

    def _gather_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's int64 rows [k, c] (k may differ by rank), in rank order."""
        if self.world_size == 1 or not dist.is_initialized():
            return [rows]
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([rows.shape[0]]), group=self.group)
        longest = max(int(s) for s in sizes)
        if longest == 0:
            return [rows] * self.world_size
        padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype)
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return [p[:int(s)] for p, s in zip(parts, sizes)]

    def replan(self, epoch: int, num_epochs: int) -> EpochPlan:
        """Ask the policy again for an epoch already planned (its price changed); scores are not
        refreshed a second time."""
        assert self._current is not None and self._current["epoch"] == epoch, "replan needs a planned epoch"
        self._current = None
        return self.plan_epoch(epoch, num_epochs, scorer=None)

    @torch.no_grad()
    def refresh(self, epoch: int, scorer: Scorer, batch_size: int = 256) -> int:
        """Re-score stale samples with no-grad forwards split equally over the ranks.

        Every rank runs the same number of forwards (padding rows are scored but not written), so
        collectives inside the model (ZeRO-3) and the per-batch all-gather line up. Returns the
        forwards this rank ran; the caller adds them to data/samples_forward and compute/flops.
        """
        stale = self.stale(epoch)
        if self.sharded:  # each rank scores its own stale rows, padded to the most any rank has
            longest = torch.tensor([stale.numel()])
            if self.world_size > 1:
                dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
            per_rank = int(longest)
            idx = torch.cat([stale, torch.full((per_rank - stale.numel(),), -1, dtype=torch.int64)])
        else:  # the stale list is the same everywhere: split it equally
            per_rank = -(-stale.numel() // self.world_size)
            mine = torch.arange(self.rank * per_rank, (self.rank + 1) * per_rank)
            idx = torch.where(mine < stale.numel(), stale[mine.clamp(max=max(stale.numel() - 1, 0))],
                              torch.full_like(mine, -1))
        if per_rank == 0:
            return 0
        ran = 0
        for start in range(0, per_rank, batch_size):
            chunk = idx[start:start + batch_size]
            s = scorer(chunk.clamp(min=0) if bool((chunk < 0).any()) else chunk)
            # Stamped epoch - 1: the scores are of the weights that ended it. Stamped `epoch`, a
            # sample dropped again would not be stale before epoch + 1 and be refreshed only
            # every other epoch.
            self.record(chunk, s.loss, s.prob, s.correct, epoch - 1)
            self.sync(training=False)
            ran += chunk.numel()
        return ran

    # -- score updates ----------------------------------------------------------------------------
    def record(self, indices: torch.Tensor, losses: torch.Tensor, probs: torch.Tensor,
               correct: torch.Tensor, epoch: int) -> None:
        """Buffer this rank's per-sample scores; `sync` publishes them to every rank.
        Rows with a negative index are padding: sent (equal counts) but not written."""
        # Rows stay on the scores' device until the gather: no host sync per micro-batch on GPUs.
        vals = torch.stack([losses.detach().float(), probs.detach().float(), correct.detach().float(),
                            torch.full_like(losses, float(epoch), dtype=torch.float32)], dim=1)
        # Pack as int64 rows [index, (loss, prob), (correct, epoch)] so indices stay exact above 2^24.
        idx = indices.to(device=vals.device, dtype=torch.int64, non_blocking=True)
        row = torch.cat([idx[:, None], vals.contiguous().view(torch.int64)], dim=1)
        self._pending.append(row)

    def sync(self, training: bool = True) -> None:
        """Close this optimizer step's rows; every `sync_every` steps all-gather them into the table.

        Rows of each step are applied step by step, in rank order, on every rank: the table and the
        running loss level (moved by each training step's global mean loss) come out bit-identical
        everywhere and do not depend on how many steps one gather carries. Refresh rows
        (training=False) are gathered at once and do not move the level.
        """
        if self._pending:
            self._steps.append(torch.cat(self._pending))
            self._pending = []
        if not training:
            refresh = self._steps.pop() if self._steps else None
            self.flush()
            if refresh is not None:
                self._steps.append(refresh)
                self.flush(training=False)
        elif len(self._steps) >= self.sync_every:
            self.flush()

    def flush(self, training: bool = True) -> None:
        """All-gather every closed step now (equal row counts on every rank by construction)."""
        if not self._steps:
            return
        lengths = [t.shape[0] for t in self._steps]
        local = torch.cat(self._steps).cpu()
        self._steps = []
        parts = [local]
        if dist.is_initialized() and self.world_size > 1:
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local, group=self.group)
        start = 0
        for n in lengths:
            self._apply(torch.cat([p[start:start + n] for p in parts]), training)
            start += n

    def _apply(self, rows: torch.Tensor, training: bool) -> None:
        rows = rows[rows[:, 0] >= 0]
        if rows.numel() == 0:
            return
        vals = rows[:, 1:].contiguous().view(torch.float32)
        if training:
            self.table.observe_level(float(vals[:, 0].double().mean()))
        self.table.update(rows[:, 0], loss=vals[:, 0], prob=vals[:, 1], correct=vals[:, 2] > 0.5,
                          epoch=vals[:, 3].to(torch.int32))

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What every rank holds alike (DeepSpeed's client state, written by rank 0); with the
        sharded table the rows and this rank's part of the plan are in `rank_state_dict`."""
        if self._pending:
            raise RuntimeError("data service: checkpoint in the middle of a step (call sync() first)")
        self.flush()  # collective: checkpoints are taken on every rank at the same step
        if self.sharded:
            return {"policy": self.policy.state_dict(), "sharded": True}
        cur = None if self._current is None else dict(self._current)
        return {"table": self.table.state_dict(), "policy": self.policy.state_dict(), "plan": cur}

    def rank_state_dict(self) -> Optional[dict]:
        """What only this rank holds (its file in the checkpoint), after `state_dict`: None unless sharded."""
        if not self.sharded:
            return None
        return {"table": self.table.state_dict(), "plan": None if self._current is None else dict(self._current)}

    def load_state_dict(self, state: dict, rank_state: Optional[dict] = None) -> None:
        if bool(state.get("sharded", False)) != self.sharded:
            saved = "sharded" if state.get("sharded") else "replicated"
            raise ConfigError(f"config key 'data.score_table': the checkpoint's score table is {saved}, this run's "
                              f"is {'sharded' if self.sharded else 'replicated'} (resume with the same layout)")
        own = rank_state if self.sharded else state
        if own is None:
            raise ConfigError("resume: the checkpoint lacks this rank's part of the sharded score table")
        self.table.load_state_dict(own["table"])
        self.policy.load_state_dict(state["policy"])
        self._current = own.get("plan")
        if self._current is not None:
            self._current.setdefault("counts", [self._current["active"].numel()])  # checkpoints before sharding
        self._pending, self._steps = [], []
