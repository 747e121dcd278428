"""Sample-selection policies behind one protocol, and the score table they read.

A policy looks at the score table and returns the epoch's active global indices and their
per-sample loss weights. Every rank holds the same table and calls the policy with the same
generator, so every rank derives the same decision.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ScoreTable:
    """Per-sample scores keyed by stable global index (13 bytes per sample, replicated per rank)."""

    def __init__(self, num_samples: int) -> None:
        self.loss = torch.zeros(num_samples, dtype=torch.float32)
        """Last training loss of the sample."""
        self.prob = torch.zeros(num_samples, dtype=torch.float32)
        """Last true-class probability p(y|x) (exp(-loss) for language models)."""
        self.correct = torch.zeros(num_samples, dtype=torch.bool)
        """Whether the last prediction was correct."""
        self.epoch = torch.full((num_samples,), -1, dtype=torch.int32)
        """Epoch the sample was last scored (-1: never)."""

    def __len__(self) -> int:
        return self.loss.numel()

    def update(self, index: torch.Tensor, loss: torch.Tensor, prob: torch.Tensor, correct: torch.Tensor,
               epoch: torch.Tensor) -> None:
        self.loss[index] = loss
        self.prob[index] = prob
        self.correct[index] = correct
        self.epoch[index] = epoch

    def state_dict(self) -> dict:
        return {"loss": self.loss.clone(), "prob": self.prob.clone(), "correct": self.correct.clone(),
                "epoch": self.epoch.clone()}

    def load_state_dict(self, state: dict) -> None:
        for k in ("loss", "prob", "correct", "epoch"):
            if state[k].shape != getattr(self, k).shape:
                raise ValueError(f"checkpoint score table has {state[k].numel()} samples, run has {len(self)} "
                                 "(resume with the same data.limit)")
            getattr(self, k).copy_(state[k])


class DataPolicy(Protocol):
    """Chooses the epoch's active samples and their loss weights."""

    def select(self, table: ScoreTable, epoch: int, num_epochs: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (active int64 indices, float32 loss weights of the same length)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FullData:
    """Every sample, weight 1: the standard recipe."""

    def select(self, table: ScoreTable, epoch: int, num_epochs: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(table)
        return torch.arange(n, dtype=torch.int64), torch.ones(n)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_policy(cfg) -> DataPolicy:
    """The policy named by config key data.policy."""
    if cfg.policy == "full":
        return FullData()
    raise ValueError(f"config key 'data.policy': unknown policy {cfg.policy!r}")
