"""What is being learned: batches from global indices, per-sample scores, evaluation sums.

The trainer loop is task-agnostic. A task turns global indices into model inputs, model outputs
into per-sample (loss, probability-of-target, correct) for the loss weights and the data
service, and test batches into summable evaluation figures.
"""

from __future__ import annotations

import math
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
    """Cross-entropy classification over ImageArrays; eval reports loss and accuracy."""

    eval_fields = ("loss_sum", "correct", "count")

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

    def example(self) -> torch.Tensor:
        return self.train.batch(torch.arange(1))[0]

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator):
        x, y = self.train.batch(indices, augment=self.augment, generator=generator, device=self.device)
        return x.to(self.dtype), y.to(self.device)

    def test_batch(self, indices: torch.Tensor):
        x, y = self.test.batch(indices, device=self.device)
        return x.to(self.dtype), y.to(self.device)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> Scores:
        """Per-sample cross-entropy, true-class probability and correctness."""
        logp = F.log_softmax(logits.float(), dim=-1)
        loss = -logp.gather(1, targets[:, None]).squeeze(1)
        return Scores(loss=loss, prob=loss.detach().neg().exp(), correct=logits.argmax(-1) == targets)

    def eval_sums(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> list[float]:
        s = self.score(logits, targets)
        v = valid.to(s.loss.device)
        return [float((s.loss * v).sum()), float((s.correct & v).sum()), float(v.sum())]

    def eval_metrics(self, sums: list[float]) -> dict:
        loss, correct, count = sums
        return {"eval/loss": loss / count, "eval/accuracy": correct / count}

    def tokens(self, indices: torch.Tensor) -> int:
        return 0


class LanguageModeling:
    """Next-token prediction over packed sequences; a sample is one sequence.

    Score of a sequence: its mean token loss; its "probability" exp(-loss) (the geometric mean
    next-token probability), and "correct" when that probability exceeds 1/2 (read off the loss:
    an argmax over the vocabulary for every token would cost the trainer ~5% of its step).
    """

    eval_fields = ("loss_sum", "tokens")

    def __init__(self, train, val, vocab_size: int, device: torch.device) -> None:
        """train, val: [N, L] token rows, an int64 tensor or TokenRows on the token cache."""
        self.train, self.val, self.vocab_size, self.device = train, val, vocab_size, device

    @property
    def num_train(self) -> int:
        return self.train.shape[0]

    @property
    def num_test(self) -> int:
        return self.val.shape[0]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def train_batch(self, indices: torch.Tensor, generator: torch.Generator):
        ids = self.train[indices].to(self.device)
        return ids, ids

    def test_batch(self, indices: torch.Tensor):
        ids = self.val[indices].to(self.device)
        return ids, ids

    def _token_losses(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pred, target = logits[:, :-1].float(), ids[:, 1:]
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
        return loss.view(target.shape)

    def score(self, logits: torch.Tensor, ids: torch.Tensor) -> Scores:
        loss = self._token_losses(logits, ids).mean(1)
        return Scores(loss=loss, prob=loss.detach().neg().exp(), correct=loss.detach() < math.log(2.0))

    def eval_sums(self, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> list[float]:
        tok_loss = self._token_losses(logits, ids)
        v = valid.to(tok_loss.device)
        return [float((tok_loss.sum(1) * v).sum()), float(v.sum() * tok_loss.shape[1])]

    def eval_metrics(self, sums: list[float]) -> dict:
        loss = sums[0] / sums[1]
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def tokens(self, indices: torch.Tensor) -> int:
        return indices.numel() * self.seq_len
