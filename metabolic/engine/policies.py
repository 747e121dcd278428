"""Sample-selection policies behind one protocol, and the score table they read.

A policy looks at the score table and returns the epoch's active global indices (int64, sorted
ascending) and their per-sample loss weights. Every rank calls the policy with the same
generator. With the replicated table every rank holds every row and derives the same whole
decision; with the owner-sharded table (sharded_table.py) each rank decides for the rows it owns,
and counts, means and random draws go through the table's collective methods, so the ranks'
parts make up one decision. Everything is tensor ops over the table (no Python loop over
samples): planning a 10 M-sample epoch takes well under a second.

Samples never scored (table epoch -1) are always kept: PDD's first epoch trains on everything,
InfoBatch prunes only scored samples, and the price rule cannot judge an unseen sample.
The last `revision_epochs` epochs of every policy use all data with weight 1.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import torch

from metabolic.engine.score_table import ScoreTable

__all__ = ["ScoreTable", "DataPolicy", "FullData", "DifficultyDropout", "RandomDropout", "MatchedRandomDropout",
           "InfoBatch", "PriceThreshold", "build_policy", "POLICIES"]


ScreenRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(prob, correct) of a batch's samples -> bool mask of the samples to train on."""


class DataPolicy(Protocol):
    """Chooses the epoch's active samples and their loss weights."""

    refresh: bool
    """Whether scores of samples not trained on last epoch must be refreshed (no-grad forward) first."""

    def select(self, table: ScoreTable, epoch: int, num_epochs: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (active int64 indices, sorted ascending; float32 loss weights of the same length)."""
        ...

    def screen_rule(self, epoch: int, num_epochs: int) -> Optional[ScreenRule]:
        """For data.screen: the rule (prob, correct) -> bool keep mask that judges a batch at the
        current weights, or None when the policy has none or keeps every planned sample this epoch."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _all(table: ScoreTable) -> tuple[torch.Tensor, torch.Tensor]:
    index = table.indices()
    return index, torch.ones(index.numel(), dtype=torch.float32)


def _mask(table: ScoreTable, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a per-row mask keeps, as global indices, weight 1."""
    active = table.global_index(keep.nonzero().squeeze(1))
    return active, torch.ones(active.numel(), dtype=torch.float32)


def _subset(table: ScoreTable, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    active = table.random_subset(k, generator)
    return active, torch.ones(active.numel(), dtype=torch.float32)


class _Policy:
    """Revision epochs and state handling shared by every policy."""

    refresh = False

    def __init__(self, revision_epochs: int = 0) -> None:
        self.revision_epochs = revision_epochs

    def revising(self, epoch: int, num_epochs: int) -> bool:
        return epoch >= num_epochs - self.revision_epochs

    def select(self, table: ScoreTable, epoch: int, num_epochs: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.revising(epoch, num_epochs):
            return _all(table)
        return self._select(table, epoch, num_epochs, generator)

    def _select(self, table, epoch, num_epochs, generator):
        raise NotImplementedError

    def screen_rule(self, epoch, num_epochs):
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FullData(_Policy):
    """Every sample, weight 1: the standard recipe."""

    def _select(self, table, epoch, num_epochs, generator):
        return _all(table)


def difficulty_keep(table: ScoreTable, tau: float) -> torch.Tensor:
    """DBPD's rule: keep if p(y|x) < tau; tau = 0 (lazy learning) keeps the misclassified. Unscored: kept."""
    hard = ~table.correct if tau == 0 else table.prob_below(tau)
    return hard | ~table.scored()


class DifficultyDropout(_Policy):
    """PDD difficulty-based (DBPD): train on samples the model still finds hard; lazy is tau = 0.

    Dropped samples are re-scored before each epoch (refresh, on by default) so they can return,
    as in the paper; every re-scoring forward is counted.
    """

    refresh = True

    def __init__(self, tau: float, revision_epochs: int = 0) -> None:
        super().__init__(revision_epochs)
        self.tau = tau

    def _select(self, table, epoch, num_epochs, generator):
        return _mask(table, difficulty_keep(table, self.tau))

    def screen_rule(self, epoch, num_epochs):
        if self.revising(epoch, num_epochs):
            return None
        tau = self.tau
        return (lambda prob, correct: ~correct) if tau == 0 else (lambda prob, correct: prob < tau)


class RandomDropout(_Policy):
    """PDD scalar random (SRD): ceil(gamma^t * N) samples at random in epoch t."""

    def __init__(self, gamma: float, revision_epochs: int = 0) -> None:
        super().__init__(revision_epochs)
        self.gamma = gamma

    def _select(self, table, epoch, num_epochs, generator):
        k = math.ceil((self.gamma ** epoch) * len(table) - 1e-9)  # 0.0 ** 0 == 1: epoch 0 is full
        return _subset(table, k, generator)


class MatchedRandomDropout(_Policy):
    """PDD schedule-matched random (SMRD): as many samples as DBPD would keep, chosen at random."""

    refresh = True

    def __init__(self, tau: float, revision_epochs: int = 0) -> None:
        super().__init__(revision_epochs)
        self.tau = tau

    def _select(self, table, epoch, num_epochs, generator):
        return _subset(table, table.count(difficulty_keep(table, self.tau)), generator)


class InfoBatch(_Policy):
    """InfoBatch: scored samples below the mean loss are pruned with probability r; the kept ones of
    them get loss weight 1/(1-r); from epoch delta * T on (annealing) all data is used."""

    def __init__(self, prune_ratio: float, anneal: float, revision_epochs: int = 0) -> None:
        super().__init__(revision_epochs)
        self.prune_ratio, self.anneal = prune_ratio, anneal

    def _select(self, table, epoch, num_epochs, generator):
        if epoch >= self.anneal * num_epochs or self.prune_ratio == 0:
            return _all(table)
        scored = table.scored()
        if table.count(scored) == 0:
            return _all(table)
        loss = table.adjusted_loss()
        well_learned = scored & (loss < table.mean(loss, scored))
        pruned = well_learned & (table.uniform(generator) < self.prune_ratio)
        rows = (~pruned).nonzero().squeeze(1)
        weights = torch.where(well_learned[rows], 1.0 / (1.0 - self.prune_ratio), 1.0).float()
        return table.global_index(rows), weights


class PriceThreshold(_Policy):
    """Energy-priced: keep a sample while its gradient-magnitude proxy exceeds `price`.

    The proxy is 1 - p(y|x) (the logit-gradient norm lies between it and sqrt(2) times it) or the
    loss (language models). `price` is a plain attribute an external controller sets between
    epochs; it is saved in checkpoints. Unscored samples are kept.
    """

    def __init__(self, price: float, proxy: str = "gap", revision_epochs: int = 0) -> None:
        super().__init__(revision_epochs)
        self.price, self.proxy = float(price), proxy

    def proxy_values(self, table: ScoreTable) -> torch.Tensor:
        return table.adjusted_loss() if self.proxy == "loss" else 1.0 - table.adjusted_prob()

    def screen_rule(self, epoch, num_epochs):
        if self.revising(epoch, num_epochs):
            return None
        # p = exp(-loss) for language models: loss > price  <=>  p < exp(-price)
        below = math.exp(-self.price) if self.proxy == "loss" else 1.0 - self.price
        return lambda prob, correct: prob < below

    def _select(self, table, epoch, num_epochs, generator):
        if self.proxy == "loss":
            above = table.loss_above(self.price)
        else:  # 1 - p > price  <=>  p < 1 - price
            above = table.prob_below(1.0 - self.price)
        return _mask(table, above | ~table.scored())

    def state_dict(self) -> dict:
        return {"price": self.price}

    def load_state_dict(self, state: dict) -> None:
        self.price = float(state.get("price", self.price))


POLICIES = ("full", "pdd_difficulty", "lazy", "pdd_random", "pdd_matched", "infobatch", "price")


def build_policy(cfg) -> DataPolicy:
    """The policy named by config key data.policy, with its data.* parameters."""
    rev = cfg.revision_epochs
    name = cfg.policy
    if name == "full":
        policy = FullData(rev)
    elif name in ("pdd_difficulty", "lazy"):
        policy = DifficultyDropout(0.0 if name == "lazy" else cfg.tau, rev)
    elif name == "pdd_random":
        policy = RandomDropout(cfg.gamma, rev)
    elif name == "pdd_matched":
        policy = MatchedRandomDropout(cfg.tau, rev)
    elif name == "infobatch":
        policy = InfoBatch(cfg.prune_ratio, cfg.anneal, rev)
    elif name == "price":
        policy = PriceThreshold(cfg.price, cfg.price_proxy, rev)
    else:
        raise ValueError(f"config key 'data.policy': unknown policy {name!r}, expected one of {POLICIES}")
    if cfg.refresh is not None:
        policy.refresh = bool(cfg.refresh)
    return policy
