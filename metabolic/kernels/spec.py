"""What one masked optimizer step is asked to do, independent of the backend.

`StepSpec` carries every scalar a backend needs (optimizer kind, hyperparameters, selection
rule and its knobs, step counter, random seed). `validate_selection` is the single place
that checks user arguments, so the optimizers and the backends raise the same ValueErrors.

The random rule uses a counter-based hash (`element_hash`) of (seed, step, salt, index),
written here for torch with int64 arithmetic that never overflows, and re-implemented
bit-for-bit in the Triton kernel with uint32 arithmetic, so every backend picks the same
elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SELECT_RULES: tuple[str, ...] = ("dense", "topk", "hard", "soft", "random", "block")
OPTIMIZER_KINDS: tuple[str, ...] = ("adamw", "sgd")

_M32 = 0xFFFFFFFF
# murmur3 fmix32 constants
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
# keep an element for the random rule when (hash >> 8) < fraction * 2**24
RANDOM_BITS = 24


def validate_selection(select: str, fraction: float, price: float, alpha: float, block_size: int) -> None:
    """Raise ValueError naming the first invalid selection argument."""
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, got {select!r}")
    if not isinstance(fraction, (int, float)) or not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0.0:
        raise ValueError(f"price must be a finite number >= 0, got {price!r}")
    if not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def validate_count_price(count_price: float, select: str) -> None:
    """Raise ValueError unless count_price is a finite number >= 0, and 0 outside the soft rule."""
    if isinstance(count_price, bool) or not isinstance(count_price, (int, float)) \
            or not math.isfinite(count_price) or count_price < 0.0:
        raise ValueError(f"count_price must be a finite number >= 0, got {count_price!r}")
    if count_price and select != "soft":
        raise ValueError(f"count_price applies to select='soft' only (hard's price is already per "
                         f"change), got select={select!r}")


def validate_residual_decay(decay: float) -> None:
    """Raise ValueError unless decay is a number in [0, 1]."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= float(decay) <= 1.0):
        raise ValueError(f"residual_decay must be in [0, 1], got {decay!r}")


@dataclass
class StepSpec:
    """Scalars of one masked step on one flat buffer.

    kind: "adamw" or "sgd". For adamw `step` is the 1-based step count used in the bias
    corrections; for sgd `first` says the momentum buffer is initialised this step (torch.optim.SGD
    sets buf = d_p on its first step instead of decaying a zero buffer).
    """

    kind: str
    lr: float
    weight_decay: float = 0.0
    # adamw
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # sgd
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first: bool = False
    # selection
    select: str = "dense"
    fraction: float = 1.0
    price: float = 0.0
    alpha: float = 1.0
    residual: bool = False
    residual_decay: float = 1.0
    count_price: float = 0.0
    block_size: int = 4096
    seed: int = 0
    salt: int = 0
    step: int = 1

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZER_KINDS:
            raise ValueError(f"kind must be one of {OPTIMIZER_KINDS}, got {self.kind!r}")
        validate_selection(self.select, self.fraction, self.price, self.alpha, self.block_size)
        validate_residual_decay(self.residual_decay)
        validate_count_price(self.count_price, self.select)

    @property
    def bias_correction1(self) -> float:
        return 1.0 - self.beta1 ** self.step

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1.0 - self.beta2 ** self.step)

    @property
    def random_threshold(self) -> int:
        """Keep an element when (hash >> 8) is below this (fraction of 2**24)."""
        return int(round(self.fraction * (1 << RANDOM_BITS)))


def fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser on a Python int (scalar seeds)."""
    h &= _M32
    h ^= h >> 16
    h = (h * _C1) & _M32
    h ^= h >> 13
    h = (h * _C2) & _M32
    h ^= h >> 16
    return h


def hash_base(seed: int, step: int, salt: int) -> int:
    """Per-(seed, step, tensor) key that element indices are mixed with."""
    return fmix32(fmix32(fmix32(seed & _M32) ^ (step & _M32)) ^ (salt & _M32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow (16-bit halves)."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def element_hash(index: torch.Tensor, base: int) -> torch.Tensor:
    """fmix32(index XOR base) for an int64 index tensor; returns int64 values in [0, 2**32)."""
    h = (index & _M32) ^ base
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    h = h ^ (h >> 16)
    return h


def random_keep(index: torch.Tensor, spec: StepSpec) -> torch.Tensor:
    """Boolean mask of the elements the random rule keeps this step."""
    h = element_hash(index, hash_base(spec.seed, spec.step, spec.salt))
    return (h >> (32 - RANDOM_BITS)) < spec.random_threshold
