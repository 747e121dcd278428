"""What is being learned: how a batch is built from indices and how per-sample losses are scored.

The trainer loop is task-agnostic; a task turns global indices into model inputs and model
outputs into per-sample (loss, probability-of-target, correct) triples for the data service.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metabolic.data.arrays import ImageArrays


@dataclass
class Scores:
    """Per-sample figures of one micro-batch (reduction none)."""

    loss: torch.Tensor
    prob: torch.Tensor
    correct: torch.Tensor


class ImageClassification:
    """Cross-entropy classification over ImageArrays."""

    def __init__(self, train: ImageArrays, test: ImageArrays, augment: bool, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.train, self.test, self.augment = train, test, augment
        self.device, self.dtype = device, dtype

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator):
        x, y = self.train.batch(indices, augment=self.augment, generator=generator)
        return x.to(self.device, self.dtype), y.to(self.device)

    def test_batch(self, indices: torch.Tensor):
        x, y = self.test.batch(indices)
        return x.to(self.device, self.dtype), y.to(self.device)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> Scores:
        """Per-sample cross-entropy, true-class probability and correctness."""
        logp = F.log_softmax(logits.float(), dim=-1)
        loss = -logp.gather(1, targets[:, None]).squeeze(1)
        return Scores(loss=loss, prob=loss.detach().neg().exp(), correct=logits.argmax(-1) == targets)

    def tokens(self, indices: torch.Tensor) -> int:
        return 0
