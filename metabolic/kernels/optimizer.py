"""MaskedAdamW and MaskedSGD: torch optimizers that apply only a selected part of each update.

Each step, per parameter (viewed as a flat buffer): update the moments for every element,
form the candidate update, add the residual (residual=True), select by the group's rule,
apply, and account the energy of the applied change. After every step
`optimizer.last_energy` holds {"metabolic", "changed", "numel", "fraction"} summed over the
params this rank stepped (under ZeRO: this rank's partition).

Everything selection-related lives in the param group (select, fraction, price, alpha,
residual, block_size, seed) and is re-read and re-validated every step, so a controller may
change it between steps: `for g in opt.param_groups: g["price"] = x`.

State is created lazily on the first step that sees a parameter and recreated if its size
changes, because DeepSpeed swaps param_groups[i]["params"] for flat fp32 partitions after the
optimizer is constructed.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch

from .spec import (SELECT_RULES, StepSpec, validate_count_price, validate_residual_decay,
                   validate_selection)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "native", "triton")
_STATE_BUFFERS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "residual")


def _run_backend(name: str, p: torch.Tensor, g: torch.Tensor, state: dict, spec: StepSpec,
                 out_bf16: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch one flat step; returns 0-d (energy float64, changed int64) on p's device."""
    if name == "auto":
        if p.is_cuda:
            name = "triton" if _triton_available() else "torch"
        else:
            from . import native
            name = "native" if p.device.type == "cpu" and native.available() else "torch"
    if name == "reference":
        from .reference import reference_step
        e, c = reference_step(p, g, state, spec, out_bf16)
        return torch.tensor(e, dtype=torch.float64), torch.tensor(c, dtype=torch.int64)
    if name == "triton":
        from .triton_step import triton_step
        return triton_step(p, g, state, spec, out_bf16)
    if name == "native":
        from .native import native_step
        return native_step(p, g, state, spec, out_bf16)
    from .fallback import fallback_step
    return fallback_step(p, g, state, spec, out_bf16)


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            from . import triton_step  # noqa: F401
            _TRITON_OK = True
        except Exception as exc:  # no triton wheel: the torch path still works on CUDA
            log.warning("Triton unavailable, masked optimizer uses the torch fallback: %s", exc)
            _TRITON_OK = False
    return _TRITON_OK


class _MaskedOptimizer(torch.optim.Optimizer):
    """Shared machinery; subclasses set _kind, _buffers() and _spec_args()."""

    _kind = ""

    def __init__(self, params: Iterable, defaults: dict) -> None:
        self._check_group(defaults)
        if defaults["backend"] not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {defaults['backend']!r}")
        seed = defaults["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        super().__init__(params, defaults)
        self._bf16_copies: dict[torch.Tensor, torch.Tensor] = {}
        # The step's totals stay on the device until someone reads last_energy: the engine's ledger
        # accumulates the tensors (last_energy_tensors), so a GPU step needs no host sync.
        self.last_energy_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_numel = 0
        self._last_dict: dict | None = {"metabolic": 0.0, "changed": 0, "numel": 0, "fraction": 0.0}

    @property
    def last_energy(self) -> dict:
        """This rank's {"metabolic": float, "changed": int, "numel", "fraction"} of the last step.

        DeepSpeed ZeRO 1-3 call step() once per param group (with the other groups swapped
        out), so with several groups sum it from a step post-hook, as the engine's ledger does."""
        if self._last_dict is None:
            e, c = self.last_energy_tensors
            metabolic, changed, numel = float(e), int(c), self._last_numel
            self._last_dict = {"metabolic": metabolic, "changed": changed, "numel": numel,
                               "fraction": (changed / numel) if numel else 0.0}
        return self._last_dict

    # -- validation -------------------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        lr = group["lr"]
        if not isinstance(lr, (int, float)) or lr < 0.0:
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
        validate_selection(group["select"], group["fraction"], group["price"], group["alpha"],
                           group["block_size"])
        if not isinstance(group["residual"], bool):
            raise ValueError(f"residual must be a bool, got {group['residual']!r}")
        validate_residual_decay(group["residual_decay"])
        validate_count_price(group["count_price"], group["select"])

    # -- bf16 output copies -----------------------------------------------------------------
    def attach_bf16_copy(self, param: torch.Tensor, copy: torch.Tensor) -> None:
        """After each step write param (fp32) rounded to bf16 into `copy` (same numel)."""
        if copy.dtype != torch.bfloat16 or copy.numel() != param.numel() or not copy.is_contiguous():
            raise ValueError("copy must be a contiguous bf16 tensor with param's numel")
        self._bf16_copies[param] = copy

    # -- state ------------------------------------------------------------------------------
    def _buffers(self, group: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def _spec_args(self, group: dict, step: int) -> dict:
        raise NotImplementedError

    def _state_for(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        names = self._buffers(group) + (("residual",) if group["residual"] else ())
        stale = any(k in state and state[k].numel() != p.numel() for k in _STATE_BUFFERS)
        if stale:  # the tensor behind this key changed size (ZeRO repartition): start over
            log.warning("masked optimizer: state size changed for a param, resetting its state")
            state.clear()
        if "step" not in state:
            state["step"] = 0
        for k in names:
            if k not in state:
                state[k] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    # -- step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        energies, changes, numel = [], [], 0
        salt = 0
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                salt += 1  # position of the tensor: decorrelates the random rule across tensors
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("masked optimizers do not support sparse gradients")
                if p.dtype != torch.float32:
                    raise TypeError(f"masked optimizers update fp32 (master) params, got {p.dtype}")
                state = self._state_for(p, group)
                state["step"] += 1
                spec = StepSpec(kind=self._kind, select=group["select"],
                                fraction=float(group["fraction"]), price=float(group["price"]),
                                alpha=float(group["alpha"]), residual=group["residual"],
                                residual_decay=float(group["residual_decay"]),
                                count_price=float(group["count_price"]),
                                block_size=group["block_size"], seed=group["seed"], salt=salt,
                                step=state["step"], **self._spec_args(group, state["step"]))
                flat_p = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
                flat_g = p.grad.reshape(-1)
                flat_state = {k: v.view(-1) for k, v in state.items() if torch.is_tensor(v)}
                copy = self._bf16_copies.get(p)
                e, c = _run_backend(group["backend"], flat_p, flat_g, flat_state, spec,
                                    None if copy is None else copy.view(-1))
                if not p.is_contiguous():
                    p.copy_(flat_p.view_as(p))
                energies.append(e)
                changes.append(c)
                numel += p.numel()
        self._set_last_energy(energies, changes, numel)
        return loss


    def _set_last_energy(self, energies: list[torch.Tensor], changes: list[torch.Tensor], numel: int) -> None:
        """Sum the per-tensor figures on the first tensor's device (no host sync)."""
        if not energies:
            e = torch.zeros((), dtype=torch.float64)
            c = torch.zeros((), dtype=torch.int64)
        elif len(energies) == 1:  # the usual case under ZeRO: one flat partition
            e, c = energies[0].to(torch.float64), changes[0].to(torch.int64)
        else:
            device = energies[0].device
            e = torch.stack([ei.to(device, torch.float64) for ei in energies]).sum()
            c = torch.stack([ci.to(device, torch.int64) for ci in changes]).sum()
        self.last_energy_tensors, self._last_numel, self._last_dict = (e, c), numel, None


class MaskedAdamW(_MaskedOptimizer):
    """AdamW (torch.optim.AdamW math, decoupled weight decay) with masked-sparse updates.

    select: one of SELECT_RULES. fraction: kept fraction for topk/random/block. price: lambda
    for hard/soft, in units of the coordinate's step size eta_i = lr / (sqrt(v_hat_i) + eps).
    alpha: exponent of the energy sum |dw|^alpha. residual: keep unselected updates and add
    them next step; residual_decay: the fraction of the residual kept per step (1 keeps all,
    below 1 it fades, as synaptic caching's transient weight does). count_price: with soft, a
    fee per changed weight on top of price per unit of change. backend: "auto" (Triton on
    CUDA; on CPU the native C step, or the torch fallback without a C compiler), "reference",
    "torch", "native" or "triton".
    """

    _kind = "adamw"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, select: str = "dense",
                 fraction: float = 1.0, price: float = 0.0, alpha: float = 1.0,
                 residual: bool = False, block_size: int = 4096, seed: int = 0,
                 backend: str = "auto", residual_decay: float = 1.0, count_price: float = 0.0) -> None:
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        select=select, fraction=fraction, price=price, alpha=alpha,
                        residual=residual, residual_decay=residual_decay, count_price=count_price,
                        block_size=block_size, seed=seed, backend=backend)
        super().__init__(params, defaults)

    def _buffers(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _spec_args(self, group: dict, step: int) -> dict:
        b1, b2 = group["betas"]
        return dict(lr=group["lr"], weight_decay=group["weight_decay"], beta1=b1, beta2=b2,
                    eps=group["eps"])


class MaskedSGD(_MaskedOptimizer):
    """SGD with momentum (torch.optim.SGD semantics, weight decay added to the gradient) with
    masked-sparse updates. Selection arguments as MaskedAdamW; eta_i = lr for every coordinate."""

    _kind = "sgd"

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 select: str = "dense", fraction: float = 1.0, price: float = 0.0,
                 alpha: float = 1.0, residual: bool = False, block_size: int = 4096,
                 seed: int = 0, backend: str = "auto", residual_decay: float = 1.0,
                 count_price: float = 0.0) -> None:
        if momentum < 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum!r}")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, select=select, fraction=fraction, price=price,
                        alpha=alpha, residual=residual, residual_decay=residual_decay,
                        count_price=count_price, block_size=block_size, seed=seed, backend=backend)
        super().__init__(params, defaults)

    def _buffers(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0.0 else ()

    def _spec_args(self, group: dict, step: int) -> dict:
        return dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                    dampening=group["dampening"], nesterov=group["nesterov"], first=step == 1)


__all__ = ["MaskedAdamW", "MaskedSGD", "SELECT_RULES", "BACKENDS"]
