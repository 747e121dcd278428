"""The per-sample score table of the data service, keyed by stable global sample index.

Every rank holds the same replica (17 bytes per sample: loss f32, prob f32, level f32, correct
bool, epoch i32); every update comes from an all-gather of the same rows in the same order, so
every rank's table, and every decision derived from it, is identical. ShardedScoreTable
(sharded_table.py) keeps only the rows a rank owns behind the same methods.

Stale scores drift: a loss recorded early in training is high because the model was worse then,
not because the sample is hard. Each row therefore also stores the running loss level (an
exponential moving average of the global training loss) at the moment it was recorded; the
`adjusted_*` views rescale every stored loss to today's level, `loss * level_now / level_then`
(and `p = exp(-adjusted loss)`), so a policy compares samples on one scale.
"""

from __future__ import annotations

import math

import torch

from metabolic.engine.config import ConfigError

BYTES_PER_SAMPLE = 4 + 4 + 4 + 1 + 4
"""Replica memory per sample: loss, prob, level (float32), correct (bool), epoch (int32)."""

LEVEL_MOMENTUM = 0.9
"""Running loss level: level <- m * level + (1 - m) * (mean loss of the step's scored samples)."""


class ScoreTable:
    """Per-sample scores keyed by stable global index (replicated on every rank)."""

    def __init__(self, num_samples: int, relative: bool = True, rows: int | None = None) -> None:
        self.num_samples = num_samples
        """Training samples in the whole dataset (every rank's rows together)."""
        rows = num_samples if rows is None else rows
        self.loss = torch.zeros(rows, dtype=torch.float32)
        """Last loss of the sample (per-sequence mean token loss for language models)."""
        self.prob = torch.zeros(rows, dtype=torch.float32)
        """Last true-class probability p(y|x) (exp(-loss) for language models)."""
        self.correct = torch.zeros(rows, dtype=torch.bool)
        """Whether the last prediction was correct."""
        self.epoch = torch.full((rows,), -1, dtype=torch.int32)
        """Epoch the sample was last scored (-1: never)."""
        self.level = torch.ones(rows, dtype=torch.float32)
        """Running loss level at the time the score was recorded (1 for unscored rows, whose loss is 0)."""
        self.level_now = 0.0
        """Current running loss level (0 until the first training step is recorded)."""
        self.relative = relative
        """Rescale stored losses to the current level (drift correction) in the adjusted views."""

    def __len__(self) -> int:
        return self.num_samples

    # -- rows and the global index; reductions over every rank's rows --------------------------
    # The replicated table holds every row at its own index; ShardedScoreTable (sharded_table.py)
    # holds only the rows its rank owns and overrides these methods with collectives. Policies
    # speak only through them, so one policy serves both layouts.
    def global_index(self, rows: torch.Tensor) -> torch.Tensor:
        """Global sample indices of the given row positions."""
        return rows

    def indices(self) -> torch.Tensor:
        """Global sample index of every row held here, ascending."""
        return torch.arange(self.loss.numel(), dtype=torch.int64)

    def owned_rows(self, index: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask of the given global indices held here, or None for all; their row positions)."""
        return None, index

    def count(self, mask: torch.Tensor) -> int:
        """Rows set in a per-row mask, over the whole dataset."""
        return int(mask.sum())

    def mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of per-row values where mask is set, over the whole dataset (nan when none is)."""
        total, n = float(torch.where(mask, values, 0.0).sum(dtype=torch.float64)), int(mask.sum())
        return total / n if n else math.nan

    def uniform(self, generator: torch.Generator) -> torch.Tensor:
        """One uniform [0, 1) draw per row, identical on every rank."""
        return torch.rand(self.loss.numel(), generator=generator)

    def random_subset(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k of the dataset's indices uniformly at random, sorted: the ones held here."""
        n = self.loss.numel()
        k = max(0, min(k, n))
        if k == n:
            return self.indices()
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=generator)[:k]] = True
        return keep.nonzero().squeeze(1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.loss, self.prob, self.correct, self.epoch, self.level))

    def scored(self) -> torch.Tensor:
        """Bool mask of samples scored at least once."""
        return self.epoch >= 0

    def observe_level(self, batch_mean_loss: float) -> None:
        """Move the running loss level with one optimizer step's global mean training loss."""
        if self.level_now <= 0.0:
            self.level_now = float(batch_mean_loss)
        else:
            self.level_now = LEVEL_MOMENTUM * self.level_now + (1.0 - LEVEL_MOMENTUM) * float(batch_mean_loss)

    def update(self, index: torch.Tensor, loss: torch.Tensor, prob: torch.Tensor, correct: torch.Tensor,
               epoch: torch.Tensor, level: float | torch.Tensor | None = None) -> None:
        """Write rows; a repeated index keeps its LAST row (deterministic on every rank)."""
        index = index.to(torch.int64)
        mine, index = self.owned_rows(index)
        if mine is not None:
            loss, prob, correct, epoch = loss[mine], prob[mine], correct[mine], epoch[mine]
            if isinstance(level, torch.Tensor):
                level = level[mine]
        if index.numel() > 1:
            uniq, inverse = torch.unique(index, return_inverse=True)
            if uniq.numel() != index.numel():
                pos = torch.arange(index.numel())
                last = torch.full((uniq.numel(),), -1, dtype=torch.int64).scatter_reduce(0, inverse, pos, "amax")
                index, loss, prob, correct, epoch = index[last], loss[last], prob[last], correct[last], epoch[last]
                if isinstance(level, torch.Tensor):
                    level = level[last]
        self.loss[index] = loss.float()
        self.prob[index] = prob.float()
        self.correct[index] = correct.bool()
        self.epoch[index] = epoch.to(torch.int32)
        self.level[index] = (self.level_now if self.level_now > 0 else 1.0) if level is None else level

    # -- views the policies read ------------------------------------------------------------------
    def adjusted_loss(self) -> torch.Tensor:
        """Stored losses rescaled to the current level (raw losses when relative is off)."""
        if not self.relative or self.level_now <= 0.0:
            return self.loss
        return torch.div(self.loss, self.level).mul_(self.level_now)

    def loss_above(self, threshold: float) -> torch.Tensor:
        """Bool mask: adjusted loss > threshold (no exp over the table)."""
        return self.adjusted_loss() > threshold

    def prob_below(self, tau: float) -> torch.Tensor:
        """Bool mask: adjusted p(y|x) < tau, i.e. adjusted loss > -log(tau) (raw prob when relative is off)."""
        if not self.relative or self.level_now <= 0.0:
            return self.prob < tau
        if tau <= 0.0:
            return torch.zeros(self.loss.numel(), dtype=torch.bool)
        return self.loss_above(-math.log(tau)) if tau < 1.0 else self.adjusted_loss() >= 0

    def adjusted_prob(self) -> torch.Tensor:
        """p(y|x) consistent with the adjusted loss (exp(-adjusted loss)); raw when relative is off."""
        if not self.relative or self.level_now <= 0.0:
            return self.prob
        return torch.exp(-self.adjusted_loss())

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"loss": self.loss.clone(), "prob": self.prob.clone(), "correct": self.correct.clone(),
                "epoch": self.epoch.clone(), "level": self.level.clone(), "level_now": self.level_now}

    def load_state_dict(self, state: dict) -> None:
        for k in ("loss", "prob", "correct", "epoch", "level"):
            if state[k].shape != getattr(self, k).shape:
                raise ConfigError(f"config key 'data.limit': checkpoint score table has {state[k].numel()} rows, "
                                  f"run has {getattr(self, k).numel()} "
                                  "(resume with the same data.limit)")
            getattr(self, k).copy_(state[k])
        self.level_now = float(state["level_now"])
