"""Random optimizer-step cases shared by the kernel tests and the interpreted-Triton worker."""

import torch


def make_case(kind: str, residual: bool, n: int, seed: int = 0, device: str = "cpu"):
    """(param, grad, state) for a flat buffer of n elements, with moments of realistic size."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    state = {}
    if kind == "adamw":
        state["exp_avg"] = 0.01 * torch.randn(n, generator=gen)
        state["exp_avg_sq"] = 1e-4 * torch.rand(n, generator=gen)
    else:
        state["momentum_buffer"] = 0.1 * torch.randn(n, generator=gen)
    if residual:
        state["residual"] = 1e-4 * torch.randn(n, generator=gen)
    return p.to(device), g.to(device), {k: v.to(device) for k, v in state.items()}
