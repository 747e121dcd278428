"""Masked-sparse optimizer step: reference, torch fallback, Triton kernel, optimizers."""

from .optimizer import MaskedAdamW, MaskedSGD
from .spec import SELECT_RULES

__all__ = ["MaskedAdamW", "MaskedSGD", "SELECT_RULES"]
