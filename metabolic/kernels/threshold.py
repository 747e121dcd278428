"""Thresholds for a target kept fraction without sorting the whole buffer.

top-k: sample ~16K positions (one pseudo-random position in each of S equal strata, so a
buffer with periodic structure - rows of a matrix, layers of a ZeRO partition - is not aliased
the way a plain stride could be), compute the candidate update only there, and take the
threshold between the k-th and (k+1)-th largest sampled magnitude with one `topk` on the
sample. Using the midpoint rather than the k-th value itself keeps the decision robust to the
last-ulp differences between backends that compute u in a different order.

block: the number of blocks is small (numel / block_size), so the block threshold is exact:
midpoint of the k-th and (k+1)-th largest block norm.

All functions stay on the tensors' device and return 0-d tensors, so the CUDA path never
synchronises with the host to pick a threshold.
"""

from __future__ import annotations

import torch

from .spec import _M32, element_hash, fmix32

SAMPLE_SIZE = 16384


def sample_indices(numel: int, seed: int, step: int, salt: int, device: torch.device,
                   sample_size: int = SAMPLE_SIZE) -> torch.Tensor:
    """Stratified sample of positions in [0, numel); all positions when numel <= sample_size."""
    if numel <= sample_size:
        return torch.arange(numel, device=device, dtype=torch.int64)
    strata = torch.arange(sample_size, device=device, dtype=torch.int64)
    start = (strata * numel) // sample_size
    width = ((strata + 1) * numel) // sample_size - start  # >= 1 since numel > sample_size
    jitter = element_hash(strata, sample_key(seed, step, salt))
    return start + jitter % width


def sample_key(seed: int, step: int, salt: int) -> int:
    """uint32 key that sample_indices mixes each stratum number with (the Triton kernel too)."""
    return fmix32(seed ^ 0x5BD1E995) ^ fmix32(step) ^ (salt & _M32)


def kth_largest_midpoint(values: torch.Tensor, k: int) -> torch.Tensor:
    """A threshold t with exactly k of `values` strictly above it (barring ties).

    k >= len(values) gives -1 (keep everything, magnitudes are >= 0); k <= 0 gives +inf.
    """
    n = values.numel()
    if k >= n:
        return torch.full((), -1.0, device=values.device, dtype=torch.float32)
    if k <= 0:
        return torch.full((), float("inf"), device=values.device, dtype=torch.float32)
    # One partial selection gives both order statistics (two kthvalue calls cost twice, and
    # CUDA's kthvalue runs a single block per slice). Take the smaller end of the order.
    if k <= n - k:
        top = torch.topk(values, k + 1, largest=True, sorted=True).values
        kth, next_ = top[k - 1], top[k]
    else:
        low = torch.topk(values, n - k + 1, largest=False, sorted=True).values
        kth, next_ = low[n - k], low[n - k - 1]
    return (0.5 * (kth.double() + next_.double())).float()


def topk_threshold(sample_abs: torch.Tensor, fraction: float) -> torch.Tensor:
    """Threshold on |u_total| that keeps ~fraction of elements, from sampled magnitudes."""
    k = max(1, int(round(fraction * sample_abs.numel())))
    return kth_largest_midpoint(sample_abs.float(), k)


def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def block_threshold(block_sq_norms: torch.Tensor, fraction: float) -> torch.Tensor:
    """Threshold on per-block squared L2 norms that keeps ~fraction of the blocks."""
    k = max(1, int(round(fraction * block_sq_norms.numel())))
    return kth_largest_midpoint(block_sq_norms.float(), k)
