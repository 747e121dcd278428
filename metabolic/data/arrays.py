"""An in-memory image classification dataset addressed by stable global sample index.

Samples are gathered by index tensors rather than through a DataLoader: the data service
decides which indices each rank trains on, and a batch is just `images[indices]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageArrays:
    """Images as uint8 [N, C, H, W], labels as int64 [N]; row i is sample index i."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = (0.5,)
    """Per-channel mean of the pixels in [0, 1] that `batch` subtracts (one value: every channel)."""
    std: tuple[float, ...] = (0.5,)
    """Per-channel standard deviation that `batch` divides by."""

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N] with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        # (x / 255 - mean) / std as one multiply-add on raw pixels; built once, not on every batch
        std, mean = torch.tensor(self.std).view(-1, 1, 1), torch.tensor(self.mean).view(-1, 1, 1)
        self._scale, self._offset = 1.0 / (255.0 * std), -mean / std
        self._on: dict = {}  # the two per device

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def head(self, n: int | None) -> "ImageArrays":
        """The first n samples (indices stay 0..n-1, so they remain stable)."""
        if n is None or n >= len(self):
            return self
        return ImageArrays(self.images[:n], self.labels[:n], self.num_classes, self.mean, self.std)

    def batch(self, indices: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images and labels for `indices`, optionally augmented, on `device`.

        Only the raw uint8 pixels are gathered here and sent to the device (a quarter of float's
        bytes); augmentation (on the raw pixels: it only moves them, padding with black),
        conversion and normalisation run there, the last two in place."""
        x = self.images[indices]
        if device is not None and x.device != torch.device(device):
            x = x.to(device, non_blocking=True)
        if augment:
            x = random_crop_flip(x, pad=2, generator=generator)
        x = x.float()
        if x.device not in self._on:
            self._on[x.device] = (self._scale.to(x.device), self._offset.to(x.device))
        scale, offset = self._on[x.device]
        return x.mul_(scale).add_(offset), self.labels[indices]


class PixelStats:
    """Per-channel mean and std of uint8 images scaled to [0, 1], summed piece by piece (in float64,
    no float copy of the whole set)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.pixels = 0

    def add(self, images: torch.Tensor, chunk_pixels: int = 2**24) -> None:
        """Count uint8 images [N, C, H, W], about chunk_pixels at a time (~128 MiB of float64)."""
        c = images.shape[1]
        if self.total is None:
            self.total, self.squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        chunk = max(1, chunk_pixels // max(images[0].numel(), 1)) if images.shape[0] else 1
        for i in range(0, images.shape[0], chunk):
            x = images[i:i + chunk].to(torch.float64).div_(255.0)
            self.total += x.sum(dim=(0, 2, 3))
            self.squares += x.square_().sum(dim=(0, 2, 3))
        self.pixels += images.numel() // c

    def state(self) -> dict:
        """The sums so far, JSON-able (floats round-trip exactly), for a count that goes on later."""
        return {"total": None if self.total is None else self.total.tolist(),
                "squares": None if self.squares is None else self.squares.tolist(), "pixels": self.pixels}

    @classmethod
    def from_state(cls, state: dict) -> "PixelStats":
        stats = cls()
        if state["total"] is not None:
            stats.total = torch.tensor(state["total"], dtype=torch.float64)
            stats.squares = torch.tensor(state["squares"], dtype=torch.float64)
        stats.pixels = int(state["pixels"])
        return stats

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, rounded to 4 places, the precision normalisation constants are
        quoted in (Fashion-MNIST's train split gives its usual 0.2860 / 0.3530); a constant channel
        gets std 1."""
        if self.total is None:
            return (0.0,), (1.0,)
        n = max(self.pixels, 1)
        mean = self.total / n
        std = (self.squares / n - mean * mean).clamp_min(0.0).sqrt()
        std = torch.where(std < 1e-4, torch.ones_like(std), std)
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def pixel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, C, H, W] (see PixelStats)."""
    stats = PixelStats()
    stats.add(images)
    return stats.result()


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample random crop after zero padding, and random horizontal flip.

    Uses an explicit generator (on the CPU, whatever x's device) so the augmentation of a given
    step is reproducible on resume. Samples sharing a shift are cropped together with one slice:
    at most (2 pad + 1)^2 copies, instead of gathering every pixel by index.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    shift = dy * (2 * pad + 1) + dx
    order = torch.argsort(shift)  # samples grouped by shift; one index upload to x's device
    counts = torch.bincount(shift, minlength=(2 * pad + 1) ** 2).tolist()
    groups = torch.cat([order, flip.nonzero().squeeze(1)]).to(x.device)
    start = 0
    for s, count in enumerate(counts):
        if count:
            rows = groups[start:start + count]
            top, left = divmod(s, 2 * pad + 1)
            out[rows] = padded[rows, :, top:top + h, left:left + w]
            start += count
    flipped = groups[n:]
    out[flipped] = out[flipped].flip(-1)
    return out
