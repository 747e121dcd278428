"""Optimizer-step cases shared by the kernel tests and the interpreted-Triton worker."""

import itertools

import torch

from metabolic.kernels.spec import StepSpec

RULES = ["dense", "topk", "hard", "soft", "random", "block"]
# (kind, rule, alpha, residual): every rule, energy exponent and residual mode
CASES = list(itertools.product(["adamw", "sgd"], RULES, [0.0, 1.0], [False, True]))
# (kind, rule): a fading residual (residual_decay 0.5) with every rule that leaves part of u unapplied
DECAY_CASES = list(itertools.product(["adamw", "sgd"], RULES[1:]))
# (kind, residual, residual_decay): soft with a fee per changed weight
COUNT_PRICE_CASES = [("adamw", False, 1.0), ("adamw", True, 1.0), ("sgd", False, 1.0), ("sgd", True, 0.5)]
COUNT_PRICE = 3e-6


def make_spec(kind: str, rule: str, alpha: float, residual: bool, **kw) -> StepSpec:
    """The step every backend test runs, with kw overriding any field."""
    # weight decay 0.1: its term (lr * wd * p, 1e-4 of p) is ten times the tests' relative
    # tolerance, so a backend that drops or misplaces it fails
    args = dict(kind=kind, lr=1e-3, weight_decay=0.1, momentum=0.9, select=rule, fraction=0.1,
                price=1e-4 if kind == "adamw" else 1e-3, alpha=alpha, residual=residual,
                block_size=1000, step=3, seed=1, salt=2)
    args.update(kw)
    return StepSpec(**args)


def case_key(kind: str, rule: str, alpha: float, residual: bool, decay: float = 1.0,
             count_price: float = 0.0) -> str:
    """Name of one case in the interpreted-Triton worker's results."""
    key = f"{kind}-{rule}-a{alpha:g}-r{int(residual)}"
    if decay != 1.0 or count_price:
        key += f"-d{decay:g}"
    return key + (f"-c{count_price:g}" if count_price else "")


def all_cases() -> list[tuple]:
    """Every (kind, rule, alpha, residual, decay, count_price) the backends are checked on."""
    return ([(*c, 1.0, 0.0) for c in CASES]
            + [(kind, rule, 1.0, True, 0.5, 0.0) for kind, rule in DECAY_CASES]
            + [(kind, "soft", 1.0, res, decay, COUNT_PRICE) for kind, res, decay in COUNT_PRICE_CASES])


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
